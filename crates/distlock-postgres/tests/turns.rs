//! Lease mode's wake-ups (docs/0007, "One waiter woken"): a release wakes
//! the earliest waiter that wants the key alone, on its store's channel,
//! and every waiter when that cannot be done safely.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock_core::{Client, Guard};
use distlock_postgres::PostgresStore;
use distlock_testkit::servers::Postgres;
use distlock_testkit::with_waiters;
use tokio::task::JoinHandle;

/// The sessions' lease: a waiter's own timer (half of it) is far longer
/// than the 10 s in which each test wants a woken waiter granted.
const TTL: Duration = Duration::from_secs(60);

async fn connect() -> Client {
    let url = format!("{}?mode=lease", Postgres::shared().url());
    let store = PostgresStore::connect(&url)
        .await
        .expect("connect to the test's PostgreSQL");
    Client::new(Arc::new(store))
}

/// Holds `key`, from a session of its own.
async fn hold(client: &Client, key: &str) -> Guard {
    let holder = client.session().ttl(TTL).open().await.expect("open");
    let held = holder.lock(key).try_lock().await.expect("try");
    held.expect("a free key")
}

/// Starts a wait for `key` from a session of its own; returns once
/// `status` shows `count` waiters of the key, this one among them.
async fn queue(
    client: &Client,
    key: &'static str,
    count: usize,
) -> JoinHandle<distlock_core::Result<Guard>> {
    let session = client.session().ttl(TTL).open().await.expect("open");
    let waiting =
        tokio::spawn(async move { session.lock(key).wait(Duration::from_secs(300)).await });
    with_waiters(client, key, count).await;
    waiting
}

/// The lock a wait was granted, which must come within 10 s.
async fn granted(waiting: JoinHandle<distlock_core::Result<Guard>>, why: &str) -> Guard {
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("{why}"))
        .expect("task")
        .expect("wait")
}

