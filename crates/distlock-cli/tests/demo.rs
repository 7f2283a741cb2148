//! `distlock demo coupons` against every store of this build the test kit
//! can start: 4 processes × 8 workers each, a clean audit and every kind of
//! operation; and the negative control, without locks, which the audit must
//! catch on SQLite and on PostgreSQL.

mod common;

use std::process::Command;

use distlock_core::testkit::servers::{Mariadb, Postgres, Redis, ZooKeeper};

/// Runs the demo and returns its exit success and JSON summary.
fn demo(url: &str, db: Option<&str>, extra: &[&str]) -> (bool, serde_json::Value) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distlock"));
    command
        .args(["demo", "coupons", "--json", "--url", url])
        .args(["--processes", "4", "--workers", "8"])
        .args(["--batches", "4", "--stock", "300", "--users", "400"])
        .args(["--duration", "2s"])
        .args(extra);
    if let Some(db) = db {
        command.args(["--db", db]);
    }
    let output = command.output().expect("run distlock demo coupons");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|err| {
        panic!(
            "{url}: no JSON summary ({err}):\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), summary)
}

/// Asserts a clean audit and at least one change of each kind.
fn assert_clean(url: &str, (success, summary): (bool, serde_json::Value)) {
    assert!(
        success && summary["audit_clean"] == true,
        "{url}: the audit failed: {summary:#}"
    );
    for kind in ["issue", "freeze", "unfreeze", "redeem"] {
        assert!(
            summary["done"][kind].as_u64().unwrap_or(0) > 0,
            "{url}: no {kind} done: {summary:#}"
        );
    }
    eprintln!(
        "{url}: {:.0} operations/s, lock wait p99 {} ms",
        summary["per_second"]
            .as_object()
            .map_or(0.0, |kinds| kinds.values().filter_map(|v| v.as_f64()).sum()),
        summary["lock_wait_p99_ms"]
    );
}

/// Asserts that the audit caught the run without locks.
fn assert_caught(db: &str, (success, summary): (bool, serde_json::Value)) {
    assert!(!success, "{db}: a run without locks passed the audit");
    assert_eq!(summary["audit_clean"], false, "{summary:#}");
    let violations = summary["violations"].as_object().expect("violations");
    assert!(
        violations.values().filter_map(|v| v.as_u64()).sum::<u64>() > 0,
        "{summary:#}"
    );
}

// One store after another: each run starts 32 workers, and the machine may
// have two cores.
#[test]
fn the_coupon_demo_audits_clean_on_every_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    assert_clean("memory", demo("memory://coupons", None, &[]));
    let files = dir.path().join("locks");
    std::fs::create_dir_all(&files).expect("lock dir");
    let file_url = format!("file://{}", files.display());
    assert_clean(&file_url, demo(&file_url, None, &[]));

    let server = common::Server::start(&dir.path().join("server"), &[]);
    let server_url = format!("distlock://{}", server.address);
    assert_clean(&server_url, demo(&server_url, None, &[]));
    drop(server);

    let redis = Redis::start();
    assert_clean(&redis.url(), demo(&redis.url(), None, &[]));
    let more = [Redis::start(), Redis::start()];
    let redlock = format!(
        "redlock://{},{},{}",
        redis.address(),
        more[0].address(),
        more[1].address()
    );
    assert_clean(&redlock, demo(&redlock, None, &[]));
    drop((redis, more));

    let postgres = Postgres::shared();
    assert_clean(&postgres.url(), demo(&postgres.url(), None, &[]));
    let lease = format!("{}?mode=lease", postgres.url());
    assert_clean(&lease, demo(&lease, None, &[]));

    let mariadb = Mariadb::shared();
    assert_clean(&mariadb.url(), demo(&mariadb.url(), None, &[]));
    let lease = format!("{}?mode=lease", mariadb.url());
    assert_clean(&lease, demo(&lease, None, &[]));

    #[cfg(feature = "etcd")]
    {
        let etcd = distlock_core::testkit::servers::Etcd::start();
        assert_clean(&etcd.url(), demo(&etcd.url(), None, &[]));
    }

    let zookeeper = ZooKeeper::start();
    let url = format!("{}/coupons", zookeeper.url());
    assert_clean(&url, demo(&url, None, &[]));
}

#[test]
fn without_locks_the_audit_catches_violations_on_sqlite_and_postgresql() {
    let sqlite = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}", sqlite.path().join("coupons.db").display());
    assert_caught(&db, demo("memory://no-locks", Some(&db), &["--no-lock"]));
    let postgres = Postgres::start();
    assert_caught(
        "postgres",
        demo("memory://no-locks", Some(&postgres.url()), &["--no-lock"]),
    );
    // The same load with locks, on the same PostgreSQL database, is clean.
    let server = common::Server::start(&sqlite.path().join("server"), &[]);
    let url = format!("distlock://{}", server.address);
    assert_clean("postgres (coupons)", demo(&url, Some(&postgres.url()), &[]));
}
