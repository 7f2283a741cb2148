//! etcd when things go wrong: a waiter's lease revoked while it waits (etcd
//! issue 11456), a queue key left behind, etcd killed and restarted, and bad
//! URLs.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::{Client, ErrorKind};
use distlock_etcd::EtcdStore;
use distlock_testkit::restart::tokens_rise_and_the_holder_stays_honest;
use distlock_testkit::servers::Etcd;
use etcd_client::KeyValue;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_lease_is_revoked_is_never_told_it_holds_the_lock() {
    let server = Etcd::shared();
    let client = client(&server.url()).await;
    let key = "faults/11456";
    let holder = client.session().open().await.expect("open");
    let held = holder
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiter = client.session().open().await.expect("open");
    let waiting = tokio::spawn(async move {
        let result = waiter.lock(key).wait(Duration::from_secs(30)).await;
        result.map(|guard| guard.token())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Revoke the waiter's lease behind its back: its queue key names it.
    let (mut etcd, queue) = queue_of(server, "faults%2F11456").await;
    assert_eq!(queue.len(), 2, "holder and waiter are queued");
    let waiter_lease = queue[1].lease();
    etcd.lease_revoke(waiter_lease).await.expect("revoke");
    held.release().await.expect("release");
    let outcome = timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter ends")
        .expect("waiter task");
    let err = outcome.expect_err("a waiter without a lease must not get the lock");
    assert_eq!(err.kind(), ErrorKind::Lost, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_key_left_behind_is_never_taken_for_a_new_attempt() {
    // A session uses the same few queue keys for all its attempts. A key
    // left in place (here put back by hand, as a release that failed
    // half-way would leave it) has an old create revision: taken again, it
    // would jump the queue and repeat a token.
    let server = Etcd::shared();
    let client = client(&server.url()).await;
    let key = "faults/left-behind";
    let session = client.session().open().await.expect("open");
    let first = session
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
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
