//! The conformance suite against a real PostgreSQL, lease-table mode.

use std::sync::Arc;

use distlock_core::testkit::servers::Postgres;
use distlock_core::Client;
use distlock_postgres::PostgresStore;

async fn connect() -> Client {
    let url = format!("{}?mode=lease", Postgres::shared().url());
    let store = PostgresStore::connect(&url)
        .await
        .expect("connect to the test's PostgreSQL");
    Client::new(Arc::new(store))
}

distlock_core::conformance_suite!(connect);
