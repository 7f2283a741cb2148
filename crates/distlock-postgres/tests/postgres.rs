//! The conformance suite against a real PostgreSQL, advisory-lock mode.

use std::sync::Arc;

use distlock_core::testkit::servers::Postgres;
use distlock_core::Client;
use distlock_postgres::PostgresStore;

async fn connect() -> Client {
    let store = PostgresStore::connect(&Postgres::shared().url())
        .await
        .expect("connect to the test's PostgreSQL");
    Client::new(Arc::new(store))
}

distlock_core::conformance_suite!(connect);
