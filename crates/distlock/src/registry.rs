//! The URL registry: which store a URL scheme opens. Adding a store is one
//! entry in [`stores`], one row in the table of [`connect`], and one arm in
//! [`open`] (or, for a URL of several hosts that [`Url`] cannot parse, one
//! prefix test in [`connect`]).

use std::sync::Arc;

use distlock_core::{Capabilities, Client, Error, Fencing, LockStore, Result, SessionModel};
use url::Url;

/// Where the CLI looks when given no URL: a distlock server on this host.
pub const DEFAULT_URL: &str = "distlock://127.0.0.1:7890";

/// A store this build can open.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreInfo {
    /// The URL scheme.
    pub scheme: &'static str,
    /// A URL to show people.
    pub example: &'static str,
    /// What the store supports.
    pub capabilities: Capabilities,
}

/// Every store compiled into this build, in the order of the table of
/// [`connect`]: once per mode (PostgreSQL and MySQL have two), under its
/// main scheme (`distlocks`, `rediss` and `postgresql` open the same stores
/// as `distlock`, `redis` and `postgres`).
#[allow(
    clippy::vec_init_then_push,
    reason = "each store is pushed under its own Cargo feature"
)]
pub fn stores() -> Vec<StoreInfo> {
    let mut stores = Vec::new();
    #[cfg(feature = "distlock")]
    stores.push(StoreInfo {
        scheme: "distlock",
        example: "distlock://127.0.0.1:7890",
        capabilities: distlock_client::RemoteStore::capabilities(),
    });
    #[cfg(feature = "memory")]
    stores.push(StoreInfo {
        scheme: "memory",
        example: "memory://NAME",
        capabilities: distlock_core::MemoryStore::capabilities(),
    });
    #[cfg(feature = "file")]
    stores.push(StoreInfo {
        scheme: "file",
        example: "file:///var/lock/distlock",
        capabilities: distlock_core::FileStore::capabilities(),
    });
    #[cfg(feature = "redis")]
    stores.push(StoreInfo {
        scheme: "redis",
        example: "redis://127.0.0.1:6379",
        capabilities: distlock_redis::RedisStore::capabilities(),
    });
    #[cfg(feature = "redis")]
    stores.push(StoreInfo {
        scheme: "redlock",
        example: "redlock://h1:6379,h2:6379,h3:6379",
        capabilities: distlock_redis::RedisStore::redlock_capabilities(),
    });
    #[cfg(feature = "postgres")]
    stores.push(StoreInfo {
        scheme: "postgres",
        example: "postgres://USER:PASSWORD@HOST/DB",
        capabilities: distlock_postgres::PostgresStore::capabilities(),
    });
    #[cfg(feature = "postgres")]
    stores.push(StoreInfo {
        scheme: "postgres",
        example: "postgres://USER:PASSWORD@HOST/DB?mode=lease",
        capabilities: distlock_postgres::PostgresStore::lease_capabilities(),
    });
    #[cfg(feature = "mysql")]
    stores.push(StoreInfo {
        scheme: "mysql",
        example: "mysql://USER:PASSWORD@HOST/DB",
        capabilities: distlock_mysql::MysqlStore::capabilities(),
    });
    #[cfg(feature = "mysql")]
    stores.push(StoreInfo {
        scheme: "mysql",
        example: "mysql://USER:PASSWORD@HOST/DB?mode=lease",
        capabilities: distlock_mysql::MysqlStore::lease_capabilities(),
    });
    #[cfg(feature = "etcd")]
    stores.push(StoreInfo {
        scheme: "etcd",
        example: "etcd://h1:2379,h2:2379,h3:2379",
        capabilities: distlock_etcd::EtcdStore::capabilities(),
    });
    #[cfg(feature = "zookeeper")]
    stores.push(StoreInfo {
        scheme: "zk",
        example: "zk://h1:2181,h2:2181,h3:2181/chroot",
        capabilities: distlock_zookeeper::ZkStore::capabilities(),
    });
    #[cfg(feature = "nats")]
    stores.push(StoreInfo {
        scheme: "nats",
        example: "nats://h1:4222,h2:4222",
        capabilities: distlock_nats::NatsStore::capabilities(),
    });
    stores
}

