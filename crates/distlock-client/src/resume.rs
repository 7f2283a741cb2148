//! Taking a session back on a new stream after its stream broke, within the
//! lease the core counts (see docs/0002-server.md).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock_core::store::{lock, Backoff};
use distlock_core::{Error, ErrorKind};
use distlock_proto::v1 as proto;
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, timeout_at, Instant};

use crate::session::{grpc_stream, read_events, unexpected, Link};
use crate::stream::{connection_lost, Inbox, Why};
use crate::{from_status, RemoteStore, Transport, CONNECT_TIMEOUT};

/// The first wait before trying again, doubling up to [`RETRY_AT_MOST`].
const RETRY_FIRST: Duration = Duration::from_millis(50);

/// The longest wait between two attempts.
const RETRY_AT_MOST: Duration = Duration::from_secs(1);

/// How long a resumed stream must stay up before its next break is tried
/// again at once; a stream that breaks sooner keeps the backoff going.
const STAYED_UP: Duration = Duration::from_secs(5);

/// The session's lease as the core counts it: from the send time of the
/// open or of the last renewal that succeeded, less the core's drift margin.
pub(crate) struct CoreLease {
    sent: Mutex<Instant>,
    ttl: Duration,
}

impl CoreLease {
    pub(crate) fn new(sent: Instant, ttl: Duration) -> Self {
        CoreLease {
            sent: Mutex::new(sent),
            ttl,
        }
    }

    /// A renewal sent at `sent` succeeded.
    pub(crate) fn renewed(&self, sent: Instant) {
        let mut last = lock(&self.sent);
        *last = (*last).max(sent);
    }

    /// When the core fires `lost()` unless a renewal succeeds first: the
    /// core's `sent + TTL − (TTL/100 + 2 ms)`.
    fn deadline(&self) -> Instant {
        let drift = self.ttl / 100 + Duration::from_millis(2);
        *lock(&self.sent) + self.ttl.saturating_sub(drift)
    }
}

/// What a session needs to take itself back on a new stream.
pub(crate) struct Resume {
    pub(crate) store: RemoteStore,
    pub(crate) session_id: u64,
    pub(crate) secret: Vec<u8>,
    pub(crate) lease: Arc<CoreLease>,
}

/// Why one attempt to resume failed.
enum NotResumed {
    /// The server has no such session (any more): give up.
    Gone(Error),
    /// The server could not be reached, or did not answer in time: try
    /// again.
    Unreachable(Error),
    /// The core's lease ran out: the session is lost to its client, so it
    /// is not taken back (its holds end with its lease at the server).
    Expired,
}

/// Whenever the session's stream breaks, takes the session back on a new
/// stream, again and again until it works or the lease the core counts has
/// run out; then ends the inbox, so that every request fails.
pub(crate) async fn keep_resuming(resume: Resume, inbox: Arc<Inbox>, link: Arc<Mutex<Link>>) {
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_AT_MOST);
    let mut resumed_at: Option<Instant> = None;
    loop {
        inbox.broke.notified().await;
        if inbox.is_ended() {
            return;
        }
        if !inbox.is_broken() {
            continue;
        }
        let mut wait = None;
        match resumed_at {
            // A stream that broke again at once: the server or the way to
            // it is not well yet, so the backoff goes on.
            Some(at) if at.elapsed() < STAYED_UP => wait = Some(backoff.next_delay()),
            _ => backoff = Backoff::new(RETRY_FIRST, RETRY_AT_MOST),
        }
        let mut why = None;
        loop {
            let deadline = resume.lease.deadline();
            if let Some(wait) = wait.take() {
                sleep_until((Instant::now() + wait).min(deadline)).await;
            }
            if inbox.is_ended() {
                return;
            }
            if Instant::now() >= deadline {
                give_up(&inbox, why);
                return;
            }
            match resume_once(&resume, &inbox, deadline).await {
                Ok(resumed) => {
                    let old = std::mem::replace(&mut *lock(&link), resumed);
                    old.close();
                    resumed_at = Some(Instant::now());
                    tracing::info!(target = %inbox.target, "session resumed");
                    break;
                }
                Err(NotResumed::Gone(err)) => {
                    tracing::warn!("{err}");
                    inbox.end(Some(Why::new(ErrorKind::Lost, err.to_string())));
                    return;
                }
                Err(NotResumed::Expired) => {
                    give_up(&inbox, why);
                    return;
                }
                Err(NotResumed::Unreachable(err)) => {
                    tracing::debug!("resuming failed, trying again: {err}");
                    why = Some(err);
                    wait = Some(backoff.next_delay());
                }
            }
        }
    }
}

