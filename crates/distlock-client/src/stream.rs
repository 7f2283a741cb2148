//! A session's stream, below both transports: where its requests go (a
//! gRPC stream, or a stream number of the multiplexed connection) and who
//! waits for which answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use distlock_core::store::lock;
use distlock_core::{Error, ErrorKind, Result};
use distlock_proto::v1 as proto;
use proto::mux_request::Body as MuxBody;
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::sync::{mpsc, oneshot};

/// Where a session's requests go: its gRPC stream, or its stream number on
/// the store's multiplexed connection.
#[derive(Clone)]
pub(crate) enum Outlet {
    Grpc(mpsc::UnboundedSender<proto::SessionRequest>),
    Mux {
        stream: u32,
        frames: mpsc::UnboundedSender<proto::MuxRequest>,
    },
}

impl Outlet {
    /// Sends a request; `false` if the connection is gone.
    pub(crate) fn send(&self, id: u64, body: Request) -> bool {
        let request = proto::SessionRequest {
            id,
            body: Some(body),
        };
        match self {
            Outlet::Grpc(requests) => requests.send(request).is_ok(),
            Outlet::Mux { stream, frames } => frames
                .send(proto::MuxRequest {
                    stream: *stream,
                    body: Some(MuxBody::Request(request)),
                })
                .is_ok(),
        }
    }
}

/// Why a stream ended: the kind and message of the error each of its
/// requests gets, and the transport's error behind it, if any (shared by
/// every stream of a connection).
#[derive(Clone)]
pub(crate) struct Why {
    kind: ErrorKind,
    message: String,
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Why {
    pub(crate) fn new(kind: ErrorKind, message: String) -> Self {
        Why {
            kind,
            message,
            cause: None,
        }
    }

    /// The same, with the transport's error as the source.
    pub(crate) fn caused_by(
        mut self,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.cause = Some(Arc::new(cause));
        self
    }

    /// The error a request of the stream gets.
    pub(crate) fn error(&self) -> Error {
        let error = Error::new(self.kind, self.message.clone());
        match &self.cause {
            Some(cause) => error.with_source(Arc::clone(cause)),
            None => error,
        }
    }
}

/// Which waiting requests a resume answers itself, unsent: the releases of
/// holds the resume ended.
pub(crate) type Released<'a> = &'a (dyn Fn(&Request) -> bool + Sync);

/// Requests waiting for their answer, until the stream ends.
struct Answers {
    /// Each request, kept to send again on a resumed stream, and where its
    /// answer goes.
    waiting: HashMap<u64, (Request, oneshot::Sender<Event>)>,
    /// The stream broke and the session waits to be resumed: requests wait
    /// unsent until then.
    broken: bool,
    /// Why the stream ended, once it has for good: no request then waits
    /// for an answer that cannot come.
    ended: Option<Why>,
    /// Whether a broken stream is resumed (the session has a secret and is
    /// not closing) rather than ended.
    resumable: bool,
    /// Where the answer to a Resume goes (the Opened of id 0 on the new
    /// stream).
    resume: Option<oneshot::Sender<Event>>,
    /// The grants this session was told of and has not given back, by key:
    /// what a resume names.
    held: HashMap<String, u64>,
}

/// A session's side of its stream: where its requests go and who waits for
/// which answer. The stream's reader delivers the server's events here.
/// When the stream breaks the inbox keeps its requests, and a resumed stream
/// gets them again.
pub(crate) struct Inbox {
    pub(crate) target: Arc<str>,
    outlet: Mutex<Outlet>,
    answers: Mutex<Answers>,
    /// Told when the server pushes news of holds it ended.
    pub(crate) renewal_wanted: tokio::sync::Notify,
    /// The holds the server said it ended (key, token), until an acquire or
    /// a renewal has taken the news.
    ended_holds: Mutex<std::collections::HashSet<(String, u64)>>,
    /// Told when the stream breaks and the session should be resumed.
    pub(crate) broke: tokio::sync::Notify,
}

impl Inbox {
    pub(crate) fn new(target: Arc<str>, outlet: Outlet) -> Self {
        Inbox {
            target,
            outlet: Mutex::new(outlet),
            answers: Mutex::new(Answers {
                waiting: HashMap::new(),
                broken: false,
                ended: None,
                resumable: false,
                resume: None,
                held: HashMap::new(),
            }),
            renewal_wanted: tokio::sync::Notify::new(),
            ended_holds: Mutex::default(),
            broke: tokio::sync::Notify::new(),
        }
    }

