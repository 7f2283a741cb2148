//! The store's processes: started, addressed, and killed and restarted on
//! the same data and port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use distlock_testkit::cluster::Members;
use distlock_testkit::servers::{
    EtcdCluster, Mariadb, Nats, NatsCluster, Postgres, Redis, ZooKeeper, ZooKeeperEnsemble,
};

use crate::run::Store;

/// The store's processes.
pub(crate) enum Backend {
    Server(ServerProcess),
    File(PathBuf),
    Redis(Redis),
    Redlock(Vec<Redis>),
    Postgres(Postgres),
    Mysql(Mariadb),
    #[cfg(feature = "etcd")]
    Etcd(distlock_testkit::servers::Etcd),
    Zookeeper(ZooKeeper),
    Nats(Nats),
    /// A cluster of 3 (etcd, ZooKeeper, NATS).
    Cluster(Box<dyn Members>),
}

/// `distlock-faults serve`: a distlock server in a process of its own.
pub(crate) struct ServerProcess {
    exe: PathBuf,
    dir: PathBuf,
    port: u16,
    child: std::process::Child,
}

impl ServerProcess {
    fn start(exe: &Path, dir: &Path, port: u16) -> anyhow::Result<ServerProcess> {
        let child = std::process::Command::new(exe)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start the distlock server")?;
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the distlock server did not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(ServerProcess {
            exe: exe.to_owned(),
            dir: dir.to_owned(),
            port,
            child,
        })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Backend {
    pub(crate) fn start(store: Store, exe: &Path, dir: &Path) -> anyhow::Result<Backend> {
        Ok(match store {
            Store::Server => Backend::Server(ServerProcess::start(
                exe,
                &dir.join("server"),
                distlock_testkit::daemon::free_port(),
            )?),
            Store::File => {
                let files = dir.join("locks");
                std::fs::create_dir_all(&files)?;
                Backend::File(files)
            }
            Store::Redis => Backend::Redis(Redis::start_durable()),
            Store::Redlock => Backend::Redlock((0..3).map(|_| Redis::start_durable()).collect()),
            Store::Postgres | Store::PostgresLease => Backend::Postgres(Postgres::start()),
            Store::Mysql | Store::MysqlLease => Backend::Mysql(Mariadb::start()),
            #[cfg(feature = "etcd")]
            Store::Etcd => Backend::Etcd(distlock_testkit::servers::Etcd::start()),
            #[cfg(not(feature = "etcd"))]
            Store::Etcd => anyhow::bail!("etcd needs the etcd feature"),
            Store::Zookeeper => Backend::Zookeeper(ZooKeeper::start()),
            Store::Nats => Backend::Nats(Nats::start()),
            #[cfg(feature = "etcd")]
            Store::EtcdCluster => Backend::Cluster(Box::new(EtcdCluster::start(3))),
            #[cfg(not(feature = "etcd"))]
            Store::EtcdCluster => anyhow::bail!("etcd needs the etcd feature"),
            Store::ZookeeperCluster => Backend::Cluster(Box::new(ZooKeeperEnsemble::start(3))),
            Store::NatsCluster => Backend::Cluster(Box::new(NatsCluster::start(3))),
        })
    }

    pub(crate) fn url(&self, store: Store) -> String {
        let lease = |url: String| {
            if matches!(store, Store::PostgresLease | Store::MysqlLease) {
                format!("{url}?mode=lease")
            } else {
                url
            }
        };
        match self {
            Backend::Server(server) => format!("distlock://127.0.0.1:{}", server.port),
            Backend::File(dir) => format!("file://{}", dir.display()),
            Backend::Redis(redis) => redis.url(),
            Backend::Redlock(instances) => format!(
                "redlock://{}",
                instances
                    .iter()
                    .map(Redis::address)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Backend::Postgres(postgres) => lease(postgres.url()),
            Backend::Mysql(mariadb) => lease(mariadb.url()),
            #[cfg(feature = "etcd")]
            Backend::Etcd(etcd) => etcd.url(),
            Backend::Zookeeper(zookeeper) => format!("{}/faults", zookeeper.url()),
            Backend::Nats(nats) => nats.url(),
            Backend::Cluster(members) => cluster_url(store, &members.url_from(0)),
        }
    }

    /// The URL worker `slot` connects with: on a cluster, every member,
    /// each worker starting with another (so holders and waiters talk to
    /// different members), each member's port replaced by its proxy's
    /// where there are proxies.
    pub(crate) fn worker_url(&self, store: Store, slot: u32, proxies: &[u16]) -> String {
        let Backend::Cluster(members) = self else {
            return self.url(store);
        };
        let first = slot as usize % members.size();
        let mut url = cluster_url(store, &members.url_from(first));
        for (index, proxy) in proxies.iter().enumerate() {
            url = url.replacen(
                &format!("127.0.0.1:{},", members.port(index)),
                &format!("127.0.0.1:{proxy},"),
                1,
            );
            url = url.replacen(
                &format!("127.0.0.1:{}/", members.port(index)),
                &format!("127.0.0.1:{proxy}/"),
                1,
            );
        }
        url
    }

    /// A cluster's members' client ports (none for one server).
    pub(crate) fn member_ports(&self) -> Vec<u16> {
        match self {
            Backend::Cluster(members) => (0..members.size())
                .map(|index| members.port(index))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A cluster's members, for faults of one of them.
    pub(crate) fn members(&mut self) -> Option<&mut Box<dyn Members>> {
        match self {
            Backend::Cluster(members) => Some(members),
            _ => None,
        }
    }

    /// The port a proxy goes in front of (Redlock: its first instance).
    pub(crate) fn port(&self) -> Option<u16> {
        match self {
            Backend::Server(server) => Some(server.port),
            Backend::File(_) => None,
            Backend::Redis(redis) => Some(redis.port()),
            Backend::Redlock(instances) => Some(instances[0].port()),
            Backend::Postgres(postgres) => Some(postgres.port()),
            Backend::Mysql(mariadb) => Some(mariadb.port()),
            #[cfg(feature = "etcd")]
            Backend::Etcd(etcd) => Some(etcd.port()),
            Backend::Zookeeper(zookeeper) => Some(zookeeper.port()),
            Backend::Nats(nats) => Some(nats.port()),
            Backend::Cluster(_) => None,
        }
    }

    /// Kills the store's process (SIGKILL) and starts it again on the same
    /// data and port.
    pub(crate) fn restart(self) -> anyhow::Result<Backend> {
        Ok(match self {
            Backend::Server(server) => {
                let (exe, dir, port) = (server.exe.clone(), server.dir.clone(), server.port);
                drop(server);
                Backend::Server(ServerProcess::start(&exe, &dir, port)?)
            }
            Backend::File(dir) => Backend::File(dir),
            Backend::Redis(redis) => Backend::Redis(redis.crash_and_restart()),
            Backend::Redlock(mut instances) => {
                let first = instances.remove(0).crash_and_restart();
                instances.insert(0, first);
                Backend::Redlock(instances)
            }
            Backend::Postgres(postgres) => Backend::Postgres(postgres.crash_and_restart()),
            Backend::Mysql(mariadb) => Backend::Mysql(mariadb.crash_and_restart()),
            #[cfg(feature = "etcd")]
            Backend::Etcd(etcd) => Backend::Etcd(etcd.crash_and_restart()),
            Backend::Zookeeper(zookeeper) => Backend::Zookeeper(zookeeper.crash_and_restart()),
            Backend::Nats(nats) => Backend::Nats(nats.crash_and_restart()),
            // Its members are killed one at a time (`Fault::KillLeader`).
            Backend::Cluster(members) => Backend::Cluster(members),
        })
    }
}

/// A cluster's URL as the store takes it: ZooKeeper's with a chroot of
/// the suite's own, ending the host list with `/` (so that every member's
/// `HOST:PORT` is followed by `,` or `/`).
fn cluster_url(store: Store, url: &str) -> String {
    if store == Store::ZookeeperCluster {
        format!("{url}/faults")
    } else {
        format!("{url}/")
    }
}
