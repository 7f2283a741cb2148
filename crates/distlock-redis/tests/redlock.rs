//! The conformance suite against Redlock on three real, independent
//! `redis-server`s, started per test.

use std::cell::RefCell;
use std::sync::Arc;

use distlock_core::Client;
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;

thread_local! {
    /// The test's three servers, killed when the test ends.
    static SERVERS: RefCell<Vec<Redis>> = const { RefCell::new(Vec::new()) };
}

async fn connect() -> Client {
    let url = SERVERS.with(|servers| {
        let mut servers = servers.borrow_mut();
        if servers.is_empty() {
            servers.extend((0..3).map(|_| Redis::start()));
        }
        let hosts: Vec<String> = servers.iter().map(Redis::address).collect();
        format!("redlock://{}", hosts.join(","))
    });
    let store = RedisStore::connect(&url)
        .await
        .expect("connect to the test's three redis-servers");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);
