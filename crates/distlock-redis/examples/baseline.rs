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
//! cargo run --release -p distlock-redis --example baseline -- \
//!     plain contended redis://127.0.0.1:6379 16 10
//! cargo run --release -p distlock-redis --example baseline -- \
//!     rslock uncontended redis://h1:6379,redis://h2:6379,redis://h3:6379 16 10
//! ```
//!
//! `scripts/bench-redis` runs these beside `distlock bench`, alternating.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use redis::aio::MultiplexedConnection;
use redis::Script;

/// The lease each baseline asks for: long enough never to lapse in a run.
const TTL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Uncontended,
    Contended,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: baseline plain|rslock uncontended|contended URL[,URL…] [CLIENTS] \
                 [SECONDS] [THREADS]";
    let [kind, workload, urls, rest @ ..] = args.as_slice() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let workload = match workload.as_str() {
        "uncontended" => Workload::Uncontended,
        "contended" => Workload::Contended,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let number = |index: usize, default: u64| {
        rest.get(index)
            .map_or(default, |n| n.parse().expect("a number"))
    };
    let (clients, seconds, threads) = (number(0, 16) as usize, number(1, 10), number(2, 1));
    let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads as usize)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let duration = Duration::from_secs(seconds);
    let stats = runtime.block_on(async {
        match kind.as_str() {
            "plain" => run(clients, duration, workload, |_| plain(urls[0].clone())).await,
            "rslock" => run(clients, duration, workload, |_| rslock(urls.clone())).await,
            _ => {
                eprintln!("{usage}");
                std::process::exit(2);
            }
        }
    });
    report(kind, workload, &urls, clients, threads, &stats);
}

/// One client: acquire (waiting as its kind waits) and release.
trait Locker: Send + 'static {
    /// Takes `key`, waiting; the value to release it with.
    fn acquire(&mut self, key: &str) -> impl std::future::Future<Output = Vec<u8>> + Send;
    fn release(
        &mut self,
        key: &str,
        value: Vec<u8>,
    ) -> impl std::future::Future<Output = ()> + Send;
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

struct ClientStats {
    acquisitions: u64,
    latency_us: Histogram<u64>,
}

async fn run<L, F, Fut>(
    clients: usize,
    duration: Duration,
    workload: Workload,
    make: F,
) -> (Vec<ClientStats>, Duration)
where
    L: Locker,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = L>,
{
    let run_id = format!("{}-{}", std::process::id(), rand::random::<u32>());
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for index in 0..clients {
        let mut locker = make(index).await;
        let key = match workload {
            Workload::Uncontended => format!("baseline/{run_id}/own/{index}"),
            Workload::Contended => format!("baseline/{run_id}/shared"),
        };
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut stats = ClientStats {
                acquisitions: 0,
                latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
            };
            barrier.wait().await;
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let started = Instant::now();
                let value = locker.acquire(&key).await;
                let acquire_latency = started.elapsed();
                locker.release(&key, value).await;
                let latency = match workload {
                    Workload::Uncontended => started.elapsed(),
                    Workload::Contended => acquire_latency,
                };
                stats
                    .latency_us
                    .saturating_record(latency.as_micros() as u64);
                stats.acquisitions += 1;
            }
            stats
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut stats = Vec::new();
    for task in tasks {
        stats.push(task.await.expect("a client panicked"));
    }
    (stats, started.elapsed())
}

fn report(
    kind: &str,
    workload: Workload,
    urls: &[String],
    clients: usize,
    threads: u64,
    (stats, elapsed): &(Vec<ClientStats>, Duration),
) {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    for client in stats.iter() {
        latency.add(&client.latency_us).expect("same shape");
    }
    let counts: Vec<u64> = stats.iter().map(|s| s.acquisitions).collect();
    let total: u64 = counts.iter().sum();
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    let jain = if squares > 0.0 {
        sum * sum / (counts.len() as f64 * squares)
    } else {
        0.0
    };
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{kind} {}  {}  {clients} clients, {threads} thread(s)  {total} acquisitions  \
         ({:.0}/s)  p50 {:.3} ms  p99 {:.3} ms  Jain's index {jain:.3}",
        match workload {
            Workload::Uncontended => "uncontended",
            Workload::Contended => "contended",
        },
        urls.join(","),
        total as f64 / elapsed.as_secs_f64(),
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
    );
}
