//! A private etcd for the tests, on free ports, in a temporary directory.

use std::process::Command;
use std::time::Duration;

use crate::daemon::{free_port, Daemon};

/// One etcd server.
#[derive(Debug)]
pub struct Etcd {
    daemon: Daemon,
    dir: tempfile::TempDir,
    port: u16,
    peer: u16,
}

impl Etcd {
    /// Starts a new single-member cluster on free ports.
    pub fn start() -> Etcd {
        Etcd::run(
            tempfile::tempdir().expect("temp dir"),
            free_port(),
            free_port(),
        )
    }

    fn run(dir: tempfile::TempDir, port: u16, peer: u16) -> Etcd {
        let client = format!("http://127.0.0.1:{port}");
        let peers = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new("etcd");
        command
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "test"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peers])
            .args(["--initial-advertise-peer-urls", &peers])
            .args(["--initial-cluster", &format!("test={peers}")]);
        let daemon = Daemon::spawn("etcd", command, port, dir.path());
        Etcd {
            daemon,
            dir,
            port,
            peer,
        }
    }

    /// A server for all the tests of this binary, killed when it exits.
    pub fn shared() -> &'static Etcd {
        static SERVER: std::sync::OnceLock<Etcd> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            let server = Etcd::start();
            server.daemon.die_with_this_process(server.dir.path());
            server
        })
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `etcd://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL) and starts it again on the same data.
    pub fn crash_and_restart(self) -> Etcd {
        self.crash_and_restart_after(Duration::ZERO)
    }

    /// Kills it (SIGKILL), and starts it again on the same data once it
    /// has been down for `down`.
    pub fn crash_and_restart_after(self, down: Duration) -> Etcd {
        let Etcd {
            mut daemon,
            dir,
            port,
            peer,
        } = self;
        daemon.kill();
        drop(daemon);
        std::thread::sleep(down);
        Etcd::run(dir, port, peer)
    }
}
