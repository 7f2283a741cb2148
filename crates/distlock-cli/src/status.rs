//! `distlock status`: holders and waiters, as the server sees them.

use std::process::ExitCode;
use std::time::Duration;

use distlock::RemoteStore;
use serde_json::json;

use crate::StoreArgs;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// One key; without it, every key (under --prefix).
    key: Option<String>,
    /// Only keys that start with this.
    #[arg(long, conflicts_with = "key", default_value = "")]
    prefix: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let url = url::Url::parse(&args.store.url)?;
    anyhow::ensure!(
        matches!(url.scheme(), "distlock" | "distlocks"),
        "status asks a distlock server (distlock://HOST:PORT); {} keeps no status to ask",
        args.store.url
    );
    let store = RemoteStore::connect(&url).await?;
    let reply = store.status(args.key.as_deref(), &args.prefix).await?;
    let counters = reply.counters;
    if args.json {
        let keys: Vec<_> = reply
            .keys
            .iter()
            .map(|key| {
                json!({
                    "key": key.key,
                    "last_token": key.last_token,
                    "holders": key.holders.iter().map(|h| json!({
                        "session": h.session, "mode": h.mode.to_string(),
                        "token": h.token, "held_ms": millis(h.held_for),
                        "lease_left_ms": millis(h.lease_left),
                    })).collect::<Vec<_>>(),
                    "waiters": key.waiters.iter().map(|w| json!({
                        "session": w.session, "mode": w.mode.to_string(),
                        "waiting_ms": millis(w.waiting_for),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let counters = json!({
            "sessions": counters.sessions, "held": counters.held, "waiters": counters.waiters,
            "sessions_opened": counters.sessions_opened, "sessions_expired": counters.sessions_expired,
            "holds_expired": counters.holds_expired, "grants": counters.grants, "releases": counters.releases,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "keys": keys, "counters": counters }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if reply.keys.is_empty() {
        println!("no key held or waited for");
    }
    for key in &reply.keys {
        println!("{}  (last token {})", key.key, key.last_token);
        for h in &key.holders {
            println!(
                "  holder   session {:<6} {:<14} token {:<16} held {:<8} lease left {}",
                h.session,
                h.mode.to_string(),
                h.token,
                seconds(h.held_for),
                seconds(h.lease_left)
            );
        }
        for (place, w) in key.waiters.iter().enumerate() {
            println!(
                "  waiter {:>2}. session {:<6} {:<14} waiting {}",
                place + 1,
                w.session,
                w.mode.to_string(),
                seconds(w.waiting_for)
            );
        }
    }
    println!(
        "{} sessions, {} holds, {} waiting; {} grants, {} releases, {} sessions expired, {} holds ended by max_hold",
        counters.sessions,
        counters.held,
        counters.waiters,
        counters.grants,
        counters.releases,
        counters.sessions_expired,
        counters.holds_expired
    );
    Ok(ExitCode::SUCCESS)
}
