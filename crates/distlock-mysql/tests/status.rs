//! `status` on MariaDB where the conformance suite does not reach: named
//! locks (one key by `IS_USED_LOCK`; a prefix only through the
//! `metadata_lock_info` plugin), and a lease table made by an older
//! version.

use std::sync::Arc;

use distlock_core::status::{KeyStatus, StatusQuery};
use distlock_core::{Client, ErrorKind, Mode, Session};
use distlock_mysql::MysqlStore;
use distlock_testkit::servers::Mariadb;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(MysqlStore::connect(url).await.expect("connect")))
}

async fn session(client: &Client, owner: &str) -> Session {
    client.session().owner(owner).open().await.expect("open")
}

async fn key_status(client: &Client, key: &str) -> Option<KeyStatus> {
    let status = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status of one key");
    assert!(status.keys.len() <= 1, "one key asked: {status:?}");
    status.keys.into_iter().next()
}

async fn prefix_keys(client: &Client, prefix: &str) -> Vec<KeyStatus> {
    client
        .status(&StatusQuery::Prefix(prefix.to_owned()))
        .await
        .expect("status by prefix")
        .keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_status_shows_the_holder_of_one_key_and_no_owner() {
    let client = client(&Mariadb::shared().url()).await;
    // A short key is its own lock name; a long one is hashed.
    for key in [
        "status/named/one",
        &format!("status/named/{}", "long".repeat(30)),
    ] {
        let holder = session(&client, "named a").await;
        let other = session(&client, "named b").await;
        let held = holder.lock(key).await.expect("lock");
        let seen = key_status(&client, key).await.expect("held");
        assert_eq!(seen.key, key);
        assert_eq!(seen.holders.len(), 1, "{seen:?}");
        let shown = &seen.holders[0];
        assert!(shown.session.starts_with("connection "), "{shown:?}");
        assert_eq!(shown.mode, Mode::Exclusive);
        assert_eq!(shown.owner, "", "named locks keep no owner");
        assert_eq!((shown.token, shown.lease_left), (None, None));
        held.release().await.expect("release");
        assert_eq!(key_status(&client, key).await, None, "released");

        // Another session's hold shows another connection.
        let again = other.lock(key).await.expect("lock");
        let next = key_status(&client, key).await.expect("held again");
        assert_ne!(next.holders[0].session, shown.session);
        again.release().await.expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_status_by_prefix_needs_the_plugin_and_lists_through_it() {
    let server = Mariadb::start();
    let client = client(&server.url()).await;
    let err = client
        .status(&StatusQuery::Prefix("status/".to_owned()))
        .await
        .expect_err("no plugin, no prefix");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let message = err.to_string();
    assert!(
        message.contains("INSTALL SONAME 'metadata_lock_info'"),
        "{message}"
    );
    assert!(message.contains("mode=lease"), "{message}");

    server.sql("INSTALL SONAME 'metadata_lock_info'");
    let (a, b) = (session(&client, "a").await, session(&client, "b").await);
    let long = format!("status/p/{}", "long".repeat(30));
    let held = [
        a.lock("status/p/one").await.expect("lock"),
        b.lock("status/p/two").await.expect("lock"),
        a.lock("status/q/other").await.expect("lock"),
        b.lock(long.as_str()).await.expect("lock"),
    ];
    let listed = prefix_keys(&client, "status/p/").await;
    let keys: Vec<&str> = listed.iter().map(|k| k.key.as_str()).collect();
    // The long key's hashed name cannot be read back: only asked for.
    assert_eq!(keys, ["status/p/one", "status/p/two"]);
    assert_ne!(listed[0].holders[0].session, listed[1].holders[0].session);
    assert!(key_status(&client, &long).await.is_some());
    for guard in held {
        guard.release().await.expect("release");
    }
    assert!(prefix_keys(&client, "status/").await.is_empty());
}

/// A lease table made by the version before owners: the store adds the
/// columns, honours the old rows and shows them with what they keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_table_of_the_previous_version_gets_the_new_columns() {
    let server = Mariadb::start();
    server.sql(
        "USE distlock_test;
         CREATE TABLE distlock_keys (key_hash BINARY(32) PRIMARY KEY) ENGINE=InnoDB;
         CREATE TABLE distlock_leases (
             key_hash BINARY(32) NOT NULL, holder VARCHAR(64) NOT NULL,
             mode VARCHAR(16) NOT NULL, expires_at DATETIME(6) NOT NULL,
             PRIMARY KEY (key_hash, holder), KEY (holder)) ENGINE=InnoDB;
         INSERT INTO distlock_leases VALUES (UNHEX(SHA2('old/held', 256)), 'oldsession|1', 'x',
             UTC_TIMESTAMP(6) + INTERVAL 1 MINUTE);",
    );
    let client = client(&format!("{}?mode=lease", server.url())).await;
    assert_eq!(
        server.sql(
            "SELECT GROUP_CONCAT(COLUMN_NAME ORDER BY COLUMN_NAME) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = 'distlock_test' AND TABLE_NAME = 'distlock_leases' \
             AND COLUMN_NAME IN ('lock_key', 'owner', 'token', 'granted_at')"
        ),
        "granted_at,lock_key,owner,token"
    );
    let old = key_status(&client, "old/held").await.expect("the old row");
    let holder = &old.holders[0];
    assert_eq!(holder.session, "oldsession");
    assert_eq!(holder.owner, "");
    assert_eq!((holder.token, holder.held_for), (None, None));
    assert!(holder.lease_left.is_some());

    let session = session(&client, "upgraded").await;
    assert!(
        session
            .lock("old/held")
            .try_lock()
            .await
            .expect("try")
            .is_none(),
        "the old hold still counts"
    );
    let guard = session.write("new/held").await.expect("lock");
    // The old row keeps no key: only asked for by name is it found.
    let listed = prefix_keys(&client, "").await;
    let keys: Vec<&str> = listed.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["new/held"]);
    let new = &listed[0].holders[0];
    assert_eq!(new.owner, "upgraded");
    assert_eq!(new.token, Some(guard.token()));
    assert!(new.held_for.is_some());
    guard.release().await.expect("release");

    // Connecting again finds the columns there.
    MysqlStore::connect(&format!("{}?mode=lease", server.url()))
        .await
        .expect("connect again");
}
