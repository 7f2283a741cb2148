//! `status` on `redis://` and `redlock://`, beyond the conformance suite:
//! a queue shown in order with each waiter's owner, tokens of holds handed
//! over from the queue, owners that go with their sessions, owners written
//! again after Redis forgot the scripts, prefixes with glob characters,
//! and Redlock with an instance down.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::status::{KeyStatus, StatusQuery};
use distlock_core::store::{AcquireRequest, HeldLock, LockStore, SessionOptions};
use distlock_core::{Client, ErrorKind, Guard, Mode, Session};
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

/// The lease of the sessions that must not lapse.
const TTL: Duration = Duration::from_secs(10);
/// How long a waiter waits before giving up.
const PATIENCE: Duration = Duration::from_secs(30);
/// Long enough for a just-spawned waiter to be queued at the store.
const SETTLE: Duration = Duration::from_millis(300);

async fn connect(url: &str) -> Client {
    let store = RedisStore::connect(url)
        .await
        .expect("connect to the test's redis-server(s)");
    Client::new(Arc::new(store))
}

fn redlock_url(servers: &[Redis]) -> String {
    let hosts: Vec<String> = servers.iter().map(Redis::address).collect();
    format!("redlock://{}", hosts.join(","))
}

async fn open(client: &Client, owner: &str, ttl: Duration, lock_delay: Duration) -> Session {
    client
        .session()
        .ttl(ttl)
        .lock_delay(lock_delay)
        .owner(owner)
        .open()
        .await
        .expect("open a session")
}

async fn status(client: &Client, query: StatusQuery) -> Vec<KeyStatus> {
    client.status(&query).await.expect("status").keys
}

