//! `distlock bench`: load a store and report throughput, latency, fairness
//! and safety violations.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use distlock::{Client, ErrorKind};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::Barrier;
use tokio::time::{sleep, Instant};

use crate::{parse_duration, StoreArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Client i loops acquire → release on a key of its own: pairs/s and pair
    /// latency.
    Uncontended,
    /// All clients loop blocking acquire → release on the same keys:
    /// acquisitions/s and the latency of the acquire call.
    Contended,
    /// As contended, with a critical section that reads a shared counter,
    /// sleeps --hold and writes counter+1: reports lost updates and tokens
    /// that did not increase.
    Safety,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// What to measure.
    #[arg(long, value_enum, default_value = "contended")]
    workload: Workload,
    /// Concurrent clients, each a task with its own session.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Connections (clients of the store, as from `connect`) the sessions
    /// share, session i on connection i mod C. One by default, as the tasks
    /// of one process share one client.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Keys the contended and safety clients share (client i uses key i mod K).
    #[arg(long, default_value_t = 1)]
    keys: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Time spent inside the critical section of the safety workload.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    hold: Duration,
    /// Threads of the load generator's runtime. One by default: the
    /// sessions share one connection, whose reader and writer a second
    /// thread would only wake across threads (which costs more than it
    /// gives). With several --connections, more threads can help.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    /// The load generator's runtime threads.
    pub fn threads(&self) -> usize {
        usize::from(self.threads)
    }
}

/// What one client did.
struct ClientStats {
    acquisitions: u64,
    latency_us: Histogram<u64>,
}

/// The shared state of one key under the safety workload.
#[derive(Default)]
struct Fenced {
    counter: AtomicU64,
    last_token: AtomicU64,
    token_violations: AtomicU64,
}

#[derive(Debug, Serialize)]
struct Report {
    url: String,
    workload: Workload,
    clients: usize,
    connections: usize,
    threads: usize,
    keys: usize,
    duration_s: f64,
    acquisitions: u64,
    acquisitions_per_s: f64,
    latency_ms: Percentiles,
    fairness: Fairness,
    #[serde(skip_serializing_if = "Option::is_none")]
    violations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_violations: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct Fairness {
    min: u64,
    max: u64,
    jain_index: f64,
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(args.keys > 0, "--keys must be at least 1");
    let url = args.store.url.clone();
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let mut shared = Vec::with_capacity(args.connections.min(args.clients));
    for _ in 0..args.connections.min(args.clients) {
        shared.push(args.store.connect().await?);
    }
    let clients: Vec<Client> = (0..args.clients)
        .map(|index| shared[index % shared.len()].clone())
        .collect();
    // Keys of their own per run, so runs against a persistent store do not
    // meet each other's leftovers.
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let run_id = format!("{}-{}", std::process::id(), since_epoch.as_nanos());
    let fenced: Arc<Vec<Fenced>> = Arc::new((0..args.keys).map(|_| Fenced::default()).collect());
    let acquired = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(args.clients + 1));
    let mut tasks = Vec::with_capacity(args.clients);
    for (index, client) in clients.into_iter().enumerate() {
        // Opened here, not in the task: a task whose open failed would
        // never reach the barrier, and the bench would wait for it forever.
        let session = client
            .session()
            .open()
            .await
            .context("cannot open a session")?;
        let key = match args.workload {
            Workload::Uncontended => format!("bench/{run_id}/own/{index}"),
            Workload::Contended | Workload::Safety => {
                format!("bench/{run_id}/shared/{}", index % args.keys)
            }
        };
        let worker = Worker {
            session,
            key,
            workload: args.workload,
            hold: args.hold,
            fenced: Arc::clone(&fenced),
            slot: index % args.keys,
            acquired: Arc::clone(&acquired),
        };
        let barrier = Arc::clone(&barrier);
        let duration = args.duration;
        tasks.push(tokio::spawn(
            async move { worker.run(barrier, duration).await },
        ));
    }
    barrier.wait().await;
    let started = Instant::now();
    let progress = progress_bar(args.duration);
    while started.elapsed() < args.duration {
        sleep(Duration::from_millis(100).min(args.duration)).await;
        progress.set_position(started.elapsed().as_millis() as u64);
        progress.set_message(format!("{} acquisitions", acquired.load(Ordering::Relaxed)));
    }
    progress.finish_and_clear();
    let mut stats = Vec::with_capacity(tasks.len());
    for task in tasks {
        stats.push(task.await.context("a bench client panicked")??);
    }
    let elapsed = started.elapsed();
    let report = summarize(&args, url, elapsed, &stats, &fenced);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(duration: Duration) -> ProgressBar {
    // indicatif draws nothing when stderr is not a terminal.
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .expect("the template is valid"),
    );
    bar
}

struct Worker {
    session: distlock::Session,
    key: String,
    workload: Workload,
    hold: Duration,
    fenced: Arc<Vec<Fenced>>,
    slot: usize,
    acquired: Arc<AtomicU64>,
}

