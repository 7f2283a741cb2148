//! The orchestrator: starts a store, a register and worker processes,
//! injects faults one at a time, waits for each to heal, and checks the
//! history.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::backend::Backend;
use crate::check::Findings;
use crate::harness::run_fault;

/// A store the suite can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// The distlock server, a process of its own.
    Server,
    /// Lock files in a directory.
    File,
    /// One Redis, with `appendonly yes` and `appendfsync always`.
    Redis,
    /// Redlock on three such Redis.
    Redlock,
    /// PostgreSQL advisory locks.
    Postgres,
    /// PostgreSQL's lease table.
    PostgresLease,
    /// MariaDB named locks.
    Mysql,
    /// MariaDB's lease table.
    MysqlLease,
    /// etcd (with the `etcd` feature).
    Etcd,
    /// ZooKeeper.
    Zookeeper,
    /// NATS with JetStream, one server.
    Nats,
    /// etcd, 3 members (with the `etcd` feature): the cluster tier.
    EtcdCluster,
    /// ZooKeeper, an ensemble of 3: the cluster tier.
    ZookeeperCluster,
    /// NATS, 3 servers, the stream kept 3 ways: the cluster tier.
    NatsCluster,
}

/// A fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGSTOP a worker just granted the lock, for 1.5–3× the TTL.
    Pause,
    /// SIGKILL a worker just granted the lock (another takes its place).
    Kill,
    /// SIGKILL the store's process (one Redlock instance) and start it again.
    Restart,
    /// Delay everything between workers and store by 50–500 ms, for 2 s.
    Delay,
    /// Carry nothing between workers and store for 1.5× the TTL.
    Blackhole,
    /// Reset every connection between workers and store.
    Reset,
    /// SIGKILL the cluster's leader, and start it again once another leads.
    KillLeader,
    /// SIGSTOP the cluster's leader past an election, then SIGCONT.
    FreezeLeader,
    /// Carry nothing between the workers and one member (not the leader)
    /// for 1.5× the TTL.
    CutMember,
}

impl Store {
    /// Every store of this build.
    pub fn all() -> Vec<Store> {
        let mut stores = vec![
            Store::Server,
            Store::File,
            Store::Redis,
            Store::Redlock,
            Store::Postgres,
            Store::PostgresLease,
            Store::Mysql,
            Store::MysqlLease,
        ];
        if cfg!(feature = "etcd") {
            stores.push(Store::Etcd);
        }
        stores.push(Store::Zookeeper);
        stores.push(Store::Nats);
        stores
    }

    /// The clustered stores of this build: the cluster tier.
    pub fn clusters() -> Vec<Store> {
        let mut stores = Vec::new();
        if cfg!(feature = "etcd") {
            stores.push(Store::EtcdCluster);
        }
        stores.push(Store::ZookeeperCluster);
        stores.push(Store::NatsCluster);
        stores
    }

    /// Whether it runs as a cluster of members.
    pub fn is_cluster(self) -> bool {
        matches!(
            self,
            Store::EtcdCluster | Store::ZookeeperCluster | Store::NatsCluster
        )
    }

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Store::Server => "distlock",
            Store::File => "file",
            Store::Redis => "redis",
            Store::Redlock => "redlock",
            Store::Postgres => "postgres",
            Store::PostgresLease => "postgres lease",
            Store::Mysql => "mysql",
            Store::MysqlLease => "mysql lease",
            Store::Etcd => "etcd",
            Store::Zookeeper => "zookeeper",
            Store::Nats => "nats",
            Store::EtcdCluster => "etcd cluster",
            Store::ZookeeperCluster => "zookeeper cluster",
            Store::NatsCluster => "nats cluster",
        }
    }

    /// How long a dead holder's lease may last, at most, once the store has
    /// restarted. etcd grants no lease under its minimum TTL (1.5 s with
    /// the default election timeout, rounded up to 2 s); a leader that
    /// takes over gives every lease its full TTL again plus the election
    /// timeout (1 s, `lessor.Promote`); and expired leases are revoked by
    /// a loop that runs every 500 ms. NATS keeps TTLs in whole seconds,
    /// rounded up. A NATS cluster's leader rows take 5 s more: a new stream
    /// leader expires the sessions whose lease ran out during its election
    /// up to 1.8 s after it is elected (7 elections measured), and a waiter
    /// whose consumer lived on the struck member reads the queue again only
    /// after missing three of its 1 s heartbeats. (With 2 s more, freeze
    /// rows healed in 5.43 s and 5.87 s, over 5.2 s.) Elsewhere it is the
    /// TTL.
    pub(crate) fn lease_after_restart(self, ttl: Duration) -> Duration {
        match self {
            Store::Etcd | Store::EtcdCluster => {
                ttl.max(Duration::from_secs(2)) + Duration::from_millis(1_500)
            }
            Store::Nats => whole_seconds(ttl),
            Store::NatsCluster => whole_seconds(ttl) + Duration::from_secs(5),
            _ => ttl,
        }
    }

    /// Whether the suite can inject `fault` on it: the file store has no
    /// process and no connection to restart or cut; the faults of a
    /// cluster's members are for clusters (whose tier runs those alone).
    pub fn supports(self, fault: Fault) -> bool {
        if self.is_cluster() || fault.is_cluster() {
            return self.is_cluster() && fault.is_cluster();
        }
        self != Store::File || matches!(fault, Fault::Pause | Fault::Kill)
    }
}

