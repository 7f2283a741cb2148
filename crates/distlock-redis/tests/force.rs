//! Forced release on `redis://` and `redlock://`, beyond the conformance
//! suite: every mode's holds ended and reported, the queue served in order
//! after, each ended holder's renewal finding it lost and its release
//! refused without touching the next holder, no lock-delay left, bad keys,
//! and Redlock with one instance cut off and with no majority.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::status::StatusQuery;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, LockStore, SessionOptions, StoreSession,
};
use distlock_core::{Client, ErrorKind, Guard, Mode, Session};
use distlock_redis::RedisStore;
use distlock_testkit::proxy::{Fault, Proxy};
use distlock_testkit::servers::Redis;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// The lease of sessions that must not lapse.
const TTL: Duration = Duration::from_secs(10);
/// How long anything that must happen may take.
const PATIENCE: Duration = Duration::from_secs(30);
/// Long enough for a just-spawned waiter to be queued at the store.
const SETTLE: Duration = Duration::from_millis(300);

async fn connect(url: &str) -> Arc<RedisStore> {
    Arc::new(RedisStore::connect(url).await.expect("connect"))
}

async fn open(client: &Client, owner: &str, lock_delay: Duration) -> Session {
    client
        .session()
        .ttl(TTL)
        .lock_delay(lock_delay)
        .owner(owner)
        .open()
        .await
        .expect("open a session")
}

fn redlock_url(addresses: &[String]) -> String {
    format!("redlock://{}", addresses.join(","))
}

/// A task in which `session` waits for `key` in `mode`.
fn wait_for(session: &Session, key: &str, mode: Mode) -> JoinHandle<Guard> {
    let (session, key) = (session.clone(), key.to_owned());
    tokio::spawn(async move {
        let request = match mode {
            Mode::Exclusive => session.lock(&key),
            Mode::Shared => session.read(&key),
            Mode::Semaphore { permits } => session.semaphore(&key, permits),
        };
        request.wait(PATIENCE).await.expect("granted in time")
    })
}

/// Two readers and two semaphore permits ended, each reported with its
/// mode, token and owner; a writer waiting on the readers is granted with
/// a higher token, the reader behind it still waits; the ended holders'
/// `lost()` fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_and_permits_are_ended_and_the_queue_goes_on_in_order() {
    let server = Redis::start();
    let client = Client::new(connect(&server.url()).await);
    let a = open(&client, "a@h pid 1 (t)", Duration::ZERO).await;
    let b = open(&client, "b@h pid 2 (t)", Duration::ZERO).await;
    let c = open(&client, "c@h pid 3 (t)", Duration::ZERO).await;
    let d = open(&client, "d@h pid 4 (t)", Duration::ZERO).await;
    let key = "force/shared";
    let readers = [
        a.read(key).await.expect("read"),
        b.read(key).await.expect("read"),
    ];
    let writer = wait_for(&c, key, Mode::Exclusive);
    sleep(SETTLE).await;
    let late_reader = wait_for(&d, key, Mode::Shared);
    sleep(SETTLE).await;

    let ended = client.force_release(key).await.expect("force release");
    let mut shown: Vec<(Option<u64>, &str)> =
        ended.iter().map(|h| (h.token, h.owner.as_str())).collect();
    shown.sort_unstable();
    let mut expected: Vec<(Option<u64>, &str)> = readers
        .iter()
        .zip(["a@h pid 1 (t)", "b@h pid 2 (t)"])
        .map(|(guard, owner)| (Some(guard.token()), owner))
        .collect();
    expected.sort_unstable();
    assert_eq!(shown, expected, "{ended:?}");
    assert!(ended.iter().all(|h| h.mode == Mode::Shared), "{ended:?}");

    let written = writer.await.expect("the writer at the head is granted");
    assert!(readers.iter().all(|r| written.token() > r.token()));
    let queued = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status")
        .keys;
    assert_eq!(queued[0].holders.len(), 1, "{queued:?}");
    assert_eq!(queued[0].holders[0].owner, "c@h pid 3 (t)");
    let waiting: Vec<Mode> = queued[0].waiters.iter().map(|w| w.mode).collect();
    assert_eq!(waiting, [Mode::Shared], "the late reader waits: {queued:?}");
    for reader in &readers {
        timeout(PATIENCE, reader.lost())
            .await
            .expect("an ended reader learns it lost");
    }
    let token = written.token();
    written.release().await.expect("release");
    let read = late_reader.await.expect("then the late reader");
    assert!(read.token() > token);
    read.release().await.expect("release");

    let permits = [
        a.semaphore("force/permits", 2).await.expect("permit"),
        b.semaphore("force/permits", 2).await.expect("permit"),
    ];
    let third = wait_for(&c, "force/permits", Mode::Semaphore { permits: 2 });
    sleep(SETTLE).await;
    let ended = client
        .force_release("force/permits")
        .await
        .expect("force release");
    let mut tokens: Vec<Option<u64>> = ended.iter().map(|h| h.token).collect();
    tokens.sort_unstable();
    let mut expected: Vec<Option<u64>> = permits.iter().map(|p| Some(p.token())).collect();
    expected.sort_unstable();
    assert_eq!(tokens, expected, "{ended:?}");
    assert!(ended
        .iter()
        .all(|h| h.mode == Mode::Semaphore { permits: 2 }));
    let granted = third.await.expect("the waiting permit is granted");
    assert!(permits.iter().all(|p| granted.token() > p.token()));
    for permit in &permits {
        timeout(PATIENCE, permit.lost())
            .await
            .expect("an ended permit learns it lost");
    }
    granted.release().await.expect("release");
}

