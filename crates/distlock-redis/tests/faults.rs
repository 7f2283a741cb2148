//! What Redis and Redlock must do when things go wrong: instances killed
//! and restarted empty, a holder whose lease ran out, and locks deleted or
//! expired from outside.

use std::time::Duration;

use distlock_core::store::{
    AcquireRequest, HeldLock, LockStore, Mode, SessionOptions, StoreSession,
};
use distlock_core::ErrorKind;
use distlock_redis::RedisStore;
use distlock_testkit::proxy::{Fault, Proxy};
use distlock_testkit::restart::assert_rising;
use distlock_testkit::servers::Redis;
use tokio::time::{sleep, timeout, Instant};

fn redlock_url(servers: &[Redis]) -> String {
    let hosts: Vec<String> = servers.iter().map(Redis::address).collect();
    format!("redlock://{}", hosts.join(","))
}

/// Acquires and releases `key` once, returning the token. It waits, and
/// retries while there is no majority, for a while: an instance that just
/// came back may not be reconnected yet, and an attempt cut short by a
/// failure may have left a hold on one instance until its lease (2 s) ends.
async fn take_token(client: &distlock_core::Client, key: &str, tokens_so_far: &[u64]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let session = client
            .session()
            .ttl(Duration::from_secs(2))
            .open()
            .await
            .expect("open");
        match session.lock(key).wait(Duration::from_secs(15)).await {
            Ok(guard) => {
                let token = guard.token();
                guard.release().await.expect("release");
                return token;
            }
            Err(err) if Instant::now() < deadline => {
                assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
                sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("no grant with a majority up after {tokens_so_far:?}: {err}"),
        }
    }
}

#[tokio::test]
async fn redlock_grants_with_a_majority_refuses_without_and_tokens_keep_rising() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let store = RedisStore::connect(&redlock_url(&servers))
        .await
        .expect("connect");
    let client = distlock_core::Client::new(std::sync::Arc::new(store));
    let key = "redlock/quorum";
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(take_token(&client, key, &tokens).await);
    }

    // One of three down: still granted.
    servers[0].kill();
    for _ in 0..5 {
        tokens.push(take_token(&client, key, &tokens).await);
    }

    // Two of three down: refused, naming the instances.
    let down = [servers[0].address(), servers[1].address()];
    servers[1].kill();
    let session = client.session().open().await.expect("open");
    let err = session.lock(key).try_lock().await.expect_err("no majority");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let message = err.to_string();
    assert!(message.contains("only 1 of 3"), "{message}");
    for address in &down {
        assert!(message.contains(address.as_str()), "{message}");
    }

    // The second comes back empty: a majority again, and the token goes on
    // from the survivor's count, not from the empty one's.
    servers[1] = Redis::start_on(servers[1].port());
    for _ in 0..5 {
        tokens.push(take_token(&client, key, &tokens).await);
    }
    // Its counters differ from the survivor's, yet each release and
    // renewal found the hold on both: nothing is left behind.
    let lock = format!("dl:{{{key}}}");
    for server in &servers[1..] {
        assert_eq!(
            server.cli(&["EXISTS", &lock]),
            "0",
            "a hold left on {}",
            server.address()
        );
    }

    // The first comes back empty and the survivor goes: the majority is now
    // the two that were restarted, and the token still does not go back,
    // because each grant wrote it back to a majority.
    servers[0] = Redis::start_on(servers[0].port());
    servers[2].kill();
    for _ in 0..5 {
        tokens.push(take_token(&client, key, &tokens).await);
    }

    assert_rising(&tokens);
}

/// The first holder's lease runs out, a second takes the key; the first
/// then tries to release and to extend: neither touches the second's lock.
async fn stale_holder_cannot_touch_the_new_owner(url: &str) {
    let store = RedisStore::connect(url).await.expect("connect");
    let short = SessionOptions::new(Duration::from_millis(300), Duration::ZERO);
    let long = SessionOptions::new(Duration::from_secs(10), Duration::ZERO);
    let (first, second, third) = (
        store.open_session(&short).await.expect("open"),
        store.open_session(&long).await.expect("open"),
        store.open_session(&long).await.expect("open"),
    );
    let key = "stale/owner";
    let request = AcquireRequest::new(key, Mode::Exclusive);
    let old = first
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    // No renewal: the lease runs out at the store.
    sleep(Duration::from_millis(500)).await;
    let new = second
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free again after the lease ran out");
    assert!(new.token > old.token);

    let stale = HeldLock {
        key: key.to_owned(),
        mode: Mode::Exclusive,
        token: old.token,
    };
    let err = first.release(&stale).await.expect_err("a stale release");
    assert_eq!(err.kind(), ErrorKind::NotHeld, "{err}");
    let report = first.renew(&[stale]).await.expect("renew answers");
    assert_eq!(report.lost_keys, vec![key.to_owned()]);

    assert!(
        third.acquire(&request).await.expect("try").is_none(),
        "the stale holder freed or broke the new owner's lock"
    );
    let current = HeldLock {
        key: key.to_owned(),
        mode: Mode::Exclusive,
        token: new.token,
    };
    let renewed = second
        .renew(std::slice::from_ref(&current))
        .await
        .expect("renew");
    assert!(renewed.lost_keys.is_empty(), "{renewed:?}");
    second
        .release(&current)
        .await
        .expect("the new owner releases");
}

