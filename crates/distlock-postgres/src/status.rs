//! `status`: the lease table's rows, or the advisory locks of `pg_locks`.

use std::collections::BTreeMap;
use std::time::Duration;

use distlock_core::status::{HolderStatus, KeyStatus, Status, StatusQuery, WaiterStatus};
use distlock_core::{Error, Mode, Result};
use tokio_postgres::Client;

use crate::connect::query_error;

/// The unexpired holds the query names: key, holder, mode, owner, token,
/// microseconds left and held. Rows of older clients have no owner, token
/// or grant time.
const LEASE_HOLDERS: &str = "SELECT key, holder, mode, owner, token,
        (extract(epoch FROM expires_at - clock_timestamp()) * 1000000)::int8,
        (extract(epoch FROM clock_timestamp() - granted_at) * 1000000)::int8
    FROM distlock_leases_v2
    WHERE expires_at > clock_timestamp() AND {}";

/// The waits still under way: key, waiter, mode, owner, microseconds
/// waited; oldest first. Rows of older clients keep no mode: left out.
const LEASE_WAITERS: &str = "SELECT key, waiter, mode, owner,
        (extract(epoch FROM clock_timestamp() - since) * 1000000)::int8
    FROM distlock_waiters
    WHERE until > clock_timestamp() AND mode IS NOT NULL AND {}
    ORDER BY since, waiter";

/// The advisory locks of one key in this database, holders first, then
/// waiters in the order their current waits began: pid, granted, lock
/// mode, `application_name`, microseconds waited.
const ADVISORY: &str = "SELECT l.pid, l.granted, l.mode, a.application_name,
        (extract(epoch FROM clock_timestamp() - l.waitstart) * 1000000)::int8
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.classid = $1 AND l.objid = $2
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    ORDER BY l.granted DESC, l.waitstart NULLS LAST, l.pid";

fn micros(value: Option<i64>) -> Option<Duration> {
    value.map(|micros| Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
}

/// The session part of a holder's or waiter's name (`SESSION|ATTEMPT`).
fn session_of(name: &str) -> String {
    name.split('|').next().unwrap_or_default().to_owned()
}

/// The key's entry in `keys`, made empty if it is new.
fn entry(keys: &mut BTreeMap<String, KeyStatus>, key: String) -> &mut KeyStatus {
    keys.entry(key.clone()).or_insert_with(|| KeyStatus {
        key,
        holders: Vec::new(),
        waiters: Vec::new(),
        last_token: None,
    })
}

/// Who holds and who waits in the lease table, for the keys `query` names.
pub(crate) async fn leases(client: &Client, target: &str, query: &StatusQuery) -> Result<Status> {
    let error = |err| query_error(target, err);
    let (wanted, text) = match query {
        StatusQuery::Key(key) => ("key = $1", key),
        StatusQuery::Prefix(prefix) => ("starts_with(key, $1)", prefix),
    };
    let holders = client
        .query(&LEASE_HOLDERS.replace("{}", wanted), &[text])
        .await
        .map_err(error)?;
    let waiters = client
        .query(&LEASE_WAITERS.replace("{}", wanted), &[text])
        .await
        .map_err(error)?;
    let mut keys = BTreeMap::new();
    for row in &holders {
        if let Some(holder) = lease_holder(row) {
            entry(&mut keys, row.get(0)).holders.push(holder);
        }
    }
    for row in waiters {
        let Some(mode) = Mode::from_tag(row.get(2)) else {
            continue;
        };
        let waiter = WaiterStatus {
            session: session_of(row.get(1)),
            owner: row.get::<_, Option<String>>(3).unwrap_or_default(),
            mode,
            waiting_for: micros(row.get(4)),
        };
        entry(&mut keys, row.get(0)).waiters.push(waiter);
    }
    Ok(Status {
        keys: keys.into_values().collect(),
        counters: None,
    })
}

/// A row of the lease table (key, holder, mode, owner, token, microseconds
/// left and held) as a holder; `None` for a mode this version does not know.
fn lease_holder(row: &tokio_postgres::Row) -> Option<HolderStatus> {
    Some(HolderStatus {
        session: session_of(row.get(1)),
        owner: row.get::<_, Option<String>>(3).unwrap_or_default(),
        mode: Mode::from_tag(row.get(2))?,
        token: row
            .get::<_, Option<i64>>(4)
            .and_then(|token| u64::try_from(token).ok()),
        held_for: micros(row.get(6)),
        lease_left: micros(row.get(5)),
    })
}

/// Ends every unexpired hold of `key` in the lease table, and wakes its
/// waiters; what was held. Each old holder's next renewal finds its row
/// gone and reports the key lost; the next grant draws a higher token.
pub(crate) async fn force_release_lease(
    client: &Client,
    target: &str,
    key: &str,
) -> Result<Vec<HolderStatus>> {
    let error = |err| query_error(target, err);
    let ended = client.query(FORCE_RELEASE, &[&key]).await.map_err(error)?;
    if !ended.is_empty() {
        client
            .execute(crate::wakeup::NOTIFY_RELEASED, &[&key])
            .await
            .map_err(error)?;
    }
    Ok(ended.iter().filter_map(lease_holder).collect())
}

/// Deletes the unexpired holds of a key, returning them as `LEASE_HOLDERS`
/// reads them.
const FORCE_RELEASE: &str = "WITH ended AS (
        DELETE FROM distlock_leases_v2 WHERE key = $1 AND expires_at > clock_timestamp()
        RETURNING key, holder, mode, owner, token, expires_at, granted_at)
    SELECT key, holder, mode, owner, token,
        (extract(epoch FROM expires_at - clock_timestamp()) * 1000000)::int8,
        (extract(epoch FROM clock_timestamp() - granted_at) * 1000000)::int8
    FROM ended";

