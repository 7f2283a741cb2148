//! The lock request builder: `session.lock(key).wait(d).await`.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use super::guard::Guard;
use super::{Session, Wait};
use crate::error::Result;
use crate::store::Mode;

/// A request for a lock, made by [`Session::lock`], [`Session::read`],
/// [`Session::write`] or [`Session::semaphore`].
///
/// Await it to wait for the lock — with no [`wait`](LockRequest::wait) it
/// waits as long as it takes, with one it gives up with
/// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) — or call
/// [`try_lock`](LockRequest::try_lock) not to wait at all.
///
/// # Cancel safety
///
/// Dropping the future before it completes leaves no trace: the session
/// does not hold the key and no waiter of it stays queued at the store. A
/// grant that raced with the drop is given back.
#[derive(Debug)]
#[must_use = "a lock request does nothing until it is awaited or try_lock()ed"]
pub struct LockRequest {
    session: Session,
    key: String,
    mode: Mode,
    wait: Option<Duration>,
}

impl LockRequest {
    pub(crate) fn new(session: Session, key: String, mode: Mode) -> Self {
        LockRequest {
            session,
            key,
            mode,
            wait: None,
        }
    }

    /// Waits at most `wait` for the lock, then fails with `Timeout`.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Takes the lock if it is free now; `Ok(None)` if another session
    /// holds it. Errors only for bad input, a lost or closed session, or a
    /// store that cannot be reached.
    ///
    /// A non-blocking attempt also answers `None` while another task of the
    /// same session is acquiring or releasing the same key.
    pub async fn try_lock(self) -> Result<Option<Guard>> {
        let inner = self.session.inner;
        inner.acquire(self.key, self.mode, Wait::TryOnce).await
    }

    async fn acquire(self) -> Result<Guard> {
        let wait = match self.wait {
            Some(wait) => Wait::Until(Instant::now() + wait),
            None => Wait::Forever,
        };
        let inner = self.session.inner;
        let guard = inner.acquire(self.key, self.mode, wait).await?;
        Ok(guard.expect("a waiting acquire ends with a guard or an error"))
    }
}

impl IntoFuture for LockRequest {
    type Output = Result<Guard>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Guard>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.acquire())
    }
}
