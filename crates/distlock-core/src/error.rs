//! The one error type of distlock.

use std::fmt;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form a program can branch on.
///
/// Contention is never an error: [`LockRequest::try_lock`](crate::LockRequest::try_lock)
/// answers `None` when the key is held, and only a bounded wait that runs out
/// is a [`ErrorKind::Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A key is empty, longer than 1024 bytes, or otherwise unusable.
    InvalidKey,
    /// A bounded wait ran out before the lock could be had.
    Timeout,
    /// The session or the lock was lost (lease expired, store said so).
    Lost,
    /// A release or check named a lock this session does not hold.
    NotHeld,
    /// The session already holds the key in a mode the request conflicts
    /// with (asking for `write` while holding `read` would wait forever).
    Conflict,
    /// The store cannot be reached or is not answering.
    Unavailable,
    /// A URL, option or setting is wrong.
    Config,
    /// The store does not support what was asked (see its capabilities).
    Unsupported,
    /// The store answered with an error of its own.
    Store,
    /// The session was closed.
    Closed,
}

impl ErrorKind {
    /// A short lower-case name, as printed in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidKey => "invalid key",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Lost => "lost",
            ErrorKind::NotHeld => "not held",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Config => "configuration",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Store => "store",
            ErrorKind::Closed => "closed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every distlock operation: a [`ErrorKind`], a message that says
/// what happened and what to do, and the underlying cause when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message alone, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying the same operation again may succeed: true for
    /// timeouts and an unavailable store, false for bad input, lost locks and
    /// refusals.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Timeout | ErrorKind::Unavailable)
    }

    pub(crate) fn invalid_key(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidKey, message)
    }

    /// A `Lost` error: the session or the lock is gone.
    pub fn lost(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Lost, message)
    }

    /// An `Unavailable` error: the store cannot be reached or did not answer.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unavailable, message)
    }

    /// An `Unsupported` error: the store cannot do what was asked.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// A `Store` error: the store answered with an error of its own.
    pub fn store(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Store, message)
    }

    /// A `Config` error: the URL or a setting is wrong; `message` says what
    /// to write instead.
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// `NotHeld` for `key`, as every store says it.
    pub fn not_held(key: &str) -> Self {
        Error::new(
            ErrorKind::NotHeld,
            format!(
                "this session does not hold '{key}' (released, lost, or held by another session)"
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_timeouts_and_unavailable_are_retryable() {
        assert!(Error::new(ErrorKind::Timeout, "t").is_retryable());
        assert!(Error::new(ErrorKind::Unavailable, "u").is_retryable());
        assert!(!Error::new(ErrorKind::InvalidKey, "k").is_retryable());
        assert!(!Error::new(ErrorKind::NotHeld, "n").is_retryable());
        assert!(!Error::new(ErrorKind::Lost, "l").is_retryable());
    }

    #[test]
    fn source_is_kept() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::new(ErrorKind::Store, "write failed").with_source(io);
        let source = std::error::Error::source(&e).expect("source was attached");
        assert_eq!(source.to_string(), "disk on fire");
    }
}
