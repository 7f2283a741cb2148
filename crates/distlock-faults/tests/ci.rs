//! The CI tier of the fault suite, and its negative control.

use std::path::Path;

use distlock_faults::{run_one, run_stores, table, Fault, Plan, Store};

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_distlock-faults"))
}

/// One tier at a time: their store processes and workers together would
/// crowd 2 cores past the bounds the rows check.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every store of this build under every fault it supports: no accepted
/// overlap, no token going backwards, every fault healed within TTL +
/// lock-delay + 2 s (after a restart of etcd, within the longer lease etcd
/// then grants), no lock stuck afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_survives_every_fault() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let plan = Plan::ci();
    let rows = run_stores(exe(), &Store::all(), &Fault::all(), &plan).await;
    let text = table(&rows);
    println!("{text}");
    let failed: Vec<_> = rows.iter().filter(|row| !row.passed()).collect();
    assert!(
        failed.is_empty(),
        "violations:\n{text}\nfailures: {:?}",
        failed.iter().map(|row| &row.failures).collect::<Vec<_>>()
    );
}

/// The cluster tier: etcd, ZooKeeper and NATS as clusters of 3, workers spread
/// over the members, under a killed leader (restarted once another
/// leads), a leader frozen past an election, and one member cut off from
/// its clients: no accepted overlap, no token going back, `lost()` before
/// a re-grant, every fault healed within the bound, no lock stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_survives_its_leaders_faults() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let plan = Plan::ci();
    let rows = run_stores(exe(), &Store::clusters(), &Fault::cluster(), &plan).await;
    let text = table(&rows);
    println!("{text}");
    let failed: Vec<_> = rows.iter().filter(|row| !row.passed()).collect();
    assert!(
        failed.is_empty(),
        "violations:\n{text}\nfailures: {:?}",
        failed.iter().map(|row| &row.failures).collect::<Vec<_>>()
    );
}

/// Without fencing, a paused holder that wakes after its lease ran out
/// writes over its successor: the checker must see the overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fencing_a_paused_holder_overlaps_and_the_checker_sees_it() {
    let plan = Plan {
        fencing: false,
        acquisitions: 100,
        faults: 2,
        ..Plan::ci()
    };
    let row = run_one(exe(), Store::Server, Fault::Pause, &plan)
        .await
        .expect("run");
    assert!(
        row.findings.overlaps_accepted > 0,
        "no overlap seen without fencing:\n{}",
        table(&[row])
    );
}
