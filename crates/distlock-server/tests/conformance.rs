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