/// Ends the session for its client: the lease the core counts ran out
/// before a resume could land.
fn give_up(inbox: &Inbox, why: Option<Error>) {
    let why = why.map_or_else(String::new, |err| format!(": {err}"));
    inbox.end(Some(Why::new(
        ErrorKind::Lost,
        format!("the session could not be resumed before its lease ran out{why}"),
    )));
}

/// One attempt to take the session back: a new stream that starts with
/// Resume, naming what the session knows it holds; on success the inbox
/// sends its waiting requests there (releases excepted: the resume ended
/// those holds). Gives up at `deadline`, and waits for the answer no longer
/// than the connect timeout.
async fn resume_once(
    resume: &Resume,
    inbox: &Arc<Inbox>,
    deadline: Instant,
) -> Result<Link, NotResumed> {
    let store = &resume.store;
    let target: Arc<str> = Arc::clone(&inbox.target);
    let kept: Vec<proto::HeldKey> = inbox
        .held()
        .into_iter()
        .map(|(key, token)| proto::HeldKey { key, token })
        .collect();
    let request = Request::Resume(proto::Resume {
        session_id: resume.session_id,
        secret: resume.secret.clone(),
        held: kept.clone(),
    });
    // The releases still waiting were of keys the session no longer
    // names: the resume ends those holds, which is what they asked.
    let released = |request: &Request| {
        matches!(request, Request::Release(release)
            if !kept.iter().any(|k| k.key == release.key && k.token == release.token))
    };
    match &store.transport {
        Transport::Grpc => {
            let answer_by = (Instant::now() + CONNECT_TIMEOUT).min(deadline);
            let started = timeout_at(answer_by, grpc_stream(store, request)).await;
            let (outlet, events, _) = match started {
                Ok(Ok(started)) => started,
                // The server's refusals: the session has ended, or the
                // secret is not its own.
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::PermissionDenied | tonic::Code::NotFound
                    ) =>
                {
                    let why =
                        Error::lost(format!("distlock server at {target}: {}", status.message()));
                    return Err(NotResumed::Gone(why.with_source(status)));
                }
                // A transport error ("transport error", `Unknown`) as much
                // as an `Unavailable`: tried again until the deadline.
                Ok(Err(status)) => return Err(classify(from_status(&target, status))),
                Err(_) => return Err(no_answer(&target, deadline)),
            };
            // Taken by the server just too late: dropping the stream leaves
            // the session to its lease there.
            if Instant::now() >= deadline {
                return Err(NotResumed::Expired);
            }
            inbox.resumed(outlet, &released);
            let reader = tokio::spawn(read_events(events, Arc::clone(inbox)));
            Ok(Link::Grpc(reader))
        }
        Transport::Mux(connections) => {
            let connection = match timeout_at(deadline, connections.get()).await {
                Ok(connection) => connection.map_err(classify)?,
                Err(_) => return Err(NotResumed::Expired),
            };
            let Some((stream, outlet)) = connection.attach(inbox) else {
                return Err(NotResumed::Unreachable(connection_lost(&target)));
            };
            let link = Link::Mux(Arc::clone(&connection), stream);
            let (answer, answered) = oneshot::channel();
            inbox.expect_resume(answer);
            outlet.send(0, request);
            let answer_by = (Instant::now() + CONNECT_TIMEOUT).min(deadline);
            let answer = timeout_at(answer_by, answered).await;
            let late = Instant::now() >= deadline;
            if let (Ok(Ok(Event::Opened(_))), false) = (&answer, late) {
                inbox.resumed(outlet, &released);
                // A connection that ended during the handshake told an
                // inbox that was still broken: break it again.
                if connection.is_ended() {
                    inbox.broken();
                }
                return Ok(link);
            }
            // Not taken: a stream the server may yet take ends, which
            // leaves the session to its lease there.
            link.close();
            match answer {
                Ok(Ok(Event::Opened(_))) => Err(NotResumed::Expired),
                Ok(Ok(other)) => Err(NotResumed::Gone(unexpected(&target, &other))),
                Ok(Err(_)) => Err(classify(inbox.ended())),
                Err(_) => Err(no_answer(&target, deadline)),
            }
        }
    }
}

/// Gone for what the server says of the session or its settings; anything
/// else (a connection that broke, an error of the transport) may pass, and
/// is tried again until the deadline.
fn classify(err: Error) -> NotResumed {
    match err.kind() {
        ErrorKind::Lost | ErrorKind::Config | ErrorKind::Unsupported => NotResumed::Gone(err),
        _ => NotResumed::Unreachable(err),
    }
}

/// A resume that was not answered in time: tried again, unless the lease
/// ran out meanwhile.
fn no_answer(target: &str, deadline: Instant) -> NotResumed {
    if Instant::now() >= deadline {
        return NotResumed::Expired;
    }
    NotResumed::Unreachable(Error::unavailable(format!(
        "the distlock server at {target} did not answer a resume within {CONNECT_TIMEOUT:?}"
    )))
}