    fn answers(&self) -> MutexGuard<'_, Answers> {
        lock(&self.answers)
    }

    /// Sends request `id` and returns where its answer will come. While the
    /// stream is broken the request waits to be sent on the resumed one.
    pub(crate) fn send(&self, id: u64, body: Request) -> Result<oneshot::Receiver<Event>> {
        let (answer, answered) = oneshot::channel();
        let mut answers = self.answers();
        if answers.ended.is_some() {
            drop(answers);
            return Err(self.ended());
        }
        // Sent under the lock, so that a resume cannot send it a second
        // time. A send that finds the connection gone waits for the resume
        // too: the stream's reader says it broke.
        if !answers.broken {
            lock(&self.outlet).send(id, body.clone());
        }
        answers.waiting.insert(id, (body, answer));
        Ok(answered)
    }

    /// Sends a request no answer is awaited for (a cancel, a give-back);
    /// dropped while the stream is broken, as a resume ends what it was
    /// about.
    pub(crate) fn send_once(&self, body: Request) {
        let answers = self.answers();
        if !answers.broken {
            lock(&self.outlet).send(0, body);
        }
    }

    /// Stops waiting for the answer to request `id`.
    pub(crate) fn forget(&self, id: u64) {
        self.answers().waiting.remove(&id);
    }

    /// Hands an event to the request waiting for it. A grant nobody waits
    /// for any more (its acquire was dropped) is released; pushed news of
    /// lost holds wakes the session's renewal.
    pub(crate) fn deliver(&self, event: proto::SessionEvent) {
        let Some(body) = event.body else {
            return;
        };
        let answer = {
            let mut answers = self.answers();
            if event.id == 0 && matches!(body, Event::Opened(_)) {
                if let Some(resume) = answers.resume.take() {
                    let _ = resume.send(body);
                    return;
                }
            }
            let answer = answers.waiting.remove(&event.id);
            // What a resume names, recorded as the answer is handed out
            // (under the lock a resume reads it under), not later.
            match (&answer, &body) {
                (Some((Request::Acquire(acquire), _)), Event::Granted(granted)) => {
                    answers.held.insert(acquire.key.clone(), granted.token);
                }
                (Some((Request::AcquireAll(_), _)), Event::GrantedAll(all)) => {
                    for granted in &all.granted {
                        answers.held.insert(granted.key.clone(), granted.token);
                    }
                }
                _ => {}
            }
            answer
        };
        let unclaimed = match answer {
            Some((_, answer)) => answer.send(body).err(),
            None => Some(body),
        };
        match unclaimed {
            Some(Event::Granted(granted)) => self.give_back(granted),
            Some(Event::GrantedAll(all)) => all.granted.into_iter().for_each(|g| self.give_back(g)),
            // Kept for the acquire or renewal that takes them; a renewal
            // now.
            Some(Event::Lost(lost)) => {
                lock(&self.ended_holds)
                    .extend(lost.ended.into_iter().map(|held| (held.key, held.token)));
                self.renewal_wanted.notify_one();
            }
            _ => {}
        }
    }

    /// Whether a broken stream is to be resumed: yes once the session is
    /// open and has its secret, no once it closes.
    pub(crate) fn set_resumable(&self, resumable: bool) {
        self.answers().resumable = resumable;
    }

