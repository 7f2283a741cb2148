//! `distlock`: run a command while holding a lock, benchmark a store, list
//! the stores.
//!
//! Exit codes: `run` passes on its command's code, 75 when the lock could not
//! be had within `--wait`, 76 when it stopped or killed the command because
//! the lock was at risk or lost, or found the lock lost before it saw the
//! command end (whatever the command's own status); every subcommand exits 2
//! on bad usage or when the store cannot be reached.

mod bench;
mod demo;
mod elect;

mod release;
mod run;
mod serve;
mod status;
mod stderr;
mod supervise;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Exit code for bad usage or an unreachable store.
const EXIT_USAGE: u8 = 2;
/// How long the last lines may take to reach stderr before distlock exits
/// without them: a stderr nobody reads must not hold the exit code up.
const STDERR_PATIENCE: Duration = Duration::from_secs(2);

/// distlock: distributed locks with fencing tokens, over many stores.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command while holding a lock.
    ///
    /// The command gets DISTLOCK_TOKEN (the fencing token) and DISTLOCK_KEY,
    /// and DISTLOCK_TOKENS (`KEY=TOKEN …`, every key given: several --key
    /// hold all of them or none, and the first two are then not set), and
    /// runs in a process group of its own (unless --foreground, the
    /// default when stdin is a terminal). Signals sent to distlock are
    /// forwarded to it. If the lock is at risk (renewals failing, --grace
    /// before the lease runs out) the command gets SIGTERM, and SIGKILL when
    /// the lock is lost; if distlock itself dies, the command is killed too.
    /// Exit code: the command's own, unless distlock stopped or killed it
    /// for the lock's sake, or found the lock lost before it saw the command
    /// end: then 76, whatever the command's status, and stderr says which;
    /// 75 if the lock could not be had within --wait; 2 for bad usage or an
    /// unreachable store.
    Run(run::RunArgs),
    /// Run a command while leading an election.
    ///
    /// Campaigns in election --key (a lock on that key, held by a session
    /// whose owner is --value) and runs the command once elected, as `run`
    /// does: DISTLOCK_TOKEN is the term, which rises with every leader;
    /// signals, exit codes (75 not elected within --wait, 76 leadership at
    /// risk or lost) and the stopping of the command are `run`'s.
    Elect(elect::ElectArgs),
    /// Print who leads an election (value and term), or every change with
    /// --watch. Exit code 69 on a store that cannot tell.
    Leader(elect::LeaderArgs),
    /// Load a store and report throughput, latency, fairness and violations.
    Bench(bench::BenchArgs),
    /// Run the distlock lock server.
    Serve(serve::ServeArgs),
    /// Show the holders and waiters of a key, or of every key under a prefix,
    /// with their owners, tokens and leases, where the store can list them.
    /// Exit code 69 where it cannot.
    Status(status::StatusArgs),
    /// End every hold on a key (--force): the next grant's token is higher,
    /// so the old holder's fenced writes are refused, and its lost() fires.
    Release(release::ReleaseArgs),
    /// List the stores of this build and what each supports.
    Stores,
    /// Demonstrations: `distlock demo coupons` runs the coupon system of
    /// crates/distlock-coupons under load and audits it.
    Demo(demo::DemoArgs),
}

/// Where the store is: `--url`, else `DISTLOCK_URL`, else a distlock server
/// on this host.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The store URL, e.g. distlock://10.0.0.5:7890 or file:///var/lock/distlock;
    /// `distlock stores` lists them.
    #[arg(long, env = "DISTLOCK_URL", default_value = distlock::DEFAULT_URL)]
    url: String,
}

impl StoreArgs {
    async fn connect(&self) -> anyhow::Result<distlock::Client> {
        Ok(distlock::connect(&self.url).await?)
    }
}

/// Parses durations written like `300ms`, `15s` or `2m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("{err}; write durations like 300ms, 15s or 2m"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` must stop its command on time whatever becomes of its stderr.
    if matches!(cli.command, Command::Run(_) | Command::Elect(_)) {
        if let Err(err) = stderr::start() {
            stderr::line(format!(
                "distlock: cannot start a thread to write to stderr: {err}"
            ));
            return ExitCode::from(EXIT_USAGE);
        }
    }
    init_logging(&cli.command);
    let json_logs =
        matches!(&cli.command, Command::Serve(args) if args.log_format == serve::LogFormat::Json);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Command::Bench(args) = &cli.command {
        builder.worker_threads(args.threads());
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            stderr::line(format!("distlock: cannot start the async runtime: {err}"));
            stderr::flush(STDERR_PATIENCE);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Elect(args) => elect::elect(args).await,
            Command::Leader(args) => elect::leader(args).await,
            Command::Bench(args) => bench::bench(args).await,
            Command::Serve(args) => serve::serve(args).await,
            Command::Status(args) => status::status(args).await,
            Command::Release(args) => release::release(args).await,
            Command::Demo(args) => demo::demo(args).await,
            Command::Stores => {
                print!("{}", distlock::capability_table());
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    // Do not wait for background tasks (renewals, releases) at exit.
    runtime.shutdown_background();
    let code = match result {
        Ok(code) => code,
        Err(err) if json_logs => {
            tracing::error!(target: serve::NOTICES, "{}", describe(&err));
            ExitCode::from(EXIT_USAGE)
        }
        Err(err) => {
            stderr::line(format!("distlock: {}", describe(&err)));
            ExitCode::from(EXIT_USAGE)
        }
    };
    stderr::flush(STDERR_PATIENCE);
    code
}

/// Logs go to stderr, coloured only on a terminal (and without `NO_COLOR`):
/// a file or a pipe gets plain text, or JSON lines with `serve --log-format
/// json`. `run` logs through [`stderr`]'s queue, so that no log line holds
/// up a worker of the runtime that times its signals.
fn init_logging(command: &Command) {
    // A server says what it does; the other commands speak only when wrong.
    let (default_level, format) = match command {
        Command::Serve(args) => ("info", args.log_format),
        _ => ("warn", serve::LogFormat::Text),
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("DISTLOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    if matches!(command, Command::Serve(_)) {
        // Whatever DISTLOCK_LOG picks, serve's start, stop and fatal lines
        // are logged: in JSON they go through the log, not around it.
        filter = filter.add_directive(
            format!("{}=info", serve::NOTICES)
                .parse()
                .expect("a valid directive"),
        );
    }
    let writer = match command {
        Command::Run(_) | Command::Elect(_) => BoxMakeWriter::new(stderr::event),
        _ => BoxMakeWriter::new(std::io::stderr),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        serve::LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
            logs.with_ansi(std::io::stderr().is_terminal() && !no_color)
                .init();
        }
        serve::LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

/// The error and its causes, each said once: library messages often quote
/// their cause already.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}
