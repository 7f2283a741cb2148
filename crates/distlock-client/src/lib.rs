//! The `distlock://` store: a client of the distlock server.
//!
//! `distlock://[:SECRET@]HOST[:PORT]` (port 7890 by default), or
//! `distlocks://…[?ca=/path/ca.pem]` for a server that speaks TLS (its
//! certificate checked against that CA, else the system's roots). Each session
//! is one stream to the server carrying its requests, replies, keep-alives
//! and the grants the server pushes to it; a waiting acquire costs nothing
//! until the grant comes. With `distlock://` the sessions of a store share
//! one TCP connection (the mux transport; `?transport=grpc` gives each its
//! own gRPC stream instead); `distlocks://` uses gRPC.
//!
//! What it guarantees is the server's: FIFO queues per key, writer-preferring
//! shared locks, semaphores, lock-delay, and fencing tokens that never go
//! backwards, not across a restart of the server. A session survives a
//! broken connection: it is taken back on a new one within its lease. What
//! it does not do: a session does not survive a restart of the server (its
//! guards report `lost()` when its lease runs out; open a new session).

mod mux;
mod resume;
mod session;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::status::{HolderStatus, Status, StatusQuery};
use distlock_core::store::{
    root_cause, Capabilities, Fencing, KeyWatch, KeyWatcher, LockStore, SessionOptions,
    StoreSession,
};
use distlock_core::{Error, Result};
use distlock_proto::kinds::kind_of_status;
use distlock_proto::v1 as proto;
use proto::locks_client::LocksClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use url::Url;

pub use distlock_proto::DEFAULT_PORT;

/// How long connecting may take before the server counts as unreachable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one distlock server.
#[derive(Clone)]
pub struct RemoteStore {
    target: String,
    client: LocksClient<Channel>,
    auth: Option<MetadataValue<Ascii>>,
    transport: Transport,
}

/// How sessions reach the server.
#[derive(Clone)]
pub(crate) enum Transport {
    /// A gRPC stream each.
    Grpc,
    /// All on one multiplexed connection.
    Mux(Arc<mux::Connections>),
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("target", &self.target)
            .field("auth", &self.auth.as_ref().map(|_| "<hidden>"))
            .field(
                "transport",
                &match self.transport {
                    Transport::Grpc => "grpc",
                    Transport::Mux(_) => "mux",
                },
            )
            .finish()
    }
}

