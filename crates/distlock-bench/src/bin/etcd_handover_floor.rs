//! What etcd itself allows a lock's hand-overs on this machine, with no lock
//! around them: C tasks in a ring, each with a watch kept open on a key of
//! its own. A task woken by an event on its key puts the next task's key
//! (the hand-over), then does what a lock adds around it:
//!
//! - `r`: a linearizable read of the ring before the hand-over (a check on
//!   the critical path, as a waiter's read before it is told it holds);
//! - `s`: the same read, serializable;
//! - `j`: a put of a key of its own after the hand-over (off the critical
//!   path, as a released client's joining the queue again);
//! - `w`: a new watch stream with two watches after the hand-over (as a
//!   waiter's wait);
//! - `g`: a serializable read after the hand-over (as a waiter's check that
//!   its blocker is still there);
//! - `t`: the hand-over, and the put of `j`, as conditional transactions,
//!   the second also reading the ring (as a lock's release and its join:
//!   neither can be a plain put);
//! - `o`: a new watch stream with one watch (from now) after the hand-over;
//! - `v`: two watches (from now, and far ahead) added to a stream the task
//!   keeps open, and the previous two cancelled: what a wait would cost if a
//!   session kept one watch stream for all its waits.
//!
//! ```sh
//! cargo run --release -p distlock-bench --features etcd --bin etcd_handover_floor -- \
//!     127.0.0.1:2379 rj 16 5
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), etcd_client::Error> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "127.0.0.1:2379".to_owned());
    let extras = args.next().unwrap_or_default();
    let tasks: usize = args.next().map_or(16, |n| n.parse().expect("tasks"));
    let seconds: u64 = args.next().map_or(5, |n| n.parse().expect("seconds"));
    let ring = format!("handover-floor/{}/", std::process::id());
    let client = Client::connect([endpoint.as_str()], None).await?;
    let hops = Arc::new(AtomicU64::new(0));
    for task in 0..tasks {
        let (mut client, hops, extras, ring) =
            (client.clone(), hops.clone(), extras.clone(), ring.clone());
        let mut watch = client.watch(format!("{ring}{task}"), None).await?;
        watch.message().await?; // created
                                // The stream `v` keeps open, and a task that drains it; opened only
                                // for `v`, as its first watch sees every put of `j`.
        let mut side = None;
        if extras.contains('v') {
            let (sender, mut events) = client
                .watch(format!("{ring}side/{task}"), None)
                .await?
                .split();
            tokio::spawn(async move { while let Ok(Some(_)) = events.message().await {} });
            side = Some(sender);
        }
        tokio::spawn(async move {
            let mut side_ids = 0i64;
            let next = format!("{ring}{}", (task + 1) % tasks);
            let own = format!("{ring}side/{task}");
            while let Ok(Some(message)) = watch.message().await {
                if message.events().is_empty() {
                    continue;
                }
                hops.fetch_add(1, Ordering::Relaxed);
                let ring_read = || GetOptions::new().with_prefix();
                if extras.contains('r') {
                    client.get(ring.as_str(), Some(ring_read())).await?;
                }
                if extras.contains('s') {
                    let read = ring_read().with_serializable();
                    client.get(ring.as_str(), Some(read)).await?;
                }
                let always = |key: &str| Compare::version(key, CompareOp::Greater, -1);
                if extras.contains('t') {
                    let hand_over = Txn::new()
                        .when([always(next.as_str())])
                        .and_then([TxnOp::put(next.as_str(), "x", None)]);
                    client.txn(hand_over).await?;
                } else {
                    client.put(next.as_str(), "x", None).await?;
                }
                if extras.contains('j') && extras.contains('t') {
                    let join = Txn::new().when([always(own.as_str())]).and_then([
                        TxnOp::put(own.as_str(), "x", None),
                        TxnOp::get(ring.as_str(), Some(ring_read())),
                    ]);
                    client.txn(join).await?;
                } else if extras.contains('j') {
                    client.put(own.as_str(), "x", None).await?;
                }
                if extras.contains('w') {
                    let mut wait = client.watch(own.as_str(), None).await?;
                    let created = wait.message().await?.and_then(|m| m.header().cloned());
                    let ahead = created.map_or(0, |header| header.revision()) + 8;
                    let options = WatchOptions::new().with_start_revision(ahead);
                    wait.watch(own.as_str(), Some(options)).await?;
                }
                if extras.contains('o') {
                    let mut wait = client.watch(own.as_str(), None).await?;
                    wait.message().await?;
                }
                if let Some(side) = side.as_mut() {
                    for id in [side_ids - 1, side_ids] {
                        if id > 0 {
                            side.cancel(id).await?;
                        }
                    }
                    side_ids += 2;
                    let options = WatchOptions::new().with_watch_id(side_ids - 1);
                    side.watch(own.as_str(), Some(options)).await?;
                    let options = WatchOptions::new()
                        .with_watch_id(side_ids)
                        .with_start_revision(i64::MAX / 2);
                    side.watch(own.as_str(), Some(options)).await?;
                }
                if extras.contains('g') {
                    let read = GetOptions::new().with_serializable();
                    client.get(own.as_str(), Some(read)).await?;
                }
            }
            Ok::<(), etcd_client::Error>(())
        });
    }
    client.clone().put(format!("{ring}0"), "x", None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before, started) = (hops.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let done = hops.load(Ordering::Relaxed) - before;
    println!(
        "handover_floor  {endpoint}  {tasks} tasks  extras {extras:?}  {done} hand-overs ({:.0}/s)",
        done as f64 / started.elapsed().as_secs_f64()
    );
    let mut cleanup = client.clone();
    cleanup
        .delete(
            ring.as_str(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    std::process::exit(0);
}
