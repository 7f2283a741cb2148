//! The conformance suite against a real distlock server, started once for
//! the whole run on a port of its own, over both transports.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use distlock_client::RemoteStore;
use distlock_core::Client;

/// Starts the server on its own runtime and thread, once.
fn server() -> SocketAddr {
    static SERVER: OnceLock<SocketAddr> = OnceLock::new();
    *SERVER.get_or_init(|| {
        let data = tempfile::tempdir().expect("temp dir").keep();
        distlock_testkit::daemon::remove_when_this_process_exits(&data);
        let (ready, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                ready
                    .send(listener.local_addr().expect("address"))
                    .expect("report address");
                let config = distlock_server::Config {
                    data_dir: data,
                    ..distlock_server::Config::default()
                };
                distlock_server::run(listener, config, std::future::pending())
                    .await
                    .expect("server runs");
            });
        });
        address.recv().expect("server address")
    })
}

/// A client of the test server; `query` picks the transport.
async fn connect_with(query: &str) -> Client {
    let url = url::Url::parse(&format!("distlock://{}{query}", server())).expect("url");
    let store = RemoteStore::connect(&url)
        .await
        .expect("connect to the test server");
    Client::new(Arc::new(store))
}

/// Sessions multiplexed on one connection: what `distlock://` uses.
async fn connect() -> Client {
    connect_with("").await
}

distlock_testkit::conformance_suite!(connect);

/// A gRPC stream per session: what `distlocks://` and other languages use.
mod grpc {
    async fn connect() -> distlock_core::Client {
        super::connect_with("?transport=grpc").await
    }

    distlock_testkit::conformance_suite!(connect);
}

/// A forced release is pushed to the holder's stream: its `lost()` fires at
/// once, not at its next renewal (a third of a 60 s lease away), on both
/// transports.
#[tokio::test]
async fn a_forced_release_reaches_the_holder_at_once() {
    for query in ["", "?transport=grpc"] {
        let client = connect_with(query).await;
        let key = format!("pushed-loss/{query}");
        let holder = client
            .session()
            .ttl(std::time::Duration::from_secs(60))
            .open()
            .await
            .expect("open");
        let guard = holder.lock(&key).await.expect("free");
        let ended = client.force_release(&key).await.expect("force release");
        assert_eq!(ended.len(), 1, "{ended:?}");
        tokio::time::timeout(std::time::Duration::from_secs(10), guard.lost())
            .await
            .expect("lost() fires well before the next renewal, 20 s away");
        holder.close().await.expect("close");
    }
}
