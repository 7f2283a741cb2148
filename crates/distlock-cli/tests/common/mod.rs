//! A `distlock serve` process for tests, on a port of its own, and whether
//! a process has ended.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether process `pid` has ended: it is gone, or a zombie, dead but not
/// reaped (a killed process whose parent has gone may stay one, as nothing
/// here need reap it).
pub fn has_ended(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // `PID (COMM) STATE …`, where COMM may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    matches!(state, Some('Z' | 'X'))
}

/// Whether process `pid` (in decimal, as a pid file holds it) ends within
/// `patience`.
pub fn ends_within(pid: &str, patience: Duration) -> bool {
    let pid: i32 = pid.trim().parse().expect("a pid");
    let started = Instant::now();
    while started.elapsed() < patience {
        if has_ended(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A running `distlock serve`; killed when dropped.
pub struct Server {
    child: Child,
    /// `host:port` it listens on.
    pub address: String,
    data_dir: PathBuf,
    extra: Vec<String>,
}

impl Server {
    /// Starts a server on a free port with `extra` flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Server::spawn(data_dir.to_owned(), "127.0.0.1:0", extra)
    }

    fn spawn(data_dir: PathBuf, listen: &str, mut extra: Vec<String>) -> Server {
        // Tests run at once: none may take the default metrics port.
        if !extra.iter().any(|arg| arg == "--metrics-listen") {
            extra.extend(["--metrics-listen".to_owned(), "off".to_owned()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(&data_dir)
            .args(&extra)
            .env_remove("DISTLOCK_AUTH_TOKEN")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start distlock serve");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("distlock serve exited before it listened")
                .expect("read stderr");
            if let Some(rest) = line.strip_prefix("distlock: serving locks on ") {
                break rest.split(',').next().expect("address").to_owned();
            }
        };
        // Keep draining, so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server {
            child,
            address,
            data_dir,
            extra,
        }
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("distlock://{}", self.address)
    }

    /// SIGKILL, then a new server on the same address and data directory.
    pub fn kill_and_restart(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
        let restarted = Server::spawn(
            self.data_dir.clone(),
            &self.address.clone(),
            self.extra.clone(),
        );
        *self = restarted;
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers,
    /// and its clock runs on, until [`Server::resume`].
    pub fn pause(&self) {
        self.send(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused server run on (SIGCONT).
    pub fn resume(&self) {
        self.send(nix::sys::signal::Signal::SIGCONT);
    }

    fn send(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal the server");
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("wait for the server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
