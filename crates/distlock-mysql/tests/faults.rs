//! MySQL/MariaDB when things go wrong: a holder's connection killed, the
//! server crashed and restarted, and bad URLs.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::{Client, ErrorKind};
use distlock_mysql::MysqlStore;
use distlock_testkit::proxy::{Fault, Proxy};
use distlock_testkit::restart::{assert_rising, take_in_turn, take_once};
use distlock_testkit::servers::mysql::{Mariadb, DATABASE, PASSWORD, USER};
use tokio::time::timeout;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(MysqlStore::connect(url).await.expect("connect")))
}

/// A proxy in front of `server`, and the store's URL through it, with
/// `query` (e.g. `?mode=lease`).
async fn proxied(server: &Mariadb, query: &str) -> (Proxy, String) {
    let target = format!("127.0.0.1:{}", server.port());
    let proxy = Proxy::start(target.parse().expect("addr")).await;
    let port = proxy.port();
    let url = format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}{query}");
    (proxy, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holders_connection_fires_lost_and_frees_the_lock_for_the_waiter() {
    let server = Mariadb::shared();
    let client = client(&server.url()).await;
    let key = "faults/kill";
    let holder = client
        .session()
        .ttl(Duration::from_secs(3))
        .open()
        .await
        .expect("open");
    let guard = holder
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiter = client.session().open().await.expect("open");
    let waiting = tokio::spawn(async move {
        let guard = waiter
            .lock(key)
            .wait(Duration::from_secs(60))
            .await
            .expect("the waiter gets the lock");
        guard.token()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let owner = server.sql(&format!("SELECT IS_USED_LOCK('dl:{key}')"));
    assert_ne!(owner, "NULL", "the lock is held");
    server.sql(&format!("KILL CONNECTION {owner}"));
    timeout(Duration::from_secs(20), guard.lost())
        .await
        .expect("lost() fires after the connection is killed");
    let next = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter is granted")
        .expect("waiter task");
    assert!(next > guard.token());
}

/// Takes `key` three times in a row, each by a new session of `url`'s
/// store, and adds the tokens to `tokens`.
async fn take_three(url: &str, key: &str, tokens: &mut Vec<u64>) {
    tokens.extend(take_in_turn(&client(url).await, key, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_across_holders_modes_and_a_crash_of_the_server() {
    let server = Mariadb::start();
    let (url, lease) = (server.url(), format!("{}?mode=lease", server.url()));
    let mut tokens = Vec::new();
    for url in [&url, &lease, &url] {
        take_three(url, "faults/tokens", &mut tokens).await;
    }
    let server = server.crash_and_restart();
    for url in [server.url(), format!("{}?mode=lease", server.url())] {
        take_three(&url, "faults/tokens", &mut tokens).await;
    }
    assert_rising(&tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tokens_rise_across_a_crash_right_after_a_grant() {
    // Named grants only, and the crash at once. The server's counter
    // starts above its old values after a restart anyway (its start time
    // is in it): the epoch must be what rises.
    let server = Mariadb::start();
    let mut tokens = Vec::new();
    take_three(&server.url(), "faults/crash", &mut tokens).await;
    let server = server.crash_and_restart();
    take_three(&server.url(), "faults/crash", &mut tokens).await;
    assert_rising(&tokens);
    assert!(
        tokens[3] >> 40 > tokens[2] >> 40,
        "a new epoch: {tokens:x?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_run_gives_way_to_the_next_in_both_modes() {
    let server = Mariadb::start();
    let (url, lease) = (server.url(), format!("{}?mode=lease", server.url()));
    let mut tokens = Vec::new();
    take_three(&url, "faults/spent", &mut tokens).await;
    // The run as if 2^40 - 2^30 draws had been made since it began: the
    // next draw lies past its end.
    server.sql(&format!(
        "UPDATE {DATABASE}.distlock_runs SET base = base - 1098437885952"
    ));
    take_three(&lease, "faults/spent", &mut tokens).await;
    // New sessions, which find the run the lease grants began.
    take_three(&url, "faults/spent", &mut tokens).await;
    assert_rising(&tokens);
    assert!(tokens[3] >> 40 > tokens[2] >> 40, "a new run: {tokens:x?}");
    assert_eq!(tokens[8] >> 40, tokens[3] >> 40, "one new run: {tokens:x?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_id_changed_while_the_server_runs_keeps_its_run() {
    // A session opened after the change draws in the run older ones do.
    let server = Mariadb::start();
    let client = client(&server.url()).await;
    let before = client.session().open().await.expect("open");
    server.sql("SET GLOBAL server_id = 7");
    let after = client.session().open().await.expect("open");
    let mut tokens = Vec::new();
    for session in [&after, &before, &after] {
        tokens.push(take_once(session, "faults/server-id").await);
    }
    assert_rising(&tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_url_names_the_same_store() {
    let url = Mariadb::shared()
        .url()
        .replacen("mysql://", "mariadb://", 1);
    assert!(url.starts_with("mariadb://"), "{url}");
    let session = client(&url).await.session().open().await.expect("open");
    let guard = session.lock("mariadb-scheme").await.expect("lock");
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_within_the_connect_timeout() {
    let server = Mariadb::shared();
    let port = server.port();
    let started = tokio::time::Instant::now();

    let wrong = format!("mysql://{USER}:guess@127.0.0.1:{port}/{DATABASE}");
    refused_saying(&wrong, &["password"]).await;

    let missing = format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{port}/nowhere");
    refused_saying(&missing, &["nowhere"]).await;

    // A port that speaks something else.
    let other = distlock_testkit::daemon::not_a_store().await;
    let err = MysqlStore::connect(&format!("mysql://u:p@127.0.0.1:{other}/db"))
        .await
        .expect_err("not MySQL");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    let dead = distlock_testkit::daemon::free_port();
    let err = MysqlStore::connect(&format!("mysql://u:p@127.0.0.1:{dead}/db"))
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("cannot reach MySQL"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    let err = MysqlStore::connect(&format!("{}?mode=sideways", server.url()))
        .await
        .expect_err("unknown mode");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");

    // The longest keys a lock may have work, in both modes, and so do keys
    // with characters MySQL refuses in lock names (hashed for named locks).
    for url in [server.url(), format!("{}?mode=lease", server.url())] {
        let client = client(&url).await;
        let session = client.session().open().await.expect("open");
        let longest = "ü".repeat(distlock_core::MAX_KEY_BYTES / 2);
        let guard = session
            .lock(&longest)
            .try_lock()
            .await
            .expect("try")
            .expect("free");
        let other = client.session().open().await.expect("open");
        assert!(other
            .lock(&longest)
            .try_lock()
            .await
            .expect("try")
            .is_none());
        guard.release().await.expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_row_locked_by_a_stray_transaction_is_busy_not_an_error() {
    use mysql_async::prelude::Queryable;
    let url = format!("{}?mode=lease", Mariadb::shared().url());
    let client = client(&url).await;
    let key = "faults/stray-row-lock";
    // Makes the key's row, as a first acquire does.
    let session = client.session().open().await.expect("open");
    let guard = session.lock(key).await.expect("free");
    guard.release().await.expect("release");
    // A client that locked the row and went quiet mid-transaction.
    let mut stray = mysql_async::Conn::from_url(Mariadb::shared().url())
        .await
        .expect("a plain connection");
    stray.query_drop("BEGIN").await.expect("begin");
    stray
        .exec_drop(
            "SELECT key_hash FROM distlock_keys WHERE key_hash = UNHEX(SHA2(?, 256)) FOR UPDATE",
            (key,),
        )
        .await
        .expect("lock the row");
    // Busy once the store's row lock wait (a second) runs out, not
    // InnoDB's default fifty.
    let attempt = timeout(Duration::from_secs(10), session.lock(key).try_lock())
        .await
        .expect("a stray row lock holds a try_lock up for about a second");
    assert!(
        matches!(attempt, Ok(None)),
        "a row lock wait timeout counts as busy, got {attempt:?}"
    );
    stray.query_drop("ROLLBACK").await.expect("rollback");
    let guard = session.lock(key).try_lock().await.expect("try");
    assert!(
        guard.is_some(),
        "free again once the stray transaction ends"
    );
}

/// A lease acquire whose connection breaks while its `CALL` still runs at
/// the server (here: waiting for the key's row) leaves no hold behind once
/// that `CALL` can no longer commit: it may commit one after the acquire's
/// first give-back, and the second takes it away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_acquire_cut_off_mid_call_leaves_no_hold() {
    use mysql_async::prelude::Queryable;

    let server = Mariadb::shared();
    let (proxy, via_proxy) = proxied(server, "?mode=lease").await;
    let client = client(&via_proxy).await;
    let key = format!("faults/cut-mid-call-{:x}", rand::random::<u64>());
    // A transaction that holds the key's row, so the CALL waits for it.
    let direct = mysql_async::Opts::from_url(&server.url()).expect("url");
    let mut blocker = mysql_async::Conn::new(direct.clone())
        .await
        .expect("connect");
    blocker
        .query_drop("START TRANSACTION")
        .await
        .expect("begin");
    blocker
        .exec_drop(
            "INSERT INTO distlock_keys (key_hash) VALUES (UNHEX(SHA2(?, 256)))
             ON DUPLICATE KEY UPDATE key_hash = key_hash",
            (&key,),
        )
        .await
        .expect("lock the key's row");
    let session = client.session().ttl(Duration::from_secs(30)).open().await;
    let session = session.expect("open");
    let acquire = tokio::spawn({
        let key = key.clone();
        async move { session.lock(&key).try_lock().await.map(|g| g.is_some()) }
    });
    // Cut once the CALL waits for the row.
    let mut watcher = mysql_async::Conn::new(direct.clone())
        .await
        .expect("connect");
    let waiting = async {
        loop {
            let waits: Option<u64> = watcher
                .query_first(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                     WHERE ID <> CONNECTION_ID() AND COMMAND <> 'Sleep' \
                     AND (INFO LIKE '%distlock_lease_acquire%' OR INFO LIKE '%distlock_keys%')",
                )
                .await
                .expect("read");
            if waits.unwrap_or(0) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the CALL waits");
    proxy.reset();
    let cut = timeout(Duration::from_secs(5), acquire).await;
    assert!(
        cut.expect("answered").expect("task").is_err(),
        "not cut off"
    );
    // After the acquire's first give-back, but within the CALL's 1 s wait:
    // the CALL goes on, and commits its hold. (Later, or on a slow machine,
    // the test proves less, and still passes.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.query_drop("COMMIT").await.expect("commit");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let left: Option<u64> = watcher
        .exec_first(
            "SELECT COUNT(*) FROM distlock_leases WHERE key_hash = UNHEX(SHA2(?, 256))",
            (&key,),
        )
        .await
        .expect("count");
    assert_eq!(left, Some(0), "a hold was left behind");
}

/// Connecting to `url` is refused as a setting to fix, saying each of
/// `says`.
async fn refused_saying(url: &str, says: &[&str]) {
    let err = MysqlStore::connect(url).await.expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    for said in says {
        assert!(err.to_string().contains(said), "{err}");
    }
}

/// A user who lacks a privilege lease mode needs is told which to grant:
/// access to the database, `CREATE ROUTINE` while the procedure is
/// missing (or a first connect by a user who may), `EXECUTE` to run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_without_routine_privileges_says_what_to_grant() {
    let server = Mariadb::shared();
    let port = server.port();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .subsec_nanos();
    let (database, user) = (format!("limited_{nanos}"), format!("limited_{nanos}"));
    server.sql(&format!(
        "CREATE DATABASE {database}; \
         CREATE USER '{user}'@'%' IDENTIFIED BY 'limited'; \
         GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, EXECUTE \
         ON {database}.* TO '{user}'@'%'"
    ));
    let limited = format!("mysql://{user}:limited@127.0.0.1:{port}/{database}?mode=lease");
    refused_saying(&limited, &["CREATE ROUTINE", "EXECUTE"]).await;

    // A good login to a database it may not use.
    let elsewhere = format!("mysql://{user}:limited@127.0.0.1:{port}/{DATABASE}");
    refused_saying(&elsewhere, &["grant the user access"]).await;

    let able = format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{port}/{database}?mode=lease");
    MysqlStore::connect(&able)
        .await
        .expect("a user who may makes it");
    let granted = client(&limited).await;
    let session = granted.session().open().await.expect("open");
    let guard = session
        .lock("limited")
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    guard.release().await.expect("release");
    session.close().await.expect("close");

    // With no routine privilege the procedure cannot be seen: connecting
    // says to grant EXECUTE (a new client: a connection keeps the
    // database-level grants it had).
    server.sql(&format!("REVOKE EXECUTE ON {database}.* FROM '{user}'@'%'"));
    refused_saying(&limited, &["EXECUTE"]).await;
    // One who may create routines but not run them connects, and its
    // acquire is refused, saying to grant EXECUTE.
    server.sql(&format!(
        "GRANT CREATE ROUTINE ON {database}.* TO '{user}'@'%'"
    ));
    let refused = client(&limited).await;
    let session = refused.session().open().await.expect("open");
    let err = session
        .lock("limited")
        .try_lock()
        .await
        .expect_err("the procedure may not be run");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("grant it EXECUTE"), "{err}");
    session.close().await.expect("close");
    drop((granted, refused));
    server.sql(&format!(
        "DROP USER '{user}'@'%'; DROP DATABASE {database};"
    ));
}

/// A store shows where it connects, never the password it connects with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stores_debug_form_names_its_target_not_its_password() {
    let server = Mariadb::shared();
    for url in [server.url(), format!("{}?mode=lease", server.url())] {
        let store = MysqlStore::connect(&url).await.expect("connect");
        let shown = format!("{store:?}");
        let target = format!("127.0.0.1:{}/{DATABASE}", server.port());
        assert!(shown.contains(&target), "{shown}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        let lease = url.ends_with("mode=lease");
        assert!(shown.contains(&format!("lease: {lease}")), "{shown}");
    }
}

/// A holder whose network goes silent (no reset: its host gone) loses its
/// named lock when the server gives up on the connection, 2 s after its
/// lease would end, not after the server's default of 8 hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_silently_frees_its_named_lock_soon_after_its_ttl() {
    let server = Mariadb::shared();
    let (proxy, via_proxy) = proxied(server, "").await;
    let key = format!("faults/silent-{:x}", rand::random::<u64>());
    let holder = client(&via_proxy).await;
    // Pings every 4 s; the server waits 12 + 2 s for the next.
    let session = holder
        .session()
        .ttl(Duration::from_secs(12))
        .open()
        .await
        .expect("open");
    let guard = session
        .lock(&key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiter = client(&server.url()).await;
    let waiting = tokio::spawn({
        let key = key.clone();
        async move {
            let session = waiter.session().open().await.expect("open");
            let guard = session
                .lock(&key)
                .wait(Duration::from_secs(60))
                .await
                .expect("the waiter gets the lock");
            guard.token()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Fault::Blackhole);
    let cut = tokio::time::Instant::now();
    // The server last heard a ping at most 4 s before the cut: it drops the
    // connection 10–14 s after it (with a wait of ttl * 2, 20–24 s).
    let token = timeout(Duration::from_secs(17), waiting)
        .await
        .unwrap_or_else(|_| panic!("not granted {:?} after the cut", cut.elapsed()))
        .expect("waiter task");
    assert!(token > guard.token());
    timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("the cut-off holder knows it lost the lock");
}

/// A connect whose setup waits behind a table lock (a backup's, an
/// `ALTER`'s) for a few seconds still succeeds; one kept waiting 8 s fails,
/// saying the tables stayed locked and where to find the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_waits_out_a_short_table_lock_and_gives_up_on_a_long_one() {
    use mysql_async::prelude::Queryable;

    let server = Mariadb::shared();
    // Its own database: the lock stops no other test.
    let database = format!("locked_{:x}", rand::random::<u32>());
    server.sql(&format!("CREATE DATABASE {database}"));
    let url = format!(
        "mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
        server.port()
    );
    MysqlStore::connect(&url).await.expect("makes the tables");
    let opts = mysql_async::Opts::from_url(&url).expect("url");
    let mut locker = mysql_async::Conn::new(opts).await.expect("connect");

    locker
        .query_drop("LOCK TABLES distlock_tokens WRITE")
        .await
        .expect("lock");
    let unlock = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        locker.query_drop("UNLOCK TABLES").await.expect("unlock");
        locker
    });
    let started = tokio::time::Instant::now();
    MysqlStore::connect(&url)
        .await
        .expect("waits 4 s, then connects");
    assert!(started.elapsed() >= Duration::from_secs(3), "did not wait");
    let mut locker = unlock.await.expect("unlock task");

    locker
        .query_drop("LOCK TABLES distlock_tokens WRITE")
        .await
        .expect("lock");
    let err = MysqlStore::connect(&url)
        .await
        .expect_err("gives up while the table is locked");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("stayed locked"), "{err}");
    locker.query_drop("UNLOCK TABLES").await.expect("unlock");
    drop(locker);
    server.sql(&format!("DROP DATABASE {database}"));
}
