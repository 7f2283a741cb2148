//! The behaviours of the conformance suite, one `pub async fn` each.
//!
//! Assertions are about order and exclusion, never about how fast a store
//! is; where time matters, only lower bounds (a lock must not come back
//! early) and generous upper bounds (it must come back at all) are checked.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio::time::{sleep, timeout, Instant};

use super::{Kit, Outcome};
use crate::{ErrorKind, Mode};

/// Long enough that a lock that should come never fails to on a slow host.
const PATIENCE: Duration = Duration::from_secs(20);
/// Long enough for a spawned waiter to be queued at the store.
const SETTLE: Duration = Duration::from_millis(200);

macro_rules! require {
    ($cond:expr, $why:expr) => {
        if !$cond {
            return Outcome::Skipped($why);
        }
    };
}

/// N tasks × M acquisitions on one key, each with its own session: a shared
/// counter read, a yield, and a write inside; no update is lost, no two
/// holders overlap, and tokens only go up.
pub async fn exclusion_under_contention(kit: Kit) -> Outcome {
    const TASKS: u64 = 8;
    const ROUNDS: u64 = 25;
    let key = kit.key("counter");
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicBool::new(false));
    let last_token = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let session = kit.session().await;
        let (key, counter, inside, last_token) = (
            key.clone(),
            Arc::clone(&counter),
            Arc::clone(&inside),
            Arc::clone(&last_token),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = session.lock(&key).wait(PATIENCE).await.expect("acquire");
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                let token = guard.token();
                let previous = last_token.swap(token, Ordering::SeqCst);
                assert!(token > previous, "token {token} after {previous}");
                let seen = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                counter.store(seen + 1, Ordering::SeqCst);
                inside.store(false, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
            session.close().await.expect("close");
        }));
    }
    for task in tasks {
        task.await.expect("contending task");
    }
    assert_eq!(
        counter.load(Ordering::SeqCst),
        TASKS * ROUNDS,
        "lost updates"
    );
    Outcome::Passed
}

/// The same session taking a key it holds gets the same token; the lock goes
/// only when the last hold is released.
pub async fn reentrant_holds_share_a_token(kit: Kit) -> Outcome {
    let key = kit.key("reentrant");
    let (owner, other) = (kit.session().await, kit.session().await);
    let first = owner.lock(&key).wait(PATIENCE).await.expect("first hold");
    let second = owner
        .lock(&key)
        .try_lock()
        .await
        .expect("try")
        .expect("reentrant hold");
    let token = first.token();
    assert_eq!(token, second.token());
    first.release().await.expect("release first hold");
    assert!(second.is_held());
    assert!(
        other.lock(&key).try_lock().await.expect("try").is_none(),
        "freed with a hold left"
    );
    second.release().await.expect("release last hold");
    let taken = other
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("free after last hold");
    assert!(taken.token() > token, "token went up");
    Outcome::Passed
}

/// Holding `read` and asking `write` in the same session is refused, not
/// left to wait on itself forever.
pub async fn reentrant_upgrade_is_refused(kit: Kit) -> Outcome {
    require!(kit.caps().shared, "store has no shared locks");
    let key = kit.key("upgrade");
    let session = kit.session().await;
    let read = session.read(&key).wait(PATIENCE).await.expect("read");
    let err = session
        .write(&key)
        .wait(PATIENCE)
        .await
        .expect_err("upgrade must fail");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let downgrade = session.write(kit.key("downgrade")).await.expect("write");
    let nested = session
        .read(downgrade.key())
        .try_lock()
        .await
        .expect("try")
        .expect("write covers read");
    assert_eq!(nested.token(), downgrade.token());
    drop((read, nested, downgrade));
    Outcome::Passed
}

/// `try_lock` answers `None` at once on a held key: contention is not an error.
pub async fn try_lock_on_held_key_is_none(kit: Kit) -> Outcome {
    let key = kit.key("busy");
    let (owner, other) = (kit.session().await, kit.session().await);
    let _held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    assert!(other.lock(&key).try_lock().await.expect("try").is_none());
    Outcome::Passed
}

/// A bounded wait on a held key ends with `Timeout`, not before its time.
pub async fn wait_times_out(kit: Kit) -> Outcome {
    let key = kit.key("held");
    let (owner, other) = (kit.session().await, kit.session().await);
    let _held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    let wait = Duration::from_millis(400);
    let started = Instant::now();
    let err = other
        .lock(&key)
        .wait(wait)
        .await
        .expect_err("must time out");
    let waited = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(&key),
        "message names the key: {err}"
    );
    assert!(waited >= wait, "gave up early, after {waited:?}");
    assert!(waited < wait + PATIENCE, "kept waiting for {waited:?}");
    Outcome::Passed
}

