//! A private ZooKeeper for the tests, on a free port, in a temporary
//! directory: `zkServer.sh start-foreground` with a generated `zoo.cfg`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::daemon::{free_port, Daemon};

/// Where Debian's `zookeeper` package puts the server's script.
pub(crate) const SCRIPT: &str = "/usr/share/zookeeper/bin/zkServer.sh";

/// One standalone ZooKeeper server.
#[derive(Debug)]
pub struct ZooKeeper {
    daemon: Daemon,
    dir: tempfile::TempDir,
    port: u16,
}

impl ZooKeeper {
    /// Starts a new server on a free port and waits until it serves.
    pub fn start() -> ZooKeeper {
        ZooKeeper::run(tempfile::tempdir().expect("temp dir"), free_port())
    }

    fn run(dir: tempfile::TempDir, port: u16) -> ZooKeeper {
        let config = dir.path().join("zoo.cfg");
        // A short tick, so that sessions as short as the tests' (600 ms)
        // are granted as asked; the admin server off (it would take port
        // 8080); four-letter words only to ask whether it serves.
        let text = zoo_cfg(&dir.path().join("data"), port, (10, 5), "");
        std::fs::write(&config, text).expect("write zoo.cfg");
        let mut command = Command::new(SCRIPT);
        command
            .arg("start-foreground")
            .arg(&config)
            .env("JMXDISABLE", "true")
            .env("JVMFLAGS", "-Xmx256m -Dzookeeper.root.logger=WARN,CONSOLE");
        let daemon = Daemon::spawn("zookeeper", command, port, dir.path());
        let server = ZooKeeper { daemon, dir, port };
        server
            .daemon
            .wait_ready(|| server.four_letter("srvr").contains("Mode:"));
        server
    }

    /// Sends a four-letter word and returns the answer ("" if none).
    pub fn four_letter(&self, word: &str) -> String {
        four_letter(self.port, word)
    }

    /// A server for all the tests of this binary, killed when it exits.
    pub fn shared() -> &'static ZooKeeper {
        static SERVER: std::sync::OnceLock<ZooKeeper> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            let server = ZooKeeper::start();
            server.daemon.die_with_this_process(server.dir.path());
            server
        })
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as ZooKeeper clients take it.
    pub fn hosts(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `zk://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("zk://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL) and starts it again on the same data.
    pub fn crash_and_restart(self) -> ZooKeeper {
        let ZooKeeper {
            mut daemon,
            dir,
            port,
        } = self;
        daemon.kill();
        drop(daemon);
        ZooKeeper::run(dir, port)
    }
}

/// Sends a four-letter word to the server on `port` and returns the answer
/// ("" if none).
pub(crate) fn four_letter(port: u16, word: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    if stream.write_all(word.as_bytes()).is_ok() {
        let _ = stream.read_to_string(&mut answer);
    }
    answer
}

/// A `zoo.cfg` for a test server: a tick of 100 ms (sessions as short as
/// the tests' are granted as asked), `limits` as (initLimit, syncLimit) in
/// ticks, the admin server off, four-letter words only to ask whether it
/// serves; `members` the `server.N=…` lines of an ensemble ("" alone).
pub(crate) fn zoo_cfg(
    data: &std::path::Path,
    port: u16,
    limits: (u32, u32),
    members: &str,
) -> String {
    let (init, sync) = limits;
    format!(
        "tickTime=100\n\
         initLimit={init}\n\
         syncLimit={sync}\n\
         dataDir={data}\n\
         clientPort={port}\n\
         clientPortAddress=127.0.0.1\n\
         minSessionTimeout=200\n\
         maxSessionTimeout=120000\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=ruok,srvr\n\
         znode.container.checkIntervalMs=1000\n\
         {members}",
        data = data.display(),
    )
}
