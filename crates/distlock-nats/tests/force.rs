//! Forced release on NATS: the holder hears of it at once, from the notice
//! of its entry, not at its next renewal.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::Client;
use distlock_nats::NatsStore;
use distlock_testkit::servers::Nats;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_release_reaches_the_holder_before_its_next_renewal() {
    let store = NatsStore::connect(&Nats::shared().url())
        .await
        .expect("connect");
    let client = Client::new(Arc::new(store));
    let key = "force/told";
    // Renewed every 20 s: a loss found in less is the watch's doing.
    let stuck = client
        .session()
        .ttl(Duration::from_secs(60))
        .owner("stuck")
        .open()
        .await
        .expect("open");
    let held = stuck
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiter = client.session().open().await.expect("open");
    let waiting = tokio::spawn(async move {
        let guard = waiter.lock(key).wait(Duration::from_secs(30)).await;
        guard.map(|guard| guard.token())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ended = client.force_release(key).await.expect("force release");
    let owners: Vec<&str> = ended.iter().map(|hold| hold.owner.as_str()).collect();
    assert_eq!(owners, ["stuck"], "{ended:?}");
    assert_eq!(ended[0].token, Some(held.token()));
    timeout(Duration::from_secs(10), held.lost())
        .await
        .expect("the holder is told before its next renewal");
    let token = timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter is granted")
        .expect("waiter task")
        .expect("granted");
    assert!(token > held.token());
    assert!(held.release().await.is_err(), "released by force already");
}
