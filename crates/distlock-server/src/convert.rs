//! Between the protocol's messages and the lock table's types.

use distlock_core::status::{Counters, HolderStatus, KeyStatus, WaiterStatus};
use distlock_core::Mode;
use distlock_proto::v1 as proto;

/// The core mode of a request, or why it is not one.
pub(crate) fn mode_of(mode: i32, permits: u32) -> Result<Mode, String> {
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
pub(crate) fn proto_mode(mode: Mode) -> (proto::Mode, u32) {
    match mode {
        Mode::Exclusive => (proto::Mode::Exclusive, 0),
        Mode::Shared => (proto::Mode::Shared, 0),
        Mode::Semaphore { permits } => (proto::Mode::Semaphore, permits),
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn key_status(status: KeyStatus) -> proto::KeyStatus {
    let holder = |h: HolderStatus| {
        let (mode, permits) = proto_mode(h.mode);
        proto::Holder {
            session_id: h.session,
            mode: mode.into(),
            permits,
            token: h.token,
            held_ms: millis(h.held_for),
            lease_left_ms: millis(h.lease_left),
        }
    };
    let waiter = |w: WaiterStatus| {
        let (mode, permits) = proto_mode(w.mode);
        proto::Waiter {
            session_id: w.session,
            mode: mode.into(),
            permits,
            waiting_ms: millis(w.waiting_for),
        }
    };
    proto::KeyStatus {
        key: status.key,
        holders: status.holders.into_iter().map(holder).collect(),
        waiters: status.waiters.into_iter().map(waiter).collect(),
        last_token: status.last_token,
    }
}

pub(crate) fn counters(counters: Counters) -> proto::Counters {
    proto::Counters {
        sessions: counters.sessions,
        held: counters.held,
        waiters: counters.waiters,
        sessions_opened: counters.sessions_opened,
        sessions_expired: counters.sessions_expired,
        holds_expired: counters.holds_expired,
        grants: counters.grants,
        releases: counters.releases,
    }
}
