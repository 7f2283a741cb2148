//! The conformance suite against a real nats-server with JetStream.

use std::sync::Arc;

use distlock_core::Client;
use distlock_nats::NatsStore;
use distlock_testkit::servers::Nats;

async fn connect() -> Client {
    let store = NatsStore::connect(&Nats::shared().url())
        .await
        .expect("connect to the test's nats-server");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
