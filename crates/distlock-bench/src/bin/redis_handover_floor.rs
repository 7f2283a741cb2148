//! What Redis itself allows a chain of pushed hand-overs on this machine,
//! with no lock around it: C tasks in a ring, each with a connection and a
//! subscriber connection of its own; task i waits for a message on its
//! channel, then publishes to task i+1's. Each hop is what a FIFO lock's
//! hand-over needs at the least (a request from the holder, a message to
//! the next), with no script, queue or token. Hops per second is the
//! ceiling of any lock that hands a key from client to client through
//! Redis; the mean wait of a task is C hops.
//!
//! ```sh
//! cargo run --release -p distlock-bench --bin redis_handover_floor -- \
//!     redis://127.0.0.1:6379 16 10
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let tasks: usize = args.next().map_or(16, |n| n.parse().expect("tasks"));
    let seconds: u64 = args.next().map_or(10, |n| n.parse().expect("seconds"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let client = redis::Client::open(url.as_str()).expect("a Redis URL");
        let ring = format!("handover-floor/{}", std::process::id());
        let hops = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut handles = Vec::new();
        let mut ready = Vec::new();
        for index in 0..tasks {
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let mut pubsub = client.get_async_pubsub().await.expect("subscribe");
            pubsub
                .subscribe(format!("{ring}/{index}"))
                .await
                .expect("subscribe");
            ready.push(connection.clone());
            let next = format!("{ring}/{}", (index + 1) % tasks);
            let hops = Arc::clone(&hops);
            handles.push(tokio::spawn(async move {
                let mut messages = pubsub.on_message();
                while messages.next().await.is_some() {
                    if Instant::now() >= end {
                        break;
                    }
                    hops.fetch_add(1, Ordering::Relaxed);
                    let _: i64 = redis::cmd("PUBLISH")
                        .arg(&next)
                        .arg("x")
                        .query_async(&mut connection)
                        .await
                        .expect("publish");
                }
            }));
        }
        let started = Instant::now();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{ring}/0"))
            .arg("x")
            .query_async(&mut ready[0])
            .await
            .expect("start the ring");
        tokio::time::sleep_until((end + Duration::from_millis(50)).into()).await;
        let elapsed = started.elapsed().min(Duration::from_secs(seconds));
        let total = hops.load(Ordering::Relaxed);
        println!(
            "handover floor  {url}  {tasks} tasks  {total} hops in {:.1}s ({:.0}/s, {:.1} us a hop)",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / total.max(1) as f64
        );
        for handle in handles {
            handle.abort();
        }
    });
}
