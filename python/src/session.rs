//! Clients, sessions and election observers.

use std::ops::Deref;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::hold::Hold;
use crate::{awaitable, block_on, runtime, seconds, to_py};

/// A value dropped inside the runtime: a dropped distlock session or guard
/// finishes its work (closing, releasing) in a task there, and Python drops
/// objects on threads of its own.
pub(crate) struct InRuntime<T>(Option<T>);

impl<T> InRuntime<T> {
    pub(crate) fn new(value: T) -> Self {
        InRuntime(Some(value))
    }
}

impl<T> InRuntime<T> {
    /// The value, to be dropped by its new owner.
    pub(crate) fn into_inner(mut self) -> T {
        self.0.take().expect("taken only once")
    }
}

impl<T> Deref for InRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_ref().expect("taken only on drop")
    }
}

impl<T> Drop for InRuntime<T> {
    fn drop(&mut self) {
        if crate::forked() {
            // The parent's value, in a child whose runtime has no threads:
            // its clean-up could wait for ever on a lock held at the fork.
            std::mem::forget(self.0.take());
            return;
        }
        let _entered = runtime().enter();
        drop(self.0.take());
    }
}

/// Connects to the store `url` names, blocking.
#[pyfunction]
pub(crate) fn connect(py: Python<'_>, url: String) -> PyResult<Client> {
    let client = block_on(py, distlock::connect(&url))?.map_err(to_py)?;
    Ok(Client { inner: client })
}

/// Connects to the store `url` names, as an awaitable.
#[pyfunction]
pub(crate) fn connect_async(py: Python<'_>, url: String) -> PyResult<Bound<'_, PyAny>> {
    awaitable(py, async move {
        let client = distlock::connect(&url).await.map_err(to_py)?;
        Ok(Client { inner: client })
    })
}

/// A connection to a store.
#[pyclass(frozen, module = "distlock._distlock")]
pub(crate) struct Client {
    inner: distlock::Client,
}

impl Client {
    fn builder(
        &self,
        ttl: Option<f64>,
        lock_delay: Option<f64>,
        max_hold: Option<f64>,
        owner: Option<String>,
        max_keys: Option<usize>,
    ) -> PyResult<distlock::SessionBuilder> {
        let mut builder = self.inner.session();
        if let Some(ttl) = seconds("ttl", ttl)? {
            builder = builder.ttl(ttl);
        }
        if let Some(lock_delay) = seconds("lock_delay", lock_delay)? {
            builder = builder.lock_delay(lock_delay);
        }
        if let Some(max_hold) = seconds("max_hold", max_hold)? {
            builder = builder.max_hold(max_hold);
        }
        if let Some(owner) = owner {
            builder = builder.owner(owner);
        }
        if let Some(max_keys) = max_keys {
            builder = builder.max_keys(max_keys);
        }
        Ok(builder)
    }
}

#[pymethods]
impl Client {
    #[pyo3(signature = (ttl=None, lock_delay=None, max_hold=None, owner=None, max_keys=None))]
    fn open_session(
        &self,
        py: Python<'_>,
        ttl: Option<f64>,
        lock_delay: Option<f64>,
        max_hold: Option<f64>,
        owner: Option<String>,
        max_keys: Option<usize>,
    ) -> PyResult<Session> {
        let builder = self.builder(ttl, lock_delay, max_hold, owner, max_keys)?;
        let session = block_on(py, builder.open())?.map_err(to_py)?;
        Ok(Session::new(session))
    }

    #[pyo3(signature = (ttl=None, lock_delay=None, max_hold=None, owner=None, max_keys=None))]
    fn open_session_async<'py>(
        &self,
        py: Python<'py>,
        ttl: Option<f64>,
        lock_delay: Option<f64>,
        max_hold: Option<f64>,
        owner: Option<String>,
        max_keys: Option<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let builder = self.builder(ttl, lock_delay, max_hold, owner, max_keys)?;
        awaitable(py, async move {
            let session = builder.open().await.map_err(to_py)?;
            Ok(Session::new(session))
        })
    }

    fn leader(&self, py: Python<'_>, name: String) -> PyResult<Option<Leader>> {
        let leader = block_on(py, self.inner.leader(&name))?.map_err(to_py)?;
        Ok(leader.map(Leader::from))
    }

    fn leader_async<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        awaitable(py, async move {
            let leader = client.leader(&name).await.map_err(to_py)?;
            Ok(leader.map(Leader::from))
        })
    }

    #[pyo3(signature = (name, every=None))]
    fn observe(&self, name: String, every: Option<f64>) -> PyResult<Observer> {
        let mut observer = self.inner.observe(name);
        if let Some(every) = seconds("every", every)? {
            observer = observer.every(every);
        }
        Ok(Observer {
            inner: Arc::new(tokio::sync::Mutex::new(InRuntime::new(observer))),
        })
    }

    /// What the store can do, as `distlock stores` prints it.
    fn capabilities<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let caps = self.inner.capabilities();
        let dict = PyDict::new(py);
        dict.set_item("name", caps.name)?;
        dict.set_item("fair", caps.fair)?;
        dict.set_item("shared", caps.shared)?;
        dict.set_item("semaphore", caps.semaphore)?;
        dict.set_item("push_wakeup", caps.push_wakeup)?;
        dict.set_item("durable_tokens", caps.fencing == distlock::Fencing::Durable)?;
        dict.set_item("lease_expiry", caps.lease_expiry)?;
        dict.set_item("lock_delay", caps.lock_delay)?;
        dict.set_item("tells_leader", caps.tells_leader)?;
        Ok(dict)
    }
}

