//! What a session holds: a lock, several locks at once, or a leadership.

use std::future::Future;
use std::sync::Mutex;

use pyo3::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::session::InRuntime;
use crate::{awaitable, block_on, checked_runtime, seconds, to_py};

/// The Rust value behind a [`Hold`], until it is released.
enum Held {
    Lock(distlock::Guard),
    All(distlock::MultiGuard),
    Leader(distlock::Leadership),
}

impl Held {
    fn is_held(&self) -> bool {
        match self {
            Held::Lock(guard) => guard.is_held(),
            Held::All(guard) => guard.is_held(),
            Held::Leader(leadership) => leadership.is_leader(),
        }
    }

    fn expires_at(&self) -> Option<tokio::time::Instant> {
        match self {
            Held::Lock(guard) => guard.expires_at(),
            Held::All(guard) => guard.expires_at(),
            Held::Leader(leadership) => leadership.expires_at(),
        }
    }

    fn lost(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        match self {
            Held::Lock(guard) => Box::pin(guard.lost_owned()),
            Held::All(guard) => Box::pin(guard.lost_owned()),
            Held::Leader(leadership) => Box::pin(leadership.lost_owned()),
        }
    }

    async fn release(self) -> distlock::Result<()> {
        match self {
            Held::Lock(guard) => guard.release().await,
            Held::All(guard) => guard.release().await,
            Held::Leader(leadership) => leadership.resign().await,
        }
    }
}

/// A lock held (one key, or several taken at once) or a leadership: its
/// tokens, whether it is still held, a wait for its loss, and its release.
#[pyclass(frozen, module = "distlock._distlock")]
pub(crate) struct Hold {
    /// `None` once released.
    held: Mutex<Option<InRuntime<Held>>>,
    /// Cancelled when this hold is released: a reentrant hold of the same
    /// key in the same session shares the core's loss signal, which only
    /// the last release sets.
    released: CancellationToken,
    /// Each key and its fencing token, in the order taken.
    tokens: Vec<(String, u64)>,
    /// The mode of a single lock, as Python names it.
    mode: &'static str,
    /// What a leader publishes.
    value: Option<String>,
}

fn mode_name(mode: distlock::raw::Mode) -> &'static str {
    match mode {
        distlock::raw::Mode::Exclusive => "exclusive",
        distlock::raw::Mode::Shared => "read",
        distlock::raw::Mode::Semaphore { .. } => "semaphore",
    }
}

impl Hold {
    fn new(
        held: Held,
        tokens: Vec<(String, u64)>,
        mode: &'static str,
        value: Option<String>,
    ) -> Self {
        Hold {
            held: Mutex::new(Some(InRuntime::new(held))),
            released: CancellationToken::new(),
            tokens,
            mode,
            value,
        }
    }

    pub(crate) fn lock(guard: distlock::Guard) -> Self {
        let tokens = vec![(guard.key().to_owned(), guard.token())];
        let mode = mode_name(guard.mode());
        Hold::new(Held::Lock(guard), tokens, mode, None)
    }

    pub(crate) fn all(guard: distlock::MultiGuard) -> Self {
        let tokens = guard
            .tokens()
            .into_iter()
            .map(|(key, token)| (key.to_owned(), token))
            .collect();
        Hold::new(Held::All(guard), tokens, "all", None)
    }

    pub(crate) fn leadership(leadership: distlock::Leadership) -> Self {
        let tokens = vec![(leadership.name().to_owned(), leadership.term())];
        let value = Some(leadership.value().to_owned());
        Hold::new(Held::Leader(leadership), tokens, "leader", value)
    }

    /// Runs `f` on the held value; `None` once released.
    fn with<T>(&self, f: impl FnOnce(&Held) -> T) -> Option<T> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.as_deref().map(f)
    }

    /// Takes the held value out for release; a second release is
    /// `NotHeld`.
    fn take(&self) -> PyResult<InRuntime<Held>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let taken = held.take().ok_or_else(|| {
            let keys: Vec<&str> = self.tokens.iter().map(|(key, _)| key.as_str()).collect();
            to_py(distlock::Error::new(
                distlock::ErrorKind::NotHeld,
                format!("'{}' was already released", keys.join("', '")),
            ))
        })?;
        self.released.cancel();
        Ok(taken)
    }

    /// A wait for the loss or the release, owning what it needs.
    fn lost_wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let lost = self
            .with(Held::lost)
            .unwrap_or_else(|| Box::pin(std::future::ready(())));
        let released = self.released.clone().cancelled_owned();
        async move {
            tokio::select! {
                () = lost => {}
                () = released => {}
            }
        }
    }
}

#[pymethods]
impl Hold {
    /// Each key and its fencing token.
    #[getter]
    fn tokens(&self) -> Vec<(String, u64)> {
        self.tokens.clone()
    }

    #[getter]
    fn mode(&self) -> &'static str {
        self.mode
    }

    #[getter]
    fn value(&self) -> Option<String> {
        self.value.clone()
    }

    /// Whether `release` was called.
    #[getter]
    fn released(&self) -> bool {
        self.released.is_cancelled()
    }

    #[getter]
    fn is_held(&self) -> bool {
        self.with(Held::is_held).unwrap_or(false)
    }

    /// Seconds until the hold certainly ends unless renewed; `None` where
    /// the store has no lease, or once released.
    #[getter]
    fn expires_in(&self) -> Option<f64> {
        let at = self.with(Held::expires_at).flatten()?;
        Some(
            at.saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64(),
        )
    }

    /// Waits for the loss (or the release) for at most `timeout` seconds;
    /// whether it came.
    #[pyo3(signature = (timeout=None))]
    fn wait_lost(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = seconds("timeout", timeout)?;
        let lost = self.lost_wait();
        block_on(py, async move {
            match timeout {
                Some(timeout) => tokio::time::timeout(timeout, lost).await.is_ok(),
                None => {
                    lost.await;
                    true
                }
            }
        })
    }

    fn lost_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let lost = self.lost_wait();
        awaitable(py, async move {
            lost.await;
            Ok(())
        })
    }

    fn release(&self, py: Python<'_>) -> PyResult<()> {
        checked_runtime()?;
        let held = self.take()?;
        block_on(py, release(held))?
    }

    fn release_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        checked_runtime()?;
        let held = self.take()?;
        awaitable(py, release(held))
    }
}

impl Drop for Hold {
    /// Ends the waits for this hold's loss: a reentrant hold of the key
    /// may keep the core's loss signal unset.
    fn drop(&mut self) {
        self.released.cancel();
    }
}

/// Releases `held`. Cancelled part way, the value's drop finishes the
/// release in the background.
async fn release(held: InRuntime<Held>) -> PyResult<()> {
    held.into_inner().release().await.map_err(to_py)
}