/// Opens the store a URL names and returns a client for it.
///
/// Each store needs its Cargo feature; all are on by default except `etcd`
/// (building the etcd client needs `protoc`). [`stores`] lists those of
/// this build.
///
/// | URL | store |
/// |---|---|
/// | `distlock://[:SECRET@]HOST[:PORT]` | the distlock server (`distlock serve`), port 7890 by default |
/// | `distlocks://…[?ca=/path/ca.pem]` | the same over TLS |
/// | `memory://` or `memory://NAME` | in-process; the same NAME is the same store |
/// | `file:///absolute/dir` | lock files in a directory, across processes of one host |
/// | `redis://[:PASSWORD@]HOST[:PORT][/DB]`, `rediss://…` | one Redis server (TLS with `rediss`) |
/// | `redlock://H1:P1,H2:P2,H3:P3[,…]` | Redlock on three or more independent Redis servers |
/// | `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?mode=lease]`, `postgresql://…` | PostgreSQL advisory locks, or a lease table |
/// | `mysql://USER[:PASSWORD]@HOST[:PORT]/DB[?mode=lease]` | MySQL/MariaDB named locks, or a lease table |
/// | `etcd://H1:P1[,H2:P2…]` | etcd (feature `etcd`): lease sessions, FIFO queues by revision |
/// | `zk://H1[:P1][,H2[:P2]…][/CHROOT]` | ZooKeeper: its sessions, FIFO queues of sequential nodes |
/// | `nats://H1:P1[,H2:P2…][?replicas=N]` | NATS JetStream: sessions as messages with a TTL, FIFO queues by stream sequence |
///
/// Errors with [`ErrorKind::Config`](crate::ErrorKind::Config) for a
/// malformed URL or a scheme this build does not have (the message lists
/// the ones it has), and with the store's own error if it cannot be reached
/// or used.
pub async fn connect(url: &str) -> Result<Client> {
    #[cfg(feature = "etcd")]
    if url.starts_with("etcd://") {
        return Ok(Client::new(Arc::new(
            distlock_etcd::EtcdStore::connect(url).await?,
        )));
    }
    #[cfg(feature = "zookeeper")]
    if url.starts_with("zk://") {
        return Ok(Client::new(Arc::new(
            distlock_zookeeper::ZkStore::connect(url).await?,
        )));
    }
    #[cfg(feature = "nats")]
    if url.starts_with("nats://") {
        return Ok(Client::new(Arc::new(
            distlock_nats::NatsStore::connect(url).await?,
        )));
    }
    // Several hosts in one authority are not a URL the parser takes.
    #[cfg(feature = "redis")]
    if url.starts_with("redlock://") {
        return Ok(Client::new(Arc::new(
            distlock_redis::RedisStore::connect(url).await?,
        )));
    }
    let parsed = Url::parse(url).map_err(|err| {
        Error::config(format!(
            "cannot parse store URL '{url}': {err}; expected e.g. {}",
            examples()
        ))
    })?;
    Ok(Client::new(open(url, &parsed).await?))
}

fn examples() -> String {
    stores()
        .iter()
        .map(|s| s.example)
        .collect::<Vec<_>>()
        .join(", ")
}

