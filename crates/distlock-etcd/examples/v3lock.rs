//! The baseline `distlock bench --workload contended` is compared with on
//! etcd: etcd's own lock service (v3lock, through etcd-client's `lock` and
//! `unlock`), with C clients taking turns on one lock, each on a connection
//! and lease of its own, for a number of seconds.
//!
//! ```sh
//! cargo run --release -p distlock-etcd --example v3lock -- 127.0.0.1:2379 16 10
//! ```

use std::time::{Duration, Instant};

use etcd_client::{Client, LockOptions};

#[tokio::main]
async fn main() -> Result<(), etcd_client::Error> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "127.0.0.1:2379".to_owned());
    let clients: usize = args.next().map_or(16, |n| n.parse().expect("clients"));
    let seconds: u64 = args.next().map_or(10, |n| n.parse().expect("seconds"));
    let name = format!("v3lock-bench/{}", std::process::id());
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = Client::connect([endpoint.as_str()], None).await?;
        let lease = client.lease_grant(seconds as i64 + 30, None).await?.id();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut acquisitions = 0u64;
            while Instant::now() < end {
                let options = LockOptions::new().with_lease(lease);
                let locked = client.lock(name.as_str(), Some(options)).await?;
                client.unlock(locked.key()).await?;
                acquisitions += 1;
            }
            client.lease_revoke(lease).await?;
            Ok::<u64, etcd_client::Error>(acquisitions)
        }));
    }
    let started = Instant::now();
    let mut counts = Vec::new();
    for task in tasks {
        counts.push(task.await.expect("a client panicked")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = counts.iter().sum();
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    let jain = if squares > 0.0 {
        sum * sum / (counts.len() as f64 * squares)
    } else {
        0.0
    };
    println!(
        "v3lock  {endpoint}  {clients} clients  {elapsed:.1}s  {total} acquisitions ({:.0}/s)  \
         min {} / max {} per client  Jain's index {jain:.3}",
        total as f64 / elapsed,
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0),
    );
    Ok(())
}
