//! Leases: expiry, loss before regrant, lock-delay, renewal, `max_hold`.

use std::time::Duration;

use futures::FutureExt;
use tokio::time::{sleep, timeout, Instant};

use super::{Kit, Outcome, PATIENCE, SETTLE};
use distlock_core::ErrorKind;

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
    // Right at the deadline, racing the core's own release of the old hold,
    // the same session can lock the key again.
    let again = owner
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("re-lock after max_hold");
    assert!(again.token() > held.token());
    again.release().await.expect("release the new hold");
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
    // The client gives its session up before the store's lease ends (by
    // the drift margin, and a frozen session cannot take its place back):
    // the store may hand the key to the dead waiter first, for what is
    // left of its 600 ms lease, but never longer.
    let taken = next.lock(&key).wait(Duration::from_secs(5)).await;
    assert!(
        taken.is_ok(),
        "the dead waiter took or blocks the key: {taken:?}"
    );
    Outcome::Passed
}

/// A wait longer than the waiter's own lease ends with a lock that is held,
/// and stays held: the lease counts from the grant, not the wait's start.
pub async fn long_wait_keeps_the_lock_on_arrival(kit: Kit) -> Outcome {
    let key = kit.key("long-wait");
    let ttl = Duration::from_millis(600);
    let (owner, waiter, other) = (
        kit.session().await,
        kit.session_with(ttl, Duration::ZERO).await,
        kit.session().await,
    );
    let held = owner.lock(&key).wait(PATIENCE).await.expect("hold");
    let releaser = tokio::spawn(async move {
        sleep(ttl * 3).await;
        held.release().await.expect("release");
    });
    let guard = waiter
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("granted after the wait");
    releaser.await.expect("releaser");
    assert!(
        guard.is_held(),
        "the lock came already lost after a long wait"
    );
    sleep(ttl * 2).await;
    assert!(
        guard.is_held(),
        "renewal did not keep a lock granted after a long wait"
    );
    assert!(other.lock(&key).try_lock().await.expect("try").is_none());
    guard.release().await.expect("release while held");
    Outcome::Passed
}
