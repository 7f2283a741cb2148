//! The conformance suite against a real MariaDB, lease-table mode.

use std::sync::Arc;

use distlock_core::Client;
use distlock_mysql::MysqlStore;
use distlock_testkit::servers::Mariadb;

async fn connect() -> Client {
    let url = format!("{}?mode=lease", Mariadb::shared().url());
    let store = MysqlStore::connect(&url)
        .await
        .expect("connect to the test's MariaDB");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