async fn of_key(client: &Client, key: &str) -> Vec<KeyStatus> {
    status(client, StatusQuery::Key(key.to_owned())).await
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

/// A holder and three waiters, shown in queue order with their owners; the
/// head of the queue, handed the key, shown with its token where Redis
/// keeps it (every instance agrees on it).
async fn queue_in_order(url: &str, single: bool) {
    let client = connect(url).await;
    let key = "status/queue";
    let holder = open(&client, "holder@h pid 1 (t)", TTL, Duration::ZERO).await;
    let held = holder.lock(key).await.expect("first holder");
    let owners = ["w1@h pid 2 (t)", "w2@h pid 3 (t)", "w3@h pid 4 (t)"];
    let mut waiting = Vec::new();
    for owner in owners {
        let session = open(&client, owner, TTL, Duration::ZERO).await;
        waiting.push(wait_for(&session, key, Mode::Exclusive));
        sleep(SETTLE).await;
    }

    let queued = of_key(&client, key).await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    let lock = &queued[0];
    assert_eq!(lock.key, key);
    assert_eq!(lock.holders.len(), 1, "{lock:?}");
    let first = &lock.holders[0];
    assert_eq!(first.owner, "holder@h pid 1 (t)");
    assert_eq!(first.mode, Mode::Exclusive);
    // Taken on the fast path: its token is known to its client only.
    assert!(
        first.token.is_none_or(|token| token == held.token()),
        "{first:?}"
    );
    let left = first.lease_left.expect("a lease");
    assert!(left > Duration::ZERO && left <= TTL, "lease left {left:?}");
    let shown: Vec<&str> = lock.waiters.iter().map(|w| w.owner.as_str()).collect();
    assert_eq!(shown, owners, "waiters in queue order: {lock:?}");
    let mut sessions: Vec<&str> = lock.waiters.iter().map(|w| w.session.as_str()).collect();
    sessions.push(&first.session);
    sessions.sort_unstable();
    sessions.dedup();
    assert_eq!(sessions.len(), 4, "four sessions: {lock:?}");
    assert!(lock.last_token >= Some(held.token()), "{lock:?}");

    held.release().await.expect("release");
    let mut granted = waiting.remove(0).await.expect("first waiter");
    let handed = of_key(&client, key).await;
    let head = &handed[0].holders[..];
    assert_eq!(head.len(), 1, "{handed:?}");
    assert_eq!(head[0].owner, owners[0]);
    if single {
        assert_eq!(head[0].token, Some(granted.token()), "{handed:?}");
    } else if let Some(token) = head[0].token {
        assert_eq!(token, granted.token(), "{handed:?}");
    }
    let shown: Vec<&str> = handed[0].waiters.iter().map(|w| w.owner.as_str()).collect();
    assert_eq!(shown, owners[1..], "{handed:?}");

    for next in waiting {
        granted.release().await.expect("release");
        granted = next.await.expect("next waiter");
    }
    granted.release().await.expect("release");
    let after = of_key(&client, key).await;
    assert!(after.is_empty(), "nothing held or waited for: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_shows_the_queue_in_order_with_owners() {
    let server = Redis::start();
    queue_in_order(&server.url(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_shows_the_queue_in_order_with_owners() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    queue_in_order(&redlock_url(&servers), false).await;
}

/// Readers and semaphore holders, granted from the queue, each with its
/// mode and its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_semaphore_holders_are_shown_with_their_tokens() {
    let server = Redis::start();
    let client = connect(&server.url()).await;
    let a = open(&client, "a@h pid 1 (t)", TTL, Duration::ZERO).await;
    let b = open(&client, "b@h pid 2 (t)", TTL, Duration::ZERO).await;
    let c = open(&client, "c@h pid 3 (t)", TTL, Duration::ZERO).await;
    // Three of each: every holder is read, not the first two.
    let readers = [
        a.read("status/shared").await.expect("read"),
        b.read("status/shared").await.expect("read"),
        c.read("status/shared").await.expect("read"),
    ];
    let permits = [
        a.semaphore("status/permits", 3).await.expect("permit"),
        b.semaphore("status/permits", 3).await.expect("permit"),
        c.semaphore("status/permits", 3).await.expect("permit"),
    ];
    let shown = status(&client, StatusQuery::Prefix("status/".into())).await;
    let keys: Vec<&str> = shown.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["status/permits", "status/shared"]);
    for (lock, guards, mode) in [
        (&shown[0], &permits, Mode::Semaphore { permits: 3 }),
        (&shown[1], &readers, Mode::Shared),
    ] {
        let mut tokens: Vec<Option<u64>> = lock.holders.iter().map(|h| h.token).collect();
        tokens.sort_unstable();
        let mut expected: Vec<Option<u64>> = guards.iter().map(|g| Some(g.token())).collect();
        expected.sort_unstable();
        assert_eq!(tokens, expected, "{lock:?}");
        assert!(lock.holders.iter().all(|h| h.mode == mode), "{lock:?}");

        let mut owners: Vec<&str> = lock.holders.iter().map(|h| h.owner.as_str()).collect();
        owners.sort_unstable();
        assert_eq!(owners, ["a@h pid 1 (t)", "b@h pid 2 (t)", "c@h pid 3 (t)"]);
    }
    // Leases left are read against Redis's clock: never more than the
    // lease.
    for lock in &shown {
        let leases = lock.holders.iter().map(|h| h.lease_left.expect("kept"));
        assert!(leases.clone().all(|left| left <= TTL), "{lock:?}");
        assert!(leases.clone().all(|left| left > TTL / 2), "{lock:?}");
    }
}

/// A holder that stops renewing is not shown once its lease ends, though
/// its lock-delay still blocks the key; its owner key expires after it; a
/// new holder is shown with its own owner. A session that closes takes its
/// owner key with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_holder_and_its_owner_expire() {
    let server = Redis::start();
    let client = connect(&server.url()).await;
    let key = "status/vanish";
    let ttl = Duration::from_millis(600);
    let vanishing = open(&client, "gone@h pid 1 (t)", ttl, Duration::from_secs(3)).await;
    let _held = vanishing.lock(key).await.expect("hold");
    let shown = of_key(&client, key).await;
    assert_eq!(shown[0].holders[0].owner, "gone@h pid 1 (t)");
    let owner_key = format!("dl:o:{}", shown[0].holders[0].session);
    let kept: i64 = server.cli(&["PTTL", &owner_key]).parse().expect("PTTL");
    // Kept for two leases from its last write, at most about 5/6 of a
    // lease ago (half a lease, then the next renewal).
    assert!(kept > 300 && kept <= 2 * 600, "owner kept {kept} ms");

    vanishing.freeze_for_test();
    sleep(ttl + Duration::from_millis(300)).await;
    assert_eq!(server.cli(&["EXISTS", &format!("dl:{{{key}}}")]), "1");
    let lapsed = of_key(&client, key).await;
    assert!(lapsed.is_empty(), "a lapsed hold is shown: {lapsed:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.cli(&["EXISTS", &owner_key]) != "0" {
        assert!(Instant::now() < deadline, "{owner_key} never expired");
        sleep(Duration::from_millis(100)).await;
    }

    let next = open(&client, "next@h pid 2 (t)", TTL, Duration::ZERO).await;
    let held = next
        .lock(key)
        .wait(PATIENCE)
        .await
        .expect("after the delay");
    let shown = of_key(&client, key).await;
    let owners: Vec<&str> = shown[0].holders.iter().map(|h| h.owner.as_str()).collect();
    assert_eq!(owners, ["next@h pid 2 (t)"]);
    let owner_key = format!("dl:o:{}", shown[0].holders[0].session);
    assert_eq!(server.cli(&["EXISTS", &owner_key]), "1");
    held.release().await.expect("release");
    next.close().await.expect("close");
    // Deleted in the background once closed, long before it would expire
    // (two leases: 20 s).
    let started = Instant::now();
    while server.cli(&["EXISTS", &owner_key]) != "0" {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the owner key outlived its close"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The owner is written beside the scripts too, and again after Redis
/// forgot them (the pipelined write and the script's NOSCRIPT retry); a
/// holder renewing past the owner key's first expiry still shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_are_written_with_scripts_and_renewals() {
    let server = Redis::start();
    let client = connect(&server.url()).await;
    let key = "status/scripts";
    let ttl = Duration::from_millis(600);
    let holder = open(&client, "renewing@h pid 1 (t)", ttl, Duration::ZERO).await;
    let held = holder.lock(key).await.expect("hold");
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    // A read skips the fast path: its first call is the acquire script.
    let reader = open(&client, "reader@h pid 2 (t)", TTL, Duration::ZERO).await;
    let waiting = wait_for(&reader, key, Mode::Shared);
    sleep(SETTLE).await;
    let shown = of_key(&client, key).await;
    assert_eq!(shown[0].waiters.len(), 1, "{shown:?}");
    assert_eq!(shown[0].waiters[0].owner, "reader@h pid 2 (t)");
    assert_eq!(shown[0].waiters[0].mode, Mode::Shared);

    // Past twice the lease, only renewals can have kept the owner.
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    sleep(ttl * 3).await;
    let shown = of_key(&client, key).await;
    assert_eq!(
        shown[0].holders[0].owner, "renewing@h pid 1 (t)",
        "{shown:?}"
    );
    held.release().await.expect("release");
    waiting
        .await
        .expect("reader")
        .release()
        .await
        .expect("release");
}

/// A prefix matches keys that start with it, whatever glob characters it
/// holds; keys with `}` are read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_with_glob_characters_matches_literally() {
    let server = Redis::start();
    let client = connect(&server.url()).await;
    let session = open(&client, "glob@h pid 1 (t)", TTL, Duration::ZERO).await;
    let keys = [
        "g*/1", "g[ab]/2", "ga/3", "gb/4", "g?/5", "g\\/6", "g}:f/7", "g]/8",
    ];
    let mut guards = Vec::new();
    for key in keys {
        guards.push(session.lock(key).await.expect("hold"));
    }
    // The fencing counters of these keys, and another key's, are no locks.
    let other = session.lock("h/9").await.expect("hold");
    other.release().await.expect("release");

    for (prefix, expected) in [
        ("g*", &["g*/1"][..]),
        ("g[a", &["g[ab]/2"]),
        ("g[ab]", &["g[ab]/2"]),
        ("g?", &["g?/5"]),
        ("g\\", &["g\\/6"]),
        ("g}", &["g}:f/7"]),
        ("g]", &["g]/8"]),
        ("gb", &["gb/4"]),
        ("h", &[]),
    ] {
        let shown = status(&client, StatusQuery::Prefix(prefix.into())).await;
        let names: Vec<&str> = shown.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(names, expected, "prefix {prefix:?}");
    }
    let mut all = keys.to_vec();
    all.sort_unstable();
    let shown = status(&client, StatusQuery::Prefix(String::new())).await;
    let names: Vec<&str> = shown.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(names, all);
    let one = of_key(&client, "g*/1").await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].holders[0].owner, "glob@h pid 1 (t)");
}

