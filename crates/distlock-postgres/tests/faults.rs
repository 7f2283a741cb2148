//! PostgreSQL when things go wrong: a holder's backend killed, the server
//! crashed and restarted, a failover to a promoted replica, and bad URLs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock_core::{Client, ErrorKind};
use distlock_postgres::PostgresStore;
use distlock_testkit::restart::{assert_rising, take_once};
use distlock_testkit::servers::postgres::{Postgres, PASSWORD};
use tokio::time::timeout;

mod common;
use common::lock_of;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(
        PostgresStore::connect(url).await.expect("connect"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holders_backend_fires_lost_and_frees_the_lock_for_the_waiter() {
    let server = Postgres::shared();
    let client = client(&server.url()).await;
    let key = "faults/terminate";
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
    let terminated = server.psql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE {} AND granted",
        lock_of(key)
    ));
    assert_eq!(terminated, "1", "one holder backend terminated");
    timeout(Duration::from_secs(20), guard.lost())
        .await
        .expect("lost() fires after the backend is killed");
    let next = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter is granted")
        .expect("waiter task");
    assert!(next > guard.token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_across_holders_modes_and_a_crash_of_the_server() {
    // The longest lease the test grants.
    const LEASE: Duration = Duration::from_secs(2);
    let server = Postgres::start();
    let url = server.url();
    let mut tokens = Vec::new();
    {
        let client = client(&url).await;
        for round in 0..6 {
            let session = client.session().open().await.expect("open");
            let guard = if round % 2 == 0 {
                session.lock("faults/tokens").try_lock().await
            } else {
                session.read("faults/tokens").try_lock().await
            };
            let guard = guard.expect("try").expect("free");
            tokens.push(guard.token());
            guard.release().await.expect("release");
        }
    }
    // The lease table draws from the same sequence. A lease of 2 s is the
    // longest granted, so after the crash none is granted for 2 s.
    {
        let lease = client(&format!("{url}?mode=lease")).await;
        let session = lease.session().ttl(LEASE).open().await.expect("open");
        let guard = session
            .semaphore("faults/tokens", 2)
            .try_lock()
            .await
            .expect("try")
            .expect("free");
        tokens.push(guard.token());
        guard.release().await.expect("release");
    }
    // A lease held across the crash, which the crash takes away.
    let holder_client = client(&format!("{url}?mode=lease")).await;
    let holder = holder_client
        .session()
        .ttl(LEASE)
        .open()
        .await
        .expect("open");
    let held = holder
        .lock("faults/held")
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let before = held.token();
    tokens.push(before);
    let server = server.crash_and_restart();
    let restarted = Instant::now();
    // Several sessions at once into the new epoch, in both modes.
    for url in [server.url(), format!("{}?mode=lease", server.url())] {
        let client = client(&url).await;
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let session = client.session().ttl(LEASE).open().await.expect("open");
                    let guard = session
                        .lock("faults/tokens")
                        .wait(Duration::from_secs(10))
                        .await
                        .expect("granted");
                    let granted = Instant::now();
                    let token = guard.token();
                    guard.release().await.expect("release");
                    (token, granted)
                })
            })
            .collect();
        let mut taken = Vec::new();
        for taker in takers {
            let (token, granted) = taker.await.expect("taker");
            if url.ends_with("mode=lease") {
                assert!(
                    granted - restarted >= LEASE,
                    "a lease granted {:?} after the crash, within the longest lease",
                    granted - restarted
                );
            }
            taken.push(token);
        }
        taken.sort_unstable();
        tokens.extend(taken);
    }
    timeout(LEASE * 2, held.lost())
        .await
        .expect("the lease held across the crash is lost");
    assert_rising(&tokens);
    assert!(
        tokens.last().expect("tokens") >> 40 > before >> 40,
        "no new epoch after the crash: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_nearly_spent_moves_on_to_the_next() {
    let server = Postgres::start();
    let client = client(&server.url()).await;
    let take = || async {
        let session = client.session().open().await.expect("open");
        take_once(&session, "faults/margin").await
    };
    let first = take().await;
    // Just below the margin: the next draw is the epoch's last usable
    // token, and the one after starts a new epoch.
    let edge = ((first >> 40) + 1) * (1 << 40) - (1 << 30) - 2;
    server.psql(&format!("SELECT setval('distlock_token_seq', {edge})"));
    let last = take().await;
    let next = take().await;
    assert_eq!(last, edge + 1, "the last token of the epoch");
    assert!(
        next >> 40 > first >> 40,
        "a new epoch: {first} {last} {next}"
    );
    assert!(next > last);
}