/// A session cannot release a lock it does not hold, and trying leaves the
/// holder's lock in place.
pub async fn foreign_release_is_refused(kit: Kit) -> Outcome {
    let key = kit.key("foreign");
    let (owner, intruder, third) = (
        kit.session().await,
        kit.session().await,
        kit.session().await,
    );
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    let err = intruder
        .release_unheld_for_test(&key, Mode::Exclusive)
        .await
        .expect_err("foreign release must fail");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    assert!(
        third.lock(&key).try_lock().await.expect("try").is_none(),
        "foreign release freed it"
    );
    held.release().await.expect("owner releases");
    Outcome::Passed
}

/// Releasing a lock lost to lease expiry is `NotHeld` and does not free the
/// lock of the session that holds it now.
pub async fn release_after_loss_is_not_held(kit: Kit) -> Outcome {
    require!(
        kit.caps().lease_expiry,
        "store sessions have no lease to expire"
    );
    let key = kit.key("lost");
    let frozen = kit
        .session_with(Duration::from_millis(600), Duration::ZERO)
        .await;
    let (next, third) = (kit.session().await, kit.session().await);
    let old = frozen.lock(&key).wait(PATIENCE).await.expect("hold");
    frozen.freeze_for_test();
    let new = next
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("taken over after expiry");
    assert!(new.token() > old.token());
    let err = old.release().await.expect_err("release of a lost lock");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    assert!(new.is_held());
    assert!(
        third.lock(&key).try_lock().await.expect("try").is_none(),
        "stale release freed it"
    );
    Outcome::Passed
}

/// When a holder stops renewing, its lease runs out and a waiter gets the key.
pub async fn lease_expiry_frees_after_holder_vanishes(kit: Kit) -> Outcome {
    require!(
        kit.caps().lease_expiry,
        "store sessions have no lease to expire"
    );
    let key = kit.key("vanish");
    let vanished = kit
        .session_with(Duration::from_millis(600), Duration::ZERO)
        .await;
    let waiter = kit.session().await;
    let held = vanished.lock(&key).wait(PATIENCE).await.expect("hold");
    vanished.freeze_for_test();
    let taken = waiter
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("freed by expiry");
    assert!(taken.token() > held.token());
    Outcome::Passed
}

/// The old holder's guard reports lost before the store grants the key on.
pub async fn lost_fires_before_regrant(kit: Kit) -> Outcome {
    require!(
        kit.caps().lease_expiry,
        "store sessions have no lease to expire"
    );
    let key = kit.key("regrant");
    let frozen = kit
        .session_with(Duration::from_millis(900), Duration::ZERO)
        .await;
    let next = kit.session().await;
    let old = frozen.lock(&key).wait(PATIENCE).await.expect("hold");
    frozen.freeze_for_test();
    let _new = next.lock(&key).wait(PATIENCE).await.expect("regranted");
    assert!(
        !old.is_held(),
        "old guard still claims the lock after the regrant"
    );
    assert!(
        old.lost().now_or_never().is_some(),
        "lost() had not fired at the regrant"
    );
    Outcome::Passed
}

/// After a session expires holding a key, the key stays blocked for the
/// session's lock-delay.
pub async fn lock_delay_blocks_after_expiry(kit: Kit) -> Outcome {
    require!(kit.caps().lock_delay, "store has no lock-delay");
    let key = kit.key("delay");
    let delay = Duration::from_millis(800);
    let frozen = kit.session_with(Duration::from_millis(600), delay).await;
    let next = kit.session().await;
    let old = frozen.lock(&key).wait(PATIENCE).await.expect("hold");
    frozen.freeze_for_test();
    let old_deadline = old
        .expires_at()
        .expect("lease store guards have a deadline");
    let _new = next
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("granted after the delay");
    let granted = Instant::now();
    assert!(
        granted >= old_deadline + delay,
        "granted {:?} before lease end + lock-delay",
        (old_deadline + delay) - granted
    );
    Outcome::Passed
}

