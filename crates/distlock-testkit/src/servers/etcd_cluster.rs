//! A private etcd cluster of several members on one machine, for the
//! cluster tier of the fault suite: each member on its own free client and
//! peer ports, in its own directory; members can be killed and restarted
//! on their data, or frozen, one at a time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::daemon::{free_port, Daemon};

/// How long a cluster may take to elect a leader that every live member
/// names.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// One member: its ports, and its process while it runs.
#[derive(Debug)]
struct Member {
    name: String,
    port: u16,
    peer: u16,
    /// etcd's id of the member, once read from its status.
    id: std::sync::OnceLock<u64>,
    daemon: Option<Daemon>,
}

/// An etcd cluster whose members run on 127.0.0.1.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts a new cluster of `size` members and waits until it has a
    /// leader.
    pub fn start(size: usize) -> EtcdCluster {
        assert!(size > 0, "a cluster needs a member");
        let dir = tempfile::tempdir().expect("temp dir");
        let members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                port: free_port(),
                peer: free_port(),
                id: std::sync::OnceLock::new(),
                daemon: None,
            })
            .collect();
        let mut cluster = EtcdCluster { members, dir };
        for index in 0..size {
            cluster.run(index, "new");
        }
        cluster.wait_for_leader();
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|member| format!("{}=http://127.0.0.1:{}", member.name, member.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, index: usize) -> PathBuf {
        self.dir.path().join(&self.members[index].name)
    }

    /// Starts member `index` on its data; `state` is etcd's
    /// `--initial-cluster-state` (`new`, or `existing` for a restart).
    fn run(&mut self, index: usize, state: &str) {
        let initial = self.initial_cluster();
        let data = self.data_dir(index);
        std::fs::create_dir_all(&data).expect("member directory");
        let member = &self.members[index];
        let client = format!("http://127.0.0.1:{}", member.port);
        let peers = format!("http://127.0.0.1:{}", member.peer);
        let mut command = Command::new("etcd");
        command
            .arg("--data-dir")
            .arg(data.join("data"))
            .args(["--name", &member.name])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peers])
            .args(["--initial-advertise-peer-urls", &peers])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "distlock-test"])
            .args(["--initial-cluster-state", state]);
        let daemon = Daemon::spawn(&member.name, command, member.port, &data);
        self.members[index].daemon = Some(daemon);
    }

    /// How many members it has.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,…`, every member, starting with
    /// member `first`: clients connect to the members in that order.
    pub fn url_from(&self, first: usize) -> String {
        let size = self.members.len();
        let hosts: Vec<String> = (0..size)
            .map(|offset| format!("127.0.0.1:{}", self.members[(first + offset) % size].port))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// Every member, starting with the first.
    pub fn url(&self) -> String {
        self.url_from(0)
    }

    /// Member `index`'s client port.
    pub fn port(&self, index: usize) -> u16 {
        self.members[index].port
    }

    /// The member that leads, as the live members see it: `None` while
    /// they do not all name the same live member.
    pub fn leader(&self) -> Option<usize> {
        self.leader_without(None)
    }

    /// The member that leads as the live members but `frozen` see it: the
    /// leader elected while `frozen` stalls.
    pub fn leader_among_others(&self, frozen: usize) -> Option<usize> {
        self.leader_without(Some(frozen))
    }

    fn leader_without(&self, frozen: Option<usize>) -> Option<usize> {
        let mut leaders = Vec::new();
        for (index, member) in self.members.iter().enumerate() {
            if member.daemon.is_none() || frozen == Some(index) {
                continue;
            }
            let (own, leader) = status(member.port)?;
            let _ = member.id.set(own);
            leaders.push(leader);
        }
        let first = *leaders.first()?;
        if leaders.iter().any(|&leader| leader != first) {
            return None;
        }
        self.member_with_id(first)
            .filter(|&leader| self.members[leader].daemon.is_some() && frozen != Some(leader))
    }

    /// The member whose etcd id is `id`, among those whose id was read
    /// (each live member's is, before a leader is named).
    fn member_with_id(&self, id: u64) -> Option<usize> {
        self.members
            .iter()
            .position(|member| member.id.get() == Some(&id))
    }

    /// Waits until every live member names one live leader; the leader.
    /// Panics, with the members' logs, after a minute.
    pub fn wait_for_leader(&self) -> usize {
        super::wait_for_leader(
            "etcd cluster",
            ELECTION_TIMEOUT,
            || self.leader(),
            || {
                self.members
                    .iter()
                    .filter_map(|member| member.daemon.as_ref())
                    .map(Daemon::log_tail)
                    .collect()
            },
        )
    }

    /// Kills member `index` (SIGKILL, a crash).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut daemon) = self.members[index].daemon.take() {
            daemon.kill();
        }
    }

    /// Starts a killed member `index` again on its data.
    pub fn restart(&mut self, index: usize) {
        assert!(
            self.members[index].daemon.is_none(),
            "member {index} still runs"
        );
        self.run(index, "existing");
    }

    /// Freezes member `index` (SIGSTOP): its connections stay open and
    /// nothing answers, as a host that stalls.
    pub fn pause(&self, index: usize) {
        self.daemon(index).pause();
    }

    /// Lets a frozen member `index` run on (SIGCONT).
    pub fn resume(&self, index: usize) {
        self.daemon(index).resume();
    }

    fn daemon(&self, index: usize) -> &Daemon {
        self.members[index]
            .daemon
            .as_ref()
            .expect("the member was killed")
    }
}

/// Member `port`'s own id and the id of the leader it follows, from etcd's
/// JSON gateway (`/v3/maintenance/status`); `None` if it does not answer
/// or knows no leader.
fn status(port: u16) -> Option<(u64, u64)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!(
        "POST /v3/maintenance/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let own = json_number(&answer, "\"member_id\":")?;
    let leader = json_number(&answer, "\"leader\":")?;
    (leader != 0).then_some((own, leader))
}

/// The number after `field` in a JSON text, quoted (as the gateway writes
/// 64-bit numbers) or not.
fn json_number(text: &str, field: &str) -> Option<u64> {
    let rest = &text[text.find(field)? + field.len()..];
    let digits: String = rest
        .trim_start_matches([' ', '"'])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::json_number;

    #[test]
    fn reads_quoted_and_plain_numbers() {
        let text = r#"{"header":{"member_id":"10276657743932975437","raft_term":"2"},"leader":"42","dbSize":20480}"#;
        assert_eq!(
            json_number(text, "\"member_id\":"),
            Some(10_276_657_743_932_975_437)
        );
        assert_eq!(json_number(text, "\"leader\":"), Some(42));
        assert_eq!(json_number(text, "\"dbSize\":"), Some(20480));
        assert_eq!(json_number(text, "\"missing\":"), None);
    }
}