/// Redlock answers with a majority of instances up, and lists a holder
/// that a majority lists; with one up of three it says it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_status_needs_a_majority() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let client = connect(&redlock_url(&servers)).await;
    let session = open(&client, "quorum@h pid 1 (t)", TTL, Duration::ZERO).await;
    let held = session.lock("status/quorum").await.expect("hold");
    // The grant was decided by the first majority: the third instance may
    // never have been asked. Stop one that does not hold it, if any, so
    // that the two left both do.
    let holds = |server: &Redis| server.cli(&["EXISTS", "dl:{status/quorum}"]) == "1";
    let down = servers.iter().position(|s| !holds(s)).unwrap_or(0);
    let up: Vec<usize> = (0..3).filter(|&i| i != down).collect();

    servers[down].kill();
    let shown = of_key(&client, "status/quorum").await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].holders[0].owner, "quorum@h pid 1 (t)");
    // Not every instance answered: the token cannot be vouched for.
    assert_eq!(shown[0].holders[0].token, None);

    // A hold on one instance only is no holder.
    assert_eq!(
        servers[up[0]].cli(&["DEL", "dl:{status/quorum}"]),
        "1",
        "the fast hold's main key"
    );
    let minority = of_key(&client, "status/quorum").await;
    assert!(minority.is_empty(), "held on one of three: {minority:?}");

    servers[up[0]].kill();
    let err = client
        .status(&StatusQuery::Key("status/quorum".into()))
        .await
        .expect_err("one instance of three");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains("only 1 of 3 Redlock instances answered (2 needed)"),
        "{err}"
    );
    drop(held);
}