/// The keys of the failover test, per mode: one mode per key, as the store
/// asks.
const ADVISORY_KEYS: [&str; 2] = ["faults/failover/advisory-a", "faults/failover/advisory-b"];
const LEASE_KEYS: [&str; 2] = ["faults/failover/lease-a", "faults/failover/lease-b"];

/// Takes every failover key a few times, exclusive and shared, in its mode
/// on the server at `url`, and adds each token to its key's list.
async fn take_every_key(url: &str, tokens: &mut BTreeMap<&'static str, Vec<u64>>) {
    let advisory = client(url).await;
    let lease = client(&format!("{url}?mode=lease")).await;
    for (client, keys) in [(&advisory, ADVISORY_KEYS), (&lease, LEASE_KEYS)] {
        for key in keys {
            for shared in [false, true, false] {
                // Short leases: after the failover none is granted until the
                // longest has run out.
                let session = client
                    .session()
                    .ttl(Duration::from_secs(1))
                    .open()
                    .await
                    .expect("open");
                let request = if shared {
                    session.read(key)
                } else {
                    session.lock(key)
                };
                let guard = request
                    .wait(Duration::from_secs(10))
                    .await
                    .expect("granted");
                tokens.entry(key).or_default().push(guard.token());
                guard.release().await.expect("release");
            }
        }
    }
}

