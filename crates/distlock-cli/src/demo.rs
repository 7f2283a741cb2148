//! `distlock demo coupons`: the coupon system of `crates/distlock-coupons`
//! under load from several processes, then its audit.

use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use distlock_coupons::{Audit, Db, Location, WorkerConfig, WorkerReport};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::parse_duration;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(subcommand)]
    demo: Demo,
}

#[derive(Debug, clap::Subcommand)]
enum Demo {
    /// Issue, freeze, unfreeze and redeem coupons from many processes, each
    /// operation under a lock with its fencing token in the write, then
    /// audit the result. With no options: an embedded distlock server, an
    /// SQLite database, about ten seconds. Exits 1 if the audit finds a
    /// violation.
    Coupons(CouponArgs),
}

#[derive(Debug, clap::Args)]
struct CouponArgs {
    /// The lock store; an embedded distlock server if not given.
    #[arg(long, env = "DISTLOCK_URL")]
    url: Option<String>,
    /// The coupon database: postgres://… or an SQLite file (sqlite://PATH);
    /// a new SQLite file if not given. The demo drops and makes again its
    /// tables coupon_batches, coupon_coupons and coupon_events.
    #[arg(long)]
    db: Option<String>,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    processes: u32,
    /// Tasks per process, each with a session and a database connection.
    #[arg(long, default_value_t = 8)]
    workers: u32,
    /// Batches of coupons.
    #[arg(long, default_value_t = 10)]
    batches: u32,
    /// Coupons per batch.
    #[arg(long, default_value_t = 500)]
    stock: u32,
    /// Users asking for coupons.
    #[arg(long, default_value_t = 2000)]
    users: u32,
    /// How long the workers run.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    duration: Duration,
    /// Take no locks and write no tokens: the negative control, which the
    /// audit must catch.
    #[arg(long)]
    no_lock: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: run as one worker process of a demo, and print its report
    /// as JSON.
    #[arg(long, hide = true)]
    worker: bool,
}

impl CouponArgs {
    fn config(&self, db: &str) -> WorkerConfig {
        WorkerConfig {
            db: db.to_owned(),
            workers: self.workers,
            duration: self.duration,
            batches: self.batches,
            stock: self.stock,
            users: self.users,
            locking: !self.no_lock,
        }
    }
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    match args.demo {
        Demo::Coupons(args) if args.worker => worker(args).await,
        Demo::Coupons(args) => coupons(args).await,
    }
}

/// One worker process: runs its tasks, printing `progress N` lines, then
/// `report {json}`.
async fn worker(args: CouponArgs) -> anyhow::Result<ExitCode> {
    let url = args.url.clone().context("a worker needs --url")?;
    let db = args.db.clone().context("a worker needs --db")?;
    let client = distlock::connect(&url).await?;
    let progress = Arc::new(AtomicU64::new(0));
    let ticker = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                println!("progress {}", progress.load(Ordering::Relaxed));
            }
        })
    };
    let report = distlock_coupons::run_workers(&client, &args.config(&db), progress).await;
    ticker.abort();
    println!("report {}", serde_json::to_string(&report?)?);
    Ok(ExitCode::SUCCESS)
}

