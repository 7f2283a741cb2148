//! Fencing tokens without a disk flush per grant: `epoch << 40 | n`.
//!
//! Tokens come from one UNLOGGED sequence, `distlock_token_seq`: `nextval`
//! writes no WAL and makes its transaction wait for no flush. PostgreSQL
//! resets an unlogged sequence to its start (1) exactly when its value may
//! be stale or lost: crash recovery, and a standby's promotion. A token
//! below `1 << 40` therefore means "reset": whoever draws one starts a new
//! epoch in a logged table, with a synchronous commit, and only then moves
//! the sequence to `epoch << 40`. So every token is above every token
//! handed out before it: within an epoch the sequence rises; each new
//! epoch starts above the whole range of the one before, and is durable
//! before any token of it exists. An epoch's range is moved on from when
//! it is nearly spent, 2^30 values before its end.
//! `docs/0004-sql-tokens.md` has the whole argument and its limits.

use distlock_core::{Error, Result};
use tokio_postgres::{Client, Config};

use crate::connect::{open, query_error};

/// The first token of epoch 1; anything below is a reset sequence's.
pub(crate) const FLOOR: i64 = 1 << 40;

/// How close to its epoch's end a token starts the next epoch.
const MARGIN: i64 = 1 << 30;

/// Draws a token.
pub(crate) const NEXT: &str = "SELECT nextval('distlock_token_seq')";

/// Made under a transaction-scoped advisory lock: two `CREATE TABLE IF NOT
/// EXISTS` at once can both try to create it, and one then fails. Read
/// committed whatever the connection's default (see `check_isolation`; a
/// pooler may run it on another connection), or two first connects at once
/// could fail to serialize.
const CREATE: &str = r#"
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT pg_advisory_xact_lock(-8081908180553460213);
CREATE TABLE IF NOT EXISTS distlock_epoch (
    id int PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL
);
INSERT INTO distlock_epoch VALUES (1, 0) ON CONFLICT DO NOTHING;
-- When the unlogged data was last found reset, and the longest lease
-- granted: no lease is granted until that long after a reset.
ALTER TABLE distlock_epoch ADD COLUMN IF NOT EXISTS reset_at timestamptz,
    ADD COLUMN IF NOT EXISTS max_ttl_ms bigint NOT NULL DEFAULT 0;
-- Never ALTERed: that would copy its current value into the init fork a
-- reset starts from.
CREATE UNLOGGED SEQUENCE IF NOT EXISTS distlock_token_seq;
-- Moves the sequence to a new epoch if it was reset or its epoch is nearly
-- spent. The epoch is committed (synchronously, to a synchronous standby
-- too if there is one) before the sequence moves, and the sequence only
-- ever moves forward. Epochs go up by 16 (which does not cover a standby
-- promoted without the last bump: docs/0004), and above the sequence's
-- own epoch, so that a restored dump whose sequence ran ahead of its
-- epoch row cannot repeat one.
CREATE OR REPLACE PROCEDURE distlock_new_epoch()
LANGUAGE plpgsql AS $fn$
DECLARE
    current_epoch bigint;
    next_epoch bigint;
    drawn bigint;
    looks int := 0;
    seen bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'distlock needs read committed transactions, not %',
            current_setting('transaction_isolation')
            USING HINT = 'ALTER ROLE ... SET default_transaction_isolation = ''read committed''';
    END IF;
    LOOP
        PERFORM pg_advisory_xact_lock(-8081908180553460212);
        SELECT epoch INTO current_epoch FROM distlock_epoch WHERE id = 1;
        SELECT last_value INTO drawn FROM distlock_token_seq;
        IF current_epoch > 0 AND drawn >= current_epoch << 40
            AND drawn < ((current_epoch + 1) << 40) - 1073741824 THEN
            RETURN;
        END IF;
        -- Below a live epoch is a reset, or another call between its
        -- epoch's commit and its move of the sequence (which releases the
        -- lock). That gap is short: look again for half a second before
        -- taking it for a reset. (A session of a TTL under 1.5 s may miss
        -- a renewal while this waits; it happens only after a reset, or if
        -- a caller stopped in that gap.)
        -- Another caller's new epoch starts the half second again.
        IF current_epoch IS DISTINCT FROM seen THEN
            seen := current_epoch;
            looks := 0;
        END IF;
        EXIT WHEN current_epoch = 0 OR drawn >= current_epoch << 40 OR looks >= 50;
        looks := looks + 1;
        COMMIT;
        PERFORM pg_sleep(0.01);
    END LOOP;
    IF current_setting('synchronous_commit') <> 'remote_apply' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    -- Below the live epoch is a reset (not a fresh database, nor an epoch
    -- nearly spent): the leases the reset lost must run out first.
    UPDATE distlock_epoch SET epoch = greatest(epoch, drawn >> 40) + 16,
        reset_at = CASE WHEN current_epoch > 0 AND drawn < current_epoch << 40
            THEN clock_timestamp() ELSE reset_at END
        WHERE id = 1
        RETURNING epoch INTO next_epoch;
    COMMIT;
    PERFORM pg_advisory_xact_lock(-8081908180553460212);
    IF (SELECT last_value FROM distlock_token_seq) < next_epoch << 40 THEN
        PERFORM setval('distlock_token_seq', next_epoch << 40, false);
    END IF;
    COMMIT;