#[tokio::test]
async fn a_stale_redis_holder_cannot_release_or_extend_the_new_owners_lock() {
    let server = Redis::start();
    stale_holder_cannot_touch_the_new_owner(&server.url()).await;
}

#[tokio::test]
async fn a_stale_redlock_holder_cannot_release_or_extend_the_new_owners_lock() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    stale_holder_cannot_touch_the_new_owner(&redlock_url(&servers)).await;
}

/// `lost()` fires when the lock's keys are changed from outside on
/// `servers` (all of a single Redis, a majority of Redlock's).
async fn lost_fires_when_changed_from_outside(url: &str, servers: &[&Redis], change: &[&str]) {
    let store = RedisStore::connect(url).await.expect("connect");
    let client = distlock_core::Client::new(std::sync::Arc::new(store));
    let session = client
        .session()
        .ttl(Duration::from_secs(1))
        .open()
        .await
        .expect("open");
    let key = format!("outside/{}", change[0]);
    let guard = session
        .lock(&key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    for server in servers {
        let mut args = change.to_vec();
        let lock = format!("dl:{{{key}}}");
        args.insert(1, &lock);
        let answer = server.cli(&args);
        assert_eq!(answer, "1", "redis-cli {args:?} answered {answer}");
    }
    timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("lost() fires within a few renewals");
    assert!(!guard.is_held());
}

#[tokio::test]
async fn lost_fires_when_the_lock_is_deleted_or_expired_from_outside() {
    let server = Redis::start();
    lost_fires_when_changed_from_outside(&server.url(), &[&server], &["DEL"]).await;
    lost_fires_when_changed_from_outside(&server.url(), &[&server], &["PEXPIRE", "1"]).await;

    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let url = redlock_url(&servers);
    let majority = [&servers[0], &servers[1]];
    lost_fires_when_changed_from_outside(&url, &majority, &["DEL"]).await;
    lost_fires_when_changed_from_outside(&url, &majority, &["PEXPIRE", "1"]).await;
}

#[tokio::test]
async fn bad_urls_and_dead_servers_get_clear_errors_in_bounded_time() {
    let dead = format!(
        "redis://127.0.0.1:{}",
        distlock_testkit::daemon::free_port()
    );
    let started = Instant::now();
    let err = RedisStore::connect(&dead)
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains("cannot reach Redis at 127.0.0.1:"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let two = "redlock://127.0.0.1:1,127.0.0.1:2";
    let err = RedisStore::connect(two).await.expect_err("two instances");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("at least three"), "{err}");

    for bad in [
        "redis://",
        "redlock://a:1,,b:2",
        "redis://host:99999",
        "redlock://a,b,c/x",
    ] {
        let err = RedisStore::connect(bad).await.expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::Config, "{bad}: {err}");
    }

    let server = Redis::start();
    let up = server.address();
    let ports = [
        distlock_testkit::daemon::free_port(),
        distlock_testkit::daemon::free_port(),
    ];
    let url = format!(
        "redlock://{up},127.0.0.1:{},127.0.0.1:{}",
        ports[0], ports[1]
    );
    let err = RedisStore::connect(&url)
        .await
        .expect_err("one of three up");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains("only 1 of 3 Redlock instances answered"),
        "{err}"
    );
    // Each instance that failed is named with its error, in order.
    let (first, second) = (
        format!(": 127.0.0.1:{}: ", ports[0]),
        format!("; 127.0.0.1:{}: ", ports[1]),
    );
    assert!(
        err.to_string().contains(&first) && err.to_string().contains(&second),
        "{err}"
    );
}

/// Script calls the server has run so far.
fn script_calls(server: &Redis) -> u64 {
    server.calls("evalsha") + server.calls("eval")
}

/// A holder of `key` and a waiter, in sessions of 60 s leases (a waiter
/// left to its timer would wait about 20 s, a third of the lease). Checks
/// that the waiter asks almost nothing while it waits, then that the
/// release wakes it within 5 s.
async fn woken_by_the_release(server: &Redis, client: &distlock_core::Client, key: &'static str) {
    let open = || async {
        client
            .session()
            .ttl(Duration::from_secs(60))
            .open()
            .await
            .expect("open")
    };
    let (holder, waiter) = (open().await, open().await);
    let held = holder
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiting = tokio::spawn(async move {
        let guard = waiter
            .lock(key)
            .wait(Duration::from_secs(60))
            .await
            .expect("granted after the release");
        guard.release().await.expect("release");
    });
    sleep(Duration::from_secs(1)).await;
    let before = script_calls(server);
    sleep(Duration::from_secs(1)).await;
    let during = script_calls(server) - before;
    assert!(
        during <= 2,
        "{during} script calls in 1 s of waiting: polling"
    );
    held.release().await.expect("release");
    timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the release, well before the timer")
        .expect("waiter task");
}

#[tokio::test]
async fn a_waiter_does_not_poll_and_is_woken_by_the_release() {
    let server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let client = distlock_core::Client::new(std::sync::Arc::new(store));
    woken_by_the_release(&server, &client, "push/key").await;
}

