//! The MySQL and MariaDB store: `mysql://USER[:PASSWORD]@HOST[:PORT]/DB`,
//! in one of two modes. The two do not exclude each other: use one mode per
//! key.
//!
//! # Named locks (the default)
//!
//! Each session is a dedicated connection, and its locks are the server's
//! named locks of that connection (`GET_LOCK`), exclusive only. Keys that
//! are not short printable ASCII are hashed into their lock names, and
//! MySQL compares names without case: keys whose names collide share one
//! lock, so one may wait for the other, but two never hold either at once.
//! Waits happen in the server, and an acquire dropped while it waits
//! leaves no trace. When the connection goes, its locks go: at once for a
//! killed connection or a closed socket, within the session's TTL for a
//! client that vanished; `lost()` fires.
//!
//! Not given: shared locks and semaphores, FIFO order, leases (a frozen
//! client keeps its locks while its connection lives), lock-delay.
//!
//! `status` shows the holding connection of one key (`IS_USED_LOCK`);
//! no owner, token or waiters, which the server does not keep or show by
//! name. A prefix is listed only through MariaDB's `metadata_lock_info`
//! plugin, and then only keys that are their own lock names.
//!
//! # A lease table (`?mode=lease`)
//!
//! A row per holder with the time its lease ends by the server's clock.
//! Exclusive, shared and semaphore modes; no session touches another's
//! hold. Servers that log statement-based binary logs refuse the READ
//! COMMITTED it needs: use row-based logging. MySQL has no notifications,
//! so a waiter is polled (jittered back-off, 1 to 50 ms). `status` lists
//! holders (owner, token, time held, lease left) by key or prefix, from
//! the rows; there are no waiters to list.
//!
//! # Fencing tokens
//!
//! On MariaDB 10.3 or later (outside a Galera cluster) a token is
//! `epoch << 40 | n`, `n` counted by the server's `UUID_SHORT()` since its
//! current run began, drawn in the same statement as a named grant, with no
//! flush and no table per grant; a new run, with a higher epoch, begins
//! after every restart of the server. Elsewhere the token comes from
//! `distlock_tokens`, a row per key, with one flush per grant.
//!
//! What could make tokens go back, plainly: `innodb_flush_log_at_trx_commit
//! = 0` (or `2` and a crash of the whole machine), a failover to a replica
//! behind the primary, a server that serves again after a failover without
//! a restart in between, the tables changed by hand (`distlock_runs`
//! emptied while the server runs, which replication into it from another
//! writable server does after that one restarts), or a key used in both
//! modes at once. Older clients drew tokens from `distlock_token_seq`, or
//! counted them per key in `distlock_tokens`, below `1 << 40`: stop them
//! before the first client of this version starts.
//!
//! See `docs/0008-mysql.md` for the reasoning, and
//! `docs/0004-sql-tokens.md` for the tokens.

mod connect;
mod lease;
mod named;
mod status;
mod tokens;

use std::time::Duration;

use async_trait::async_trait;
use distlock_core::status::{HolderStatus, Status, StatusQuery};
use distlock_core::store::{
    take_url_param, Capabilities, Fencing, LockStore, SessionModel, SessionOptions, StoreSession,
};
use distlock_core::{Error, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Opts, OptsBuilder, Pool};
use url::Url;

/// How long connecting may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const TOKENS: &str = "CREATE TABLE IF NOT EXISTS distlock_tokens (
    key_hash BINARY(32) PRIMARY KEY,
    token BIGINT UNSIGNED NOT NULL
) ENGINE=InnoDB";

pub(crate) const NEXT_TOKEN: &str = "INSERT INTO distlock_tokens (key_hash, token)
    VALUES (UNHEX(SHA2(?, 256)), LAST_INSERT_ID(1))
    ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(token + 1)";

/// How long a statement of the setup at connect waits for a metadata lock
/// on distlock's tables (a `LOCK TABLES`, a backup, an `ALTER`) before it
/// gives up: within the setup's whole limit of twice `CONNECT_TIMEOUT`.
const SETUP_LOCK_WAIT_S: u64 = 8;

