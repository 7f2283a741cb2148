//! One session's stream: `Open` (or `Resume`), then requests answered in order,
//! waits answered when their grant is pushed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::{lock, validate_owner};
use distlock_core::table::{lock_table, Attempt, SessionId, SessionSpec, Ticket, Waited};
use distlock_proto::v1 as proto;
use futures::future::{AbortHandle, Abortable, Aborted, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use proto::mux_event::Body as MuxBody;
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use crate::Shared;
use distlock_proto::convert::mode_of;

/// Where a session's events go: its gRPC stream, or its stream number on a
/// multiplexed connection.
#[derive(Clone)]
pub(crate) enum Outbound {
    Grpc(UnboundedSender<Result<proto::SessionEvent, Status>>),
    Mux {
        stream: u32,
        frames: UnboundedSender<proto::MuxEvent>,
    },
}

impl Outbound {
    /// Sends an event. A closed channel means the client left; the session
    /// then expires.
    pub(crate) fn event(&self, id: u64, body: Event) {
        let event = proto::SessionEvent {
            id,
            body: Some(body),
        };
        match self {
            Outbound::Grpc(out) => {
                let _ = out.send(Ok(event));
            }
            Outbound::Mux { stream, frames } => {
                let _ = frames.send(proto::MuxEvent {
                    stream: *stream,
                    body: Some(MuxBody::Event(event)),
                });
            }
        }
    }

    /// The stream's number on its connection (0 for gRPC).
    fn stream(&self) -> u32 {
        match self {
            Outbound::Grpc(_) => 0,
            Outbound::Mux { stream, .. } => *stream,
        }
    }

    /// Ends the stream with the reason.
    fn end(&self, status: Status) {
        match self {
            Outbound::Grpc(out) => {
                let _ = out.send(Err(status));
            }
            Outbound::Mux { stream, frames } => {
                let _ = frames.send(end_frame(*stream, &status));
            }
        }
    }
}

/// The waits of the streams one task serves: each ends with its stream and
/// request id once it has sent its answer, or aborted (a cancel, or its
/// session's stream gone), which drops its ticket and so leaves the queue.
pub(crate) type Waits = FuturesUnordered<BoxFuture<'static, Result<(u32, u64), Aborted>>>;

/// The frame that ends a multiplexed stream (stream 0: the connection).
pub(crate) fn end_frame(stream: u32, status: &Status) -> proto::MuxEvent {
    use tonic::Code;
    let code = match status.code() {
        Code::Unauthenticated => proto::Code::Unauthenticated,
        Code::InvalidArgument | Code::FailedPrecondition => proto::Code::InvalidArgument,
        Code::ResourceExhausted => proto::Code::ResourceExhausted,
        Code::Unavailable => proto::Code::Unavailable,
        // A session that cannot be resumed: it is gone for its client.
        Code::PermissionDenied | Code::NotFound => proto::Code::SessionLost,
        _ => proto::Code::Unspecified,
    };
    proto::MuxEvent {
        stream,
        body: Some(MuxBody::End(proto::End {
            code: code.into(),
            message: status.message().to_owned(),
        })),
    }
}

fn failed(code: proto::Code, message: impl Into<String>) -> Event {
    Event::Failed(proto::Failed {
        code: code.into(),
        message: message.into(),
    })
}

fn session_lost() -> Event {
    failed(
        proto::Code::SessionLost,
        "the session's lease ran out (no keep-alive in time); open a new session",
    )
}

/// Checks `Open` against the server's limits.
fn session_spec(shared: &Shared, open: &proto::Open) -> Result<SessionSpec, Status> {
    let config = &shared.config;
    let ttl = Duration::from_millis(open.ttl_ms);
    if ttl < config.min_ttl || ttl > config.max_ttl {
        return Err(Status::invalid_argument(format!(
            "session ttl {ttl:?} is out of range; this server accepts {:?} to {:?}",
            config.min_ttl, config.max_ttl
        )));
    }
    let lock_delay = Duration::from_millis(open.lock_delay_ms);
    if lock_delay > config.max_lock_delay {
        return Err(Status::invalid_argument(format!(
            "lock-delay {lock_delay:?} is over this server's limit of {:?}",
            config.max_lock_delay
        )));
    }
    let max_hold = (open.max_hold_ms > 0).then(|| Duration::from_millis(open.max_hold_ms));
    validate_owner(&open.owner).map_err(|err| Status::invalid_argument(err.to_string()))?;
    Ok(SessionSpec {
        owner: open.owner.clone(),
        ttl,
        lock_delay,
        max_hold,
    })
}

/// Serves one gRPC stream until the client closes it or goes away. A
/// session whose stream breaks is not ended: its holder may be alive behind
/// a broken network and still trusts its lease, so the lease runs out first.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut inbound: Streaming<proto::SessionRequest>,
    out: Outbound,
) {
    let first = match inbound.message().await {
        Ok(Some(first)) => first,
        Ok(None) => return,
        Err(status) => {
            // Tell the client why (e.g. an oversized or garbled message).
            out.end(status);
            return;
        }
    };
    let Some(mut stream) = SessionStream::open(shared, first, out) else {
        return;
    };
    let mut waits = Waits::new();
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if !stream.handle(request, &waits) {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    stream.out.end(status);
                    break;
                }
            },
            Some(done) = waits.next(), if !waits.is_empty() => {
                if let Ok((_, id)) = done {
                    stream.wait_ended(id);
                }
            }
        }
    }
    // Dropping the stream aborts its waits, and dropping them gives their
    // places in the queues back.
}