/// A key and mode as Python names them.
fn mode_of(mode: &str, permits: Option<u32>) -> PyResult<distlock::raw::Mode> {
    use distlock::raw::Mode;
    match (mode, permits) {
        ("exclusive" | "write", None) => Ok(Mode::Exclusive),
        ("read" | "shared", None) => Ok(Mode::Shared),
        ("semaphore", Some(permits)) => Ok(Mode::Semaphore { permits }),
        ("semaphore", None) => Err(PyValueError::new_err(
            "a semaphore needs its number of permits",
        )),
        (_, Some(_)) => Err(PyValueError::new_err(format!(
            "permits are for a semaphore, not a {mode} lock"
        ))),
        _ => Err(PyValueError::new_err(format!(
            "unknown lock mode '{mode}': use 'exclusive', 'read', 'write' or 'semaphore'"
        ))),
    }
}

/// A session: the identity that owns locks, kept alive by one lease.
#[pyclass(frozen, module = "distlock._distlock")]
pub(crate) struct Session {
    inner: InRuntime<distlock::Session>,
}

impl Session {
    fn new(session: distlock::Session) -> Self {
        Session {
            inner: InRuntime::new(session),
        }
    }

    fn request(
        &self,
        key: String,
        mode: &str,
        permits: Option<u32>,
        wait: Option<f64>,
    ) -> PyResult<distlock::LockRequest> {
        use distlock::raw::Mode;
        let mut request = match mode_of(mode, permits)? {
            Mode::Exclusive => self.inner.lock(key),
            Mode::Shared => self.inner.read(key),
            Mode::Semaphore { permits } => self.inner.semaphore(key, permits),
        };
        if let Some(wait) = seconds("wait", wait)? {
            request = request.wait(wait);
        }
        Ok(request)
    }

    fn request_all(
        &self,
        keys: Vec<(String, String)>,
        wait: Option<f64>,
    ) -> PyResult<distlock::MultiLockRequest> {
        let keys = keys
            .into_iter()
            .map(|(key, mode)| Ok((key, mode_of(&mode, None)?)))
            .collect::<PyResult<Vec<_>>>()?;
        let mut request = self.inner.lock_all(keys);
        if let Some(wait) = seconds("wait", wait)? {
            request = request.wait(wait);
        }
        Ok(request)
    }

    fn campaign_of(
        &self,
        name: String,
        value: String,
        wait: Option<f64>,
    ) -> PyResult<distlock::Campaign> {
        let mut campaign = self.inner.elect(name).value(value);
        if let Some(wait) = seconds("wait", wait)? {
            campaign = campaign.wait(wait);
        }
        Ok(campaign)
    }
}

/// Takes `request`: waits (for at most its wait) unless `try_once`, when
/// it answers `None` for a held key.
async fn take(request: distlock::LockRequest, try_once: bool) -> PyResult<Option<Hold>> {
    let guard = if try_once {
        request.try_lock().await
    } else {
        request.await.map(Some)
    };
    Ok(guard.map_err(to_py)?.map(Hold::lock))
}

async fn take_all(request: distlock::MultiLockRequest, try_once: bool) -> PyResult<Option<Hold>> {
    let guard = if try_once {
        request.try_lock().await
    } else {
        request.await.map(Some)
    };
    Ok(guard.map_err(to_py)?.map(Hold::all))
}