/// Renewal keeps a lock well past its TTL.
pub async fn renewal_keeps_lock_past_ttl(kit: Kit) -> Outcome {
    require!(
        kit.caps().lease_expiry,
        "store sessions have no lease to expire"
    );
    let key = kit.key("renewed");
    let ttl = Duration::from_secs(1);
    let owner = kit.session_with(ttl, Duration::ZERO).await;
    let other = kit.session().await;
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    sleep(ttl * 3).await;
    assert!(held.is_held(), "lost despite renewal");
    assert!(
        other.lock(&key).try_lock().await.expect("try").is_none(),
        "freed despite renewal"
    );
    held.release().await.expect("release while held");
    Outcome::Passed
}

/// Tokens strictly increase across holders and modes of one key.
pub async fn tokens_increase_across_holders_and_modes(kit: Kit) -> Outcome {
    let key = kit.key("tokens");
    let mut modes = vec![Mode::Exclusive];
    if kit.caps().shared {
        modes.push(Mode::Shared);
    }
    if kit.caps().semaphore {
        modes.push(Mode::Semaphore { permits: 2 });
    }
    let mut last = 0;
    for round in 0..3 {
        for &mode in &modes {
            let session = kit.session().await;
            let request = match mode {
                Mode::Exclusive if round % 2 == 0 => session.lock(&key),
                Mode::Exclusive => session.write(&key),
                Mode::Shared => session.read(&key),
                Mode::Semaphore { permits } => session.semaphore(&key, permits),
            };
            let guard = request.wait(PATIENCE).await.expect("acquire");
            assert!(
                guard.token() > last,
                "{mode}: token {} after {last}",
                guard.token()
            );
            last = guard.token();
            guard.release().await.expect("release");
            session.close().await.expect("close");
        }
    }
    Outcome::Passed
}

/// Waiters are granted in the order they arrived.
pub async fn fifo_order(kit: Kit) -> Outcome {
    require!(kit.caps().fair, "store does not claim FIFO order");
    let key = kit.key("fifo");
    let owner = kit.session().await;
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for place in 0..4 {
        let session = kit.session().await;
        let (key, order) = (key.clone(), Arc::clone(&order));
        waiters.push(tokio::spawn(async move {
            let guard = session
                .lock(&key)
                .wait(PATIENCE)
                .await
                .expect("queued waiter");
            order.lock().expect("order list").push(place);
            guard.release().await.expect("release");
        }));
        sleep(SETTLE).await;
    }
    held.release().await.expect("release");
    for waiter in waiters {
        waiter.await.expect("waiter task");
    }
    assert_eq!(*order.lock().expect("order list"), vec![0, 1, 2, 3]);
    Outcome::Passed
}

/// Readers hold a shared lock together, each with its own token.
pub async fn shared_admits_readers_together(kit: Kit) -> Outcome {
    require!(kit.caps().shared, "store has no shared locks");
    let key = kit.key("readers");
    let mut guards = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let session = kit.session().await;
        let guard = session
            .read(&key)
            .try_lock()
            .await
            .expect("try")
            .expect("reader admitted");
        sessions.push(session);
        guards.push(guard);
    }
    let mut tokens: Vec<u64> = guards.iter().map(|g| g.token()).collect();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "each reader has its own token");
    Outcome::Passed
}

/// Readers exclude writers and a writer excludes readers.
pub async fn shared_excludes_writers(kit: Kit) -> Outcome {
    require!(kit.caps().shared, "store has no shared locks");
    let key = kit.key("rw");
    let (a, b) = (kit.session().await, kit.session().await);
    let read = a.read(&key).wait(PATIENCE).await.expect("read");
    assert!(
        b.write(&key).try_lock().await.expect("try").is_none(),
        "writer beside a reader"
    );
    read.release().await.expect("release read");
    let write = b.write(&key).wait(PATIENCE).await.expect("write");
    assert!(
        a.read(&key).try_lock().await.expect("try").is_none(),
        "reader beside a writer"
    );
    assert!(
        a.lock(&key).try_lock().await.expect("try").is_none(),
        "two writers"
    );
    write.release().await.expect("release write");
    Outcome::Passed
}

/// A reader arriving after a waiting writer waits behind it.
pub async fn writers_are_preferred(kit: Kit) -> Outcome {
    require!(
        kit.caps().writer_preferring,
        "store does not claim writer preference"
    );
    let key = kit.key("prefer");
    let (reader, writer, late) = (
        kit.session().await,
        kit.session().await,
        kit.session().await,
    );
    let read = reader.read(&key).wait(PATIENCE).await.expect("read");
    let write_key = key.clone();
    let waiting_writer = tokio::spawn(async move {
        let guard = writer
            .write(&write_key)
            .wait(PATIENCE)
            .await
            .expect("writer");
        let token = guard.token();
        guard.release().await.expect("release write");
        token
    });
    sleep(SETTLE).await;
    assert!(
        late.read(&key).try_lock().await.expect("try").is_none(),
        "reader overtook a writer"
    );
    read.release().await.expect("release read");
    let write_token = waiting_writer.await.expect("writer task");
    assert!(write_token > 0);
    Outcome::Passed
}

