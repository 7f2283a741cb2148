#![allow(missing_docs)]
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock_proto::v1 as proto;
use proto::locks_client::LocksClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

#[tokio::main(worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tasks: usize = args[1].parse().unwrap();
    let streams: usize = args[2].parse().unwrap();
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:17891")
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..streams {
        let mut client = LocksClient::new(channel.clone());
        let (tx, rx) = mpsc::unbounded_channel::<proto::SessionRequest>();
        tx.send(proto::SessionRequest {
            id: 0,
            body: Some(proto::session_request::Body::Open(proto::Open {
                ttl_ms: 30000,
                lock_delay_ms: 0,
                max_hold_ms: 0,
            })),
        })
        .unwrap();
        let mut events = client
            .session(UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let _opened = events.next().await.unwrap().unwrap();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Default::default();
        let p2 = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                if let Some(o) = p2.lock().unwrap().remove(&event.id) {
                    let _ = o.send(());
                }
            }
        });
        senders.push((tx, pending));
    }
    let next = Arc::new(AtomicU64::new(1));
    for i in 0..tasks {
        let (tx, pending) = senders[i % streams].clone();
        let count = count.clone();
        let next = next.clone();
        tokio::spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                let (o, r) = oneshot::channel();
                pending.lock().unwrap().insert(id, o);
                tx.send(proto::SessionRequest {
                    id,
                    body: Some(proto::session_request::Body::KeepAlive(proto::KeepAlive {
                        keys: vec![],
                    })),
                })
                .unwrap();
                r.await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "{:.0} round trips/s",
        count.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
    );
}