/// `ER_UNKNOWN_SYSTEM_VARIABLE`: MySQL has no `wsrep_on`.
const ER_UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;

/// Where a store's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tokens {
    /// MariaDB 10.3 or later, not in a Galera cluster: `epoch << 40 | n`,
    /// `n` counted by `UUID_SHORT()` since the server's run began (see
    /// [`tokens`]).
    Run,
    /// MySQL: a committed row per key, one flush per grant.
    Table,
}

/// A store on one MySQL or MariaDB database.
pub struct MysqlStore {
    opts: Opts,
    target: String,
    /// Short statements: `KILL QUERY`, status, the lease table's setup.
    pool: Pool,
    /// The lease table's grants, releases and renewals (`?mode=lease`):
    /// connections are not reset between uses, so each keeps its prepared
    /// statements; nothing run on them leaves session state behind but
    /// what their setup sets.
    leases: Option<Pool>,
    tokens: Tokens,
}

impl std::fmt::Debug for MysqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlStore")
            .field("target", &self.target)
            .field("lease", &self.leases.is_some())
            .finish()
    }
}

impl MysqlStore {
    /// Connects to the database a `mysql://` URL names, and makes the token
    /// table, epoch and run tables (and in lease mode the lease tables)
    /// if they are not there.
    pub async fn connect(url: &str) -> Result<Self> {
        let usage = "write mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
        let parsed = Url::parse(url)
            .map_err(|err| Error::config(format!("cannot parse '{url}': {err}; {usage}")))?;
        let host = parsed
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| Error::config(format!("'{url}' names no host; {usage}")))?
            .to_owned();
        let (mut plain, mode) = take_url_param(&parsed, "mode");
        // The driver knows only mysql://; mariadb:// names the same server.
        if plain.scheme() == "mariadb" {
            plain
                .set_scheme("mysql")
                .map_err(|()| Error::config(format!("cannot read '{url}'; {usage}")))?;
        }
        let lease = match mode.as_deref() {
            None | Some("named") => false,
            Some("lease") => true,
            Some(other) => {
                return Err(Error::config(format!(
                    "'{url}' asks for mode '{other}'; write mode=named (the default) or \
                     mode=lease"
                )))
            }
        };
        let opts = Opts::from_url(plain.as_str())
            .map_err(|err| Error::config(format!("'{url}' is not a usable MySQL URL: {err}")))?;
        let opts: Opts = OptsBuilder::from_opts(opts)
            .tcp_keepalive(Some(Duration::from_secs(5)))
            .prefer_socket(false)
            // A key row left locked (a client gone mid-transaction) makes
            // acquires busy after a second, not InnoDB's 50: set again after
            // every reset of a pooled connection, which would undo it.
            .setup(vec!["SET SESSION innodb_lock_wait_timeout = 1"])
            .into();
        let database = parsed.path().trim_start_matches('/');
        let target = format!("{host}:{}/{database}", parsed.port().unwrap_or(3306));
        let pool = Pool::new(opts.clone());
        let leases = lease.then(|| {
            Pool::new(
                OptsBuilder::from_opts(opts.clone())
                    // The URL's pool options hold; prepared statements
                    // stay open on the server per connection (at most
                    // 16: MySQL allows 16,382 in all by default).
                    .pool_opts(opts.pool_opts().clone().with_reset_connection(false))
                    .stmt_cache_size(16)
                    // Both waits bounded, so that a grant whose connection
                    // broke ends in time (`lease::SETTLED_AFTER`).
                    .setup(vec![
                        format!(
                            "SET SESSION innodb_lock_wait_timeout = {}",
                            lease::ROW_LOCK_WAIT_S
                        ),
                        format!(
                            "SET SESSION lock_wait_timeout = {}",
                            lease::TABLE_LOCK_WAIT_S
                        ),
                        // No gap locks: acquires of different keys never
                        // wait for each other.
                        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_owned(),
                        // Releases and renewals are single statements.
                        "SET SESSION autocommit = 1".to_owned(),
                    ]),
            )
        });
        let mut store = MysqlStore {
            opts,
            target,
            pool,
            leases,
            tokens: Tokens::Table,
        };
        let setup = async {
            let mut conn = connect::pooled(&store.pool, &store.target).await?;
            let failed = |err: mysql_async::Error| connect::query_error(&store.target, err);
            // The pool's reset of the connection undoes the setting.
            conn.query_drop(format!(
                "SET SESSION lock_wait_timeout = {SETUP_LOCK_WAIT_S}"
            ))
            .await
            .map_err(failed)?;
            conn.query_drop(TOKENS).await.map_err(failed)?;
            let version: Option<String> =
                conn.query_first("SELECT VERSION()").await.map_err(failed)?;
            // Galera keeps MEMORY tables and UUID_SHORT() per node. A server
            // without the variable is no Galera node; any other error ends
            // the connect, so that a node is never taken for a plain server.
            let galera: Option<u8> = match conn.query_first("SELECT @@GLOBAL.wsrep_on").await {
                Ok(on) => on,
                Err(mysql_async::Error::Server(err)) if err.code == ER_UNKNOWN_SYSTEM_VARIABLE => {
                    None
                }
                Err(err) => return Err(failed(err)),
            };
            let tokens = token_source(version.as_deref(), galera);
            if tokens == Tokens::Run {
                tokens::setup(&mut conn, &store.target).await?;
            }
            if lease {
                for statement in lease::SETUP {
                    conn.query_drop(*statement)
                        .await
                        .map_err(|err| connect::query_error(&store.target, err))?;
                }
                lease::add_status_columns(&mut conn, &store.target).await?;
                lease::create_procedure(&mut conn, &store.target, tokens).await?;
            }
            Ok::<_, Error>(tokens)
        };
        store.tokens = match tokio::time::timeout(CONNECT_TIMEOUT * 2, setup).await {
            Ok(Ok(tokens)) => tokens,
            Ok(Err(err)) if lock_wait_timed_out(&err) => {
                return Err(Error::unavailable(format!(
                    "MySQL at {}: distlock's tables stayed locked while connecting (a \
                     LOCK TABLES, a backup, an ALTER, or a transaction left open on them); \
                     find the holder in SHOW PROCESSLIST or \
                     information_schema.METADATA_LOCK_INFO, and connect again",
                    store.target
                ))
                .with_source(err));
            }
            Ok(Err(err)) => return Err(err),
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "MySQL at {} did not answer distlock's setup in {:?}; check the \
                     server's load and the network to it",
                    store.target,
                    CONNECT_TIMEOUT * 2
                )))
            }
        };
        Ok(store)
    }

    /// What named locks give. `status` lists a prefix only where the
    /// server can (MariaDB's `metadata_lock_info` plugin), so it is not
    /// claimed.
    pub fn capabilities() -> Capabilities {
        let mut capabilities = Capabilities::minimal("mysql");
        capabilities.push_wakeup = true;
        capabilities.fencing = Fencing::Durable;
        capabilities.session = SessionModel::Connection;
        capabilities
    }

    /// What the lease table gives (`?mode=lease`).
    pub fn lease_capabilities() -> Capabilities {
        let mut capabilities = Capabilities::minimal("mysql");
        capabilities.shared = true;
        capabilities.semaphore = true;
        capabilities.fencing = Fencing::Durable;
        capabilities.lease_expiry = true;
        capabilities.session = SessionModel::Lease;
        capabilities.status = true;
        capabilities.keeps_owner = true;
        capabilities.force_release = true;
        capabilities.tells_leader = true;
        capabilities
    }
}

