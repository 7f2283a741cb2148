//! One session: a gRPC stream or a stream of the multiplexed connection,
//! requests matched to replies by id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    lock, AcquireRequest, Grant, HeldLock, RenewReport, SessionOptions, StoreSession,
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
use crate::resume::{keep_resuming, CoreLease, Resume};
use crate::stream::{Inbox, Outlet};
use crate::{from_status, RemoteStore, Transport};

/// The most key bytes one keep-alive names; more are sent in several.
const KEEP_ALIVE_BYTES: usize = 1024 * 1024;

/// What a key adds to a keep-alive besides its bytes (tag and length).
const KEY_OVERHEAD: usize = 8;

/// What a session holds on to of its transport while it lives.
pub(crate) enum Link {
    /// The task reading its gRPC stream.
    Grpc(JoinHandle<()>),
    /// Its stream on the store's multiplexed connection.
    Mux(Arc<MuxConnection>, u32),
}

impl Link {
    /// Lets the stream go: the server then forgets its waits.
    pub(crate) fn close(&self) {
        match self {
            Link::Grpc(reader) => reader.abort(),
            Link::Mux(connection, stream) => connection.close_stream(*stream),
        }
    }
}

pub(crate) struct RemoteSession {
    inbox: Arc<Inbox>,
    next_id: AtomicU64,
    link: Arc<std::sync::Mutex<Link>>,
    /// The lease as the core counts it: the resumer gives up at its end.
    lease: Arc<CoreLease>,
    /// Takes the session back whenever its stream breaks.
    resumer: JoinHandle<()>,
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
        // The core counts the first lease from just before it asked for
        // this session, microseconds earlier.
        let sent = Instant::now();
        let (inbox, link, opened) = match &store.transport {
            Transport::Grpc => {
                let (outlet, events, opened) = grpc_stream(store, Request::Open(open))
                    .await
                    .map_err(|status| from_status(&target, status))?;
                let inbox = Arc::new(Inbox::new(target, outlet));
                let reader = tokio::spawn(read_events(events, Arc::clone(&inbox)));
                (inbox, Link::Grpc(reader), opened)
            }
            Transport::Mux(connections) => {
                let connection = connections.get().await?;
                let (inbox, stream) = connection.open_stream(target);
                let link = Link::Mux(connection, stream);
                let opened = match inbox.send(0, Request::Open(open)) {
                    Ok(opened) => opened.await.map_err(|_| inbox.ended()),
                    Err(err) => Err(err),
                };
                let opened = match opened {
                    Ok(Event::Opened(opened)) => opened,
                    Ok(other) => {
                        Err(unexpected(&inbox.target, &other)).inspect_err(|_| link.close())?
                    }
                    Err(err) => {
                        link.close();
                        return Err(err);
                    }
                };
                (inbox, link, opened)
            }
        };
        let link = Arc::new(std::sync::Mutex::new(link));
        let lease = Arc::new(CoreLease::new(sent, options.ttl));
        let resume = Resume {
            store: store.clone(),
            session_id: opened.session_id,
            secret: opened.resume_secret,
            lease: Arc::clone(&lease),
        };
        // A server too old to resume sends no secret: a broken stream then
        // ends the session's use, as before.
        inbox.set_resumable(!resume.secret.is_empty());
        let resumer = tokio::spawn(keep_resuming(resume, Arc::clone(&inbox), Arc::clone(&link)));
        Ok(RemoteSession {
            inbox,
            next_id: AtomicU64::new(1),
            link,
            lease,
            resumer,
        })
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

/// Starts a gRPC stream with `first` (an Open or a Resume) and waits for
/// its Opened: where the stream's requests go, its events, and the Opened;
/// or the status the stream ended with.
pub(crate) async fn grpc_stream(
    store: &RemoteStore,
    first: Request,
) -> std::result::Result<
    (Outlet, tonic::Streaming<proto::SessionEvent>, proto::Opened),
    tonic::Status,
> {
    let (requests, outgoing) = mpsc::unbounded_channel();
    let _ = requests.send(proto::SessionRequest {
        id: 0,
        body: Some(first),
    });
    let stream = store.request(UnboundedReceiverStream::new(outgoing));
    let mut events = store.client.clone().session(stream).await?.into_inner();
    match events.message().await? {
        Some(proto::SessionEvent {
            body: Some(Event::Opened(opened)),
            ..
        }) => Ok((Outlet::Grpc(requests), events, opened)),
        _ => Err(tonic::Status::unavailable(
            "the stream ended before the session was opened",
        )),
    }
}

fn failure(target: &str, failed: proto::Failed) -> Error {
    Error::new(
        kinds::kind_of(failed.code),
        format!("distlock server at {target}: {}", failed.message),
    )
}

pub(crate) fn unexpected(target: &str, event: &Event) -> Error {
    Error::store(format!(
        "distlock server at {target} answered with an unexpected {event:?}"
    ))
}

/// Delivers the events of a gRPC stream to its session.
pub(crate) async fn read_events(
    mut events: tonic::Streaming<proto::SessionEvent>,
    inbox: Arc<Inbox>,
) {
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
    // The session lives on at the server until its lease ends.
    inbox.broken();
}

/// The wait of a request waiting until `until` (0: try once), rounded up
/// so that it never ends before the caller's deadline.
fn wait_ms(until: Option<Instant>) -> u64 {
    until.map_or(0, |until| {
        let left = until.saturating_duration_since(Instant::now());
        millis(left + Duration::from_micros(999)).max(1)
    })
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
        inbox.send_once(Request::Cancel(proto::Cancel {
            acquire_id: self.id,
        }));
        // Closed first: the reader may have taken this request out of the
        // map but not yet sent its answer; after close that send fails and
        // the reader gives the grant back itself.
        self.answered.close();
        match self.answered.try_recv() {
            Ok(Event::Granted(granted)) => inbox.give_back(granted),
            Ok(Event::GrantedAll(all)) => all.granted.into_iter().for_each(|g| inbox.give_back(g)),
            _ => {}
        }
    }
}

