//! The baseline `distlock bench` is compared with on etcd, with the same
//! workloads and the same report: etcd's own lock service (v3lock, what
//! `etcdctl lock` uses). Each client grants a lease once and keeps it alive,
//! then loops `Lock(name, lease)` → `Unlock(key)`; a waiter waits in the
//! server, queued by revision.
//!
//! Every client has an etcd-client `Client` of its own (as `distlock bench
//! --connections N` gives distlock). `uncontended`: client i loops acquire →
//! release on `bench-i`, pairs/s and pair latency; `contended`: every client
//! on one name, acquisitions/s and the latency of the acquire.
//!
//! ```sh
//! cargo run --release -p distlock-bench --features etcd --bin v3lock -- \
//!     contended etcd://127.0.0.1:2379 16 10
//! ```
//!
//! `scripts/bench-sql` runs this beside `distlock bench`, alternating.

use std::time::Duration;

use distlock_bench::{report, run, usage, Locker, Settings, Workload};
use etcd_client::{Client, LockOptions};

/// The lease each client holds its locks with: it is kept alive, so this
/// only says how long a lock outlives a client that died.
const LEASE_SECONDS: i64 = 30;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = "usage: v3lock uncontended|contended [etcd://]HOST:PORT[,HOST:PORT…] \
                [CLIENTS] [SECONDS] [THREADS]";
    let [workload, url, rest @ ..] = args.as_slice() else {
        usage(text);
    };
    let workload = Workload::parse(workload).unwrap_or_else(|| usage(text));
    let hosts = url.strip_prefix("etcd://").unwrap_or(url);
    let endpoints: Vec<String> = hosts.split(',').map(|h| format!("http://{h}")).collect();
    let settings = Settings::parse(rest);
    let name = |index: usize| match workload {
        Workload::Uncontended => format!("bench-{index}"),
        Workload::Contended => "bench".to_owned(),
    };
    let connect = |_| V3Lock::connect(&endpoints);
    let stats = settings
        .runtime()
        .block_on(run(&settings, workload, name, connect));
    report("v3lock", workload, url, &settings, &stats);
}

/// One client: its own `Client` and its lease, kept alive by a task.
struct V3Lock {
    client: Client,
    lease: i64,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl V3Lock {
    async fn connect(endpoints: &[String]) -> V3Lock {
        let mut client = Client::connect(endpoints, None)
            .await
            .expect("connect to etcd");
        let lease = client
            .lease_grant(LEASE_SECONDS, None)
            .await
            .expect("grant a lease")
            .id();
        let (mut keeper, mut responses) = client
            .lease_keep_alive(lease)
            .await
            .expect("keep the lease alive");
        let keep_alive = tokio::spawn(async move {
            let every = Duration::from_secs(LEASE_SECONDS as u64 / 3);
            loop {
                tokio::time::sleep(every).await;
                keeper.keep_alive().await.expect("send a keep-alive");
                responses
                    .message()
                    .await
                    .expect("a keep-alive answer")
                    .expect("the keep-alive stream open");
            }
        });
        V3Lock {
            client,
            lease,
            keep_alive,
        }
    }
}

impl Locker for V3Lock {
    type Held = Vec<u8>;

    /// Takes `name`, waiting in the server; the key that holds it.
    async fn acquire(&mut self, name: &str) -> Vec<u8> {
        let options = LockOptions::new().with_lease(self.lease);
        self.client
            .lock(name, Some(options))
            .await
            .expect("Lock")
            .key()
            .to_vec()
    }

    async fn release(&mut self, _name: &str, key: Vec<u8>) {
        self.client.unlock(key).await.expect("Unlock");
    }

    async fn close(mut self) {
        self.keep_alive.abort();
        self.client.lease_revoke(self.lease).await.expect("revoke");
    }
}