#[async_trait]
impl LockStore for MysqlStore {
    fn capabilities(&self) -> Capabilities {
        if self.leases.is_some() {
            MysqlStore::lease_capabilities()
        } else {
            MysqlStore::capabilities()
        }
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        if let Some(leases) = &self.leases {
            return Ok(Box::new(lease::LeaseSession::new(
                leases.clone(),
                self.target.clone(),
                self.tokens,
                options,
            )));
        }
        let mut conn = connect::dedicated(&self.opts, &self.target).await?;
        // A client that vanishes (its host gone) loses its named locks when
        // the server drops the connection: soon after its lease would end,
        // not after 8 hours. Pings at a third of the TTL keep it open.
        let idle = options.ttl.as_secs() + 2;
        conn.query_drop(format!("SET SESSION wait_timeout = {idle}"))
            .await
            .map_err(|err| connect::query_error(&self.target, err))?;
        // A named lock's token is drawn from the server's memory: after a
        // restart of the server, a new run (and epoch) comes first.
        let run = match self.tokens {
            Tokens::Run => Some(tokens::run(&mut conn, &self.target, None).await?),
            Tokens::Table => None,
        };
        Ok(Box::new(
            named::NamedSession::open(
                conn,
                self.pool.clone(),
                self.target.clone(),
                run,
                options.ttl,
            )
            .await?,
        ))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        let mut conn = connect::pooled(&self.pool, &self.target).await?;
        if self.leases.is_some() {
            status::leases(&mut conn, &self.target, query).await
        } else {
            status::named(&mut conn, &self.target, query).await
        }
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        if self.leases.is_none() {
            return Err(Error::unsupported(
                "a named lock ends only with its holder's connection: end that (KILL the \
                 connection distlock status shows), or use a mysql://…?mode=lease URL, whose \
                 holds can be ended",
            ));
        }
        let mut conn = connect::pooled(&self.pool, &self.target).await?;
        let ended = status::force_release_lease(&mut conn, &self.target, key).await?;
        tracing::warn!(key, requested_by, ended = ended.len(), "forced release");
        Ok(ended)
    }
}

