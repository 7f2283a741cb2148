//! ZooKeeper when things go wrong: a holder's session expiring behind a cut
//! connection, ZooKeeper killed and restarted, and bad URLs.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::{Client, ErrorKind};
use distlock_testkit::proxy::{Fault, Proxy};
use distlock_testkit::restart::tokens_rise_and_the_holder_stays_honest;
use distlock_testkit::servers::ZooKeeper;
use distlock_zookeeper::{lock_dir, ZkStore};
use futures::FutureExt;
use tokio::time::timeout;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(ZkStore::connect(url).await.expect("connect")))
}

/// The nodes left in a lock's queue, seen by a client of its own.
async fn queue(server: &ZooKeeper, chroot: &str, key: &str) -> Vec<String> {
    let zk = zookeeper_client::Client::connect(&format!("{}{chroot}", server.hosts()))
        .await
        .expect("a plain ZooKeeper client");
    match zk.list_children(&lock_dir(key)).await {
        Ok(children) => children,
        Err(zookeeper_client::Error::NoNode) => Vec::new(),
        Err(err) => panic!("list the queue: {err}"),
    }
}

/// Holds `key` from a session of `client`'s with the lease `ttl`.
async fn hold(client: &Client, key: &str, ttl: Duration) -> distlock_core::Guard {
    let holder = client.session().ttl(ttl).open().await.expect("open");
    let held = holder.lock(key).try_lock().await.expect("try");
    held.expect("a free key")
}

