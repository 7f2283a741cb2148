//! A TCP proxy between a client and its store that can delay, blackhole
//! and reset connections: the network faults of the tests (`tc netem` is
//! not at hand everywhere).

use distlock_core::store::lock;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Carries them at once.
    None,
    /// Holds each chunk this long before passing it on.
    Delay(Duration),
    /// Carries nothing, in either direction, until the fault changes; what
    /// was sent meanwhile arrives afterwards, as TCP retransmits it.
    Blackhole,
}

/// A proxy on a port of 127.0.0.1 in front of `target`. Dropping it closes
/// every connection.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    fault: watch::Sender<Fault>,
    connections: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` on the current runtime.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a port on 127.0.0.1");
        let port = listener.local_addr().expect("its address").port();
        let fault = watch::Sender::new(Fault::None);
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let accept = {
            let (fault, connections) = (fault.clone(), Arc::clone(&connections));
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let fault = fault.subscribe();
                    let mut set = lock(&connections);
                    set.spawn(carry(client, server, fault));
                }
            })
        };
        Proxy {
            port,
            fault,
            connections,
            accept,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sets the fault for every connection, open and future.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Resets every open connection (the peers see them end at once).
    pub fn reset(&self) {
        lock(&self.connections).abort_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

/// Carries one connection both ways until either side ends it.
async fn carry(client: TcpStream, server: TcpStream, fault: watch::Receiver<Fault>) {
    // Closing with a zero linger sends a reset, not a graceful end.
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, fault.clone()) => {}
        () = pump(server_read, client_write, fault) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        loop {
            let now = *fault.borrow_and_update();
            match now {
                Fault::None => break,
                Fault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Fault::Blackhole => {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
