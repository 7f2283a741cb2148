//! A private MariaDB server for the tests (`mariadb-install-db`, then
//! `mariadbd --user=mysql`) in a temporary directory, on a free port.

use std::path::Path;
use std::process::Command;

use crate::daemon::{free_port, Daemon};

/// The user made for the tests (all privileges, from any host).
pub const USER: &str = "distlock";
/// [`USER`]'s password.
pub const PASSWORD: &str = "distlock-test";
/// The database made for the tests.
pub const DATABASE: &str = "distlock_test";

/// One MariaDB server.
#[derive(Debug)]
pub struct Mariadb {
    daemon: Daemon,
    dir: tempfile::TempDir,
    port: u16,
}

fn give_to_server_user(dir: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let user = nix::unistd::User::from_name("mysql")
        .expect("look up the mysql user")
        .expect("a mysql user; install mariadb-server (./scripts/test does)");
    std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .expect("chown the data dir");
}

impl Mariadb {
    /// Makes a new data directory, starts the server, and makes a user and
    /// a database for the tests.
    pub fn start() -> Mariadb {
        let dir = tempfile::tempdir().expect("temp dir");
        give_to_server_user(dir.path());
        // Its temporary files go in its own directory, which the mysql user
        // owns, whatever the tests' TMPDIR is.
        let output = Command::new("mariadb-install-db")
            .env("TMPDIR", dir.path())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .args([
                "--user=mysql",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect("run mariadb-install-db; install mariadb-server");
        assert!(
            output.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let server = Mariadb::run(dir, free_port());
        server.sql(&format!(
            "CREATE DATABASE {DATABASE}; \
             CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; \
             GRANT ALL ON *.* TO '{USER}'@'%'; FLUSH PRIVILEGES;"
        ));
        server
    }

    fn run(dir: tempfile::TempDir, port: u16) -> Mariadb {
        let path = dir.path();
        let mut command = Command::new("mariadbd");
        command
            .env("TMPDIR", path)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", path.join("data").display()))
            .arg(format!("--socket={}", path.join("sock").display()))
            .arg(format!("--pid-file={}", path.join("pid").display()))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=mysql",
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=2",
                "--max-connections=500",
            ]);
        let daemon = Daemon::spawn("mariadbd", command, port, path);
        daemon.wait_ready(|| {
            Command::new("mariadb-admin")
                .arg("--no-defaults")
                .arg(format!("--socket={}", path.join("sock").display()))
                .args(["-u", "root", "ping"])
                .output()
                .is_ok_and(|output| output.status.success())
        });
        Mariadb { daemon, dir, port }
    }

    /// A server for all the tests of this binary, killed when it exits.
    pub fn shared() -> &'static Mariadb {
        static SERVER: std::sync::OnceLock<Mariadb> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            let server = Mariadb::start();
            server.daemon.die_with_this_process(server.dir.path());
            server
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mysql://USER:PASSWORD@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self) -> String {
        format!(
            "mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{DATABASE}",
            self.port
        )
    }

    /// Kills the server (SIGKILL) and starts it again on the same data.
    pub fn crash_and_restart(self) -> Mariadb {
        let Mariadb {
            mut daemon,
            dir,
            port,
        } = self;
        daemon.kill();
        drop(daemon);
        Mariadb::run(dir, port)
    }

    /// Runs SQL as root over the socket; its output.
    pub fn sql(&self, sql: &str) -> String {
        let output = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.path().join("sock").display()
            ))
            .args(["-u", "root", "-N", "-B", "-e", sql])
            .output()
            .expect("run mariadb");
        assert!(
            output.status.success(),
            "mariadb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}
