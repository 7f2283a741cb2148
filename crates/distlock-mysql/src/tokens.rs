//! Fencing tokens on MariaDB without a flush or a table per grant:
//! `epoch << 40 | n`.
//!
//! `n` counts `UUID_SHORT()` draws since the server's current *run* began.
//! `UUID_SHORT()` is a counter in the server's memory, raised by one under
//! a mutex at every call, so it rises through a run of the server and
//! starts afresh (below or above) after a restart. A run is a row of the
//! MEMORY table `distlock_runs`, keyed by the server's host name and port
//! (both fixed while it runs, unlike `server_id`): the run's epoch and
//! `base`, the counter's value when the run began. A restart empties it;
//! a replica's copy of its primary's row has the primary's name.
//!
//! A run begins, under the named lock `distlock:epoch`, by raising the
//! epoch in the InnoDB table `distlock_epoch` (committed, so flushed) and
//! only then drawing `base` and writing the row: no token of an epoch
//! exists before the epoch is durable, and every epoch is above every
//! run's before it.
//!
//! A draw is a token of the run only if `base <= u < base + 2^40 - 2^30`;
//! otherwise (a run nearly spent) the next run begins and the draw is made
//! again: the counter is shared, so every session of the spent run finds
//! its draws past the end too. `docs/0004-sql-tokens.md` has the argument.

use distlock_core::{Error, Result};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::connect::query_error;

/// The first token of epoch 1.
pub(crate) const FLOOR: u64 = 1 << 40;

/// How close to its epoch's end a run is over.
const MARGIN: u64 = 1 << 30;

/// How many draws a run has.
pub(crate) const RUN_END: u64 = FLOOR - MARGIN;

/// The error number the lease procedure signals when this server has no
/// run to draw a token from (a run begins, and the grant is tried again).
pub(crate) const NO_RUN: u16 = 30001;

/// Made on first use.
pub(crate) const SETUP: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS distlock_epoch (
        id INT PRIMARY KEY,
        epoch BIGINT UNSIGNED NOT NULL
    ) ENGINE=InnoDB",
    "INSERT IGNORE INTO distlock_epoch VALUES (1, 0)",
    "CREATE TABLE IF NOT EXISTS distlock_runs (
        server VARCHAR(300) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY,
        epoch BIGINT UNSIGNED NOT NULL,
        base BIGINT UNSIGNED NOT NULL
    ) ENGINE=MEMORY",
];

/// The server a run belongs to, in SQL: the same in the lease procedure.
pub(crate) const SERVER: &str = "CONCAT(@@hostname, ':', @@port)";

/// This server's run and a draw (no row: no run).
fn read() -> String {
    format!("SELECT epoch, base, UUID_SHORT() FROM distlock_runs WHERE server = {SERVER}")
}

/// A run of the server: tokens `epoch << 40 | (u - base)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) epoch: u64,
    pub(crate) base: u64,
}

impl Run {
    /// The token the draw `drawn` is in this run; `None` if it lies
    /// outside it (before its base, or past its end).
    pub(crate) fn token(self, drawn: u64) -> Option<u64> {
        let n = drawn.checked_sub(self.base)?;
        // Epochs from 2^24 on would not fit 64 bits.
        if n < RUN_END && (1..1 << 24).contains(&self.epoch) {
            Some(self.epoch << 40 | n)
        } else {
            None
        }
    }
}

/// Makes the tables, and refuses a run table that a restart would not
/// empty (made with another engine, by hand or by engine substitution).
pub(crate) async fn setup(conn: &mut Conn, target: &str) -> Result<()> {
    let failed = |err: mysql_async::Error| query_error(target, err);
    for statement in SETUP {
        conn.query_drop(statement).await.map_err(failed)?;
    }
    let engine: Option<String> = conn
        .query_first(
            "SELECT ENGINE FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'distlock_runs'",
        )
        .await
        .map_err(failed)?;
    if engine.as_deref() != Some("MEMORY") {
        return Err(Error::config(format!(
            "MariaDB at {target}: distlock_runs is {engine:?}, not a MEMORY table, so a \
             restart would not empty it; drop it and let distlock make it again while no \
             client runs"
        )));
    }
    Ok(())
}

/// The server's live run, other than `stale` (a run found spent): begins
/// the next one if there is none. Cheap when there is.
pub(crate) async fn run(conn: &mut Conn, target: &str, stale: Option<Run>) -> Result<Run> {
    let failed = |err: mysql_async::Error| query_error(target, err);
    if let Some(run) = live(conn, stale).await.map_err(failed)? {
        return Ok(run);
    }
    let got: Option<Option<i64>> = conn
        .query_first("SELECT GET_LOCK('distlock:epoch', 10)")
        .await
        .map_err(failed)?;
    if got != Some(Some(1)) {
        return Err(Error::unavailable(format!(
            "MariaDB at {target}: another client has been starting a token epoch for 10 s"
        )));
    }
    let begun = begin(conn, stale).await;
    let _ = conn.query_drop("DO RELEASE_LOCK('distlock:epoch')").await;
    begun.map_err(failed)
}

