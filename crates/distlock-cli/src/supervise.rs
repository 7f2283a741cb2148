//! The command under a lock: signals passed on, SIGTERM when the lock is at
//! risk, SIGKILL when it is lost, and how it ended.

use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use distlock::Guard;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

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

/// The command, signalled as a whole process group unless `--foreground`.
pub struct Supervised {
    child: Child,
    /// Kept from the start: `Child::id` is gone once the child is reaped,
    /// and what it left in its group may still need a signal.
    pid: Option<Pid>,
    group: bool,
}

/// How the command ended, and whether distlock had a hand in it.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    /// By itself, or by a signal the user sent: its status is distlock's.
    Own(ExitStatus),
    /// After the SIGTERM distlock sent it because the lock was at risk.
    Stopped(ExitStatus),
    /// By the SIGKILL distlock sent it because the lock was lost.
    Killed,
}

impl Supervised {
    /// `group`: the command leads a process group of its own.
    pub fn new(child: Child, group: bool) -> Self {
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        Supervised { child, pid, group }
    }

    fn signal(&self, signal: Signal) {
        let Some(pid) = self.pid else {
            return;
        };
        // The command (or its group) may be gone already; nothing to do then.
        let _ = if self.group {
            killpg(pid, signal)
        } else {
            kill(pid, signal)
        };
    }
}

/// When to ask the command to stop: `grace` before the lock would be lost,
/// which only comes when renewals have been failing (they run every third
/// of the lease, and `grace` is at most half of it).
fn at_risk_instant(guard: &Guard, grace: Duration) -> Option<Instant> {
    guard
        .expires_at()
        .map(|deadline| deadline.checked_sub(grace).unwrap_or(deadline))
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Why distlock signalled the command, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interfered {
    AtRisk,
    Lost,
}

/// Waits for the command, forwarding signals, and stops it if the lock is
/// at risk (SIGTERM `grace` before the lease would run out; none if `grace`
/// is zero) or lost (SIGKILL at once: the store may grant the key to another
/// session from then on). Once distlock has signalled it, whatever the
/// command left running in its group is killed when it exits.
pub async fn supervise(
    mut command: Supervised,
    mut signals: mpsc::UnboundedReceiver<SignalKind>,
    guard: &Guard,
    grace: Duration,
) -> anyhow::Result<Ended> {
    let mut interfered = None;
    loop {
        tokio::select! {
            status = command.child.wait() => {
                let status = status.context("cannot wait for the command")?;
                return Ok(match interfered {
                    None => Ended::Own(status),
                    Some(why) => {
                        if command.group {
                            command.signal(Signal::SIGKILL);
                        }
                        match why {
                            Interfered::AtRisk => Ended::Stopped(status),
                            Interfered::Lost => Ended::Killed,
                        }
                    }
                });
            }
            Some(kind) = signals.recv() => {
                if let Ok(signal) = Signal::try_from(kind.as_raw_value()) {
                    command.signal(signal);
                }
            }
            () = sleep_until_some(at_risk_instant(guard, grace)), if interfered.is_none() && !grace.is_zero() => {
                if stop_if_at_risk(&command, guard, grace) {
                    interfered = Some(Interfered::AtRisk);
                }
            }
            () = guard.lost(), if interfered != Some(Interfered::Lost) => {
                interfered = Some(Interfered::Lost);
                eprintln!("distlock: lost the lock '{}'; killing the command (SIGKILL)", guard.key());
                command.signal(Signal::SIGKILL);
            }
        }
    }
}

/// Sends the command SIGTERM if the lock is within `grace` of its deadline
/// (a renewal may have moved the deadline since the timer was set).
fn stop_if_at_risk(command: &Supervised, guard: &Guard, grace: Duration) -> bool {
    let now = Instant::now();
    let Some(deadline) = guard.expires_at() else {
        return false;
    };
    if !guard.is_held() || deadline.checked_sub(grace).is_some_and(|at| at > now) {
        return false;
    }
    eprintln!(
        "distlock: the lock '{}' is at risk: renewals are failing and its lease runs out in {:.1}s; stopping the command (SIGTERM)",
        guard.key(),
        deadline.saturating_duration_since(now).as_secs_f64()
    );
    command.signal(Signal::SIGTERM);
    true
}

/// One task per signal kind, all sending into one channel. All are caught,
/// so none kills distlock (and, through PDEATHSIG, the command) by default;
/// in the foreground the terminal's own two are not passed on, as the
/// terminal already sent them to the command.
pub fn forward_signals(foreground: bool) -> anyhow::Result<mpsc::UnboundedReceiver<SignalKind>> {
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
pub fn shell_status(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}