mod all;
mod resume;

pub(crate) use resume::Registered;

/// The waits of one stream of a session, by request id.
type WaitHandles = Arc<std::sync::Mutex<HashMap<u64, AbortHandle>>>;

/// How many session opens pass between two sweeps of the registry for
/// sessions whose leases ran out.
const SWEEP_EVERY: u64 = 1024;

pub(crate) struct SessionStream {
    shared: Arc<Shared>,
    session: SessionId,
    generation: u64,
    out: Outbound,
    wait_handles: WaitHandles,
    /// This stream was replaced by a resume: it serves nothing more (a
    /// half-open stream's late requests would act for a client that no
    /// longer listens on it).
    replaced: Arc<AtomicBool>,
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        let mut sessions = lock(&self.shared.sessions);
        if let Some(entry) = sessions.get_mut(&self.session) {
            if entry.generation == self.generation {
                // The stream broke or ended; the session lives on (until
                // its lease ends) and may be resumed.
                entry.out = None;
                entry.waits = WaitHandles::default();
            }
        }
        drop(sessions);
        // Its waiters leave the queues.
        for wait in lock(&self.wait_handles).values() {
            wait.abort();
        }
    }
}

impl SessionStream {
    /// Opens (or resumes) the session a stream's first request asks for;
    /// `None`, with the stream ended and the reason sent, if it cannot.
    pub(crate) fn open(
        shared: Arc<Shared>,
        first: proto::SessionRequest,
        out: Outbound,
    ) -> Option<SessionStream> {
        let (open_id, open) = match first {
            proto::SessionRequest {
                id,
                body: Some(Request::Open(open)),
            } => (id, open),
            proto::SessionRequest {
                id,
                body: Some(Request::Resume(resume)),
            } => return Self::resume(shared, id, resume, out),
            _ => {
                out.end(Status::failed_precondition(
                    "the first message of a session stream must be Open (or Resume)",
                ));
                return None;
            }
        };
        let spec = match session_spec(&shared, &open) {
            Ok(spec) => spec,
            Err(status) => {
                out.end(status);
                return None;
            }
        };
        if let Err(err) = shared.data.note_lease(spec.ttl + spec.lock_delay) {
            tracing::error!("{err}");
            out.end(Status::unavailable(format!(
                "the server cannot save its state: {err}"
            )));
            return None;
        }
        let opened = lock_table(&shared.table).open_session(spec);
        let session = match opened {
            Ok(session) => session,
            Err(full) => {
                out.end(Status::resource_exhausted(format!(
                    "the server has its limit of {} sessions open; close some or raise max_sessions",
                    full.0
                )));
                return None;
            }
        };
        let opened = shared
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if opened.is_multiple_of(SWEEP_EVERY) {
            Self::sweep(&shared);
        }
        let secret: [u8; 16] = rand::random();
        let wait_handles = WaitHandles::default();
        let replaced = Arc::new(AtomicBool::new(false));
        lock(&shared.sessions).insert(
            session,
            Registered {
                secret,
                generation: 0,
                out: Some(out.clone()),
                waits: Arc::clone(&wait_handles),
                replaced: Arc::clone(&replaced),
            },
        );
        out.event(
            open_id,
            Event::Opened(proto::Opened {
                session_id: session,
                resume_secret: secret.to_vec(),
            }),
        );
        Some(SessionStream {
            shared,
            session,
            generation: 0,
            out,
            wait_handles,
            replaced,
        })
    }

