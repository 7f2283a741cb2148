//! Behaviours driven through the store's own traits, not the core's
//! guards: the core already refuses what a stale guard asks, so only the
//! store can be caught doing it (issue 23).

use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::{
    AcquireRequest, HeldLock, LockStore, RenewReport, SessionModel, SessionOptions, StoreSession,
};
use distlock_core::{ErrorKind, Mode, Result};
use tokio::time::Instant;

use super::{Kit, Outcome, PATIENCE};

/// A store session that nobody renews: its lease runs out at the store.
async fn open(store: &Arc<dyn LockStore>, ttl: Duration) -> Box<dyn StoreSession> {
    store
        .open_session(&SessionOptions::new(ttl, Duration::ZERO))
        .await
        .expect("open a store session")
}

/// Tries once to take `key` exclusively; the hold if granted.
async fn try_take(session: &dyn StoreSession, key: &str) -> Result<Option<HeldLock>> {
    let grant = session
        .acquire(&AcquireRequest::new(key, Mode::Exclusive))
        .await?;
    Ok(grant.map(|grant| HeldLock {
        key: key.to_owned(),
        mode: Mode::Exclusive,
        token: grant.token,
    }))
}

/// Asks `session` for `key` until it is granted (the store lets a lapsed
/// lease go in its own time), renewing `session` meanwhile.
async fn take_when_free(session: &dyn StoreSession, key: &str) -> HeldLock {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(held) = try_take(session, key).await.expect("try the key") {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "the store kept a lapsed lease's hold on '{key}' past {PATIENCE:?}"
        );
        session.renew(&[]).await.expect("renew the waiting session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a renewal says `held` is gone (or the session is).
fn renewal_lost(renewed: &Result<RenewReport>, held: &HeldLock) -> bool {
    match renewed {
        Ok(report) => report.lost_keys.contains(&held.key),
        Err(err) => err.kind() == ErrorKind::Lost || err.kind() == ErrorKind::NotHeld,
    }
}

/// A session whose lease ran out at the store, after another session was
/// granted its key, can neither release, renew nor take again that key:
/// the new hold stays, unextended by the old session and untouched.
pub async fn a_lapsed_session_cannot_touch_the_next_hold(kit: Kit) -> Outcome {
    require!(
        kit.caps().session == SessionModel::Lease,
        "store sessions are not leases the store expires"
    );
    // Its client heartbeats the session by itself: a session nobody renews
    // does not lapse (its tests expire sessions through the server).
    require!(
        kit.caps().name != "zookeeper",
        "ZooKeeper's client keeps its session alive without renewals"
    );
    let store = Arc::clone(kit.client().store());
    let key = kit.key("lapsed");
    // Long enough to outlast opening it and its first acquire on a slow
    // host (NATS and etcd round leases up to whole seconds anyway).
    let stale = open(&store, Duration::from_secs(3)).await;
    let old = try_take(stale.as_ref(), &key)
        .await
        .expect("take")
        .expect("free");
    // Nobody renews the stale session: the next session is granted once the
    // store lets its lease go.
    let next = open(&store, Duration::from_secs(30)).await;
    let new = take_when_free(next.as_ref(), &key).await;
    assert!(
        new.token > old.token,
        "token {} after {}",
        new.token,
        old.token
    );
    let probe = open(&store, Duration::from_secs(30)).await;

    // Its release must not end the new hold.
    let _ = stale.release(&old).await;
    assert!(
        try_take(probe.as_ref(), &key)
            .await
            .expect("probe")
            .is_none(),
        "the lapsed session's release freed the next session's hold"
    );
    // Its renewal must say the hold is gone, and not extend anything.
    let renewed = stale.renew(std::slice::from_ref(&old)).await;
    assert!(
        renewal_lost(&renewed, &old),
        "the lapsed session's renewal kept its hold: {renewed:?}"
    );
    // It must not take the key over the next session's hold.
    let again = try_take(stale.as_ref(), &key).await;
    assert!(
        !matches!(again, Ok(Some(_))),
        "the lapsed session took the key from its holder: {again:?}"
    );
    let kept = next.renew(std::slice::from_ref(&new)).await;
    assert!(
        !renewal_lost(&kept, &new),
        "the next session lost its hold to the lapsed one: {kept:?}"
    );
    assert!(
        try_take(probe.as_ref(), &key)
            .await
            .expect("probe")
            .is_none(),
        "the next session's hold is gone"
    );
    next.release(&new).await.expect("release the next hold");
    let free = try_take(probe.as_ref(), &key).await.expect("probe");
    assert!(free.is_some(), "the key stayed held after its release");
    for session in [stale, next, probe] {
        let _ = session.close().await;
    }
    Outcome::Passed
}

/// A release that names the right key but not the hold's token (an earlier
/// or a later life of it) leaves the hold in place.
pub async fn a_release_with_another_token_does_nothing(kit: Kit) -> Outcome {
    let store = Arc::clone(kit.client().store());
    let key = kit.key("token");
    let holder = open(&store, Duration::from_secs(30)).await;
    let probe = open(&store, Duration::from_secs(30)).await;
    let held = try_take(holder.as_ref(), &key)
        .await
        .expect("take")
        .expect("free");
    for token in [held.token - 1, held.token + 1] {
        let wrong = HeldLock {
            token,
            ..held.clone()
        };
        let _ = holder.release(&wrong).await;
        assert!(
            try_take(probe.as_ref(), &key)
                .await
                .expect("probe")
                .is_none(),
            "a release with token {token} ended the hold granted with {}",
            held.token
        );
    }
    holder.release(&held).await.expect("release");
    assert!(
        try_take(probe.as_ref(), &key)
            .await
            .expect("probe")
            .is_some(),
        "the right release did not free the key"
    );
    for session in [holder, probe] {
        let _ = session.close().await;
    }
    Outcome::Passed
}

/// A release by another session that names the hold exactly (key, mode
/// and token: `status` shows tokens to anyone) leaves the hold in place:
/// a store checks who releases, not only what.
pub async fn a_release_by_another_session_does_nothing(kit: Kit) -> Outcome {
    let store = Arc::clone(kit.client().store());
    let key = kit.key("other");
    let holder = open(&store, Duration::from_secs(30)).await;
    let other = open(&store, Duration::from_secs(30)).await;
    let probe = open(&store, Duration::from_secs(30)).await;
    let held = try_take(holder.as_ref(), &key)
        .await
        .expect("take")
        .expect("free");
    let _ = other.release(&held).await;
    assert!(
        try_take(probe.as_ref(), &key)
            .await
            .expect("probe")
            .is_none(),
        "another session's release with the holder's token {} freed the key",
        held.token
    );
    holder
        .release(&held)
        .await
        .expect("the holder's own release");
    for session in [holder, other, probe] {
        let _ = session.close().await;
    }
    Outcome::Passed
}
