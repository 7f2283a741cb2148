//! One session: a gRPC stream or a stream of the multiplexed connection,
//! requests matched to replies by id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, RenewReport, SessionOptions, StoreSession,
};
use distlock_core::{Error, Result};
use distlock_proto::convert::millis;
use distlock_proto::{kinds, v1 as proto};
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::mux::MuxConnection;
use crate::stream::{connection_lost, Inbox, Outlet};
use crate::{from_status, RemoteStore, Transport};

/// The most key bytes one keep-alive names; more are sent in several.
const KEEP_ALIVE_BYTES: usize = 1024 * 1024;

/// What a key adds to a keep-alive besides its bytes (tag and length).
const KEY_OVERHEAD: usize = 8;

/// What a session holds on to of its transport while it lives.
enum Link {
    /// The task reading its gRPC stream.
    Grpc(JoinHandle<()>),
    /// Its stream on the store's multiplexed connection.
    Mux(Arc<MuxConnection>, u32),
}

pub(crate) struct RemoteSession {
    inbox: Arc<Inbox>,
    next_id: AtomicU64,
    link: Link,
}

impl RemoteSession {
    pub(crate) async fn open(store: &RemoteStore, options: &SessionOptions) -> Result<Self> {
        let open = proto::Open {
            ttl_ms: millis(options.ttl),
            lock_delay_ms: millis(options.lock_delay),
            // The core ends holds at max_hold itself, counting from each grant.
            max_hold_ms: 0,
            owner: options.owner.clone(),
        };
        let target: Arc<str> = Arc::from(store.target.as_str());
        let (inbox, link) = match &store.transport {
            Transport::Grpc => Self::open_grpc(store, target, open).await?,
            Transport::Mux(connections) => {
                let connection = connections.get().await?;
                let (inbox, stream) = connection.open_stream(target);
                let link = Link::Mux(connection, stream);
                // Dropped on failure, the link ends the stream.
                let opened = inbox.send(0, Request::Open(open));
                let opened = match opened {
                    Ok(opened) => opened.await.map_err(|_| inbox.ended()),
                    Err(err) => Err(err),
                };
                let session = RemoteSession {
                    inbox,
                    next_id: AtomicU64::new(1),
                    link,
                };
                return match opened? {
                    Event::Opened(_) => Ok(session),
                    other => Err(unexpected(&session.inbox.target, &other)),
                };
            }
        };
        Ok(RemoteSession {
            inbox,
            next_id: AtomicU64::new(1),
            link,
        })
    }

    async fn open_grpc(
        store: &RemoteStore,
        target: Arc<str>,
        open: proto::Open,
    ) -> Result<(Arc<Inbox>, Link)> {
        let (requests, outgoing) = mpsc::unbounded_channel();
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
        let inbox = Arc::new(Inbox::new(Arc::clone(&target), Outlet::Grpc(requests)));
        let reader = tokio::spawn(read_events(events, Arc::clone(&inbox)));
        Ok((inbox, Link::Grpc(reader)))
    }

    /// Sends a request; returns its id and where its answer will come.
    fn send(&self, body: Request) -> Result<(u64, oneshot::Receiver<Event>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok((id, self.inbox.send(id, body)?))
    }

    async fn call(&self, body: Request) -> Result<Event> {
        let (_, answered) = self.send(body)?;
        answered.await.map_err(|_| self.inbox.ended())
    }
}

fn failure(target: &str, failed: proto::Failed) -> Error {
    Error::new(
        kinds::kind_of(failed.code),
        format!("distlock server at {target}: {}", failed.message),
    )
}

fn unexpected(target: &str, event: &Event) -> Error {
    Error::store(format!(
        "distlock server at {target} answered with an unexpected {event:?}"
    ))
}

/// Delivers the events of a gRPC stream to its session.
async fn read_events(mut events: tonic::Streaming<proto::SessionEvent>, inbox: Arc<Inbox>) {
    loop {
        match events.message().await {
            Ok(Some(event)) => inbox.deliver(event),
            Ok(None) => break,
            Err(status) => {
                tracing::warn!(
                    "session stream to {} broke: {}",
                    inbox.target,
                    status.message()
                );
                break;
            }
        }
    }
    inbox.end(None);
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
        let inbox = &self.session.inbox;
        inbox.forget(self.id);
        inbox.outlet.send(
            0,
            Request::Cancel(proto::Cancel {
                acquire_id: self.id,
            }),
        );
        // Closed first: the reader may have taken this request out of the
        // map but not yet sent its answer; after close that send fails and
        // the reader gives the grant back itself.
        self.answered.close();
        if let Ok(Event::Granted(granted)) = self.answered.try_recv() {
            inbox.give_back(granted);
        }
    }
}

#[async_trait]
impl StoreSession for RemoteSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let (mode, permits) = distlock_proto::convert::proto_mode(request.mode);
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
        match answer.map_err(|_| self.inbox.ended())? {
            Event::Granted(granted) => Ok(Some(Grant::new(granted.token))),
            Event::NotGranted(_) => Ok(None),
            // The release of a grant that crossed a cancel has not landed
            // yet: busy for now; the core asks again.
            Event::Failed(failed) if failed.code == i32::from(proto::Code::AlreadyHeld) => Ok(None),
            Event::Failed(failed) => Err(failure(&self.inbox.target, failed)),
            other => Err(unexpected(&self.inbox.target, &other)),
        }
    }

    async fn release(&self, lock: &HeldLock) -> Result<()> {
        let release = proto::Release {
            key: lock.key.clone(),
            token: lock.token,
        };
        match self.call(Request::Release(release)).await? {
            Event::Released(_) => Ok(()),
            Event::Failed(failed) => Err(failure(&self.inbox.target, failed)),
            other => Err(unexpected(&self.inbox.target, &other)),
        }
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        // Within the server's message limit however many keys are held; an
        // empty list still renews the lease.
        let limit = match &self.link {
            Link::Mux(connection, _) => KEEP_ALIVE_BYTES.min(connection.max_frame() / 2),
            Link::Grpc(_) => KEEP_ALIVE_BYTES,
        };
        let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
        let mut bytes = 0;
        for lock in held {
            // A key costs its bytes and a few more of framing.
            let cost = lock.key.len() + KEY_OVERHEAD;
            if bytes + cost > limit && bytes > 0 {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += cost;
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
                Event::Failed(failed) => return Err(failure(&self.inbox.target, failed)),
                other => return Err(unexpected(&self.inbox.target, &other)),
            }
        }
        Ok(RenewReport::lost(lost_keys))
    }

    async fn close(&self) -> Result<()> {
        match self.call(Request::Close(proto::Close {})).await? {
            Event::Closed(_) => Ok(()),
            Event::Failed(failed) => Err(failure(&self.inbox.target, failed)),
            other => Err(unexpected(&self.inbox.target, &other)),
        }
    }

    async fn renewal_wanted(&self) {
        self.inbox.renewal_wanted.notified().await;
    }
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        match &self.link {
            Link::Grpc(reader) => reader.abort(),
            Link::Mux(connection, stream) => connection.close_stream(*stream),
        }
    }
}
