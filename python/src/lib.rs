//! The native half of the `distlock` Python package: the Rust core's
//! client, sessions and holds, each call in two forms, one that blocks
//! (with the GIL released) and one that returns an asyncio awaitable. The
//! pure-Python half (`distlock/__init__.py`) gives them their sync and
//! asyncio shapes.
//!
//! Every call runs on one tokio runtime per process (pyo3-async-runtimes'
//! own), so a hold taken by one thread can be released by another, and a
//! hold dropped by Python's garbage collector is released in the
//! background as a dropped [`distlock::Guard`] is.

mod hold;
mod session;

use std::future::Future;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The runtime every call runs on.
fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// The process that made the runtime: a child made by `fork` inherits the
/// runtime without its threads, and a call there would wait for ever.
static RUNTIME_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Whether this is a forked child of the process that made the runtime.
fn forked() -> bool {
    RUNTIME_PID
        .get()
        .is_some_and(|made_by| *made_by != std::process::id())
}

/// The runtime, or an error in a forked child of a process that used it.
fn checked_runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    let made_by = *RUNTIME_PID.get_or_init(std::process::id);
    if made_by != std::process::id() {
        return Err(PyRuntimeError::new_err(
            "distlock was used in this process's parent before it forked, and a forked \
             child cannot use it: start the child with multiprocessing's 'spawn' method, \
             or fork before the parent's first distlock call",
        ));
    }
    Ok(runtime())
}

/// The longest wait or lease taken, in seconds (about 31 years): beyond it
/// deadlines overflow the monotonic clock.
const MAX_SECONDS: f64 = 1e9;

/// How often a blocking call looks up from its wait to let Python handle a
/// signal (Ctrl-C raises `KeyboardInterrupt` within this).
const SIGNAL_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Runs `future` to its end with the GIL released, answering Python's
/// signals between slices of the wait. A signal's exception drops the
/// future, which every distlock future allows (it leaves no trace).
fn block_on<F: Future + Send>(py: Python<'_>, future: F) -> PyResult<F::Output>
where
    F::Output: Send,
{
    let runtime = checked_runtime()?;
    // Entered first, so that the future is dropped inside the runtime when
    // a signal's exception ends the wait: distlock's drops spawn their
    // clean-up on the current runtime.
    let _entered = runtime.enter();
    let mut future = std::pin::pin!(future);
    loop {
        let slice = py.detach(|| {
            runtime
                .block_on(async { tokio::time::timeout(SIGNAL_CHECK_EVERY, future.as_mut()).await })
        });
        match slice {
            Ok(output) => return Ok(output),
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// Runs `future` as an asyncio awaitable; cancelling the asyncio task drops
/// it.
fn awaitable<'py, F, T>(py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    checked_runtime()?;
    pyo3_async_runtimes::tokio::future_into_py(py, future)
}

/// Seconds from Python (`None` for none) as a duration; negative, NaN and
/// over-long values are a `ValueError` naming `what`.
fn seconds(what: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    value
        .map(|secs| {
            Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|_| secs <= MAX_SECONDS)
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "{what} must be a number of seconds from 0 to {MAX_SECONDS:e}; \
                         got {secs}"
                    ))
                })
        })
        .transpose()
}

/// The exception classes of `distlock._errors`, looked up once.
static ERRORS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// A distlock error as the Python exception of its kind (see
/// `distlock/_errors.py`), with the Rust message and its causes.
fn to_py(err: distlock::Error) -> PyErr {
    use distlock::ErrorKind as K;
    let class = match err.kind() {
        K::InvalidKey => "InvalidKey",
        K::Timeout => "Timeout",
        K::Lost => "Lost",
        K::NotHeld => "NotHeld",
        K::Conflict => "Conflict",
        K::Unavailable => "Unavailable",
        K::Config => "ConfigError",
        K::Unsupported => "Unsupported",
        K::Store => "StoreError",
        K::Closed => "Closed",
        _ => "Error",
    };
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    Python::attach(|py| {
        let errors = ERRORS.get_or_try_init(py, || {
            py.import("distlock._errors")
                .map(|module| module.unbind().into_any())
        });
        match errors.and_then(|module| module.bind(py).getattr(class)) {
            Ok(class) => match class.cast_into::<PyType>() {
                Ok(class) => PyErr::from_type(class, message),
                Err(_) => PyValueError::new_err(message),
            },
            Err(import) => import,
        }
    })
}

/// The native module, `distlock._distlock`.
#[pymodule]
fn _distlock(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(session::connect, module)?)?;
    module.add_function(wrap_pyfunction!(session::connect_async, module)?)?;
    module.add("DEFAULT_URL", distlock::DEFAULT_URL)?;
    module.add("MAX_KEY_BYTES", distlock::MAX_KEY_BYTES)?;
    module.add_class::<session::Client>()?;
    module.add_class::<session::Session>()?;
    module.add_class::<session::Observer>()?;
    module.add_class::<session::Leader>()?;
    module.add_class::<hold::Hold>()?;
    Ok(())
}