/// A Redis that refuses the owner write (here an ACL that allows only the
/// lock keys; out of memory does the same) still grants, renews and
/// releases: the owner is not the lock's business.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_owner_write_fails_no_lock() {
    let server = Redis::start();
    assert_eq!(
        server.cli(&["ACL", "SETUSER", "locks", "on", ">pw", "~dl:{*", "&*", "+@all"]),
        "OK"
    );
    let client = connect(&format!("redis://locks:pw@{}", server.address())).await;
    let ttl = Duration::from_millis(900);
    let session = open(&client, "acl@h pid 1 (t)", ttl, Duration::ZERO).await;
    let guard = session
        .lock("status/acl")
        .await
        .expect("the fast path grants");
    // Past two renewals, each of which carries the owner write when due.
    sleep(ttl * 2).await;
    assert!(guard.is_held(), "renewals kept the lock");
    let other = open(&client, "acl2@h pid 2 (t)", ttl, Duration::ZERO).await;
    let waiting = wait_for(&other, "status/acl", Mode::Exclusive);
    sleep(SETTLE).await;
    guard.release().await.expect("release");
    let next = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the queue hands the key on")
        .expect("waiter");
    next.release().await.expect("release");
}

/// The `SET` calls the server has run so far.
fn sets(server: &Redis) -> u64 {
    server.calls("set")
}

/// The owner is written with the first call sent half a lease or more
/// after the last write: with renewals every third of a lease, every
/// second renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_is_written_again_each_half_lease() {
    let server = Redis::start();
    let client = connect(&server.url()).await;
    let ttl = Duration::from_secs(1);
    let holder = open(&client, "steady@h pid 1 (t)", ttl, Duration::ZERO).await;
    let held = holder.lock("status/steady").await.expect("hold");
    let before = sets(&server);
    sleep(Duration::from_secs(4)).await;
    // A write at most every half lease (at most 9 in 4 s); about every
    // two thirds of a lease (5 or 6) while renewals keep time.
    let written = sets(&server) - before;
    assert!((3..=9).contains(&written), "{written} owner writes in 4 s");
    held.release().await.expect("release");
}

/// Fast grants carry the owner write too, once per half lease: twenty
/// grants and releases in a moment write it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_grants_write_the_owner_once_per_half_lease() {
    let server = Redis::start();
    let client = connect(&server.url()).await;
    let holder = open(&client, "quick@h pid 1 (t)", TTL, Duration::ZERO).await;
    let key = "status/quick";
    let before = sets(&server);
    for _ in 0..20 {
        let held = holder.lock(key).try_lock().await.expect("try");
        held.expect("free").release().await.expect("release");
    }
    // Each fast grant is a SET NX of its own.
    assert_eq!(sets(&server) - before, 20 + 1);
    let held = holder.lock(key).await.expect("hold");
    let shown = of_key(&client, key).await;
    assert_eq!(shown[0].holders[0].owner, "quick@h pid 1 (t)", "{shown:?}");
    held.release().await.expect("release");
}