#[async_trait]
impl StoreSession for RemoteSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let (mode, permits) = distlock_proto::convert::proto_mode(request.mode);
        let acquire = proto::Acquire {
            key: request.key.clone(),
            mode: mode.into(),
            permits,
            wait_ms: wait_ms(request.wait_until),
        };
        let (id, answered) = self.send(Request::Acquire(acquire))?;
        let mut in_flight = InFlight {
            session: self,
            id,
            answered,
            done: false,
        };
        // A request sent again on a resumed stream asks for its whole wait
        // again: the caller's deadline bounds it here.
        let answer = match request.wait_until {
            Some(until) => {
                let grace = until + Duration::from_millis(100);
                match tokio::time::timeout_at(grace, &mut in_flight.answered).await {
                    Ok(answer) => answer,
                    // Dropping the request in flight cancels it.
                    Err(_) => return Ok(None),
                }
            }
            None => (&mut in_flight.answered).await,
        };
        in_flight.done = true;
        match answer.map_err(|_| self.inbox.ended())? {
            // Ended by a forced release before its answer arrived: not
            // held; the core asks again.
            Event::Granted(granted) if self.inbox.take_ended(&request.key, granted.token) => {
                self.inbox.forget_grant(&request.key, granted.token);
                Ok(None)
            }
            Event::Granted(granted) => Ok(Some(Grant::new(granted.token))),
            Event::NotGranted(_) => Ok(None),
            // The release of a grant that crossed a cancel has not landed
            // yet: busy for now; the core asks again.
            Event::Failed(failed) if failed.code == i32::from(proto::Code::AlreadyHeld) => Ok(None),
            Event::Failed(failed) => Err(failure(&self.inbox.target, failed)),
            other => Err(unexpected(&self.inbox.target, &other)),
        }
    }

    async fn acquire_all(&self, requests: &[AcquireRequest]) -> Result<Option<Vec<Grant>>> {
        let wait_until = requests.first().and_then(|request| request.wait_until);
        let keys = requests
            .iter()
            .map(|request| {
                let (mode, permits) = distlock_proto::convert::proto_mode(request.mode);
                proto::AcquireKey {
                    key: request.key.clone(),
                    mode: mode.into(),
                    permits,
                }
            })
            .collect();
        let (id, answered) = self.send(Request::AcquireAll(proto::AcquireAll {
            keys,
            wait_ms: wait_ms(wait_until),
        }))?;
        let mut in_flight = InFlight {
            session: self,
            id,
            answered,
            done: false,
        };
        let answer = match wait_until {
            Some(until) => {
                let grace = until + Duration::from_millis(100);
                match tokio::time::timeout_at(grace, &mut in_flight.answered).await {
                    Ok(answer) => answer,
                    Err(_) => return Ok(None),
                }
            }
            None => (&mut in_flight.answered).await,
        };
        in_flight.done = true;
        match answer.map_err(|_| self.inbox.ended())? {
            Event::GrantedAll(all) => {
                // One ended by a forced release before the answer came:
                // none is kept; the core asks again.
                // Every key's news is taken, not only the first's.
                let ended = all
                    .granted
                    .iter()
                    .filter(|g| self.inbox.take_ended(&g.key, g.token))
                    .count()
                    > 0;
                if ended || all.granted.len() != requests.len() {
                    all.granted
                        .into_iter()
                        .for_each(|granted| self.inbox.give_back(granted));
                    return Ok(None);
                }
                Ok(Some(
                    all.granted
                        .into_iter()
                        .map(|granted| Grant::new(granted.token))
                        .collect(),
                ))
            }
            Event::NotGranted(_) => Ok(None),
            Event::Failed(failed) if failed.code == i32::from(proto::Code::AlreadyHeld) => Ok(None),
            // A server from before AcquireAll: the core takes the keys one
            // at a time instead.
            Event::Failed(failed)
                if failed.code == i32::from(proto::Code::InvalidArgument)
                    && failed.message == "empty request" =>
            {
                Err(Error::new(
                    distlock_core::ErrorKind::Unsupported,
                    format!(
                        "the distlock server at {} takes no AcquireAll (it is older than this \
                         client)",
                        self.inbox.target
                    ),
                ))
            }
            Event::Failed(failed) => Err(failure(&self.inbox.target, failed)),
            other => Err(unexpected(&self.inbox.target, &other)),
        }
    }

    async fn release(&self, lock: &HeldLock) -> Result<()> {
        // Not named by a resume from now on: one ends the hold too.
        self.inbox.forget_grant(&lock.key, lock.token);
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
        // As the core counts it: from before the first keep-alive is sent.
        let sent = Instant::now();
        // Within the server's message limit however many keys are held; an
        // empty list still renews the lease.
        let limit = match &*lock(&self.link) {
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
        // Holds the server said it ended count as lost even if this
        // renewal's answer came before the news (a grant racing a forced
        // release).
        let mut lost_keys: Vec<String> = held
            .iter()
            .filter(|lock| self.inbox.take_ended(&lock.key, lock.token))
            .map(|lock| lock.key.clone())
            .collect();
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
        lost_keys.sort_unstable();
        lost_keys.dedup();
        self.lease.renewed(sent);
        Ok(RenewReport::lost(lost_keys))
    }

    async fn close(&self) -> Result<()> {
        self.inbox.set_resumable(false);
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
        self.resumer.abort();
        self.inbox.set_resumable(false);
        lock(&self.link).close();
    }
}
