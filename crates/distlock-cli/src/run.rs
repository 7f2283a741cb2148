//! `distlock run`: hold a lock while a command runs.

use std::io::IsTerminal;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use distlock::status::{HolderStatus, StatusQuery};
use distlock::{ErrorKind, Guard};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::status::shown;
use crate::{parse_duration, StoreArgs};

/// Exit code when the lock could not be had within `--wait`.
pub const EXIT_NOT_ACQUIRED: u8 = 75;
/// Exit code when the lock was lost while the command ran.
pub const EXIT_LOST: u8 = 76;

/// Signals passed on to the command.
const FORWARDED: [SignalKind; 6] = [
    SignalKind::terminate(),
    SignalKind::hangup(),
    SignalKind::user_defined1(),
    SignalKind::user_defined2(),
    // A terminal sends these two to its whole foreground group itself.
    SignalKind::interrupt(),
    SignalKind::quit(),
];

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The lock key: any UTF-8 string of 1 to 1024 bytes.
    #[arg(long)]
    key: String,
    /// The session lease, renewed every third of it while the command runs.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease: Duration,
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
    distlock::validate_key(&args.key)?;
    let client = args.store.connect().await?;
    let mut session = client.session().ttl(args.lease);
    if let Some(owner) = &args.owner {
        session = session.owner(owner);
    }
    let session = session.open().await.context("cannot open a session")?;
    let request = match (args.semaphore, args.shared) {
        (Some(permits), _) => session.semaphore(&args.key, permits),
        (None, true) => session.read(&args.key),
        (None, false) => session.lock(&args.key),
    };
    // On a terminal, say who holds the key while we wait.
    let show = (std::io::stderr().is_terminal() && args.wait != Some(Duration::ZERO))
        .then(|| tokio::spawn(show_waiting(client.clone(), args.key.clone())));
    let acquired = match args.wait {
        Some(Duration::ZERO) => request.try_lock().await,
        Some(wait) => request.wait(wait).await.map(Some),
        None => request.await.map(Some),
    };
    if let Some(show) = show {
        show.abort();
        // Wait until it has stopped, so that it prints nothing after the clear.
        let _ = show.await;
        eprint!("\r\x1b[K");
    }
    let guard = match acquired {
        Ok(Some(guard)) => guard,
        Ok(None) => return not_acquired(&args.key, "it is held by another session"),
        Err(err) if err.kind() == ErrorKind::Timeout => {
            return not_acquired(
                &args.key,
                &format!("still held after {:?}", args.wait.unwrap_or_default()),
            )
        }
        Err(err) => return Err(err).context(format!("cannot lock '{}'", args.key)),
    };

    // A command on a terminal must be in the terminal's foreground group to
    // read from it; elsewhere its own group lets a loss stop all of it.
    let foreground = args.foreground || std::io::stdin().is_terminal();
    // Listen before the command starts, so no signal finds us deaf.
    let signals = forward_signals(foreground)?;
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("DISTLOCK_TOKEN", guard.token().to_string())
        .env("DISTLOCK_KEY", &args.key)
        .stdin(Stdio::inherit())
        .kill_on_drop(true);
    if !foreground {
        command.process_group(0);
    }
    die_with_parent(&mut command);
    let outcome = match command.spawn() {
        Ok(child) => {
            let child = Supervised {
                child,
                group: !foreground,
            };
            supervise(child, signals, &guard, args.lease).await
        }
        Err(err) => {
            eprintln!("distlock: cannot run '{}': {err}", args.command[0]);
            let code = if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            Ok(ExitCode::from(code))
        }
    };
    // A lost guard's release fails with NotHeld; the exit code says it.
    let _ = guard.release().await;
    let _ = session.close().await;
    outcome
}