#[tokio::test]
async fn waiters_are_woken_again_after_a_restart_of_redis() {
    let mut server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let client = distlock_core::Client::new(std::sync::Arc::new(store));
    woken_by_the_release(&server, &client, "push/before").await;
    // The store's subscriber connection ends with the server; the next
    // wait subscribes again.
    let port = server.port();
    server.kill();
    drop(server);
    let server = Redis::start_on(port);
    // The store finds its old connection dead on first use: a try may
    // fail once before a new one is made.
    let probe = client.session().open().await.expect("open");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match probe.lock("push/probe").try_lock().await {
            Ok(held) => {
                held.expect("free").release().await.expect("release");
                break;
            }
            Err(err) if Instant::now() < deadline => {
                assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
                sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("Redis never answered again: {err}"),
        }
    }
    woken_by_the_release(&server, &client, "push/after").await;
}

#[tokio::test]
async fn a_ca_certificate_without_tls_says_to_write_rediss() {
    // A file that can be read: the refusal is for the scheme, not the file.
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let url = format!("redis://127.0.0.1:1?ca={ca}");
    let err = RedisStore::connect(&url)
        .await
        .expect_err("a CA without TLS");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("write rediss://"), "{err}");
}

#[tokio::test]
async fn a_stores_debug_form_names_its_instances_not_its_password() {
    let server = Redis::start();
    server.cli(&["CONFIG", "SET", "requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@{}", server.address());
    let store = RedisStore::connect(&url).await.expect("connect");
    let shown = format!("{store:?}");
    assert!(
        shown.contains("RedisStore") && shown.contains(&server.address()),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");
    // A wrong password is refused, and the message points at the URL.
    let url = format!("redis://:wrong@{}", server.address());
    let err = RedisStore::connect(&url).await.expect_err("wrong password");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("Redis refused: "), "{err}");
    assert!(err.to_string().contains("password"), "{err}");
    assert!(!err.to_string().contains("redis-server"), "{err}");
}

#[tokio::test]
async fn a_redlock_release_counts_what_answered() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let (_store, session) = redlock_session(&servers).await;
    let mut held = Vec::new();
    for key in ["redlock/partial-release", "redlock/unanswered-release"] {
        let request = AcquireRequest::new(key, Mode::Exclusive);
        let grant = session.acquire(&request).await.expect("acquire");
        held.push(HeldLock {
            key: key.to_owned(),
            mode: Mode::Exclusive,
            token: grant.expect("free").token,
        });
    }
    // Two of three down: the one left releases its hold, and too few
    // answered to say it was not held: released.
    servers[1].kill();
    servers[2].kill();
    session
        .release(&held[0])
        .await
        .expect("released where it could be");
    // All down: nothing released, nothing answered.
    servers[0].kill();
    let err = session
        .release(&held[1])
        .await
        .expect_err("nobody answered");
    assert_answered(&err, 0);
}

