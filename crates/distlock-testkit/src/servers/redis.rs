//! Private `redis-server`s for the tests, on free ports, without
//! persistence, killed when dropped; also one that speaks only TLS.

use std::process::Command;

use crate::daemon::{free_port, Daemon};

/// One `redis-server`.
#[derive(Debug)]
pub struct Redis {
    daemon: Daemon,
    /// Its directory (and a TLS server's certificate), removed after it is
    /// killed.
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts a server on a free port.
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// Starts a server on `port`, empty (no data saved, none loaded).
    pub fn start_on(port: u16) -> Redis {
        Redis::run(tempfile::tempdir().expect("temp dir"), port, false)
    }

    /// Starts a server on a free port that keeps its data as the docs say a
    /// lock store must: `appendonly yes`, `appendfsync always`. It survives
    /// [`Redis::crash_and_restart`] with every lock and token.
    pub fn start_durable() -> Redis {
        Redis::run(tempfile::tempdir().expect("temp dir"), free_port(), true)
    }

    fn run(dir: tempfile::TempDir, port: u16, durable: bool) -> Redis {
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            if durable { "yes" } else { "no" },
            "--appendfsync",
            "always",
            "--dir",
            dir.path().to_str().expect("utf-8 temp path"),
            // So that observers are pushed changes (LockStore::watch_key).
            "--notify-keyspace-events",
            "K$gxz",
        ]);
        let daemon = Daemon::spawn("redis-server", command, port, dir.path());
        Redis { daemon, _dir: dir }
    }

    /// Kills it (SIGKILL) and starts it again on the same port and
    /// directory: a durable server comes back with its data, another empty.
    pub fn crash_and_restart(self) -> Redis {
        let Redis { mut daemon, _dir } = self;
        let port = daemon.port();
        daemon.kill();
        drop(daemon);
        let durable = _dir.path().join("appendonlydir").exists();
        Redis::run(_dir, port, durable)
    }

    /// A `redis-server` that speaks only TLS, with a self-signed certificate
    /// for `localhost`; returns it and the certificate's path (which lasts as
    /// long as the server). Connect to `rediss://localhost:PORT?ca=CERT`.
    pub fn start_tls() -> (Redis, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).expect("write cert");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
        let port = free_port();
        let mut command = Command::new("redis-server");
        let path = |p: &std::path::Path| p.to_str().expect("utf-8 temp path").to_owned();
        command.args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &path(&cert),
            "--tls-key-file",
            &path(&key),
            "--tls-ca-cert-file",
            &path(&cert),
            "--tls-auth-clients",
            "no",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &path(dir.path()),
        ]);
        let daemon = Daemon::spawn("redis-server-tls", command, port, dir.path());
        (Redis { daemon, _dir: dir }, cert)
    }

    /// The port it listens on (the TLS port, for a TLS server).
    pub fn port(&self) -> u16 {
        self.daemon.port()
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// `redis://127.0.0.1:PORT` (plain TCP; a TLS server needs `rediss://`).
    pub fn url(&self) -> String {
        format!("redis://{}", self.address())
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers,
    /// and keys' TTLs run on, until [`Redis::resume`].
    pub fn pause(&self) {
        self.daemon.pause();
    }

    /// Lets a paused server run on (SIGCONT).
    pub fn resume(&self) {
        self.daemon.resume();
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Runs a command with `redis-cli` against this server (plain TCP
    /// only); its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port().to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// How many times the server has run `command` (lower case, as
    /// `INFO commandstats` names it: `evalsha`, `multi`, `set`), scripts'
    /// own calls included; 0 if never.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.cli(&["INFO", "commandstats"])
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |count| count.parse().expect("a count"))
    }
}