/// Where tokens come from: runs on MariaDB 10.3 or later that is not a
/// Galera node (`wsrep_on` 1); the committed table elsewhere.
fn token_source(version: Option<&str>, galera: Option<u8>) -> Tokens {
    if recent_mariadb(version) && galera != Some(1) {
        Tokens::Run
    } else {
        Tokens::Table
    }
}

/// Whether the server's `VERSION()` is MariaDB 10.3 or later.
fn recent_mariadb(version: Option<&str>) -> bool {
    let Some(version) = version.filter(|version| version.contains("MariaDB")) else {
        return false;
    };
    let mut parts = version.split(['.', '-']).map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (10, 3),
        _ => false,
    }
}

/// Whether `err` is a statement that waited out its `lock_wait_timeout`.
fn lock_wait_timed_out(err: &Error) -> bool {
    let source = std::error::Error::source(err);
    matches!(
        source.and_then(|source| source.downcast_ref::<mysql_async::Error>()),
        Some(mysql_async::Error::Server(server)) if server.code == lease::ER_LOCK_WAIT_TIMEOUT
    )
}

#[cfg(test)]
mod tests {
    use super::{recent_mariadb, token_source, Tokens};

    #[test]
    fn runs_from_mariadb_10_3_only() {
        assert!(recent_mariadb(Some("10.11.19-MariaDB-0+deb12u1")));
        assert!(recent_mariadb(Some("11.4.2-MariaDB")));
        assert!(recent_mariadb(Some("10.3.0-MariaDB")));
        assert!(!recent_mariadb(Some("10.2.44-MariaDB")));
        assert!(!recent_mariadb(Some("8.0.36")));
        assert!(!recent_mariadb(None));
    }

    #[test]
    fn runs_only_off_galera() {
        let mariadb = Some("10.11.19-MariaDB-0+deb12u1");
        assert_eq!(token_source(mariadb, Some(0)), Tokens::Run);
        assert_eq!(token_source(mariadb, None), Tokens::Run);
        assert_eq!(token_source(mariadb, Some(1)), Tokens::Table);
        assert_eq!(token_source(Some("8.0.36"), None), Tokens::Table);
    }
}