/// An exclusive hold taken on the fast path, with waiters queued behind it:
/// reported with its owner (its token is its client's only), and the head
/// of the queue is granted next, with a higher token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_hold_with_waiters_goes_to_the_head_of_the_queue() {
    let server = Redis::start();
    let client = Client::new(connect(&server.url()).await);
    let holder = open(&client, "stuck@h pid 1 (t)", Duration::from_secs(1)).await;
    let next = open(&client, "next@h pid 2 (t)", Duration::ZERO).await;
    let last = open(&client, "last@h pid 3 (t)", Duration::ZERO).await;
    let key = "force/fast";
    let held = holder.lock(key).await.expect("free");
    let first = wait_for(&next, key, Mode::Exclusive);
    sleep(SETTLE).await;
    let second = wait_for(&last, key, Mode::Exclusive);
    sleep(SETTLE).await;

    let ended = client.force_release(key).await.expect("force release");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].owner, "stuck@h pid 1 (t)");
    assert_eq!(ended[0].mode, Mode::Exclusive);
    assert!(ended[0].token.is_none_or(|t| t == held.token()));
    // Handed over by the forced release itself, not by a waiter's refresh.
    let handed = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status")
        .keys;
    let holders: Vec<&str> = handed[0].holders.iter().map(|h| h.owner.as_str()).collect();
    assert_eq!(holders, ["next@h pid 2 (t)"], "{handed:?}");
    let granted = first.await.expect("the head of the queue");
    assert!(granted.token() > held.token());
    assert!(!second.is_finished(), "the second waiter jumped the first");
    timeout(PATIENCE, held.lost())
        .await
        .expect("the ended holder learns it lost");
    let err = held.release().await.expect_err("released after an end");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    assert!(granted.is_held(), "the ended holder's release took the key");
    let token = granted.token();
    granted.release().await.expect("release");
    let after = second.await.expect("then the second");
    assert!(after.token() > token);
    after.release().await.expect("release");
}

/// A grant in `mode`; exclusive `queued` ones are handed over from the
/// queue, behind a blocker (so that Redis keeps their token).
async fn grant(
    store: &RedisStore,
    session: &Arc<dyn StoreSession>,
    key: &str,
    mode: Mode,
    queued: bool,
) -> HeldLock {
    let mut request = AcquireRequest::new(key, mode);
    let grant: Grant = if queued {
        let blocker = store.open_session(&options()).await.expect("open");
        let blocking = blocker
            .acquire(&request)
            .await
            .expect("acquire")
            .expect("free");
        request.wait_until = Some(Instant::now() + PATIENCE);
        let waiting = {
            let (session, request) = (Arc::clone(session), request.clone());
            tokio::spawn(async move { session.acquire(&request).await })
        };
        sleep(SETTLE).await;
        let blocked = HeldLock {
            key: key.to_owned(),
            mode,
            token: blocking.token,
        };
        blocker.release(&blocked).await.expect("release");
        waiting
            .await
            .expect("task")
            .expect("acquire")
            .expect("handed over")
    } else {
        session
            .acquire(&request)
            .await
            .expect("acquire")
            .expect("free")
    };
    HeldLock {
        key: key.to_owned(),
        mode,
        token: grant.token,
    }
}

fn options() -> SessionOptions {
    SessionOptions::new(TTL, Duration::ZERO)
}