#[pymethods]
impl Session {
    #[pyo3(signature = (key, mode="exclusive", permits=None, wait=None, try_once=false))]
    fn acquire(
        &self,
        py: Python<'_>,
        key: String,
        mode: &str,
        permits: Option<u32>,
        wait: Option<f64>,
        try_once: bool,
    ) -> PyResult<Option<Hold>> {
        let request = self.request(key, mode, permits, wait)?;
        block_on(py, take(request, try_once))?
    }

    #[pyo3(signature = (key, mode="exclusive", permits=None, wait=None, try_once=false))]
    fn acquire_async<'py>(
        &self,
        py: Python<'py>,
        key: String,
        mode: &str,
        permits: Option<u32>,
        wait: Option<f64>,
        try_once: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = self.request(key, mode, permits, wait)?;
        awaitable(py, take(request, try_once))
    }

    #[pyo3(signature = (keys, wait=None, try_once=false))]
    fn acquire_all(
        &self,
        py: Python<'_>,
        keys: Vec<(String, String)>,
        wait: Option<f64>,
        try_once: bool,
    ) -> PyResult<Option<Hold>> {
        let request = self.request_all(keys, wait)?;
        block_on(py, take_all(request, try_once))?
    }

    #[pyo3(signature = (keys, wait=None, try_once=false))]
    fn acquire_all_async<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<(String, String)>,
        wait: Option<f64>,
        try_once: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = self.request_all(keys, wait)?;
        awaitable(py, take_all(request, try_once))
    }

    #[pyo3(signature = (name, value, wait=None))]
    fn campaign(
        &self,
        py: Python<'_>,
        name: String,
        value: String,
        wait: Option<f64>,
    ) -> PyResult<Hold> {
        let campaign = self.campaign_of(name, value, wait)?;
        let leadership = block_on(py, campaign.campaign())?.map_err(to_py)?;
        Ok(Hold::leadership(leadership))
    }

    #[pyo3(signature = (name, value, wait=None))]
    fn campaign_async<'py>(
        &self,
        py: Python<'py>,
        name: String,
        value: String,
        wait: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let campaign = self.campaign_of(name, value, wait)?;
        awaitable(py, async move {
            let leadership = campaign.campaign().await.map_err(to_py)?;
            Ok(Hold::leadership(leadership))
        })
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        block_on(py, self.inner.close())?.map_err(to_py)
    }

    fn close_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let session = (*self.inner).clone();
        awaitable(py, async move { session.close().await.map_err(to_py) })
    }

    /// The lease, in seconds.
    #[getter]
    fn ttl(&self) -> f64 {
        self.inner.ttl().as_secs_f64()
    }

    #[getter]
    fn is_lost(&self) -> bool {
        self.inner.is_lost()
    }

    /// Seconds until the lease certainly runs out unless renewed; `None`
    /// where the store has no lease.
    #[getter]
    fn expires_in(&self) -> Option<f64> {
        let at = self.inner.lease_deadline()?;
        Some(
            at.saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64(),
        )
    }
}

/// Who leads an election.
#[pyclass(frozen, eq, hash, get_all, module = "distlock._distlock")]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct Leader {
    value: String,
    term: u64,
}

impl From<distlock::Leader> for Leader {
    fn from(leader: distlock::Leader) -> Self {
        Leader {
            value: leader.value,
            term: leader.term,
        }
    }
}

#[pymethods]
impl Leader {
    fn __repr__(&self) -> String {
        format!("Leader(value={:?}, term={})", self.value, self.term)
    }
}

/// A stream of an election's leaders.
#[pyclass(frozen, module = "distlock._distlock")]
pub(crate) struct Observer {
    inner: Arc<tokio::sync::Mutex<InRuntime<distlock::Observer>>>,
}

#[pymethods]
impl Observer {
    fn next(&self, py: Python<'_>) -> PyResult<Option<Leader>> {
        let observer = Arc::clone(&self.inner);
        let next = block_on(py, async move {
            let mut observer = observer.lock().await;
            observer
                .0
                .as_mut()
                .expect("taken only on drop")
                .next()
                .await
        })?;
        Ok(next.map_err(to_py)?.map(Leader::from))
    }

    fn next_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let observer = Arc::clone(&self.inner);
        awaitable(py, async move {
            let mut observer = observer.lock().await;
            let next = observer
                .0
                .as_mut()
                .expect("taken only on drop")
                .next()
                .await;
            Ok(next.map_err(to_py)?.map(Leader::from))
        })
    }
}
