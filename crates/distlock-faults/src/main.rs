//! `distlock-faults`: the fault suite's orchestrator, its workers and its
//! distlock server process.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use distlock_faults::{run_stores, table, Fault, Plan, Store};

/// The fault suite of distlock.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run stores under faults and print the table; exits 1 on a violation.
    Run {
        /// The long tier (10,000 grants and 10 faults per store and fault).
        #[arg(long)]
        long: bool,
        /// Only these stores (all by default).
        #[arg(long, value_enum)]
        store: Vec<Store>,
        /// Only these faults (all by default).
        #[arg(long, value_enum)]
        fault: Vec<Fault>,
        /// Turn the register's fencing off: the negative control.
        #[arg(long)]
        no_fencing: bool,
    },
    /// A worker process (started by `run`).
    #[command(hide = true)]
    Worker(distlock_faults::worker::WorkerArgs),
    /// A distlock server process (started by `run`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Worker(args) => {
            distlock_faults::worker::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { listen, data_dir } => {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            let config = distlock_server::Config {
                data_dir,
                ..distlock_server::Config::default()
            };
            distlock_server::run(listener, config, std::future::pending()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            long,
            store,
            fault,
            no_fencing,
        } => {
            let mut plan = if long { Plan::long() } else { Plan::ci() };
            plan.fencing = !no_fencing;
            // Each store runs the faults it supports: clusters those of
            // their members, single servers the others.
            let stores = if store.is_empty() {
                [Store::all(), Store::clusters()].concat()
            } else {
                store
            };
            let faults = if fault.is_empty() {
                [Fault::all(), Fault::cluster()].concat()
            } else {
                fault
            };
            let exe = std::env::current_exe()?;
            let rows = run_stores(&exe, &stores, &faults, &plan).await;
            print!("{}", table(&rows));
            Ok(if rows.iter().all(|row| row.passed()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