    /// Where the answer to the Resume about to be sent goes.
    pub(crate) fn expect_resume(&self, answer: oneshot::Sender<Event>) {
        self.answers().resume = Some(answer);
    }

    /// The stream broke, but the session may live on at the server: the
    /// requests wait for a resumed stream (see [`resumed`](Inbox::resumed)).
    /// A session that cannot be resumed ends here.
    pub(crate) fn broken(&self) {
        let mut answers = self.answers();
        if !answers.resumable {
            drop(answers);
            self.end(None);
            return;
        }
        if answers.ended.is_none() && !answers.broken {
            answers.broken = true;
            drop(answers);
            tracing::info!(target = %self.target, "session stream broke; resuming");
            self.broke.notify_one();
        }
    }

    /// Whether the stream is broken and not yet resumed.
    pub(crate) fn is_broken(&self) -> bool {
        self.answers().broken
    }

    /// A resumed stream: requests go to `outlet`, and those still waiting
    /// are sent again, in the order they were made — but for the release
    /// of a key `released` names: the resume ended those holds already.
    pub(crate) fn resumed(&self, outlet: Outlet, released: Released<'_>) {
        let mut answers = self.answers();
        *lock(&self.outlet) = outlet;
        answers.broken = false;
        let mut ids: Vec<u64> = answers.waiting.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let (request, _) = &answers.waiting[&id];
            if released(request) {
                if let Some((_, answer)) = answers.waiting.remove(&id) {
                    let _ = answer.send(Event::Released(proto::Released {}));
                }
            } else {
                lock(&self.outlet).send(id, request.clone());
            }
        }
    }

    /// The stream has ended for good: every waiting request is told, with
    /// `why` (or "connection lost"), and every later one turned away.
    pub(crate) fn end(&self, why: Option<Why>) {
        let mut answers = self.answers();
        answers.ended.get_or_insert_with(|| {
            why.unwrap_or_else(|| {
                Why::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the connection to the distlock server at {} was lost",
                        self.target
                    ),
                )
            })
        });
        answers.broken = false;
        // Dropping the senders wakes the requests that wait.
        answers.waiting.clear();
        answers.resume = None;
        drop(answers);
        // A resumer waiting for a break learns the session is over.
        self.broke.notify_one();
    }

    /// The holds a resume names: every grant handed out and not given
    /// back.
    pub(crate) fn held(&self) -> Vec<(String, u64)> {
        let answers = self.answers();
        answers.held.iter().map(|(k, &t)| (k.clone(), t)).collect()
    }

    /// Forgets the grant of `key` with `token`: given back, released, or
    /// ended by the server.
    pub(crate) fn forget_grant(&self, key: &str, token: u64) {
        let mut answers = self.answers();
        if answers.held.get(key) == Some(&token) {
            answers.held.remove(key);
        }
    }

    /// Takes the news that the server ended the hold of `key` with
    /// `token`, if it sent any.
    pub(crate) fn take_ended(&self, key: &str, token: u64) -> bool {
        lock(&self.ended_holds).remove(&(key.to_owned(), token))
    }

    /// Whether the stream has ended for good.
    pub(crate) fn is_ended(&self) -> bool {
        self.answers().ended.is_some()
    }

    /// Why the stream ended (or that it did).
    pub(crate) fn ended(&self) -> Error {
        match &self.answers().ended {
            Some(why) => why.error(),
            None => connection_lost(&self.target),
        }
    }

    /// Releases a grant nobody wants — that grant only, by its token —
    /// answered by nobody (id 0 is never waited on after the Open).
    pub(crate) fn give_back(&self, granted: proto::Granted) {
        self.forget_grant(&granted.key, granted.token);
        let release = proto::Release {
            key: granted.key,
            token: granted.token,
        };
        self.send_once(Request::Release(release));
    }
}

pub(crate) fn connection_lost(target: &str) -> Error {
    Error::unavailable(format!(
        "the connection to the distlock server at {target} was lost"
    ))
}