/// The nodes in a lock's queue once there are at least `count`.
async fn until_queued(server: &ZooKeeper, chroot: &str, key: &str, count: usize) -> Vec<String> {
    let started = std::time::Instant::now();
    loop {
        let now = queue(server, chroot, key).await;
        if now.len() >= count {
            return now;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_session_expires_is_told_and_exactly_one_waiter_takes_over() {
    let server = ZooKeeper::shared();
    let chroot = "/faults-expiry";
    let key = "faults/expiry";
    // The holder reaches ZooKeeper through a proxy that can cut it off.
    let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let cut_off = client(&format!("zk://127.0.0.1:{}{chroot}", proxy.port())).await;
    let direct = client(&format!("{}{chroot}", server.url())).await;
    let holder = cut_off
        .session()
        .ttl(Duration::from_secs(2))
        .open()
        .await
        .expect("open");
    let held = holder
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let session = direct.session().open().await.expect("open");
        waiters.push(tokio::spawn(async move {
            let guard = session.lock(key).wait(Duration::from_secs(60)).await;
            (session, guard)
        }));
        // In this order in the queue.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        queue(server, chroot, key).await.len(),
        4,
        "holder and 3 waiters"
    );
    // Cut the holder off: its session expires at ZooKeeper.
    proxy.set(Fault::Blackhole);
    timeout(Duration::from_secs(30), held.lost())
        .await
        .expect("the holder is told it lost the lock");
    assert!(!held.is_held());
    let first = waiters.remove(0);
    let (first_session, first_guard) = timeout(Duration::from_secs(30), first)
        .await
        .expect("the first waiter takes over")
        .expect("task");
    let first_guard = first_guard.expect("granted");
    assert!(first_guard.token() > held.token());
    // The others still wait: one holder only.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        waiters.iter().all(|waiter| !waiter.is_finished()),
        "two holders"
    );
    // The cut heals: the old holder's session is gone, and it says so.
    proxy.set(Fault::None);
    assert!(held.lost().now_or_never().is_some());
    let err = held
        .release()
        .await
        .expect_err("the lost lock cannot be released");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    // The rest take their turns, and nothing stale is left in the queue.
    let mut last = first_guard.token();
    first_guard.release().await.expect("release");
    drop(first_session);
    for waiter in waiters {
        let (session, guard) = timeout(Duration::from_secs(30), waiter)
            .await
            .expect("each waiter gets its turn")
            .expect("task");
        let guard = guard.expect("granted");
        assert!(guard.token() > last);
        last = guard.token();
        guard.release().await.expect("release");
        session.close().await.expect("close");
    }
    assert_eq!(queue(server, chroot, key).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_zookeeper_keeps_tokens_rising_and_the_holder_honest() {
    let server = ZooKeeper::start();
    let client = client(&server.url()).await;
    let server = tokens_rise_and_the_holder_stays_honest(
        &client,
        "faults/restart",
        Duration::from_secs(10),
        server,
        |server| server.crash_and_restart(),
    )
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_an_unreachable_ensemble_and_short_max_sessions_get_clear_errors() {
    for bad in [
        "zk://",
        "zk://host:0",
        "zk://host:99999",
        "zk://a:1,,b:2",
        "zk://a:1/bad//chroot",
        "zk://a:1/bad/../chroot",
        "zk://a:1/zookeeper/quota",
        "http://x:1",
    ] {
        let err = ZkStore::connect(bad).await.expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::Config, "{bad}: {err}");
    }
    let started = tokio::time::Instant::now();
    let dead = distlock_testkit::daemon::free_port();
    let err = ZkStore::connect(&format!("zk://127.0.0.1:{dead}"))
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{dead}")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // A port that is not ZooKeeper.
    let other = distlock_testkit::daemon::not_a_store().await;
    let err = ZkStore::connect(&format!("zk://127.0.0.1:{other}"))
        .await
        .expect_err("not ZooKeeper");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    // A TTL above what the server grants is refused, not silently cut.
    let client = client(&ZooKeeper::shared().url()).await;
    let err = client
        .session()
        .ttl(Duration::from_secs(600))
        .open()
        .await
        .expect_err("above maxSessionTimeout");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("maxSessionTimeout"), "{err}");
    // ZooKeeper counts in whole milliseconds: a TTL that the longest
    // session (the test server's is 120 s) misses by one is taken.
    let session = client
        .session()
        .ttl(Duration::from_millis(120_001))
        .open()
        .await
        .expect("a millisecond above maxSessionTimeout");
    session.close().await.expect("close");
}

/// A waiter whose queue node is deleted from outside (by hand, or a tool)
/// is told so by an error of the store that says what happened, not that
/// its session is lost; the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_node_is_deleted_from_outside_is_told_so() {
    let server = ZooKeeper::shared();
    let chroot = "/faults-deleted";
    let key = "faults/deleted";
    let client = client(&format!("{}{chroot}", server.url())).await;
    let held = hold(&client, key, distlock_core::DEFAULT_TTL).await;
    let holders = queue(server, chroot, key).await;
    let session = client.session().open().await.expect("open");
    let waiting = tokio::spawn(async move {
        let waited = session.lock(key).wait(Duration::from_secs(60)).await;
        (session, waited.map(|guard| guard.token()))
    });
    let queued = until_queued(server, chroot, key, 2).await;
    let waiter = queued
        .iter()
        .find(|node| !holders.contains(node))
        .expect("the waiter's node");
    let plain = zookeeper_client::Client::connect(&format!("{}{chroot}", server.hosts()))
        .await
        .expect("a plain ZooKeeper client");
    plain
        .delete(&format!("{}/{waiter}", lock_dir(key)), None)
        .await
        .expect("delete the waiter's node");
    // The waiter looks at its queue again when the holder goes.
    held.release().await.expect("release");
    let (session, waited) = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter was not told")
        .expect("task");
    let err = waited.expect_err("granted without a node");
    assert_eq!(err.kind(), ErrorKind::Store, "{err}");
    assert!(err.to_string().contains("deleted from outside"), "{err}");
    let again = session
        .lock(key)
        .try_lock()
        .await
        .expect("the session goes on");
    again.expect("a free key").release().await.expect("release");
}

/// A session frozen by the test hook takes its waiting acquire's node out
/// of the queue before it lets go of its client: the waiter behind it is
/// granted when the holder goes, not when the frozen session expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_session_leaves_its_queue_before_it_goes_silent() {
    let server = ZooKeeper::shared();
    let key = "faults/frozen-waiter";
    let client = client(&format!("{}/faults-frozen", server.url())).await;
    let ttl = Duration::from_secs(30);
    let held = hold(&client, key, ttl).await;
    let frozen = client.session().ttl(ttl).open().await.expect("open");
    let behind = client.session().ttl(ttl).open().await.expect("open");
    let frozen_wait = {
        let frozen = frozen.clone();
        tokio::spawn(async move {
            frozen
                .lock(key)
                .wait(Duration::from_secs(60))
                .await
                .map(|_| ())
        })
    };
    // In this order in the queue.
    until_queued(server, "/faults-frozen", key, 2).await;
    let waiting = tokio::spawn(async move { behind.lock(key).wait(Duration::from_secs(60)).await });
    until_queued(server, "/faults-frozen", key, 3).await;
    frozen.freeze_for_test();
    timeout(Duration::from_secs(10), frozen_wait)
        .await
        .expect("the frozen session's acquire did not end")
        .expect("task")
        .expect_err("a frozen session was granted");
    held.release().await.expect("release");
    let granted = timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the frozen session's node blocked the queue")
        .expect("task");
    granted.expect("wait").release().await.expect("release");
}

