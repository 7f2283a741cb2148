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

/// Requests waiting for their answer, until the stream ends.
struct Answers {
    waiting: HashMap<u64, oneshot::Sender<Event>>,
    /// Why the stream ended, once it has: no request then waits for an
    /// answer that cannot come.
    ended: Option<Why>,
}

/// A session's side of its stream: where its requests go and who waits for
/// which answer. The stream's reader delivers the server's events here.
pub(crate) struct Inbox {
    pub(crate) target: Arc<str>,
    pub(crate) outlet: Outlet,
    answers: Mutex<Answers>,
    /// Told when the server pushes news of holds it ended.
    pub(crate) renewal_wanted: tokio::sync::Notify,
}

impl Inbox {
    pub(crate) fn new(target: Arc<str>, outlet: Outlet) -> Self {
        Inbox {
            target,
            outlet,
            answers: Mutex::new(Answers {
                waiting: HashMap::new(),
                ended: None,
            }),
            renewal_wanted: tokio::sync::Notify::new(),
        }
    }

    fn answers(&self) -> MutexGuard<'_, Answers> {
        lock(&self.answers)
    }

    /// Sends request `id` and returns where its answer will come.
    pub(crate) fn send(&self, id: u64, body: Request) -> Result<oneshot::Receiver<Event>> {
        let (answer, answered) = oneshot::channel();
        {
            let mut answers = self.answers();
            if answers.ended.is_some() {
                drop(answers);
                return Err(self.ended());
            }
            answers.waiting.insert(id, answer);
        }
        if !self.outlet.send(id, body) {
            self.answers().waiting.remove(&id);
            return Err(self.ended());
        }
        Ok(answered)
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
        let answer = self.answers().waiting.remove(&event.id);
        let unclaimed = match answer {
            Some(answer) => answer.send(body).err(),
            None => Some(body),
        };
        match unclaimed {
            Some(Event::Granted(granted)) => self.give_back(granted),
            // A renewal now learns which holds ended.
            Some(Event::Lost(_)) => self.renewal_wanted.notify_one(),
            _ => {}
        }
    }

    /// The stream has ended: every waiting request is told, with `why` (or
    /// "connection lost"), and every later one turned away.
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
        // Dropping the senders wakes the requests that wait.
        answers.waiting.clear();
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
        let release = proto::Release {
            key: granted.key,
            token: granted.token,
        };
        self.outlet.send(0, Request::Release(release));
    }
}

pub(crate) fn connection_lost(target: &str) -> Error {
    Error::unavailable(format!(
        "the connection to the distlock server at {target} was lost"
    ))
}
