//! NATS as a cluster of 3 servers, the stream kept 3 ways: the stream's
//! leader killed or frozen under a holder and a waiter on the other
//! servers, and a client whose only named server dies.

use std::sync::Arc;

use distlock_core::Client;
use distlock_nats::NatsStore;
use distlock_testkit::cluster::{
    a_session_outlives_its_member, freeze_leader, holder_and_waiter_ride_out, kill_leader,
};
use distlock_testkit::restart::{assert_rising, take_in_turn};
use distlock_testkit::servers::NatsCluster;

async fn client(url: &str) -> Client {
    let store = NatsStore::connect(url).await.expect("connect");
    Client::new(Arc::new(store))
}

/// A cluster whose stream exists (so that its leader is the stream's),
/// and its leader.
async fn with_stream() -> (NatsCluster, usize) {
    let cluster = NatsCluster::start(3);
    client(&cluster.url()).await;
    let cluster = tokio::task::spawn_blocking(move || {
        let leader = cluster.wait_for_leader();
        (cluster, leader)
    })
    .await
    .expect("leader");
    cluster
}

/// Clients of server `index` alone, one for each server but the leader.
async fn on_followers(cluster: &NatsCluster, leader: usize) -> (Client, Client) {
    let mut others = (0..cluster.size()).filter(|&index| index != leader);
    let near = cluster.url_of(others.next().expect("a follower"));
    let far = cluster.url_of(others.next().expect("another"));
    (client(&near).await, client(&far).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_stream_on_a_cluster_is_kept_three_ways() {
    let cluster = NatsCluster::start(3);
    // More copies than servers: a clear error, and no stream.
    let err = NatsStore::connect(&format!("{}/?replicas=5", cluster.url()))
        .await
        .expect_err("3 servers keep no 5 copies");
    assert_eq!(err.kind(), distlock_core::ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("?replicas=N"), "{err}");
    let all = client(&cluster.url()).await;
    let session = all.session().open().await.expect("open");
    session
        .lock("three")
        .await
        .expect("free")
        .release()
        .await
        .expect("release");
    // Asking for what the stream has is accepted; anything else is not.
    NatsStore::connect(&format!("{}/?replicas=3", cluster.url()))
        .await
        .expect("3 replicas, as made");
    let err = NatsStore::connect(&format!("{}/?replicas=1", cluster.url()))
        .await
        .expect_err("the stream has 3");
    assert!(err.to_string().contains("replicas"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_and_restarted_loses_no_lock() {
    let (cluster, leader) = with_stream().await;
    let (holding, waiting) = on_followers(&cluster, leader).await;
    let key = "leader-killed";
    let cluster = holder_and_waiter_ride_out(&holding, &waiting, key, cluster, move |cluster| {
        kill_leader(cluster, leader);
    })
    .await;
    let all = client(&cluster.url()).await;
    assert_rising(&take_in_turn(&all, key, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_frozen_past_an_election_loses_no_lock() {
    let (cluster, leader) = with_stream().await;
    let (holding, waiting) = on_followers(&cluster, leader).await;
    holder_and_waiter_ride_out(
        &holding,
        &waiting,
        "leader-frozen",
        cluster,
        move |cluster| freeze_leader(cluster, leader),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_on_when_its_server_dies() {
    let (cluster, leader) = with_stream().await;
    // Given one server, the client learns the others from it: only that
    // one need die (a follower: the leader's death is the tests above).
    let server = (leader + 1) % cluster.size();
    let client = client(&cluster.url_of(server)).await;
    a_session_outlives_its_member(&client, "moves-on", cluster, server..server + 1).await;
}
