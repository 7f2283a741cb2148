//! A private ZooKeeper ensemble of several servers on one machine, for the
//! cluster tests: each server on its own free client, quorum and election
//! ports, in its own directory; servers can be killed and restarted on
//! their data, or frozen, one at a time.

use std::process::Command;
use std::time::Duration;

use crate::daemon::{free_port, Daemon};
use crate::servers::zookeeper::{four_letter, zoo_cfg, SCRIPT};

/// How long an ensemble may take to elect a leader.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug)]
struct Server {
    port: u16,
    quorum: u16,
    election: u16,
    daemon: Option<Daemon>,
}

/// A ZooKeeper ensemble whose servers run on 127.0.0.1.
#[derive(Debug)]
pub struct ZooKeeperEnsemble {
    servers: Vec<Server>,
    dir: tempfile::TempDir,
}

impl ZooKeeperEnsemble {
    /// Starts a new ensemble of `size` servers and waits until it has a
    /// leader.
    pub fn start(size: usize) -> ZooKeeperEnsemble {
        assert!(size > 0, "an ensemble needs a server");
        let servers = (0..size)
            .map(|_| Server {
                port: free_port(),
                quorum: free_port(),
                election: free_port(),
                daemon: None,
            })
            .collect();
        let mut ensemble = ZooKeeperEnsemble {
            servers,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        // Started together: each waits for a quorum of the others.
        let commands: Vec<Command> = (0..size).map(|index| ensemble.command(index)).collect();
        let spawned: Vec<_> = commands
            .into_iter()
            .enumerate()
            .map(|(index, command)| {
                let (port, dir) = (ensemble.servers[index].port, ensemble.server_dir(index));
                std::thread::spawn(move || Daemon::spawn("zookeeper", command, port, &dir))
            })
            .collect();
        for (index, daemon) in spawned.into_iter().enumerate() {
            ensemble.servers[index].daemon = Some(daemon.join().expect("start a server"));
        }
        ensemble.wait_for_leader();
        ensemble
    }

    fn server_dir(&self, index: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("s{}", index + 1))
    }

    /// Writes server `index`'s configuration and `myid`; its command.
    fn command(&self, index: usize) -> Command {
        let dir = self.server_dir(index);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("server directory");
        std::fs::write(data.join("myid"), format!("{}\n", index + 1)).expect("write myid");
        let members: String = self
            .servers
            .iter()
            .enumerate()
            .map(|(i, server)| {
                format!(
                    "server.{}=127.0.0.1:{}:{}\n",
                    i + 1,
                    server.quorum,
                    server.election
                )
            })
            .collect();
        // A leader is found dead after syncLimit ticks (1 s).
        let text = zoo_cfg(&data, self.servers[index].port, (50, 10), &members);
        let config = dir.join("zoo.cfg");
        std::fs::write(&config, text).expect("write zoo.cfg");
        let mut command = Command::new(SCRIPT);
        command
            .arg("start-foreground")
            .arg(&config)
            .env("JMXDISABLE", "true")
            .env("ZOO_LOG_DIR", &dir)
            .env("JVMFLAGS", "-Xmx256m -Dzookeeper.root.logger=WARN,CONSOLE");
        command
    }

    /// How many servers it has.
    pub fn size(&self) -> usize {
        self.servers.len()
    }

    /// `zk://127.0.0.1:P1,127.0.0.1:P2,…`, every server, starting with
    /// server `first`.
    pub fn url_from(&self, first: usize) -> String {
        let size = self.servers.len();
        let hosts: Vec<String> = (0..size)
            .map(|offset| format!("127.0.0.1:{}", self.servers[(first + offset) % size].port))
            .collect();
        format!("zk://{}", hosts.join(","))
    }

    /// Every server, starting with the first.
    pub fn url(&self) -> String {
        self.url_from(0)
    }

    /// Server `index`'s client port.
    pub fn port(&self, index: usize) -> u16 {
        self.servers[index].port
    }

    /// `zk://` of server `index` alone.
    pub fn url_of(&self, index: usize) -> String {
        format!("zk://127.0.0.1:{}", self.servers[index].port)
    }

    /// The server that leads, by its own word (`srvr`), among the live
    /// ones but `frozen`; `None` while none says so, or the others do not
    /// all serve.
    pub fn leader_among_others(&self, frozen: Option<usize>) -> Option<usize> {
        let mut leader = None;
        for (index, server) in self.servers.iter().enumerate() {
            if server.daemon.is_none() || frozen == Some(index) {
                continue;
            }
            let answer = four_letter(server.port, "srvr");
            if answer.contains("Mode: leader") {
                // A frozen leader just resumed may still say so.
                if leader.is_some() {
                    return None;
                }
                leader = Some(index);
            } else if !answer.contains("Mode: follower") {
                return None;
            }
        }
        leader
    }

    /// The server that leads, as every live server sees it.
    pub fn leader(&self) -> Option<usize> {
        self.leader_among_others(None)
    }

    /// Waits until a live server leads and the others follow; the leader.
    pub fn wait_for_leader(&self) -> usize {
        super::wait_for_leader(
            "ZooKeeper ensemble",
            ELECTION_TIMEOUT,
            || self.leader(),
            || {
                self.servers
                    .iter()
                    .filter_map(|server| server.daemon.as_ref())
                    .map(Daemon::log_tail)
                    .collect()
            },
        )
    }

    /// Kills server `index` (SIGKILL, a crash).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut daemon) = self.servers[index].daemon.take() {
            daemon.kill();
        }
    }

    /// Starts a killed server `index` again on its data.
    pub fn restart(&mut self, index: usize) {
        assert!(
            self.servers[index].daemon.is_none(),
            "server {index} still runs"
        );
        let command = self.command(index);
        let dir = self.server_dir(index);
        let daemon = Daemon::spawn("zookeeper", command, self.servers[index].port, &dir);
        self.servers[index].daemon = Some(daemon);
    }

    /// Freezes server `index` (SIGSTOP; the script execs the JVM, so the
    /// server itself stops): its connections stay open, nothing answers.
    pub fn pause(&self, index: usize) {
        self.daemon(index).pause();
    }

    /// Lets a frozen server `index` run on (SIGCONT).
    pub fn resume(&self, index: usize) {
        self.daemon(index).resume();
    }

    fn daemon(&self, index: usize) -> &Daemon {
        self.servers[index]
            .daemon
            .as_ref()
            .expect("the server was killed")
    }
}