#[tokio::test]
async fn a_redlock_release_ends_the_hold_on_the_slowest_instance_too() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let store = RedisStore::connect(&redlock_url(&servers))
        .await
        .expect("connect");
    let client = distlock_core::Client::new(std::sync::Arc::new(store));
    let session = client
        .session()
        .ttl(Duration::from_secs(10))
        .open()
        .await
        .expect("open");
    let key = "redlock/slowest";
    let held = session.lock(key).try_lock().await.expect("try");
    let held = held.expect("free");
    // One instance forgot the scripts: its release loads the script and
    // asks again, after the other two have answered for the majority.
    assert_eq!(servers[2].cli(&["SCRIPT", "FLUSH"]), "OK");
    held.release().await.expect("release");
    let deadline = Instant::now() + Duration::from_secs(2);
    while servers[2].cli(&["EXISTS", &format!("dl:{{{key}}}")]) != "0" {
        assert!(
            Instant::now() < deadline,
            "the hold stayed on the slowest instance after the release"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The options of the sessions that must not lapse during a test.
fn ten_seconds() -> SessionOptions {
    SessionOptions::new(Duration::from_secs(10), Duration::ZERO)
}

/// A store on `url`, and a session of a 10 s lease.
async fn session_on(url: &str) -> (RedisStore, Box<dyn StoreSession>) {
    let store = RedisStore::connect(url).await.expect("connect");
    let session = store.open_session(&ten_seconds()).await.expect("open");
    (store, session)
}

/// A store on `servers` with Redlock, and a session of a 10 s lease.
async fn redlock_session(servers: &[Redis]) -> (RedisStore, Box<dyn StoreSession>) {
    session_on(&redlock_url(servers)).await
}

/// `err` says that only `answered` of three Redlock instances answered,
/// of the two needed.
fn assert_answered(err: &distlock_core::Error, answered: usize) {
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let counted = format!("only {answered} of 3 Redis instances answered (2 needed)");
    assert!(err.to_string().contains(&counted), "{err}");
}

/// The exclusive hold of `key` with `token`.
fn exclusive(key: &str, token: u64) -> HeldLock {
    HeldLock {
        key: key.to_owned(),
        mode: Mode::Exclusive,
        token,
    }
}

/// Connections Redis has accepted since it started; reading it takes one.
fn connections_received(server: &Redis) -> u64 {
    server
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("INFO stats names total_connections_received")
}

/// An acquire's call is given up at the lease (less the drift margin), not
/// at the connection's own 2 s, and its error names that limit; and the
/// connection it waited on is not used again, as one that stopped
/// answering may be half-open and never answer.
#[tokio::test]
async fn a_call_past_its_limit_is_given_up_and_its_connection_made_anew() {
    let server = Redis::start();
    let proxy = Proxy::start(server.address().parse().expect("address")).await;
    let store = RedisStore::connect(&format!("redis://{}", proxy.addr()))
        .await
        .expect("connect");
    // A limit of 300 ms less 1% and 2 ms: 295 ms.
    let options = SessionOptions::new(Duration::from_millis(300), Duration::ZERO);
    let session = store.open_session(&options).await.expect("open");
    let request = AcquireRequest::new("limit/first", Mode::Exclusive);
    let token = session.acquire(&request).await.expect("acquire");
    let held = exclusive(&request.key, token.expect("free").token);
    session.release(&held).await.expect("release");

    let before = connections_received(&server);
    proxy.set(Fault::Blackhole);
    let request = AcquireRequest::new("limit/second", Mode::Exclusive);
    let err = session
        .acquire(&request)
        .await
        .expect_err("nothing answers");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("did not answer in 295ms"), "{err}");
    proxy.set(Fault::None);
    // One reading of the count, and at least the new connection.
    let made = connections_received(&server) - before;
    assert!(made >= 2, "no new connection after the timeout ({made})");
}

/// Whether `watch_key` pushes with Redis's `notify-keyspace-events` set
/// to `flags`.
async fn pushes_with(server: &Redis, store: &RedisStore, flags: &str) -> bool {
    server.cli(&["CONFIG", "SET", "notify-keyspace-events", flags]);
    store
        .watch_key("watch/flags")
        .await
        .unwrap_or_else(|err| panic!("{flags}: {err}"))
        .is_some()
}

/// Observers are pushed only where Redis publishes keyspace events with
/// every class a lock's change falls in; elsewhere they poll, as a watch
/// that never fires would leave them waiting.
#[tokio::test]
async fn a_watch_is_pushed_only_where_redis_publishes_every_change() {
    let server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    for (flags, pushed) in [
        ("K$gxz", true),
        ("KA", true),
        ("AKE", true),
        ("Kgxz$", true),
        ("", false),
        ("EA", false),
        ("E$gxz", false),
        ("K$gx", false),
        ("Kgxz", false),
    ] {
        assert_eq!(pushes_with(&server, &store, flags).await, pushed, "{flags}");
    }
    // Pushed: a lock taken sends a signal.
    server.cli(&["CONFIG", "SET", "notify-keyspace-events", "K$gxz"]);
    let mut watch = store
        .watch_key("watch/flags")
        .await
        .expect("watch")
        .expect("pushed");
    let session = store.open_session(&ten_seconds()).await.expect("open");
    let request = AcquireRequest::new("watch/flags", Mode::Exclusive);
    session.acquire(&request).await.expect("acquire");
    timeout(Duration::from_secs(5), watch.recv())
        .await
        .expect("a signal within 5 s")
        .expect("the watch goes on");
}

/// A Redis that refuses `CONFIG` (an ACL, a managed service) leaves
/// observers to poll; it is no error.
#[tokio::test]
async fn a_watch_where_config_is_refused_leaves_observers_to_poll() {
    let server = Redis::start();
    server.cli(&[
        "ACL", "SETUSER", "observer", "on", ">pw", "~*", "&*", "+@all", "-config",
    ]);
    let url = format!("redis://observer:pw@{}", server.address());
    let store = RedisStore::connect(&url).await.expect("connect");
    let watch = store.watch_key("watch/refused").await.expect("no error");
    assert!(watch.is_none(), "a watch where CONFIG is refused");
}

/// A Redis that does not answer is an error for the watch, not a reason to
/// poll: the observer is told it cannot see the key.
#[tokio::test]
async fn a_watch_on_a_redis_that_does_not_answer_fails_unavailable() {
    let server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    store.watch_key("watch/silent").await.expect("watch");
    server.pause();
    let answer = timeout(Duration::from_secs(10), store.watch_key("watch/silent")).await;
    server.resume();
    let err = answer.expect("within 10 s").expect_err("nothing answers");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

/// A script that Redis runs and refuses (here a lock key of the wrong type,
/// written from outside) is an error, sent once: only `NOSCRIPT` is worth
/// loading the script again for.
#[tokio::test]
async fn a_script_redis_refuses_is_sent_once() {
    let server = Redis::start();
    let (_store, session) = session_on(&server.url()).await;
    // Loads the acquire script (shared locks go to it at once).
    let loaded = AcquireRequest::new("refused/loaded", Mode::Shared);
    session
        .acquire(&loaded)
        .await
        .expect("acquire")
        .expect("free");
    server.cli(&["RPUSH", "dl:{refused/wrong-type}", "x"]);
    let request = AcquireRequest::new("refused/wrong-type", Mode::Shared);
    // The first refusal loads the take-back's script too.
    session.acquire(&request).await.expect_err("wrong type");
    let before = script_calls(&server);
    let err = session.acquire(&request).await.expect_err("wrong type");
    // Redis answered: the message says so, and not to check that it runs.
    assert!(err.to_string().contains("Redis refused: "), "{err}");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert!(!err.to_string().contains("redis-server"), "{err}");
    // The acquire and its take-back, each sent once.
    assert_eq!(script_calls(&server) - before, 2, "sent again: {err}");
}

/// A session's close gives back only what it still holds: a lock it
/// released, or one that renewal found lost, is not released again. A
/// hold lost everywhere is not taken back either.
#[tokio::test]
async fn a_close_releases_only_what_is_still_held() {
    let server = Redis::start();
    let (_store, session) = session_on(&server.url()).await;
    let mut held = Vec::new();
    for key in ["close/released", "close/lost"] {
        let request = AcquireRequest::new(key, Mode::Exclusive);
        let grant = session.acquire(&request).await.expect("acquire");
        held.push(HeldLock {
            key: key.to_owned(),
            mode: Mode::Exclusive,
            token: grant.expect("free").token,
        });
    }
    session.release(&held[0]).await.expect("release");
    // Loads the renewal's script.
    let report = session.renew(&held[1..]).await.expect("renew answers");
    assert!(report.lost_keys.is_empty(), "{:?}", report.lost_keys);
    server.cli(&["DEL", "dl:{close/lost}"]);
    let before = script_calls(&server);
    let report = session.renew(&held[1..]).await.expect("renew answers");
    assert_eq!(report.lost_keys, ["close/lost"]);
    // Lost everywhere: nothing to take back (that would run in the
    // background, now).
    sleep(Duration::from_millis(200)).await;
    assert_eq!(script_calls(&server) - before, 1, "beyond the renewal");
    let before = script_calls(&server);
    session.close().await.expect("close");
    assert_eq!(script_calls(&server), before, "released again at close");
}

/// A Redlock grant whose instances' counters disagree takes the highest
/// token, and is used only once the lower counter is raised to it in time:
/// where the raise is refused, or lands after the lease would have ended,
/// the acquire fails, saying why. Instances `behind` (through a proxy) and
/// `ahead` answer; the third is down, so that both must grant.
#[tokio::test]
async fn a_redlock_grant_is_used_once_its_token_is_raised_on_a_majority() {
    let (behind, ahead) = (Redis::start(), Redis::start());
    let proxy = Proxy::start(behind.address().parse().expect("address")).await;
    let down = distlock_testkit::daemon::free_port();
    let url = format!(
        "redlock://{},{},127.0.0.1:{down}",
        proxy.addr(),
        ahead.address()
    );
    let store = RedisStore::connect(&url).await.expect("two of three up");
    let options = SessionOptions::new(Duration::from_secs(1), Duration::ZERO);
    let session = store.open_session(&options).await.expect("open");
    let acquire = |key: &'static str| {
        ahead.cli(&["SET", &format!("dl:{{{key}}}:f"), "100"]);
        let session = &session;
        async move {
            let request = AcquireRequest::new(key, Mode::Exclusive);
            session.acquire(&request).await
        }
    };

    // The raise refused: `behind` may run no script.
    behind.cli(&["ACL", "SETUSER", "default", "-evalsha"]);
    let err = acquire("settle/refused").await.expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("could not be written"), "{err}");
    behind.cli(&["ACL", "SETUSER", "default", "+evalsha"]);

    // The raise lands past the lease (1 s less 12 ms): each way to
    // `behind` takes 300 ms, so the grant takes 600 ms, and the raise 600
    // more (1.8 s here: its script is loaded first).
    proxy.set(Fault::Delay(Duration::from_millis(300)));
    let err = acquire("settle/late").await.expect_err("late");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains("took longer than the lease"),
        "{err}"
    );
    proxy.set(Fault::None);

    // In time: the highest token, raised where it was behind and asked of
    // no instance that had it.
    let scripts = script_calls(&ahead);
    let grant = acquire("settle/in-time").await.expect("acquire");
    assert_eq!(grant.expect("free").token, 101);
    assert_eq!(behind.cli(&["GET", "dl:{settle/in-time}:f"]), "101");
    assert_eq!(script_calls(&ahead), scripts, "a raise sent to `ahead`");
}

