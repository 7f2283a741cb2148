//! One session's stream: `Open`, then requests answered in order, waits
//! answered when their grant is pushed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use distlock_core::table::{lock_table, Attempt, SessionId, SessionSpec, Ticket, Waited};
use distlock_proto::v1 as proto;
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tonic::{Status, Streaming};

use crate::convert::mode_of;
use crate::Shared;

/// Where a session's events go.
type Outbound = UnboundedSender<Result<proto::SessionEvent, Status>>;

fn send(out: &Outbound, id: u64, body: Event) {
    // A closed channel means the client left; the session then expires.
    let _ = out.send(Ok(proto::SessionEvent {
        id,
        body: Some(body),
    }));
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
    Ok(SessionSpec {
        ttl,
        lock_delay,
        max_hold,
    })
}

/// Serves one stream until the client closes it or goes away. A session
/// whose stream breaks is not ended: its holder may be alive behind a
/// broken network and still trusts its lease, so the lease runs out first.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut inbound: Streaming<proto::SessionRequest>,
    out: Outbound,
) {
    let (open_id, open) = match inbound.message().await {
        Ok(Some(proto::SessionRequest {
            id,
            body: Some(Request::Open(open)),
        })) => (id, open),
        Ok(Some(_)) => {
            let _ = out.send(Err(Status::failed_precondition(
                "the first message of a session stream must be Open",
            )));
            return;
        }
        Ok(None) => return,
        Err(status) => {
            // Tell the client why (e.g. an oversized or garbled message).
            let _ = out.send(Err(status));
            return;
        }
    };
    let spec = match session_spec(&shared, &open) {
        Ok(spec) => spec,
        Err(status) => {
            let _ = out.send(Err(status));
            return;
        }
    };
    if let Err(err) = shared.data.note_lease(spec.ttl + spec.lock_delay) {
        tracing::error!("{err}");
        let _ = out.send(Err(Status::unavailable(format!(
            "the server cannot save its state: {err}"
        ))));
        return;
    }
    let opened = lock_table(&shared.table).open_session(spec);
    let session = match opened {
        Ok(session) => session,
        Err(full) => {
            let _ = out.send(Err(Status::resource_exhausted(format!(
                "the server has its limit of {} sessions open; close some or raise max_sessions",
                full.0
            ))));
            return;
        }
    };
    send(
        &out,
        open_id,
        Event::Opened(proto::Opened {
            session_id: session,
        }),
    );
    let mut stream = SessionStream {
        shared,
        session,
        out,
        waits: JoinSet::new(),
        wait_handles: HashMap::new(),
    };
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if !stream.handle(request) {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    let _ = stream.out.send(Err(status));
                    break;
                }
            },
            Some(done) = stream.waits.join_next() => {
                if let Ok(id) = done {
                    stream.wait_handles.remove(&id);
                }
            }
        }
    }
    // Dropping the JoinSet aborts the waits: their waiters leave the queues.
}

struct SessionStream {
    shared: Arc<Shared>,
    session: SessionId,
    out: Outbound,
    waits: JoinSet<u64>,
    wait_handles: HashMap<u64, AbortHandle>,
}

impl SessionStream {
    /// Answers one request; `false` when the session is closed.
    fn handle(&mut self, request: proto::SessionRequest) -> bool {
        let id = request.id;
        let reply = match request.body {
            Some(Request::Acquire(acquire)) => self.acquire(id, acquire),
            Some(Request::Release(release)) => Some(self.release(&release.key, release.token)),
            Some(Request::KeepAlive(keep_alive)) => Some(self.keep_alive(keep_alive.keys)),
            Some(Request::Cancel(cancel)) => {
                if let Some(wait) = self.wait_handles.remove(&cancel.acquire_id) {
                    wait.abort();
                }
                None
            }
            Some(Request::Close(_)) => {
                lock_table(&self.shared.table).end_session(self.session, None);
                send(&self.out, id, Event::Closed(proto::Closed {}));
                return false;
            }
            Some(Request::Open(_)) => Some(failed(
                proto::Code::InvalidArgument,
                "this stream already has a session; open another stream for another session",
            )),
            None => Some(failed(proto::Code::InvalidArgument, "empty request")),
        };
        if let Some(reply) = reply {
            send(&self.out, id, reply);
        }
        true
    }

    fn acquire(&mut self, id: u64, acquire: proto::Acquire) -> Option<Event> {
        let max_key = self.shared.config.max_key_bytes;
        if acquire.key.is_empty() || acquire.key.len() > max_key {
            return Some(failed(
                proto::Code::InvalidArgument,
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
        let attempt = lock_table(&self.shared.table).acquire(
            self.session,
            &acquire.key,
            mode,
            !wait.is_zero(),
        );
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
                let handle = self.waits.spawn(async move {
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
                    send(&out, id, event);
                    id
                });
                self.wait_handles.insert(id, handle);
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