/// `ttl` rounded up to whole seconds, as NATS keeps it.
fn whole_seconds(ttl: Duration) -> Duration {
    Duration::from_secs(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
}

impl Fault {
    /// Every fault.
    pub fn all() -> Vec<Fault> {
        vec![
            Fault::Pause,
            Fault::Kill,
            Fault::Restart,
            Fault::Delay,
            Fault::Blackhole,
            Fault::Reset,
        ]
    }

    /// The faults of a cluster's members.
    pub fn cluster() -> Vec<Fault> {
        vec![Fault::KillLeader, Fault::FreezeLeader, Fault::CutMember]
    }

    /// Whether it strikes one member of a cluster.
    pub fn is_cluster(self) -> bool {
        matches!(
            self,
            Fault::KillLeader | Fault::FreezeLeader | Fault::CutMember
        )
    }

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Pause => "pause",
            Fault::Kill => "kill holder",
            Fault::Restart => "restart store",
            Fault::Delay => "delay",
            Fault::Blackhole => "blackhole",
            Fault::Reset => "reset",
            Fault::KillLeader => "kill leader",
            Fault::FreezeLeader => "freeze leader",
            Fault::CutMember => "cut a member",
        }
    }

    pub(crate) fn is_network(self) -> bool {
        matches!(self, Fault::Delay | Fault::Blackhole | Fault::Reset)
    }
}

/// How much of each.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Grants to reach (at least).
    pub acquisitions: u64,
    /// Faults to inject (at least).
    pub faults: u32,
    /// Worker processes.
    pub workers: u32,
    /// Session TTL.
    pub ttl: Duration,
    /// Session lock-delay.
    pub lock_delay: Duration,
    /// Time in the critical section.
    pub hold: Duration,
    /// The register refuses stale tokens (off only for the negative control).
    pub fencing: bool,
    /// The longest a run may take.
    pub limit: Duration,
}

impl Plan {
    /// The CI tier: about 1,000 grants and a few faults per store and fault.
    pub fn ci() -> Plan {
        Plan {
            acquisitions: 1_000,
            faults: 2,
            workers: 8,
            ttl: Duration::from_secs(1),
            lock_delay: Duration::from_millis(200),
            hold: Duration::ZERO,
            fencing: true,
            limit: Duration::from_secs(90),
        }
    }

