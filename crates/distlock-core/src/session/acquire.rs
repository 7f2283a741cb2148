//! Acquiring and releasing at the store: one gate per key serializes a
//! session's acquires and releases of that key and counts its reentrant
//! holds, so the store sees at most one request per key and session.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::{
    far_future, lease_deadline, renewal, Gate, Guard, HeldEntry, Hold, SessionInner, Wait,
};
use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_key;
use crate::store::{lock, AcquireRequest, Grant, HeldLock, Mode};

/// A use of a key's gate. Dropping it removes the gate from the session's
/// map if nobody else uses it, however the use ended (cancellation too), so
/// declare it before any guard of the gate's mutex.
struct GateRef<'a> {
    session: &'a SessionInner,
    key: &'a str,
    gate: Gate,
}

impl Drop for GateRef<'_> {
    fn drop(&mut self) {
        self.session.tidy_gate(self.key, &self.gate);
    }
}

impl SessionInner {
    /// Removes `key`'s gate from the map if only the map and the caller
    /// still use it and it holds nothing.
    pub(super) fn tidy_gate(&self, key: &str, gate: &Gate) {
        let mut gates = lock(&self.gates);
        let idle = Arc::strong_count(gate) == 2
            && gate.try_lock().map(|slot| slot.is_none()).unwrap_or(false);
        if idle {
            gates.remove(key);
        }
    }

    fn gate<'a>(&'a self, key: &'a str) -> GateRef<'a> {
        let mut gates = lock(&self.gates);
        // Looked up before inserting: a key held or used again needs no
        // copy of its name.
        let gate = match gates.get(key) {
            Some(gate) => Arc::clone(gate),
            None => Arc::clone(gates.entry(key.to_owned()).or_default()),
        };
        drop(gates);
        GateRef {
            session: self,
            key,
            gate,
        }
    }

    fn forget_held(&self, entry: &Arc<HeldEntry>) {
        let mut held = lock(&self.held);
        if held
            .get(&entry.lock.key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            held.remove(&entry.lock.key);
        }
    }

    pub(crate) async fn acquire(
        self: &Arc<Self>,
        key: String,
        mode: Mode,
        wait: Wait,
    ) -> Result<Option<Guard>> {
        validate_key(&key)?;
        self.check_mode(mode)?;
        if self.ended.is_cancelled() {
            return Err(self.ended_error());
        }
        let gate = self.gate(&key);
        // The gate is nearly always free: take it without arming a timer.
        let slot = match Arc::clone(&gate.gate).try_lock_owned() {
            Ok(slot) => Some(slot),
            // Another task of this session is acquiring or releasing the key
            // right now; for a non-blocking attempt that counts as busy.
            Err(_) => {
                let gate_mutex = Arc::clone(&gate.gate);
                match wait {
                    Wait::TryOnce => None,
                    Wait::Until(deadline) => {
                        tokio::time::timeout_at(deadline, gate_mutex.lock_owned())
                            .await
                            .ok()
                    }
                    Wait::Forever => Some(gate_mutex.lock_owned().await),
                }
            }
        };
        let result = match slot {
            Some(slot) => self.acquire_in_gate(slot, &key, mode, wait).await,
            None => Ok(None),
        };
        drop(gate);
        match (result, wait) {
            (Ok(None), Wait::Until(_)) => Err(Error::new(
                ErrorKind::Timeout,
                format!("timed out waiting for '{key}': another session still holds it"),
            )),
            (result, _) => result,
        }
    }

