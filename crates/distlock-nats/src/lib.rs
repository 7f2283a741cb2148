//! The NATS JetStream store: `nats://HOST:PORT[,HOST:PORT…][?replicas=N]`.
//!
//! Everything lives in one stream, `DISTLOCK` (subjects `distlock.>`, one
//! message per subject, file storage, per-message TTLs and delete markers),
//! which the store creates if it is missing, with `?replicas=N` copies (3
//! by default when the server is in a cluster, else 1):
//!
//! - A session is the subject `distlock.s.SESSION`, whose one message has a
//!   TTL of the session's lease (whole seconds, rounded up). A renewal
//!   publishes it again, expecting the sequence it last wrote: a session
//!   whose message expired (the server then leaves a delete marker) never
//!   comes back. A session is alive while its subject's last message is
//!   its own, not a marker.
//! - A lock's queue is the subjects `distlock.q.HASH.SESSION.N` (HASH: 128
//!   bits of SHA-256 of the key; the key itself is the payload, the mode
//!   and owner are headers). Each attempt publishes a new one; its stream
//!   sequence is its place in the queue and its fencing token, strictly
//!   greater than every earlier grant's. The holders are the first live
//!   entries, by the core's queue decision (`distlock_core::store::queue`):
//!   FIFO; exclusive, writer-preferring shared, and semaphore modes.
//! - An entry leaves its queue by deleting its message by sequence (so only
//!   that life of it), after which a notice `distlock.g.HASH.SESSION.N`
//!   names the deleted sequence. A waiter watches, through an ephemeral
//!   consumer, the notice of what blocks it and that entry's session
//!   subject: it wakes when the blocker leaves or its session ends, and
//!   deletes the entries of an ended session it finds ahead of it.
//! - `status` reads the queues and the sessions of their entries.
//! - `force_release` deletes the entries that hold the key; their waiters
//!   wake as on a release, and the next token is a later sequence.
//!
//! `lost()` fires when a renewal finds the session's message gone, or a
//! held entry deleted. Each session watches the notices of its own entries,
//! so an entry deleted by someone else asks for that renewal at once. Not
//! given: lock-delay.
//!
//! See `docs/0010-nats.md` for the reasoning.

mod client;
mod force;
mod session;
mod status;
mod wire;

use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use distlock_core::status::{HolderStatus, Status, StatusQuery};
use distlock_core::store::{
    root_cause, Capabilities, KeyWatch, KeyWatcher, LockStore, SessionOptions, StoreSession,
};
use distlock_core::{Error, Result};

use client::Nats;

/// How long after a change a key's watchers are told once more (see
/// `watch_key`).
const FOLLOW_UP: Duration = Duration::from_millis(100);

/// How long connecting, and each call, may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "write nats://HOST:PORT[,HOST:PORT…][?replicas=N]";

/// A store on one NATS server or cluster with JetStream.
#[derive(Clone)]
pub struct NatsStore {
    nats: std::sync::Arc<Nats>,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The servers without credentials.
        f.debug_struct("NatsStore")
            .field("servers", &self.nats.servers)
            .finish()
    }
}

/// What a `nats://` URL says.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// Each server as async-nats takes it, credentials included.
    addresses: Vec<String>,
    /// The servers as messages show them: no credentials.
    shown: String,
    /// How many copies of the stream a cluster keeps (`?replicas=N`), if
    /// given: an existing stream must then have as many. Unsaid, a new
    /// stream gets 3 in a cluster, 1 on a lone server.
    replicas: Option<usize>,
}

