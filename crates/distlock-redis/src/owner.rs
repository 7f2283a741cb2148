//! Who a session is, written once per session rather than with each hold:
//! `dl:o:SESSION` holds the session's owner description, and a hold's
//! member (`SESSION|NONCE|DELAY`) names the session, so `status` finds the
//! owner of every holder and waiter by its session id.
//!
//! The key is written by a plain `SET … PX`, pipelined with a call the
//! session makes anyway (an acquire, an ask of the queue, a renewal) and
//! never inside a script: it lives in a hash slot of its own. It is written
//! again by the first call sent half a lease or more after the last write,
//! and each write keeps it for two leases, so it outlives every hold and
//! place that call could extend by half a lease at least; a session that
//! vanishes leaves it to expire, one that closes deletes it.

use std::sync::Mutex;
use std::time::Duration;

use distlock_core::store::lock;
use redis::Cmd;
use tokio::time::Instant;

use crate::instance::millis;

/// The key that holds the owner of session `id`.
pub(crate) fn owner_key(id: &str) -> String {
    format!("{}o:{id}", crate::KEY_PREFIX)
}

/// A session's owner description, and when it was last written.
pub(crate) struct Owner {
    key: String,
    description: String,
    /// The session's lease.
    ttl: Duration,
    written: Mutex<Writes>,
}

#[derive(Default)]
struct Writes {
    /// When the last write was sent; `None` before the first, or after one
    /// that may have failed.
    last: Option<Instant>,
    /// Whether any was sent.
    ever: bool,
}

impl Owner {
    pub(crate) fn new(session_id: &str, description: &str, ttl: Duration) -> Self {
        Owner {
            key: owner_key(session_id),
            description: description.to_owned(),
            ttl,
            written: Mutex::new(Writes::default()),
        }
    }

    /// The write to send with a call sent now, if one is due: none was
    /// sent in the last half lease. It counts as sent unless the call fails
    /// or is dropped first (see [`OwnerWrite::finish`]).
    pub(crate) fn due(&self) -> Option<OwnerWrite<'_>> {
        let now = Instant::now();
        {
            let mut written = lock(&self.written);
            let recent = written
                .last
                .is_some_and(|at| now.saturating_duration_since(at) < self.ttl / 2);
            if recent {
                return None;
            }
            *written = Writes {
                last: Some(now),
                ever: true,
            };
        }
        let mut set = redis::cmd("SET");
        set.arg(&self.key)
            .arg(&self.description)
            .arg("PX")
            .arg(millis(self.ttl * 2).max(1));
        Some(OwnerWrite {
            owner: self,
            set,
            finished: false,
        })
    }

    /// The delete to send when the session closes, if it ever wrote.
    pub(crate) fn delete(&self) -> Option<Cmd> {
        let ever = std::mem::take(&mut *lock(&self.written)).ever;
        if !ever {
            return None;
        }
        let mut del = redis::cmd("DEL");
        del.arg(&self.key);
        Some(del)
    }
}

/// A due write of the owner, riding with one call.
pub(crate) struct OwnerWrite<'a> {
    owner: &'a Owner,
    set: Cmd,
    finished: bool,
}

impl OwnerWrite<'_> {
    /// The command to pipeline with the call.
    pub(crate) fn command(&self) -> &Cmd {
        &self.set
    }

    /// The call ended; `failed` if it failed on some instance, which then
    /// has no owner written: the next call writes it again.
    pub(crate) fn finish(mut self, failed: bool) {
        self.finished = !failed;
    }
}

impl Drop for OwnerWrite<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Failed, or dropped before it could be sent.
            lock(&self.owner.written).last = None;
        }
    }
}