    /// The long tier, for releases: 10,000 grants and 10 faults each.
    pub fn long() -> Plan {
        Plan {
            acquisitions: 10_000,
            faults: 10,
            limit: Duration::from_secs(600),
            ..Plan::ci()
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The store.
    pub store: Store,
    /// The fault.
    pub fault: Fault,
    /// What the history shows.
    pub findings: Findings,
    /// Faults injected.
    pub injected: u32,
    /// The longest time from a fault's healing to the next grant.
    pub recovery: Duration,
    /// The bound `recovery` must stay within.
    pub bound: Duration,
    /// Whether lost() before regrant is promised for this store and fault.
    pub lost_promised: bool,
    /// Whether the store promises that a guard that says it holds the lock
    /// does (lease stores; a connection store learns of a dead connection
    /// late).
    pub exclusion_promised: bool,
    /// Whether the store promises no loss at all under this fault: the
    /// server's sessions survive a reset shorter than their lease.
    pub loss_free: bool,
    /// Problems: a fault that did not heal in time, a lock stuck after the
    /// run, a run that did not finish.
    pub problems: Vec<String>,
    /// The first failures workers reported.
    pub failures: Vec<String>,
}

impl Row {
    /// A run that could not be made, with why.
    pub fn failed(store: Store, fault: Fault, why: &anyhow::Error) -> Row {
        Row {
            store,
            fault,
            findings: Findings::default(),
            injected: 0,
            recovery: Duration::ZERO,
            bound: Duration::ZERO,
            lost_promised: false,
            exclusion_promised: false,
            loss_free: false,
            problems: vec![format!("{why:#}")],
            failures: Vec::new(),
        }
    }

    /// True when nothing was violated.
    pub fn passed(&self) -> bool {
        self.findings.overlaps_accepted == 0
            && self.findings.token_regressions == 0
            && (!self.exclusion_promised || self.findings.refused_while_held == 0)
            && (!self.lost_promised || self.findings.lost_late == 0)
            && (!self.loss_free || self.findings.losses == 0)
            && self.recovery <= self.bound
            && self.problems.is_empty()
    }
}

/// Runs one store under one fault.
pub async fn run_one(exe: &Path, store: Store, fault: Fault, plan: &Plan) -> anyhow::Result<Row> {
    let mut rows = run_store(exe, store, &[fault], plan).await;
    rows.pop().context("no row")
}

/// Runs each of `stores` under those of `faults` it supports, printing
/// each row to stderr as it is done, and returns the rows.
pub async fn run_stores(exe: &Path, stores: &[Store], faults: &[Fault], plan: &Plan) -> Vec<Row> {
    let mut rows = Vec::new();
    for &store in stores {
        let supported: Vec<Fault> = faults
            .iter()
            .copied()
            .filter(|fault| store.supports(*fault))
            .collect();
        rows.extend(run_store(exe, store, &supported, plan).await);
    }
    rows
}

/// Runs one store under each of `faults` in turn, on one set of store
/// processes (a restart keeps their data; each run has a key of its own).
/// A run that cannot be made is a failed row.
pub async fn run_store(exe: &Path, store: Store, faults: &[Fault], plan: &Plan) -> Vec<Row> {
    let started = async {
        let dir = tempfile::tempdir()?;
        let (exe, path) = (exe.to_owned(), dir.path().to_owned());
        let backend =
            tokio::task::spawn_blocking(move || Backend::start(store, &exe, &path)).await??;
        Ok::<_, anyhow::Error>((dir, backend))
    };
    let (_dir, backend) = match started.await {
        Ok(started) => started,
        Err(err) => {
            return faults
                .iter()
                .map(|fault| Row::failed(store, *fault, &err))
                .collect();
        }
    };
    let mut backend = Some(backend);
    let mut rows = Vec::new();
    for &fault in faults {
        let started = std::time::Instant::now();
        let row = match backend.as_ref() {
            Some(_) => run_fault(exe, store, fault, plan, &mut backend)
                .await
                .unwrap_or_else(|err| Row::failed(store, fault, &err)),
            None => Row::failed(
                store,
                fault,
                &anyhow::anyhow!("the store is gone after a failed restart"),
            ),
        };
        // As it ends, with how long it took (the table has no times).
        let line = table(std::slice::from_ref(&row));
        let line = line.lines().last().unwrap_or_default();
        eprintln!("{line} {:.1} s", started.elapsed().as_secs_f64());
        rows.push(row);
    }
    rows
}

/// The table of rows.
pub fn table(rows: &[Row]) -> String {
    let mut text = String::from(
        "| store | fault | acquisitions | faults | stale writes refused (of them while the guard said held) | overlaps accepted | token regressions | losses | lost() late | recovery (bound) | result |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let lost = if row.lost_promised {
            row.findings.lost_late.to_string()
        } else {
            format!("{} (not promised)", row.findings.lost_late)
        };
        let losses = if row.loss_free {
            format!("{} (must be 0)", row.findings.losses)
        } else {
            row.findings.losses.to_string()
        };
        text.push_str(&format!(
            "| {} | {} | {} | {} | {} ({}) | {} | {} | {losses} | {} | {:.2} s ({:.1} s) | {} |\n",
            row.store.name(),
            row.fault.name(),
            row.findings.acquisitions,
            row.injected,
            row.findings.stale_refused,
            row.findings.refused_while_held,
            row.findings.overlaps_accepted,
            row.findings.token_regressions,
            lost,
            row.recovery.as_secs_f64(),
            row.bound.as_secs_f64(),
            if row.passed() {
                "ok".to_owned()
            } else {
                format!("FAILED {}", row.problems.join("; "))
            },
        ));
    }
    text
}
