//! A session outlives its stream: the registry of each session's current
//! stream and resume secret, and the taking back of a session on a new
//! stream (see docs/0002-server.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use distlock_core::store::lock;
use distlock_core::table::lock_table;
use distlock_proto::v1 as proto;
use proto::session_event::Body as Event;
use tonic::Status;

use super::{Outbound, SessionStream, WaitHandles};
use crate::{same_secret, Shared};

/// What the server keeps of an open session beside the table: the stream
/// it is served on (for events no request asked for), that stream's waits,
/// and the secret with which its client takes it back on a new stream.
pub(crate) struct Registered {
    pub(super) secret: [u8; 16],
    /// Which stream of the session is current: a replaced stream's end
    /// leaves the entry alone.
    pub(super) generation: u64,
    /// The current stream; `None` while the session has none (holding a
    /// sender would keep a broken stream's channel open).
    pub(super) out: Option<Outbound>,
    pub(super) waits: WaitHandles,
    /// Set (under the table lock) when a resume replaces the current stream.
    pub(super) replaced: Arc<AtomicBool>,
}

impl Registered {
    /// Sends an event to the session's current stream, if it has one.
    pub(crate) fn event(&self, id: u64, body: Event) {
        if let Some(out) = &self.out {
            out.event(id, body);
        }
    }
}

impl SessionStream {
    /// Forgets registered sessions the table no longer has. Locks the
    /// registry before the table, as `resume` does.
    pub(super) fn sweep(shared: &Shared) {
        let mut sessions = lock(&shared.sessions);
        let table = lock_table(&shared.table);
        sessions.retain(|&id, _| table.has_session(id));
    }

    /// Takes back a session whose stream broke: the broken stream's waits
    /// end (they leave the queues in the same table step that settles the
    /// holds), and so does every hold the client does not name; the lease
    /// is renewed.
    pub(super) fn resume(
        shared: Arc<Shared>,
        id: u64,
        resume: proto::Resume,
        out: Outbound,
    ) -> Option<SessionStream> {
        let session = resume.session_id;
        let mut sessions = lock(&shared.sessions);
        let Some(entry) = sessions
            .get_mut(&session)
            .filter(|entry| same_secret(&entry.secret, &resume.secret))
        else {
            drop(sessions);
            out.end(Status::permission_denied(format!(
                "session {session} cannot be resumed: it has ended, or the secret is not its \
                 own; open a new session"
            )));
            return None;
        };
        for wait in lock(&entry.waits).values() {
            wait.abort();
        }
        let mut table = lock_table(&shared.table);
        // Under the table lock: the old stream's next table operation sees
        // it, so none can land after the holds are settled below.
        entry.replaced.store(true, Ordering::SeqCst);
        if !table.renew(session) {
            drop(table);
            sessions.remove(&session);
            drop(sessions);
            out.end(Status::not_found(format!(
                "session {session} has ended (its lease ran out) and cannot be resumed; \
                 open a new session"
            )));
            return None;
        }
        let held: Vec<(String, u64)> = resume
            .held
            .into_iter()
            .map(|held| (held.key, held.token))
            .collect();
        // The session's queued waits leave in this step too: an aborted wait
        // still being polled could otherwise take a later grant.
        let ended = table.keep_only(session, &held);
        drop(table);
        if !ended.is_empty() {
            tracing::info!(
                session,
                ?ended,
                "resumed session: ended holds its client did not know"
            );
        }
        let wait_handles = WaitHandles::default();
        let replaced = Arc::new(AtomicBool::new(false));
        entry.generation += 1;
        entry.out = Some(out.clone());
        entry.waits = Arc::clone(&wait_handles);
        entry.replaced = Arc::clone(&replaced);
        let (generation, secret) = (entry.generation, entry.secret);
        // Sent before the registry is let go: a pushed event for the new
        // stream comes after its Opened.
        out.event(
            id,
            Event::Opened(proto::Opened {
                session_id: session,
                resume_secret: secret.to_vec(),
            }),
        );
        drop(sessions);
        Some(SessionStream {
            shared,
            session,
            generation,
            out,
            wait_handles,
            replaced,
        })
    }
}
