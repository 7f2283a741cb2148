//! The baselines `distlock bench` is compared with on Redis and Redlock,
//! with the same workloads and the same report:
//!
//! - `plain`: the lock most teams write by hand on one Redis: `SET key v NX
//!   PX ttl` to take it, a Lua compare-and-delete to give it back; a waiter
//!   asks again every millisecond or so (jittered). No fencing token, no
//!   queue.
//! - `rslock`: the published Redlock crate (`rslock` 0.10), on one Redis or
//!   on several; a waiter retries after its random back-off, as the crate
//!   does.
//!
//! Every client has a connection of its own (as `distlock bench
//! --connections N` gives distlock). `uncontended`: client i loops acquire →
//! release on a key of its own, pairs/s and pair latency; `contended`: every
//! client on one key, acquisitions/s and the latency of the acquire.
//!
//! ```sh
//! cargo run --release -p distlock-bench --bin baseline -- \
//!     plain contended redis://127.0.0.1:6379 16 10
//! cargo run --release -p distlock-bench --bin baseline -- \
//!     rslock uncontended redis://h1:6379,redis://h2:6379,redis://h3:6379 16 10
//! ```
//!
//! `scripts/bench-redis` runs these beside `distlock bench`, alternating.

use std::time::Duration;

use distlock_bench::{report, run, usage, Locker, Settings, Workload};
use redis::aio::MultiplexedConnection;
use redis::Script;

/// The lease each baseline asks for: long enough never to lapse in a run.
const TTL: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = "usage: baseline plain|rslock uncontended|contended URL[,URL…] [CLIENTS] \
                [SECONDS] [THREADS]";
    let [kind, workload, urls, rest @ ..] = args.as_slice() else {
        usage(text);
    };
    let workload = Workload::parse(workload).unwrap_or_else(|| usage(text));
    let settings = Settings::parse(rest);
    let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
    let run_id = format!("{}-{}", std::process::id(), rand::random::<u32>());
    let key = |index: usize| match workload {
        Workload::Uncontended => format!("baseline/{run_id}/own/{index}"),
        Workload::Contended => format!("baseline/{run_id}/shared"),
    };
    let stats = settings.runtime().block_on(async {
        match kind.as_str() {
            "plain" => run(&settings, workload, key, |_| plain(urls[0].clone())).await,
            "rslock" => run(&settings, workload, key, |_| rslock(urls.clone())).await,
            _ => usage(text),
        }
    });
    report(kind, workload, &urls.join(","), &settings, &stats);
}

struct Plain {
    connection: MultiplexedConnection,
    release: Script,
}

async fn plain(url: String) -> Plain {
    let client = redis::Client::open(url.as_str()).expect("a Redis URL");
    Plain {
        connection: client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis"),
        release: Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then \
             return redis.call('DEL', KEYS[1]) else return 0 end",
        ),
    }
}

impl Locker for Plain {
    type Held = Vec<u8>;

    async fn acquire(&mut self, key: &str) -> Vec<u8> {
        let value = rand::random::<u128>().to_le_bytes().to_vec();
        loop {
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(&value)
                .arg("NX")
                .arg("PX")
                .arg(TTL.as_millis() as u64)
                .query_async(&mut self.connection)
                .await
                .expect("SET NX PX");
            if set.is_some() {
                return value;
            }
            let pause = rand::random_range(500..1500);
            tokio::time::sleep(Duration::from_micros(pause)).await;
        }
    }

    async fn release(&mut self, key: &str, value: Vec<u8>) {
        let _: i64 = self
            .release
            .key(key)
            .arg(value)
            .invoke_async(&mut self.connection)
            .await
            .expect("compare-and-delete");
    }
}

struct Rslock {
    manager: rslock::LockManager,
    held: Option<rslock::Lock>,
}

async fn rslock(urls: Vec<String>) -> Rslock {
    Rslock {
        manager: rslock::LockManager::new(urls),
        held: None,
    }
}

impl Locker for Rslock {
    type Held = Vec<u8>;

    async fn acquire(&mut self, key: &str) -> Vec<u8> {
        loop {
            // `lock` retries as the crate is set to (3 tries, up to 200 ms
            // apart); a waiter asks again until it has the lock.
            if let Ok(lock) = self.manager.lock(key.as_bytes(), TTL).await {
                let value = lock.val.clone();
                self.held = Some(lock);
                return value;
            }
        }
    }

    async fn release(&mut self, _key: &str, _value: Vec<u8>) {
        if let Some(lock) = self.held.take() {
            self.manager.unlock(&lock).await;
        }
    }
}
