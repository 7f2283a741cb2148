//! The conformance suite against a real single Redis, one private
//! `redis-server` per test.

use std::cell::RefCell;
use std::sync::Arc;

use distlock_core::Client;
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;

thread_local! {
    /// The test's server; each test runs on its own thread, and the server
    /// is killed when the test ends.
    static SERVER: RefCell<Option<Redis>> = const { RefCell::new(None) };
}

async fn connect() -> Client {
    let url = SERVER.with(|server| server.borrow_mut().get_or_insert_with(Redis::start).url());
    let store = RedisStore::connect(&url)
        .await
        .expect("connect to the test's redis-server");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