/// The embedded lock server, stopped when dropped.
struct Embedded {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Embedded {
    async fn start(dir: &std::path::Path) -> anyhow::Result<Embedded> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("distlock://{}", listener.local_addr()?);
        let config = distlock_server::Config {
            data_dir: dir.join("locks"),
            ..distlock_server::Config::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(err) = distlock_server::run(listener, config, shutdown).await {
                eprintln!("distlock: the embedded server stopped: {err}");
            }
        });
        Ok(Embedded {
            url,
            stop: Some(stop),
            task,
        })
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

#[derive(Debug, Serialize)]
struct Summary {
    url: String,
    db: String,
    processes: u32,
    workers: u32,
    locking: bool,
    seconds: f64,
    /// Changes per second, by operation.
    per_second: std::collections::BTreeMap<String, f64>,
    done: std::collections::BTreeMap<String, u64>,
    skipped: std::collections::BTreeMap<String, u64>,
    stale_refused: u64,
    errors: u64,
    error_samples: Vec<String>,
    lock_wait_p50_ms: f64,
    lock_wait_p99_ms: f64,
    audit_clean: bool,
    violations: std::collections::BTreeMap<&'static str, u64>,
    violation_samples: Vec<String>,
}

async fn coupons(args: CouponArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.processes > 0, "--processes must be at least 1");
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(
        args.batches > 0 && args.stock > 0,
        "--batches and --stock must be at least 1"
    );
    let dir = tempfile::Builder::new()
        .prefix("distlock-demo-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let (url, embedded) = match &args.url {
        Some(url) => (url.clone(), None),
        None => {
            let embedded = Embedded::start(dir.path()).await?;
            (embedded.url.clone(), Some(embedded))
        }
    };
    // The store must answer before workers are started on it.
    distlock::connect(&url).await?;
    let db_text = args
        .db
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("coupons.db").display()));
    let location = Location::parse(&db_text);
    let mut db = Db::open(&location).await?;
    distlock_coupons::setup(&mut db, args.batches, args.stock).await?;

    let progress = ProgressBar::new(args.duration.as_millis() as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {elapsed} {msg}").expect("a valid template"),
    );
    let exe = std::env::current_exe().context("cannot find the distlock binary")?;
    let done = Arc::new(AtomicU64::new(0));
    let mut children = Vec::new();
    let started = Instant::now();
    // A memory store lives in one process: its "processes" are clients of
    // their own in this one.
    let in_process = url.starts_with("memory://");
    for i in (0..args.processes).filter(|_| in_process) {
        let client = distlock::connect(&url).await?;
        let config = args.config(&db_text);
        let done = Arc::clone(&done);
        children.push(tokio::spawn(async move {
            let report = distlock_coupons::run_workers(&client, &config, done).await;
            let status = match &report {
                Ok(_) => Ok(format!("in-process group {i} done")),
                Err(err) => Err(std::io::Error::other(err.to_string())),
            };
            (status, report.ok())
        }));
    }
    for i in (0..args.processes).filter(|_| !in_process) {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args([
                "demo", "coupons", "--worker", "--url", &url, "--db", &db_text,
            ])
            .args(["--workers", &args.workers.to_string()])
            .args(["--batches", &args.batches.to_string()])
            .args(["--stock", &args.stock.to_string()])
            .args(["--users", &args.users.to_string()])
            .args(["--duration", &format!("{}ms", args.duration.as_millis())])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if args.no_lock {
            command.arg("--no-lock");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start worker process {i}"))?;
        let stdout = child.stdout.take().context("worker output")?;
        let done = Arc::clone(&done);
        children.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut report = None;
            let mut last = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(count) = line.strip_prefix("progress ") {
                    let count: u64 = count.parse().unwrap_or(last);
                    done.fetch_add(count.saturating_sub(last), Ordering::Relaxed);
                    last = count;
                } else if let Some(json) = line.strip_prefix("report ") {
                    report = serde_json::from_str::<WorkerReport>(json).ok();
                }
            }
            let status = child.wait().await.map(|status| status.to_string());
            (status, report)
        }));
    }
    let mut reports = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut pending = children;
    while !pending.is_empty() {
        ticker.tick().await;
        let elapsed = started.elapsed();
        progress.set_position(elapsed.as_millis().min(args.duration.as_millis()) as u64);
        let count = done.load(Ordering::Relaxed);
        progress.set_message(format!(
            "{count} operations, {:.0}/s",
            count as f64 / elapsed.as_secs_f64().max(0.001)
        ));
        let mut still = Vec::new();
        for child in pending {
            if child.is_finished() {
                reports.push(child.await?);
            } else {
                still.push(child);
            }
        }
        pending = still;
    }
    progress.finish_and_clear();
    let seconds = started
        .elapsed()
        .as_secs_f64()
        .min(args.duration.as_secs_f64());
    let mut total = WorkerReport::default();
    for (i, (status, report)) in reports.into_iter().enumerate() {
        let status = status.with_context(|| format!("worker process {i}"))?;
        let report = report.with_context(|| {
            format!("worker process {i} ended ({status}) without a report; see its errors above")
        })?;
        total.merge(&report);
    }
    let audit = distlock_coupons::audit(&mut db).await?;
    if let Some(embedded) = embedded {
        embedded.stop().await;
    }
    let summary = summarize(&args, url, db_text, seconds, &total, &audit);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if audit.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn summarize(
    args: &CouponArgs,
    url: String,
    db: String,
    seconds: f64,
    total: &WorkerReport,
    audit: &Audit,
) -> Summary {
    let waits = total.lock_waits();
    let mut samples = Vec::new();
    for (rule, _) in audit.by_rule() {
        for violation in audit.violations.iter().filter(|v| v.rule == rule).take(3) {
            samples.push(format!("{rule}: {}", violation.detail));
        }
    }
    Summary {
        url,
        db,
        processes: args.processes,
        workers: args.workers,
        locking: !args.no_lock,
        seconds,
        per_second: total
            .done
            .iter()
            .map(|(kind, count)| (kind.clone(), *count as f64 / seconds.max(0.001)))
            .collect(),
        done: total.done.clone(),
        skipped: total.skipped.clone(),
        stale_refused: total.stale,
        errors: total.errors,
        error_samples: total.error_samples.clone(),
        lock_wait_p50_ms: waits.value_at_quantile(0.5) as f64 / 1000.0,
        lock_wait_p99_ms: waits.value_at_quantile(0.99) as f64 / 1000.0,
        audit_clean: audit.is_clean(),
        violations: audit.by_rule(),
        violation_samples: samples,
    }
}

fn print_summary(summary: &Summary) {
    println!(
        "coupons  store {}  db {}  {} processes × {} workers  {:.1}s{}",
        summary.url,
        summary.db,
        summary.processes,
        summary.workers,
        summary.seconds,
        if summary.locking { "" } else { "  NO LOCKS" }
    );
    let total: f64 = summary.per_second.values().sum();
    println!("operations/s    {total:.0}");
    for kind in ["issue", "freeze", "unfreeze", "redeem"] {
        println!(
            "  {kind:<12}  {:>8.0}/s  ({} done, {} found nothing to do)",
            summary.per_second.get(kind).copied().unwrap_or(0.0),
            summary.done.get(kind).copied().unwrap_or(0),
            summary.skipped.get(kind).copied().unwrap_or(0),
        );
    }
    println!(
        "lock wait       p50 {:.3} ms  p99 {:.3} ms",
        summary.lock_wait_p50_ms, summary.lock_wait_p99_ms
    );
    println!(
        "stale writes    {} refused by their fencing token",
        summary.stale_refused
    );
    if summary.errors > 0 {
        println!("errors          {}", summary.errors);
        for sample in &summary.error_samples {
            println!("  {sample}");
        }
    }
    if summary.audit_clean {
        println!("audit           clean: no coupon issued twice, none over stock, one per user per batch, every redeem issued and frozen first, no stale token accepted");
    } else {
        let counts: Vec<String> = summary
            .violations
            .iter()
            .map(|(rule, count)| format!("{count} {rule}"))
            .collect();
        println!("audit           FAILED: {}", counts.join(", "));
        for sample in &summary.violation_samples {
            println!("  {sample}");
        }
    }
}
