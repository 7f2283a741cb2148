//! Redlock holds that a majority of the instances no longer has: the
//! take-back of what a minority kept leaves the lock-delay where the lease
//! is over, a release that cannot know is `Unavailable`, and a waiter does
//! not count a hand-over that a forced release ended. The
//! instances' state is written directly with `redis-cli` where a test
//! needs one instance to differ from the others.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::{AcquireRequest, HeldLock, LockStore, SessionOptions};
use distlock_core::{Client, ErrorKind, Mode};
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;
use tokio::time::{sleep, timeout, Instant};

/// The lease of sessions that must not lapse.
const TTL: Duration = Duration::from_secs(10);
/// The lock-delay of the holder whose take-back is looked at.
const LOCK_DELAY: Duration = Duration::from_secs(60);
/// How long anything that must happen may take.
const PATIENCE: Duration = Duration::from_secs(30);
/// Long enough for a just-spawned waiter to be queued at the store.
const SETTLE: Duration = Duration::from_millis(300);

async fn redlock(servers: &[Redis]) -> RedisStore {
    let addresses: Vec<String> = servers.iter().map(Redis::address).collect();
    let url = format!("redlock://{}", addresses.join(","));
    RedisStore::connect(&url).await.expect("connect")
}

fn main_key(key: &str) -> String {
    format!("dl:{{{key}}}")
}

/// How many EVALSHA calls `server` ran without an error (a NOSCRIPT
/// answer is counted as a call too, and then as failed).
fn scripts_run(server: &Redis) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    let Some(line) = stats
        .lines()
        .find(|line| line.starts_with("cmdstat_evalsha:"))
    else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        line.split([':', ','])
            .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    field("calls") - field("failed_calls")
}

