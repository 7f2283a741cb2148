//! What PostgreSQL itself allows a chain of hand-overs pushed by
//! LISTEN/NOTIFY, as lease mode's waiters are woken, with no lock around
//! them: C tasks in a ring, each with a listening connection on a channel
//! of its own and a connection for statements. A task woken on its channel
//! sends `SELECT pg_notify(<the next task's channel>, '')`, the hand-over;
//! with `STATEMENTS` > 1 it first sends `SELECT 1` that many times less
//! one, as a lock's grant needs a statement of its own before the release
//! that wakes the next. One hand-over is under way at a time: the figure is
//! the latency of the chain, as under a contended lock.
//!
//! ```sh
//! cargo run --release -p distlock-bench --bin pg_notify_floor -- \
//!     postgres://postgres@127.0.0.1:5432/postgres 16 5 1
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), tokio_postgres::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let tasks: usize = args.next().map_or(16, |n| n.parse().expect("tasks"));
    let seconds: u64 = args.next().map_or(5, |n| n.parse().expect("seconds"));
    let statements: usize = args.next().map_or(1, |n| n.parse().expect("statements"));
    let ring = format!("notify_floor_{}", std::process::id());
    let hops = Arc::new(AtomicU64::new(0));
    let mut statement_clients = Vec::new();
    for task in 0..tasks {
        let (client, mut connection) = tokio_postgres::connect(&url, NoTls).await?;
        // Notifications of this task's channel, read off its connection.
        let (woken, mut wakes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let AsyncMessage::Notification(_) = message {
                    let _ = woken.send(());
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {ring}_{task}"))
            .await?;
        let (statements_client, connection) = tokio_postgres::connect(&url, NoTls).await?;
        tokio::spawn(connection);
        let statements_client = Arc::new(statements_client);
        statement_clients.push(Arc::clone(&statements_client));
        let (hops, next) = (
            Arc::clone(&hops),
            format!("SELECT pg_notify('{ring}_{}', '')", (task + 1) % tasks),
        );
        tokio::spawn(async move {
            // Kept open: the listening connection lives as long as this.
            let _listening: Client = client;
            while wakes.recv().await.is_some() {
                hops.fetch_add(1, Ordering::Relaxed);
                for _ in 1..statements {
                    if statements_client.simple_query("SELECT 1").await.is_err() {
                        return;
                    }
                }
                if statements_client.simple_query(&next).await.is_err() {
                    return;
                }
            }
        });
    }
    statement_clients[0]
        .simple_query(&format!("SELECT pg_notify('{ring}_0', '')"))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (started, before) = (Instant::now(), hops.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let done = hops.load(Ordering::Relaxed) - before;
    println!(
        "pg_notify_floor {tasks} tasks, {statements} statement(s) a hop: {:.0} hand-overs/s",
        done as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}
