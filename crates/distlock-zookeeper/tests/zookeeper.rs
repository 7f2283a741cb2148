//! The conformance suite against a real ZooKeeper.

use std::sync::Arc;

use distlock_core::Client;
use distlock_testkit::servers::ZooKeeper;
use distlock_zookeeper::ZkStore;

async fn connect() -> Client {
    let store = ZkStore::connect(&format!("{}/conformance", ZooKeeper::shared().url()))
        .await
        .expect("connect to the test's ZooKeeper");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
