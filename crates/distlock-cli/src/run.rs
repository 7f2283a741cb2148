//! `distlock run`: hold a lock while a command runs.

use std::io::IsTerminal;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use distlock::status::{HolderStatus, StatusQuery};
use distlock::{ErrorKind, Guard, Mode, MultiGuard, Session};
use nix::sys::signal::Signal;
use tokio::process::Command;

use crate::status::shown;
use crate::stderr;
use crate::supervise::{forward_signals, named, shell_status, supervise, Ended, Supervised};
use crate::{parse_duration, StoreArgs};

/// Exit code when the lock could not be had within `--wait`.
pub const EXIT_NOT_ACQUIRED: u8 = 75;
/// Exit code when distlock stopped or killed the command because the lock
/// was at risk or lost, or found the lock lost before it saw the command
/// end, whatever status the command ended with.
pub const EXIT_LOST: u8 = 76;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The lock key: any UTF-8 string of 1 to 1024 bytes. Give it more
    /// than once to hold several keys together: all of them or none, taken
    /// in one order whatever order they are given in, so that two runs
    /// never deadlock.
    #[arg(long, required = true)]
    key: Vec<String>,
    /// The session lease, renewed every third of it while the command runs.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease: Duration,
    /// How long before the lease would run out, once renewals have been
    /// failing, the command is asked to stop (SIGTERM); it is killed
    /// (SIGKILL) when the lease runs out. A longer grace stops the command
    /// on shorter store outages, which it might have outlived; a shorter one
    /// leaves it less time to clean up. At most half the lease; 0s sends
    /// only the SIGKILL. Default: a third of the lease.
    #[arg(long, value_parser = parse_duration)]
    grace: Option<Duration>,
    /// Give up (exit 75) if the lock is not had within this long; 0s tries
    /// once. Default: wait as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
    /// Take one of N permits of a semaphore instead of an exclusive lock.
    #[arg(long, value_name = "N", conflicts_with = "shared")]
    semaphore: Option<u32>,
    /// Take a shared (read) lock instead of an exclusive one.
    #[arg(long)]
    shared: bool,
    /// Who holds the lock, as `distlock status` shows it. Default:
    /// `user@host pid N (distlock)`.
    #[arg(long)]
    owner: Option<String>,
    /// Keep the command in distlock's process group, so that it can read
    /// from the terminal (the default when stdin is a terminal). Then a lost
    /// lock stops only the command itself, not processes it started.
    #[arg(long)]
    foreground: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<String>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    for key in &args.key {
        distlock::validate_key(key)?;
    }
    let grace = grace(&args)?;
    let client = args.store.connect().await?;
    let mut session = client.session().ttl(args.lease);
    if let Some(owner) = &args.owner {
        session = session.owner(owner);
    }
    let session = session.open().await.context("cannot open a session")?;
    let mode = match (args.semaphore, args.shared) {
        (Some(permits), _) => Mode::Semaphore { permits },
        (None, true) => Mode::Shared,
        (None, false) => Mode::Exclusive,
    };
    let keys = args.key.join("', '");
    // On a terminal, say who holds the (first) key while we wait.
    let show = (std::io::stderr().is_terminal() && args.wait != Some(Duration::ZERO))
        .then(|| tokio::spawn(show_waiting(client.clone(), args.key[0].clone())));
    let acquired = acquire(&session, &args.key, mode, args.wait).await;
    if let Some(show) = show {
        show.abort();
        // Wait until it has stopped, so that it prints nothing after the clear.
        let _ = show.await;
        stderr::text("\r\x1b[K");
    }
    let guard = match acquired {
        Ok(Some(guard)) => guard,
        Ok(None) => return not_acquired(&keys, "it is held by another session"),
        Err(err) if err.kind() == ErrorKind::Timeout => {
            return not_acquired(
                &keys,
                &format!("still held after {:?}", args.wait.unwrap_or_default()),
            )
        }
        Err(err) => return Err(err).context(format!("cannot lock '{keys}'")),
    };

    let foreground = args.foreground;
    hold_while_running(&session, guard, &args.command, foreground, grace).await
}