/// In every mode and both states of a lock: the ended hold's release is
/// refused and leaves the next holder's hold alone; its renewal reports it
/// lost; the next grant's token is higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_hold_is_refused_and_reported_lost_in_every_mode() {
    let server = Redis::start();
    let store = connect(&server.url()).await;
    let cases = [
        ("force/every/fast", Mode::Exclusive, false),
        ("force/every/handed", Mode::Exclusive, true),
        ("force/every/shared", Mode::Shared, false),
        ("force/every/permit", Mode::Semaphore { permits: 2 }, false),
    ];
    for (key, mode, queued) in cases {
        let old: Arc<dyn StoreSession> =
            Arc::from(store.open_session(&options()).await.expect("open"));
        let new = store.open_session(&options()).await.expect("open");
        let held = grant(&store, &old, key, mode, queued).await;
        let ended = store.force_release(key, "test").await.expect("force");
        assert_eq!(ended.len(), 1, "{key}: {ended:?}");
        assert_eq!(ended[0].mode, mode, "{key}");
        if queued || mode != Mode::Exclusive {
            assert_eq!(ended[0].token, Some(held.token), "{key}: Redis keeps it");
        }
        let request = AcquireRequest::new(key, mode);
        let taken = new.acquire(&request).await.expect("acquire");
        let taken = taken.unwrap_or_else(|| panic!("{key}: free after the force"));
        assert!(taken.token > held.token, "{key}");
        let current = HeldLock {
            key: key.to_owned(),
            mode,
            token: taken.token,
        };

        let err = old.release(&held).await.expect_err("release after an end");
        assert_eq!(err.kind(), ErrorKind::NotHeld, "{key}: {err}");
        let renewed = new.renew(std::slice::from_ref(&current)).await;
        assert!(renewed.expect("renew").lost_keys.is_empty(), "{key}");

        // Again, for the renewal: the script must find the hold gone.
        new.release(&current).await.expect("release");
        let held = grant(&store, &old, key, mode, queued).await;
        store.force_release(key, "test").await.expect("force");
        let report = old.renew(&[held]).await.expect("renew answers");
        assert_eq!(report.lost_keys, [key.to_owned()], "{key}");
    }
}

/// A hold ended by force leaves no lock-delay: the key is free at once,
/// however long the ended holder's lock-delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_hold_leaves_no_lock_delay() {
    let server = Redis::start();
    let client = Client::new(connect(&server.url()).await);
    let stuck = open(&client, "stuck@h pid 1 (t)", Duration::from_secs(60)).await;
    let other = open(&client, "other@h pid 2 (t)", Duration::ZERO).await;
    let _fast = stuck.lock("force/delay/fast").await.expect("hold");
    let _read = stuck.read("force/delay/read").await.expect("read");
    for (key, mode) in [
        ("force/delay/fast", Mode::Exclusive),
        ("force/delay/read", Mode::Shared),
    ] {
        let ended = client.force_release(key).await.expect("force");
        assert_eq!(ended.len(), 1, "{key}: {ended:?}");
        let request = match mode {
            Mode::Exclusive => other.lock(key),
            _ => other.write(key),
        };
        let taken = request.try_lock().await.expect("try");
        assert!(taken.is_some(), "{key} blocked after a forced release");
    }
}

/// Bad keys get the same error as everywhere; a key nobody holds ends
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused_and_free_keys_end_nothing() {
    let server = Redis::start();
    let client = Client::new(connect(&server.url()).await);
    for bad in [String::new(), "k".repeat(distlock_core::MAX_KEY_BYTES + 1)] {
        let err = client.force_release(&bad).await.expect_err("a bad key");
        assert_eq!(err.kind(), ErrorKind::InvalidKey, "{err}");
        assert!(err.to_string().contains("1 to 1024 bytes"), "{err}");
    }
    let ended = client.force_release("force/free").await.expect("force");
    assert!(ended.is_empty(), "{ended:?}");
    assert_eq!(server.cli(&["EXISTS", "dl:{force/free}"]), "0");
}

/// An exclusive fast hold of `key` by `session` written on every one of
/// `servers`. The fast path answers on the first majority and drops the
/// last instance's call, whose `SET` is then never sent if the connection
/// had not written it yet; so the acquire is made again until the last
/// instance has it. A `status` call, which waits for every instance, goes
/// after that `SET` on the same connections: once it answers, the `SET`
/// either ran or never will, and the servers are read directly.
async fn held_on_all(
    store: &RedisStore,
    session: &dyn StoreSession,
    key: &str,
    servers: &[Redis],
) -> HeldLock {
    let main = format!("dl:{{{key}}}");
    for _ in 0..50 {
        let request = AcquireRequest::new(key, Mode::Exclusive);
        let grant = session.acquire(&request).await.expect("acquire");
        let grant = grant.expect("free");
        let lock = HeldLock {
            key: key.to_owned(),
            mode: Mode::Exclusive,
            token: grant.token,
        };
        let query = StatusQuery::Key(key.to_owned());
        store.status(&query).await.expect("every instance answers");
        let member = servers[0].cli(&["GET", &main]);
        if servers
            .iter()
            .all(|server| server.cli(&["GET", &main]) == member)
        {
            return lock;
        }
        // Released where it was written; the call that was never sent
        // cannot land later, as the release goes after it.
        session.release(&lock).await.expect("release");
        for server in servers {
            until_gone_from(server, key).await;
        }
    }
    panic!("{key} never reached every instance in 50 acquires");
}

