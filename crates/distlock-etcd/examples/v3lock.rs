//! The baseline `distlock bench` is compared with on etcd, with the same
//! workloads and the same report: etcd's own lock service (v3lock, what
//! `etcdctl lock` uses). Each client grants a lease once and keeps it alive,
//! then loops `Lock(name, lease)` → `Unlock(key)`; a waiter waits in the
//! server, queued by revision.
//!
//! Every client has an etcd-client `Client` of its own (as `distlock bench
//! --connections N` gives distlock). `uncontended`: client i loops acquire →
//! release on `bench-i`, pairs/s and pair latency; `contended`: every client
//! on one name, acquisitions/s and the latency of the acquire.
//!
//! ```sh
//! cargo run --release -p distlock-etcd --example v3lock -- \
//!     contended etcd://127.0.0.1:2379 16 10
//! ```
//!
//! `scripts/bench-sql` runs this beside `distlock bench`, alternating.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, LockOptions};
use hdrhistogram::Histogram;

/// The lease each client holds its locks with: it is kept alive, so this
/// only says how long a lock outlives a client that died.
const LEASE_SECONDS: i64 = 30;

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Uncontended,
    Contended,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: v3lock uncontended|contended [etcd://]HOST:PORT[,HOST:PORT…] \
                 [CLIENTS] [SECONDS] [THREADS]";
    let [workload, url, rest @ ..] = args.as_slice() else {
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
    let hosts = url.strip_prefix("etcd://").unwrap_or(url);
    let endpoints: Vec<String> = hosts.split(',').map(|h| format!("http://{h}")).collect();
    let number = |index: usize, default: u64| {
        rest.get(index)
            .map_or(default, |n| n.parse().expect("a number"))
    };
    let (clients, seconds, threads) = (number(0, 16) as usize, number(1, 10), number(2, 1));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads as usize)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let duration = Duration::from_secs(seconds);
    let stats = runtime.block_on(run(endpoints, clients, duration, workload));
    report(workload, url, clients, threads, &stats);
}

/// One client: its own `Client` and its lease, kept alive by a task.
struct V3Lock {
    client: Client,
    lease: i64,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl V3Lock {
    async fn connect(endpoints: &[String]) -> V3Lock {
        let mut client = Client::connect(endpoints, None)
            .await
            .expect("connect to etcd");
        let lease = client
            .lease_grant(LEASE_SECONDS, None)
            .await
            .expect("grant a lease")
            .id();
        let (mut keeper, mut responses) = client
            .lease_keep_alive(lease)
            .await
            .expect("keep the lease alive");
        let keep_alive = tokio::spawn(async move {
            let every = Duration::from_secs(LEASE_SECONDS as u64 / 3);
            loop {
                tokio::time::sleep(every).await;
                keeper.keep_alive().await.expect("send a keep-alive");
                responses
                    .message()
                    .await
                    .expect("a keep-alive answer")
                    .expect("the keep-alive stream open");
            }
        });
        V3Lock {
            client,
            lease,
            keep_alive,
        }
    }

    /// Takes `name`, waiting in the server; the key that holds it.
    async fn acquire(&mut self, name: &str) -> Vec<u8> {
        let options = LockOptions::new().with_lease(self.lease);
        self.client
            .lock(name, Some(options))
            .await
            .expect("Lock")
            .key()
            .to_vec()
    }

    async fn release(&mut self, key: Vec<u8>) {
        self.client.unlock(key).await.expect("Unlock");
    }

    async fn close(mut self) {
        self.keep_alive.abort();
        self.client.lease_revoke(self.lease).await.expect("revoke");
    }
}

struct ClientStats {
    acquisitions: u64,
    latency_us: Histogram<u64>,
}

async fn run(
    endpoints: Vec<String>,
    clients: usize,
    duration: Duration,
    workload: Workload,
) -> (Vec<ClientStats>, Duration) {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for index in 0..clients {
        let mut lock = V3Lock::connect(&endpoints).await;
        let name = match workload {
            Workload::Uncontended => format!("bench-{index}"),
            Workload::Contended => "bench".to_owned(),
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
                let key = lock.acquire(&name).await;
                let acquire_latency = started.elapsed();
                lock.release(key).await;
                let latency = match workload {
                    Workload::Uncontended => started.elapsed(),
                    Workload::Contended => acquire_latency,
                };
                stats
                    .latency_us
                    .saturating_record(latency.as_micros() as u64);
                stats.acquisitions += 1;
            }
            lock.close().await;
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
    workload: Workload,
    url: &str,
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
        "v3lock {}  {url}  {clients} clients, {threads} thread(s)  {total} acquisitions  \
         ({:.0}/s)  p50 {:.3} ms  p99 {:.3} ms  Jain's index {jain:.3}",
        match workload {
            Workload::Uncontended => "uncontended",
            Workload::Contended => "contended",
        },
        total as f64 / elapsed.as_secs_f64(),
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
    );
}