    async fn acquire_in_gate(
        self: &Arc<Self>,
        mut slot: OwnedMutexGuard<Option<Hold>>,
        key: &str,
        mode: Mode,
        wait: Wait,
    ) -> Result<Option<Guard>> {
        if let Some(hold) = slot.as_mut() {
            if self.is_held(&hold.entry) {
                if !hold.entry.lock.mode.covers(mode) {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "this session holds '{key}' as {} and asked for it as {mode}; \
                             release it first (upgrading in place would wait forever)",
                            hold.entry.lock.mode
                        ),
                    ));
                }
                hold.count += 1;
                return Ok(Some(Guard::new(Arc::clone(self), Arc::clone(&hold.entry))));
            }
            // The old hold was lost: give it back to the store (which may
            // not know yet) and start afresh. Its guards will say NotHeld.
            let stale = slot.take().expect("checked above").entry;
            stale.lost.cancel();
            self.forget_held(&stale);
            if let Err(err) = self.store.release(&stale.lock).await {
                tracing::debug!(key, "release of a lost hold: {err}");
            }
        }
        let Some(grant) = self.acquire_at_store(key, mode, wait).await? else {
            return Ok(None);
        };
        let arrived = Instant::now();
        let entry = self.entry_of(key, mode, grant, arrived);
        if let Err(err) = self.check_arrival(&entry, arrived) {
            let _ = self.store.release(&entry.lock).await;
            return Err(err);
        }
        Ok(Some(self.admit(&mut slot, entry)))
    }

    /// What a grant that arrived at `arrived` holds.
    fn entry_of(&self, key: &str, mode: Mode, grant: Grant, arrived: Instant) -> Arc<HeldEntry> {
        Arc::new(HeldEntry {
            lock: HeldLock {
                key: key.to_owned(),
                mode,
                token: grant.token,
            },
            lost: self.ended.child_token(),
            max_hold_until: self.config.max_hold.map(|max| arrived + max),
            // Not from when this acquire began: a wait may have been long.
            renewed_until: Mutex::new(grant.lease_from.and_then(|sent| self.lease_from(sent))),
        })
    }

    /// Whether a grant may be handed out: not if the session ended while
    /// it was on its way, nor if it came after the lease it started (a
    /// connection that stalled: the store may have granted the key on
    /// already). The caller gives a refused grant back.
    fn check_arrival(&self, entry: &HeldEntry, arrived: Instant) -> Result<()> {
        if self.ended.is_cancelled() {
            return Err(self.ended_error());
        }
        if self
            .deadline_of(entry)
            .is_some_and(|deadline| deadline <= arrived)
        {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the grant of '{}' arrived after its lease had run out (the store \
                     answered late); ask again",
                    entry.lock.key
                ),
            ));
        }
        Ok(())
    }

    /// Records a checked grant as held, in its gate's slot, and hands out
    /// its first guard.
    fn admit(self: &Arc<Self>, slot: &mut Option<Hold>, entry: Arc<HeldEntry>) -> Guard {
        lock(&self.held).insert(entry.lock.key.clone(), Arc::clone(&entry));
        *slot = Some(Hold {
            entry: Arc::clone(&entry),
            count: 1,
        });
        if let Some(until) = entry.max_hold_until {
            tokio::spawn(renewal::expire_at_max_hold(
                Arc::downgrade(self),
                Arc::clone(&entry),
                until,
            ));
        }
        Guard::new(Arc::clone(self), entry)
    }

    /// `lock_all` on a store that takes every key in one request
    /// ([`atomic_lock_all`](crate::Capabilities::atomic_lock_all)): every
    /// key's gate, in `order`, then one request. `None` when the per-key
    /// path must do it: this session holds, takes or releases one of the
    /// keys (reentrancy is the core's), or the store does not do it.
    pub(super) async fn acquire_all_at_once(
        self: &Arc<Self>,
        order: &[(usize, String, Mode)],
        wait: Wait,
    ) -> Option<Result<Option<Vec<(usize, Guard)>>>> {
        for (_, _, mode) in order {
            if let Err(err) = self.check_mode(*mode) {
                return Some(Err(err));
            }
        }
        if self.ended.is_cancelled() {
            return Some(Err(self.ended_error()));
        }
        // Declared before the slots, so dropped after them: an idle gate
        // then leaves the map.
        let gates: Vec<GateRef<'_>> = order.iter().map(|(_, key, _)| self.gate(key)).collect();
        let mut slots = Vec::with_capacity(gates.len());
        for gate in &gates {
            match Arc::clone(&gate.gate).try_lock_owned() {
                Ok(slot) if slot.is_none() => slots.push(slot),
                _ => return None,
            }
        }
        let deadline = match wait {
            Wait::TryOnce => None,
            Wait::Until(deadline) => Some(deadline),
            Wait::Forever => Some(far_future()),
        };
        let requests: Vec<AcquireRequest> = order
            .iter()
            .map(|(_, key, mode)| {
                let mut request = AcquireRequest::new(key.clone(), *mode);
                if self.caps.push_wakeup {
                    request.wait_until = deadline;
                }
                request
            })
            .collect();
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        let grants = loop {
            let granted = tokio::select! {
                granted = self.store.acquire_all(&requests) => granted,
                () = self.ended.cancelled() => return Some(Err(self.ended_error())),
            };
            let granted = match granted {
                Ok(granted) => granted,
                Err(err) if err.kind() == ErrorKind::Unsupported => return None,
                Err(err) => return Some(Err(err)),
            };
            let now = Instant::now();
            match (granted, deadline) {
                (Some(grants), _) => break grants,
                (None, Some(deadline)) if now < deadline => {
                    let pause = backoff.next_delay().min(deadline - now);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.ended.cancelled() => return Some(Err(self.ended_error())),
                    }
                }
                (None, _) if matches!(wait, Wait::Until(_)) => {
                    return Some(Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "timed out waiting for the {} keys asked for: another session still \
                             holds one; none of them is held",
                            order.len()
                        ),
                    )))
                }
                (None, _) => return Some(Ok(None)),
            }
        };
        let arrived = Instant::now();
        let entries: Vec<Arc<HeldEntry>> = order
            .iter()
            .zip(grants)
            .map(|((_, key, mode), grant)| self.entry_of(key, *mode, grant, arrived))
            .collect();
        if let Some(err) = entries
            .iter()
            .find_map(|entry| self.check_arrival(entry, arrived).err())
        {
            // In a task: this future may be dropped before all are back.
            let store = Arc::clone(&self.store);
            tokio::spawn(async move {
                for entry in entries {
                    let _ = store.release(&entry.lock).await;
                }
            });
            return Some(Err(err));
        }
        let taken = order
            .iter()
            .zip(entries)
            .zip(slots.iter_mut())
            .map(|(((place, _, _), entry), slot)| (*place, self.admit(slot, entry)))
            .collect();
        Some(Ok(Some(taken)))
    }

    fn check_mode(&self, mode: Mode) -> Result<()> {
        let unsupported = |what: &str| {
            Error::new(
                ErrorKind::Unsupported,
                format!("the {} store does not support {what}", self.caps.name),
            )
        };
        match mode {
            Mode::Exclusive => Ok(()),
            Mode::Shared if !self.caps.shared => Err(unsupported("shared (read) locks")),
            Mode::Shared => Ok(()),
            Mode::Semaphore { .. } if !self.caps.semaphore => Err(unsupported("semaphores")),
            Mode::Semaphore { permits: 0 } => Err(Error::config(
                "a semaphore needs at least 1 permit; semaphore(key, 0) would never admit anyone",
            )),
            Mode::Semaphore { .. } => Ok(()),
        }
    }

    /// Asks the store, waiting by push where it can and by jittered backoff
    /// where it cannot. Ends early if the session ends.
    async fn acquire_at_store(&self, key: &str, mode: Mode, wait: Wait) -> Result<Option<Grant>> {
        let deadline = match wait {
            Wait::TryOnce => None,
            Wait::Until(deadline) => Some(deadline),
            Wait::Forever => Some(far_future()),
        };
        let mut request = AcquireRequest::new(key, mode);
        // A push store waits itself and answers `None` at the deadline — or
        // earlier if it gave up early (a server caps waits; a stale grant is
        // on its way back): then it is asked again. A polling store answers
        // at once and is asked again after a backoff.
        if self.caps.push_wakeup {
            request.wait_until = deadline;
        }
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        loop {
            let granted = tokio::select! {
                granted = self.store.acquire(&request) => granted?,
                () = self.ended.cancelled() => return Err(self.ended_error()),
            };
            let now = Instant::now();
            match (granted, deadline) {
                (Some(grant), _) => return Ok(Some(grant)),
                (None, Some(deadline)) if now < deadline => {
                    let pause = backoff.next_delay().min(deadline - now);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.ended.cancelled() => return Err(self.ended_error()),
                    }
                }
                (None, _) => return Ok(None),
            }
        }
    }

    /// The lease deadline of something sent to the store at `sent`, if
    /// this store's sessions have leases.
    pub(crate) fn lease_from(&self, sent: Instant) -> Option<Instant> {
        lease_deadline(&self.caps, self.config.ttl, sent)
    }

    /// Gives up one reentrant hold; the last one releases at the store. If
    /// the store's answer is unknown (it failed), the hold is over all the
    /// same — it is never handed out again, as the store may have released
    /// it — and a task keeps asking the store to release it, holding the
    /// key's gate so that this session cannot take the key meanwhile.
    pub(crate) async fn release_hold(self: &Arc<Self>, entry: &Arc<HeldEntry>) -> Result<()> {
        let key = &entry.lock.key;
        let gate = self.gate(key);
        let mut slot = Arc::clone(&gate.gate).lock_owned().await;
        let Some(hold) = slot.as_mut().filter(|hold| Arc::ptr_eq(&hold.entry, entry)) else {
            return Err(Error::not_held(key));
        };
        if self.ended.is_cancelled() {
            // Closing or losing the session took every lock with it.
            *slot = None;
            self.forget_held(entry);
            return Err(Error::new(
                ErrorKind::NotHeld,
                format!(
                    "the lock on '{key}' ended with its session ({})",
                    self.ended_error()
                ),
            ));
        }
        let was_held = self.is_held(entry);
        hold.count = hold.count.saturating_sub(1);
        if hold.count == 0 {
            // Out of the renewal set first: a renewal overtaking the release
            // would otherwise report the key lost.
            self.forget_held(entry);
            // Cancel safe: until the store answers, the hold stays (with a
            // count of 0), and the guard's Drop asks again.
            let released = self.store.release(&entry.lock).await;
            *slot = None;
            entry.lost.cancel();
            match released {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotHeld => return Err(err),
                Err(err) => {
                    tokio::spawn(renewal::retry_release(
                        Arc::downgrade(self),
                        entry.lock.clone(),
                        slot,
                    ));
                    return Err(err);
                }
            }
        }
        if was_held {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotHeld,
                format!("the lock on '{key}' was lost before it was released"),
            ))
        }
    }

    /// Marks `entry` lost and gives it back to the store: used when the
    /// store reports a lock gone and when `max_hold` runs out.
    pub(crate) async fn drop_lost(&self, entry: &Arc<HeldEntry>) {
        entry.lost.cancel();
        self.forget_held(entry);
        let gate = self.gate(&entry.lock.key);
        let mut slot = gate.gate.lock().await;
        if slot
            .as_ref()
            .is_some_and(|hold| Arc::ptr_eq(&hold.entry, entry))
        {
            *slot = None;
            if let Err(err) = self.store.release(&entry.lock).await {
                tracing::debug!(key = %entry.lock.key, "release after loss: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{Client, MemoryStore};

    #[tokio::test]
    async fn cancelled_acquires_leave_no_gates_behind() {
        let client = Client::new(Arc::new(MemoryStore::new()));
        let (owner, waiter) = (
            client.session().open().await.expect("open"),
            client.session().open().await.expect("open"),
        );
        let mut held = Vec::new();
        for i in 0..10 {
            held.push(owner.lock(format!("k{i}")).await.expect("hold"));
            let attempt = waiter.lock(format!("k{i}")).wait(Duration::from_secs(60));
            let gave_up = tokio::time::timeout(Duration::from_millis(10), attempt).await;
            assert!(gave_up.is_err(), "key {i} should have been busy");
        }
        assert!(
            lock(&waiter.inner.gates).is_empty(),
            "gates of cancelled acquires remain"
        );
        for guard in held {
            guard.release().await.expect("release");
        }
        assert!(
            lock(&owner.inner.gates).is_empty(),
            "gates of released keys remain"
        );
    }

    #[tokio::test]
    async fn busy_and_timed_out_acquires_leave_no_gates_behind() {
        let client = Client::new(Arc::new(MemoryStore::new()));
        let owner = client.session().open().await.expect("open");
        let other = client.session().open().await.expect("open");
        let _held = owner.lock("k").await.expect("hold");
        assert!(other.lock("k").try_lock().await.expect("try").is_none());
        let timed_out = other.lock("k").wait(Duration::from_millis(10)).await;
        assert_eq!(timed_out.expect_err("busy").kind(), ErrorKind::Timeout);
        assert!(
            lock(&other.inner.gates).is_empty(),
            "gates of failed acquires remain"
        );
    }
}