/// Shows, on one terminal line refreshed every second, who holds `key` and
/// how many wait, where the store can list them; elsewhere just that we
/// wait.
async fn show_waiting(client: distlock::Client, key: String) {
    // Only a wait that takes a moment needs a line.
    tokio::time::sleep(Duration::from_millis(300)).await;
    eprint!("\r\x1b[Kdistlock: waiting for '{key}'…");
    let query = StatusQuery::Key(key.clone());
    loop {
        match client.status(&query).await {
            Ok(status) => {
                if let Some(status) = status.keys.first() {
                    let holder = status.holders.first().map_or_else(
                        || "nobody (lock-delay or restart wait-out)".to_owned(),
                        describe_holder,
                    );
                    eprint!(
                        "\r\x1b[Kdistlock: waiting for '{key}': held by {holder}; {} waiting",
                        status.waiters.len()
                    );
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

fn not_acquired(key: &str, why: &str) -> anyhow::Result<ExitCode> {
    eprintln!("distlock: did not get the lock '{key}': {why}");
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

/// The command, signalled as a whole process group unless `--foreground`.
struct Supervised {
    child: Child,
    group: bool,
}

impl Supervised {
    fn signal(&self, signal: Signal) {
        let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) else {
            return;
        };
        let pid = Pid::from_raw(pid);
        // The command may have just exited; nothing to do then.
        let _ = if self.group {
            killpg(pid, signal)
        } else {
            kill(pid, signal)
        };
    }
}

/// When to warn the command: a third of the lease before the lock would be
/// lost, which only comes when renewals have been failing.
fn at_risk_instant(guard: &Guard, lease: Duration) -> Option<Instant> {
    guard
        .expires_at()
        .map(|deadline| deadline.checked_sub(lease / 3).unwrap_or(deadline))
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits for the command, forwarding signals, and stops it if the lock is
/// at risk (SIGTERM, once renewals have failed for two thirds of the lease)
/// or lost (SIGKILL at once: the store may grant the key to another session
/// from then on).
async fn supervise(
    mut command: Supervised,
    mut signals: mpsc::UnboundedReceiver<SignalKind>,
    guard: &Guard,
    lease: Duration,
) -> anyhow::Result<ExitCode> {
    let mut terminated = false;
    let mut lost = false;
    loop {
        tokio::select! {
            status = command.child.wait() => {
                let status = status.context("cannot wait for the command")?;
                if lost {
                    return Ok(ExitCode::from(EXIT_LOST));
                }
                return Ok(exit_code(status));
            }
            Some(kind) = signals.recv() => {
                if let Ok(signal) = Signal::try_from(kind.as_raw_value()) {
                    command.signal(signal);
                }
            }
            () = sleep_until_some(at_risk_instant(guard, lease)), if !terminated && !lost => {
                if guard.is_held() && at_risk_instant(guard, lease).is_some_and(|at| at <= Instant::now()) {
                    eprintln!("distlock: the lock '{}' is at risk (renewals failing); stopping the command", guard.key());
                    command.signal(Signal::SIGTERM);
                    terminated = true;
                }
            }
            () = guard.lost(), if !lost => {
                lost = true;
                eprintln!("distlock: lost the lock '{}'; killing the command", guard.key());
                command.signal(Signal::SIGKILL);
            }
        }
    }
}

/// One task per signal kind, all sending into one channel. All are caught,
/// so none kills distlock (and, through PDEATHSIG, the command) by default;
/// in the foreground the terminal's own two are not passed on, as the
/// terminal already sent them to the command.
fn forward_signals(foreground: bool) -> anyhow::Result<mpsc::UnboundedReceiver<SignalKind>> {
    let (sender, receiver) = mpsc::unbounded_channel();
    for (index, &kind) in FORWARDED.iter().enumerate() {
        let forward = !foreground || index < 4;
        let mut stream = signal(kind).context("cannot listen for signals")?;
        let sender = sender.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if forward && sender.send(kind).is_err() {
                    return;
                }
            }
        });
    }
    Ok(receiver)
}

/// The command's exit code, or 128 + the signal that killed it, as shells do.
fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}
