//! Several keys at once (`lock_all`): no deadlock, no overlap, all or
//! nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock_core::{ErrorKind, Mode};

use super::{Kit, Outcome, PATIENCE, SETTLE};

/// How often each of the two sessions takes both keys.
const ROUNDS: usize = 1_000;

/// The longest the two sessions may take for their rounds: far more than
/// any store needs, short of a deadlock.
const DEADLOCK_BOUND: Duration = Duration::from_secs(300);

/// Two sessions take {a, b} and {b, a} a thousand times each, at once,
/// while a third takes b alone: none deadlocks, no key has two holders,
/// each key's tokens rise. (Rounds wait as long as it takes: a store that
/// polls may let one session win many rounds in a row; only the whole run
/// is bounded.)
pub async fn lock_all_in_opposite_orders_never_deadlocks(kit: Kit) -> Outcome {
    let (a, b) = (kit.key("a"), kit.key("b"));
    // Per key: whether someone is inside, and the last token seen.
    let keys: Arc<[(AtomicBool, AtomicU64); 2]> = Arc::new([
        (AtomicBool::new(false), AtomicU64::new(0)),
        (AtomicBool::new(false), AtomicU64::new(0)),
    ]);
    let mut tasks = Vec::new();
    for order in [[a.clone(), b.clone()], [b.clone(), a.clone()]] {
        let session = kit.session().await;
        let (first, keys) = (a.clone(), Arc::clone(&keys));
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let all = session.lock_all(&order).await.expect("both keys");
                for (key, token) in all.tokens() {
                    enter(&keys[usize::from(key != first)], key, token);
                }
                tokio::task::yield_now().await;
                for (inside, _) in keys.iter() {
                    inside.store(false, Ordering::SeqCst);
                }
                all.release().await.expect("release both");
            }
            session.close().await.expect("close");
        }));
    }
    let alone = kit.session().await;
    let (key, keys) = (b.clone(), Arc::clone(&keys));
    tasks.push(tokio::spawn(async move {
        for _ in 0..ROUNDS / 4 {
            let guard = alone.lock(&key).await.expect("b alone");
            enter(&keys[1], &key, guard.token());
            tokio::task::yield_now().await;
            keys[1].0.store(false, Ordering::SeqCst);
            guard.release().await.expect("release b");
        }
        alone.close().await.expect("close");
    }));
    let all = async {
        for task in tasks {
            task.await.expect("a session's rounds");
        }
    };
    tokio::time::timeout(DEADLOCK_BOUND, all)
        .await
        .expect("the sessions deadlocked");
    Outcome::Passed
}

/// Enters `key`'s critical section (its flag and last token), which must be
/// empty, with a token above the last.
fn enter((inside, last): &(AtomicBool, AtomicU64), key: &str, token: u64) {
    assert!(!inside.swap(true, Ordering::SeqCst), "{key}: two holders");
    let previous = last.swap(token, Ordering::SeqCst);
    assert!(token > previous, "{key}: token {token} after {previous}");
}

/// A `lock_all` that cannot have every key holds none: not after a
/// timeout, not after a `try_lock` that finds one busy, not after its
/// future is dropped while it waits.
pub async fn lock_all_is_all_or_nothing(kit: Kit) -> Outcome {
    let (a, b) = (kit.key("a"), kit.key("b"));
    let (holder, asker, checker) = (
        kit.session().await,
        kit.session().await,
        kit.session().await,
    );
    let held = holder.lock(&b).wait(PATIENCE).await.expect("b");
    let err = asker
        .lock_all([&a, &b])
        .wait(SETTLE)
        .await
        .expect_err("b is held");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("none of them is held"), "{err}");
    let free = checker.lock(&a).try_lock().await.expect("try a");
    free.expect("a was given back after the timeout")
        .release()
        .await
        .expect("release a");
    let busy = asker.lock_all([&a, &b]).try_lock().await.expect("try both");
    assert!(busy.is_none(), "both while b is held");
    let free = checker.lock(&a).try_lock().await.expect("try a");
    free.expect("a was given back after the try")
        .release()
        .await
        .expect("release a");
    // Dropped while it holds a and waits for b.
    let waiting = {
        let (asker, a, b) = (asker.clone(), a.clone(), b.clone());
        tokio::spawn(async move { asker.lock_all([&a, &b]).wait(PATIENCE).await })
    };
    tokio::time::sleep(SETTLE).await;
    let taken = checker.lock(&a).try_lock().await.expect("try a");
    assert!(taken.is_none(), "a is not held by the waiting request");
    assert!(!waiting.is_finished(), "granted while b is held");
    waiting.abort();
    let again = checker.lock(&a).wait(PATIENCE).await.expect("a comes back");
    again.release().await.expect("release a");
    // And once b is free, every key is had, each with its own token.
    held.release().await.expect("release b");
    let all = asker.lock_all([&b, &a]).wait(PATIENCE).await.expect("both");
    let tokens = all.tokens();
    assert_eq!(
        tokens.iter().map(|(key, _)| *key).collect::<Vec<_>>(),
        [b.as_str(), a.as_str()],
        "guards in the order asked"
    );
    assert_eq!(all.token(&a), Some(tokens[1].1));
    all.release().await.expect("release both");
    Outcome::Passed
}

