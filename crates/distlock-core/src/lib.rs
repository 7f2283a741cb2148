//! The core of distlock: the lock API, the store trait every store
//! implements, and the memory and file stores. The conformance suite every
//! store must pass is the `distlock-testkit` crate.
//!
//! Users depend on the `distlock` crate, which adds `connect(url)`; store
//! authors depend on this one.
//!
//! ```
//! # async fn demo() -> distlock_core::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use distlock_core::{Client, MemoryStore};
//!
//! let client = Client::new(Arc::new(MemoryStore::new()));
//! let session = client.session().ttl(Duration::from_secs(15)).open().await?;
//! let guard = session.lock("coupons/batch-7").wait(Duration::from_secs(5)).await?;
//! assert_eq!(guard.token(), 1); // fencing token: write it with every change
//! guard.release().await?;
//! # Ok(())
//! # }
//! ```

mod backoff;
mod client;
mod error;
mod file;
mod key;
mod memory;
mod session;
pub mod status;
pub mod store;
pub mod table;

pub use client::{Client, SessionBuilder, DEFAULT_LOCK_DELAY, DEFAULT_TTL, MAX_TTL, MIN_TTL};
pub use error::{Error, ErrorKind, Result};
pub use file::FileStore;
pub use key::{key_hash, validate_key, MAX_KEY_BYTES};
pub use memory::MemoryStore;
pub use session::Guard;
pub use session::LockRequest;
pub use session::Session;
pub use session::{Campaign, Leader, Leadership, Observer, DEFAULT_OBSERVE_EVERY};
pub use session::{KeyMode, MultiGuard, MultiLockRequest, DEFAULT_MAX_KEYS};
pub use store::{Capabilities, Fencing, LockStore, Mode, SessionModel};
