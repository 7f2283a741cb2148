//! The distlock lock server: the zero-dependency default store.
//!
//! It orders requests per key and grants them one at a time: sessions with
//! leases kept alive over one stream each (a gRPC stream, or a stream of a
//! multiplexed connection on the same port), exclusive, shared
//! (writer-preferring) and semaphore modes, FIFO queues with the grant
//! pushed to the waiter, lock-delay, `max_hold`, `check` and `status`. The
//! state machine is [`distlock_core::table`]; this crate adds the protocol
//! (`distlock-proto`), limits, a shared-secret token, and durability:
//!
//! - fencing tokens carry an epoch saved at each start, so they continue
//!   above every token ever handed out after a crash or restart, without a
//!   disk write per grant;
//! - holds are not saved: a restarted server grants nothing until the
//!   longest lease of its earlier sessions has run out, by which time every
//!   holder from before has seen `lost()` (see `docs/0002-server.md`).
//!
//! ```no_run
//! # async fn serve() -> Result<(), distlock_server::ServerError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7890").await?;
//! let config = distlock_server::Config::default();
//! let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! distlock_server::run(listener, config, async {
//!     let _ = stopped.await; // e.g. on Ctrl-C
//! })
//! .await
//! # }
//! ```

mod config;
mod durable;
mod metrics;
mod mux;
mod session;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use distlock_core::status::StatusQuery;
use distlock_core::store::{lock, validate_owner};
use distlock_core::table::{lock_table, Limits, LockTable, SessionId, SharedTable};
use distlock_core::validate_key;
use distlock_proto::v1 as proto;
use proto::locks_server::{Locks, LocksServer};
use std::time::Duration;

use distlock_proto::mux::PREFACE;
use proto::session_event::Body as Event;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

pub use config::{Config, ConfigError};
use durable::{DataDir, EpochTokens};
use metrics::Metrics;

pub use distlock_proto::DEFAULT_PORT;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory or a socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The gRPC transport failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What every stream and call of one server shares.
pub(crate) struct Shared {
    pub(crate) table: SharedTable,
    /// Each open session's stream and resume secret.
    pub(crate) sessions: Mutex<HashMap<SessionId, session::Registered>>,
    /// Sessions opened, for sweeping `sessions` of ended ones now and then.
    pub(crate) opened: std::sync::atomic::AtomicU64,
    pub(crate) config: Config,
    pub(crate) data: Arc<DataDir>,
    pub(crate) metrics: Metrics,
}

struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Locks for Service {
    type SessionStream = UnboundedReceiverStream<Result<proto::SessionEvent, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<proto::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (out, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(session::serve(
            Arc::clone(&self.shared),
            request.into_inner(),
            session::Outbound::Grpc(out),
        ));
        Ok(Response::new(UnboundedReceiverStream::new(events)))
    }

    async fn force_release(
        &self,
        request: Request<proto::ForceReleaseRequest>,
    ) -> Result<Response<proto::ForceReleaseReply>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "a local client".to_owned(), |addr| addr.to_string());
        let request = request.into_inner();
        validate_key(&request.key).map_err(|err| Status::invalid_argument(err.to_string()))?;
        // It goes into the log: one line, of bounded length.
        validate_owner(&request.requested_by)
            .map_err(|err| Status::invalid_argument(format!("requested_by: {err}")))?;
        let released = lock_table(&self.shared.table).force_release(&request.key);
        let sessions = lock(&self.shared.sessions);
        for holder in &released {
            let session = holder.session.parse().ok().and_then(|id| sessions.get(&id));
            if let Some(session) = session {
                let ended = vec![proto::HeldKey {
                    key: request.key.clone(),
                    token: holder.token.unwrap_or_default(),
                }];
                let keys = vec![request.key.clone()];
                session.event(0, Event::Lost(proto::Lost { keys, ended }));
            }
        }
        drop(sessions);
        let held: Vec<String> = released
            .iter()
            .map(|h| {
                format!(
                    "session {} ({}) {} token {}",
                    h.session,
                    h.owner,
                    h.mode,
                    h.token.unwrap_or_default()
                )
            })
            .collect();
        tracing::warn!(
            key = %request.key,
            requested_by = %request.requested_by,
            %peer,
            "forced release ended {} hold(s): {}",
            held.len(),
            held.join("; ")
        );
        let released = released
            .into_iter()
            .map(distlock_proto::convert::holder)
            .collect();
        Ok(Response::new(proto::ForceReleaseReply { released }))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::WatchEvent, Status>> + Send>,
    >;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let key = request.into_inner().key;
        let max_key = self.shared.config.max_key_bytes;
        if key.is_empty() || key.len() > max_key {
            return Err(Status::invalid_argument(format!(
                "lock key is {} bytes long; a key is any UTF-8 string of 1 to {max_key} bytes",
                key.len()
            )));
        }
        let watch = lock_table(&self.shared.table).watch_key(&key);
        let events = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(watch),
            |()| Ok(proto::WatchEvent {}),
        );
        Ok(Response::new(Box::pin(events)))
    }

    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckReply>, Status> {
        let request = request.into_inner();
        let current = lock_table(&self.shared.table).check(&request.key, request.token);
        Ok(Response::new(proto::CheckReply { current }))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        let request = request.into_inner();
        let (keys, counters) = {
            let mut table = lock_table(&self.shared.table);
            let query = if request.key.is_empty() {
                StatusQuery::Prefix(request.prefix)
            } else {
                StatusQuery::Key(request.key)
            };
            (table.status(&query), table.counters())
        };
        Ok(Response::new(proto::StatusReply {
            keys: keys
                .into_iter()
                .map(distlock_proto::convert::key_status)
                .collect(),
            counters: Some(distlock_proto::convert::counters(counters)),
        }))
    }
}

