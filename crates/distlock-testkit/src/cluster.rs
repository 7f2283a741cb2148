//! What every clustered store (etcd, ZooKeeper, NATS) must ride out, written once:
//! a fault of its leader under a holder and a waiter on other members, and
//! a client whose member dies.

use std::time::{Duration, Instant};

use distlock_core::store::queue::WATCH_SLICE;
use distlock_core::Client;

/// How soon after the holder's release the waiter must be granted, once
/// the cluster has healed: a waiter whose notice of the release was lost in
/// the fault reads the queue again within a [`WATCH_SLICE`], and then has
/// 2 s for that read and its grant. (NATS was granted 5.13 s after the
/// release once, in a fresh-clone CI run, with the bound at 5 s.)
pub const REGRANT_BOUND: Duration = Duration::from_secs(WATCH_SLICE.as_secs() + 2);

/// A lease that outlives a failover of `cluster`: renewed every third of
/// it, a session whose renewal falls due just as the leader dies still has
/// two failovers' time to renew through the new one. (A killed member
/// resets its connections, so no renewal waits out a call's timeout.)
fn outliving<C: Members>(cluster: &C, at_least: Duration) -> Duration {
    at_least.max(cluster.failover() * 3)
}

/// `holding` takes `key` (with a lease longer than an election), a session
/// of `waiting` waits for it, and `fault` strikes the cluster (blocking; it
/// gets the cluster and must leave it healed). Then: the holder still
/// holds, the waiter was not granted meanwhile, and after the holder's
/// release the waiter is granted within [`REGRANT_BOUND`], with a higher
/// token. Returns the cluster.
pub async fn holder_and_waiter_ride_out<C: Members + 'static>(
    holding: &Client,
    waiting: &Client,
    key: &str,
    mut cluster: C,
    fault: impl FnOnce(&mut C) + Send + 'static,
) -> C {
    let holder = holding
        .session()
        .ttl(outliving(&cluster, Duration::from_secs(8)))
        .open()
        .await
        .expect("open");
    let held = holder.lock(key).await.expect("free");
    let waiter = waiting.session().open().await.expect("open");
    let wait = {
        let key = key.to_owned();
        tokio::spawn(async move {
            let guard = waiter
                .lock(&key)
                .wait(Duration::from_secs(60))
                .await
                .expect("granted after the release");
            let token = guard.token();
            guard.release().await.expect("release");
            waiter.close().await.expect("close");
            (token, Instant::now())
        })
    };
    // Queued before the fault.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster = tokio::task::spawn_blocking(move || {
        fault(&mut cluster);
        cluster
    })
    .await
    .expect("fault");
    assert!(
        !wait.is_finished(),
        "the waiter was granted while the holder held"
    );
    assert!(held.is_held(), "the holder lost the key to an election");
    let token = held.token();
    let released = Instant::now();
    held.release().await.expect("release after the fault");
    let (next, granted) = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("the waiter is granted within 30 s of the release")
        .expect("waiter task");
    assert!(next > token, "token {next} after {token}");
    let after = granted.duration_since(released);
    assert!(
        after < REGRANT_BOUND,
        "granted {after:?} after the release, more than {REGRANT_BOUND:?}"
    );
    holder.close().await.expect("close");
    cluster
}

/// A session of `client` holds a key while each of `members` in turn is
/// killed and, past the session's lease, started again: it must keep its
/// hold through the others, and take a new key through them. A client
/// that names every member picks one at random, so all are killed; one
/// given a single member (that finds the others from it) needs only that
/// one.
pub async fn a_session_outlives_its_member<C: Members + 'static>(
    client: &Client,
    key: &str,
    mut cluster: C,
    members: std::ops::Range<usize>,
) -> C {
    let ttl = outliving(&cluster, Duration::from_secs(4));
    let session = client.session().ttl(ttl).open().await.expect("open");
    let held = session.lock(key).await.expect("free");
    for index in members {
        cluster = tokio::task::spawn_blocking(move || {
            cluster.wait_for_leader();
            cluster.kill(index);
            cluster
        })
        .await
        .expect("kill");
        // Past the lease: only renewals through another member keep it.
        tokio::time::sleep(ttl + Duration::from_secs(2)).await;
        if !held.is_held() {
            let why = if session.is_lost() {
                // An ended session gives its reason without asking the store.
                let ended = session.lock(format!("{key}/why")).try_lock().await;
                format!("{:?}", ended.err())
            } else {
                "the lock alone; the session lives".to_owned()
            };
            panic!("the lock was lost with member {index}: {why}");
        }
        let other = format!("{key}/other");
        let again = session
            .lock(&other)
            .try_lock()
            .await
            .expect("a new acquire through the others")
            .expect("free");
        again.release().await.expect("release");
        cluster = tokio::task::spawn_blocking(move || {
            cluster.restart(index);
            cluster.wait_for_leader();
            cluster
        })
        .await
        .expect("restart");
    }
    held.release().await.expect("release");
    session.close().await.expect("close");
    cluster
}

