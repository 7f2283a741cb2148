//! Unit tests of the named-lock session: lock names, and tokens from the
//! per-key table (MySQL's and Galera's way) on the test's MariaDB.

use std::time::Duration;

use distlock_core::store::{AcquireRequest, HeldLock, Mode, StoreSession};
use mysql_async::prelude::Queryable;

use super::{lock_name, NamedSession, MAX_NAME};
use crate::tokens::Run;

#[test]
fn short_printable_keys_are_their_own_names_and_the_rest_are_hashed() {
    assert_eq!(lock_name("job"), "dl:job");
    let longest = "k".repeat(MAX_NAME - 3);
    assert_eq!(lock_name(&longest), format!("dl:{longest}"));
    let over = "k".repeat(MAX_NAME - 2);
    assert!(lock_name(&over).starts_with("dl#"), "{}", lock_name(&over));
    assert_ne!(lock_name(&over), lock_name(&"j".repeat(MAX_NAME - 2)));
    assert_eq!(lock_name(&over), lock_name(&over), "the same key, one name");
    // The hash, and as much of the key's head as fits.
    assert_eq!(lock_name(&"k".repeat(1024)).len(), MAX_NAME);
    assert!(lock_name("café").starts_with("dl#"));
}

/// A MariaDB of the test's own, with distlock's tables made; its URL.
pub(crate) async fn private_server() -> (distlock_testkit::servers::Mariadb, String) {
    let server = distlock_testkit::servers::Mariadb::start();
    let url = server.url();
    crate::MysqlStore::connect(&url)
        .await
        .expect("connect, making the tables");
    (server, url)
}

/// A named session on a connection of its own, drawing tokens in `run`
/// (`None`: from the per-key table).
pub(crate) async fn session(url: &str, run: Option<Run>) -> NamedSession {
    let opts = mysql_async::Opts::from_url(url).expect("url");
    let conn = mysql_async::Conn::new(opts.clone()).await.expect("connect");
    NamedSession::open(
        conn,
        mysql_async::Pool::new(opts),
        "test".to_owned(),
        run,
        Duration::from_secs(5),
    )
    .await
    .expect("open")
}

/// Tokens from the per-key table (MySQL's and Galera's way), on the
/// test's MariaDB: a free key is granted with a token above the last,
/// a held one is not; a grant whose token cannot be drawn fails and
/// gives the lock back. On a server of its own: its token table is
/// dropped.
#[tokio::test]
async fn table_tokens_rise_and_a_failed_draw_gives_the_lock_back() {
    let (_server, url) = private_server().await;
    let (first, second) = (session(&url, None).await, session(&url, None).await);
    let key = "table-tokens";
    let request = AcquireRequest::new(key, Mode::Exclusive);
    let one = first.acquire(&request).await.expect("try").expect("free");
    assert!(
        second.acquire(&request).await.expect("try").is_none(),
        "held"
    );
    let held = HeldLock {
        key: key.to_owned(),
        mode: Mode::Exclusive,
        token: one.token,
    };
    first.release(&held).await.expect("release");
    let two = second.acquire(&request).await.expect("try").expect("free");
    assert!(two.token > one.token, "{} after {}", two.token, one.token);
    let held = HeldLock {
        key: key.to_owned(),
        mode: Mode::Exclusive,
        token: two.token,
    };
    second.release(&held).await.expect("release");
    let opts = mysql_async::Opts::from_url(&url).expect("url");
    let mut conn = mysql_async::Conn::new(opts).await.expect("connect");
    conn.query_drop("DROP TABLE distlock_tokens")
        .await
        .expect("drop");
    assert!(first.acquire(&request).await.is_err(), "no token, no grant");
    let owner: Option<Option<i64>> = conn
        .exec_first("SELECT IS_USED_LOCK(?)", (lock_name(key),))
        .await
        .expect("read");
    assert_eq!(owner, Some(None), "the lock was given back");
}