fn parse_url(url: &str) -> Result<Target> {
    let Some(rest) = url.strip_prefix("nats://") else {
        return Err(Error::config(format!("'{url}' is not a NATS URL; {USAGE}")));
    };
    let (hosts, query) = match rest.split_once('?') {
        Some((hosts, query)) => (hosts, query),
        None => (rest, ""),
    };
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    let mut addresses = Vec::new();
    let mut shown = Vec::new();
    for host in hosts.split(',') {
        let bare = host.rsplit_once('@').map_or(host, |(_, bare)| bare);
        let Some((name, port)) = bare.rsplit_once(':') else {
            return Err(Error::config(format!(
                "'{bare}' in '{url}' has no port; {USAGE}"
            )));
        };
        if name.is_empty() || name.contains('/') || port.parse::<u16>().is_err() {
            return Err(Error::config(format!(
                "'{bare}' in '{url}' is not HOST:PORT; {USAGE}"
            )));
        }
        addresses.push(format!("nats://{host}"));
        shown.push(bare.to_owned());
    }
    let mut replicas = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("replicas", count)) => {
                let count = count
                    .parse::<usize>()
                    .ok()
                    .filter(|count| (1..=5).contains(count))
                    .ok_or_else(|| {
                        Error::config(format!(
                            "replicas={count} in '{url}': JetStream keeps 1 to 5 copies"
                        ))
                    })?;
                replicas = Some(count);
            }
            _ => {
                return Err(Error::config(format!(
                    "'{pair}' in '{url}' is not a parameter the NATS store knows; {USAGE}"
                )))
            }
        }
    }
    Ok(Target {
        addresses,
        shown: shown.join(","),
        replicas,
    })
}

impl NatsStore {
    /// Connects to the servers a `nats://` URL names (any one that answers
    /// will do) and makes sure the store's stream is there.
    pub async fn connect(url: &str) -> Result<Self> {
        let target = parse_url(url)?;
        let mut addresses = Vec::with_capacity(target.addresses.len());
        for address in &target.addresses {
            let parsed = address.parse::<async_nats::ServerAddr>().map_err(|err| {
                Error::config(format!("'{}' in '{url}': {err}; {USAGE}", target.shown))
                    .with_source(err)
            })?;
            addresses.push(parsed);
        }
        // Counts lost connections: a call under way then loses its answer,
        // and a server that restarted loses the waits' consumers, which are
        // made again at once rather than after a slice.
        let disconnects = std::sync::Arc::new(tokio::sync::watch::Sender::new(0u64));
        let counter = std::sync::Arc::clone(&disconnects);
        let options = async_nats::ConnectOptions::new()
            .name("distlock")
            .connection_timeout(CALL_TIMEOUT)
            .request_timeout(Some(CALL_TIMEOUT))
            .event_callback(move |event| {
                let counter = std::sync::Arc::clone(&counter);
                async move {
                    if matches!(event, async_nats::Event::Disconnected) {
                        counter.send_modify(|count| *count += 1);
                    }
                }
            });
        let shown = target.shown.clone();
        let client = tokio::time::timeout(
            CALL_TIMEOUT * 2,
            async_nats::connect_with_options(addresses, options),
        )
        .await
        .map_err(|_| {
            Error::unavailable(format!(
                "NATS at {shown} did not answer in {:?}; is it running?",
                CALL_TIMEOUT * 2
            ))
        })?
        .map_err(|err| {
            Error::unavailable(format!(
                "cannot reach NATS at {shown} ({}); is it running?",
                root_cause(&err)
            ))
            .with_source(err)
        })?;
        check_version(&shown, &client.server_info().version)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(CALL_TIMEOUT);
        let clustered = client.server_info().cluster.is_some();
        let stream = wire::open_stream(&js, &shown, target.replicas, clustered).await?;
        Ok(NatsStore {
            nats: std::sync::Arc::new(Nats::new(client, js, stream, shown, disconnects)),
        })
    }

    /// What NATS gives: what every store with a queue per key does,
    /// `status` with each entry's owner, and forced release. Fencing is
    /// not claimed durable: with JetStream's default `sync_interval` (2
    /// min) a machine crash of a single server can lose the last writes,
    /// and the server then uses their sequences (tokens) again. The store
    /// cannot see that setting through the client (see
    /// `docs/0010-nats.md`).
    pub fn capabilities() -> Capabilities {
        let mut caps = distlock_core::store::queue::capabilities("nats");
        caps.fencing = distlock_core::store::Fencing::InProcess;
        caps.status = true;
        caps.keeps_owner = true;
        caps.tells_leader = true;
        caps.watches_keys = true;
        caps.force_release = true;
        caps
    }
}

