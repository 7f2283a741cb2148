//! Private store servers for tests: Redis, PostgreSQL, MariaDB, etcd,
//! ZooKeeper and NATS (with JetStream), each a real process started from
//! the programs installed on the host (`./scripts/test` installs them), in
//! a temporary directory, on free ports on 127.0.0.1, and killed (SIGKILL)
//! when dropped.
//!
//! Each type's `start()` starts a fresh server and `url()` gives the URL a
//! distlock store connects with. The SQL servers, etcd, ZooKeeper and NATS
//! also have `shared()`, one server for all the tests of a test binary, and
//! `crash_and_restart()`, which kills a server and starts it again on the
//! same data and port. A missing program, or a server that does not come
//! up, is a panic that shows the end of the server's log.
//!
//! ```no_run
//! use distlock_testkit::servers::Redis;
//!
//! let server = Redis::start();
//! let url = server.url(); // redis://127.0.0.1:PORT
//! # let _ = url;
//! ```

pub mod etcd;
pub mod etcd_cluster;
pub mod mysql;
pub mod nats;
pub mod nats_cluster;
pub mod postgres;
pub mod redis;
pub mod zookeeper;
pub mod zookeeper_ensemble;

pub use etcd::Etcd;
pub use etcd_cluster::EtcdCluster;
pub use mysql::Mariadb;
pub use nats::Nats;
pub use nats_cluster::NatsCluster;
pub use postgres::Postgres;
pub use redis::Redis;
pub use zookeeper::ZooKeeper;
pub use zookeeper_ensemble::ZooKeeperEnsemble;

/// Waits until `leader` names a cluster's leader, asking every 100 ms;
/// the leader. Panics after `timeout` with what `logs` shows of its
/// processes.
pub(crate) fn wait_for_leader(
    cluster: &str,
    timeout: std::time::Duration,
    leader: impl Fn() -> Option<usize>,
    logs: impl Fn() -> Vec<String>,
) -> usize {
    let started = std::time::Instant::now();
    loop {
        if let Some(leader) = leader() {
            return leader;
        }
        if started.elapsed() > timeout {
            panic!(
                "the {cluster} elected no leader in {timeout:?}:\n{}",
                logs().join("\n---\n")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
