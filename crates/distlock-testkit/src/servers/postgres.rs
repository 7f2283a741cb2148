//! A private PostgreSQL server for the tests: `initdb` and `postgres` in a
//! temporary directory, on a free port, run as the `postgres` user when the
//! tests run as root (PostgreSQL refuses root).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::{free_port, Daemon};

/// The password of the `postgres` user over TCP.
pub const PASSWORD: &str = "distlock-test";

/// One PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    daemon: Daemon,
    dir: tempfile::TempDir,
    port: u16,
}

/// A PostgreSQL program: from the newest /usr/lib/postgresql/N/bin, else
/// the PATH.
fn program(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .filter(|path| path.exists())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| PathBuf::from(name))
}

/// Runs as the `postgres` user when root.
fn as_server_user(command: &mut Command, dir: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let user = nix::unistd::User::from_name("postgres")
        .expect("look up the postgres user")
        .expect("a postgres user; install postgresql (./scripts/test does)");
    std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .expect("chown the data dir");
    command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
}

impl Postgres {
    /// Makes a new cluster (password authentication over TCP) and starts it.
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, PASSWORD).expect("write the password file");
        let mut initdb = Command::new(program("initdb"));
        initdb.args(["-D"]).arg(dir.path().join("data")).args([
            "-U",
            "postgres",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        initdb.arg(format!("--pwfile={}", password_file.display()));
        as_server_user(&mut initdb, dir.path());
        let output = initdb.output().expect("run initdb; install postgresql");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Postgres::run(dir, free_port())
    }

    fn run(dir: tempfile::TempDir, port: u16) -> Postgres {
        let mut command = Command::new(program("postgres"));
        command
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=300",
            ]);
        as_server_user(&mut command, dir.path());
        let daemon = Daemon::spawn("postgres", command, port, dir.path());
        // Listening is not ready: wait until it takes queries.
        daemon.wait_ready(|| {
            Command::new(program("pg_isready"))
                .arg("-h")
                .arg(dir.path())
                .args(["-p", &port.to_string(), "-q"])
                .status()
                .is_ok_and(|status| status.success())
        });
        Postgres { daemon, dir, port }
    }

    /// A server for all the tests of this binary, killed when it exits.
    pub fn shared() -> &'static Postgres {
        static SERVER: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            let server = Postgres::start();
            server.daemon.die_with_this_process(server.dir.path());
            server
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Kills the server (SIGKILL) and starts it again on the same data.
    pub fn crash_and_restart(self) -> Postgres {
        let Postgres {
            mut daemon,
            dir,
            port,
        } = self;
        daemon.kill();
        drop(daemon);
        // The backends notice the postmaster is gone and exit.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Postgres::run(dir, port)
    }

    /// Kills the server (SIGKILL), as a crash of its machine would, and
    /// does not start it again.
    pub fn kill(self) {
        let Postgres {
            mut daemon, dir, ..
        } = self;
        daemon.kill();
        // The backends notice the postmaster is gone and exit before their
        // directory is removed.
        std::thread::sleep(std::time::Duration::from_millis(500));
        drop(dir);
    }

    /// A hot standby streaming from this server: `pg_basebackup` over the
    /// local socket (initdb lets the local `replication` connection in
    /// with trust), started on a free port.
    pub fn replica(&self) -> Postgres {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut basebackup = Command::new(program("pg_basebackup"));
        basebackup
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "postgres"]);
        as_server_user(&mut basebackup, dir.path());
        let output = basebackup.output().expect("run pg_basebackup");
        assert!(
            output.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Postgres::run(dir, free_port())
    }

    /// Promotes a standby to a primary and waits until it takes writes.
    pub fn promote(&self) {
        let mut promote = Command::new(program("pg_ctl"));
        promote
            .args(["promote", "-w", "-D"])
            .arg(self.dir.path().join("data"));
        as_server_user(&mut promote, self.dir.path());
        let output = promote.output().expect("run pg_ctl promote");
        assert!(
            output.status.success(),
            "pg_ctl promote failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.daemon
            .wait_ready(|| self.psql("SELECT pg_is_in_recovery()") == "f");
    }

    /// Runs SQL with psql over the local socket; its output.
    pub fn psql(&self, sql: &str) -> String {
        let output = Command::new(program("psql"))
            .args(["-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}
