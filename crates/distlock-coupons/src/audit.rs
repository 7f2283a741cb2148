//! The audit: replays the history of every coupon and checks what a coupon
//! system must never do.

use std::collections::{BTreeMap, HashMap};

use crate::db::Db;
use crate::ops::Op;
use crate::Error;

/// One thing that must never happen, and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which rule: `issued twice`, `over stock`, `two per user`,
    /// `bad transition`, `stale token`, `state mismatch`.
    pub rule: &'static str,
    /// Where, in words.
    pub detail: String,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    /// Every violation (the report prints the first few of each rule).
    pub violations: Vec<Violation>,
    /// Changes in the history, by operation.
    pub events: BTreeMap<String, u64>,
    /// Coupons by their final state.
    pub states: BTreeMap<String, u64>,
}

impl Audit {
    /// True when nothing was violated.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// Violations by rule.
    pub fn by_rule(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for violation in &self.violations {
            *counts.entry(violation.rule).or_default() += 1;
        }
        counts
    }

    fn violation(&mut self, rule: &'static str, detail: String) {
        self.violations.push(Violation { rule, detail });
    }
}

/// Audits the coupon database.
///
/// The history is read in `seq` order. On SQLite that is commit order; on
/// PostgreSQL `seq` is drawn at insert, but every change first updates the
/// one row its lock fences, whose row lock orders the inserts of one key as
/// their commits are.
///
/// - **issued twice**: a coupon with more than one issue;
/// - **over stock**: a batch with more issued than its stock;
/// - **two per user**: a user with two coupons of one batch;
/// - **bad transition**: a change from a state it may not start from (a
///   redeem of a coupon that was not frozen, a freeze of one not issued, …);
/// - **stale token**: a write accepted with a lower token than an earlier
///   write under the same lock;
/// - **state mismatch**: a coupon or batch whose row disagrees with its
///   history (its state and owner; a batch's issued and redeemed counts).
pub async fn audit(db: &mut Db) -> Result<Audit, Error> {
    let mut audit = Audit::default();
    let events = db
        .query(
            "SELECT coupon, batch, op, owner, lock_key, token FROM coupon_events ORDER BY seq",
            &[],
        )
        .await?;
    let coupons = db
        .query("SELECT id, batch, state, owner FROM coupon_coupons", &[])
        .await?;
    let batches = db
        .query(
            "SELECT id, stock, issued, redeemed FROM coupon_batches",
            &[],
        )
        .await?;

    // Replay each coupon's history.
    let mut state: HashMap<i64, (&str, Option<i64>)> = HashMap::new();
    let mut issues: HashMap<i64, u64> = HashMap::new();
    let mut issued_by_batch: HashMap<i64, i64> = HashMap::new();
    let mut redeemed_by_batch: HashMap<i64, i64> = HashMap::new();
    let mut per_user: HashMap<(i64, i64), u64> = HashMap::new();
    let mut last_token: HashMap<&str, i64> = HashMap::new();
    for row in &events {
        let (Some(coupon), Some(batch), Some(op), Some(key), Some(token)) = (
            row[0].int(),
            row[1].int(),
            row[2].text(),
            row[4].text(),
            row[5].int(),
        ) else {
            audit.violation("state mismatch", format!("a malformed event: {row:?}"));
            continue;
        };
        let owner = row[3].int();
        *audit.events.entry(op.to_owned()).or_default() += 1;
        let Some(op) = [Op::Issue, Op::Freeze, Op::Unfreeze, Op::Redeem]
            .into_iter()
            .find(|known| known.name() == op)
        else {
            audit.violation("state mismatch", format!("an unknown operation '{op}'"));
            continue;
        };
        // Tokens under one lock only go up.
        if let Some(before) = last_token.insert(key, token) {
            if token < before {
                audit.violation(
                    "stale token",
                    format!("{key}: a write with token {token} accepted after token {before}"),
                );
            }
        }
        let (from, to) = op.transition();
        let now = state.entry(coupon).or_insert(("available", None));
        if now.0 != from {
            audit.violation(
                "bad transition",
                format!("coupon {coupon}: {} while {}", op.name(), now.0),
            );
        }
        if op != Op::Issue && owner != now.1 {
            audit.violation(
                "state mismatch",
                format!(
                    "coupon {coupon}: {} by owner {owner:?}, issued to {:?}",
                    op.name(),
                    now.1
                ),
            );
        }
        now.0 = to;
        if op == Op::Redeem {
            *redeemed_by_batch.entry(batch).or_default() += 1;
        }
        if op == Op::Issue {
            now.1 = owner;
            let count = issues.entry(coupon).or_default();
            *count += 1;
            if *count == 2 {
                audit.violation("issued twice", format!("coupon {coupon} of batch {batch}"));
            }
            *issued_by_batch.entry(batch).or_default() += 1;
            if let Some(user) = owner {
                let count = per_user.entry((batch, user)).or_default();
                *count += 1;
                if *count == 2 {
                    audit.violation(
                        "two per user",
                        format!("user {user} has two coupons of batch {batch}"),
                    );
                }
            }
        }
    }

    // The rows must say what the history says.
    for row in &coupons {
        let (Some(coupon), Some(now)) = (row[0].int(), row[2].text()) else {
            continue;
        };
        *audit.states.entry(now.to_owned()).or_default() += 1;
        let (replayed, owner) = state.get(&coupon).copied().unwrap_or(("available", None));
        if replayed != now || owner != row[3].int() {
            audit.violation(
                "state mismatch",
                format!(
                    "coupon {coupon} is {now} (owner {:?}), its history says {replayed} (owner {owner:?})",
                    row[3].int()
                ),
            );
        }
    }
    for row in &batches {
        let (Some(batch), Some(stock), Some(issued)) = (row[0].int(), row[1].int(), row[2].int())
        else {
            continue;
        };
        let in_history = issued_by_batch.get(&batch).copied().unwrap_or(0);
        if issued > stock || in_history > stock {
            audit.violation(
                "over stock",
                format!("batch {batch}: {issued} issued ({in_history} in the history) of {stock}"),
            );
        }
        if issued != in_history {
            audit.violation(
                "state mismatch",
                format!("batch {batch} counts {issued} issued, its history {in_history}"),
            );
        }
        // Read and written back under the batch's lock, beside the coupon's:
        // redeems that held only the coupon's would lose counts.
        let redeemed = row[3].int().unwrap_or(-1);
        let redeems = redeemed_by_batch.get(&batch).copied().unwrap_or(0);
        if redeemed != redeems {
            audit.violation(
                "state mismatch",
                format!("batch {batch} counts {redeemed} redeemed, its history {redeems}"),
            );
        }
    }
    Ok(audit)
}
