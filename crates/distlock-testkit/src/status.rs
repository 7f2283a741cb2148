//! `status`: who holds and who waits, in the same shape on every store that
//! claims it.

use std::time::Duration;

use tokio::time::sleep;

use super::{Kit, Outcome, PATIENCE, SETTLE};
use distlock_core::status::{KeyStatus, StatusQuery};
use distlock_core::{Client, Mode, Session};

/// `key`'s status once it lists `waiters` waiters: a waiter spawned as a
/// task joins a moment after it starts. Panics after 20 s.
pub async fn with_waiters(client: &Client, key: &str, waiters: usize) -> KeyStatus {
    let started = tokio::time::Instant::now();
    loop {
        let keys = client
            .status(&StatusQuery::Key(key.to_owned()))
            .await
            .expect("status")
            .keys;
        if let Some(found) = keys.iter().find(|k| k.waiters.len() == waiters) {
            return found.clone();
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{key} never had {waiters} waiters: {keys:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

impl Kit {
    /// A session that says it is `owner`.
    pub async fn session_owned_by(&self, owner: &str) -> Session {
        self.client
            .session()
            .ttl(Duration::from_secs(10))
            .owner(owner)
            .open()
            .await
            .expect("open a session on the store under test")
    }

    async fn status(&self, query: StatusQuery) -> Vec<KeyStatus> {
        self.client
            .status(&query)
            .await
            .expect("status from a store that claims it")
            .keys
    }
}

/// Holders of two keys, found by key and by prefix, each with its mode,
/// token and owner where the store keeps them; a waiter, where the store
/// queues; nothing once everything is released.
pub async fn status_lists_holders_and_waiters(kit: Kit) -> Outcome {
    require!(kit.caps.status, "the store cannot list its holders");
    let (first, second) = (kit.key("a"), kit.key("b"));
    let owner_a = "conformance@host-a pid 11 (status)";
    let owner_b = "conformance@host-b pid 12 (status)";
    let a = kit.session_owned_by(owner_a).await;
    let b = kit.session_owned_by(owner_b).await;
    let held_a = a.lock(&first).await.expect("first key");
    let held_b = b.lock(&second).await.expect("second key");

    let both = kit.status(StatusQuery::Prefix(kit.prefix.clone())).await;
    let names: Vec<&str> = both.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(
        names,
        [first.as_str(), second.as_str()],
        "by prefix, sorted"
    );
    for (key, guard, owner) in [(&both[0], &held_a, owner_a), (&both[1], &held_b, owner_b)] {
        assert_eq!(key.holders.len(), 1, "one holder of {}", key.key);
        let holder = &key.holders[0];
        assert_eq!(holder.mode, Mode::Exclusive);
        if let Some(token) = holder.token {
            assert_eq!(token, guard.token(), "the holder's token");
        }
        if kit.caps.keeps_owner {
            assert_eq!(holder.owner, owner, "the holder's owner");
        }
        if let Some(left) = holder.lease_left {
            assert!(left <= Duration::from_secs(10), "lease left {left:?}");
        }
        if let Some(held) = holder.held_for {
            assert!(held <= PATIENCE, "held for {held:?}");
        }
    }
    let one = kit.status(StatusQuery::Key(first.clone())).await;
    assert_eq!(one.len(), 1, "by key: that key only");
    assert_eq!(one[0].key, first);

    if kit.caps.fair {
        // A store that queues shows the waiter.
        let waiting = {
            let (b, first) = (b.clone(), first.clone());
            tokio::spawn(async move { b.lock(&first).wait(PATIENCE).await })
        };
        // Polled: the waiter reaches the store's queue when it does.
        let started = tokio::time::Instant::now();
        let queued = loop {
            let queued = kit.status(StatusQuery::Key(first.clone())).await;
            if !queued[0].waiters.is_empty() || started.elapsed() > PATIENCE {
                break queued;
            }
            sleep(SETTLE / 4).await;
        };
        assert_eq!(queued[0].waiters.len(), 1, "one waiter: {queued:?}");
        if kit.caps.keeps_owner {
            assert_eq!(queued[0].waiters[0].owner, owner_b, "the waiter's owner");
        }
        held_a.release().await.expect("release");
        let granted = waiting.await.expect("waiter").expect("granted");
        granted.release().await.expect("release");
    } else {
        held_a.release().await.expect("release");
    }
    held_b.release().await.expect("release");

    if kit.caps.shared {
        let readers = [
            a.read(&first).await.expect("read"),
            b.read(&first).await.expect("read"),
        ];
        let shared = kit.status(StatusQuery::Key(first.clone())).await;
        assert_eq!(shared[0].holders.len(), 2, "two readers: {shared:?}");
        assert!(shared[0].holders.iter().all(|h| h.mode == Mode::Shared));
        for reader in readers {
            reader.release().await.expect("release");
        }
    }

    let after = kit.status(StatusQuery::Prefix(kit.prefix.clone())).await;
    assert!(
        after
            .iter()
            .all(|key| key.holders.is_empty() && key.waiters.is_empty()),
        "released keys still listed as held: {after:?}"
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
    Outcome::Passed
}

/// A forced release ends every hold on a key, whoever holds it: the next
/// grant's token is above the ended one's, the old holder's `lost()` fires,
/// and its own release is refused; what was held is reported.
pub async fn forced_release_ends_holds_and_fences_them(kit: Kit) -> Outcome {
    require!(
        kit.caps.force_release,
        "the store cannot end another session's hold"
    );
    let key = kit.key("stuck");
    let owner = "conformance@host-s pid 13 (stuck)";
    let stuck = kit.session_owned_by(owner).await;
    let held = stuck.lock(&key).await.expect("free");
    let resource = Fenced::default();
    assert!(resource.write(held.token()), "the holder's own write");
    let ended = kit.client.force_release(&key).await.expect("force release");
    assert_eq!(ended.len(), 1, "one hold ended: {ended:?}");
    if let Some(token) = ended[0].token {
        assert_eq!(token, held.token(), "the ended hold's token");
    }
    if kit.caps.keeps_owner {
        assert_eq!(ended[0].owner, owner, "the ended hold's owner");
    }
    let next = kit.session().await;
    let taken = next
        .lock(&key)
        .wait(PATIENCE)
        .await
        .expect("the key is free again");
    assert!(resource.write(taken.token()), "the next holder's write");
    assert!(
        !resource.write(held.token()),
        "token {} after the ended {}: the stuck holder's late write must be refused",
        taken.token(),
        held.token()
    );
    tokio::time::timeout(PATIENCE, held.lost())
        .await
        .expect("the old holder learns it lost the key");
    assert!(
        held.release().await.is_err(),
        "the old holder cannot release what it no longer holds"
    );
    assert!(
        kit.client
            .force_release(&kit.key("never-held"))
            .await
            .expect("force release of a free key")
            .is_empty(),
        "nothing to end on a free key"
    );
    taken.release().await.expect("release");
    stuck.close().await.expect("close");
    next.close().await.expect("close");
    Outcome::Passed
}

/// A resource that fences its writes: it takes one only with a token at
/// least the highest it has taken.
#[derive(Default)]
struct Fenced(std::sync::Mutex<u64>);

impl Fenced {
    fn write(&self, token: u64) -> bool {
        let mut highest = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if token < *highest {
            return false;
        }
        *highest = token;
        true
    }
}
