//! One store under one fault: the proxy, the register, the worker
//! processes, and the steps of a run (inject a fault, wait for the next
//! grant, check that no lock is stuck).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use distlock::SessionModel;
use distlock_core::store::lock;
use distlock_testkit::proxy::{self, Proxy};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::Backend;
use crate::check::{check, Findings};
use crate::register::{Kind, Register};
use crate::run::{Fault, Plan, Row, Store};

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
    /// Where each worker connects: worker `slot` takes `urls[slot % len]`.
    urls: Vec<String>,
    register: String,
    key: String,
    plan: Plan,
    children: Vec<Option<Child>>,
}

impl Workers {
    fn spawn(&mut self, slot: u32) -> anyhow::Result<()> {
        let url = &self.urls[slot as usize % self.urls.len()];
        let child = Command::new(&self.exe)
            .args(["worker", "--url", url, "--register", &self.register])
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

/// A run in progress: where the workers connect, what they report to, and
/// the fault armed for the next grant.
struct Harness {
    /// The store's URL without the proxy.
    direct: String,
    proxy: Option<Proxy>,
    /// On a cluster cut one member at a time: a proxy per member.
    proxies: Vec<Proxy>,
    register: Register,
    armed: Arc<Mutex<Option<OnGrant>>>,
    done: mpsc::UnboundedReceiver<Done>,
    workers: Workers,
}

impl Harness {
    /// Starts the proxy (for network faults), the register, the grant
    /// handler and the workers.
    async fn start(
        exe: &Path,
        store: Store,
        fault: Fault,
        plan: &Plan,
        backend: &Backend,
    ) -> anyhow::Result<Harness> {
        let direct = backend.url(store);
        let proxy = match backend.port() {
            Some(port) if fault.is_network() => {
                Some(Proxy::start(([127, 0, 0, 1], port).into()).await)
            }
            _ => None,
        };
        let url = match (&proxy, backend.port()) {
            (Some(proxy), Some(port)) => direct.replacen(
                &format!("127.0.0.1:{port}"),
                &format!("127.0.0.1:{}", proxy.port()),
                1,
            ),
            _ => direct.clone(),
        };
        let mut proxies = Vec::new();
        if fault == Fault::CutMember {
            for port in backend.member_ports() {
                proxies.push(Proxy::start(([127, 0, 0, 1], port).into()).await);
            }
        }
        let proxy_ports: Vec<u16> = proxies.iter().map(Proxy::port).collect();
        let urls = if store.is_cluster() {
            (0..plan.workers)
                .map(|slot| backend.worker_url(store, slot, &proxy_ports))
                .collect()
        } else {
            vec![url]
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let register_address = listener.local_addr()?.to_string();
        let (grants_tx, grants) = mpsc::channel(64);
        let register = Register::serve(listener, plan.fencing, grants_tx);
        let armed: Arc<Mutex<Option<OnGrant>>> = Arc::default();
        let (done_tx, done) = mpsc::unbounded_channel();
        tokio::spawn(handle_grants(grants, Arc::clone(&armed), done_tx));
        let mut workers = Workers {
            exe: exe.to_owned(),
            urls,
            register: register_address,
            key: format!("faults/{}", rand::random::<u32>()),
            plan: plan.clone(),
            children: Vec::new(),
        };
        for slot in 0..plan.workers {
            workers.spawn(slot)?;
        }
        Ok(Harness {
            direct,
            proxy,
            proxies,
            register,
            armed,
            done,
            workers,
        })
    }

    fn acquisitions(&self) -> u64 {
        self.register
            .state()
            .events
            .iter()
            .filter(|event| event.kind == Kind::Acquired)
            .count() as u64
    }

    /// The first grant to a worker that started asking after `at`: grants
    /// under way during the fault say nothing about recovery.
    fn first_grant_after(&self, at: Instant) -> Option<Instant> {
        let state = self.register.state();
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
    }

    /// Waits until `count` more grants came, or `within` passed.
    async fn grants(&self, count: u64, within: Duration) -> bool {
        let (before, until) = (self.acquisitions(), Instant::now() + within);
        while self.acquisitions() < before + count {
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Does one fault; returns when it healed and the bound on the next
    /// grant after that, or `None` (with the problem in `row`) if it could
    /// not be done.
    async fn inject(
        &mut self,
        run: &Run<'_>,
        backend: &mut Option<Backend>,
        paused_until: &mut Instant,
        row: &mut Row,
    ) -> anyhow::Result<Option<(Instant, Duration)>> {
        let (plan, base_bound) = (run.plan, run.base_bound);
        Ok(Some(match run.fault {
            Fault::Pause | Fault::Kill => {
                let pause = plan.ttl.mul_f64(rand::rng().random_range(1.5..3.0));
                *lock(&self.armed) = Some(if run.fault == Fault::Pause {
                    OnGrant::Pause(pause)
                } else {
                    OnGrant::Kill
                });
                let Ok(Some(what)) =
                    tokio::time::timeout(Duration::from_secs(30), self.done.recv()).await
                else {
                    row.problems
                        .push("no worker was granted the lock to fault".to_owned());
                    return Ok(None);
                };
                match what {
                    Done::Paused { at } => {
                        // The run goes on until the paused worker has woken
                        // and written: the write the fence must refuse.
                        *paused_until = (*paused_until).max(at + pause + Duration::from_secs(1));
                        // A session without a lease keeps its lock while its
                        // process is stopped: it comes back once the process
                        // runs again.
                        let bound = if run.pause_counts {
                            base_bound + pause
                        } else {
                            base_bound
                        };
                        (at, bound)
                    }
                    Done::Killed { worker, at } => {
                        self.workers.spawn(worker)?;
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
                let lease = run.store.lease_after_restart(plan.ttl);
                (Instant::now(), base_bound - plan.ttl + lease)
            }
            Fault::Delay => {
                let proxy = self.proxy.as_ref().expect("a proxy");
                let delay = Duration::from_millis(rand::rng().random_range(50..=500));
                proxy.set(proxy::Fault::Delay(delay));
                tokio::time::sleep(Duration::from_secs(2)).await;
                proxy.set(proxy::Fault::None);
                (Instant::now(), base_bound + delay)
            }
            Fault::Blackhole => {
                let proxy = self.proxy.as_ref().expect("a proxy");
                proxy.set(proxy::Fault::Blackhole);
                tokio::time::sleep(plan.ttl.mul_f64(1.5)).await;
                proxy.set(proxy::Fault::None);
                (Instant::now(), base_bound)
            }
            Fault::Reset => {
                self.proxy.as_ref().expect("a proxy").reset();
                (Instant::now(), base_bound)
            }
            Fault::KillLeader | Fault::FreezeLeader => {
                let mut cluster = backend.take().context("no cluster")?;
                let fault = run.fault;
                let struck = tokio::task::spawn_blocking(move || {
                    let struck = strike_leader(&mut cluster, fault);
                    (cluster, struck)
                });
                let (cluster, struck) = tokio::time::timeout(Duration::from_secs(300), struck)
                    .await
                    .context("the cluster did not heal within 5 minutes")??;
                *backend = Some(cluster);
                struck?;
                // A new leader gives every lease its full TTL again.
                let lease = run.store.lease_after_restart(plan.ttl);
                (Instant::now(), base_bound - plan.ttl + lease)
            }
            Fault::CutMember => {
                let mut cluster = backend.take().context("no cluster")?;
                let found = tokio::task::spawn_blocking(move || {
                    let leader = cluster.members().map(|members| members.wait_for_leader());
                    (cluster, leader)
                });
                let (cluster, leader) = tokio::time::timeout(Duration::from_secs(120), found)
                    .await
                    .context("the cluster named no leader within 2 minutes")??;
                let size = cluster.member_ports().len();
                *backend = Some(cluster);
                let leader = leader.context("not a cluster")?;
                // A follower: the cluster keeps its quorum.
                let cut = (leader + 1 + rand::rng().random_range(0..size - 1)) % size;
                let proxy = &self.proxies[cut];
                proxy.set(proxy::Fault::Blackhole);
                tokio::time::sleep(plan.ttl.mul_f64(1.5)).await;
                // Its connections end too: clients must connect again, to
                // it or to another member.
                proxy.reset();
                proxy.set(proxy::Fault::None);
                (Instant::now(), base_bound)
            }
        }))
    }

    /// Waits for the next grant after a fault healed, and records how long
    /// it took.
    async fn recover(&self, healed: Instant, bound: Duration, row: &mut Row) {
        let deadline = healed + bound + Duration::from_secs(10);
        let recovered = loop {
            if let Some(at) = self.first_grant_after(healed) {
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
            None => row.problems.push(format!(
                "no grant within {:?} of a fault healing",
                bound + Duration::from_secs(10)
            )),
        }
    }

    /// Stops the workers, checks that a new session gets the key, and
    /// checks the history.
    async fn finish(mut self, plan: &Plan, mut row: Row) -> Row {
        self.workers.stop().await;
        let key = self.workers.key.clone();
        let stuck = async {
            let client = distlock::connect(&self.direct).await?;
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
        let state = self.register.state();
        row.findings = check(&state.events);
        row.failures = state.failures.iter().take(3).cloned().collect();
        row
    }
}

/// Does the armed fault to the worker of the next grant, then lets the
/// grant go on.
async fn handle_grants(
    mut grants: mpsc::Receiver<crate::register::Grant>,
    armed: Arc<Mutex<Option<OnGrant>>>,
    done: mpsc::UnboundedSender<Done>,
) {
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
                let _ = done.send(Done::Paused { at });
            }
            Some(OnGrant::Kill) => {
                signal(grant.pid, Signal::SIGKILL);
                let _ = done.send(Done::Killed {
                    worker: grant.worker,
                    at: Instant::now(),
                });
            }
            None => {}
        }
        let _ = grant.go.send(());
    }
}

/// What a run is: the store, the fault, the plan, and its bounds.
struct Run<'a> {
    store: Store,
    fault: Fault,
    plan: &'a Plan,
    /// The bound on the next grant after a fault heals.
    base_bound: Duration,
    /// Whether a pause adds to the bound (sessions without a lease).
    pause_counts: bool,
}

/// Runs `store` under `fault`: warm up, then one fault at a time, each
/// healed (a grant came) before the next, then the checks.
pub(crate) async fn run_fault(
    exe: &Path,
    store: Store,
    fault: Fault,
    plan: &Plan,
    backend: &mut Option<Backend>,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let mut harness = Harness::start(
        exe,
        store,
        fault,
        plan,
        backend.as_ref().context("no store")?,
    )
    .await?;
    let capabilities = distlock::connect(&harness.direct).await?.capabilities();
    let run = Run {
        store,
        fault,
        plan,
        base_bound: plan.ttl + plan.lock_delay + Duration::from_secs(2),
        pause_counts: capabilities.session != SessionModel::Lease,
    };
    let mut row = Row {
        store,
        fault,
        findings: Findings::default(),
        injected: 0,
        recovery: Duration::ZERO,
        bound: run.base_bound,
        lost_promised: (fault.is_network() || fault.is_cluster())
            && capabilities.session == SessionModel::Lease,
        exclusion_promised: capabilities.session == SessionModel::Lease,
        // The server's client takes a session back on a new connection.
        loss_free: store == Store::Server && fault == Fault::Reset,
        problems: Vec::new(),
        failures: Vec::new(),
    };
    while harness.acquisitions() < 20 {
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
            || harness.acquisitions() < plan.acquisitions
            || Instant::now() < paused_until)
    {
        if started.elapsed() > plan.limit {
            row.problems.push(format!(
                "not done within {:?}: {} grants, {} faults",
                plan.limit,
                harness.acquisitions(),
                row.injected
            ));
            break;
        }
        // One fault at a time: a paused worker is woken first.
        if row.injected >= plan.faults || Instant::now() < paused_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let injected = harness
            .inject(&run, backend, &mut paused_until, &mut row)
            .await?;
        let Some((healed, bound)) = injected else {
            break;
        };
        row.injected += 1;
        row.bound = row.bound.max(bound);
        harness.recover(healed, bound, &mut row).await;
        // Some grants between faults.
        harness.grants(20, Duration::from_secs(5)).await;
    }
    Ok(harness.finish(plan, row).await)
}

/// Kills (and, once another leads, restarts) or freezes past an election
/// (then lets run on) the cluster's leader; returns once the cluster has
/// a leader again. Blocking.
fn strike_leader(cluster: &mut Backend, fault: Fault) -> anyhow::Result<()> {
    let members = cluster.members().context("not a cluster")?;
    let leader = members.wait_for_leader();
    match fault {
        Fault::KillLeader => {
            members.kill(leader);
            // Another leads (a killed member is never named) before the
            // old one comes back.
            members.wait_for_leader();
            members.restart(leader);
        }
        _ => {
            members.pause(leader);
            // Past etcd's election timeout (1 s) and ZooKeeper's syncLimit
            // (1 s in the test kit).
            std::thread::sleep(Duration::from_secs(3));
            let started = std::time::Instant::now();
            while members.leader_among_others(leader).is_none() {
                if started.elapsed() > Duration::from_secs(60) {
                    members.resume(leader);
                    anyhow::bail!("no new leader while the old one was frozen");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            members.resume(leader);
        }
    }
    members.wait_for_leader();
    Ok(())
}
