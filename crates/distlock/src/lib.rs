//! distlock: distributed locks with fencing tokens, over many stores.
//!
//! One API whatever the store; the URL picks it:
//!
//! ```
//! # async fn demo() -> distlock::Result<()> {
//! use std::time::Duration;
//!
//! let client = distlock::connect("memory://").await?;
//! let session = client.session().ttl(Duration::from_secs(15)).open().await?;
//! let guard = session.lock("coupons/batch-7").wait(Duration::from_secs(5)).await?;
//! let token = guard.token(); // write it with every change the lock protects
//! tokio::select! {
//!     _ = tokio::time::sleep(Duration::from_millis(10)) => {} // the work
//!     _ = guard.lost() => panic!("lock lost"), // fires before anyone else can get it
//! }
//! guard.release().await?;
//! # let _ = token;
//! # Ok(())
//! # }
//! ```
//!
//! See [`connect`] for the URLs. A store of your own implements the
//! traits in [`raw`], and [`Client::new`] takes it.

pub mod fence;
mod registry;

/// Who holds and who waits, as [`Client::status`] reports it.
pub use distlock_core::status;
pub use distlock_core::{
    validate_key, Campaign, Capabilities, Client, Error, ErrorKind, Fencing, Guard, KeyMode,
    Leader, Leadership, LockRequest, Mode, MultiGuard, MultiLockRequest, Observer, Result, Session,
    SessionBuilder, SessionModel, DEFAULT_LOCK_DELAY, DEFAULT_MAX_KEYS, DEFAULT_OBSERVE_EVERY,
    DEFAULT_TTL, MAX_KEY_BYTES, MAX_TTL, MIN_TTL,
};
pub use registry::{capability_table, connect, stores, StoreInfo, DEFAULT_URL};

/// The `distlock://` store, for what only the server answers: `check`.
#[cfg(feature = "distlock")]
pub use distlock_client::RemoteStore;

/// For store authors and for code that builds a store itself: the traits a
/// store implements and the helpers stores share, and the stores' own
/// types (which [`connect`] builds from a URL).
pub mod raw {
    pub use distlock_core::store::*;
    pub use distlock_core::{FileStore, MemoryStore};
    #[cfg(feature = "etcd")]
    pub use distlock_etcd::EtcdStore;
    #[cfg(feature = "mysql")]
    pub use distlock_mysql::MysqlStore;
    #[cfg(feature = "nats")]
    pub use distlock_nats::NatsStore;
    #[cfg(feature = "postgres")]
    pub use distlock_postgres::PostgresStore;
    #[cfg(feature = "redis")]
    pub use distlock_redis::RedisStore;
    #[cfg(feature = "zookeeper")]
    pub use distlock_zookeeper::ZkStore;
}