/// Runs `command` while `guard` holds, as `run` and `elect` do: its
/// variables, its process group, signals forwarded, stopped or killed if
/// the lock is at risk or lost; then releases and closes `session`.
pub async fn hold_while_running(
    session: &Session,
    guard: MultiGuard,
    command_line: &[String],
    foreground: bool,
    grace: Duration,
) -> anyhow::Result<ExitCode> {
    // A command on a terminal must be in the terminal's foreground group to
    // read from it; elsewhere its own group lets a loss stop all of it.
    let foreground = foreground || std::io::stdin().is_terminal();
    // Listen before the command starts, so no signal finds us deaf.
    let signals = forward_signals(foreground)?;
    let mut command = Command::new(&command_line[0]);
    command
        .args(&command_line[1..])
        .env("DISTLOCK_TOKENS", tokens_variable(&guard))
        .stdin(Stdio::inherit())
        .kill_on_drop(true);
    if let [one] = guard.guards() {
        command
            .env("DISTLOCK_TOKEN", one.token().to_string())
            .env("DISTLOCK_KEY", one.key());
    } else {
        // Not an outer run's, which the command could fence with.
        command
            .env_remove("DISTLOCK_TOKEN")
            .env_remove("DISTLOCK_KEY");
    }
    if !foreground {
        command.process_group(0);
    }
    die_with_parent(&mut command);
    let outcome = match command.spawn() {
        Ok(child) => {
            let child = Supervised::new(child, !foreground);
            supervise(child, signals, &guard, grace)
                .await
                .map(|ended| exit_code(ended, &guard))
        }
        Err(err) => {
            stderr::line(format!("distlock: cannot run '{}': {err}", command_line[0]));
            let code = if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            Ok(ExitCode::from(code))
        }
    };
    // A lost guard's release fails with NotHeld; the exit code says it. A
    // store that does not answer must not hold the exit up past the lease,
    // after which the store lets the lock go by itself.
    let deadline = guard.expires_at();
    let release = async {
        let _ = guard.release().await;
        let _ = session.close().await;
    };
    match deadline {
        Some(deadline) => {
            let _ = tokio::time::timeout_at(deadline, release).await;
        }
        None => release.await,
    }
    outcome
}

/// Every key in `mode`: one through `lock`, several through `lock_all`.
/// `Ok(None)`: busy, for `--wait 0s`.
async fn acquire(
    session: &Session,
    keys: &[String],
    mode: Mode,
    wait: Option<Duration>,
) -> distlock::Result<Option<MultiGuard>> {
    if let [key] = keys {
        let request = match mode {
            Mode::Semaphore { permits } => session.semaphore(key, permits),
            Mode::Shared => session.read(key),
            Mode::Exclusive => session.lock(key),
        };
        let guard = match wait {
            Some(Duration::ZERO) => request.try_lock().await?,
            Some(wait) => Some(request.wait(wait).await?),
            None => Some(request.await?),
        };
        return Ok(guard.map(<MultiGuard as From<Guard>>::from));
    }
    let request = session.lock_all(keys.iter().map(|key| (key.as_str(), mode)));
    match wait {
        Some(Duration::ZERO) => request.try_lock().await,
        Some(wait) => request.wait(wait).await.map(Some),
        None => request.await.map(Some),
    }
}