/// Waits until `server` no longer has the main key of `key`.
async fn until_gone_from(server: &Redis, key: &str) {
    let deadline = Instant::now() + PATIENCE;
    while server.cli(&["EXISTS", &format!("dl:{{{key}}}")]) != "0" {
        assert!(
            Instant::now() < deadline,
            "{key} stayed on {}",
            server.address()
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Redlock with one instance cut off: the forced release runs on the two
/// others and succeeds. The cut-off instance comes back with the old holds:
/// the old holder's release is still refused (a majority says not held),
/// its renewal still reports the key lost, and each takes back what the
/// instance kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_ends_holds_on_a_majority_and_takes_back_what_one_kept() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let proxy = Proxy::start(servers[2].address().parse().expect("address")).await;
    let addresses = [
        servers[0].address(),
        servers[1].address(),
        proxy.addr().to_string(),
    ];
    let store = connect(&redlock_url(&addresses)).await;
    // A lease well past PATIENCE: what the instance kept can go only by
    // being taken back, not by running out.
    let long = SessionOptions::new(PATIENCE * 2, Duration::ZERO);
    let old = store.open_session(&long).await.expect("open");
    let (released, renewed) = ("force/redlock/release", "force/redlock/renew");
    let mut held = Vec::new();
    for key in [released, renewed] {
        held.push(held_on_all(&store, &*old, key, &servers).await);
    }

    proxy.set(Fault::Blackhole);
    for key in [released, renewed] {
        let ended = store.force_release(key, "test").await.expect("a majority");
        assert_eq!(ended.len(), 1, "{key}: {ended:?}");
        assert_eq!(ended[0].token, None, "not every instance answered");
    }
    // What the cut-off instance was sent is dropped, not delivered late.
    proxy.reset();
    proxy.set(Fault::None);
    assert_eq!(
        servers[2].cli(&["EXISTS", &format!("dl:{{{released}}}")]),
        "1"
    );

    let err = old
        .release(&held[0])
        .await
        .expect_err("ended on a majority");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    until_gone_from(&servers[2], released).await;

    let report = old.renew(&held[1..]).await.expect("renew answers");
    assert_eq!(report.lost_keys, [renewed.to_owned()]);
    until_gone_from(&servers[2], renewed).await;

    let next = store.open_session(&options()).await.expect("open");
    let request = AcquireRequest::new(renewed, Mode::Exclusive);
    let taken = next
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    assert!(taken.token > held[1].token);
}

/// With too few instances up, the forced release fails and says to run it
/// again; what it reached is ended. A single Redis that is down says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_majority_it_fails_and_says_to_run_it_again() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let addresses: Vec<String> = servers.iter().map(Redis::address).collect();
    let store = connect(&redlock_url(&addresses)).await;
    let session = store.open_session(&options()).await.expect("open");
    let key = "force/minority";
    let request = AcquireRequest::new(key, Mode::Exclusive);
    session
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    // The grant needs a majority, not all three: keep up one that has it.
    let main = format!("dl:{{{key}}}");
    let kept = (0..servers.len())
        .find(|&index| servers[index].cli(&["EXISTS", &main]) == "1")
        .expect("a majority holds the key");
    for (index, server) in servers.iter_mut().enumerate() {
        if index != kept {
            server.kill();
        }
    }
    let err = store
        .force_release(key, "test")
        .await
        .expect_err("one of three");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let message = err.to_string();
    assert!(message.contains("only 1 of 3"), "{message}");
    assert!(message.contains("run it again"), "{message}");
    let down = &addresses[(kept + 1) % addresses.len()];
    assert!(message.contains(down.as_str()), "{message}");
    assert_eq!(servers[kept].cli(&["EXISTS", &main]), "0");

    let mut single = Redis::start();
    let store = connect(&single.url()).await;
    single.kill();
    let err = store.force_release(key, "test").await.expect_err("down");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("cannot reach Redis"), "{err}");
}