/// This server's run in the table, if it is live: not `stale`, and the
/// draw made with the read in it.
async fn live(conn: &mut Conn, stale: Option<Run>) -> mysql_async::Result<Option<Run>> {
    let row: Option<(u64, u64, u64)> = conn.query_first(read()).await?;
    Ok(row.and_then(|(epoch, base, drawn)| {
        let run = Run { epoch, base };
        (Some(run) != stale && run.token(drawn).is_some()).then_some(run)
    }))
}

/// Under the epoch lock: the next epoch durable, then the run's base and
/// row.
async fn begin(conn: &mut Conn, stale: Option<Run>) -> mysql_async::Result<Run> {
    if let Some(run) = live(conn, stale).await? {
        return Ok(run);
    }
    let highest: Option<Option<u64>> = conn
        .query_first("SELECT MAX(epoch) FROM distlock_runs")
        .await?;
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await?;
    let epoch: Option<u64> = tx
        .query_first("SELECT epoch FROM distlock_epoch WHERE id = 1 FOR UPDATE")
        .await?;
    let Some(epoch) = epoch else {
        return Err(missing("the row of distlock_epoch"));
    };
    // Above the epoch row and every run's epoch here (by 16, as before
    // runs).
    let next = epoch.max(highest.flatten().unwrap_or(0)) + 16;
    tx.exec_drop("UPDATE distlock_epoch SET epoch = ? WHERE id = 1", (next,))
        .await?;
    tx.commit().await?;
    let base: Option<u64> = conn.query_first("SELECT UUID_SHORT()").await?;
    let run = Run {
        epoch: next,
        base: base.ok_or_else(|| missing("UUID_SHORT()"))?,
    };
    conn.exec_drop(
        format!(
            "INSERT INTO distlock_runs VALUES ({SERVER}, ?, ?) \
             ON DUPLICATE KEY UPDATE epoch = VALUES(epoch), base = VALUES(base)"
        ),
        (run.epoch, run.base),
    )
    .await?;
    Ok(run)
}

fn missing(what: &str) -> mysql_async::Error {
    mysql_async::Error::Other(format!("{what} gave nothing; was it changed by hand?").into())
}

#[cfg(test)]
mod tests {
    use distlock_core::store::{AcquireRequest, Mode, StoreSession};
    use mysql_async::prelude::Queryable;

    use super::{run, Run, FLOOR, MARGIN, RUN_END};
    use crate::named::tests::{private_server, session};

    /// A session whose draw lies past its run's end begins the next run,
    /// with a higher epoch, while it holds the lock, and its grant is a
    /// token of it; a session still in a run another began draws in that
    /// one. On a server of its own: the run is aged by hand.
    #[tokio::test]
    async fn a_session_past_its_run_moves_to_the_next() {
        let (_server, url) = private_server().await;
        let opts = mysql_async::Opts::from_url(&url).expect("url");
        let mut conn = mysql_async::Conn::new(opts.clone()).await.expect("connect");
        let first = run(&mut conn, "test", None).await.expect("a run");
        assert_eq!(
            run(&mut conn, "test", None).await.expect("a run"),
            first,
            "kept"
        );
        // The run as if RUN_END draws had been made since it began, in the
        // table and in two sessions.
        let spent = Run {
            epoch: first.epoch,
            base: first.base - RUN_END,
        };
        conn.exec_drop(
            "UPDATE distlock_runs SET base = ? WHERE epoch = ?",
            (spent.base, spent.epoch),
        )
        .await
        .expect("age the run");
        let sessions = [
            session(&url, Some(spent)).await,
            session(&url, Some(spent)).await,
        ];
        let mut tokens = Vec::new();
        for session in &sessions {
            let key = format!("runs-{:x}", rand::random::<u64>());
            let grant = session
                .acquire(&AcquireRequest::new(key, Mode::Exclusive))
                .await
                .expect("acquire")
                .expect("free");
            tokens.push(grant.token);
        }
        let next = run(&mut conn, "test", None).await.expect("a run");
        assert!(next.epoch > first.epoch, "{next:?} after {first:?}");
        for token in &tokens {
            assert_eq!(token >> 40, next.epoch, "one next run: {tokens:x?}");
        }
        assert!(tokens[0] < tokens[1], "{tokens:x?}");
        let epoch: Option<u64> = conn
            .query_first("SELECT epoch FROM distlock_epoch WHERE id = 1")
            .await
            .expect("read");
        assert!(epoch >= Some(next.epoch), "the epoch row is raised");
    }

    #[test]
    fn a_draw_is_a_token_only_inside_its_run() {
        let run = Run {
            epoch: 16,
            base: 1000,
        };
        assert_eq!(run.token(1000), Some(16 << 40));
        assert_eq!(run.token(1007), Some(16 << 40 | 7));
        assert_eq!(run.token(999), None, "before the base");
        assert_eq!(
            run.token(1000 + FLOOR - MARGIN - 1),
            Some((17 << 40) - MARGIN - 1)
        );
        assert_eq!(run.token(1000 + FLOOR - MARGIN), None, "nearly spent");
        let unborn = Run { epoch: 0, base: 0 };
        assert_eq!(unborn.token(5), None, "epoch 0 is no run");
        let past = Run {
            epoch: 1 << 24,
            base: 0,
        };
        assert_eq!(past.token(5), None, "a token needs 64 bits at most");
        let late = Run { epoch: 32, base: 0 };
        assert!(late.token(0) > run.token(1000 + FLOOR - MARGIN - 1));
    }
}
