//! `status`: the lease table's rows, or the server's named locks.

use std::collections::BTreeMap;
use std::time::Duration;

use distlock_core::status::{HolderStatus, KeyStatus, Status, StatusQuery};
use distlock_core::{Error, Mode, Result};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use crate::connect::query_error;
use crate::named::{lock_name, NAME_PREFIX};

/// The unexpired holds the query names: key, holder, mode, owner, token,
/// microseconds left and held. Rows of older clients have no key, owner,
/// token or grant time.
const LEASE_HOLDERS: &str = "SELECT lock_key, holder, mode, owner, token,
        TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at),
        TIMESTAMPDIFF(MICROSECOND, granted_at, UTC_TIMESTAMP(6))
    FROM distlock_leases
    WHERE expires_at > UTC_TIMESTAMP(6) AND {}";

/// A lease row: key, holder, mode, owner, token, microseconds left and
/// held.
type LeaseRow = (
    Option<Vec<u8>>,
    String,
    String,
    Option<String>,
    Option<u64>,
    Option<i64>,
    Option<i64>,
);

/// `ER_UNKNOWN_TABLE`: here, `information_schema` has no such view.
const ER_UNKNOWN_TABLE: u16 = 1109;

fn micros(value: Option<i64>) -> Option<Duration> {
    value.map(|micros| Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
}

fn key_status(key: String) -> KeyStatus {
    KeyStatus {
        key,
        holders: Vec::new(),
        waiters: Vec::new(),
        last_token: None,
    }
}

/// Who holds in the lease table, for the keys `query` names. The table
/// keeps no waiters: a waiter polls.
pub(crate) async fn leases(
    conn: &mut impl Queryable,
    target: &str,
    query: &StatusQuery,
) -> Result<Status> {
    leases_locked(conn, target, query, "").await
}

/// Ends every unexpired hold of `key` in the lease table, in one
/// transaction; what was held. Each old holder's next renewal finds its row
/// gone and reports the key lost; the next grant draws a higher token.
pub(crate) async fn force_release_lease(
    conn: &mut Conn,
    target: &str,
    key: &str,
) -> Result<Vec<HolderStatus>> {
    let error = |err| query_error(target, err);
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .map_err(error)?;
    let query = StatusQuery::Key(key.to_owned());
    let held = leases_locked(&mut tx, target, &query, " FOR UPDATE").await?;
    tx.exec_drop(
        "DELETE FROM distlock_leases
         WHERE key_hash = UNHEX(SHA2(?, 256)) AND expires_at > UTC_TIMESTAMP(6)",
        (key,),
    )
    .await
    .map_err(error)?;
    tx.commit().await.map_err(error)?;
    Ok(held
        .keys
        .into_iter()
        .next()
        .map(|status| status.holders)
        .unwrap_or_default())
}

/// `leases`, the rows read with `locking` (e.g. ` FOR UPDATE`) appended.
async fn leases_locked(
    conn: &mut impl Queryable,
    target: &str,
    query: &StatusQuery,
    locking: &str,
) -> Result<Status> {
    let rows: Vec<LeaseRow> = match query {
        StatusQuery::Key(key) => {
            let sql = LEASE_HOLDERS.replace("{}", "key_hash = UNHEX(SHA2(?, 256))") + locking;
            conn.exec(sql, (key,)).await
        }
        StatusQuery::Prefix(prefix) => {
            let sql =
                LEASE_HOLDERS.replace("{}", "LEFT(lock_key, ?) = CAST(? AS BINARY)") + locking;
            conn.exec(sql, (prefix.len(), prefix)).await
        }
    }
    .map_err(|err| query_error(target, err))?;
    let mut keys = BTreeMap::new();
    for (key, holder, mode, owner, token, left, held) in rows {
        let Some(mode) = Mode::from_tag(&mode) else {
            continue;
        };
        // An older client's row keeps no key: found by its hash, it is
        // the key asked for.
        let key = match (key, query) {
            (Some(key), _) => String::from_utf8_lossy(&key).into_owned(),
            (None, StatusQuery::Key(key)) => key.clone(),
            (None, StatusQuery::Prefix(_)) => continue,
        };
        let holder = HolderStatus {
            session: holder.split('|').next().unwrap_or_default().to_owned(),
            owner: owner.unwrap_or_default(),
            mode,
            token,
            held_for: micros(held),
            lease_left: micros(left),
        };
        keys.entry(key.clone())
            .or_insert_with(|| key_status(key))
            .holders
            .push(holder);
    }
    Ok(Status {
        keys: keys.into_values().collect(),
        counters: None,
    })
}

fn named_holder(connection: u64) -> HolderStatus {
    HolderStatus {
        session: format!("connection {connection}"),
        owner: String::new(),
        mode: Mode::Exclusive,
        token: None,
        held_for: None,
        lease_left: None,
    }
}

/// Who holds a named lock: one key by `IS_USED_LOCK`; a prefix through
/// MariaDB's `metadata_lock_info` plugin, where it is installed. The
/// server shows no waiters of a named lock by name.
pub(crate) async fn named(conn: &mut Conn, target: &str, query: &StatusQuery) -> Result<Status> {
    let prefix = match query {
        StatusQuery::Key(key) => {
            let holder: Option<Option<u64>> = conn
                .exec_first("SELECT IS_USED_LOCK(?)", (lock_name(key),))
                .await
                .map_err(|err| query_error(target, err))?;
            let keys = holder.flatten().map(|connection| KeyStatus {
                holders: vec![named_holder(connection)],
                ..key_status(key.clone())
            });
            return Ok(Status {
                keys: keys.into_iter().collect(),
                counters: None,
            });
        }
        StatusQuery::Prefix(prefix) => prefix,
    };
    let listed: std::result::Result<Vec<(u64, String)>, _> = conn
        .exec(
            "SELECT THREAD_ID, TABLE_SCHEMA FROM information_schema.METADATA_LOCK_INFO \
             WHERE LOCK_TYPE = 'User lock' AND LEFT(TABLE_SCHEMA, ?) = ?",
            (NAME_PREFIX.len(), NAME_PREFIX),
        )
        .await;
    let rows = match listed {
        Ok(rows) => rows,
        Err(mysql_async::Error::Server(err)) if err.code == ER_UNKNOWN_TABLE => {
            return Err(Error::unsupported(format!(
                "MySQL at {target} names no named locks but one at a time; listing them by \
                 prefix needs MariaDB's metadata_lock_info plugin (an administrator runs \
                 INSTALL SONAME 'metadata_lock_info'). Or ask for one key (distlock status \
                 KEY), or use a mysql://…?mode=lease URL, whose locks can be listed"
            )))
        }
        Err(err) => return Err(query_error(target, err)),
    };
    let mut keys = BTreeMap::new();
    for (connection, name) in rows {
        // Hashed names (long keys, or keys with other characters) cannot
        // be read back: only an exact query finds them.
        let Some(key) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        if key.starts_with(prefix.as_str()) {
            keys.entry(key.to_owned())
                .or_insert_with(|| key_status(key.to_owned()))
                .holders
                .push(named_holder(connection));
        }
    }
    Ok(Status {
        keys: keys.into_values().collect(),
        counters: None,
    })
}
