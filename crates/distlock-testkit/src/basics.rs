//! Exclusion, reentrancy, timeouts, owner-checked release, tokens and keys.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Kit, Outcome, PATIENCE};
use distlock_core::{ErrorKind, Mode};

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

/// Empty and over-long keys are refused with the rule; any other UTF-8
/// string works, and different keys are different locks.
pub async fn bad_keys_are_rejected(kit: Kit) -> Outcome {
    let (a, b) = (kit.session().await, kit.session().await);
    for bad in [String::new(), "k".repeat(distlock_core::MAX_KEY_BYTES + 1)] {
        let err = a.lock(bad).try_lock().await.expect_err("bad key");
        assert_eq!(err.kind(), ErrorKind::InvalidKey, "{err}");
        assert!(err.to_string().contains("1 to 1024 bytes"), "{err}");
    }
    let longest = format!(
        "{}{}",
        kit.key("x"),
        "k".repeat(distlock_core::MAX_KEY_BYTES)
    );
    // Cut at the end, so that the key keeps this run's prefix (ASCII).
    let longest = longest[..distlock_core::MAX_KEY_BYTES].to_owned();
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
