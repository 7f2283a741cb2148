//! The benchmark programs of distlock, and the baselines its figures are
//! compared with: each is a binary of this crate (`src/bin/`).
//!
//! - `baseline`: the plain Redis lock and rslock (Redlock), beside
//!   `distlock bench` in `scripts/bench-redis`;
//! - `get_lock`: MariaDB's and MySQL's `GET_LOCK`, beside `distlock bench`
//!   in `scripts/bench-sql`;
//! - `v3lock` (feature `etcd`): etcd's own lock service, beside
//!   `distlock bench` in `scripts/bench-sql`;
//! - `redis_handover_floor`, `etcd_handover_floor` (feature `etcd`): what
//!   the store itself allows a chain of hand-overs, with no lock around it;
//! - `hold_many`: many locks held at once, to measure a store's memory.
//!
//! ```sh
//! cargo run --release -p distlock-bench --bin get_lock -- contended mysql://u:p@127.0.0.1/db
//! cargo run --release -p distlock-bench --features etcd --bin v3lock -- contended etcd://127.0.0.1:2379
//! ```
//!
//! The three baselines measure as `distlock bench` does and print one line
//! in the same shape; this library is what they share: the workloads, the
//! command line after the URL, the clients' loop and the report.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The workloads of a baseline, as `distlock bench --workload` has them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    /// Client i loops acquire → release on a key of its own: pairs/s and
    /// the latency of the pair.
    Uncontended,
    /// Every client on one key: acquisitions/s and the latency of the
    /// acquire.
    Contended,
}

impl Workload {
    /// `uncontended` or `contended`.
    pub fn parse(text: &str) -> Option<Workload> {
        match text {
            "uncontended" => Some(Workload::Uncontended),
            "contended" => Some(Workload::Contended),
            _ => None,
        }
    }

    /// The name [`Workload::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Uncontended => "uncontended",
            Workload::Contended => "contended",
        }
    }
}

/// Says how a program is called and exits with status 2.
pub fn usage(text: &str) -> ! {
    eprintln!("{text}");
    std::process::exit(2);
}

/// What follows a baseline's URL on its command line: `[CLIENTS] [SECONDS]
/// [THREADS]`, 16, 10 and 1 when left out.
pub struct Settings {
    /// Clients, each with a connection of its own.
    pub clients: usize,
    /// How long the clients run.
    pub duration: Duration,
    /// The worker threads of the runtime.
    pub threads: u64,
}

impl Settings {
    /// Reads `[CLIENTS] [SECONDS] [THREADS]`; panics on one that is not a
    /// number.
    pub fn parse(rest: &[String]) -> Settings {
        let number = |index: usize, default: u64| {
            rest.get(index)
                .map_or(default, |n| n.parse().expect("a number"))
        };
        Settings {
            clients: number(0, 16) as usize,
            duration: Duration::from_secs(number(1, 10)),
            threads: number(2, 1),
        }
    }

    /// A multi-threaded tokio runtime with [`Settings::threads`] workers.
    pub fn runtime(&self) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads as usize)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    }
}

/// One client of a baseline, on a connection of its own.
pub trait Locker: Send + Sized + 'static {
    /// What a held lock is given back with.
    type Held: Send;

    /// Takes `key`, waiting as this lock waits.
    fn acquire(&mut self, key: &str) -> impl Future<Output = Self::Held> + Send;

    /// Gives `key` back.
    fn release(&mut self, key: &str, held: Self::Held) -> impl Future<Output = ()> + Send;

    /// Closes the client after its last release; by default, nothing to do.
    fn close(self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What the clients of a run measured.
pub struct Stats {
    clients: Vec<ClientStats>,
    elapsed: Duration,
}

struct ClientStats {
    acquisitions: u64,
    latency_us: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds")
}

/// Connects `settings.clients` clients one after the other (client i by
/// `connect(i)`, on `key(i)`), then runs them all at once for
/// `settings.duration`: each loops acquire → release, and records the
/// latency `workload` measures.
pub async fn run<L, F, Fut>(
    settings: &Settings,
    workload: Workload,
    key: impl Fn(usize) -> String,
    connect: F,
) -> Stats
where
    L: Locker,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = L>,
{
    let (clients, duration) = (settings.clients, settings.duration);
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for index in 0..clients {
        let mut locker = connect(index).await;
        let key = key(index);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut stats = ClientStats {
                acquisitions: 0,
                latency_us: histogram(),
            };
            barrier.wait().await;
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let started = Instant::now();
                let held = locker.acquire(&key).await;
                let acquire_latency = started.elapsed();
                locker.release(&key, held).await;
                let latency = match workload {
                    Workload::Uncontended => started.elapsed(),
                    Workload::Contended => acquire_latency,
                };
                stats
                    .latency_us
                    .saturating_record(latency.as_micros() as u64);
                stats.acquisitions += 1;
            }
            locker.close().await;
            stats
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut stats = Vec::new();
    for task in tasks {
        stats.push(task.await.expect("a client panicked"));
    }
    Stats {
        clients: stats,
        elapsed: started.elapsed(),
    }
}

/// Prints the one line of a run, the shape `scripts/bench-redis` and
/// `scripts/bench-sql` read: `LABEL WORKLOAD  TARGET  C clients, T
/// thread(s)  N acquisitions  (R/s)  p50 … ms  p99 … ms  Jain's index J`.
pub fn report(label: &str, workload: Workload, target: &str, settings: &Settings, stats: &Stats) {
    let mut latency = histogram();
    for client in stats.clients.iter() {
        latency.add(&client.latency_us).expect("same shape");
    }
    let counts: Vec<u64> = stats.clients.iter().map(|s| s.acquisitions).collect();
    let total: u64 = counts.iter().sum();
    let jain = jain_index(&counts);
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{label} {}  {target}  {} clients, {} thread(s)  {total} acquisitions  \
         ({:.0}/s)  p50 {:.3} ms  p99 {:.3} ms  Jain's index {jain:.3}",
        workload.name(),
        settings.clients,
        settings.threads,
        total as f64 / stats.elapsed.as_secs_f64(),
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
    );
}

/// Jain's fairness index of the clients' counts: 1 when all are equal,
/// 1/n when one client had them all; 0 when there were none.
fn jain_index(counts: &[u64]) -> f64 {
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    if squares > 0.0 {
        sum * sum / (counts.len() as f64 * squares)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_from_fair_to_unfair() {
        assert_eq!(jain_index(&[5, 5, 5, 5]), 1.0);
        assert_eq!(jain_index(&[8, 0, 0, 0]), 0.25);
        assert_eq!(jain_index(&[0, 0]), 0.0);
    }
}