impl Worker {
    async fn run(self, barrier: Arc<Barrier>, duration: Duration) -> anyhow::Result<ClientStats> {
        let session = self.session;
        let mut stats = ClientStats {
            acquisitions: 0,
            latency_us: latency_histogram(),
        };
        barrier.wait().await;
        let end = Instant::now() + duration;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let started = Instant::now();
            let guard = match session.lock(&self.key).wait(end - now).await {
                Ok(guard) => guard,
                Err(err) if err.kind() == ErrorKind::Timeout => break,
                Err(err) => return Err(err).context(format!("acquire of '{}' failed", self.key)),
            };
            let acquire_latency = started.elapsed();
            if self.workload == Workload::Safety {
                let fenced = &self.fenced[self.slot];
                let previous = fenced.last_token.swap(guard.token(), Ordering::SeqCst);
                if guard.token() <= previous {
                    fenced.token_violations.fetch_add(1, Ordering::SeqCst);
                }
                let seen = fenced.counter.load(Ordering::SeqCst);
                sleep(self.hold).await;
                fenced.counter.store(seen + 1, Ordering::SeqCst);
            }
            guard.release().await.context("release failed")?;
            let latency = match self.workload {
                Workload::Uncontended => started.elapsed(),
                Workload::Contended | Workload::Safety => acquire_latency,
            };
            stats
                .latency_us
                .saturating_record(latency.as_micros() as u64);
            stats.acquisitions += 1;
            self.acquired.fetch_add(1, Ordering::Relaxed);
        }
        session.close().await?;
        Ok(stats)
    }
}

fn summarize(
    args: &BenchArgs,
    url: String,
    elapsed: Duration,
    stats: &[ClientStats],
    fenced: &[Fenced],
) -> Report {
    let mut latency = latency_histogram();
    for client in stats {
        latency
            .add(&client.latency_us)
            .expect("histograms of one shape add");
    }
    let counts: Vec<u64> = stats.iter().map(|s| s.acquisitions).collect();
    let acquisitions: u64 = counts.iter().sum();
    let ms = |us: u64| us as f64 / 1000.0;
    let safety = args.workload == Workload::Safety;
    let counted: u64 = fenced
        .iter()
        .map(|f| f.counter.load(Ordering::SeqCst))
        .sum();
    Report {
        url,
        workload: args.workload,
        clients: args.clients,
        connections: args.connections.min(args.clients),
        threads: args.threads(),
        keys: args.keys,
        duration_s: elapsed.as_secs_f64(),
        acquisitions,
        acquisitions_per_s: acquisitions as f64 / elapsed.as_secs_f64(),
        latency_ms: Percentiles {
            p50: ms(latency.value_at_quantile(0.5)),
            p99: ms(latency.value_at_quantile(0.99)),
            p999: ms(latency.value_at_quantile(0.999)),
            max: ms(latency.max()),
        },
        fairness: Fairness {
            min: counts.iter().copied().min().unwrap_or(0),
            max: counts.iter().copied().max().unwrap_or(0),
            jain_index: jain_index(&counts),
        },
        violations: safety.then(|| acquisitions.saturating_sub(counted)),
        token_violations: safety.then(|| {
            fenced
                .iter()
                .map(|f| f.token_violations.load(Ordering::SeqCst))
                .sum()
        }),
    }
}

/// Latencies in microseconds from 1 µs to an hour, to 3 significant
/// figures; longer ones count as an hour.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("the bounds are valid")
}

/// Jain's fairness index: 1 when every client got the same share, 1/n when
/// one client got everything.
fn jain_index(counts: &[u64]) -> f64 {
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (counts.len() as f64 * squares)
}

fn print_table(report: &Report) {
    let latency_of = match report.workload {
        Workload::Uncontended => "acquire+release pair",
        Workload::Contended | Workload::Safety => "acquire call",
    };
    println!(
        "distlock bench  {}  {:?}  {} clients on {} connection(s), {} thread(s)  {} key(s)  {:.1}s",
        report.url,
        report.workload,
        report.clients,
        report.connections,
        report.threads,
        report.keys,
        report.duration_s
    );
    println!(
        "acquisitions    {} ({:.0}/s)",
        report.acquisitions, report.acquisitions_per_s
    );
    let l = &report.latency_ms;
    println!(
        "latency         p50 {:.3} ms  p99 {:.3} ms  p999 {:.3} ms  max {:.3} ms  ({latency_of})",
        l.p50, l.p99, l.p999, l.max
    );
    let f = &report.fairness;
    println!(
        "fairness        min {} / max {} per client  Jain's index {:.3}",
        f.min, f.max, f.jain_index
    );
    if let (Some(violations), Some(tokens)) = (report.violations, report.token_violations) {
        println!(
            "violations      {violations} lost updates, {tokens} tokens that did not increase"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_latencies_are_recorded_as_they_are() {
        let mut histogram = latency_histogram();
        histogram.saturating_record(5_000_000);
        assert!(histogram.max() >= 4_990_000, "{}", histogram.max());
    }

    #[test]
    fn jain_index_is_one_when_even_and_one_over_n_when_one_takes_all() {
        assert!((jain_index(&[5, 5, 5, 5]) - 1.0).abs() < 1e-9);
        assert!((jain_index(&[8, 0, 0, 0]) - 0.25).abs() < 1e-9);
    }
}
