//! etcd as a 3-member cluster: the leader killed or frozen under a holder
//! and a waiter on the other members, and a client whose member dies.

use std::sync::Arc;

use distlock_core::Client;
use distlock_etcd::EtcdStore;
use distlock_testkit::cluster::{
    a_session_outlives_its_member, freeze_leader, holder_and_waiter_ride_out, kill_leader,
};
use distlock_testkit::restart::{assert_rising, take_in_turn};
use distlock_testkit::servers::EtcdCluster;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(EtcdStore::connect(url).await.expect("connect")))
}

/// Clients of member `index` alone, one for each follower of `leader`.
async fn on_followers(cluster: &EtcdCluster, leader: usize) -> (Client, Client) {
    let mut others = (0..cluster.size()).filter(|&index| index != leader);
    let mut next = || {
        let index = others.next().expect("a follower");
        format!("etcd://127.0.0.1:{}", cluster.port(index))
    };
    let (near, far) = (next(), next());
    (client(&near).await, client(&far).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_and_restarted_loses_no_lock() {
    let cluster = EtcdCluster::start(3);
    let leader = cluster.wait_for_leader();
    let (holding, waiting) = on_followers(&cluster, leader).await;
    let key = "cluster/leader-killed";
    let cluster = holder_and_waiter_ride_out(&holding, &waiting, key, cluster, move |cluster| {
        kill_leader(cluster, leader);
    })
    .await;
    // Tokens rise across it all, through every member.
    let all = client(&cluster.url()).await;
    assert_rising(&take_in_turn(&all, key, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_frozen_past_an_election_loses_no_lock() {
    let cluster = EtcdCluster::start(3);
    let leader = cluster.wait_for_leader();
    let (holding, waiting) = on_followers(&cluster, leader).await;
    let key = "cluster/leader-frozen";
    holder_and_waiter_ride_out(&holding, &waiting, key, cluster, move |cluster| {
        freeze_leader(cluster, leader);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_on_when_its_member_dies() {
    let cluster = EtcdCluster::start(3);
    let client = client(&cluster.url()).await;
    let members = 0..cluster.size();
    a_session_outlives_its_member(&client, "cluster/moves-on", cluster, members).await;
}
