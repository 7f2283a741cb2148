//! The fast path's `SET NX` and `INCR` run in one `MULTI`/`EXEC`: no other
//! client's commands (a forced release, another take) can run between
//! them, so a fast grant's token always follows the one before it.

use std::time::Duration;

use distlock_core::store::{AcquireRequest, HeldLock, LockStore, SessionOptions};
use distlock_core::Mode;
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_take_is_one_transaction() {
    let server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let session = store
        .open_session(&SessionOptions::new(
            Duration::from_secs(10),
            Duration::ZERO,
        ))
        .await
        .expect("open");
    let mut tokens = Vec::new();
    for round in 0..3 {
        let request = AcquireRequest::new("fast/transaction", Mode::Exclusive);
        let grant = session.acquire(&request).await.expect("acquire");
        let token = grant.expect("free").token;
        tokens.push(token);
        // Each take: its SET and INCR, queued, run by one EXEC.
        assert_eq!(server.calls("exec"), round + 1, "round {round}");
        assert_eq!(server.calls("incr"), round + 1, "round {round}");
        let held = HeldLock {
            key: "fast/transaction".to_owned(),
            mode: Mode::Exclusive,
            token,
        };
        session.release(&held).await.expect("release");
    }
    assert_eq!(tokens, [1, 2, 3]);
    // A failed try takes a number too, in its own transaction.
    let holder = store
        .open_session(&SessionOptions::new(
            Duration::from_secs(10),
            Duration::ZERO,
        ))
        .await
        .expect("open");
    let request = AcquireRequest::new("fast/busy", Mode::Exclusive);
    holder
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    assert!(session.acquire(&request).await.expect("try").is_none());
    assert_eq!(server.calls("exec"), 5);
}