/// The waiter records of `key` on the shared server, earliest first: the
/// waiter's name, the row's version (`xmin`, new with each change of it)
/// and whether a release woke it.
fn waiter_rows(key: &str) -> Vec<String> {
    Postgres::shared()
        .psql(&format!(
            "SELECT waiter || ' ' || xmin || ' ' || coalesce(woken::text, '-') || ' ' \
                 || coalesce(channel, '-') \
             FROM distlock_waiters WHERE key = '{key}' ORDER BY since"
        ))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The waiter records of `key` once `count` are there and none has changed
/// for three reads in a row, 100 ms apart: each waiter is past its first
/// look (10 ms after it registered), and sleeps until woken.
async fn settled(key: &str, count: usize) -> Vec<String> {
    let started = Instant::now();
    let (mut last, mut same) = (Vec::new(), 0);
    loop {
        let now = waiter_rows(key);
        same = if now == last { same + 1 } else { 0 };
        if now.len() == count && same == 2 {
            return now;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{now:?}");
        last = now;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The channel of a waiter's row, as `waiter_rows` gives it.
fn channel(row: &str) -> &str {
    row.rsplit(' ').next().unwrap_or_default()
}

/// A waiter's record as a client that died mid-wait leaves it: before any
/// other, waiting for the key alone, on a channel nobody listens to.
fn dead_waiter(key: &str) -> String {
    let dead = "dead|0000000000000000";
    Postgres::shared().psql(&format!(
        "INSERT INTO distlock_waiters (key, waiter, until, mode, owner, since, channel) \
         VALUES ('{key}', '{dead}', clock_timestamp() + interval '10 minutes', 'x', 'dead', \
                 clock_timestamp() - interval '1 minute', 'distlock_turn_dead')"
    ));
    dead.to_owned()
}

/// A release of a key that exclusive waiters wait on wakes the earliest of
/// them alone: the others make no statement until their turn (their rows
/// stay as they were), and each turn comes at once, not at the waiter's
/// timer (half its 60 s lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_the_earliest_exclusive_waiter_alone() {
    let key = "turn/one";
    let client = connect().await;
    let mut held = hold(&client, key).await;
    let mut waiting = Vec::new();
    for count in 1..=3 {
        waiting.push(queue(&client, key, count).await);
    }
    let mut rest = settled(key, 3).await;
    for turn in waiting {
        held.release().await.expect("release");
        held = granted(turn, "a waiter slept through its turn").await;
        rest.remove(0);
        assert_eq!(waiter_rows(key), rest, "a release woke a later waiter");
    }
    held.release().await.expect("release");
}

/// A waiter that was woken and never asked again (its client died) is
/// passed over by the next release: it costs the key one wake-up, not
/// every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_waiter_that_never_asks_again_is_passed_over() {
    let key = "turn/dead";
    let client = connect().await;
    let held = hold(&client, key).await;
    let dead = dead_waiter(key);
    let waiting = queue(&client, key, 2).await;
    settled(key, 2).await;
    held.release().await.expect("release");
    let rows = waiter_rows(key);
    assert!(
        rows[0].starts_with(&format!("{dead} ")) && rows[0].contains(" true "),
        "the release did not wake the earliest waiter: {rows:?}"
    );
    // The live waiter sleeps on; the next release passes the dead one over.
    hold(&client, key).await.release().await.expect("release");
    let granted = granted(waiting, "the release woke the dead waiter again").await;
    granted.release().await.expect("release");
    Postgres::shared().psql(&format!("DELETE FROM distlock_waiters WHERE key = '{key}'"));
}

/// A release of an observed key tells the observers, though a waiter is
/// there that it could wake alone: the observer's record makes it notify
/// every listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_of_an_observed_key_tells_the_observers() {
    use distlock_core::store::LockStore;

    let key = "turn/observed";
    let url = format!("{}?mode=lease", Postgres::shared().url());
    let store = Arc::new(PostgresStore::connect(&url).await.expect("connect"));
    let client = Client::new(store.clone());
    let held = hold(&client, key).await;
    dead_waiter(key);
    let mut watch = store
        .watch_key(key)
        .await
        .expect("watch")
        .expect("lease mode pushes");
    while watch.try_recv().is_ok() {}
    held.release().await.expect("release");
    tokio::time::timeout(Duration::from_secs(5), watch.recv())
        .await
        .expect("the observer was not told of the release")
        .expect("the watch ended");
    Postgres::shared().psql(&format!("DELETE FROM distlock_waiters WHERE key = '{key}'"));
}

/// A waiter that asks again after a release woke it clears its mark, so
/// that the next release wakes it again; a release marks the waiter it
/// wakes. (Statements as a client sends them, through psql.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_asks_again_can_be_woken_again() {
    let server = Postgres::shared();
    connect().await; // the table and its functions
    let key = "turn/mark";
    let acquire = |holder: &str, waiter: &str, wait_ms: u64| {
        server.psql(&format!(
            "SELECT granted FROM distlock_acquire_v4('{key}', '{holder}', '{waiter}', 'x', 1, \
             60000, {wait_ms}, 'test', 'distlock_turn_00000000000000aa')"
        ))
    };
    let release =
        |holder: &str| server.psql(&format!("SELECT distlock_release_v3('{key}', '{holder}')"));
    let woken = || {
        server.psql(&format!(
            "SELECT coalesce(woken::text, '-') FROM distlock_waiters \
             WHERE key = '{key}' AND waiter = 'w'"
        ))
    };
    assert_eq!(acquire("h1", "w1", 0), "t");
    assert_eq!(acquire("h2", "w", 60_000), "f");
    assert_eq!(woken(), "-");
    assert_eq!(release("h1"), "t");
    assert_eq!(
        woken(),
        "true",
        "the release did not mark the waiter it woke"
    );
    // Another acquire came first: the woken waiter asks again, and waits.
    assert_eq!(acquire("h3", "w3", 0), "t");
    assert_eq!(acquire("h2", "w", 60_000), "f");
    assert_eq!(woken(), "-", "asking again did not clear the mark");
    assert_eq!(release("h3"), "t");
    assert_eq!(woken(), "true", "the next release passed the waiter over");
    server.psql(&format!("DELETE FROM distlock_waiters WHERE key = '{key}'"));
}

