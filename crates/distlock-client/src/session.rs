//! One session: a gRPC stream, requests matched to replies by id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, Mode, RenewReport, SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use distlock_proto::v1 as proto;
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{from_status, RemoteStore};

/// Requests waiting for their answer; `None` once the stream has ended, so
/// that no request waits for an answer that cannot come.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Event>>>>>;

fn pending(map: &Pending) -> MutexGuard<'_, Option<HashMap<u64, oneshot::Sender<Event>>>> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The most key bytes one keep-alive names; more are sent in several.
const KEEP_ALIVE_BYTES: usize = 1024 * 1024;

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) struct RemoteSession {
    target: Arc<str>,
    requests: mpsc::UnboundedSender<proto::SessionRequest>,
    pending: Pending,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl RemoteSession {
    pub(crate) async fn open(store: &RemoteStore, options: &SessionOptions) -> Result<Self> {
        let target: Arc<str> = Arc::from(store.target.as_str());
        let (requests, outgoing) = mpsc::unbounded_channel();
        let open = proto::Open {
            ttl_ms: millis(options.ttl),
            lock_delay_ms: millis(options.lock_delay),
            // The core ends holds at max_hold itself, counting from each grant.
            max_hold_ms: 0,
        };
        let _ = requests.send(proto::SessionRequest {
            id: 0,
            body: Some(Request::Open(open)),
        });
        let stream = store.request(UnboundedReceiverStream::new(outgoing));
        let mut events = store
            .client
            .clone()
            .session(stream)
            .await
            .map_err(|status| from_status(&target, status))?
            .into_inner();
        match events.message().await {
            Ok(Some(proto::SessionEvent {
                body: Some(Event::Opened(_)),
                ..
            })) => {}
            Ok(_) => return Err(connection_lost(&target)),
            Err(status) => return Err(from_status(&target, status)),
        }
        let pending = Pending::new(Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(read_events(
            events,
            Arc::clone(&pending),
            requests.clone(),
            Arc::clone(&target),
        ));
        Ok(RemoteSession {
            target,
            requests,
            pending,
            next_id: AtomicU64::new(1),
            reader,
        })
    }

    /// Sends a request; returns its id and where its answer will come.
    fn send(&self, body: Request) -> Result<(u64, oneshot::Receiver<Event>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        match pending(&self.pending).as_mut() {
            Some(waiting) => waiting.insert(id, answer),
            None => return Err(connection_lost(&self.target)),
        };
        let request = proto::SessionRequest {
            id,
            body: Some(body),
        };
        if self.requests.send(request).is_err() {
            if let Some(waiting) = pending(&self.pending).as_mut() {
                waiting.remove(&id);
            }
            return Err(connection_lost(&self.target));
        }
        Ok((id, answered))
    }

    async fn call(&self, body: Request) -> Result<Event> {
        let (_, answered) = self.send(body)?;
        answered.await.map_err(|_| connection_lost(&self.target))
    }
}

fn connection_lost(target: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("the connection to the distlock server at {target} was lost"),
    )
}

fn failure(target: &str, failed: proto::Failed) -> Error {
    let kind = match proto::Code::try_from(failed.code) {
        Ok(proto::Code::InvalidArgument) if failed.message.starts_with("lock key") => {
            ErrorKind::InvalidKey
        }
        Ok(proto::Code::InvalidArgument) => ErrorKind::Config,
        Ok(proto::Code::NotHeld) => ErrorKind::NotHeld,
        Ok(proto::Code::SessionLost) => ErrorKind::Lost,
        Ok(proto::Code::ResourceExhausted | proto::Code::Unavailable) => ErrorKind::Unavailable,
        _ => ErrorKind::Store,
    };
    Error::new(
        kind,
        format!("distlock server at {target}: {}", failed.message),
    )
}

fn unexpected(target: &str, event: &Event) -> Error {
    Error::new(
        ErrorKind::Store,
        format!("distlock server at {target} answered with an unexpected {event:?}"),
    )
}

/// Dispatches the server's events to the requests waiting for them. A grant
/// nobody waits for any more (its acquire was dropped) is released.
async fn read_events(
    mut events: tonic::Streaming<proto::SessionEvent>,
    waiting: Pending,
    requests: mpsc::UnboundedSender<proto::SessionRequest>,
    target: Arc<str>,
) {
    loop {
        match events.message().await {
            Ok(Some(proto::SessionEvent {
                id,
                body: Some(body),
            })) => {
                let answer = pending(&waiting).as_mut().and_then(|w| w.remove(&id));
                let unclaimed = match answer {
                    Some(answer) => answer.send(body).err(),
                    None => Some(body),
                };
                if let Some(Event::Granted(granted)) = unclaimed {
                    give_back(&requests, granted);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(status) => {
                tracing::warn!("session stream to {target} broke: {}", status.message());
                break;
            }
        }
    }
    // Dropping the senders tells every waiting request the connection is
    // gone, and `None` turns away every later one.
    pending(&waiting).take();
}

/// Releases a grant nobody wants — that grant only, by its token — answered
/// by nobody (id 0 is never waited on).
fn give_back(requests: &mpsc::UnboundedSender<proto::SessionRequest>, granted: proto::Granted) {
    let release = proto::Release {
        key: granted.key,
        token: granted.token,
    };
    let _ = requests.send(proto::SessionRequest {
        id: 0,
        body: Some(Request::Release(release)),
    });
}

/// An acquire in flight; dropped before its answer, it cancels the wait and
/// gives back a grant that crossed the cancel.
struct InFlight<'a> {
    session: &'a RemoteSession,
    id: u64,
    answered: oneshot::Receiver<Event>,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(waiting) = pending(&self.session.pending).as_mut() {
            waiting.remove(&self.id);
        }
        let _ = self.session.requests.send(proto::SessionRequest {
            id: 0,
            body: Some(Request::Cancel(proto::Cancel {
                acquire_id: self.id,
            })),
        });
        // Closed first: the reader may have taken this request out of the
        // map but not yet sent its answer; after close that send fails and
        // the reader gives the grant back itself.
        self.answered.close();
        if let Ok(Event::Granted(granted)) = self.answered.try_recv() {
            give_back(&self.session.requests, granted);
        }
    }
}

#[async_trait]
impl StoreSession for RemoteSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let (mode, permits) = match request.mode {
            Mode::Exclusive => (proto::Mode::Exclusive, 0),
            Mode::Shared => (proto::Mode::Shared, 0),
            Mode::Semaphore { permits } => (proto::Mode::Semaphore, permits),
        };
        // Round up, so that a wait never ends before the caller's deadline.
        let wait_ms = request.wait_until.map_or(0, |until| {
            let left = until.saturating_duration_since(Instant::now());
            millis(left + Duration::from_micros(999)).max(1)
        });
        let acquire = proto::Acquire {
            key: request.key.clone(),
            mode: mode.into(),
            permits,
            wait_ms,
        };
        let (id, answered) = self.send(Request::Acquire(acquire))?;
        let mut in_flight = InFlight {
            session: self,
            id,
            answered,
            done: false,
        };
        let answer = (&mut in_flight.answered).await;
        in_flight.done = true;
        match answer.map_err(|_| connection_lost(&self.target))? {
            Event::Granted(granted) => Ok(Some(Grant::new(granted.token))),
            Event::NotGranted(_) => Ok(None),
            // The release of a grant that crossed a cancel has not landed
            // yet: busy for now; the core asks again.
            Event::Failed(failed) if failed.code == i32::from(proto::Code::AlreadyHeld) => Ok(None),
            Event::Failed(failed) => Err(failure(&self.target, failed)),
            other => Err(unexpected(&self.target, &other)),
        }
    }

    async fn release(&self, lock: &HeldLock) -> Result<()> {
        let release = proto::Release {
            key: lock.key.clone(),
            token: lock.token,
        };
        match self.call(Request::Release(release)).await? {
            Event::Released(_) => Ok(()),
            Event::Failed(failed) => Err(failure(&self.target, failed)),
            other => Err(unexpected(&self.target, &other)),
        }
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        // Within the server's message limit however many keys are held; an
        // empty list still renews the lease.
        let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
        let mut bytes = 0;
        for lock in held {
            if bytes + lock.key.len() > KEEP_ALIVE_BYTES {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += lock.key.len();
            chunks
                .last_mut()
                .expect("never empty")
                .push(lock.key.clone());
        }
        let mut lost_keys = Vec::new();
        for keys in chunks {
            match self
                .call(Request::KeepAlive(proto::KeepAlive { keys }))
                .await?
            {
                Event::Renewed(renewed) => lost_keys.extend(renewed.lost_keys),
                Event::Failed(failed) => return Err(failure(&self.target, failed)),
                other => return Err(unexpected(&self.target, &other)),
            }
        }
        Ok(RenewReport::lost(lost_keys))
    }

    async fn close(&self) -> Result<()> {
        match self.call(Request::Close(proto::Close {})).await? {
            Event::Closed(_) => Ok(()),
            Event::Failed(failed) => Err(failure(&self.target, failed)),
            other => Err(unexpected(&self.target, &other)),
        }
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