/// Closing a session whose ZooKeeper session already expired (its
/// connection was cut past its timeout) is no error: nothing is left to
/// close. Closing one while ZooKeeper cannot be reached at all gives up
/// after a few tries, with an error, instead of trying for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_an_expired_session_is_fine_and_an_unreachable_one_gives_up() {
    use distlock_core::store::{LockStore, SessionOptions};

    let server = ZooKeeper::shared();
    let options = SessionOptions::new(Duration::from_secs(1), Duration::ZERO);
    let mut sessions = Vec::new();
    let mut proxies = Vec::new();
    for _ in 0..2 {
        let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await;
        let store = ZkStore::connect(&format!("zk://127.0.0.1:{}/faults-close", proxy.port()))
            .await
            .expect("connect");
        sessions.push(store.open_session(&options).await.expect("open"));
        proxies.push(proxy);
    }
    for proxy in &proxies {
        proxy.set(Fault::Blackhole);
    }
    let unreachable = sessions.pop().expect("two");
    let giving_up = tokio::spawn(async move { unreachable.close().await });
    // Past the session's timeout: ZooKeeper expires it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxies[0].set(Fault::None);
    timeout(Duration::from_secs(30), sessions[0].close())
        .await
        .expect("the close of an expired session answers")
        .expect("closing an expired session");
    let err = timeout(Duration::from_secs(60), giving_up)
        .await
        .expect("the close of an unreachable session gave up")
        .expect("task")
        .expect_err("closed without ZooKeeper");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

/// A waiter whose connection is cut for less than its session's timeout
/// keeps its place and waits on, though a read fails during the cut:
/// ZooKeeper keeps the session and its node, and the client connects
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_rides_out_a_cut_shorter_than_its_session() {
    let server = ZooKeeper::shared();
    let chroot = "/faults-ride-out";
    let key = "faults/ride-out";
    let direct = client(&format!("{}{chroot}", server.url())).await;
    let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let cut_off = client(&format!("zk://127.0.0.1:{}{chroot}", proxy.port())).await;
    let ttl = Duration::from_secs(30);
    let held = hold(&direct, key, ttl).await;
    let waiter = cut_off.session().ttl(ttl).open().await.expect("open");
    let waiting = tokio::spawn(async move {
        let guard = waiter.lock(key).wait(Duration::from_secs(60)).await;
        (waiter, guard)
    });
    until_queued(server, chroot, key, 2).await;
    // The connection is dropped, and for twelve seconds no new one
    // carries anything: longer than a watch slice and a call's timeout
    // (5 s each), so the waiter reads its queue during the cut, and that
    // read fails.
    proxy.set(Fault::Blackhole);
    proxy.reset();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(!waiting.is_finished(), "the wait ended on the cut");
    proxy.set(Fault::None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "the wait ended after the cut");
    held.release().await.expect("release");
    let (waiter, guard) = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter was not granted")
        .expect("task");
    guard
        .expect("granted after the cut")
        .release()
        .await
        .expect("release");
    waiter.close().await.expect("close");
}

/// The client `status` reads with is made again once its session has
/// ended: after a cut longer than that session, `status` works again
/// once the connection heals, rather than failing as lost for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_works_again_after_its_readers_session_expired() {
    use distlock_core::status::StatusQuery;

    let server = ZooKeeper::shared();
    let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let client = client(&format!("zk://127.0.0.1:{}/faults-reader", proxy.port())).await;
    let query = StatusQuery::Key("faults/reader".to_owned());
    client.status(&query).await.expect("status");
    proxy.set(Fault::Blackhole);
    // Past the reader's session timeout (5 s): ZooKeeper expires it.
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.set(Fault::None);
    // Time for the old client to connect again and learn that its session
    // is gone (calls before that may still go to it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = std::time::Instant::now();
    while let Err(err) = client.status(&query).await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "status still fails after the cut healed: {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
