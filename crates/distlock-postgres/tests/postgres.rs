//! The conformance suite against a real PostgreSQL, advisory-lock mode.

use std::sync::Arc;

use distlock_core::Client;
use distlock_postgres::PostgresStore;
use distlock_testkit::servers::Postgres;

async fn connect() -> Client {
    let store = PostgresStore::connect(&Postgres::shared().url())
        .await
        .expect("connect to the test's PostgreSQL");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
