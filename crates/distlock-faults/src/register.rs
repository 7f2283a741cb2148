//! The fenced register and the history: a TCP service in the orchestrator
//! that every worker process reports to, so that one clock orders every
//! event.
//!
//! A worker sends one line per event and waits for the answer:
//!
//! - `hello ID PID`: who it is;
//! - `try`: it starts asking for the lock;
//! - `acq TOKEN`: it was granted the lock (answered `go` once any fault
//!   planned for this moment, a pause or a kill, has been done to it). With
//!   fencing on, the grant claims the register: the token becomes the
//!   highest seen, as the first write of a critical section would;
//! - `write TOKEN HELD`: its critical section writes the register, which
//!   accepts the write (`ok`) unless fencing is on and a higher token was
//!   seen before (`stale`); `HELD` is 1 if the guard still said it held the
//!   lock;
//! - `lost TOKEN`: its guard reported the lock lost;
//! - `rel TOKEN`: it released (or gave up) the lock;
//! - `err MESSAGE`: an operation failed.

use std::sync::{Arc, Mutex};

use distlock_core::store::lock;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Started asking for the lock.
    Trying,
    /// Granted.
    Acquired,
    /// A write the register accepted.
    Accepted,
    /// A write the register refused: its token was stale.
    Refused,
    /// A write the register refused although its guard still said it held
    /// the lock: two holders at once.
    RefusedWhileHeld,
    /// The guard said the lock was lost.
    Lost,
    /// Released, or given up.
    Released,
    /// An operation failed.
    Failed,
}

/// One event, stamped by the orchestrator's clock.
#[derive(Debug, Clone)]
pub struct Event {
    /// When the register heard of it.
    pub at: Instant,
    /// The worker (its slot; a killed worker's replacement keeps it).
    pub worker: u32,
    /// The worker's process.
    pub pid: u32,
    /// What happened.
    pub kind: Kind,
    /// The fencing token (0 for failures).
    pub token: u64,
}

/// The register's state: the highest token accepted, and the history.
#[derive(Debug, Default)]
pub struct State {
    /// The highest token of an accepted write.
    pub highest: u64,
    /// Every event, in the order heard.
    pub events: Vec<Event>,
    /// The first few failure messages.
    pub failures: Vec<String>,
}

/// A grant, as the register hears of it: the fault injector may act on
/// the worker before it is let go on.
#[derive(Debug)]
pub struct Grant {
    /// The worker's process.
    pub pid: u32,
    /// The worker's slot.
    pub worker: u32,
    /// Send `()` to let the worker go on.
    pub go: tokio::sync::oneshot::Sender<()>,
}

/// The register service.
#[derive(Debug, Clone)]
pub struct Register {
    state: Arc<Mutex<State>>,
    fencing: bool,
}

impl Register {
    /// Serves on `listener`; each grant is passed to `grants`.
    pub fn serve(listener: TcpListener, fencing: bool, grants: mpsc::Sender<Grant>) -> Register {
        let register = Register {
            state: Arc::new(Mutex::new(State::default())),
            fencing,
        };
        let served = register.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (register, grants) = (served.clone(), grants.clone());
                tokio::spawn(async move { register.connection(socket, grants).await });
            }
        });
        register
    }

    /// The state, locked.
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn record(&self, worker: u32, pid: u32, kind: Kind, token: u64) {
        self.state().events.push(Event {
            at: Instant::now(),
            worker,
            pid,
            kind,
            token,
        });
    }

    async fn connection(self, socket: TcpStream, grants: mpsc::Sender<Grant>) {
        let _ = socket.set_nodelay(true);
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        let (mut worker, mut pid) = (u32::MAX, 0);
        while let Ok(Some(line)) = lines.next_line().await {
            let (verb, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let mut words = rest.split(' ');
            let token: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let still_held = words.next() == Some("1");
            let answer = match verb {
                "hello" => {
                    let mut parts = rest.split(' ');
                    worker = parts
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(u32::MAX);
                    pid = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                    "ok"
                }
                "try" => {
                    self.record(worker, pid, Kind::Trying, 0);
                    "ok"
                }
                "acq" => {
                    self.record(worker, pid, Kind::Acquired, token);
                    if self.fencing {
                        let mut state = self.state();
                        state.highest = state.highest.max(token);
                    }
                    let (go, went) = tokio::sync::oneshot::channel();
                    if grants.send(Grant { pid, worker, go }).await.is_ok() {
                        let _ = went.await;
                    }
                    "go"
                }
                "write" => {
                    let accepted = {
                        let mut state = self.state();
                        let accepted = !self.fencing || token >= state.highest;
                        if accepted {
                            state.highest = state.highest.max(token);
                        }
                        accepted
                    };
                    if accepted {
                        self.record(worker, pid, Kind::Accepted, token);
                        "ok"
                    } else {
                        let kind = if still_held {
                            Kind::RefusedWhileHeld
                        } else {
                            Kind::Refused
                        };
                        self.record(worker, pid, kind, token);
                        "stale"
                    }
                }
                "lost" => {
                    self.record(worker, pid, Kind::Lost, token);
                    "ok"
                }
                "rel" => {
                    self.record(worker, pid, Kind::Released, token);
                    "ok"
                }
                _ => {
                    self.record(worker, pid, Kind::Failed, 0);
                    let mut state = self.state();
                    if state.failures.len() < 20 {
                        state.failures.push(format!("worker {worker}: {rest}"));
                    }
                    "ok"
                }
            };
            if write
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