/// An owner write that failed with its call goes with the next call, not
/// half a lease later: a holder granted once Redis is back shows its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_write_that_failed_goes_with_the_next_call() {
    let mut server = Redis::start();
    let client = connect(&server.url()).await;
    let holder = open(&client, "returning@h pid 1 (t)", TTL, Duration::ZERO).await;
    let key = "status/returning";
    let port = server.port();
    server.kill();
    drop(server);
    let err = holder
        .lock(key)
        .try_lock()
        .await
        .expect_err("Redis is down");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let _server = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        match holder.lock(key).try_lock().await {
            Ok(held) => break held.expect("free"),
            Err(err) if Instant::now() < deadline => {
                assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
                sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("Redis never answered again: {err}"),
        }
    };
    let shown = of_key(&client, key).await;
    assert_eq!(
        shown[0].holders[0].owner, "returning@h pid 1 (t)",
        "{shown:?}"
    );
    held.release().await.expect("release");
}

/// A renewal whose owner write failed (here: its connection was killed)
/// leaves it due: the next call writes it again, where Redis may have lost
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewals_failed_owner_write_goes_with_the_next_call() {
    let server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let ttl = Duration::from_secs(2);
    let session = store
        .open_session(&SessionOptions::new(ttl, Duration::ZERO))
        .await
        .expect("open");
    let request = AcquireRequest::new("status/renewal-failed", Mode::Exclusive);
    let grant = session.acquire(&request).await.expect("acquire");
    let held = HeldLock {
        key: request.key.clone(),
        mode: Mode::Exclusive,
        token: grant.expect("free").token,
    };
    let owners = server.cli(&["KEYS", "dl:o:*"]);
    assert_eq!(owners.lines().count(), 1, "{owners}");
    // Past half a lease: the next renewal carries the owner write.
    sleep(ttl / 2 + Duration::from_millis(100)).await;
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let failed = session.renew(std::slice::from_ref(&held)).await;
    failed.expect_err("its connection killed");
    server.cli(&["DEL", owners.trim()]);
    let renewed = session.renew(std::slice::from_ref(&held)).await;
    assert!(renewed.expect("renew").lost_keys.is_empty());
    assert_eq!(
        server.cli(&["EXISTS", owners.trim()]),
        "1",
        "not written again"
    );
}

/// Status on a single Redis that is down says so, and what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_redis_that_is_down_says_to_check_it_runs() {
    let mut server = Redis::start();
    let client = connect(&server.url()).await;
    server.kill();
    let err = client
        .status(&StatusQuery::Key("status/down".into()))
        .await
        .expect_err("down");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("cannot read the locks: cannot reach Redis at 127.0.0.1:")
            && message.contains("is redis-server running?"),
        "{err}"
    );
}

/// Waiters behind a hold whose lease ran out, while its lock-delay still
/// blocks the key, are shown with no holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_behind_a_lapsed_hold_are_shown() {
    let server = Redis::start();
    let client = connect(&server.url()).await;
    let key = "status/behind-lapsed";
    let ttl = Duration::from_millis(600);
    let vanishing = open(&client, "gone@h pid 1 (t)", ttl, Duration::from_secs(3)).await;
    let _held = vanishing.lock(key).await.expect("hold");
    let waiter = open(&client, "behind@h pid 2 (t)", TTL, Duration::ZERO).await;
    let waiting = wait_for(&waiter, key, Mode::Exclusive);
    sleep(SETTLE).await;
    vanishing.freeze_for_test();
    sleep(ttl + Duration::from_millis(300)).await;
    let shown = of_key(&client, key).await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert!(shown[0].holders.is_empty(), "{shown:?}");
    let owners: Vec<&str> = shown[0].waiters.iter().map(|w| w.owner.as_str()).collect();
    assert_eq!(owners, ["behind@h pid 2 (t)"]);
    waiting
        .await
        .expect("waiter")
        .release()
        .await
        .expect("release");
}
