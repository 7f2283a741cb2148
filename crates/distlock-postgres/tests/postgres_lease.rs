//! The conformance suite against a real PostgreSQL, lease-table mode.

use std::sync::Arc;

use distlock_core::Client;
use distlock_postgres::PostgresStore;
use distlock_testkit::servers::Postgres;

async fn connect() -> Client {
    let url = format!("{}?mode=lease", Postgres::shared().url());
    let store = PostgresStore::connect(&url)
        .await
        .expect("connect to the test's PostgreSQL");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);

/// The first grants on a new database, many at once, start the first epoch
/// without taking it for a reset (which would refuse leases for a while):
/// a second caller that comes between the first's epoch commit and its
/// move of the sequence waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_first_grants_at_once_are_not_a_reset() {
    let server = Postgres::start();
    let url = format!("{}?mode=lease", server.url());
    let mut tries = Vec::new();
    for i in 0..16 {
        let url = url.clone();
        tries.push(tokio::spawn(async move {
            let store = PostgresStore::connect(&url).await.expect("connect");
            let session = Client::new(Arc::new(store))
                .session()
                .open()
                .await
                .expect("open");
            let held = session.lock(format!("first/{i}")).try_lock().await;
            held.expect("try").is_some()
        }));
    }
    for (i, granted) in tries.into_iter().enumerate() {
        assert!(
            granted.await.expect("task"),
            "first/{i} was refused on a free key"
        );
    }
    assert_eq!(
        server.psql("SELECT reset_at IS NULL FROM distlock_epoch"),
        "t",
        "a new database's first epoch was taken for a reset"
    );
}
