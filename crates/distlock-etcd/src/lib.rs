//! The etcd store: `etcd://HOST:PORT[,HOST:PORT…]`.
//!
//! - A session is an etcd lease, renewed by the core; when it ends, etcd
//!   deletes every key of the session.
//! - A lock is a queue of keys `distlock/NAME/LEASE-SLOT`, in order of
//!   create revision: FIFO. Exclusive, shared (readers wait only for
//!   earlier writers) and semaphore (N permits admit the N lowest) modes.
//! - The fencing token is the key's create revision, which only grows,
//!   across holders, modes and restarts of etcd.
//! - A waiter watches the key that blocks it (and, just behind it, the
//!   range from it to its own key), never a key after its own: no herd
//!   wakes, nobody polls. It is told it holds the lock only once a read, or a watch
//!   started before a read, shows its own key first and still there, so a
//!   waiter whose lease ran out while queued never is.
//! - Every check and clean-up delete names a key and its create revision;
//!   a release deletes its key by name, and a session never puts again a
//!   key whose release went unanswered. So nothing touches another
//!   session's key, or a later life of its own. An attempt that ends
//!   without the lock deletes its key (in the background if it was
//!   dropped); the lease takes it in any case.
//!
//! - Each queue key's value is its mode and its session's owner, written by
//!   the put that joins the queue. `status` reads the queues in one range
//!   read and splits them with the same decision: holders (token, lease
//!   left), then waiters in queue order; etcd keeps no time with a key, so
//!   how long each has held or waited is not known.
//!
//! - `force_release` deletes the entries that hold the key, in a
//!   transaction that also proves them still the holders; waiters wake as
//!   on a release, and the next token (a later create revision) is higher.
//!
//! `lost()` fires when a renewal finds the lease gone or a held key deleted.
//! Each session watches its held keys on one stream of its own, so a key
//! deleted by someone else (a forced release) asks for that renewal at once.
//! Not given: lock-delay.
//!
//! See `docs/0005-etcd.md` for the reasoning.

mod entry;
mod force;
mod session;
mod status;

use std::time::Duration;

use async_trait::async_trait;
use distlock_core::status::{HolderStatus, Status, StatusQuery};
use distlock_core::store::{
    Capabilities, KeyWatch, KeyWatcher, LockStore, SessionOptions, StoreSession,
};
use distlock_core::{Error, Result};
use etcd_client::{Client, ConnectOptions};

/// How long connecting, and each call, may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the store's keys start.
pub(crate) const PREFIX: &str = "distlock/";

/// A store on one etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

/// A failed call to etcd, with the client's error as its source.
pub(crate) fn etcd_error(endpoints: &str, err: etcd_client::Error) -> Error {
    unavailable(endpoints, &err).with_source(err)
}

pub(crate) fn unavailable(endpoints: &str, err: &dyn std::fmt::Display) -> Error {
    Error::unavailable(format!(
        "etcd at {endpoints}: {err}; check the endpoints and that etcd runs"
    ))
}

/// A call bounded in time, its error explained.
pub(crate) async fn call<T>(
    endpoints: &str,
    call: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| timed_out(endpoints))?
        .map_err(|err| etcd_error(endpoints, err))
}

/// A request sent by `send` (made again for each try), bounded in time,
/// its error explained. A request that never left, because its member
/// refused the connection, is sent again: the refusing member is taken out
/// of `client`'s balance for [`SHUNNED`], so the next try goes to another.
pub(crate) async fn request<T, F>(
    client: &Client,
    endpoints: &str,
    send: impl FnMut(Client) -> F,
) -> Result<T>
where
    F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    request_on(client, client, endpoints, send).await
}

