//! Fencing tokens from a table: one row per key, bumped in one statement
//! that returns the new value. Committed, so tokens survive a restart.

use distlock_core::{Error, Result};
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

/// A connection for token updates, made again when it breaks.
pub(crate) struct Tokens {
    config: Config,
    target: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Tokens {
    /// Connects and makes the table if it is not there.
    pub(crate) async fn connect(config: Config, target: String) -> Result<Tokens> {
        let client = open(&config, &target).await?;
        client
            .batch_execute(CREATE)
            .await
            .map_err(|err| query_error(&target, &err))?;
        Ok(Tokens {
            config,
            target,
            client: tokio::sync::Mutex::new(Some(client)),
        })
    }

    /// The next token of `key`.
    pub(crate) async fn next(&self, key: &str) -> Result<u64> {
        let mut client = self.client.lock().await;
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = Some(open(&self.config, &self.target).await?);
        }
        let live = client.as_ref().expect("connected above");
        let row = match live.query_one(NEXT, &[&key]).await {
            Ok(row) => row,
            Err(err) => {
                let error: Error = query_error(&self.target, &err);
                if err.is_closed() {
                    *client = None;
                }
                return Err(error);
            }
        };
        let token: i64 = row.get(0);
        Ok(u64::try_from(token).unwrap_or(0))
    }
}
