//! etcd as a 3-member cluster: the leader killed or frozen under a holder
//! and a waiter on the other members, and a client whose member dies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock_core::Client;
use distlock_etcd::EtcdStore;
use distlock_testkit::restart::{assert_rising, take_in_turn};
use distlock_testkit::servers::EtcdCluster;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(EtcdStore::connect(url).await.expect("connect")))
}

/// `etcd://` of member `index` alone.
fn only(cluster: &EtcdCluster, index: usize) -> String {
    format!("etcd://127.0.0.1:{}", cluster.port(index))
}

/// The two members that do not lead.
fn followers(cluster: &EtcdCluster, leader: usize) -> (usize, usize) {
    let mut others = (0..cluster.size()).filter(|&index| index != leader);
    (
        others.next().expect("a follower"),
        others.next().expect("another"),
    )
}

/// A holder on one follower and a waiter on the other; `fault` strikes the
/// leader (and gets the cluster, blocking). The holder keeps the key
/// through it (its lease is longer than an election), the waiter is not
/// granted while it holds, and is granted, with a higher token, within
/// `bound` of the release.
async fn holder_and_waiter_ride_out(
    mut cluster: EtcdCluster,
    fault: impl FnOnce(&mut EtcdCluster, usize) + Send + 'static,
) -> EtcdCluster {
    let leader = cluster.wait_for_leader();
    let (near, far) = followers(&cluster, leader);
    let holding = client(&only(&cluster, near)).await;
    let waiting = client(&only(&cluster, far)).await;
    let key = "cluster/leader-fault";
    let holder = holding
        .session()
        .ttl(Duration::from_secs(8))
        .open()
        .await
        .expect("open");
    let held = holder.lock(key).await.expect("free");
    let waiter = waiting.session().open().await.expect("open");
    let wait = tokio::spawn(async move {
        let guard = waiter
            .lock(key)
            .wait(Duration::from_secs(60))
            .await
            .expect("granted after the release");
        let token = guard.token();
        guard.release().await.expect("release");
        waiter.close().await.expect("close");
        (token, Instant::now())
    });
    // Queued before the fault.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster = tokio::task::spawn_blocking(move || {
        fault(&mut cluster, leader);
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
    let bound = Duration::from_secs(5);
    assert!(
        granted.duration_since(released) < bound,
        "granted {:?} after the release, more than {bound:?}",
        granted.duration_since(released)
    );
    holder.close().await.expect("close");
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_and_restarted_loses_no_lock() {
    let cluster = EtcdCluster::start(3);
    let mut cluster = holder_and_waiter_ride_out(cluster, |cluster, leader| {
        cluster.kill(leader);
        let next = cluster.wait_for_leader();
        assert_ne!(next, leader, "a new leader");
        cluster.restart(leader);
        cluster.wait_for_leader();
    })
    .await;
    // Tokens rise across it all, through every member.
    let all = client(&cluster.url()).await;
    let tokens = take_in_turn(&all, "cluster/leader-fault", 3).await;
    assert_rising(&tokens);
    let leader = cluster.wait_for_leader();
    cluster.kill(leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_frozen_past_an_election_loses_no_lock() {
    let cluster = EtcdCluster::start(3);
    holder_and_waiter_ride_out(cluster, |cluster, leader| {
        cluster.pause(leader);
        // etcd's election timeout is 1 s by default.
        std::thread::sleep(Duration::from_secs(3));
        let started = Instant::now();
        while cluster.leader_among_others(leader).is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no new leader while the old one was frozen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster.resume(leader);
        cluster.wait_for_leader();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_on_when_its_member_dies() {
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster.wait_for_leader();
    let (first, _) = followers(&cluster, leader);
    // Every member listed, the one to die first.
    let client = client(&cluster.url_from(first)).await;
    let session = client
        .session()
        .ttl(Duration::from_secs(6))
        .open()
        .await
        .expect("open");
    let held = session.lock("cluster/moves-on").await.expect("free");
    cluster.kill(first);
    // Past the lease: only renewals through another member keep it.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        held.is_held(),
        "the session was lost with one member of three"
    );
    let again = session
        .lock("cluster/other")
        .try_lock()
        .await
        .expect("a new acquire through the others")
        .expect("free");
    again.release().await.expect("release");
    held.release().await.expect("release");
    session.close().await.expect("close");
}