/// [`request`] through `handle`, one of `client`'s service clients (its
/// `KvClient`, say): a copy of one costs a fraction of a copy of the whole
/// client, and the hot paths make one per call.
pub(crate) async fn request_on<H: Clone, T, F>(
    client: &Client,
    handle: &H,
    endpoints: &str,
    mut send: impl FnMut(H) -> F,
) -> Result<T>
where
    F: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    loop {
        let err = match tokio::time::timeout_at(deadline, send(handle.clone())).await {
            Err(_) => return Err(timed_out(endpoints)),
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(err)) => err,
        };
        // With one member there is nowhere else to go.
        let Some(member) = refused_member(&err).filter(|_| endpoints.contains(',')) else {
            return Err(etcd_error(endpoints, err));
        };
        // Named as the URL names it (an address a host name resolved to
        // would be added as a member of its own).
        if endpoints.split(',').any(|listed| listed == member) {
            shun(client, member);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long a member that refused a connection is left out of a client's
/// balance; then it is tried again.
const SHUNNED: Duration = Duration::from_secs(1);

/// `HOST:PORT` of the member that refused the connection a request failed
/// on: the request never left. tonic keeps the address only in the
/// error's debug text (`ConnectError("tcp connect error", ADDRESS, …)`).
fn refused_member(err: &etcd_client::Error) -> Option<String> {
    let text = format!("{err:?}");
    let marker = "ConnectError(\"tcp connect error\", ";
    let rest = &text[text.find(marker)? + marker.len()..];
    let address = &rest[..rest.find(',')?];
    address
        .parse::<std::net::SocketAddr>()
        .is_ok()
        .then(|| address.to_owned())
}

/// Leaves `member` out of `client`'s balance for [`SHUNNED`].
fn shun(client: &Client, member: String) {
    let client = client.clone();
    tokio::spawn(async move {
        let endpoint = format!("http://{member}");
        if client.remove_endpoint(&endpoint).await.is_ok() {
            tokio::time::sleep(SHUNNED).await;
            let _ = client.add_endpoint(&endpoint).await;
        }
    });
}

/// Whether `err` is one etcd gives while it elects a leader or while a
/// member is out of reach (no answer in time; gRPC `UNAVAILABLE`, which
/// carries "no leader" and "leader changed"; `DEADLINE_EXCEEDED`; a broken
/// transport, or a request cut in flight): worth asking again. A full
/// database, a refused permission or a bad request is not. Only reads and
/// watches are asked again on this ground.
pub(crate) fn passing(err: &Error) -> bool {
    if err.kind() != distlock_core::ErrorKind::Unavailable {
        return false;
    }
    let source = std::error::Error::source(err);
    match source.and_then(|source| source.downcast_ref::<etcd_client::Error>()) {
        // The store's own time limit.
        None => true,
        // tonic's codes: 4 DEADLINE_EXCEEDED, 14 UNAVAILABLE.
        Some(etcd_client::Error::GRpcStatus(status)) => {
            matches!(status.code() as i32, 4 | 14) || made_here(status)
        }
        Some(etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)) => true,
        Some(_) => false,
    }
}

/// Whether tonic made a status on this side, from an error of the
/// connection or of the request in flight ("transport error", `UNKNOWN`;
/// "connection closed", `CANCELLED`): such a status keeps that error as
/// its source, and one etcd sent has none.
fn made_here(status: &dyn std::error::Error) -> bool {
    status.source().is_some()
}

pub(crate) fn timed_out(endpoints: &str) -> Error {
    Error::unavailable(format!(
        "etcd at {endpoints} did not answer in {CALL_TIMEOUT:?}"
    ))
}

impl EtcdStore {
    /// Connects to the endpoints an `etcd://H1:P1[,H2:P2…]` URL names.
    pub async fn connect(url: &str) -> Result<Self> {
        let usage = "write etcd://HOST:PORT[,HOST:PORT…]";
        let Some(rest) = url.strip_prefix("etcd://") else {
            return Err(Error::config(format!(
                "'{url}' is not an etcd URL; {usage}"
            )));
        };
        let hosts = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let Some((name, port)) = host.rsplit_once(':') else {
                return Err(Error::config(format!(
                    "'{host}' in '{url}' has no port; {usage}"
                )));
            };
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(Error::config(format!(
                    "'{host}' in '{url}' is not HOST:PORT; {usage}"
                )));
            }
            endpoints.push(format!("http://{host}"));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // A member cut off from its cluster refuses, rather than serving
            // a silent watch.
            .with_require_leader(true);
        let shown = hosts.to_owned();
        let mut client =
            tokio::time::timeout(CALL_TIMEOUT, Client::connect(&endpoints, Some(options)))
                .await
                .map_err(|_| timed_out(&shown))?
                .map_err(|err| etcd_error(&shown, err))?;
        // A connection alone proves little: ask something.
        tokio::time::timeout(CALL_TIMEOUT, client.status())
            .await
            .map_err(|_| timed_out(&shown))?
            .map_err(|err| etcd_error(&shown, err))?;
        Ok(EtcdStore {
            client,
            endpoints: shown,
        })
    }

    /// What etcd gives: what every store with a queue per key does,
    /// `status` with each entry's owner, and forced release.
    pub fn capabilities() -> Capabilities {
        let mut caps = distlock_core::store::queue::capabilities("etcd");
        caps.status = true;
        caps.keeps_owner = true;
        caps.tells_leader = true;
        caps.force_release = true;
        caps.watches_keys = true;
        caps
    }
}

