//! ZooKeeper as an ensemble of 3: the leader killed or frozen under a
//! holder and a waiter on the other servers, and a client whose server
//! dies.

use std::sync::Arc;

use distlock_core::Client;
use distlock_testkit::cluster::{
    a_session_outlives_its_member, freeze_leader, holder_and_waiter_ride_out, kill_leader,
};
use distlock_testkit::restart::{assert_rising, take_in_turn};
use distlock_testkit::servers::ZooKeeperEnsemble;
use distlock_zookeeper::ZkStore;

async fn client(url: &str) -> Client {
    let store = ZkStore::connect(&format!("{url}/cluster"))
        .await
        .expect("connect");
    Client::new(Arc::new(store))
}

/// Clients of server `index` alone, one for each follower of `leader`.
async fn on_followers(ensemble: &ZooKeeperEnsemble, leader: usize) -> (Client, Client) {
    let mut others = (0..ensemble.size()).filter(|&index| index != leader);
    let near = ensemble.url_of(others.next().expect("a follower"));
    let far = ensemble.url_of(others.next().expect("another"));
    (client(&near).await, client(&far).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_and_restarted_loses_no_lock() {
    let ensemble = ZooKeeperEnsemble::start(3);
    let leader = ensemble.wait_for_leader();
    let (holding, waiting) = on_followers(&ensemble, leader).await;
    let key = "leader-killed";
    let ensemble = holder_and_waiter_ride_out(&holding, &waiting, key, ensemble, move |ensemble| {
        kill_leader(ensemble, leader);
    })
    .await;
    let all = client(&ensemble.url()).await;
    assert_rising(&take_in_turn(&all, key, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_frozen_past_an_election_loses_no_lock() {
    let ensemble = ZooKeeperEnsemble::start(3);
    let leader = ensemble.wait_for_leader();
    let (holding, waiting) = on_followers(&ensemble, leader).await;
    holder_and_waiter_ride_out(
        &holding,
        &waiting,
        "leader-frozen",
        ensemble,
        move |ensemble| freeze_leader(ensemble, leader),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_on_when_its_server_dies() {
    let ensemble = ZooKeeperEnsemble::start(3);
    let client = client(&ensemble.url()).await;
    let members = 0..ensemble.size();
    a_session_outlives_its_member(&client, "moves-on", ensemble, members).await;
}