/// A Redlock acquire and a renewal are decided once a majority answered:
/// an instance that does not answer holds neither up (here until its
/// connection gives the call up, after 2 s).
#[tokio::test]
async fn a_silent_redlock_instance_holds_no_acquire_or_renewal_up() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let proxy = Proxy::start(servers[2].address().parse().expect("address")).await;
    let url = format!(
        "redlock://{},{},{}",
        servers[0].address(),
        servers[1].address(),
        proxy.addr()
    );
    let store = RedisStore::connect(&url).await.expect("connect");
    let options = SessionOptions::new(Duration::from_secs(10), Duration::ZERO);
    let session = store.open_session(&options).await.expect("open");
    proxy.set(Fault::Blackhole);
    let request = AcquireRequest::new("redlock/silent", Mode::Exclusive);
    let grant = timeout(Duration::from_secs(1), session.acquire(&request))
        .await
        .expect("granted by two of three at once")
        .expect("acquire")
        .expect("free");
    let held = exclusive(&request.key, grant.token);
    let report = timeout(Duration::from_secs(1), session.renew(&[held]))
        .await
        .expect("renewed by two of three at once")
        .expect("renew");
    assert!(report.lost_keys.is_empty(), "{:?}", report.lost_keys);
}

/// A Redlock acquire that finds too few instances up fails at its fast
/// try, having only taken back what it wrote there: it does not go on to
/// join a queue it cannot have a majority of.
#[tokio::test]
async fn a_redlock_acquire_without_a_majority_fails_at_its_fast_try() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let (_store, session) = redlock_session(&servers).await;
    servers[1].kill();
    servers[2].kill();
    for key in ["majority/loads-the-scripts", "majority/counted"] {
        let before = script_calls(&servers[0]);
        let request = AcquireRequest::new(key, Mode::Exclusive);
        let err = session.acquire(&request).await.expect_err("one of three");
        assert_answered(&err, 1);
        if key == "majority/counted" {
            let sent = script_calls(&servers[0]) - before;
            assert_eq!(sent, 1, "scripts beyond the take-back");
        }
    }
}

