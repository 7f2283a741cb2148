//! Session requests as both test binaries of the session protocol send
//! them (`bad_input.rs` over gRPC, `mux.rs` over the multiplexed
//! connection).

use distlock_proto::v1 as proto;
use proto::session_request::Body as Request;

/// An `Open` with lease `ttl_ms` and nothing else set.
pub fn open(ttl_ms: u64) -> Request {
    Request::Open(proto::Open {
        ttl_ms,
        lock_delay_ms: 0,
        max_hold_ms: 0,
        owner: String::new(),
    })
}

/// An exclusive acquire of `key` that does not wait.
pub fn acquire(key: &str) -> Request {
    waiting(key, 0)
}

/// A release of this session's hold of `key`, whatever its token.
pub fn release(key: &str) -> Request {
    Request::Release(proto::Release {
        key: key.to_owned(),
        token: 0,
    })
}

/// An exclusive acquire of `key` that waits up to `wait_ms`.
pub fn waiting(key: &str, wait_ms: u64) -> Request {
    Request::Acquire(proto::Acquire {
        key: key.to_owned(),
        mode: proto::Mode::Exclusive.into(),
        permits: 0,
        wait_ms,
    })
}
