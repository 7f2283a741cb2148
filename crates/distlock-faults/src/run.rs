//! The orchestrator: starts a store, a register and worker processes,
//! injects faults one at a time, waits for each to heal, and checks the
//! history.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use distlock::SessionModel;
use distlock_core::store::lock;
use distlock_testkit::proxy::{self, Proxy};
use distlock_testkit::servers::{Mariadb, Postgres, Redis, ZooKeeper};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::check::{check, Findings};
use crate::register::{Kind, Register};

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
        stores
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
        }
    }

    /// How long a dead holder's lease may last, at most, once the store has
    /// restarted. etcd grants no lease under its minimum TTL (1.5 s with
    /// the default election timeout, rounded up to 2 s); a leader that
    /// takes over gives every lease its full TTL again plus the election
    /// timeout (1 s, `lessor.Promote`); and expired leases are revoked by
    /// a loop that runs every 500 ms. Elsewhere it is the TTL.
    fn lease_after_restart(self, ttl: Duration) -> Duration {
        match self {
            Store::Etcd => ttl.max(Duration::from_secs(2)) + Duration::from_millis(1_500),
            _ => ttl,
        }
    }

    /// Whether the suite can inject `fault` on it: the file store has no
    /// process and no connection to restart or cut.
    pub fn supports(self, fault: Fault) -> bool {
        self != Store::File || matches!(fault, Fault::Pause | Fault::Kill)
    }
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

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Pause => "pause",
            Fault::Kill => "kill holder",
            Fault::Restart => "restart store",
            Fault::Delay => "delay",
            Fault::Blackhole => "blackhole",
            Fault::Reset => "reset",
        }
    }

    fn is_network(self) -> bool {
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
            && self.recovery <= self.bound
            && self.problems.is_empty()
    }
}

/// The store's processes.
enum Backend {
    Server(ServerProcess),
    File(PathBuf),
    Redis(Redis),
    Redlock(Vec<Redis>),
    Postgres(Postgres),
    Mysql(Mariadb),
    #[cfg(feature = "etcd")]
    Etcd(distlock_testkit::servers::Etcd),
    Zookeeper(ZooKeeper),
}

/// `distlock-faults serve`: a distlock server in a process of its own.
struct ServerProcess {
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
    fn start(store: Store, exe: &Path, dir: &Path) -> anyhow::Result<Backend> {
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
        })
    }

    fn url(&self, store: Store) -> String {
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
        }
    }

    /// The port a proxy goes in front of (Redlock: its first instance).
    fn port(&self) -> Option<u16> {
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
        }
    }

    /// Kills the store's process (SIGKILL) and starts it again on the same
    /// data and port.
    fn restart(self) -> anyhow::Result<Backend> {
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
        })
    }
}

/// A fault to do to the next worker granted the lock.
#[derive(Debug, Clone, Copy)]
enum OnGrant {
    Pause(Duration),
    Kill,
}

/// What the grant handler did.
#[derive(Debug)]
enum Done {
    Paused { at: Instant },
    Killed { worker: u32, at: Instant },
}