async fn open(url: &str, parsed: &Url) -> Result<Arc<dyn LockStore>> {
    match parsed.scheme() {
        #[cfg(feature = "distlock")]
        "distlock" | "distlocks" => Ok(Arc::new(
            distlock_client::RemoteStore::connect(parsed).await?,
        )),
        #[cfg(feature = "memory")]
        "memory" => {
            let name = parsed.host_str().unwrap_or_default();
            Ok(Arc::new(distlock_core::MemoryStore::named(name)))
        }
        #[cfg(feature = "file")]
        "file" => {
            if parsed.host_str().is_some_and(|host| !host.is_empty()) {
                return Err(Error::config(format!(
                    "file store URL '{url}' names a host; give an absolute directory with \
                     three slashes, e.g. file:///var/lock/distlock"
                )));
            }
            let dir = parsed
                .to_file_path()
                .map_err(|()| Error::config(format!("'{url}' is not a usable directory path")))?;
            Ok(Arc::new(distlock_core::FileStore::open(dir).await?))
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Arc::new(distlock_redis::RedisStore::connect(url).await?)),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(
            distlock_postgres::PostgresStore::connect(url).await?,
        )),
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => Ok(Arc::new(distlock_mysql::MysqlStore::connect(url).await?)),
        scheme => {
            let mut known: Vec<String> = stores()
                .iter()
                .map(|s| format!("{}://", s.scheme))
                .collect();
            // A store may be listed once per mode.
            known.dedup();
            Err(Error::config(format!(
                "unknown store URL scheme '{scheme}://' in '{url}'; this build knows {} \
                 (other stores need their Cargo feature)",
                known.join(", ")
            )))
        }
    }
}

fn yes(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

/// The README's store table, made from the stores' capability declarations.
pub fn capability_table() -> String {
    let mut table = String::from(
        "| store | URL | session | fair (FIFO) | shared | semaphore | wake-up | fencing | lease expiry | lock-delay | status | who leads |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for store in stores() {
        let caps = &store.capabilities;
        let session = match caps.session {
            SessionModel::Lease => "lease",
            SessionModel::Connection => "connection",
            SessionModel::Process => "process",
            _ => "other",
        };
        let fencing = match caps.fencing {
            Fencing::Durable => "durable",
            Fencing::InProcess => "until restart",
            _ => "other",
        };
        let wakeup = if caps.push_wakeup { "push" } else { "poll" };
        let status = match (caps.status, caps.keeps_owner) {
            (true, true) => "with owners",
            (true, false) => "yes",
            (false, _) => "no",
        };
        table.push_str(&format!(
            "| {} | `{}` | {session} | {} | {} | {} | {wakeup} | {fencing} | {} | {} | {status} | {} |\n",
            caps.name,
            store.example,
            yes(caps.fair),
            yes(caps.shared),
            yes(caps.semaphore),
            yes(caps.lease_expiry),
            yes(caps.lock_delay),
            yes(caps.tells_leader),
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use distlock_core::ErrorKind;

    async fn error_of(url: &str) -> Error {
        connect(url).await.expect_err("must be refused")
    }

    #[tokio::test]
    async fn unknown_scheme_lists_the_known_ones() {
        let err = error_of("mongo://localhost").await;
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.to_string()
                .contains("unknown store URL scheme 'mongo://'"),
            "{err}"
        );
        assert!(err.to_string().contains("memory://"), "{err}");
    }

    #[tokio::test]
    async fn malformed_url_says_what_is_expected() {
        let err = error_of("not a url").await;
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.to_string()
                .contains("cannot parse store URL 'not a url'"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn file_url_with_a_host_is_refused() {
        let err = error_of("file://relative/dir").await;
        assert!(err.to_string().contains("three slashes"), "{err}");
    }

    #[tokio::test]
    async fn memory_urls_with_one_name_share_a_store() {
        let a = connect("memory://registry-test").await.expect("connect");
        let b = connect("memory://registry-test").await.expect("connect");
        let (sa, sb) = (
            a.session().open().await.expect("open"),
            b.session().open().await.expect("open"),
        );
        let _held = sa.lock("k").try_lock().await.expect("try").expect("free");
        assert!(sb.lock("k").try_lock().await.expect("try").is_none());
    }

    #[test]
    fn readme_table_is_the_capability_table() {
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains(&capability_table()),
            "README.md's store table is out of date; replace it with the output of \
             `distlock stores`:\n{}",
            capability_table()
        );
    }
}