/// Refuses a server older than 2.11: per-message TTLs and delete markers,
/// which sessions are made of, came in 2.11.
fn check_version(shown: &str, version: &str) -> Result<()> {
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    let (major, minor) = (parts.next().flatten(), parts.next().flatten());
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= (2, 11) => Ok(()),
        _ => Err(Error::config(format!(
            "NATS at {shown} is nats-server {version}; the NATS store needs 2.11 or newer \
             (per-message TTLs and delete markers)"
        ))),
    }
}

#[async_trait]
impl LockStore for NatsStore {
    fn capabilities(&self) -> Capabilities {
        NatsStore::capabilities()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        Ok(Box::new(
            session::NatsSession::open(std::sync::Arc::clone(&self.nats), options).await?,
        ))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        status::read_status(&self.nats, query).await
    }

    /// A subscription to the lock's entries and their notices
    /// (`distlock.*.HASH.>`): every join and every deletion (a release, a
    /// forced release, an ended session's entry taken out) is a signal. A
    /// closed subscription ends the signals; the observer then polls.
    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        let subject = format!("distlock.*.{}.>", wire::lock_hash(key));
        let mut messages = self
            .nats
            .client
            .subscribe(subject)
            .await
            .map_err(|err| self.nats.failed("a subscribe", err))?;
        // The interest reaches the server before the reader's first read.
        self.nats
            .client
            .flush()
            .await
            .map_err(|err| self.nats.failed("a flush", err))?;
        let (signals, watch) = KeyWatcher::new();
        tokio::spawn(async move {
            // A subscriber can hear a publish before the stream has stored
            // it: a reader that looks at once may not see it yet, so it is
            // told once more, a moment later.
            let mut again: Option<tokio::time::Instant> = None;
            loop {
                let follow_up = async {
                    match again {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    message = futures::StreamExt::next(&mut messages) => {
                        if message.is_none() || !signals.signal() {
                            return;
                        }
                        again = Some(tokio::time::Instant::now() + FOLLOW_UP);
                    }
                    () = follow_up => {
                        again = None;
                        if !signals.signal() {
                            return;
                        }
                    }
                    () = signals.closed() => return,
                }
            }
        });
        Ok(Some(watch))
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        let ended = force::end_holds(&self.nats, key).await?;
        tracing::warn!(key, requested_by, ended = ended.len(), "forced release");
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_servers_and_replicas() {
        let target = parse_url("nats://h1:4222,u:p@h2:4223/?replicas=3").expect("parse");
        assert_eq!(
            target,
            Target {
                addresses: vec!["nats://h1:4222".into(), "nats://u:p@h2:4223".into()],
                shown: "h1:4222,h2:4223".into(),
                replicas: Some(3),
            }
        );
        assert_eq!(parse_url("nats://h:1").expect("parse").replicas, None);
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        for bad in [
            "etcd://h:1",
            "nats://h",
            "nats://:4222",
            "nats://h:x",
            "nats://h:1,",
            "nats://h:1?replicas=0",
            "nats://h:1?replicas=9",
            "nats://h:1?stream=x",
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert_eq!(err.kind(), distlock_core::ErrorKind::Config, "{bad}");
        }
        let err = parse_url("nats://h").expect_err("no port");
        assert!(err.to_string().contains("nats://HOST:PORT"), "{err}");
    }

    #[test]
    fn servers_older_than_2_11_are_refused() {
        assert!(check_version("h:1", "2.11.0").is_ok());
        assert!(check_version("h:1", "2.15.1").is_ok());
        assert!(check_version("h:1", "3.0.0").is_ok());
        let err = check_version("h:1", "2.9.25").expect_err("too old");
        assert!(err.to_string().contains("2.11 or newer"), "{err}");
    }
}
