//! Cancelled acquires, `close()` and dropped guards.

use std::time::Duration;

use futures::FutureExt;
use tokio::time::{sleep, timeout, Instant};

use super::{Kit, Outcome, PATIENCE, SETTLE};
use distlock_core::{ErrorKind, Guard, Mode};

/// Tries until it gets `Some` or the suite's patience runs out. A remote
/// store hears of a dropped acquire asynchronously (the cancel travels on the
/// dropped session's own connection), so its trace goes soon, not at once.
async fn eventually<F, Fut>(mut attempt: F) -> Option<Guard>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = distlock_core::Result<Option<Guard>>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(guard) = attempt().await.expect("try") {
            return Some(guard);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(10)).await;
    }
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
    if let Ok(answer) = gave_up {
        panic!("the waiter should still have been waiting, but got {answer:?}");
    }
    held.release().await.expect("release");
    let taken = eventually(|| next.lock(&key).try_lock()).await;
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
        if let Ok(answer) = gave_up {
            panic!("the writer should still have been waiting, but got {answer:?}");
        }
        let late = eventually(|| next.read(&key).try_lock()).await;
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