/// Refuses calls without the shared secret, when the server has one.
#[derive(Clone)]
struct Auth {
    expected: Option<Arc<str>>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if given.is_some_and(|given| same_secret(given.as_bytes(), expected.as_bytes())) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "this server needs its shared secret: connect with distlock://:SECRET@host:port \
                 (metadata `authorization: Bearer SECRET`)",
            ))
        }
    }
}

/// Compares secrets in time that depends only on their lengths, so that
/// timing does not tell how much of a guess was right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

/// How long a new connection has to send its first byte.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `stop`, and tells them apart by their first
/// byte: the mux preface is served here, anything else (the HTTP/2 preface,
/// a TLS handshake) goes to the gRPC server through `grpc`.
async fn accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    grpc: UnboundedSender<std::io::Result<TcpStream>>,
    workers: Arc<mux::Workers>,
    stop: CancellationToken,
) {
    tracing::info!(address = ?listener.local_addr().ok(), "distlock server listening");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let socket = match accepted {
            Ok((socket, _)) => socket,
            Err(err) => {
                // E.g. out of file descriptors: wait for some to close.
                tracing::warn!("cannot accept a connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Without TCP_NODELAY a reply can wait ~40 ms for a delayed ACK.
        let _ = socket.set_nodelay(true);
        let (shared, grpc, workers) = (Arc::clone(&shared), grpc.clone(), Arc::clone(&workers));
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut first = [0; 1];
            let peeked = tokio::select! {
                peeked = tokio::time::timeout(FIRST_BYTE_TIMEOUT, socket.peek(&mut first)) => peeked,
                () = stop.cancelled() => return,
            };
            match peeked {
                Ok(Ok(1)) if first[0] == PREFACE[0] => {
                    drop(grpc);
                    if shared.config.tls_cert.is_some() {
                        mux::refuse(
                            socket,
                            Status::failed_precondition(
                                "this server speaks only TLS: connect with distlocks://",
                            ),
                        )
                        .await;
                    } else {
                        workers.serve(socket);
                    }
                }
                Ok(Ok(1)) => {
                    let _ = grpc.send(Ok(socket));
                }
                // Gone, or silent for too long.
                _ => {}
            }
        });
    }
}

/// Serves until `shutdown` completes, then stops accepting and returns once
/// open streams have ended.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    config.validate()?;
    let (data, startup) = DataDir::open(&config.data_dir)?;
    let limits = Limits {
        max_sessions: config.max_sessions,
        max_waiters_per_key: config.max_waiters_per_key,
    };
    let mut table = LockTable::new(
        limits,
        Box::new(EpochTokens::new(Arc::clone(&data), startup.epoch)),
    );
    if !startup.wait_out.is_zero() {
        tracing::info!(
            "restarted: granting nothing for {:?}, until the leases of sessions from before have run out",
            startup.wait_out
        );
        table.block_grants_until(Instant::now() + startup.wait_out);
    }
    let auth = Auth {
        expected: config.auth_token.as_deref().map(Arc::from),
    };
    let max_message = config.max_message_bytes;
    let table: SharedTable = Arc::new(Mutex::new(table));
    let metrics_listener = match &config.metrics_listen {
        Some(address) => Some(TcpListener::bind(address).await.map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!("cannot serve metrics on {address}: {err}"),
            )
        })?),
        None => None,
    };
    let shared = Arc::new(Shared {
        sessions: Mutex::default(),
        opened: std::sync::atomic::AtomicU64::new(0),
        metrics: Metrics::new(Arc::clone(&table)),
        table,
        config,
        data,
    });
    let metrics_server = metrics_listener.map(|listener| {
        tracing::info!(address = ?listener.local_addr().ok(), "metrics at /metrics");
        let shared = Arc::clone(&shared);
        let routes = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = shared.metrics.encode();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, routes).await })
    });
    let tls = shared
        .config
        .tls_cert
        .clone()
        .zip(shared.config.tls_key.clone());
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = &tls {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|err| {
                std::io::Error::new(err.kind(), format!("cannot read {}: {err}", path.display()))
            })
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        server = server.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    let stop = CancellationToken::new();
    // However `run` ends, the acceptor and the mux workers stop with it.
    let _stop_on_return = stop.clone().drop_guard();
    let (grpc, incoming) = tokio::sync::mpsc::unbounded_channel();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = Arc::new(mux::Workers::start(threads, &shared, &stop)?);
    let acceptor = tokio::spawn(accept(
        listener,
        Arc::clone(&shared),
        grpc,
        Arc::clone(&workers),
        stop.clone(),
    ));
    let locks = LocksServer::new(Service { shared })
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    server
        .add_service(InterceptedService::new(locks, auth))
        .serve_with_incoming_shutdown(UnboundedReceiverStream::new(incoming), async {
            shutdown.await;
            stop.cancel();
        })
        .await?;
    stop.cancel();
    let _ = acceptor.await;
    workers.finish().await;
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    Ok(())
}
