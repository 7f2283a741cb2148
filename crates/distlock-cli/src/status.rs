//! `distlock status`: who holds and who waits, on any store that can list
//! them, in one table (or JSON) for all.

use std::process::ExitCode;
use std::time::Duration;

use distlock::status::{Counters, HolderStatus, KeyStatus, StatusQuery, WaiterStatus};
use distlock::ErrorKind;
use serde_json::{json, Value};

use crate::StoreArgs;

/// Exit code when the store cannot list its holders.
pub const EXIT_UNSUPPORTED: u8 = 69;

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

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
}

fn millis(duration: Option<Duration>) -> Value {
    duration.map_or(Value::Null, |d| {
        json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}

/// `text` as a terminal line shows it: `-` when empty, control characters
/// (a newline, an escape sequence another program stored as an owner) as
/// `?`. JSON output escapes them itself.
pub fn shown(text: &str) -> String {
    if text.is_empty() {
        return "-".to_owned();
    }
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn holder_json(h: &HolderStatus) -> Value {
    json!({
        "session": h.session, "owner": h.owner, "mode": h.mode.to_string(),
        "token": h.token, "held_ms": millis(h.held_for), "lease_left_ms": millis(h.lease_left),
    })
}

fn waiter_json(w: &WaiterStatus) -> Value {
    json!({
        "session": w.session, "owner": w.owner, "mode": w.mode.to_string(),
        "waiting_ms": millis(w.waiting_for),
    })
}

fn key_json(key: &KeyStatus) -> Value {
    json!({
        "key": key.key,
        "last_token": key.last_token,
        "holders": key.holders.iter().map(holder_json).collect::<Vec<_>>(),
        "waiters": key.waiters.iter().map(waiter_json).collect::<Vec<_>>(),
    })
}

fn counters_json(c: &Counters) -> Value {
    json!({
        "sessions": c.sessions, "held": c.held, "waiters": c.waiters,
        "sessions_opened": c.sessions_opened, "sessions_expired": c.sessions_expired,
        "holds_expired": c.holds_expired, "grants": c.grants, "releases": c.releases,
        "forced_releases": c.forced_releases,
    })
}

fn print_key(key: &KeyStatus) {
    match key.last_token {
        Some(token) => println!("{}  (last token {token})", shown(&key.key)),
        None => println!("{}", shown(&key.key)),
    }
    for h in &key.holders {
        println!(
            "  holder   {:<14} token {:<20} held {:<8} lease left {:<8} {}",
            h.mode.to_string(),
            h.token.map_or_else(|| "-".to_owned(), |t| t.to_string()),
            seconds(h.held_for),
            seconds(h.lease_left),
            shown(&h.owner),
        );
    }
    for (place, w) in key.waiters.iter().enumerate() {
        println!(
            "  waiter {:>2}. {:<14} waiting {:<8} {}",
            place + 1,
            w.mode.to_string(),
            seconds(w.waiting_for),
            shown(&w.owner),
        );
    }
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = args.store.connect().await?;
    let query = match args.key {
        Some(key) => StatusQuery::Key(key),
        None => StatusQuery::Prefix(args.prefix),
    };
    let status = match client.status(&query).await {
        Ok(status) => status,
        Err(err) if err.kind() == ErrorKind::Unsupported => {
            eprintln!("distlock: {err}");
            return Ok(ExitCode::from(EXIT_UNSUPPORTED));
        }
        Err(err) => return Err(err.into()),
    };
    if args.json {
        let keys: Vec<_> = status.keys.iter().map(key_json).collect();
        let counters = status.counters.as_ref().map(counters_json);
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "keys": keys, "counters": counters }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if status.keys.is_empty() {
        println!("no key held or waited for");
    }
    status.keys.iter().for_each(print_key);
    if let Some(c) = &status.counters {
        println!(
            "{} sessions, {} holds, {} waiting; {} grants, {} releases, {} forced, {} sessions \
             expired, {} holds ended by max_hold",
            c.sessions,
            c.held,
            c.waiters,
            c.grants,
            c.releases,
            c.forced_releases,
            c.sessions_expired,
            c.holds_expired
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(shown(""), "-");
        assert_eq!(shown("ops@web1 pid 7 (job)"), "ops@web1 pid 7 (job)");
        assert_eq!(shown("evil\n\u{1b}[2Jowner"), "evil??[2Jowner");
    }
}
