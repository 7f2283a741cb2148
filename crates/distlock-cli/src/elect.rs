//! `distlock elect`: run a command while leading an election;
//! `distlock leader`: who leads one, once or at every change.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use distlock::{ErrorKind, Leader, MultiGuard};
use serde_json::json;

use crate::run::{grace_of, hold_while_running, not_acquired};
use crate::status::shown;
use crate::{parse_duration, StoreArgs};

/// Exit code of `leader` on a store that cannot tell who leads.
const EXIT_UNSUPPORTED: u8 = 69;

#[derive(Debug, clap::Args)]
pub struct ElectArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The election's name: a lock key, any UTF-8 string of 1 to 1024
    /// bytes.
    #[arg(long)]
    key: String,
    /// What this candidate publishes while it leads (`distlock leader`
    /// shows it): at most 256 bytes on one line. Default:
    /// `user@host pid N (distlock)`.
    #[arg(long)]
    value: Option<String>,
    /// The session lease, renewed every third of it while the command runs.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease: Duration,
    /// As for `run`: how long before the lease would run out, once
    /// renewals fail, the command gets SIGTERM. Default: a third of the
    /// lease.
    #[arg(long, value_parser = parse_duration)]
    grace: Option<Duration>,
    /// Give up (exit 75) if not elected within this long. Default: campaign
    /// as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
    /// Keep the command in distlock's process group (as for `run`).
    #[arg(long)]
    foreground: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<String>,
}

pub async fn elect(args: ElectArgs) -> anyhow::Result<ExitCode> {
    distlock::validate_key(&args.key)?;
    let grace = grace_of(args.grace, args.lease)?;
    let client = args.store.connect().await?;
    let session = client
        .session()
        .ttl(args.lease)
        .open()
        .await
        .context("cannot open a session")?;
    let mut campaign = session.elect(&args.key);
    if let Some(value) = &args.value {
        campaign = campaign.value(value);
    }
    if let Some(wait) = args.wait {
        campaign = campaign.wait(wait);
    }
    let leadership = match campaign.campaign().await {
        Ok(leadership) => leadership,
        Err(err) if err.kind() == ErrorKind::Timeout => {
            return not_acquired(
                &args.key,
                &format!(
                    "another candidate still led after {:?}",
                    args.wait.unwrap_or_default()
                ),
            )
        }
        Err(err) => return Err(err).context(format!("cannot campaign in '{}'", args.key)),
    };
    let leading = leadership.session().clone();
    // The guard no longer ends with the campaigning session, which has
    // nothing left to do: close it now, not after the command.
    let guard = MultiGuard::from(leadership.into_guard());
    let _ = session.close().await;
    hold_while_running(&leading, guard, &args.command, args.foreground, grace).await
}

#[derive(Debug, clap::Args)]
pub struct LeaderArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The election's name.
    name: String,
    /// Print every change of leader, in order, until interrupted.
    #[arg(long)]
    watch: bool,
    /// One JSON object per line: `{"name": …, "leader": {"value": …,
    /// "term": …}}`, `"leader": null` when nobody leads.
    #[arg(long)]
    json: bool,
    /// How often `--watch` asks the store.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    every: Duration,
}

pub async fn leader(args: LeaderArgs) -> anyhow::Result<ExitCode> {
    distlock::validate_key(&args.name)?;
    let client = args.store.connect().await?;
    if !args.watch {
        return match client.leader(&args.name).await {
            Ok(leader) => {
                print(&args, leader.as_ref());
                Ok(ExitCode::SUCCESS)
            }
            Err(err) if err.kind() == ErrorKind::Unsupported => {
                eprintln!("distlock: {err}");
                Ok(ExitCode::from(EXIT_UNSUPPORTED))
            }
            Err(err) => Err(err.into()),
        };
    }
    let mut observer = client.observe(&args.name).every(args.every);
    loop {
        match observer.next().await {
            Ok(leader) => print(&args, leader.as_ref()),
            Err(err) if err.kind() == ErrorKind::Unsupported => {
                eprintln!("distlock: {err}");
                return Ok(ExitCode::from(EXIT_UNSUPPORTED));
            }
            // The store may come back: say so, and ask again.
            Err(err) => {
                eprintln!("distlock: cannot read the leader of '{}': {err}", args.name);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn print(args: &LeaderArgs, leader: Option<&Leader>) {
    if args.json {
        let leader = leader.map(|l| json!({ "value": l.value, "term": l.term }));
        println!("{}", json!({ "name": args.name, "leader": leader }));
        return;
    }
    match leader {
        Some(l) => println!(
            "{}: led by {} (term {})",
            shown(&args.name),
            shown(&l.value),
            l.term
        ),
        None => println!("{}: nobody leads", shown(&args.name)),
    }
}