/// A try of a key another session holds asks the queue once and takes
/// nothing back: its fast try was refused and wrote nothing.
#[tokio::test]
async fn a_refused_fast_try_has_nothing_to_take_back() {
    let server = Redis::start();
    let (store, holder) = session_on(&server.url()).await;
    let other = store.open_session(&ten_seconds()).await.expect("open");
    // The first key loads the scripts the second then only runs.
    for key in ["refused/loads-the-scripts", "refused/counted"] {
        let request = AcquireRequest::new(key, Mode::Exclusive);
        holder
            .acquire(&request)
            .await
            .expect("acquire")
            .expect("free");
        let before = script_calls(&server);
        let tried = other.acquire(&request).await.expect("an answer");
        assert!(tried.is_none(), "{key} granted twice");
        if key == "refused/counted" {
            assert_eq!(script_calls(&server) - before, 1, "beyond the queue's ask");
        }
    }
}

/// What a minority of Redlock instances granted at the fast try is given
/// back at once: once the waiter, granted by the others, releases, every
/// instance is free (not held by its fast try until the lease ends).
#[tokio::test]
async fn a_minoritys_fast_grant_is_given_back_at_once() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let (_store, session) = redlock_session(&servers).await;
    let key = "redlock/minority";
    let main = format!("dl:{{{key}}}");
    // A fast hold of another session on two of the three, for 2 s.
    for server in &servers[1..] {
        server.cli(&["SET", &main, "other|0|0", "PX", "2000"]);
    }
    let mut request = AcquireRequest::new(key, Mode::Exclusive);
    request.wait_until = Some(Instant::now() + Duration::from_secs(10));
    let grant = session.acquire(&request).await.expect("acquire");
    let held = exclusive(
        key,
        grant.expect("granted once the other's lease ran out").token,
    );
    session.release(&held).await.expect("release");
    let deadline = Instant::now() + Duration::from_secs(1);
    while servers
        .iter()
        .any(|server| server.cli(&["EXISTS", &main]) != "0")
    {
        assert!(
            Instant::now() < deadline,
            "an instance still held after the release"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// `MULTI`s the server has run so far: one per fast try.
fn fast_tries(server: &Redis) -> u64 {
    server.calls("multi")
}

/// Three rounds of a holder and a waiter on one key: in each, the
/// waiter's fast tries (`MULTI`s, on every instance) and the scripts
/// run from the holder's release to the waiter's grant.
async fn contended_rounds(url: &str, servers: &[Redis]) -> (Vec<u64>, Vec<u64>) {
    let store = RedisStore::connect(url).await.expect("connect");
    let options = SessionOptions::new(Duration::from_secs(10), Duration::ZERO);
    let holder = store.open_session(&options).await.expect("open");
    let waiter = store.open_session(&options).await.expect("open");
    let mut request = AcquireRequest::new("contended/stays", Mode::Exclusive);
    let held_as = |token| HeldLock {
        key: request.key.clone(),
        mode: Mode::Exclusive,
        token,
    };
    let total = |count: fn(&Redis) -> u64| servers.iter().map(count).sum::<u64>();
    let (mut tries, mut hand_overs) = (Vec::new(), Vec::new());
    let main = format!("dl:{{{}}}", request.key);
    for _ in 0..3 {
        let grant = holder.acquire(&request).await.expect("acquire");
        let held = held_as(grant.expect("free").token);
        // Redlock's grant is decided at a majority: the last instance's
        // fast try may still be on its way.
        while servers
            .iter()
            .any(|server| server.cli(&["EXISTS", &main]) != "1")
        {
            sleep(Duration::from_millis(10)).await;
        }
        let before = total(fast_tries);
        request.wait_until = Some(Instant::now() + Duration::from_secs(10));
        let (waited, (released, scripts)) = tokio::join!(waiter.acquire(&request), async {
            sleep(Duration::from_millis(300)).await;
            let scripts = total(script_calls);
            (holder.release(&held).await, scripts)
        });
        request.wait_until = None;
        released.expect("release");
        tries.push(total(fast_tries) - before);
        hand_overs.push(total(script_calls) - scripts);
        let grant = waited.expect("acquire").expect("handed over");
        waiter
            .release(&held_as(grant.token))
            .await
            .expect("release");
    }
    (tries, hand_overs)
}

/// A key a session found taken goes straight to the queue on its next
/// acquires, as long as they find it taken too: no fast try, which would
/// only be refused. Each is granted by the hand-over's message, without
/// asking again.
#[tokio::test]
async fn a_key_found_taken_goes_straight_to_the_queue_while_it_stays_taken() {
    let server = Redis::start();
    let (tries, hand_overs) = contended_rounds(&server.url(), std::slice::from_ref(&server)).await;
    assert_eq!(tries, [1, 0, 0], "fast tries of the waiter's acquires");
    // From the release to the grant: the release alone (the first loads
    // its script).
    assert_eq!(hand_overs[1..], [1, 1], "scripts from release to grant");
}

/// On Redlock too, a waiter is granted by the hand-overs' messages
/// without asking again: no forced release was at work.
#[tokio::test]
async fn a_redlock_waiter_is_granted_by_its_messages_alone() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let (tries, hand_overs) = contended_rounds(&redlock_url(&servers), &servers).await;
    assert_eq!(tries, [3, 0, 0], "fast tries of the waiter's acquires");
    // The releases (the third may still be on its way).
    for scripts in &hand_overs[1..] {
        assert!((2..=3).contains(scripts), "{hand_overs:?}");
    }
}

/// A Redlock renewal that reaches one instance of three is neither a
/// renewal nor a loss: the instances that did not answer may hold still.
/// It fails as unavailable, counting what answered.
#[tokio::test]
async fn a_redlock_renewal_without_a_majority_counts_what_answered() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let (_store, session) = redlock_session(&servers).await;
    let request = AcquireRequest::new("redlock/renewal-minority", Mode::Exclusive);
    let grant = session.acquire(&request).await.expect("acquire");
    let held = exclusive(&request.key, grant.expect("free").token);
    servers[1].kill();
    servers[2].kill();
    let err = session.renew(&[held]).await.expect_err("one of three");
    assert_answered(&err, 1);
}

