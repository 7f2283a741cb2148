//! `distlock status`: holders and waiters, as the server sees them.

use std::process::ExitCode;

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

fn mode_name(mode: i32, permits: u32) -> String {
    match mode {
        0 => "exclusive".to_owned(),
        1 => "shared".to_owned(),
        _ => format!("semaphore({permits})"),
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
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
    let counters = reply.counters.unwrap_or_default();
    if args.json {
        let keys: Vec<_> = reply
            .keys
            .iter()
            .map(|key| {
                json!({
                    "key": key.key,
                    "last_token": key.last_token,
                    "holders": key.holders.iter().map(|h| json!({
                        "session": h.session_id, "mode": mode_name(h.mode, h.permits),
                        "token": h.token, "held_ms": h.held_ms, "lease_left_ms": h.lease_left_ms,
                    })).collect::<Vec<_>>(),
                    "waiters": key.waiters.iter().map(|w| json!({
                        "session": w.session_id, "mode": mode_name(w.mode, w.permits),
                        "waiting_ms": w.waiting_ms,
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
                h.session_id,
                mode_name(h.mode, h.permits),
                h.token,
                seconds(h.held_ms),
                seconds(h.lease_left_ms)
            );
        }
        for (place, w) in key.waiters.iter().enumerate() {
            println!(
                "  waiter {:>2}. session {:<6} {:<14} waiting {}",
                place + 1,
                w.session_id,
                mode_name(w.mode, w.permits),
                seconds(w.waiting_ms)
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