#[async_trait]
impl LockStore for EtcdStore {
    fn capabilities(&self) -> Capabilities {
        EtcdStore::capabilities()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        Ok(Box::new(
            session::EtcdSession::open(self.client.clone(), self.endpoints.clone(), options)
                .await?,
        ))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        self.read_status(query).await
    }

    /// A watch of the lock's prefix: every entry put or deleted (a join, a
    /// release, a lease's end) is a signal. A broken watch ends the
    /// signals; the observer then polls.
    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        let prefix = entry::lock_prefix(key);
        let options = etcd_client::WatchOptions::new().with_prefix();
        let mut client = self.client.clone();
        let mut stream = call(&self.endpoints, client.watch(prefix, Some(options))).await?;
        // Returned once etcd has made the watch (at its current revision),
        // so no change after the reader's first read goes unseen.
        let created = call(&self.endpoints, stream.message()).await?;
        if !created.is_some_and(|response| response.created() && !response.canceled()) {
            return Err(Error::unavailable(format!(
                "etcd at {} did not make a watch of lock '{key}'",
                self.endpoints
            )));
        }
        let (signals, watch) = KeyWatcher::new();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(response)) if !response.canceled() => {
                            if !response.events().is_empty() && !signals.signal() {
                                return;
                            }
                        }
                        _ => return,
                    },
                    () = signals.closed() => return,
                }
            }
        });
        Ok(Some(watch))
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        let ended = self.end_holds(key).await?;
        tracing::warn!(key, requested_by, ended = ended.len(), "forced release");
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::Error as Etcd;
    use tonic::Status;

    #[test]
    fn only_an_election_or_a_member_out_of_reach_is_worth_asking_again() {
        let unavailable = |source: Etcd| Error::unavailable("etcd").with_source(source);
        let worth = [
            (
                "the store's own time limit",
                Error::unavailable("no answer"),
            ),
            (
                "no leader",
                unavailable(Etcd::GRpcStatus(Status::unavailable(
                    "etcdserver: no leader",
                ))),
            ),
            (
                "deadline",
                unavailable(Etcd::GRpcStatus(Status::deadline_exceeded("timed out"))),
            ),
            (
                "a broken connection",
                unavailable(Etcd::IoError(std::io::Error::other("reset"))),
            ),
            (
                "a request cut in flight",
                unavailable(Etcd::GRpcStatus(Status::from_error(Box::new(
                    std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                )))),
            ),
        ];
        for (what, err) in worth {
            assert!(passing(&err), "{what}: {err}");
        }
        let not = [
            (
                "a full database",
                unavailable(Etcd::GRpcStatus(Status::resource_exhausted(
                    "etcdserver: mvcc: database space exceeded",
                ))),
            ),
            (
                "a bad request",
                unavailable(Etcd::InvalidArgs("key".into())),
            ),
            (
                "an unknown status of etcd's own",
                unavailable(Etcd::GRpcStatus(Status::unknown("etcdserver: something"))),
            ),
            (
                "a cancelled status of etcd's own",
                unavailable(Etcd::GRpcStatus(Status::cancelled("context canceled"))),
            ),
            (
                "another kind",
                Error::config("etcd").with_source(Etcd::IoError(std::io::Error::other("x"))),
            ),
        ];
        for (what, err) in not {
            assert!(!passing(&err), "{what}: {err}");
        }
    }
}