/// A Redlock renewal that finds the hold on one instance, not on another,
/// and no answer from the third cannot tell held from lost: the third may
/// hold it still. It fails as unavailable, for the core to ask again,
/// rather than report the lock lost.
#[tokio::test]
async fn a_redlock_renewal_that_cannot_tell_held_from_lost_asks_again() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let (_store, session) = redlock_session(&servers).await;
    let key = "redlock/renewal-undecided";
    let request = AcquireRequest::new(key, Mode::Exclusive);
    let grant = session.acquire(&request).await.expect("acquire");
    let held = exclusive(key, grant.expect("free").token);
    servers[1].cli(&["DEL", &format!("dl:{{{key}}}")]);
    servers[2].kill();
    let renewed = session.renew(std::slice::from_ref(&held)).await;
    let err = renewed.expect_err("undecided");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

/// After a forced release on Redlock, a waiter asks every instance again
/// before it counts the hand-overs the force made as a majority: the
/// force runs on each instance apart, and may have ended on one a
/// hand-over the waiter counted (docs/0003).
#[tokio::test]
async fn a_waiter_asks_again_before_it_counts_a_forced_hand_over() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let store = RedisStore::connect(&redlock_url(&servers))
        .await
        .expect("connect");
    let options = SessionOptions::new(Duration::from_secs(10), Duration::ZERO);
    let holder = store.open_session(&options).await.expect("open");
    let waiter = store.open_session(&options).await.expect("open");
    // Loads the forced release's script everywhere.
    store
        .force_release("forced/warm", "test")
        .await
        .expect("force");
    let key = "forced/confirm";
    let mut request = AcquireRequest::new(key, Mode::Exclusive);
    holder
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    request.wait_until = Some(Instant::now() + Duration::from_secs(10));
    let (granted, before) = tokio::join!(waiter.acquire(&request), async {
        sleep(Duration::from_millis(300)).await;
        let before: Vec<u64> = servers.iter().map(script_calls).collect();
        store.force_release(key, "test").await.expect("force");
        before
    });
    granted.expect("acquire").expect("handed over by the force");
    let sent: Vec<u64> = servers
        .iter()
        .zip(before)
        .map(|(server, before)| script_calls(server) - before)
        .collect();
    assert_eq!(sent, [2, 2, 2], "the force and the waiter's ask, each");
}

