//! Fencing tokens on MariaDB without a flush per grant: `epoch << 40 | n`.
//!
//! `n` comes from the sequence `distlock_token_seq` (CACHE 1000). MariaDB
//! writes a cached block's end to the sequence's table without flushing it
//! (the write has no undo, so no commit waits for it): after a crash the
//! sequence can resume below values it already handed out. So the epoch,
//! in the InnoDB table `distlock_epoch`, moves on after every restart of
//! the server before any named lock is granted: a MEMORY table,
//! `distlock_alive`, which a restart empties, says whether it has. The new
//! epoch is committed (flushed, with undo) first, and only then the
//! sequence moved to `epoch << 40`, so no token of an epoch exists before
//! the epoch is durable. Every token of a new epoch is above every token of
//! the old ones. An epoch's range is moved on from 2^30 values before its
//! end. `docs/0004-sql-tokens.md` has the argument.

use distlock_core::{Error, Result};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::connect::query_error;

/// The first token of epoch 1.
pub(crate) const FLOOR: u64 = 1 << 40;

/// How close to its epoch's end a token starts the next epoch.
const MARGIN: u64 = 1 << 30;

/// Made on first use; the sequence only if it is not there (creating it
/// again would wait for every statement that has it open).
pub(crate) const SETUP: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS distlock_epoch (
        id INT PRIMARY KEY,
        epoch BIGINT UNSIGNED NOT NULL
    ) ENGINE=InnoDB",
    "INSERT IGNORE INTO distlock_epoch VALUES (1, 0)",
    "CREATE TABLE IF NOT EXISTS distlock_alive (id INT PRIMARY KEY) ENGINE=MEMORY",
];

/// Whether `drawn` lies in a live epoch, short of its end.
pub(crate) fn live(drawn: u64) -> bool {
    drawn >= FLOOR && drawn & (FLOOR - 1) < FLOOR - MARGIN
}

/// Makes the epoch tables and the sequence, and refuses a sequence that
/// could give values out of order.
pub(crate) async fn setup(conn: &mut Conn, target: &str) -> Result<()> {
    let failed = |err: mysql_async::Error| query_error(target, err);
    for statement in SETUP {
        conn.query_drop(statement).await.map_err(failed)?;
    }
    let exists: Option<u8> = conn
        .query_first(
            "SELECT 1 FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'distlock_token_seq'",
        )
        .await
        .map_err(failed)?;
    if exists.is_none() {
        conn.query_drop(
            "CREATE SEQUENCE IF NOT EXISTS distlock_token_seq CACHE 1000 ENGINE=InnoDB",
        )
        .await
        .map_err(failed)?;
    }
    let shape: Option<(i64, u8)> = conn
        .query_first("SELECT increment, cycle_option FROM distlock_token_seq")
        .await
        .map_err(failed)?;
    if shape != Some((1, 0)) {
        return Err(Error::config(format!(
            "MariaDB at {target}: distlock_token_seq was changed (it must be INCREMENT 1, \
             NOCYCLE); drop it and let distlock make it again while no client runs"
        )));
    }
    ensure_epoch(conn, target, false).await
}

/// Moves to a new epoch if the server restarted since the last one (or,
/// with `spent`, if the live epoch is nearly used up). Serialized by a
/// named lock; cheap when nothing is to be done.
pub(crate) async fn ensure_epoch(conn: &mut Conn, target: &str, spent: bool) -> Result<()> {
    let failed = |err: mysql_async::Error| query_error(target, err);
    if !spent && alive(conn).await.map_err(failed)? {
        return Ok(());
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
    let moved = move_on(conn, spent).await;
    let _ = conn.query_drop("DO RELEASE_LOCK('distlock:epoch')").await;
    moved.map_err(failed)
}

async fn alive(conn: &mut Conn) -> mysql_async::Result<bool> {
    let count: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM distlock_alive")
        .await?;
    Ok(count.unwrap_or(0) > 0)
}

/// Under the epoch lock: the new epoch durable, then the sequence on it,
/// then the mark that this life of the server has an epoch.
async fn move_on(conn: &mut Conn, spent: bool) -> mysql_async::Result<()> {
    if alive(conn).await? {
        if !spent {
            return Ok(());
        }
        // Someone moved on meanwhile: a fresh draw is live.
        let drawn: Option<u64> = conn
            .query_first("SELECT NEXTVAL(distlock_token_seq)")
            .await?;
        if drawn.is_some_and(live) {
            return Ok(());
        }
    }
    let seq: Option<u64> = conn
        .query_first("SELECT next_not_cached_value FROM distlock_token_seq")
        .await?;
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await?;
    let epoch: Option<u64> = tx
        .query_first("SELECT epoch FROM distlock_epoch WHERE id = 1 FOR UPDATE")
        .await?;
    // Past the sequence's own epoch too, and by 16, so that a lost bump or
    // a restored dump cannot make an epoch come round twice.
    let next = epoch.unwrap_or(0).max(seq.unwrap_or(0) >> 40) + 16;
    tx.exec_drop("UPDATE distlock_epoch SET epoch = ? WHERE id = 1", (next,))
        .await?;
    tx.commit().await?;
    // SETVAL never moves a sequence back; it takes no placeholders.
    conn.query_drop(format!("SELECT SETVAL(distlock_token_seq, {})", next << 40))
        .await?;
    conn.query_drop("INSERT IGNORE INTO distlock_alive VALUES (1)")
        .await
}