/// A release that leaves other holds of the key (a semaphore's permits)
/// wakes every waiter: the earliest, who wants the key alone, cannot have
/// it yet, and a later one that the free permit admits must not sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_leaves_other_holds_wakes_every_waiter() {
    let key = "turn/permits";
    let client = connect().await;
    let open = || async { client.session().ttl(TTL).open().await.expect("open") };
    let (first, second) = (open().await, open().await);
    let held = first.semaphore(key, 2).try_lock().await.expect("try");
    let held = held.expect("a permit");
    let _other = second.semaphore(key, 2).try_lock().await.expect("try");
    let writer = open().await;
    let writing =
        tokio::spawn(async move { writer.lock(key).wait(Duration::from_secs(300)).await });
    with_waiters(&client, key, 1).await;
    let permit = open().await;
    let admitted = tokio::spawn(async move {
        permit
            .semaphore(key, 2)
            .wait(Duration::from_secs(300))
            .await
    });
    with_waiters(&client, key, 2).await;
    settled(key, 2).await;
    held.release().await.expect("release");
    let granted = granted(
        admitted,
        "the waiter a free permit admits slept through the release",
    )
    .await;
    granted.release().await.expect("release");
    writing.abort();
}

/// A turn for a waiter whose acquire has ended, while its record is still
/// there, is passed on by its store to every waiter of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_for_an_acquire_that_ended_is_passed_on() {
    let key = "turn/ended";
    let client = connect().await;
    let held = hold(&client, key).await;
    let waiting = queue(&client, key, 1).await;
    let rows = settled(key, 1).await;
    // Earlier than the live waiter, on the same store's channel.
    Postgres::shared().psql(&format!(
        "INSERT INTO distlock_waiters (key, waiter, until, mode, owner, since, channel) \
         VALUES ('{key}', 'ended|0000000000000000', clock_timestamp() + interval '10 minutes', \
                 'x', 'ended', clock_timestamp() - interval '1 minute', '{}')",
        channel(&rows[0])
    ));
    held.release().await.expect("release");
    let granted = granted(waiting, "the turn was not passed on").await;
    granted.release().await.expect("release");
    Postgres::shared().psql(&format!("DELETE FROM distlock_waiters WHERE key = '{key}'"));
}

/// While a store's listening connection is down, its waiters register with
/// no channel (so that releases wake every waiter rather than pass a turn
/// nobody hears); when it listens again they are woken, and register with
/// their channel again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_hear_its_channel_registers_without_one() {
    let key = "turn/deaf";
    let client = connect().await;
    let held = hold(&client, key).await;
    let waiting = queue(&client, key, 1).await;
    let heard = channel(&settled(key, 1).await[0]).to_owned();
    assert!(heard.starts_with("distlock_turn_"), "{heard}");
    // Polled on a connection of the test's own: the store's deaf spell
    // lasts about a second, too short to poll by starting psql.
    let (watcher, connection) =
        tokio_postgres::connect(&Postgres::shared().url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    // The listening connection's last (and only) statement LISTENs on it.
    let ended = watcher
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE query LIKE '%LISTEN ' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&heard],
        )
        .await
        .expect("end the store's listening connection");
    assert_eq!(
        ended.get::<_, i64>(0),
        1,
        "the store's listening connection"
    );
    let started = Instant::now();
    for (want, why) in [
        (None, "without a channel"),
        (Some(heard.as_str()), "with its channel again"),
    ] {
        loop {
            let row = watcher
                .query_one(
                    "SELECT channel FROM distlock_waiters WHERE key = $1",
                    &[&key],
                )
                .await
                .expect("the waiter's record");
            if row.get::<_, Option<&str>>(0) == want {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the waiter did not register {why}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    held.release().await.expect("release");
    let granted = granted(waiting, "the waiter slept through its turn").await;
    granted.release().await.expect("release");
}

/// An acquire that ends after a release woke it, without asking again
/// (here it is dropped), passes its turn on as its record goes: the key
/// is free, and the waiter behind it must not sleep to its timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_woken_acquire_that_is_dropped_passes_its_turn_on() {
    let key = "turn/dropped";
    let client = connect().await;
    let held = hold(&client, key).await;
    let (first_wait, second_wait) = (queue(&client, key, 1).await, queue(&client, key, 2).await);
    let rows = settled(key, 2).await;
    let first = rows[0].split(' ').next().expect("a name");
    // As a release would leave it, without the notification: the key free,
    // the first waiter marked woken.
    Postgres::shared().psql(&format!(
        "DELETE FROM distlock_leases_v2 WHERE key = '{key}'; \
         UPDATE distlock_waiters SET woken = true WHERE key = '{key}' AND waiter = '{first}'"
    ));
    first_wait.abort();
    let granted = granted(second_wait, "the dropped acquire kept its turn").await;
    granted.release().await.expect("release");
    drop(held);
}