/// `DISTLOCK_TOKENS`: `KEY=TOKEN` for each key, in the order given,
/// separated by spaces; `%`, `=` and whitespace in a key written as `%XX`.
fn tokens_variable(guard: &MultiGuard) -> String {
    guard
        .tokens()
        .iter()
        .map(|(key, token)| format!("{}={token}", escaped(key)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn escaped(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if c == '%' || c == '=' || c.is_whitespace() {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `--grace`, or a third of the lease; at most half of it, since renewals
/// come every third of the lease and a longer grace would stop the command
/// while they succeed.
fn grace(args: &RunArgs) -> anyhow::Result<Duration> {
    grace_of(args.grace, args.lease)
}

/// `--grace` (default a third of `lease`), checked against `lease`.
pub fn grace_of(grace: Option<Duration>, lease: Duration) -> anyhow::Result<Duration> {
    let grace = grace.unwrap_or(lease / 3);
    anyhow::ensure!(
        grace <= lease / 2,
        "--grace {} is more than half the {} lease, which is renewed every third of it: \
         the command would be stopped between healthy renewals; lower --grace or raise --lease",
        humantime::format_duration(grace),
        humantime::format_duration(lease),
    );
    Ok(grace)
}

/// The command's own exit code unless distlock stopped or killed it for
/// the lock's sake, or found the lock lost before the command ended; then
/// 76, and stderr says which.
fn exit_code(ended: Ended, guard: &MultiGuard) -> ExitCode {
    let why = match ended {
        Ended::Own(status) => return ExitCode::from(shell_status(status)),
        Ended::Stopped(status) => format!(
            "was at risk and the command was stopped (its own status: {})",
            shell_status(status)
        ),
        Ended::Killed => "was lost and the command was killed".to_owned(),
        Ended::Overran(status) => format!(
            "was lost before the command was seen to end; it may have run past the lease (its own status: {})",
            shell_status(status)
        ),
    };
    let what = named(guard);
    let why = if guard.guards().len() == 1 {
        why
    } else {
        why.replacen("was ", "were ", 1)
    };
    stderr::line(format!("distlock: exit {EXIT_LOST}: {what} {why}"));
    ExitCode::from(EXIT_LOST)
}

/// Shows, on one terminal line refreshed every second, who holds `key` and
/// how many wait, where the store can list them; elsewhere just that we
/// wait.
async fn show_waiting(client: distlock::Client, key: String) {
    // Only a wait that takes a moment needs a line.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stderr::text(format!("\r\x1b[Kdistlock: waiting for '{key}'…"));
    let query = StatusQuery::Key(key.clone());
    loop {
        match client.status(&query).await {
            Ok(status) => {
                if let Some(status) = status.keys.first() {
                    let holder = status.holders.first().map_or_else(
                        || "nobody (lock-delay or restart wait-out)".to_owned(),
                        describe_holder,
                    );
                    stderr::text(format!(
                        "\r\x1b[Kdistlock: waiting for '{key}': held by {holder}; {} waiting",
                        status.waiters.len()
                    ));
                }
            }
            Err(err) if err.kind() == ErrorKind::Unsupported => return,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// "ops@web1 pid 7 (job) for 3.2s", with what the store knows.
fn describe_holder(holder: &HolderStatus) -> String {
    let who = match (holder.owner.as_str(), holder.session.as_str()) {
        ("", "") => "another session".to_owned(),
        ("", session) => format!("session {}", shown(session)),
        (owner, _) => shown(owner),
    };
    match holder.held_for {
        Some(held) => format!("{who} for {:.1}s", held.as_secs_f64()),
        None => who,
    }
}

pub fn not_acquired(keys: &str, why: &str) -> anyhow::Result<ExitCode> {
    stderr::line(format!("distlock: did not get the lock '{keys}': {why}"));
    Ok(ExitCode::from(EXIT_NOT_ACQUIRED))
}

/// Makes the kernel kill the command if distlock dies, even by SIGKILL, so
/// that it never runs on after the lock went with distlock.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec; it only makes
    // the prctl(2) and getppid(2) system calls, which are async-signal-safe,
    // and reads a copied pid.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // distlock may have died before prctl took effect.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other(
                    "distlock exited before the command started",
                ));
            }
            Ok(())
        });
    }
}