/// A semaphore of N admits N holders together, never more.
pub async fn semaphore_admits_exactly_n(kit: Kit) -> Outcome {
    require!(kit.caps().semaphore, "store has no semaphores");
    const PERMITS: u32 = 3;
    let key = kit.key("sem");
    let mut sessions = Vec::new();
    for _ in 0..=PERMITS {
        sessions.push(kit.session().await);
    }
    let mut guards = Vec::new();
    for session in &sessions[..PERMITS as usize] {
        let guard = session
            .semaphore(&key, PERMITS)
            .try_lock()
            .await
            .expect("try");
        guards.push(guard.expect("a permit is free"));
    }
    let extra = &sessions[PERMITS as usize];
    assert!(
        extra
            .semaphore(&key, PERMITS)
            .try_lock()
            .await
            .expect("try")
            .is_none(),
        "N+1 admitted"
    );
    guards
        .pop()
        .expect("a guard")
        .release()
        .await
        .expect("release a permit");
    let guard = extra
        .semaphore(&key, PERMITS)
        .wait(PATIENCE)
        .await
        .expect("freed permit");
    guards.push(guard);
    drop(guards);

    // Under contention, never more than N inside.
    let inside = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let session = kit.session().await;
        let (key, inside, most) = (key.clone(), Arc::clone(&inside), Arc::clone(&most));
        tasks.push(tokio::spawn(async move {
            for _ in 0..8 {
                let guard = session
                    .semaphore(&key, PERMITS)
                    .wait(PATIENCE)
                    .await
                    .expect("permit");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("semaphore task");
    }
    assert!(
        most.load(Ordering::SeqCst) <= PERMITS,
        "{} inside",
        most.load(Ordering::SeqCst)
    );
    Outcome::Passed
}

/// Dropping an acquire future while it waits leaves no holder and no waiter.
pub async fn cancelled_acquire_leaves_no_trace(kit: Kit) -> Outcome {
    let key = kit.key("cancel");
    let (owner, quitter, next) = (
        kit.session().await,
        kit.session().await,
        kit.session().await,
    );
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    let gave_up = timeout(SETTLE, quitter.lock(&key).wait(PATIENCE)).await;
    assert!(
        gave_up.is_err(),
        "the waiter should still have been waiting"
    );
    held.release().await.expect("release");
    let taken = next.lock(&key).try_lock().await.expect("try");
    let taken = taken.expect("no stray holder or waiter took the key");
    taken.release().await.expect("release");
    let again = quitter.lock(&key).try_lock().await.expect("try");
    assert!(
        again.is_some(),
        "the cancelled session can lock the key afterwards"
    );
    drop(again);

    // A cancelled writer no longer holds back readers behind it.
    if kit.caps().writer_preferring {
        let key = kit.key("cancelled-writer");
        let reader = owner.read(&key).wait(PATIENCE).await.expect("read");
        let gave_up = timeout(SETTLE, quitter.write(&key).wait(PATIENCE)).await;
        assert!(
            gave_up.is_err(),
            "the writer should still have been waiting"
        );
        let late = next.read(&key).try_lock().await.expect("try");
        assert!(
            late.is_some(),
            "a cancelled writer still holds back readers"
        );
        drop((reader, late));
    }
    Outcome::Passed
}

/// `close()` releases every lock of the session; its guards report lost.
pub async fn close_releases_all(kit: Kit) -> Outcome {
    let (owner, other) = (kit.session().await, kit.session().await);
    let mut guards = vec![owner.lock(kit.key("a")).wait(PATIENCE).await.expect("lock")];
    if kit.caps().shared {
        guards.push(owner.read(kit.key("b")).wait(PATIENCE).await.expect("read"));
    }
    if kit.caps().semaphore {
        guards.push(
            owner
                .semaphore(kit.key("c"), 1)
                .wait(PATIENCE)
                .await
                .expect("semaphore"),
        );
    }
    owner.close().await.expect("close");
    for guard in &guards {
        assert!(
            !guard.is_held(),
            "guard of a closed session claims {}",
            guard.key()
        );
        assert!(guard.lost().now_or_never().is_some());
        let request = match guard.mode() {
            Mode::Exclusive => other.lock(guard.key()),
            Mode::Shared => other.write(guard.key()),
            Mode::Semaphore { .. } => other.semaphore(guard.key(), 1),
        };
        assert!(
            request.try_lock().await.expect("try").is_some(),
            "{} still held",
            guard.key()
        );
    }
    let err = owner
        .lock(kit.key("d"))
        .try_lock()
        .await
        .expect_err("closed session");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    let err = guards
        .pop()
        .expect("a guard")
        .release()
        .await
        .expect_err("released by close");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    Outcome::Passed
}

/// Empty and over-long keys are refused with the rule; any other UTF-8
/// string works, and different keys are different locks.
pub async fn bad_keys_are_rejected(kit: Kit) -> Outcome {
    let (a, b) = (kit.session().await, kit.session().await);
    for bad in [String::new(), "k".repeat(crate::MAX_KEY_BYTES + 1)] {
        let err = a.lock(bad).try_lock().await.expect_err("bad key");
        assert_eq!(err.kind(), ErrorKind::InvalidKey, "{err}");
        assert!(err.to_string().contains("1 to 1024 bytes"), "{err}");
    }
    let longest = format!("{}{}", kit.key("x"), "k".repeat(crate::MAX_KEY_BYTES));
    let longest = longest[longest.len() - crate::MAX_KEY_BYTES..].to_owned();
    let odd = [
        "a/b",
        "a_b",
        "a b",
        "../../etc/passwd",
        "ü 🔒",
        "line\nbreak",
        ".",
        "a~fence",
    ];
    let mut held = vec![a
        .lock(longest)
        .try_lock()
        .await
        .expect("1024-byte key")
        .expect("free")];
    for key in odd {
        let key = kit.key(key);
        held.push(
            a.lock(&key)
                .try_lock()
                .await
                .expect("odd key")
                .expect("distinct key is free"),
        );
        assert!(
            b.lock(&key).try_lock().await.expect("try").is_none(),
            "{key:?} not exclusive"
        );
    }
    Outcome::Passed
}

/// Dropping a guard releases the lock in the background.
pub async fn dropped_guard_releases_in_background(kit: Kit) -> Outcome {
    let key = kit.key("dropped");
    let (owner, next) = (kit.session().await, kit.session().await);
    drop(owner.lock(&key).wait(PATIENCE).await.expect("hold"));
    let guard = next
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("released by drop");
    guard.release().await.expect("release");
    Outcome::Passed
}

/// `max_hold` ends a hold: the guard reports lost and the key is freed.
pub async fn max_hold_releases(kit: Kit) -> Outcome {
    let key = kit.key("max-hold");
    let owner = kit
        .client()
        .session()
        .ttl(Duration::from_secs(10))
        .lock_delay(Duration::ZERO)
        .max_hold(Duration::from_millis(500))
        .open()
        .await
        .expect("open");
    let next = kit.session().await;
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    timeout(PATIENCE, held.lost())
        .await
        .expect("lost() at max_hold");
    let taken = next
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("freed at max_hold");
    assert!(taken.token() > held.token());
    let err = held
        .release()
        .await
        .expect_err("already released at max_hold");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    Outcome::Passed
}

/// A waiter whose session dies leaves the queue: it gets `Lost`, and the
/// next waiter is not stuck behind it.
pub async fn waiter_whose_session_dies_leaves_queue(kit: Kit) -> Outcome {
    require!(
        kit.caps().lease_expiry,
        "store sessions have no lease to expire"
    );
    let key = kit.key("dead-waiter");
    let owner = kit.session().await;
    let dying = kit
        .session_with(Duration::from_millis(600), Duration::ZERO)
        .await;
    let next = kit.session().await;
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    let dying_key = key.clone();
    let dying_task = {
        let dying = dying.clone();
        tokio::spawn(async move { dying.lock(&dying_key).wait(PATIENCE).await.map(|_| ()) })
    };
    sleep(SETTLE).await;
    dying.freeze_for_test();
    let err = dying_task
        .await
        .expect("task")
        .expect_err("its session died");
    assert_eq!(err.kind(), ErrorKind::Lost, "{err}");
    held.release().await.expect("release");
    let taken = next.lock(&key).try_lock().await.expect("try");
    assert!(taken.is_some(), "the dead waiter took or blocks the key");
    Outcome::Passed
}
