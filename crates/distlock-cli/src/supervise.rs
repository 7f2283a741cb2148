//! The command under a lock: signals passed on, SIGTERM when the lock is at
//! risk, SIGKILL when it is lost, and how it ended.

use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use distlock::MultiGuard;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::stderr;

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
    /// By itself, or by a signal the user sent, while the lock was held:
    /// its status is distlock's.
    Own(ExitStatus),
    /// After the SIGTERM distlock sent it because the lock was at risk.
    Stopped(ExitStatus),
    /// By the SIGKILL distlock sent it because the lock was lost.
    Killed,
    /// By itself, but distlock found the lock lost before it saw the command
    /// end: for all distlock knows, it worked on past the lease.
    Overran(ExitStatus),
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

    /// Its status if it has exited (reaping it), so that distlock never
    /// claims to have stopped a command that had already ended.
    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child.try_wait().context("cannot wait for the command")
    }

    /// Unless the command's end was its own, what it left running in its
    /// group is killed: it would otherwise work on past the lease.
    fn finish(&self, ended: Ended) -> Ended {
        if self.group && !matches!(ended, Ended::Own(_)) {
            self.signal(Signal::SIGKILL);
        }
        ended
    }
}

/// When to ask the command to stop: `grace` before the lock would be lost,
/// which only comes when renewals have been failing (they run every third
/// of the lease, and `grace` is at most half of it).
fn at_risk_instant(guard: &MultiGuard, grace: Duration) -> Option<Instant> {
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
/// session from then on). Once distlock has signalled it, or found the lock
/// lost, whatever the command left running in its group is killed when it
/// exits.
///
/// Nothing here waits for stderr (see [`crate::stderr`]): each signal goes
/// out before the line that reports it is queued.
pub async fn supervise(
    mut command: Supervised,
    mut signals: mpsc::UnboundedReceiver<SignalKind>,
    guard: &MultiGuard,
    grace: Duration,
) -> anyhow::Result<Ended> {
    let mut interfered = None;
    loop {
        // Polled in this order, so that the exit code tells the truth when
        // two are ready at once: a lost lock before the command's exit (an
        // exit seen only with the loss may have come after it), the exit
        // before the at-risk moment (a command that ended while the lock was
        // held ended by itself), forwarded signals last.
        tokio::select! {
            biased;
            () = guard.lost(), if interfered != Some(Interfered::Lost) => {
                if let Some(status) = command.exited()? {
                    return Ok(command.finish(match interfered {
                        Some(Interfered::AtRisk) => Ended::Stopped(status),
                        _ => Ended::Overran(status),
                    }));
                }
                command.signal(Signal::SIGKILL);
                interfered = Some(Interfered::Lost);
                stderr::line(format!(
                    "distlock: lost {}; killed the command (SIGKILL)",
                    named(guard)
                ));
            }
            status = command.child.wait() => {
                let status = status.context("cannot wait for the command")?;
                return Ok(command.finish(match interfered {
                    None => Ended::Own(status),
                    Some(Interfered::AtRisk) => Ended::Stopped(status),
                    Some(Interfered::Lost) => Ended::Killed,
                }));
            }
            () = sleep_until_some(at_risk_instant(guard, grace)), if interfered.is_none() && !grace.is_zero() => {
                // It may have ended since its exit was polled.
                if let Some(status) = command.exited()? {
                    return Ok(Ended::Own(status));
                }
                if stop_if_at_risk(&command, guard, grace) {
                    interfered = Some(Interfered::AtRisk);
                }
            }
            Some(kind) = signals.recv() => {
                if let Ok(signal) = Signal::try_from(kind.as_raw_value()) {
                    command.signal(signal);
                }
            }
        }
    }
}

/// Sends the command SIGTERM if the lock is within `grace` of its deadline
/// (a renewal may have moved the deadline since the timer was set).
fn stop_if_at_risk(command: &Supervised, guard: &MultiGuard, grace: Duration) -> bool {
    let now = Instant::now();
    let Some(deadline) = guard.expires_at() else {
        return false;
    };
    if !guard.is_held() || deadline.checked_sub(grace).is_some_and(|at| at > now) {
        return false;
    }
    command.signal(Signal::SIGTERM);
    stderr::line(format!(
        "distlock: {} {} at risk: renewals are failing and the lease runs out in {:.1}s; asked the command to stop (SIGTERM)",
        named(guard),
        if guard.guards().len() == 1 { "is" } else { "are" },
        deadline.saturating_duration_since(now).as_secs_f64()
    ));
    true
}

/// "the lock 'a'", or "the locks 'a', 'b'" (one is lost, all are).
pub fn named(guard: &MultiGuard) -> String {
    let keys: Vec<String> = guard
        .guards()
        .iter()
        .map(|guard| format!("'{}'", guard.key()))
        .collect();
    match keys.as_slice() {
        [one] => format!("the lock {one}"),
        _ => format!("the locks {}", keys.join(", ")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh -c 'exit 3'`, once it has exited but not been reaped, so that
    /// its exit is ready together with whatever else is.
    async fn exited_command() -> Supervised {
        let child = tokio::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("start sh");
        let pid = child.id().expect("not yet reaped");
        let stat = format!("/proc/{pid}/stat");
        // `PID (COMM) STATE …`: Z until it is reaped.
        while !std::fs::read_to_string(&stat)
            .expect("not yet reaped")
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Supervised::new(child, false)
    }

    fn no_signals() -> mpsc::UnboundedReceiver<SignalKind> {
        mpsc::unbounded_channel().1
    }

    /// A grace as long as the lease puts the lock at risk at once; the
    /// command had ended by then, so its status is its own.
    #[tokio::test]
    async fn an_exit_at_the_at_risk_moment_is_the_commands_own() {
        let lease = Duration::from_secs(30);
        let client = distlock::connect("memory://").await.expect("memory store");
        let session = client.session().ttl(lease).open().await.expect("session");
        let guard = MultiGuard::from(session.lock("k").await.expect("lock"));
        let command = exited_command().await;
        let ended = supervise(command, no_signals(), &guard, lease)
            .await
            .expect("supervise");
        assert!(
            matches!(ended, Ended::Own(status) if status.code() == Some(3)),
            "{ended:?}"
        );
    }

    /// The lock is lost (max_hold passed) by the time the command's exit is
    /// seen: distlock cannot say it ended under the lock.
    #[tokio::test]
    async fn an_exit_seen_with_the_loss_is_not_the_commands_own() {
        let client = distlock::connect("memory://").await.expect("memory store");
        let session = client
            .session()
            .ttl(Duration::from_secs(30))
            .max_hold(Duration::from_millis(1))
            .open()
            .await
            .expect("session");
        let guard = MultiGuard::from(session.lock("k").await.expect("lock"));
        let command = exited_command().await;
        guard.lost().await;
        let ended = supervise(command, no_signals(), &guard, Duration::ZERO)
            .await
            .expect("supervise");
        assert!(
            matches!(ended, Ended::Overran(status) if status.code() == Some(3)),
            "{ended:?}"
        );
    }
}