    /// Forgets a wait that has ended.
    pub(crate) fn wait_ended(&mut self, id: u64) {
        lock(&self.wait_handles).remove(&id);
    }

    /// Answers one request, starting its wait in `waits` if it has to wait;
    /// `false` when the session is closed.
    pub(crate) fn handle(&mut self, request: proto::SessionRequest, waits: &Waits) -> bool {
        if self.replaced.load(Ordering::SeqCst) {
            self.out.end(Status::aborted(
                "this session was resumed on another stream; this one serves it no more",
            ));
            return false;
        }
        let id = request.id;
        let reply = match request.body {
            Some(Request::Acquire(acquire)) => self.acquire(id, acquire, waits),
            Some(Request::AcquireAll(all)) => self.acquire_all(id, all, waits),
            Some(Request::Release(release)) => Some(self.release(&release.key, release.token)),
            Some(Request::KeepAlive(keep_alive)) => Some(self.keep_alive(keep_alive.keys)),
            Some(Request::Cancel(cancel)) => {
                if let Some(wait) = lock(&self.wait_handles).remove(&cancel.acquire_id) {
                    wait.abort();
                }
                None
            }
            Some(Request::Close(_)) => {
                let mut table = lock_table(&self.shared.table);
                if self.replaced.load(Ordering::SeqCst) {
                    return false;
                }
                table.end_session(self.session, None);
                drop(table);
                lock(&self.shared.sessions).remove(&self.session);
                self.out.event(id, Event::Closed(proto::Closed {}));
                return false;
            }
            Some(Request::Open(_) | Request::Resume(_)) => Some(failed(
                proto::Code::InvalidArgument,
                "this stream already has a session; open another stream for another session",
            )),
            None => Some(failed(proto::Code::InvalidArgument, "empty request")),
        };
        if let Some(reply) = reply {
            self.out.event(id, reply);
        }
        true
    }

