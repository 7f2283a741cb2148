//! Between the protocol's messages and distlock's types, both ways: the
//! server and the client convert here, so that they cannot disagree.

use std::time::Duration;

use distlock_core::status::{Counters, HolderStatus, KeyStatus, Status, WaiterStatus};
use distlock_core::Mode;

use crate::v1 as proto;

/// The core mode of a request, or why it is not one.
pub fn mode_of(mode: i32, permits: u32) -> Result<Mode, String> {
    match proto::Mode::try_from(mode) {
        Ok(proto::Mode::Exclusive) => Ok(Mode::Exclusive),
        Ok(proto::Mode::Shared) => Ok(Mode::Shared),
        Ok(proto::Mode::Semaphore) if permits == 0 => {
            Err("a semaphore needs at least 1 permit".to_owned())
        }
        Ok(proto::Mode::Semaphore) => Ok(Mode::Semaphore { permits }),
        Err(_) => Err(format!(
            "unknown mode {mode}; use 0 (exclusive), 1 (shared) or 2 (semaphore)"
        )),
    }
}

/// The protocol's mode and permits of a core mode.
pub fn proto_mode(mode: Mode) -> (proto::Mode, u32) {
    match mode {
        Mode::Exclusive => (proto::Mode::Exclusive, 0),
        Mode::Shared => (proto::Mode::Shared, 0),
        Mode::Semaphore { permits } => (proto::Mode::Semaphore, permits),
    }
}

/// A duration in whole milliseconds, as the protocol carries it (rounded
/// down; `u64::MAX` past that).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A holder, as the server sends it (the server's table knows every
/// field).
pub fn holder(h: HolderStatus) -> proto::Holder {
    let (mode, permits) = proto_mode(h.mode);
    proto::Holder {
        session_id: h.session.parse().unwrap_or_default(),
        mode: mode.into(),
        permits,
        token: h.token.unwrap_or_default(),
        held_ms: h.held_for.map(millis).unwrap_or_default(),
        lease_left_ms: h.lease_left.map(millis).unwrap_or_default(),
        owner: h.owner,
    }
}

/// A holder the server sent. A mode the client does not know reads as
/// exclusive, the strongest.
pub fn holder_status(h: proto::Holder) -> HolderStatus {
    HolderStatus {
        session: h.session_id.to_string(),
        owner: h.owner,
        mode: mode_of(h.mode, h.permits).unwrap_or(Mode::Exclusive),
        token: Some(h.token),
        held_for: Some(Duration::from_millis(h.held_ms)),
        lease_left: Some(Duration::from_millis(h.lease_left_ms)),
    }
}

/// A key's status, as the server sends it.
pub fn key_status(status: KeyStatus) -> proto::KeyStatus {
    let waiter = |w: WaiterStatus| {
        let (mode, permits) = proto_mode(w.mode);
        proto::Waiter {
            session_id: w.session.parse().unwrap_or_default(),
            mode: mode.into(),
            permits,
            waiting_ms: w.waiting_for.map(millis).unwrap_or_default(),
            owner: w.owner,
        }
    };
    proto::KeyStatus {
        key: status.key,
        holders: status.holders.into_iter().map(holder).collect(),
        waiters: status.waiters.into_iter().map(waiter).collect(),
        last_token: status.last_token.unwrap_or_default(),
    }
}

/// The counters, as the server sends them.
pub fn counters(counters: Counters) -> proto::Counters {
    proto::Counters {
        sessions: counters.sessions,
        held: counters.held,
        waiters: counters.waiters,
        sessions_opened: counters.sessions_opened,
        sessions_expired: counters.sessions_expired,
        holds_expired: counters.holds_expired,
        grants: counters.grants,
        releases: counters.releases,
        forced_releases: counters.forced_releases,
    }
}

/// The status the server sent, as a client reports it. A mode the client
/// does not know reads as exclusive, the strongest.
pub fn status_of(reply: proto::StatusReply) -> Status {
    let mode = |mode: i32, permits: u32| mode_of(mode, permits).unwrap_or(Mode::Exclusive);
    let keys = reply
        .keys
        .into_iter()
        .map(|key| KeyStatus {
            key: key.key,
            holders: key.holders.into_iter().map(holder_status).collect(),
            waiters: key
                .waiters
                .into_iter()
                .map(|w| WaiterStatus {
                    session: w.session_id.to_string(),
                    owner: w.owner,
                    mode: mode(w.mode, w.permits),
                    waiting_for: Some(Duration::from_millis(w.waiting_ms)),
                })
                .collect(),
            last_token: Some(key.last_token),
        })
        .collect();
    let counters = reply.counters.map(|counters| Counters {
        sessions: counters.sessions,
        held: counters.held,
        waiters: counters.waiters,
        sessions_opened: counters.sessions_opened,
        sessions_expired: counters.sessions_expired,
        holds_expired: counters.holds_expired,
        grants: counters.grants,
        releases: counters.releases,
        forced_releases: counters.forced_releases,
    });
    Status { keys, counters }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_back_as_it_was_sent() {
        let modes = [
            Mode::Exclusive,
            Mode::Shared,
            Mode::Semaphore { permits: 3 },
        ];
        let keys: Vec<KeyStatus> = modes
            .iter()
            .enumerate()
            .map(|(i, &mode)| KeyStatus {
                key: format!("k{i}"),
                holders: vec![HolderStatus {
                    session: i.to_string(),
                    owner: format!("ops@host{i} pid 7 (job)"),
                    mode,
                    token: Some(10 + i as u64),
                    held_for: Some(Duration::from_millis(1500)),
                    lease_left: Some(Duration::from_millis(250)),
                }],
                waiters: vec![WaiterStatus {
                    session: (100 + i).to_string(),
                    owner: String::new(),
                    mode,
                    waiting_for: Some(Duration::from_millis(7)),
                }],
                last_token: Some(20 + i as u64),
            })
            .collect();
        let counters = Counters {
            sessions: 1,
            held: 2,
            waiters: 3,
            sessions_opened: 4,
            sessions_expired: 5,
            holds_expired: 6,
            grants: 7,
            releases: 8,
            forced_releases: 9,
        };
        let reply = proto::StatusReply {
            keys: keys.iter().cloned().map(key_status).collect(),
            counters: Some(super::counters(counters.clone())),
        };
        let counters = Some(counters);
        assert_eq!(status_of(reply), Status { keys, counters });
    }

    #[test]
    fn modes_read_back_and_bad_ones_are_refused() {
        for mode in [
            Mode::Exclusive,
            Mode::Shared,
            Mode::Semaphore { permits: 9 },
        ] {
            let (wire, permits) = proto_mode(mode);
            assert_eq!(mode_of(wire.into(), permits), Ok(mode));
        }
        assert!(mode_of(proto::Mode::Semaphore.into(), 0).is_err());
        assert!(mode_of(42, 1).is_err());
    }
}
