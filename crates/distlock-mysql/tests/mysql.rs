//! The conformance suite against a real MariaDB, named-lock mode.

use std::sync::Arc;

use distlock_core::Client;
use distlock_mysql::MysqlStore;
use distlock_testkit::servers::Mariadb;

async fn connect() -> Client {
    let store = MysqlStore::connect(&Mariadb::shared().url())
        .await
        .expect("connect to the test's MariaDB");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
