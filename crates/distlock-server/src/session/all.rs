//! `AcquireAll`: several keys in one request, granted together or not at
//! all, queued fairly by the lock table (see `distlock_core::table`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use distlock_core::table::{lock_table, AttemptAll, GroupTicket, WaitedAll};
use distlock_proto::convert::mode_of;
use distlock_proto::v1 as proto;
use futures::future::{AbortHandle, Abortable};
use futures::FutureExt;
use proto::session_event::Body as Event;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

use super::{failed, session_lost, SessionStream, Waits};
use distlock_core::store::lock;

/// The most keys one `AcquireAll` may name.
pub(crate) const MAX_KEYS: usize = 1024;

impl SessionStream {
    pub(super) fn acquire_all(
        &mut self,
        id: u64,
        request: proto::AcquireAll,
        waits: &Waits,
    ) -> Option<Event> {
        if lock(&self.wait_handles).contains_key(&id) {
            return Some(failed(
                proto::Code::InvalidArgument,
                format!("request id {id} is already waiting; give each request its own id"),
            ));
        }
        let keys = match self.checked_keys(request.keys) {
            Ok(keys) => keys,
            Err(event) => return Some(event),
        };
        let wait = Duration::from_millis(request.wait_ms);
        let arrived = Instant::now();
        let attempt = {
            let mut table = lock_table(&self.shared.table);
            if self.replaced.load(Ordering::SeqCst) {
                return Some(failed(
                    proto::Code::Unavailable,
                    "this session was resumed on another stream",
                ));
            }
            table.acquire_all(self.session, &keys, !wait.is_zero())
        };
        if !matches!(attempt, AttemptAll::Queued(..)) {
            let seconds = arrived.elapsed().as_secs_f64();
            self.shared.metrics.acquire_seconds.observe(seconds);
        }
        let granted = |keys: &[(String, _)], tokens: Vec<u64>| {
            Event::GrantedAll(proto::GrantedAll {
                granted: keys
                    .iter()
                    .zip(tokens)
                    .map(|((key, _), token)| proto::Granted {
                        key: key.clone(),
                        token,
                    })
                    .collect(),
            })
        };
        match attempt {
            AttemptAll::Granted(tokens) => Some(granted(&keys, tokens)),
            AttemptAll::Busy => Some(Event::NotGranted(proto::NotGranted {})),
            AttemptAll::SessionGone => Some(session_lost()),
            AttemptAll::AlreadyHeld => Some(failed(
                proto::Code::AlreadyHeld,
                "this session already holds or waits for one of these keys; a session takes a \
                 key once",
            )),
            AttemptAll::QueueFull => Some(failed(
                proto::Code::ResourceExhausted,
                format!(
                    "one of these keys already has {} waiters, this server's limit; try again later",
                    self.shared.config.max_waiters_per_key
                ),
            )),
            AttemptAll::NoTokens => Some(failed(
                proto::Code::Unavailable,
                "the server cannot save its token epoch, so it grants nothing; see its log",
            )),
            AttemptAll::Queued(waiter, grant) => {
                // Made before the task, as for one key: dropped unpolled,
                // it still gives the keys back.
                let table = Arc::clone(&self.shared.table);
                let ticket = GroupTicket::new(table, self.session, keys.clone(), waiter, grant);
                let (shared, out) = (Arc::clone(&self.shared), self.out.clone());
                let until = arrived
                    .checked_add(wait)
                    .unwrap_or_else(|| arrived + Duration::from_secs(100 * 365 * 24 * 3600));
                let stream = self.out.stream();
                let wait = async move {
                    let waited = ticket.wait(until).await;
                    let seconds = arrived.elapsed().as_secs_f64();
                    shared.metrics.acquire_seconds.observe(seconds);
                    if matches!(waited, WaitedAll::Granted(_)) {
                        shared.metrics.wait_seconds.observe(seconds);
                    }
                    // No await between the grant and its send.
                    let event = match waited {
                        WaitedAll::Granted(tokens) => granted(&keys, tokens),
                        WaitedAll::TimedOut => Event::NotGranted(proto::NotGranted {}),
                        WaitedAll::SessionGone => session_lost(),
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

    /// The keys and modes of an `AcquireAll`, or the `Failed` that says
    /// what is wrong with them.
    fn checked_keys(
        &self,
        keys: Vec<proto::AcquireKey>,
    ) -> Result<Vec<(String, distlock_core::Mode)>, Event> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(failed(
                proto::Code::InvalidArgument,
                format!(
                    "AcquireAll names {} keys; name 1 to {MAX_KEYS} distinct keys",
                    keys.len()
                ),
            ));
        }
        let max_key = self.shared.config.max_key_bytes;
        let mut seen = HashSet::with_capacity(keys.len());
        let mut checked = Vec::with_capacity(keys.len());
        for key in keys {
            if key.key.is_empty() || key.key.len() > max_key {
                return Err(failed(
                    proto::Code::InvalidKey,
                    format!(
                        "lock key is {} bytes long; a key is any UTF-8 string of 1 to {max_key} bytes",
                        key.key.len()
                    ),
                ));
            }
            if !seen.insert(key.key.clone()) {
                return Err(failed(
                    proto::Code::InvalidArgument,
                    format!("AcquireAll names '{}' twice; name each key once", key.key),
                ));
            }
            let mode = mode_of(key.mode, key.permits)
                .map_err(|why| failed(proto::Code::InvalidArgument, why))?;
            checked.push((key.key, mode));
        }
        Ok(checked)
    }
}