END
$fn$;
COMMIT;
"#;

/// Makes the tables, sequence and procedure if they are not there.
pub(crate) async fn create_table(config: Config, target: String) -> Result<()> {
    let client = open(&config, &target).await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, \
             current_setting('transaction_isolation'), \
             (SELECT source FROM pg_settings WHERE name = 'default_transaction_isolation')",
            &[],
        )
        .await
        .map_err(|err| query_error(&target, err))?;
    check_version(row.get(0), &target)?;
    check_isolation(row.get(1), row.get(2), &target)?;
    client
        .batch_execute(CREATE)
        .await
        .map_err(|err| query_error(&target, err))?;
    check_sequence(&client, &target).await
}

/// Refuses a server older than 15 (`server_version_num` `version`): its
/// sequences cannot be unlogged.
fn check_version(version: i32, target: &str) -> Result<()> {
    if version < 150000 {
        return Err(Error::config(format!(
            "PostgreSQL at {target} is version {version}; distlock needs 15 or later \
             (its tokens use an unlogged sequence)"
        )));
    }
    Ok(())
}

/// Refuses transactions at another level than READ COMMITTED
/// (`isolation`): a grant reads the key's holds (lease mode) or the epoch
/// (a new epoch, either mode) after taking a lock, and a snapshot older
/// than that lock would miss what was committed before it. Checked here,
/// once, rather than found by the first new epoch after a crash.
/// `source` is where the default was set, as `pg_settings` names it.
fn check_isolation(isolation: &str, source: &str, target: &str) -> Result<()> {
    if isolation != "read committed" {
        return Err(Error::config(format!(
            "PostgreSQL at {target} runs this connection's transactions at {isolation} \
             (default_transaction_isolation, set by: {source}); distlock needs read \
             committed: remove it from the URL's options, or ALTER ROLE <user> SET \
             default_transaction_isolation = 'read committed'"
        )));
    }
    Ok(())
}

/// Refuses a `distlock_token_seq` that could hand out tokens out of order
/// or come back from a reset inside a live epoch: it must be unlogged,
/// step by 1, cache 1 value and not cycle. (`ALTER SEQUENCE` and `SET
/// LOGGED` copy the current value into what a reset starts from.)
async fn check_sequence(client: &Client, target: &str) -> Result<()> {
    let row = client
        .query_one(
            "SELECT c.relpersistence = 'u' AND s.increment_by = 1 AND s.cache_size = 1 \
             AND NOT s.cycle AND s.max_value = 9223372036854775807 \
             FROM pg_sequences s \
             JOIN pg_class c ON c.oid = format('%I.%I', s.schemaname, s.sequencename)::regclass \
             WHERE c.oid = 'distlock_token_seq'::regclass",
            &[],
        )
        .await
        .map_err(|err| query_error(target, err))?;
    if row.get::<_, bool>(0) {
        return Ok(());
    }
    Err(Error::config(format!(
        "PostgreSQL at {target}: distlock_token_seq was changed (it must be UNLOGGED, \
         INCREMENT 1, CACHE 1, NO CYCLE); drop it and let distlock make it again while no \
         client runs, and never ALTER it"
    )))
}

/// The token `drawn` stands for: itself if the sequence was in a live
/// epoch, else (after starting a new epoch) one drawn afresh.
pub(crate) async fn settle(client: &Client, target: &str, mut drawn: i64) -> Result<u64> {
    for _ in 0..3 {
        if drawn >= FLOOR && drawn & (FLOOR - 1) < FLOOR - MARGIN {
            return Ok(u64::try_from(drawn).unwrap_or(0));
        }
        new_epoch(client, target).await?;
        drawn = client
            .query_one(NEXT, &[])
            .await
            .map_err(|err| query_error(target, err))?
            .get(0);
    }
    Err(Error::store(format!(
        "PostgreSQL at {target}: distlock_token_seq gave {drawn}, outside a live epoch, \
         three times in a row; is it being changed by hand?"
    )))
}

/// Starts a new epoch if the sequence still needs one.
async fn new_epoch(client: &Client, target: &str) -> Result<()> {
    tracing::info!(
        "PostgreSQL at {target}: the token sequence was reset or its epoch is nearly spent; \
         starting a new epoch"
    );
    client
        .batch_execute("CALL distlock_new_epoch()")
        .await
        .map_err(|err| query_error(target, err))
}

#[cfg(test)]
mod tests {
    use super::{check_isolation, check_version};

    #[test]
    fn needs_postgresql_15_or_later() {
        for version in [150000, 150018, 170002] {
            assert!(check_version(version, "db").is_ok(), "{version}");
        }
        for version in [140011, 149999] {
            let err = check_version(version, "db").expect_err("too old");
            assert!(err.to_string().contains("needs 15 or later"), "{err}");
        }
    }

    #[test]
    fn needs_read_committed() {
        assert!(check_isolation("read committed", "default", "db").is_ok());
        for isolation in ["repeatable read", "serializable"] {
            let err = check_isolation(isolation, "user", "db").expect_err("another level");
            let text = err.to_string();
            assert!(
                text.contains("needs read") && text.contains("set by: user"),
                "{text}"
            );
        }
    }
}
