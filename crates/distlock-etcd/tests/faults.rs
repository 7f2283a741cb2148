//! etcd when things go wrong: a waiter's lease revoked while it waits (etcd
//! issue 11456), a waiter's key deleted with the holder's, a queue key left
//! behind, a release left unanswered, etcd killed and restarted, and bad
//! URLs.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::{Client, ErrorKind, Guard, Session};
use distlock_etcd::EtcdStore;
use distlock_testkit::proxy::{Fault, Proxy};
use distlock_testkit::restart::tokens_rise_and_the_holder_stays_honest;
use distlock_testkit::servers::Etcd;
use etcd_client::KeyValue;
use tokio::task::JoinHandle;
use tokio::time::timeout;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(EtcdStore::connect(url).await.expect("connect")))
}

/// A plain etcd client on the test's etcd, and the queue of lock `escaped`
/// (its name as the store writes it in keys) as it reads now.
async fn queue_of(server: &Etcd, escaped: &str) -> (etcd_client::Client, Vec<KeyValue>) {
    let mut etcd =
        etcd_client::Client::connect([format!("http://127.0.0.1:{}", server.port())], None)
            .await
            .expect("etcd");
    let queue = etcd
        .get(
            format!("distlock/{escaped}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("queue");
    (etcd, queue.kvs().to_vec())
}

/// `session`'s hold of lock `key`, which must be free.
async fn held(session: &Session, key: &str) -> Guard {
    session
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free")
}

/// A new session of `client` waiting for lock `key` (30 s at most), in a
/// task: the token it is granted, or why not.
async fn waiter(client: &Client, key: &'static str) -> JoinHandle<distlock_core::Result<u64>> {
    let session = client.session().open().await.expect("open");
    tokio::spawn(async move {
        let result = session.lock(key).wait(Duration::from_secs(30)).await;
        result.map(|guard| guard.token())
    })
}

/// The waiter's end: told its session is lost, never that it holds.
async fn told_lost(waiting: JoinHandle<distlock_core::Result<u64>>, why: &str) {
    let outcome = timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter ends")
        .expect("waiter task");
    let err = outcome.expect_err(why);
    assert_eq!(err.kind(), ErrorKind::Lost, "{err}");
}

/// Waits, `within` at most, until the queue of lock `escaped` has `keys`
/// keys.
async fn until_queue_has(server: &Etcd, escaped: &str, keys: usize, within: Duration) {
    let polled = async {
        while queue_of(server, escaped).await.1.len() != keys {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    timeout(within, polled)
        .await
        .unwrap_or_else(|_| panic!("the queue of {escaped} never had {keys} keys"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_lease_is_revoked_is_never_told_it_holds_the_lock() {
    let server = Etcd::shared();
    let client = client(&server.url()).await;
    let key = "faults/11456";
    let holder = client.session().open().await.expect("open");
    let hold = held(&holder, key).await;
    let waiting = waiter(&client, key).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Revoke the waiter's lease behind its back: its queue key names it.
    let (mut etcd, queue) = queue_of(server, "faults%2F11456").await;
    assert_eq!(queue.len(), 2, "holder and waiter are queued");
    let waiter_lease = queue[1].lease();
    etcd.lease_revoke(waiter_lease).await.expect("revoke");
    hold.release().await.expect("release");
    told_lost(waiting, "a waiter without a lease must not get the lock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_key_left_behind_is_never_taken_for_a_new_attempt() {
    // A session uses the same few queue keys for all its attempts. A key
    // left in place (here put back by hand, as a clean-up that gave up
    // would leave it) has an old create revision: taken again, it would
    // jump the queue and repeat a token.
    let server = Etcd::shared();
    let client = client(&server.url()).await;
    let key = "faults/left-behind";
    let session = client.session().open().await.expect("open");
    let first = held(&session, key).await;
    let first_token = first.token();
    let (mut etcd, queue) = queue_of(server, "faults%2Fleft-behind").await;
    assert_eq!(queue.len(), 1, "the holder's key is queued");
    let (left, lease) = (queue[0].key().to_vec(), queue[0].lease());
    first.release().await.expect("release");
    let put = etcd_client::PutOptions::new().with_lease(lease);
    let stray = etcd
        .put(left.clone(), "x", Some(put))
        .await
        .expect("put back");
    let stray_revision = stray.header().expect("header").revision();

    // Within less than a watch slice (5 s): the stray key is taken out, not
    // waited for.
    let second = timeout(
        Duration::from_secs(4),
        session.lock(key).wait(Duration::from_secs(3)),
    )
    .await
    .expect("the attempt ends")
    .expect("the stray key is taken out, and the lock taken");
    assert!(
        second.token() > u64::try_from(stray_revision).expect("revision"),
        "token {} does not come after the stray key's revision {stray_revision} (first token {first_token})",
        second.token()
    );
    // The slot's key may be there again, as the new attempt's: not the
    // stray life of it.
    let still = etcd.get(left, None).await.expect("read");
    assert!(
        still
            .kvs()
            .iter()
            .all(|kv| kv.create_revision() != stray_revision),
        "the stray key was taken out"
    );
    second.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_key_goes_with_the_holders_is_never_told_it_holds_the_lock() {
    // The holder's key sorts before the waiter's, and one delete takes
    // both: etcd reports that revision's events in key order, the
    // holder's first. The waiter's key went too, so it holds nothing.
    let server = Etcd::shared();
    let client = client(&server.url()).await;
    let key = "faults/same-revision";
    let prefix = "distlock/faults%2Fsame-revision/";
    let (mut etcd, _) = queue_of(server, "faults%2Fsame-revision").await;
    etcd.put(format!("{prefix}0000000000000001-0"), "x", None)
        .await
        .expect("a holder put by hand");
    let waiting = waiter(&client, key).await;
    until_queue_has(server, "faults%2Fsame-revision", 2, Duration::from_secs(10)).await;
    // The waiter's watch is on by now or soon: either way it must not be
    // told it holds.
    tokio::time::sleep(Duration::from_millis(200)).await;
    etcd.delete(
        prefix,
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .expect("delete both");
    told_lost(waiting, "a waiter whose key is gone must not get the lock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_left_unanswered_never_meets_a_later_hold() {
    // A release is a delete by name. One whose answer never came may land
    // late, so the session never puts that key again: its next hold of the
    // lock is on another key. (This checks that mechanism; the late
    // delete itself cannot be held back here while the session goes on.)
    let server = Etcd::shared();
    let proxy = Proxy::start(([127, 0, 0, 1], server.port()).into()).await;
    let client = client(&format!("etcd://127.0.0.1:{}", proxy.port())).await;
    let key = "faults/unanswered";
    let escaped = "faults%2Funanswered";
    let session = client.session().open().await.expect("open");
    let first = held(&session, key).await;
    let (_, queue) = queue_of(server, escaped).await;
    assert_eq!(queue.len(), 1, "the holder's key is queued");
    let old = queue[0].key().to_vec();
    proxy.set(Fault::Blackhole);
    // Dropped unanswered; the guard's drop sends the release again.
    let release = timeout(Duration::from_millis(300), first.release()).await;
    assert!(
        release.is_err(),
        "the release cannot be answered: {release:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Fault::None);
    // The old key is taken out.
    until_queue_has(server, escaped, 0, Duration::from_secs(20)).await;
    // The session's own release, sent again by the guard's drop, may still
    // be on its way back: wait for it.
    let second = session
        .lock(key)
        .wait(Duration::from_secs(10))
        .await
        .expect("free again");
    let (_, queue) = queue_of(server, escaped).await;
    assert_eq!(queue.len(), 1, "the new hold's key is queued");
    assert_ne!(
        queue[0].key(),
        old.as_slice(),
        "the old key is not put again"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, still) = queue_of(server, escaped).await;
    assert_eq!(still.len(), 1, "the new hold's key stays");
    second.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_etcd_keeps_tokens_rising_and_the_holder_honest() {
    let server = Etcd::start();
    let client = client(&server.url()).await;
    let server = tokens_rise_and_the_holder_stays_honest(
        &client,
        "faults/restart",
        Duration::from_secs(5),
        server,
        |server| server.crash_and_restart(),
    )
    .await;
    drop(server);
}

/// A waiter rides out etcd killed and started again under it: its watch
/// ends, its reads fail while etcd is down, and it goes on waiting, to
/// its grant once the holder lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_rides_out_a_restart_of_etcd() {
    let server = Etcd::start();
    let client = client(&server.url()).await;
    let key = "faults/ride-out";
    let holder = client.session().open().await.expect("open");
    let hold = held(&holder, key).await;
    let waiting = waiter(&client, key).await;
    until_queue_has(&server, "faults%2Fride-out", 2, Duration::from_secs(10)).await;
    // Down long enough for the waiter's reads to fail: refused, and
    // (in most runs) one cut on its way.
    let server =
        tokio::task::spawn_blocking(move || server.crash_and_restart_after(Duration::from_secs(1)))
            .await
            .expect("restart");
    // Should this fail, the core goes on releasing in the background.
    let token = hold.token();
    let _ = hold.release().await;
    let granted = timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter ends")
        .expect("waiter task")
        .expect("the waiter rode out the restart");
    assert!(granted > token, "{granted} after {token}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_an_unreachable_cluster_get_clear_errors_in_bounded_time() {
    for bad in [
        "etcd://",
        "etcd://host",
        "etcd://host:99999",
        "etcd://a:1,,b:2",
        "http://x:1",
    ] {
        let err = EtcdStore::connect(bad).await.expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::Config, "{bad}: {err}");
    }
    let started = tokio::time::Instant::now();
    let dead = distlock_testkit::daemon::free_port();
    let err = EtcdStore::connect(&format!("etcd://127.0.0.1:{dead}"))
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
}
