//! Fencing tokens from a table: one row per key, bumped in one statement
//! that returns the new value. Committed, so tokens survive a restart.

use distlock_core::Result;
use tokio_postgres::{Client, Config};

use crate::connect::{open, query_error};

/// Made under a transaction-scoped advisory lock: two `CREATE TABLE IF NOT
/// EXISTS` at once can both try to create it, and one then fails.
const CREATE: &str = "BEGIN;
SELECT pg_advisory_xact_lock(-8081908180553460213);
CREATE TABLE IF NOT EXISTS distlock_tokens (
    key text PRIMARY KEY,
    token bigint NOT NULL
);
COMMIT;";

const NEXT: &str = "INSERT INTO distlock_tokens AS t (key, token) VALUES ($1, 1)
    ON CONFLICT (key) DO UPDATE SET token = t.token + 1
    RETURNING token";

/// Makes the table if it is not there.
pub(crate) async fn create_table(config: Config, target: String) -> Result<()> {
    let client = open(&config, &target).await?;
    client
        .batch_execute(CREATE)
        .await
        .map_err(|err| query_error(&target, &err))
}

/// The next token of `key`, on `client`: a session's own connection, so
/// that the token is committed before the lock it fences can pass on
/// (which needs that connection to let it go).
pub(crate) async fn next_on(client: &Client, target: &str, key: &str) -> Result<u64> {
    let row = client
        .query_one(NEXT, &[&key])
        .await
        .map_err(|err| query_error(target, &err))?;
    let token: i64 = row.get(0);
    Ok(u64::try_from(token).unwrap_or(0))
}
