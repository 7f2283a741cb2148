//! Holds many locks at once, to measure a store's memory:
//!
//! ```text
//! cargo run --release -p distlock-bench --bin hold_many -- distlock://127.0.0.1:7890 10000 100
//! ```
//!
//! opens SESSIONS sessions over up to 100 connections, takes LOCKS locks in
//! each, says so, and holds them until Ctrl-C.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, sessions, locks] = &args[..] else {
        return Err("usage: hold_many URL SESSIONS LOCKS_PER_SESSION".into());
    };
    let (sessions, locks): (usize, usize) = (sessions.parse()?, locks.parse()?);
    let mut clients = Vec::new();
    for _ in 0..sessions.clamp(1, 100) {
        clients.push(distlock::connect(url).await?);
    }
    let started = Instant::now();
    // Bound the acquires in flight, so that the store, not a queue, is measured.
    let in_flight = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::new();
    for session_index in 0..sessions {
        let client = clients[session_index % clients.len()].clone();
        let in_flight = Arc::clone(&in_flight);
        tasks.push(tokio::spawn(async move {
            let session = client.session().ttl(Duration::from_secs(60)).open().await?;
            let mut guards = Vec::with_capacity(locks);
            for lock in 0..locks {
                let _permit = in_flight.acquire().await.expect("never closed");
                let key = format!("hold/{session_index}/{lock}");
                guards.push(
                    session
                        .lock(key)
                        .try_lock()
                        .await?
                        .ok_or("a fresh key was busy")?,
                );
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((session, guards))
        }));
    }
    let mut held = Vec::new();
    for task in tasks {
        held.push(task.await?.map_err(|err| err.to_string())?);
    }
    let total: usize = held.iter().map(|(_, guards)| guards.len()).sum();
    println!(
        "holding {total} locks in {sessions} sessions (took {:.1?}); Ctrl-C to release",
        started.elapsed()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