/// Advisory locks by prefix: refused, saying what to do instead.
pub(crate) fn advisory_prefix() -> Result<Status> {
    Err(Error::unsupported(
        "PostgreSQL advisory locks are numbers hashed from their keys, so they cannot be \
         listed by prefix; ask for one key (distlock status KEY), or use a \
         postgres://…?mode=lease URL, whose locks can be listed",
    ))
}

/// Who holds and who waits for one key's advisory lock. The lock is a
/// number hashed from the key, so a key of the same hash shows here too.
pub(crate) async fn advisory(client: &Client, target: &str, key: &str) -> Result<Status> {
    let id = u64::from_ne_bytes(crate::advisory::lock_id(key).to_ne_bytes());
    let (high, low) = ((id >> 32) as u32, (id & 0xffff_ffff) as u32);
    let rows = client
        .query(ADVISORY, &[&high, &low])
        .await
        .map_err(|err| query_error(target, err))?;
    let mut status = KeyStatus {
        key: key.to_owned(),
        holders: Vec::new(),
        waiters: Vec::new(),
        last_token: None,
    };
    for row in rows {
        let mode = match row.get::<_, Option<&str>>(2) {
            Some("ExclusiveLock") => Mode::Exclusive,
            Some("ShareLock") => Mode::Shared,
            _ => continue,
        };
        let session = row.get::<_, Option<i32>>(0).map_or_else(
            || "a prepared transaction".to_owned(),
            |pid| format!("pid {pid}"),
        );
        // As PostgreSQL keeps `application_name`: at most 63 bytes.
        let owner = row.get::<_, Option<String>>(3).unwrap_or_default();
        if row.get(1) {
            status.holders.push(HolderStatus {
                session,
                owner,
                mode,
                token: None,
                held_for: None,
                lease_left: None,
            });
        } else {
            status.waiters.push(WaiterStatus {
                session,
                owner,
                mode,
                waiting_for: micros(row.get(4)),
            });
        }
    }
    let keys = if status.holders.is_empty() && status.waiters.is_empty() {
        Vec::new()
    } else {
        vec![status]
    };
    Ok(Status {
        keys,
        counters: None,
    })
}