    fn acquire(&mut self, id: u64, acquire: proto::Acquire, waits: &Waits) -> Option<Event> {
        if lock(&self.wait_handles).contains_key(&id) {
            return Some(failed(
                proto::Code::InvalidArgument,
                format!("request id {id} is already waiting; give each request its own id"),
            ));
        }
        let max_key = self.shared.config.max_key_bytes;
        if acquire.key.is_empty() || acquire.key.len() > max_key {
            return Some(failed(
                proto::Code::InvalidKey,
                format!(
                    "lock key is {} bytes long; a key is any UTF-8 string of 1 to {max_key} bytes",
                    acquire.key.len()
                ),
            ));
        }
        let mode = match mode_of(acquire.mode, acquire.permits) {
            Ok(mode) => mode,
            Err(why) => return Some(failed(proto::Code::InvalidArgument, why)),
        };
        let wait = Duration::from_millis(acquire.wait_ms);
        let arrived = Instant::now();
        let attempt = {
            let mut table = lock_table(&self.shared.table);
            // Checked under the lock a resume sets it under.
            if self.replaced.load(Ordering::SeqCst) {
                return Some(failed(
                    proto::Code::Unavailable,
                    "this session was resumed on another stream",
                ));
            }
            table.acquire(self.session, &acquire.key, mode, !wait.is_zero())
        };
        if !matches!(attempt, Attempt::Queued(..)) {
            let metrics = &self.shared.metrics;
            metrics
                .acquire_seconds
                .observe(arrived.elapsed().as_secs_f64());
        }
        match attempt {
            Attempt::Granted(token) => Some(Event::Granted(proto::Granted {
                key: acquire.key,
                token,
            })),
            Attempt::Busy => Some(Event::NotGranted(proto::NotGranted {})),
            Attempt::SessionGone => Some(session_lost()),
            Attempt::AlreadyHeld => Some(failed(
                proto::Code::AlreadyHeld,
                format!(
                    "this session already holds or waits for '{}'; a session takes a key once",
                    acquire.key
                ),
            )),
            Attempt::QueueFull => Some(failed(
                proto::Code::ResourceExhausted,
                format!(
                    "'{}' already has {} waiters, this server's limit; try again later",
                    acquire.key, self.shared.config.max_waiters_per_key
                ),
            )),
            Attempt::NoTokens => Some(failed(
                proto::Code::Unavailable,
                "the server cannot save its token epoch, so it grants nothing; see its log",
            )),
            Attempt::Queued(waiter, grant) => {
                // Made before the task: if the task is aborted before it
                // first runs, dropping the ticket still gives a grant back.
                let table = Arc::clone(&self.shared.table);
                let ticket = Ticket::new(table, self.session, acquire.key, waiter, grant);
                let (shared, out) = (Arc::clone(&self.shared), self.out.clone());
                // Waits past what an Instant can hold are waits without end.
                let until = arrived
                    .checked_add(wait)
                    .unwrap_or_else(|| arrived + Duration::from_secs(100 * 365 * 24 * 3600));
                let stream = self.out.stream();
                let wait = async move {
                    let key = ticket.key().to_owned();
                    let waited = ticket.wait(until).await;
                    let metrics = &shared.metrics;
                    metrics
                        .acquire_seconds
                        .observe(arrived.elapsed().as_secs_f64());
                    if matches!(waited, Waited::Granted(_)) {
                        metrics
                            .wait_seconds
                            .observe(arrived.elapsed().as_secs_f64());
                    }
                    // No await between the grant and its send: an abort
                    // here would lose a grant nobody then releases.
                    let event = match waited {
                        Waited::Granted(token) => Event::Granted(proto::Granted { key, token }),
                        Waited::TimedOut => Event::NotGranted(proto::NotGranted {}),
                        Waited::SessionGone => session_lost(),
                    };
                    out.event(id, event);
                    (stream, id)
                };
                let (handle, registration) = AbortHandle::new_pair();
                waits.push(Abortable::new(wait, registration).boxed());
                lock(&self.wait_handles).insert(id, handle);
                None
            }
        }
    }

    fn release(&self, key: &str, token: u64) -> Event {
        let token = (token != 0).then_some(token);
        if lock_table(&self.shared.table).release(self.session, key, token) {
            Event::Released(proto::Released {})
        } else {
            failed(
                proto::Code::NotHeld,
                format!("this session does not hold '{key}' (released, lost, or held by another session)"),
            )
        }
    }

    fn keep_alive(&self, keys: Vec<String>) -> Event {
        let mut table = lock_table(&self.shared.table);
        if !table.renew(self.session) {
            return session_lost();
        }
        let lost_keys = keys
            .into_iter()
            .filter(|key| !table.holds(self.session, key))
            .collect();
        Event::Renewed(proto::Renewed { lost_keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client takes a mux stream's end code as a gRPC stream's status:
    /// a refused resume must read as the session lost.
    #[test]
    fn each_status_ends_a_mux_stream_with_its_code() {
        let cases = [
            (Status::unauthenticated(""), proto::Code::Unauthenticated),
            (Status::invalid_argument(""), proto::Code::InvalidArgument),
            (
                Status::failed_precondition(""),
                proto::Code::InvalidArgument,
            ),
            (
                Status::resource_exhausted(""),
                proto::Code::ResourceExhausted,
            ),
            (Status::unavailable(""), proto::Code::Unavailable),
            (Status::permission_denied(""), proto::Code::SessionLost),
            (Status::not_found(""), proto::Code::SessionLost),
            (Status::internal(""), proto::Code::Unspecified),
        ];
        for (status, code) in cases {
            let frame = end_frame(3, &status);
            assert_eq!(frame.stream, 3);
            let Some(MuxBody::End(end)) = frame.body else {
                panic!("{frame:?}");
            };
            assert_eq!(end.code, i32::from(code), "{status:?}");
        }
    }
}
