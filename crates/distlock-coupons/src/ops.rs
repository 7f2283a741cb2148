//! The four operations, each under distlock locks with fenced writes.
//! This is the pattern to copy: lock; claim the row with the guard's token
//! (a fenced update that records it); read and decide; one transaction
//! whose first statement is fenced by the token again; release. A redeem
//! changes two rows that two locks guard (the coupon, and its batch's
//! count of redeemed coupons): it takes both at once with `lock_all`, and
//! its transaction is fenced by both tokens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock::fence;
use rand::Rng;
use tokio::time::Instant;

use crate::db::{Db, Value};
use crate::{Error, WorkerConfig, WorkerReport};

/// How long an operation waits for its lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// An operation on coupons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Take an available coupon of a batch for a user (one per user per batch).
    Issue,
    /// Hold an issued coupon during a checkout.
    Freeze,
    /// Give a frozen coupon back to its owner: the checkout was abandoned.
    Unfreeze,
    /// Use a frozen coupon: the checkout went through.
    Redeem,
}

impl Op {
    /// Its name, as in the events table and the report.
    pub fn name(self) -> &'static str {
        match self {
            Op::Issue => "issue",
            Op::Freeze => "freeze",
            Op::Unfreeze => "unfreeze",
            Op::Redeem => "redeem",
        }
    }

    /// The state a coupon must be in before, and the one it is in after.
    pub fn transition(self) -> (&'static str, &'static str) {
        match self {
            Op::Issue => ("available", "issued"),
            Op::Freeze => ("issued", "frozen"),
            Op::Unfreeze => ("frozen", "issued"),
            Op::Redeem => ("frozen", "redeemed"),
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The coupon changed.
    Done,
    /// Nothing to do: sold out, the user has one already, or the coupon
    /// changed before the lock was had.
    Skipped,
    /// The write was refused: the token was stale, the lock had passed on.
    Stale,
}

/// The lock key of a batch (for issues) and of a coupon (for the rest).
pub fn batch_key(batch: i64) -> String {
    format!("coupons/batch/{batch}")
}

/// The lock key of a coupon.
pub fn coupon_key(coupon: i64) -> String {
    format!("coupons/coupon/{coupon}")
}

/// One worker: a session, a database connection, and the operations.
#[derive(Debug)]
pub struct Worker {
    session: distlock::Session,
    db: Db,
    config: WorkerConfig,
    report: WorkerReport,
    lock_waits: hdrhistogram::Histogram<u64>,
}

/// A held lock, or none when locking is off (the negative control).
struct Held {
    guard: Option<distlock::Guard>,
    key: String,
    token: i64,
}

impl Held {
    async fn release(self) {
        if let Some(guard) = self.guard {
            // A lost lock is not an error here: the fenced write already
            // told whether it counted.
            let _ = guard.release().await;
        }
    }
}

impl Worker {
    /// A worker with its own session and connection.
    pub fn new(session: distlock::Session, db: Db, config: WorkerConfig) -> Self {
        Worker {
            session,
            db,
            config,
            report: WorkerReport::default(),
            lock_waits: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid bounds"),
        }
    }

    /// Takes the lock on `key`, timing the wait.
    async fn lock(&mut self, key: String) -> Result<Held, Error> {
        if !self.config.locking {
            return Ok(Held {
                guard: None,
                key,
                token: 0,
            });
        }
        let started = Instant::now();
        let guard = self.session.lock(&key).wait(LOCK_WAIT).await?;
        let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.lock_waits.saturating_record(waited.max(1));
        let token = fence::sql_token(guard.token())?;
        Ok(Held {
            guard: Some(guard),
            key,
            token,
        })
    }

    /// Takes the locks on `first` and `second` together (all or none),
    /// timing the wait.
    async fn lock_both(&mut self, first: String, second: String) -> Result<(Held, Held), Error> {
        if !self.config.locking {
            let unlocked = |key| Held {
                guard: None,
                key,
                token: 0,
            };
            return Ok((unlocked(first), unlocked(second)));
        }
        let started = Instant::now();
        let both = self
            .session
            .lock_all([&first, &second])
            .wait(LOCK_WAIT)
            .await?;
        let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.lock_waits.saturating_record(waited.max(1));
        // In the order asked.
        let mut guards = both.into_guards().into_iter().zip([first, second]);
        let mut held = || -> Result<Held, Error> {
            let (guard, key) = guards.next().expect("a guard per key asked for");
            Ok(Held {
                token: fence::sql_token(guard.token())?,
                guard: Some(guard),
                key,
            })
        };
        Ok((held()?, held()?))
    }

    /// Issues a coupon of `batch` to `user`, under the batch's lock.
    pub async fn issue(&mut self, batch: i64, user: i64) -> Result<Outcome, Error> {
        let held = self.lock(batch_key(batch)).await?;
        let outcome = self.issue_held(&held, batch, user).await;
        held.release().await;
        outcome
    }

    /// Records the token in the row the lock guards, unless a later holder
    /// has been there: `false` if the token is stale.
    async fn claim(&mut self, table: &str, id: i64, held: &Held) -> Result<bool, Error> {
        let claim = fence::sql_claim(table, "id = $1", "fence", "$2");
        self.db
            .fenced(&[(&claim, vec![id.into(), held.token.into()])])
            .await
    }

    async fn issue_held(&mut self, held: &Held, batch: i64, user: i64) -> Result<Outcome, Error> {
        // Claim the batch: no older holder writes to it from now on.
        if !self.claim("coupon_batches", batch, held).await? {
            return Ok(Outcome::Stale);
        }
        // Read and decide, under the lock.
        let has = self
            .db
            .query(
                "SELECT id FROM coupon_coupons WHERE batch = $1 AND owner = $2 LIMIT 1",
                &[batch.into(), user.into()],
            )
            .await?;
        if !has.is_empty() {
            return Ok(Outcome::Skipped);
        }
        let free = self
            .db
            .query(
                "SELECT id FROM coupon_coupons WHERE batch = $1 AND state = 'available' \
                 ORDER BY id LIMIT 1",
                &[batch.into()],
            )
            .await?;
        let Some(coupon) = free.first().and_then(|row| row[0].int()) else {
            return Ok(Outcome::Skipped);
        };
        // Write, fenced by the batch's token: the batch row refuses a token
        // lower than the last one that changed it.
        let fenced = fence::sql_update(
            "coupon_batches",
            "issued = issued + 1",
            "id = $1",
            "fence",
            "$2",
        );
        let written = self
            .db
            .fenced(&[
                (&fenced, vec![batch.into(), held.token.into()]),
                (
                    "UPDATE coupon_coupons SET state = 'issued', owner = $1 WHERE id = $2",
                    vec![user.into(), coupon.into()],
                ),
                (
                    EVENT,
                    event(coupon, batch, Op::Issue, Some(user), &held.key, held.token),
                ),
            ])
            .await?;
        Ok(if written {
            Outcome::Done
        } else {
            Outcome::Stale
        })
    }

    /// Freezes, unfreezes or redeems a coupon picked at random among those
    /// the operation applies to, under the coupon's lock.
    pub async fn change(&mut self, op: Op) -> Result<Outcome, Error> {
        let (from, to) = op.transition();
        let picked = self
            .db
            .query(
                "SELECT id, batch, owner FROM coupon_coupons WHERE state = $1 \
                 ORDER BY random() LIMIT 1",
                &[from.into()],
            )
            .await?;
        let Some(row) = picked.first() else {
            return Ok(Outcome::Skipped);
        };
        let (Some(coupon), Some(batch)) = (row[0].int(), row[1].int()) else {
            return Err(Error::Db("a coupon row without id or batch".to_owned()));
        };
        if op == Op::Redeem {
            let (held, counted) = self.lock_both(coupon_key(coupon), batch_key(batch)).await?;
            let outcome = self
                .change_held(&held, Some(&counted), op, coupon, batch, from, to)
                .await;
            held.release().await;
            counted.release().await;
            return outcome;
        }
        let held = self.lock(coupon_key(coupon)).await?;
        let outcome = self
            .change_held(&held, None, op, coupon, batch, from, to)
            .await;
        held.release().await;
        outcome
    }

    /// Changes `coupon` from `from` to `to` under its lock `held`; a
    /// redeem also counts it in its batch, under the batch's lock
    /// `counted`.
    #[allow(clippy::too_many_arguments)]
    async fn change_held(
        &mut self,
        held: &Held,
        counted: Option<&Held>,
        op: Op,
        coupon: i64,
        batch: i64,
        from: &str,
        to: &str,
    ) -> Result<Outcome, Error> {
        if !self.claim("coupon_coupons", coupon, held).await? {
            return Ok(Outcome::Stale);
        }
        if let Some(counted) = counted {
            if !self.claim("coupon_batches", batch, counted).await? {
                return Ok(Outcome::Stale);
            }
        }
        // Under the lock, read again: another worker may have changed it
        // between the pick and the lock.
        let now = self
            .db
            .query(
                "SELECT state, owner FROM coupon_coupons WHERE id = $1",
                &[coupon.into()],
            )
            .await?;
        let Some(row) = now.first() else {
            return Ok(Outcome::Skipped);
        };
        if row[0].text() != Some(from) {
            return Ok(Outcome::Skipped);
        }
        let owner = row[1].int();
        let fenced = fence::sql_update(
            "coupon_coupons",
            &format!("state = '{to}'"),
            "id = $1",
            "fence",
            "$2",
        );
        let mut statements = vec![(fenced.as_str(), vec![coupon.into(), held.token.into()])];
        // Read, then written back one higher: the batch's lock is what keeps
        // two redeems of one batch from writing the same count.
        let count = fence::sql_update("coupon_batches", "redeemed = $3", "id = $1", "fence", "$2");
        if let Some(counted) = counted {
            let now = self
                .db
                .query(
                    "SELECT redeemed FROM coupon_batches WHERE id = $1",
                    &[batch.into()],
                )
                .await?;
            let redeemed = now.first().and_then(|row| row[0].int()).unwrap_or(0);
            statements.push((
                count.as_str(),
                vec![batch.into(), counted.token.into(), (redeemed + 1).into()],
            ));
        }
        let fences = statements.len();
        statements.push((
            EVENT,
            event(coupon, batch, op, owner, &held.key, held.token),
        ));
        let written = self.db.fenced_by(fences, &statements).await?;
        Ok(if written {
            Outcome::Done
        } else {
            Outcome::Stale
        })
    }

    /// Runs a random mix of operations until the configured duration is up.
    pub async fn run(mut self, progress: Arc<AtomicU64>) -> WorkerReport {
        let until = Instant::now() + self.config.duration;
        let batches = i64::from(self.config.batches.max(1));
        let users = i64::from(self.config.users.max(1));
        while Instant::now() < until {
            let (op, batch, user) = {
                let mut rng = rand::rng();
                let op = match rng.random_range(0..100) {
                    0..40 => Op::Issue,
                    40..65 => Op::Freeze,
                    65..75 => Op::Unfreeze,
                    _ => Op::Redeem,
                };
                (op, rng.random_range(0..batches), rng.random_range(0..users))
            };
            let outcome = match op {
                Op::Issue => self.issue(batch, user).await,
                op => self.change(op).await,
            };
            match outcome {
                Ok(Outcome::Done) => {
                    *self.report.done.entry(op.name().to_owned()).or_default() += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Skipped) => {
                    *self.report.skipped.entry(op.name().to_owned()).or_default() += 1;
                }
                Ok(Outcome::Stale) => self.report.stale += 1,
                Err(err) => {
                    self.report.errors += 1;
                    if self.report.error_samples.len() < 5 {
                        self.report.error_samples.push(err.to_string());
                    }
                    // Whatever failed, not again at once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let _ = self.session.close().await;
        self.report.lock_wait_us = self
            .lock_waits
            .iter_recorded()
            .map(|value| (value.value_iterated_to(), value.count_at_value()))
            .collect();
        self.report
    }
}

/// The history every change writes, in the same transaction.
const EVENT: &str = "INSERT INTO coupon_events (coupon, batch, op, owner, lock_key, token) \
                     VALUES ($1, $2, $3, $4, $5, $6)";

fn event(coupon: i64, batch: i64, op: Op, owner: Option<i64>, key: &str, token: i64) -> Vec<Value> {
    vec![
        coupon.into(),
        batch.into(),
        op.name().into(),
        owner.map_or(Value::Null, Value::Int),
        key.into(),
        token.into(),
    ]
}