/// How long the others may take to elect a new leader while the old one is
/// frozen.
const FROZEN_ELECTION: Duration = Duration::from_secs(60);

/// Kills `leader` (SIGKILL), waits until another leads, and starts it
/// again on its data. Blocking.
pub fn kill_leader<C: Members>(cluster: &mut C, leader: usize) {
    cluster.kill(leader);
    assert_ne!(cluster.wait_for_leader(), leader, "a new leader");
    cluster.restart(leader);
    cluster.wait_for_leader();
}

/// Freezes `leader` (SIGSTOP) until the others elect another, then lets it
/// run on and waits until all agree again. Blocking; panics (after letting
/// it run on) if no other is elected within a minute.
pub fn freeze_leader<C: Members>(cluster: &mut C, leader: usize) {
    cluster.pause(leader);
    let started = Instant::now();
    while cluster.leader_among_others(leader).is_none() {
        if started.elapsed() > FROZEN_ELECTION {
            cluster.resume(leader);
            panic!("no new leader in {FROZEN_ELECTION:?} while the old one was frozen");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.resume(leader);
    cluster.wait_for_leader();
}

/// A cluster of store servers on this machine, as the fault suite drives
/// it: [`EtcdCluster`](crate::servers::EtcdCluster) and
/// [`ZooKeeperEnsemble`](crate::servers::ZooKeeperEnsemble). Blocking.
pub trait Members: Send + std::fmt::Debug {
    /// How many members.
    fn size(&self) -> usize;
    /// Member `index`'s client port.
    fn port(&self, index: usize) -> u16;
    /// The store's URL naming every member, member `first` first.
    fn url_from(&self, first: usize) -> String;
    /// Waits until the live members agree on a leader; the leader.
    fn wait_for_leader(&self) -> usize;
    /// The leader as the live members but `frozen` see it, if they agree.
    fn leader_among_others(&self, frozen: usize) -> Option<usize>;
    /// Kills member `index` (SIGKILL).
    fn kill(&mut self, index: usize);
    /// Starts a killed member again on its data.
    fn restart(&mut self, index: usize);
    /// Freezes member `index` (SIGSTOP).
    fn pause(&self, index: usize);
    /// Lets a frozen member run on (SIGCONT).
    fn resume(&self, index: usize);
    /// The longest the cluster takes to elect a new leader once its leader
    /// is gone, as the test kit configures it.
    fn failover(&self) -> Duration;
}

macro_rules! members {
    ($type:ty, $leader_among_others:expr, $failover:expr) => {
        impl Members for $type {
            fn size(&self) -> usize {
                <$type>::size(self)
            }
            fn port(&self, index: usize) -> u16 {
                <$type>::port(self, index)
            }
            fn url_from(&self, first: usize) -> String {
                <$type>::url_from(self, first)
            }
            fn wait_for_leader(&self) -> usize {
                <$type>::wait_for_leader(self)
            }
            fn leader_among_others(&self, frozen: usize) -> Option<usize> {
                $leader_among_others(self, frozen)
            }
            fn kill(&mut self, index: usize) {
                <$type>::kill(self, index)
            }
            fn restart(&mut self, index: usize) {
                <$type>::restart(self, index)
            }
            fn pause(&self, index: usize) {
                <$type>::pause(self, index)
            }
            fn resume(&self, index: usize) {
                <$type>::resume(self, index)
            }
            fn failover(&self) -> Duration {
                $failover
            }
        }
    };
}

members!(
    crate::servers::EtcdCluster,
    crate::servers::EtcdCluster::leader_among_others,
    // etcd's election timeout is 1 s by default, and each follower waits a
    // random time between it and twice it before it stands.
    Duration::from_secs(2)
);
members!(
    crate::servers::ZooKeeperEnsemble,
    |ensemble: &crate::servers::ZooKeeperEnsemble, frozen| ensemble
        .leader_among_others(Some(frozen)),
    // syncLimit (1 s in the test kit), then a vote.
    Duration::from_secs(2)
);
members!(
    crate::servers::NatsCluster,
    crate::servers::NatsCluster::leader_among_others,
    // nats-server's Raft election timeout, 4 to 9 s.
    Duration::from_secs(9)
);