/// Shared and exclusive keys in one request: two readers of `a` both take
/// it with their own exclusive key.
pub async fn lock_all_mixes_modes(kit: Kit) -> Outcome {
    require!(kit.caps().shared, "store has no shared locks");
    let (shared, mine, yours) = (kit.key("shared"), kit.key("mine"), kit.key("yours"));
    let (one, two) = (kit.session().await, kit.session().await);
    let first = one
        .lock_all([
            (shared.as_str(), Mode::Shared),
            (mine.as_str(), Mode::Exclusive),
        ])
        .wait(PATIENCE)
        .await
        .expect("first reader");
    let second = two
        .lock_all([
            (shared.as_str(), Mode::Shared),
            (yours.as_str(), Mode::Exclusive),
        ])
        .try_lock()
        .await
        .expect("try")
        .expect("a second reader beside the first");
    assert!(
        two.read(&mine).try_lock().await.expect("try").is_none(),
        "an exclusive key of the first request admits a reader"
    );
    first.release().await.expect("release");
    second.release().await.expect("release");
    Outcome::Passed
}

/// An empty list, a key named twice, and more keys than the session's
/// limit are refused with errors that say so.
pub async fn lock_all_refuses_bad_lists(kit: Kit) -> Outcome {
    let session = kit
        .client()
        .session()
        .max_keys(2)
        .open()
        .await
        .expect("open");
    let none: [&str; 0] = [];
    let err = session.lock_all(none).try_lock().await.expect_err("empty");
    assert_eq!(err.kind(), ErrorKind::InvalidKey, "{err}");
    let a = kit.key("a");
    let err = session
        .lock_all([&a, &a])
        .try_lock()
        .await
        .expect_err("twice");
    assert_eq!(err.kind(), ErrorKind::InvalidKey, "{err}");
    let err = session
        .lock_all([kit.key("x"), kit.key("y"), kit.key("z")])
        .try_lock()
        .await
        .expect_err("over the limit");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("limit of 2"), "{err}");
    // None of them left anything held.
    let free = kit.session().await.lock(&a).try_lock().await.expect("try");
    assert!(free.is_some(), "a refused request held a key");
    Outcome::Passed
}

/// On a store that takes several keys in one request: a request for
/// {a, b} that waits for b holds nothing meanwhile (a has no holder, the
/// request waits in both queues), a request for a alone that comes after
/// it does not overtake it, and b's release grants both at once.
pub async fn lock_all_waits_holding_nothing_and_is_not_overtaken(kit: Kit) -> Outcome {
    require!(
        kit.caps().atomic_lock_all,
        "the store takes several keys one at a time"
    );
    let (a, b) = (kit.key("a"), kit.key("b"));
    let holder = kit.session().await;
    let held = holder.lock(&b).await.expect("b");
    let asker = kit.session().await;
    let both = tokio::spawn({
        let keys = [a.clone(), b.clone()];
        async move { asker.lock_all(&keys).wait(PATIENCE).await }
    });
    // Polled: the request reaches the store when it does.
    let started = tokio::time::Instant::now();
    let waiting = loop {
        let status = kit
            .client()
            .status(&distlock_core::status::StatusQuery::Key(a.clone()))
            .await
            .expect("status");
        if status
            .keys
            .first()
            .is_some_and(|key| !key.waiters.is_empty())
        {
            break status.keys[0].clone();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the request never queued on a"
        );
        tokio::time::sleep(SETTLE / 4).await;
    };
    assert!(
        waiting.holders.is_empty(),
        "a is held while b is waited for: {waiting:?}"
    );
    let single = kit.session().await;
    assert!(
        single.lock(&a).try_lock().await.expect("try").is_none(),
        "a request for a alone overtook the waiting request for both"
    );
    let b_token = held.token();
    held.release().await.expect("release b");
    let both = both.await.expect("task").expect("both keys");
    assert!(both.token(&b).expect("b") > b_token);
    both.release().await.expect("release");
    Outcome::Passed
}
