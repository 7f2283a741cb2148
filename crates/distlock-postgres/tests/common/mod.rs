//! What the advisory-mode test binaries share.

use distlock_postgres::advisory_key;

/// `WHERE` terms that find the advisory lock of `name` in `pg_locks`.
pub fn lock_of(name: &str) -> String {
    let key = u64::from_ne_bytes(advisory_key(name).to_ne_bytes());
    format!(
        "locktype = 'advisory' AND classid = {} AND objid = {} AND objsubid = 1",
        key >> 32,
        key & 0xffff_ffff
    )
}
