//! Fencing: the resource itself refuses a holder whose lock has moved on.
//!
//! A lock cannot stop a holder that paused (a GC pause, `SIGSTOP`, a slow
//! disk) past its lease and then writes as if it still held the lock.
//! Every [`Guard`](crate::Guard) carries a fencing token that is strictly
//! greater than the tokens of every earlier holder of its key. A resource
//! that remembers the highest token it has accepted, and refuses lower
//! ones, is safe even then (Kleppmann, "How to do distributed locking").
//!
//! # In SQL
//!
//! Keep the token of the last change in a column of the row the lock
//! protects, and make every write conditional on it:
//!
//! ```sql
//! UPDATE coupons SET state = 'frozen', fence = $2 WHERE (id = $1) AND fence <= $2
//! ```
//!
//! [`sql_update`] writes that statement. No row changed means the token is
//! stale (or the condition failed): roll back, as the lock has passed on.
//! A section that reads before it writes starts with [`sql_claim`], so that
//! an older holder cannot write between its read and its write.
//! `<=` rather than `<` lets one holder write several times under one
//! grant. Tokens are `u64`; [`sql_token`] gives the signed 64-bit integer
//! SQL databases store. `crates/distlock-coupons` is a whole application
//! that does this.
//!
//! # In a service
//!
//! A service that guards a resource keeps a [`Fence`] per key and sends
//! every request through [`Fence::admit`]; clients send their token in the
//! [`HTTP_HEADER`] header.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// The HTTP header a client sends its fencing token in.
pub const HTTP_HEADER: &str = "Distlock-Fencing-Token";

/// A token as SQL stores it: `BIGINT` (PostgreSQL, MySQL) and `INTEGER`
/// (SQLite) are signed 64-bit. Errors for a token beyond `i64::MAX`, which
/// no store hands out in practice.
pub fn sql_token(token: u64) -> Result<i64> {
    i64::try_from(token).map_err(|_| {
        Error::store(format!(
            "fencing token {token} does not fit a signed 64-bit SQL column"
        ))
    })
}

/// The fenced form of an SQL `UPDATE`: it changes the row only if the row's
/// `column` is not above the token, and records the token there.
///
/// `assignments` and `condition` are the statement's own `SET` list and
/// `WHERE` clause; `token` is the placeholder the token is bound to (`$2`,
/// `?2`, …), which may appear twice.
///
/// ```
/// let sql = distlock::fence::sql_update("coupons", "state = 'frozen'", "id = $1", "fence", "$2");
/// assert_eq!(
///     sql,
///     "UPDATE coupons SET state = 'frozen', fence = $2 WHERE (id = $1) AND fence <= $2"
/// );
/// ```
pub fn sql_update(
    table: &str,
    assignments: &str,
    condition: &str,
    column: &str,
    token: &str,
) -> String {
    format!(
        "UPDATE {table} SET {assignments}, {column} = {token} WHERE ({condition}) AND {column} <= {token}"
    )
}

/// The fenced claim a critical section starts with: it records the token in
/// the row's `column` if no higher token is there. From then on no write of
/// an older holder is accepted, so what the section reads next cannot be
/// changed under it by a holder that paused past its lease and woke.
///
/// ```
/// let sql = distlock::fence::sql_claim("coupons", "id = $1", "fence", "$2");
/// assert_eq!(sql, "UPDATE coupons SET fence = $2 WHERE (id = $1) AND fence <= $2");
/// ```
pub fn sql_claim(table: &str, condition: &str, column: &str, token: &str) -> String {
    format!("UPDATE {table} SET {column} = {token} WHERE ({condition}) AND {column} <= {token}")
}

/// A token lower than one the resource already accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "fencing token {token} is stale: the resource has accepted {highest}; the lock has passed on"
)]
pub struct Stale {
    /// The token refused.
    pub token: u64,
    /// The highest token accepted so far.
    pub highest: u64,
}

/// The highest token a resource has accepted, in memory.
#[derive(Debug, Default)]
pub struct Fence {
    highest: AtomicU64,
}

impl Fence {
    /// A fence that has accepted nothing yet.
    pub fn new() -> Self {
        Fence::default()
    }

    /// Accepts `token` if it is no lower than every token accepted before.
    pub fn admit(&self, token: u64) -> std::result::Result<(), Stale> {
        let before = self.highest.fetch_max(token, Ordering::SeqCst);
        if token < before {
            return Err(Stale {
                token,
                highest: before,
            });
        }
        Ok(())
    }

    /// The highest token accepted so far (0 if none).
    pub fn highest(&self) -> u64 {
        self.highest.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_refuses_lower_tokens_and_admits_repeats() {
        let fence = Fence::new();
        fence.admit(5).expect("first");
        fence.admit(5).expect("the same holder again");
        fence.admit(9).expect("a later holder");
        assert_eq!(
            fence.admit(7),
            Err(Stale {
                token: 7,
                highest: 9
            })
        );
        assert_eq!(fence.highest(), 9);
    }

    #[test]
    fn tokens_beyond_a_signed_column_are_refused() {
        assert_eq!(sql_token(42).expect("fits"), 42);
        assert!(sql_token(u64::MAX).is_err());
    }
}