fn signal(pid: u32, signal: Signal) {
    // Pid 0 would be this process's own group.
    if let Ok(pid @ 1..) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// The worker processes.
struct Workers {
    exe: PathBuf,
    url: String,
    register: String,
    key: String,
    plan: Plan,
    children: Vec<Option<Child>>,
}

impl Workers {
    fn spawn(&mut self, slot: u32) -> anyhow::Result<()> {
        let child = Command::new(&self.exe)
            .args(["worker", "--url", &self.url, "--register", &self.register])
            .args(["--id", &slot.to_string(), "--key", &self.key])
            .args(["--ttl-ms", &self.plan.ttl.as_millis().to_string()])
            .args([
                "--lock-delay-ms",
                &self.plan.lock_delay.as_millis().to_string(),
            ])
            .args(["--hold-ms", &self.plan.hold.as_millis().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start a worker")?;
        let slot = slot as usize;
        if self.children.len() <= slot {
            self.children.resize_with(slot + 1, || None);
        }
        self.children[slot] = Some(child);
        Ok(())
    }

    async fn stop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            if let Some(pid) = child.id() {
                signal(pid, Signal::SIGCONT);
            }
            let _ = child.kill().await;
        }
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
        for row in run_store(exe, store, &supported, plan).await {
            let line = table(std::slice::from_ref(&row));
            eprintln!("{}", line.lines().last().unwrap_or_default());
            rows.push(row);
        }
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
        rows.push(row);
    }
    rows
}

async fn run_fault(
    exe: &Path,
    store: Store,
    fault: Fault,
    plan: &Plan,
    backend: &mut Option<Backend>,
) -> anyhow::Result<Row> {
    let direct = backend.as_ref().map(|b| b.url(store)).unwrap_or_default();
    let proxy = match backend.as_ref().and_then(Backend::port) {
        Some(port) if fault.is_network() => Some(Proxy::start(([127, 0, 0, 1], port).into()).await),
        _ => None,
    };
    let url = match (&proxy, backend.as_ref().and_then(Backend::port)) {
        (Some(proxy), Some(port)) => direct.replacen(
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{}", proxy.port()),
            1,
        ),
        _ => direct.clone(),
    };
    let capabilities = distlock::connect(&direct).await?.capabilities();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let register_address = listener.local_addr()?.to_string();
    let (grants_tx, mut grants) = mpsc::channel(64);
    let register = Register::serve(listener, plan.fencing, grants_tx);
    let armed: Arc<Mutex<Option<OnGrant>>> = Arc::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    {
        let armed = Arc::clone(&armed);
        tokio::spawn(async move {
            while let Some(grant) = grants.recv().await {
                let fault = lock(&armed).take();
                match fault {
                    Some(OnGrant::Pause(pause)) => {
                        signal(grant.pid, Signal::SIGSTOP);
                        let at = Instant::now();
                        let pid = grant.pid;
                        tokio::spawn(async move {
                            tokio::time::sleep(pause).await;
                            signal(pid, Signal::SIGCONT);
                        });
                        let _ = done_tx.send(Done::Paused { at });
                    }
                    Some(OnGrant::Kill) => {
                        signal(grant.pid, Signal::SIGKILL);
                        let _ = done_tx.send(Done::Killed {
                            worker: grant.worker,
                            at: Instant::now(),
                        });
                    }
                    None => {}
                }
                let _ = grant.go.send(());
            }
        });
    }
    let mut workers = Workers {
        exe: exe.to_owned(),
        url: url.clone(),
        register: register_address,
        key: format!("faults/{}", rand::random::<u32>()),
        plan: plan.clone(),
        children: Vec::new(),
    };
    for slot in 0..plan.workers {
        workers.spawn(slot)?;
    }

    let acquisitions = |register: &Register| {
        register
            .state()
            .events
            .iter()
            .filter(|event| event.kind == Kind::Acquired)
            .count() as u64
    };
    // The first grant to a worker that started asking after `at`: grants
    // under way during the fault say nothing about recovery.
    let first_grant_after = |register: &Register, at: Instant| {
        let state = register.state();
        let mut asked_after = std::collections::HashSet::new();
        for event in state.events.iter().filter(|event| event.at > at) {
            match event.kind {
                Kind::Trying => {
                    asked_after.insert(event.worker);
                }
                Kind::Acquired if asked_after.contains(&event.worker) => return Some(event.at),
                _ => {}
            }
        }
        None
    };
    // A session without a lease keeps its lock while its process is
    // stopped: it comes back once the process runs again.
    let pause_counts = capabilities.session != SessionModel::Lease;
    let base_bound = plan.ttl + plan.lock_delay + Duration::from_secs(2);
    let started = Instant::now();
    let mut row = Row {
        store,
        fault,
        findings: Findings::default(),
        injected: 0,
        recovery: Duration::ZERO,
        bound: base_bound,
        lost_promised: fault.is_network() && capabilities.session == SessionModel::Lease,
        exclusion_promised: capabilities.session == SessionModel::Lease,
        problems: Vec::new(),
        failures: Vec::new(),
    };
    // Warm up, then one fault at a time, each healed before the next.
    while acquisitions(&register) < 20 {
        if started.elapsed() > Duration::from_secs(30) {
            row.problems
                .push("no grants within 30 s of the start".to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut paused_until = Instant::now();
    while row.problems.is_empty()
        && (row.injected < plan.faults
            || acquisitions(&register) < plan.acquisitions
            || Instant::now() < paused_until)
    {
        if started.elapsed() > plan.limit {
            row.problems.push(format!(
                "not done within {:?}: {} grants, {} faults",
                plan.limit,
                acquisitions(&register),
                row.injected
            ));
            break;
        }
        // One fault at a time: a paused worker is woken first.
        if row.injected >= plan.faults || Instant::now() < paused_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // Inject, and learn when it healed (from then on, a grant must come
        // within the bound).
        let (healed, bound) = match fault {
            Fault::Pause | Fault::Kill => {
                let pause = plan.ttl.mul_f64(rand::rng().random_range(1.5..3.0));
                *lock(&armed) = Some(if fault == Fault::Pause {
                    OnGrant::Pause(pause)
                } else {
                    OnGrant::Kill
                });
                let Ok(Some(what)) =
                    tokio::time::timeout(Duration::from_secs(30), done.recv()).await
                else {
                    row.problems
                        .push("no worker was granted the lock to fault".to_owned());
                    break;
                };
                match what {
                    Done::Paused { at } => {
                        // The run goes on until the paused worker has woken
                        // and written: the write the fence must refuse.
                        paused_until = paused_until.max(at + pause + Duration::from_secs(1));
                        let bound = if pause_counts {
                            base_bound + pause
                        } else {
                            base_bound
                        };
                        (at, bound)
                    }
                    Done::Killed { worker, at } => {
                        workers.spawn(worker)?;
                        (at, base_bound)
                    }
                }
            }
            Fault::Restart => {
                let old = backend.take().context("no store to restart")?;
                let restart = tokio::task::spawn_blocking(move || old.restart());
                let restarted = tokio::time::timeout(Duration::from_secs(120), restart)
                    .await
                    .context("the store did not restart within 2 minutes")???;
                *backend = Some(restarted);
                let lease = store.lease_after_restart(plan.ttl);
                (Instant::now(), base_bound - plan.ttl + lease)
            }
            Fault::Delay => {
                let proxy = proxy.as_ref().expect("a proxy");
                let delay = Duration::from_millis(rand::rng().random_range(50..=500));
                proxy.set(proxy::Fault::Delay(delay));
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxy.set(proxy::Fault::None);
                (Instant::now(), base_bound + delay)
            }
            Fault::Blackhole => {
                let proxy = proxy.as_ref().expect("a proxy");
                proxy.set(proxy::Fault::Blackhole);
                tokio::time::sleep(plan.ttl.mul_f64(1.5)).await;
                proxy.set(proxy::Fault::None);
                (Instant::now(), base_bound)
            }
            Fault::Reset => {
                proxy.as_ref().expect("a proxy").reset();
                (Instant::now(), base_bound)
            }
        };
        row.injected += 1;
        row.bound = row.bound.max(bound);
        // The next grant after the fault healed.
        let deadline = healed + bound + Duration::from_secs(10);
        let recovered = loop {
            if let Some(at) = first_grant_after(&register, healed) {
                break Some(at);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        match recovered {
            Some(at) => {
                let recovery = at - healed;
                row.recovery = row.recovery.max(recovery);
                if recovery > bound {
                    row.problems.push(format!(
                        "a fault took {recovery:.2?} to heal, over its bound of {bound:.2?}"
                    ));
                }
            }
            None => {
                row.problems.push(format!(
                    "no grant within {:?} of a fault healing",
                    bound + Duration::from_secs(10)
                ));
            }
        }
        // Some grants between faults.
        let before = acquisitions(&register);
        let settle = Instant::now() + Duration::from_secs(5);
        while acquisitions(&register) < before + 20 && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    workers.stop().await;
    // No lock stuck: a new session gets the key.
    let key = workers.key.clone();
    let stuck = async {
        let client = distlock::connect(&direct).await?;
        let session = client.session().ttl(plan.ttl).open().await?;
        let guard = session.lock(&key).wait(Duration::from_secs(30)).await?;
        guard.release().await?;
        session.close().await
    };
    let stuck = tokio::time::timeout(Duration::from_secs(60), stuck).await;
    if let Err(err) = stuck.unwrap_or_else(|_| {
        Err(distlock::Error::new(
            distlock::ErrorKind::Timeout,
            "no answer in 60 s",
        ))
    }) {
        row.problems
            .push(format!("the lock was stuck 30 s after the run: {err}"));
    }
    let state = register.state();
    row.findings = check(&state.events);
    row.failures = state.failures.iter().take(3).cloned().collect();
    drop(state);
    Ok(row)
}

/// The table of rows.
pub fn table(rows: &[Row]) -> String {
    let mut text = String::from(
        "| store | fault | acquisitions | faults | stale writes refused (of them while the guard said held) | overlaps accepted | token regressions | lost() late | recovery (bound) | result |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let lost = if row.lost_promised {
            row.findings.lost_late.to_string()
        } else {
            format!("{} (not promised)", row.findings.lost_late)
        };
        text.push_str(&format!(
            "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {:.2} s ({:.1} s) | {} |\n",
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