/// Waits until each of `servers` ran `at_least` scripts.
async fn until_scripts_ran(servers: &[&Redis], at_least: &[u64]) {
    let deadline = Instant::now() + PATIENCE;
    for (server, at_least) in servers.iter().zip(at_least) {
        while scripts_run(server) < *at_least {
            assert!(Instant::now() < deadline, "{} idle", server.address());
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until `server` no longer has the main key of `key`.
async fn until_gone_from(server: &Redis, key: &str) {
    let deadline = Instant::now() + PATIENCE;
    while server.cli(&["EXISTS", &main_key(key)]) != "0" {
        assert!(
            Instant::now() < deadline,
            "{key} stayed on {}",
            server.address()
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The server's clock, in ms.
fn server_now(server: &Redis) -> u64 {
    let time = server.cli(&["TIME"]);
    let mut parts = time.lines().map(|part| part.trim().parse::<u64>());
    let seconds = parts.next().and_then(Result::ok).expect("seconds");
    let micros = parts.next().and_then(Result::ok).expect("microseconds");
    seconds * 1000 + micros / 1000
}

/// The last renewal reached one instance late: its lease runs on there,
/// while on the two others it is over and the lock-delay runs. The next
/// renewal reports the key lost, and the take-back of what the one kept
/// must leave the lock-delay on the others: the key stays blocked. Both
/// states of a lock: a fast hold, and a shared hold in the queued state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_take_back_of_a_lost_hold_leaves_its_lock_delay() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let (late, others) = (&servers[2], [&servers[0], &servers[1]]);
    let store = redlock(&servers).await;
    let holder = store
        .open_session(&SessionOptions::new(TTL, LOCK_DELAY))
        .await
        .expect("open");
    let next = store
        .open_session(&SessionOptions::new(TTL, Duration::ZERO))
        .await
        .expect("open");
    for (key, mode) in [
        ("lost/take-back/fast", Mode::Exclusive),
        ("lost/take-back/read", Mode::Shared),
    ] {
        let request = AcquireRequest::new(key, mode);
        let grant = holder.acquire(&request).await.expect("acquire");
        let held = HeldLock {
            key: key.to_owned(),
            mode,
            token: grant.expect("free").token,
        };
        let main = main_key(key);
        if mode == Mode::Exclusive {
            let member = servers
                .iter()
                .map(|server| server.cli(&["GET", &main]))
                .find(|member| !member.is_empty())
                .expect("held on a majority");
            let over = (LOCK_DELAY.as_millis() - 10_000).to_string();
            for server in others {
                server.cli(&["SET", &main, &member, "PX", &over]);
            }
            let lease = (LOCK_DELAY.as_millis() + TTL.as_millis()).to_string();
            late.cli(&["SET", &main, &member, "PX", &lease]);
        } else {
            let holders = format!("{main}:h");
            let member = late.cli(&["ZRANGE", &holders, "0", "-1"]);
            for server in others {
                let ended = (server_now(server) - 1000).to_string();
                assert_eq!(
                    server.cli(&["ZADD", &holders, "XX", "CH", &ended, &member]),
                    "1"
                );
            }
        }
        let before: Vec<u64> = others.iter().map(|server| scripts_run(server)).collect();

        let report = holder.renew(std::slice::from_ref(&held)).await;
        assert_eq!(report.expect("renew").lost_keys, [key.to_owned()]);
        // What the late instance kept is taken back; the renewal and the
        // take-back ran on the others too.
        until_gone_from(late, key).await;
        let after: Vec<u64> = before.iter().map(|count| count + 2).collect();
        until_scripts_ran(&others, &after).await;

        for server in others {
            assert_eq!(server.cli(&["EXISTS", &main]), "1", "{key}: delay erased");
        }
        let try_next = AcquireRequest::new(key, Mode::Exclusive);
        let taken = next.acquire(&try_next).await.expect("acquire");
        assert!(taken.is_none(), "{key} granted during the lock-delay");
    }
}

/// With two of three instances down and the third not holding the key,
/// nobody can say whether it was held: the release is `Unavailable`, not
/// `NotHeld`, and asked again it still is (the hold is not forgotten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_cannot_know_is_unavailable() {
    let mut servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let store = redlock(&servers).await;
    let session = store
        .open_session(&SessionOptions::new(TTL, Duration::ZERO))
        .await
        .expect("open");
    let key = "lost/release/unknown";
    let request = AcquireRequest::new(key, Mode::Exclusive);
    let grant = session.acquire(&request).await.expect("acquire");
    let held = HeldLock {
        key: key.to_owned(),
        mode: Mode::Exclusive,
        token: grant.expect("free").token,
    };
    // Waits for every instance, after the acquire's calls on the same
    // connections: no SET of the acquire can land after the DEL.
    let query = distlock_core::status::StatusQuery::Key(key.to_owned());
    store.status(&query).await.expect("status");
    servers[2].cli(&["DEL", &main_key(key)]);
    servers[0].kill();
    servers[1].kill();

    for attempt in ["first", "second"] {
        let err = session.release(&held).await.expect_err("two are down");
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{attempt}: {err}");
        assert!(err.to_string().contains("only 1 of 3"), "{attempt}: {err}");
    }
}

/// How many of the instances (each read alone) list a holder of `key`
/// owned by `owner`.
async fn holding_on(instances: &[RedisStore], key: &str, owner: &str) -> usize {
    let query = distlock_core::status::StatusQuery::Key(key.to_owned());
    let mut count = 0;
    for instance in instances {
        let status = instance.status(&query).await.expect("status");
        let holders = status.keys.iter().flat_map(|key| &key.holders);
        count += usize::from(holders.into_iter().any(|holder| holder.owner == owner));
    }
    count
}

/// A waiter handed the key on one instance, whose hand-over a forced
/// release then ends there (and hands on to the next waiter), must not
/// count that instance when a second one hands it the key: the first of
/// the two waiters to be granted holds on a majority, as the instances
/// themselves say, and the other still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_that_a_forced_release_ended_is_not_counted() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    let store = Arc::new(redlock(&servers).await);
    let mut alone = Vec::new();
    for server in &servers {
        alone.push(RedisStore::connect(&server.url()).await.expect("connect"));
    }
    let key = "lost/forced/hand-over";
    // A reader that never lapses holds the key on every instance (an ask
    // waits for all three).
    let reader = store
        .open_session(&SessionOptions::new(PATIENCE * 4, Duration::ZERO))
        .await
        .expect("open");
    let read = reader
        .acquire(&AcquireRequest::new(key, Mode::Shared))
        .await
        .expect("acquire");
    assert!(read.is_some(), "free");
    let client = Client::new(Arc::clone(&store) as Arc<dyn LockStore>);
    let mut waiters = Vec::new();
    for owner in ["first waiter", "second waiter"] {
        let session = client
            .session()
            .ttl(TTL)
            .owner(owner)
            .open()
            .await
            .expect("open");
        waiters.push(tokio::spawn(async move {
            let guard = session.lock(key).wait(PATIENCE).await;
            (guard.expect("granted in time"), session, owner)
        }));
        sleep(SETTLE).await;
    }
    let (mut first, mut second) = (waiters.remove(0), waiters.remove(0));

    // The first waiter is handed the key on the first instance, and looks
    // into who holds the others (a majority: the reader) meanwhile.
    alone[0].force_release(key, "test").await.expect("force");
    sleep(SETTLE).await;
    // Its hand-over there is ended and the second waiter's; then the
    // second instance hands the key to the first waiter.
    alone[0].force_release(key, "test").await.expect("force");
    alone[1].force_release(key, "test").await.expect("force");

    let (winner, loser) = timeout(PATIENCE, async {
        tokio::select! {
            won = &mut first => (won.expect("task"), second),
            won = &mut second => (won.expect("task"), first),
        }
    })
    .await
    .expect("one of them is granted");
    let owner = winner.2;
    let held = holding_on(&alone, key, owner).await;
    assert!(held >= 2, "{owner} was granted but holds on {held} of 3");
    assert!(!loser.is_finished(), "both waiters were granted");
    loser.abort();
}
