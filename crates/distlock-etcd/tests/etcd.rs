//! The conformance suite against a real etcd.

use std::sync::Arc;

use distlock_core::Client;
use distlock_etcd::EtcdStore;
use distlock_testkit::servers::Etcd;

async fn connect() -> Client {
    let store = EtcdStore::connect(&Etcd::shared().url())
        .await
        .expect("connect to the test's etcd");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
