//! The baseline `distlock bench` is compared with on MariaDB and MySQL, with
//! the same workloads and the same report: the lock most teams write by
//! hand, `GET_LOCK(key, timeout)` to take it and `RELEASE_LOCK(key)` to give
//! it back, both prepared once per connection. A waiter waits in the server
//! (GET_LOCK blocks), not by polling. No fencing token, no lease.
//!
//! Every client has a connection of its own (as `distlock bench
//! --connections N` gives distlock), over TCP as distlock's is.
//! `uncontended`: client i loops acquire → release on `bench-i`, pairs/s and
//! pair latency; `contended`: every client on one key, acquisitions/s and
//! the latency of the acquire.
//!
//! ```sh
//! cargo run --release -p distlock-mysql --example get_lock -- \
//!     contended mysql://user:password@127.0.0.1:3306/db 16 10
//! ```
//!
//! `scripts/bench-sql` runs this beside `distlock bench`, alternating.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Statement};

/// How long one GET_LOCK waits in the server before it says 0 and is asked
/// again: far longer than any wait in a run.
const WAIT_SECONDS: u64 = 60;

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Uncontended,
    Contended,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: get_lock uncontended|contended URL [CLIENTS] [SECONDS] [THREADS]";
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
    let number = |index: usize, default: u64| {
        rest.get(index)
            .map_or(default, |n| n.parse().expect("a number"))
    };
    let (clients, seconds, threads) = (number(0, 16) as usize, number(1, 10), number(2, 1));
    let opts = Opts::from_url(url).expect("a MySQL URL");
    // As distlock's store does: stay on TCP, where mysql_async would move a
    // connection to localhost onto the server's Unix socket.
    let opts: Opts = OptsBuilder::from_opts(opts).prefer_socket(false).into();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads as usize)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let duration = Duration::from_secs(seconds);
    let stats = runtime.block_on(run(opts, clients, duration, workload));
    report(workload, url, clients, threads, &stats);
}

/// One client: its connection and its two prepared statements.
struct NamedLock {
    connection: Conn,
    get_lock: Statement,
    release_lock: Statement,
}

impl NamedLock {
    async fn connect(opts: Opts) -> NamedLock {
        let mut connection = Conn::new(opts).await.expect("connect to MySQL");
        let get_lock = connection
            .prep("SELECT GET_LOCK(?, ?)")
            .await
            .expect("prepare GET_LOCK");
        let release_lock = connection
            .prep("SELECT RELEASE_LOCK(?)")
            .await
            .expect("prepare RELEASE_LOCK");
        NamedLock {
            connection,
            get_lock,
            release_lock,
        }
    }

    /// Takes `key`, waiting in the server.
    async fn acquire(&mut self, key: &str) {
        loop {
            let taken: Option<Option<i64>> = self
                .connection
                .exec_first(&self.get_lock, (key, WAIT_SECONDS))
                .await
                .expect("GET_LOCK");
            if taken == Some(Some(1)) {
                return;
            }
        }
    }

    async fn release(&mut self, key: &str) {
        let released: Option<Option<i64>> = self
            .connection
            .exec_first(&self.release_lock, (key,))
            .await
            .expect("RELEASE_LOCK");
        assert_eq!(released, Some(Some(1)), "RELEASE_LOCK of a held lock");
    }
}

struct ClientStats {
    acquisitions: u64,
    latency_us: Histogram<u64>,
}

async fn run(
    opts: Opts,
    clients: usize,
    duration: Duration,
    workload: Workload,
) -> (Vec<ClientStats>, Duration) {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for index in 0..clients {
        let mut lock = NamedLock::connect(opts.clone()).await;
        let key = match workload {
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
                lock.acquire(&key).await;
                let acquire_latency = started.elapsed();
                lock.release(&key).await;
                let latency = match workload {
                    Workload::Uncontended => started.elapsed(),
                    Workload::Contended => acquire_latency,
                };
                stats
                    .latency_us
                    .saturating_record(latency.as_micros() as u64);
                stats.acquisitions += 1;
            }
            lock.connection.disconnect().await.expect("disconnect");
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
        "GET_LOCK {}  {url}  {clients} clients, {threads} thread(s)  {total} acquisitions  \
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
