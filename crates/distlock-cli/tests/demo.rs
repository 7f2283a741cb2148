//! `distlock demo coupons` against every store of this build the test kit
//! can start: 4 processes × 8 workers each, a clean audit and every kind of
//! operation; and the negative control, without locks, which the audit must
//! catch on SQLite and on PostgreSQL.

mod common;

use std::process::Command;

use distlock_testkit::servers::{Mariadb, Nats, Postgres, Redis, ZooKeeper};

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

/// Calls `run` with the URL of every store of this build the test kit can
/// start, one after another: each run starts 32 workers, and the machine
/// may have two cores.
fn each_store(mut run: impl FnMut(&str)) {
    let dir = tempfile::tempdir().expect("temp dir");
    run("memory://coupons");
    let files = dir.path().join("locks");
    std::fs::create_dir_all(&files).expect("lock dir");
    run(&format!("file://{}", files.display()));

    let server = common::Server::start(&dir.path().join("server"), &[]);
    run(&format!("distlock://{}", server.address));
    drop(server);

    let redis = Redis::start();
    run(&redis.url());
    let more = [Redis::start(), Redis::start()];
    run(&format!(
        "redlock://{},{},{}",
        redis.address(),
        more[0].address(),
        more[1].address()
    ));
    drop((redis, more));

    let postgres = Postgres::shared();
    run(&postgres.url());
    run(&format!("{}?mode=lease", postgres.url()));

    let mariadb = Mariadb::shared();
    run(&mariadb.url());
    run(&format!("{}?mode=lease", mariadb.url()));

    #[cfg(feature = "etcd")]
    {
        let etcd = distlock_testkit::servers::Etcd::start();
        run(&etcd.url());
    }

    let zookeeper = ZooKeeper::start();
    run(&format!("{}/coupons", zookeeper.url()));
    drop(zookeeper);

    let nats = Nats::start();
    run(&nats.url());
}

#[test]
fn the_coupon_demo_audits_clean_on_every_store() {
    each_store(|url| assert_clean(url, demo(url, None, &[])));
}

/// The figures for the docs: `cargo test --release -p distlock-cli
/// --all-features --test demo -- --ignored --nocapture` prints one table of
/// `distlock demo coupons --url URL` (defaults otherwise) on every store.
#[test]
#[ignore = "a benchmark: run by hand, in release"]
fn coupon_figures() {
    let mut table = String::from(
        "| store | operations/s | issue | freeze | unfreeze | redeem | lock wait p50 | p99 | audit |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    each_store(|url| {
        let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["demo", "coupons", "--json", "--url", url])
            .output()
            .expect("run distlock demo coupons");
        let summary: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("a JSON summary");
        let rate = |kind: &str| summary["per_second"][kind].as_f64().unwrap_or(0.0);
        let kinds = ["issue", "freeze", "unfreeze", "redeem"];
        let total: f64 = kinds.iter().map(|kind| rate(kind)).sum();
        let store = url.split("://").next().unwrap_or(url).to_owned()
            + if url.contains("mode=lease") {
                " (lease)"
            } else {
                ""
            };
        table.push_str(&format!(
            "| {store} | {total:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} ms | {:.1} ms | {} |\n",
            rate("issue"),
            rate("freeze"),
            rate("unfreeze"),
            rate("redeem"),
            summary["lock_wait_p50_ms"].as_f64().unwrap_or(0.0),
            summary["lock_wait_p99_ms"].as_f64().unwrap_or(0.0),
            if summary["audit_clean"] == true {
                "clean"
            } else {
                "FAILED"
            },
        ));
    });
    println!("{table}");
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