/// Three Redlock waiters each first in the queue of a different instance:
/// the holder's release hands each one instance, and nobody has a
/// majority. They must see the split, give everything back and join
/// again, until each is granted in turn. Each waiter reaches its own
/// instance at once and the other two through proxies that hold every
/// chunk 300 ms, so that it is first in its own instance's queue, and
/// stays first there after a split unless the pauses before joining again
/// differ by more than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_way_split_vote_is_resolved() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let mut proxies = Vec::new();
    let mut waiters = Vec::new();
    let options = SessionOptions::new(Duration::from_secs(30), Duration::ZERO);
    for own in 0..3 {
        let mut hosts = Vec::new();
        for (index, server) in servers.iter().enumerate() {
            if index == own {
                hosts.push(server.address());
            } else {
                let proxy = Proxy::start(server.address().parse().expect("address")).await;
                proxy.set(Fault::Delay(Duration::from_millis(300)));
                hosts.push(proxy.addr().to_string());
                proxies.push(proxy);
            }
        }
        let url = format!("redlock://{}", hosts.join(","));
        let store = RedisStore::connect(&url).await.expect("connect");
        let session = store.open_session(&options).await.expect("open");
        waiters.push((store, session));
    }
    let holder_store = RedisStore::connect(&redlock_url(&servers))
        .await
        .expect("connect");
    let holder = holder_store.open_session(&options).await.expect("open");
    let key = "redlock/split";
    let mut request = AcquireRequest::new(key, Mode::Exclusive);
    let grant = holder.acquire(&request).await.expect("acquire");
    let held = exclusive(key, grant.expect("free").token);
    request.wait_until = Some(Instant::now() + Duration::from_secs(40));
    let waits = waiters.iter().map(|(_, session)| {
        let request = request.clone();
        async move {
            let grant = session.acquire(&request).await.expect("acquire");
            let grant = grant.expect("granted before the deadline");
            let held = exclusive(&request.key, grant.token);
            session.release(&held).await.expect("release");
            grant.token
        }
    });
    let queue = format!("dl:{{{key}}}:q");
    let (tokens, ()) = tokio::join!(futures::future::join_all(waits), async {
        // Every waiter queued everywhere, first in its own instance's queue.
        let deadline = Instant::now() + Duration::from_secs(20);
        while servers
            .iter()
            .any(|server| server.cli(&["ZCARD", &queue]) != "3")
        {
            assert!(Instant::now() < deadline, "the waiters never all queued");
            sleep(Duration::from_millis(50)).await;
        }
        let heads: std::collections::BTreeSet<String> = servers
            .iter()
            .map(|server| server.cli(&["ZRANGE", &queue, "0", "0"]))
            .map(|head| head.split('|').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            heads.len(),
            3,
            "a different session first on each: {heads:?}"
        );
        holder.release(&held).await.expect("release");
    });
    let mut sorted = tokens.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "one token each: {tokens:?}");
}

/// A wait that runs out leaves no place in the queue behind it: the next
/// waiter is not kept behind a place nobody holds.
#[tokio::test]
async fn a_wait_that_runs_out_leaves_no_place() {
    let server = Redis::start();
    let (store, holder) = session_on(&server.url()).await;
    let waiter = store.open_session(&ten_seconds()).await.expect("open");
    let mut request = AcquireRequest::new("queue/ran-out", Mode::Exclusive);
    holder
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    request.wait_until = Some(Instant::now() + Duration::from_millis(300));
    let waited = waiter.acquire(&request).await.expect("an answer");
    assert!(waited.is_none(), "granted while held");
    assert_eq!(server.cli(&["ZCARD", "dl:{queue/ran-out}:q"]), "0");
}

/// A Redlock waiter granted one instance while the holder keeps the other
/// two is no split: it keeps its grant and its places, and so its turn
/// ahead of a waiter that came after it, and the two wait without asking
/// anything. The holder's store reaches the first instance through a
/// proxy that carries nothing, so that its hold is on the other two only.
#[tokio::test]
async fn a_waiter_holding_a_minority_beside_a_majority_keeps_its_turn() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let proxy = Proxy::start(servers[0].address().parse().expect("address")).await;
    let holder_url = format!(
        "redlock://{},{},{}",
        proxy.addr(),
        servers[1].address(),
        servers[2].address()
    );
    let holder_store = RedisStore::connect(&holder_url).await.expect("connect");
    let store = RedisStore::connect(&redlock_url(&servers))
        .await
        .expect("connect");
    let options = SessionOptions::new(Duration::from_secs(10), Duration::ZERO);
    let holder = holder_store.open_session(&options).await.expect("open");
    let waiters = [
        store.open_session(&options).await.expect("open"),
        store.open_session(&options).await.expect("open"),
    ];
    let key = "redlock/minority-turn";
    proxy.set(Fault::Blackhole);
    let mut request = AcquireRequest::new(key, Mode::Exclusive);
    let grant = holder.acquire(&request).await.expect("acquire");
    let held = exclusive(key, grant.expect("two of three").token);
    request.wait_until = Some(Instant::now() + Duration::from_secs(20));
    let order = std::sync::Mutex::new(Vec::new());
    let waits = waiters.iter().enumerate().map(|(index, waiter)| {
        let (request, order) = (request.clone(), &order);
        let queue = format!("dl:{{{}}}:q", request.key);
        let server = &servers[1];
        async move {
            // The second joins once the first is queued everywhere.
            while index > 0 && server.cli(&["ZCARD", &queue]) != "1" {
                sleep(Duration::from_millis(10)).await;
            }
            let grant = waiter.acquire(&request).await.expect("acquire");
            order.lock().expect("order").push(index);
            let held = exclusive(&request.key, grant.expect("granted").token);
            waiter.release(&held).await.expect("release");
        }
    });
    let total = || servers.iter().map(script_calls).sum::<u64>();
    let (_, quiet) = tokio::join!(futures::future::join_all(waits), async {
        sleep(Duration::from_millis(300)).await;
        let before = total();
        sleep(Duration::from_millis(600)).await;
        let quiet = total() - before;
        holder.release(&held).await.expect("release");
        quiet
    });
    assert_eq!(quiet, 0, "scripts while both waited");
    assert_eq!(*order.lock().expect("order"), [0, 1]);
}