/// Waits until `replica` has replayed all the WAL `primary` has written.
fn wait_replayed(primary: &Postgres, replica: &Postgres) {
    let written = primary.psql("SELECT pg_current_wal_lsn()");
    let started = Instant::now();
    let caught_up = format!("SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn");
    while replica.psql(&caught_up) != "t" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the replica did not replay up to {written} within a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_across_a_failover_to_a_promoted_replica() {
    let primary = Postgres::start();
    let mut before = BTreeMap::new();
    take_every_key(&primary.url(), &mut before).await;
    let (primary, replica) = tokio::task::spawn_blocking(move || {
        let replica = primary.replica();
        (primary, replica)
    })
    .await
    .expect("make the replica");
    // Drawn after the backup: the unlogged sequence's values reach the
    // replica neither way, only the epoch table does.
    take_every_key(&primary.url(), &mut before).await;
    let replica = tokio::task::spawn_blocking(move || {
        wait_replayed(&primary, &replica);
        primary.kill();
        replica.promote();
        replica
    })
    .await
    .expect("fail over");
    let mut after = BTreeMap::new();
    take_every_key(&replica.url(), &mut after).await;
    for key in ADVISORY_KEYS.into_iter().chain(LEASE_KEYS) {
        let (old, new) = (&before[key], &after[key]);
        let tokens: Vec<u64> = old.iter().chain(new).copied().collect();
        assert!(
            tokens.windows(2).all(|pair| pair[0] < pair[1]),
            "{key}: tokens went back across the failover: {tokens:?}"
        );
        // The promotion reset the sequence, so the replica started an epoch
        // above every one the primary handed tokens out in.
        let old_epoch = old.last().expect("tokens before the failover") >> 40;
        assert!(
            new.iter().all(|token| token >> 40 > old_epoch),
            "{key}: tokens after the failover are not in a new epoch: {tokens:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outlives_its_connection_being_killed() {
    // A server of its own: every distlock backend on it is terminated.
    let server = Postgres::start();
    let url = format!("{}?mode=lease", server.url());
    let client = client(&url).await;
    let session = client
        .session()
        .ttl(Duration::from_secs(2))
        .open()
        .await
        .expect("open");
    let guard = session
        .lock("faults/lease")
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    server.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'distlock' AND pid <> pg_backend_pid()",
    );
    // Past several renewals: the lease is in the table, and the store
    // connects again to renew it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(guard.is_held(), "the lease was lost with its connection");
    let other = client.session().open().await.expect("open");
    assert!(other
        .lock("faults/lease")
        .try_lock()
        .await
        .expect("try")
        .is_none());
    guard.release().await.expect("release");
}

/// The error says what to do, and keeps the driver's error, with its SQL
/// state, as its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_keeps_the_drivers_error_as_its_source() {
    let port = Postgres::shared().port();
    let wrong = format!("postgres://postgres:guess@127.0.0.1:{port}/postgres");
    let err = PostgresStore::connect(&wrong)
        .await
        .expect_err("wrong password");
    let source = std::error::Error::source(&err).expect("a source");
    let driver = source
        .downcast_ref::<tokio_postgres::Error>()
        .unwrap_or_else(|| panic!("not the driver's error: {source:?}"));
    assert_eq!(
        driver.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{driver:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_within_the_connect_timeout() {
    let server = Postgres::shared();
    let port = server.port();
    let started = tokio::time::Instant::now();

    let wrong = format!("postgres://postgres:guess@127.0.0.1:{port}/postgres");
    refused(&wrong, ErrorKind::Config, "password").await;
    let missing = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/nowhere");
    refused(&missing, ErrorKind::Config, "nowhere").await;

    // A role that may not log in (SQLSTATE 28000).
    server.psql("DO $$ BEGIN CREATE ROLE distlock_nologin NOLOGIN PASSWORD 'x'; EXCEPTION WHEN duplicate_object THEN NULL; END $$");
    let nologin = format!("postgres://distlock_nologin:x@127.0.0.1:{port}/postgres");
    refused(&nologin, ErrorKind::Config, "refused the login").await;

    // A port that speaks something else.
    let other = distlock_testkit::daemon::not_a_store().await;
    refused(
        &format!("postgres://postgres@127.0.0.1:{other}/db"),
        ErrorKind::Unavailable,
        "",
    )
    .await;

    // Nothing listening.
    let dead = distlock_testkit::daemon::free_port();
    refused(
        &format!("postgres://postgres@127.0.0.1:{dead}/db"),
        ErrorKind::Unavailable,
        "cannot reach PostgreSQL",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    refused(
        &format!("{}?mode=sideways", server.url()),
        ErrorKind::Config,
        "",
    )
    .await;

    // The longest key a lock may have works.
    let client = client(&server.url()).await;
    let session = client.session().open().await.expect("open");
    let longest = "k".repeat(distlock_core::MAX_KEY_BYTES);
    let guard = session
        .lock(&longest)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    guard.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_by_its_deadline_gives_its_locks_back_while_still_alive() {
    let server = Postgres::shared();
    let client = client(&server.url()).await;
    let key = "faults/lost-by-deadline";
    let frozen = client
        .session()
        .ttl(Duration::from_millis(600))
        .open()
        .await
        .expect("open");
    let guard = frozen
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    // Renewals stop, as in a process paused past its TTL.
    frozen.freeze_for_test();
    timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("lost() at the lease end");
    let other = client.session().open().await.expect("open");
    let taken = other
        .lock(key)
        .wait(Duration::from_secs(10))
        .await
        .expect("the lost session's lock is given back though it is not dropped");
    assert!(taken.token() > guard.token());
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_waiters_are_woken_after_the_listening_connection_is_killed() {
    // A server of its own: every distlock backend on it is terminated.
    let server = Postgres::start();
    let url = format!("{}?mode=lease", server.url());
    let client = client(&url).await;
    // Long leases: a waiter that relied on its timer would wait 30 s.
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
        .lock("faults/listen")
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    server.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'distlock' AND pid <> pg_backend_pid()",
    );
    // Time to listen again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = tokio::spawn(async move {
        let guard = waiter
            .lock("faults/listen")
            .wait(Duration::from_secs(60))
            .await
            .expect("granted after the release");
        guard.release().await.expect("release");
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    held.release().await.expect("release");
    timeout(Duration::from_secs(20), waiting)
        .await
        .expect("woken by the release, well before the 30 s timer")
        .expect("waiter task");
}

/// A token sequence changed by hand (here made to cache values, so that
/// two backends would draw out of order) is refused at connect, with what
/// to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_sequence_changed_by_hand_is_refused() {
    let server = Postgres::start();
    drop(client(&server.url()).await);
    server.psql("ALTER SEQUENCE distlock_token_seq CACHE 10");
    let err = PostgresStore::connect(&server.url())
        .await
        .expect_err("a cached sequence");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("never ALTER it"), "{err}");
}

/// Connecting to `url` fails with an error of `kind` whose text has `says`.
async fn refused(url: &str, kind: ErrorKind, says: &str) {
    let err = PostgresStore::connect(url)
        .await
        .expect_err(&format!("{url} connected"));
    assert_eq!(err.kind(), kind, "{url}: {err}");
    assert!(err.to_string().contains(says), "{url}: {err}");
}
