//! A queue entry as etcd keeps it: the key `distlock/NAME/LEASE-SLOT`, and
//! the value `TAG OWNER` (the mode's tag, a space, the session's owner).
//! A value of the tag alone, as written before owners were kept, reads as
//! an entry with no owner.

use distlock_core::store::Mode;
use etcd_client::{GetOptions, SortOrder, SortTarget};

use crate::PREFIX;

/// The lock name as keys spell it: `%` and `/` escaped, so that no lock's
/// keys start with another's. Escaping keeps prefixes: `a` starts with `b`
/// exactly when `escape(a)` starts with `escape(b)`.
pub(crate) fn escape(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

/// The keys of one lock start with this.
pub(crate) fn lock_prefix(name: &str) -> String {
    // Built by hand, not by `format!` and `replace`: this runs for every
    // acquire, and a name seldom has anything to escape.
    let mut prefix = String::with_capacity(PREFIX.len() + name.len() + 24);
    prefix.push_str(PREFIX);
    if name.contains(['%', '/']) {
        prefix.push_str(&escape(name));
    } else {
        prefix.push_str(name);
    }
    prefix.push('/');
    prefix
}

/// The lock an entry's key belongs to; `None` for a key the store did not
/// write.
pub(crate) fn lock_name(key: &[u8]) -> Option<String> {
    let escaped = key.strip_prefix(PREFIX.as_bytes())?;
    let end = escaped.iter().position(|&byte| byte == b'/')?;
    let escaped = std::str::from_utf8(&escaped[..end]).ok()?;
    let mut name = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find('%') {
        name.push_str(&rest[..at]);
        let code = rest.get(at..at + 3)?;
        name.push(match code {
            "%25" => '%',
            "%2F" => '/',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    name.push_str(rest);
    Some(name)
}

/// A read of queues: every key under a prefix, oldest first (in order of
/// create revision).
pub(crate) fn queue_options() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
}

/// The value of an entry in `mode`, of a session that says it is `owner`.
pub(crate) fn value(mode: Mode, owner: &str) -> String {
    if owner.is_empty() {
        return mode.tag();
    }
    format!("{} {owner}", mode.tag())
}

/// The mode's tag of an entry's value: all the queue decision reads. Text
/// that is not UTF-8 is no mode's, and blocks like a writer.
pub(crate) fn tag(value: &[u8]) -> &str {
    let end = value
        .iter()
        .position(|&byte| byte == b' ')
        .unwrap_or(value.len());
    std::str::from_utf8(&value[..end]).unwrap_or_default()
}

/// The owner in an entry's value; empty if it has none.
pub(crate) fn owner(value: &[u8]) -> String {
    match value.iter().position(|&byte| byte == b' ') {
        Some(space) => String::from_utf8_lossy(&value[space + 1..]).into_owned(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_back_from_their_keys() {
        for name in ["a", "a/b", "a%2Fb", "%", "/", "", "ü/%25"] {
            let key = format!("{}{:016x}-0", lock_prefix(name), 7);
            assert_eq!(lock_name(key.as_bytes()).as_deref(), Some(name), "{key}");
        }
        assert_eq!(lock_name(b"distlock/a%2"), None);
        assert_eq!(lock_name(b"distlock/a%41/x"), None);
        assert_eq!(lock_name(b"other/a/x"), None);
    }

    #[test]
    fn escaping_keeps_prefixes() {
        assert!(escape("jobs/a/1").starts_with(&escape("jobs/a/")));
        assert!(!escape("jobs/a%2F1").starts_with(&escape("jobs/a/")));
        assert!(!escape("jobs/a/1").starts_with(&escape("jobs/a%")));
    }

    #[test]
    fn values_carry_the_mode_and_the_owner_and_old_ones_still_read() {
        let written = value(Mode::Semaphore { permits: 3 }, "me@host pid 7 (x y)");
        assert_eq!(written, "p3 me@host pid 7 (x y)");
        assert_eq!(tag(written.as_bytes()), "p3");
        assert_eq!(owner(written.as_bytes()), "me@host pid 7 (x y)");
        assert_eq!((tag(b"s"), owner(b"s")), ("s", String::new()));
        assert_eq!(value(Mode::Exclusive, ""), "x");
        assert_eq!(tag(b"\xff x"), "");
    }
}
