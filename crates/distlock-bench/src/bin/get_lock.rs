//! The baseline `distlock bench` is compared with on MariaDB and MySQL, with
//! the same workloads and the same report: the lock most teams write by
//! hand, `GET_LOCK(key, timeout)` to take it and `RELEASE_LOCK(key)` to give
//! it back, both prepared once per connection. A waiter waits in the server
//! (GET_LOCK blocks), not by polling. No fencing token, no lease.
//!
//! Every client has a connection of its own (as `distlock bench
//! --connections N` gives distlock), over TCP as distlock's is.
//! `uncontended`: client i loops acquire → release on `bench-i`, pairs/s and
//! pair latency; `contended`: every client on one key, acquisitions/s and
//! the latency of the acquire.
//!
//! ```sh
//! cargo run --release -p distlock-bench --bin get_lock -- \
//!     contended mysql://user:password@127.0.0.1:3306/db 16 10
//! ```
//!
//! `scripts/bench-sql` runs this beside `distlock bench`, alternating.

use distlock_bench::{report, run, usage, Locker, Settings, Workload};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Statement};

/// How long one GET_LOCK waits in the server before it says 0 and is asked
/// again: far longer than any wait in a run.
const WAIT_SECONDS: u64 = 60;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = "usage: get_lock uncontended|contended URL [CLIENTS] [SECONDS] [THREADS]";
    let [workload, url, rest @ ..] = args.as_slice() else {
        usage(text);
    };
    let workload = Workload::parse(workload).unwrap_or_else(|| usage(text));
    let settings = Settings::parse(rest);
    let opts = Opts::from_url(url).expect("a MySQL URL");
    // As distlock's store does: stay on TCP, where mysql_async would move a
    // connection to localhost onto the server's Unix socket.
    let opts: Opts = OptsBuilder::from_opts(opts).prefer_socket(false).into();
    let key = |index: usize| match workload {
        Workload::Uncontended => format!("bench-{index}"),
        Workload::Contended => "bench".to_owned(),
    };
    let connect = |_| NamedLock::connect(opts.clone());
    let stats = settings
        .runtime()
        .block_on(run(&settings, workload, key, connect));
    report("GET_LOCK", workload, url, &settings, &stats);
}

/// One client: its connection and its two prepared statements.
struct NamedLock {
    connection: Conn,
    get_lock: Statement,
    release_lock: Statement,
}

impl NamedLock {
    async fn connect(opts: Opts) -> NamedLock {
        let mut connection = Conn::new(opts).await.expect("connect to MySQL");
        let get_lock = connection
            .prep("SELECT GET_LOCK(?, ?)")
            .await
            .expect("prepare GET_LOCK");
        let release_lock = connection
            .prep("SELECT RELEASE_LOCK(?)")
            .await
            .expect("prepare RELEASE_LOCK");
        NamedLock {
            connection,
            get_lock,
            release_lock,
        }
    }
}

impl Locker for NamedLock {
    type Held = ();

    /// Takes `key`, waiting in the server.
    async fn acquire(&mut self, key: &str) {
        loop {
            let taken: Option<Option<i64>> = self
                .connection
                .exec_first(&self.get_lock, (key, WAIT_SECONDS))
                .await
                .expect("GET_LOCK");
            if taken == Some(Some(1)) {
                return;
            }
        }
    }

    async fn release(&mut self, key: &str, (): ()) {
        let released: Option<Option<i64>> = self
            .connection
            .exec_first(&self.release_lock, (key,))
            .await
            .expect("RELEASE_LOCK");
        assert_eq!(released, Some(Some(1)), "RELEASE_LOCK of a held lock");
    }

    async fn close(self) {
        self.connection.disconnect().await.expect("disconnect");
    }
}