impl RemoteStore {
    /// Connects to the server a `distlock://` URL names.
    pub async fn connect(url: &Url) -> Result<Self> {
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| {
                Error::config(format!(
                    "'{url}' names no server; write distlock://HOST[:PORT]"
                ))
            })?;
        let port = url.port().unwrap_or(DEFAULT_PORT);
        let target = format!("{host}:{port}");
        // The URL keeps the secret percent-encoded; the server wants it as
        // it is.
        let secret = match url.password() {
            Some(encoded) => Some(
                percent_encoding::percent_decode_str(encoded)
                    .decode_utf8()
                    .map_err(|_| {
                        Error::config(
                            "the secret in the URL is not UTF-8 once decoded; write it \
                             percent-encoded UTF-8"
                                .to_owned(),
                        )
                    })?
                    .into_owned(),
            ),
            None => None,
        };
        let auth = match &secret {
            Some(secret) => Some(format!("Bearer {secret}").parse().map_err(|_| {
                Error::config("the secret in the URL has characters that cannot be sent".to_owned())
            })?),
            None => None,
        };
        let tls = url.scheme() == "distlocks";
        let http = if tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{http}://{target}"))
            .map_err(|err| Error::config(format!("'{url}' is not a usable server address: {err}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A server that stops answering is found out even between
            // requests, so no call waits on a dead connection for long.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        if tls {
            endpoint = endpoint
                .tls_config(tls_config(url, host)?)
                .map_err(|err| Error::config(format!("cannot set up TLS for '{url}': {err}")))?;
        }
        let mux = match url.query_pairs().find(|(name, _)| name == "transport") {
            None => !tls,
            Some((_, transport)) if transport == "grpc" => false,
            Some((_, transport)) if transport == "mux" && !tls => true,
            Some((_, transport)) => {
                return Err(Error::config(format!(
                    "'{url}' asks for transport '{transport}'; distlock:// takes ?transport=mux \
                     (the default) or ?transport=grpc, and distlocks:// speaks only gRPC"
                )))
            }
        };
        // With the mux transport, gRPC carries only `status` and `check`.
        let channel = if mux {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.map_err(|err| {
                Error::unavailable(format!(
                    "cannot reach the distlock server at {target} ({}); start one with \
                     `distlock serve`",
                    root_cause(&err)
                ))
                .with_source(err)
            })?
        };
        let transport = if mux {
            Transport::Mux(Arc::new(
                mux::Connections::connect(target.clone(), secret).await?,
            ))
        } else {
            Transport::Grpc
        };
        Ok(RemoteStore {
            target,
            client: LocksClient::new(channel),
            auth,
            transport,
        })
    }

    /// What the distlock server supports: everything but sessions that
    /// outlive a restart of the server.
    pub fn capabilities() -> Capabilities {
        distlock_core::table::capabilities("distlock", Fencing::Durable)
    }

    /// `host:port` of the server.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    /// Whether `token` is the token of a current holder of `key`.
    pub async fn check(&self, key: &str, token: u64) -> Result<bool> {
        let message = proto::CheckRequest {
            key: key.to_owned(),
            token,
        };
        let reply = self.client.clone().check(self.request(message)).await;
        Ok(reply
            .map_err(|status| from_status(&self.target, status))?
            .into_inner()
            .current)
    }
}

/// TLS to `host`, trusting the CA file of the URL's `ca` parameter, or the
/// system's roots.
fn tls_config(url: &Url, host: &str) -> Result<ClientTlsConfig> {
    let config = ClientTlsConfig::new().domain_name(host);
    match url.query_pairs().find(|(name, _)| name == "ca") {
        Some((_, path)) => {
            let pem = std::fs::read(&*path).map_err(|err| {
                Error::config(format!(
                    "cannot read the CA certificate {path} named in the URL: {err}"
                ))
            })?;
            Ok(config.ca_certificate(Certificate::from_pem(pem)))
        }
        None => Ok(config.with_native_roots()),
    }
}

/// A gRPC status from the server as a distlock error, the status its
/// source.
pub(crate) fn from_status(target: &str, status: tonic::Status) -> Error {
    Error::new(
        kind_of_status(status.code()),
        format!("distlock server at {target}: {}", status.message()),
    )
    .with_source(status)
}

#[async_trait]
impl LockStore for RemoteStore {
    fn capabilities(&self) -> Capabilities {
        RemoteStore::capabilities()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        Ok(Box::new(session::RemoteSession::open(self, options).await?))
    }

    /// Holders and waiters as the server's lock table has them, and the
    /// server's counters.
    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        let message = match query {
            StatusQuery::Key(key) => proto::StatusRequest {
                key: key.clone(),
                prefix: String::new(),
            },
            StatusQuery::Prefix(prefix) => proto::StatusRequest {
                key: String::new(),
                prefix: prefix.clone(),
            },
        };
        let reply = self.client.clone().status(self.request(message)).await;
        let reply = reply
            .map_err(|status| from_status(&self.target, status))?
            .into_inner();
        Ok(distlock_proto::convert::status_of(reply))
    }

    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        let message = proto::WatchRequest {
            key: key.to_owned(),
        };
        let mut events = match self.client.clone().watch(self.request(message)).await {
            Ok(events) => events.into_inner(),
            // A server from before Watch: observers poll.
            Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(None),
            Err(status) => return Err(from_status(&self.target, status)),
        };
        let (watcher, watch) = KeyWatcher::new();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.message() => match event {
                        Ok(Some(_)) if watcher.signal() => {}
                        // Gone reader, ended or broken stream: the watch
                        // ends, and the observer polls.
                        _ => return,
                    },
                    () = watcher.closed() => return,
                }
            }
        });
        Ok(Some(watch))
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        let message = proto::ForceReleaseRequest {
            key: key.to_owned(),
            requested_by: requested_by.to_owned(),
        };
        let reply = self
            .client
            .clone()
            .force_release(self.request(message))
            .await;
        let reply = reply
            .map_err(|status| match status.code() {
                tonic::Code::Unimplemented => Error::unsupported(format!(
                    "the distlock server at {} is older than this client and cannot force a \
                     release; upgrade it",
                    self.target
                )),
                _ => from_status(&self.target, status),
            })?
            .into_inner();
        Ok(reply
            .released
            .into_iter()
            .map(distlock_proto::convert::holder_status)
            .collect())
    }
}
