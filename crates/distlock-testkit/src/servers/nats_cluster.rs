//! A private NATS cluster of several servers with JetStream on one machine,
//! for the cluster tests: each server on its own free client, route and
//! monitoring ports, in its own directory; servers can be killed and
//! restarted on their store, or frozen, one at a time.
//!
//! Its leader is the leader of the store's stream (`DISTLOCK`) once the
//! stream exists, the JetStream meta leader before: the server whose loss
//! makes the locks wait for an election.

use std::process::Command;
use std::time::Duration;

use crate::daemon::{free_port, Daemon};
use crate::servers::nats::{monitor, nats_server_program};

/// How long a cluster may take to elect a leader that every live server
/// names.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The stream whose leader leads.
const STREAM: &str = "DISTLOCK";

#[derive(Debug)]
struct Server {
    port: u16,
    route: u16,
    monitor: u16,
    daemon: Option<Daemon>,
}

/// A NATS cluster whose servers run on 127.0.0.1.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<Server>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts a new cluster of `size` servers and waits until every one
    /// serves JetStream and they agree on a leader.
    pub fn start(size: usize) -> NatsCluster {
        assert!(size > 0, "a cluster needs a server");
        let servers = (0..size)
            .map(|_| Server {
                port: free_port(),
                route: free_port(),
                monitor: free_port(),
                daemon: None,
            })
            .collect();
        let mut cluster = NatsCluster {
            servers,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        for index in 0..size {
            cluster.run(index);
        }
        cluster.wait_for_leader();
        cluster
    }

    fn name(index: usize) -> String {
        format!("n{index}")
    }

    /// Starts server `index` on its store and waits until it listens.
    fn run(&mut self, index: usize) {
        let routes = self
            .servers
            .iter()
            .map(|server| format!("nats://127.0.0.1:{}", server.route))
            .collect::<Vec<_>>()
            .join(",");
        let dir = self.dir.path().join(NatsCluster::name(index));
        std::fs::create_dir_all(&dir).expect("server directory");
        let server = &self.servers[index];
        let mut command = Command::new(nats_server_program());
        command
            .args(["--addr", "127.0.0.1"])
            .args(["--port", &server.port.to_string()])
            .args(["--http_port", &server.monitor.to_string()])
            .args(["--server_name", &NatsCluster::name(index)])
            .args(["--cluster_name", "distlock-test"])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", server.route)])
            .args(["--routes", &routes])
            .arg("--jetstream")
            .arg("--store_dir")
            .arg(dir.join("data"));
        let daemon = Daemon::spawn(&NatsCluster::name(index), command, server.port, &dir);
        self.servers[index].daemon = Some(daemon);
    }

    /// How many servers it has.
    pub fn size(&self) -> usize {
        self.servers.len()
    }

    /// Server `index`'s client port.
    pub fn port(&self, index: usize) -> u16 {
        self.servers[index].port
    }

    /// `nats://127.0.0.1:P1,127.0.0.1:P2,…`, every server, starting with
    /// server `first`.
    pub fn url_from(&self, first: usize) -> String {
        let size = self.servers.len();
        let hosts: Vec<String> = (0..size)
            .map(|offset| format!("127.0.0.1:{}", self.servers[(first + offset) % size].port))
            .collect();
        format!("nats://{}", hosts.join(","))
    }

    /// Every server, starting with the first.
    pub fn url(&self) -> String {
        self.url_from(0)
    }

    /// `nats://` of server `index` alone.
    pub fn url_of(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[index].port)
    }

    /// The leader as every live server sees it: `None` while they do not
    /// all name the same live server.
    pub fn leader(&self) -> Option<usize> {
        self.leader_without(None)
    }

    /// The leader as the live servers but `frozen` see it: the leader
    /// elected while `frozen` stalls.
    pub fn leader_among_others(&self, frozen: usize) -> Option<usize> {
        self.leader_without(Some(frozen))
    }

    fn leader_without(&self, frozen: Option<usize>) -> Option<usize> {
        let mut named = None;
        for (index, server) in self.servers.iter().enumerate() {
            if server.daemon.is_none() || frozen == Some(index) {
                continue;
            }
            let leader = leader_seen(server.monitor)?;
            if named.get_or_insert_with(|| leader.clone()) != &leader {
                return None;
            }
        }
        let leader =
            (0..self.servers.len()).find(|&index| named == Some(NatsCluster::name(index)))?;
        (self.servers[leader].daemon.is_some() && frozen != Some(leader)).then_some(leader)
    }

    /// Waits until every live server names one live leader; the leader.
    /// Panics, with the servers' logs, after a minute.
    pub fn wait_for_leader(&self) -> usize {
        super::wait_for_leader(
            "NATS cluster",
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

    /// Starts a killed server `index` again on its store.
    pub fn restart(&mut self, index: usize) {
        assert!(
            self.servers[index].daemon.is_none(),
            "server {index} still runs"
        );
        self.run(index);
    }

    /// Freezes server `index` (SIGSTOP): its connections stay open and
    /// nothing answers, as a host that stalls.
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

/// The leader the server with monitoring port `monitor` names: its copy
/// of the stream's leader if it has the stream, else the meta leader;
/// `None` if it does not answer, is not healthy, or names none.
fn leader_seen(monitor_port: u16) -> Option<String> {
    monitor(monitor_port, "/healthz")?;
    let jsz = monitor(monitor_port, "/jsz?streams=true")?;
    let stream = format!("\"name\": \"{STREAM}\"");
    match jsz.find(&stream) {
        Some(at) => {
            let detail = &jsz[at..];
            // The stream's own fields end where its state begins.
            let detail = &detail[..detail.find("\"state\"").unwrap_or(detail.len())];
            json_string(detail, "\"leader\":")
        }
        None => {
            // Up to the first object's end: the meta group's own fields,
            // perhaps a replica's (which name no leader).
            let meta = &jsz[jsz.find("\"meta_cluster\"")?..];
            json_string(&meta[..meta.find('}')?], "\"leader\":")
        }
    }
}

/// The string after the first `field` in a JSON text; `None` if absent or
/// empty.
fn json_string(text: &str, field: &str) -> Option<String> {
    let rest = text[text.find(field)? + field.len()..].trim_start();
    let value: String = rest
        .strip_prefix('"')?
        .chars()
        .take_while(|&c| c != '"')
        .collect();
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn reads_a_string_field() {
        let text = r#"{"meta_cluster": {"name": "t", "leader": "n2", "peer": "x"}}"#;
        assert_eq!(json_string(text, "\"leader\":"), Some("n2".to_owned()));
        assert_eq!(json_string(text, "\"missing\":"), None);
        assert_eq!(json_string(r#"{"leader": ""}"#, "\"leader\":"), None);
    }
}
