//! A coupon system on distlock: the place to learn the API.
//!
//! Many workers, in several processes, issue coupons from limited batches
//! (at most one per user per batch), freeze them during a checkout,
//! unfreeze them when the checkout is abandoned, and redeem them. A double
//! issue costs real money, so every operation runs under a lock: the
//! batch's for an issue, the coupon's for the rest. [`ops`] shows the
//! pattern to copy:
//!
//! 1. take the lock ([`distlock::Session::lock`], with a bounded wait);
//! 2. claim the row the lock guards ([`distlock::fence::sql_claim`]): record
//!    the guard's token in its `fence` column, unless a higher token is
//!    there already;
//! 3. read what the decision needs, and decide;
//! 4. write in one transaction whose first statement is *fenced*
//!    ([`distlock::fence::sql_update`]): it changes the row only if its
//!    `fence` is not above the guard's token. A holder that paused past its
//!    lease and wakes finds its token stale once a later holder has claimed
//!    the row, and its write refused; if it wakes before any later claim,
//!    its write lands before the later holder reads;
//! 5. release.
//!
//! The writes deliberately do not check the state again (`WHERE state =
//! 'available'`): the lock and the fence are what keep them right, and
//! the negative control (`--no-lock`) shows what happens without them.
//! Blocking SQLite calls run in `block_in_place`, which needs tokio's
//! multi-threaded runtime.
//!
//! [`audit()`] then checks the whole history: no coupon issued twice, never
//! more issued than stock, no user with two coupons of one batch, every
//! redeemed coupon issued and frozen first, no write accepted with a stale
//! token. `distlock demo coupons` runs it all, against any store.

pub mod audit;
pub mod db;
pub mod ops;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use audit::{audit, Audit, Violation};
pub use db::{Db, Location, Value};
pub use ops::{Op, Outcome, Worker};

/// What can go wrong outside the audit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coupon database refused or failed.
    #[error("coupon database: {0}")]
    Db(String),
    /// The lock store did.
    #[error(transparent)]
    Lock(#[from] distlock::Error),
}

/// The schema, dropped and made again by [`setup`]. The demo owns these
/// three tables: point `--db` at a database where they may be replaced.
fn schema(sqlite: bool) -> String {
    let serial = if sqlite {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    } else {
        "BIGSERIAL PRIMARY KEY"
    };
    format!(
        "DROP TABLE IF EXISTS coupon_events;
         DROP TABLE IF EXISTS coupon_coupons;
         DROP TABLE IF EXISTS coupon_batches;
         CREATE TABLE coupon_batches (
             id BIGINT PRIMARY KEY,
             stock BIGINT NOT NULL,
             issued BIGINT NOT NULL DEFAULT 0,
             redeemed BIGINT NOT NULL DEFAULT 0,
             fence BIGINT NOT NULL DEFAULT 0
         );
         CREATE TABLE coupon_coupons (
             id BIGINT PRIMARY KEY,
             batch BIGINT NOT NULL,
             state TEXT NOT NULL,
             owner BIGINT,
             fence BIGINT NOT NULL DEFAULT 0
         );
         CREATE INDEX coupon_coupons_state ON coupon_coupons (batch, state, id);
         CREATE INDEX coupon_coupons_owner ON coupon_coupons (batch, owner);
         CREATE TABLE coupon_events (
             seq {serial},
             coupon BIGINT NOT NULL,
             batch BIGINT NOT NULL,
             op TEXT NOT NULL,
             owner BIGINT,
             lock_key TEXT NOT NULL,
             token BIGINT NOT NULL
         );"
    )
}

/// Makes the tables afresh, with `batches` batches of `stock` coupons each.
pub async fn setup(db: &mut Db, batches: u32, stock: u32) -> Result<(), Error> {
    db.batch(&schema(db.is_sqlite())).await?;
    let mut sql = String::from("BEGIN;");
    for batch in 0..i64::from(batches) {
        sql.push_str(&format!(
            "INSERT INTO coupon_batches (id, stock) VALUES ({batch}, {stock});"
        ));
        let ids: Vec<String> = (0..i64::from(stock))
            .map(|i| format!("({}, {batch}, 'available')", batch * i64::from(stock) + i))
            .collect();
        for chunk in ids.chunks(500) {
            sql.push_str(&format!(
                "INSERT INTO coupon_coupons (id, batch, state) VALUES {};",
                chunk.join(",")
            ));
        }
    }
    sql.push_str("COMMIT;");
    db.batch(&sql).await
}

/// What one worker process is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// The coupon database.
    pub db: String,
    /// Tasks, each with a session and a database connection of its own.
    pub workers: u32,
    /// How long to run.
    pub duration: Duration,
    /// Batches, and coupons per batch, as set up.
    pub batches: u32,
    /// Coupons per batch.
    pub stock: u32,
    /// Users who ask for coupons (ids `0..users`).
    pub users: u32,
    /// Take locks and check fencing tokens (off only for the negative
    /// control, which must make the audit fail).
    pub locking: bool,
}

/// What the workers of one process did.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Operations that changed a coupon, by kind.
    pub done: BTreeMap<String, u64>,
    /// Operations that found nothing to do (sold out, already has one,
    /// changed meanwhile), by kind.
    pub skipped: BTreeMap<String, u64>,
    /// Writes refused because their token was stale.
    pub stale: u64,
    /// Operations that failed (lock not had in time, database errors).
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Lock waits in microseconds, as (value, count) pairs.
    pub lock_wait_us: Vec<(u64, u64)>,
}

impl WorkerReport {
    /// Adds another report to this one.
    pub fn merge(&mut self, other: &WorkerReport) {
        for (kind, count) in &other.done {
            *self.done.entry(kind.clone()).or_default() += count;
        }
        for (kind, count) in &other.skipped {
            *self.skipped.entry(kind.clone()).or_default() += count;
        }
        self.stale += other.stale;
        self.errors += other.errors;
        for sample in &other.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(sample.clone());
            }
        }
        self.lock_wait_us.extend_from_slice(&other.lock_wait_us);
    }

    /// The lock waits as a histogram.
    pub fn lock_waits(&self) -> hdrhistogram::Histogram<u64> {
        let mut histogram =
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        for (value, count) in &self.lock_wait_us {
            histogram.saturating_record_n(*value, *count);
        }
        histogram
    }
}

/// Runs `config.workers` tasks against the lock store `client` for
/// `config.duration`, each with a session and a database connection of its
/// own, and adds one to `progress` per operation done.
pub async fn run_workers(
    client: &distlock::Client,
    config: &WorkerConfig,
    progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<WorkerReport, Error> {
    let location = Location::parse(&config.db);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.workers {
        let session = client.session().ttl(Duration::from_secs(10)).open().await?;
        let db = Db::open(&location).await?;
        let worker = Worker::new(session, db, config.clone());
        let progress = std::sync::Arc::clone(&progress);
        tasks.spawn(async move { worker.run(progress).await });
    }
    let mut report = WorkerReport::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(done) => report.merge(&done),
            // One task's panic loses its own report, not the others'.
            Err(err) => {
                report.errors += 1;
                report
                    .error_samples
                    .push(format!("a worker task failed: {err}"));
            }
        }
    }
    Ok(report)
}
