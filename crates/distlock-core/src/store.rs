//! The store trait: what a lock store must do, and nothing more.
//!
//! A store speaks its own protocol and implements two small traits:
//! [`LockStore`] opens sessions, [`StoreSession`] acquires, releases and
//! renews on behalf of one session. Everything convenient — reentrancy,
//! renewal timing, `lost()`, waiting with backoff for stores that cannot push,
//! guards — is written once in the core on top of these.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

pub use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::status::{HolderStatus, Status, StatusQuery};

pub mod queue;

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// One holder at a time (`lock` and `write`).
    Exclusive,
    /// Many readers together, never with a writer (`read`).
    Shared,
    /// Up to `permits` holders together (`semaphore`).
    Semaphore {
        /// How many holders the semaphore admits at once.
        permits: u32,
    },
}

impl Mode {
    /// Whether a session that holds a key in `self` may take it again in
    /// `wanted` as a reentrant hold (same token). A stronger hold covers a
    /// weaker request; the reverse would be an upgrade, which deadlocks.
    pub fn covers(self, wanted: Mode) -> bool {
        match (self, wanted) {
            (Mode::Exclusive, Mode::Exclusive | Mode::Shared) => true,
            (Mode::Shared, Mode::Shared) => true,
            (Mode::Semaphore { permits: a }, Mode::Semaphore { permits: b }) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Exclusive => f.write_str("exclusive"),
            Mode::Shared => f.write_str("shared"),
            Mode::Semaphore { permits } => write!(f, "semaphore({permits})"),
        }
    }
}

/// What identifies a session to the store and keeps it alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionModel {
    /// A lease with a TTL, renewed by the core; it expires when renewals stop.
    Lease,
    /// A connection to the store; locks go when the connection goes.
    Connection,
    /// The operating-system process; locks go when it exits or releases.
    Process,
}

/// How strong the fencing tokens of a store are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fencing {
    /// Strictly increasing per key while the store runs; reset if it restarts.
    InProcess,
    /// Strictly increasing per key, kept on disk: never goes backwards, not
    /// across a crash or restart of the store.
    Durable,
}

/// What a store supports. The conformance suite runs a behaviour only where
/// the store claims it, and the README's store table is made from these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The store's name, as in its URL scheme.
    pub name: &'static str,
    /// Waiters are granted in arrival order.
    pub fair: bool,
    /// `read`/`write` with many readers at once.
    pub shared: bool,
    /// Readers that arrive after a waiting writer wait behind it.
    pub writer_preferring: bool,
    /// Counting semaphores.
    pub semaphore: bool,
    /// The store wakes waiters itself; it waits up to the deadline in
    /// [`AcquireRequest::wait_until`]. Without it the core polls with
    /// jittered exponential backoff.
    pub push_wakeup: bool,
    /// How strong the fencing tokens are.
    pub fencing: Fencing,
    /// A session's locks are freed when its lease runs out.
    pub lease_expiry: bool,
    /// After a session expires, its keys stay blocked for the session's
    /// lock-delay.
    pub lock_delay: bool,
    /// Held locks and tokens survive a restart of the store.
    pub survives_restart: bool,
    /// What a session is.
    pub session: SessionModel,
    /// [`LockStore::status`] lists holders and waiters.
    pub status: bool,
    /// Each hold carries its session's owner description, which `status`
    /// shows.
    pub keeps_owner: bool,
    /// [`LockStore::force_release`] ends other sessions' holds.
    pub force_release: bool,
    /// [`Client::leader`](crate::Client::leader) can tell who leads an
    /// election: `status` shows the owner and the token of an election's
    /// hold (a one-permit semaphore where the store has semaphores, else an
    /// exclusive lock).
    pub tells_leader: bool,
    /// [`StoreSession::acquire_all`] takes several keys in one request,
    /// all or none, queued fairly at the store; without it the core takes
    /// them one at a time in one order.
    pub atomic_lock_all: bool,
    /// [`LockStore::watch_key`] pushes the changes of a key's holders, so
    /// that observers ([`Client::observe`](crate::Client::observe)) need
    /// not poll.
    pub watches_keys: bool,
}

impl Capabilities {
    /// A starting point for a store's declaration: exclusive locks only,
    /// polled, in-process tokens, lease sessions. Set what your store adds.
    pub fn minimal(name: &'static str) -> Self {
        Capabilities {
            name,
            fair: false,
            shared: false,
            writer_preferring: false,
            semaphore: false,
            push_wakeup: false,
            fencing: Fencing::InProcess,
            lease_expiry: false,
            lock_delay: false,
            survives_restart: false,
            session: SessionModel::Lease,
            status: false,
            keeps_owner: false,
            force_release: false,
            tells_leader: false,
            atomic_lock_all: false,
            watches_keys: false,
        }
    }
}

/// What a session asks of the store when it opens.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionOptions {
    /// The lease: how long the store keeps the session without a renewal.
    pub ttl: Duration,
    /// How long a key stays blocked after this session expires holding it.
    pub lock_delay: Duration,
    /// Who the session says it is: kept with each hold where the store can
    /// keep a value, and shown by `status`. At most [`MAX_OWNER_BYTES`], no
    /// control characters.
    pub owner: String,
}

/// The longest owner description a session may carry.
pub const MAX_OWNER_BYTES: usize = 256;

impl SessionOptions {
    /// Options with the given lease and lock-delay, and this process's
    /// [`default_owner`].
    pub fn new(ttl: Duration, lock_delay: Duration) -> Self {
        SessionOptions {
            ttl,
            lock_delay,
            owner: default_owner(),
        }
    }

    /// The same options with another owner description.
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }
}

/// `user@host pid N (program)`: who a session is unless told otherwise.
pub fn default_owner() -> String {
    let user = ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned());
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    let program = std::env::current_exe()
        .ok()
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    let owner = format!("{user}@{host} pid {} ({program})", std::process::id());
    sanitize_owner(&owner)
}

/// `owner` as a store keeps it: control characters replaced, cut to
/// [`MAX_OWNER_BYTES`] on a character boundary.
fn sanitize_owner(owner: &str) -> String {
    let mut clean = String::with_capacity(owner.len().min(MAX_OWNER_BYTES));
    for c in owner.chars().map(|c| if c.is_control() { '?' } else { c }) {
        if clean.len() + c.len_utf8() > MAX_OWNER_BYTES {
            break;
        }
        clean.push(c);
    }
    clean
}

/// Checks an owner description given by the user.
pub fn validate_owner(owner: &str) -> Result<()> {
    if owner.len() > MAX_OWNER_BYTES {
        return Err(Error::config(format!(
            "the owner description is {} bytes; keep it to {MAX_OWNER_BYTES}",
            owner.len()
        )));
    }
    if owner.chars().any(char::is_control) {
        return Err(Error::config(
            "the owner description has a control character (a newline?); write it on one line",
        ));
    }
    Ok(())
}

/// One acquire attempt.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AcquireRequest {
    /// The key, already validated.
    pub key: String,
    /// The mode wanted.
    pub mode: Mode,
    /// For stores with [`Capabilities::push_wakeup`]: wait until this instant
    /// for the grant, `None` to try once. Stores without push wake-up are
    /// always asked to try once.
    pub wait_until: Option<Instant>,
}

impl AcquireRequest {
    /// A request for `key` in `mode`, trying once.
    pub fn new(key: impl Into<String>, mode: Mode) -> Self {
        AcquireRequest {
            key: key.into(),
            mode,
            wait_until: None,
        }
    }
}

/// A lock the store granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grant {
    /// The fencing token: strictly greater than every earlier grant of the key.
    pub token: u64,
    /// For stores with a TTL per key (not per session): the send time of the
    /// request whose success started this lock's TTL. The core counts the
    /// lock's own lease from it until a renewal covers the lock. `None`
    /// where the session's lease covers every lock of the session.
    pub lease_from: Option<Instant>,
}

impl Grant {
    /// A grant with this fencing token, covered by the session's lease.
    pub fn new(token: u64) -> Self {
        Grant {
            token,
            lease_from: None,
        }
    }

    /// A grant whose own TTL started when the request sent at `sent` took it.
    pub fn with_lease_from(mut self, sent: Instant) -> Self {
        self.lease_from = Some(sent);
        self
    }
}

/// A lock as the session holds it, passed back to the store to release or
/// renew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    /// The key.
    pub key: String,
    /// The mode it is held in.
    pub mode: Mode,
    /// The token of its grant.
    pub token: u64,
}

/// What a renewal found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RenewReport {
    /// Keys the store says this session no longer holds (deleted, expired,
    /// taken over). Their guards report `lost()`.
    pub lost_keys: Vec<String>,
}

impl RenewReport {
    /// A report that every lock is still held.
    pub fn all_held() -> Self {
        RenewReport::default()
    }

    /// A report naming the keys that are gone.
    pub fn lost(lost_keys: Vec<String>) -> Self {
        RenewReport { lost_keys }
    }
}

/// A lock store: opens sessions. Cheap to share (`Arc<dyn LockStore>`).
#[async_trait]
pub trait LockStore: fmt::Debug + Send + Sync + 'static {
    /// What this store supports.
    fn capabilities(&self) -> Capabilities;

    /// Opens a session with the given lease. Errors if the store cannot be
    /// reached, saying where it was looked for.
    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>>;

    /// Who holds and who waits, for the keys `query` names, sorted by key.
    /// A store that cannot list its holders answers
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported), saying so.
    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        let _ = query;
        Err(Error::unsupported(format!(
            "the {} store cannot list who holds or waits for its locks",
            self.capabilities().name
        )))
    }

    /// Ends every hold on `key`, whoever holds it, so that the next grant
    /// carries a higher token (the old holders' fenced writes are refused)
    /// and each old holder's `lost()` fires. `requested_by` says who asked,
    /// for the store's log. Answers what was held; a store that cannot
    /// answers [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        let _ = (key, requested_by);
        Err(Error::unsupported(format!(
            "the {} store cannot end another session's hold",
            self.capabilities().name
        )))
    }

    /// For stores with [`Capabilities::watches_keys`]: a signal, soon after
    /// each change of `key`'s holders (a grant, a release, an expiry),
    /// meaning "look again" (the reader then asks `status`). Signals may
    /// be merged, never lost: one sent while the last is unread is kept.
    /// The watch ends when the receiver is dropped, or, closing the
    /// channel, when the store can no longer push. `Ok(None)` where the
    /// store cannot push at all.
    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        let _ = key;
        Ok(None)
    }
}

/// The receiving end of [`LockStore::watch_key`]: a message means "look
/// again"; `None` from `recv` means the watch ended.
pub type KeyWatch = tokio::sync::mpsc::Receiver<()>;

/// The sending end of a [`KeyWatch`], for stores: [`signal`](KeyWatcher::signal)
/// after each change; [`is_closed`](KeyWatcher::is_closed) once the reader left.
#[derive(Debug, Clone)]
pub struct KeyWatcher(tokio::sync::mpsc::Sender<()>);

impl KeyWatcher {
    /// A new watch: its sender and its receiver.
    pub fn new() -> (KeyWatcher, KeyWatch) {
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        (KeyWatcher(sender), receiver)
    }

    /// Says "look again"; merged with a signal not yet read. `false` once
    /// the reader has gone.
    pub fn signal(&self) -> bool {
        match self.0.try_send(()) {
            Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => false,
        }
    }

    /// Whether the reader has gone.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Resolves when the reader has gone.
    pub async fn closed(&self) {
        self.0.closed().await;
    }
}

/// One session as the store sees it.
///
/// The core guarantees that it holds each key at most once per session (it
/// counts reentrant holds itself), and that it never calls `acquire` twice
/// at once for the same key.
#[async_trait]
pub trait StoreSession: Send + Sync + 'static {
    /// Tries to acquire, waiting up to `request.wait_until` if the store has
    /// push wake-up. `Ok(None)` means the key was busy (or the wait ran out).
    ///
    /// Must be cancel safe: if the future is dropped, the session is left
    /// holding nothing new and no waiter of it stays queued.
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>>;

    /// For stores with [`Capabilities::atomic_lock_all`]: every request at
    /// once (distinct keys; the first request's `wait_until` for all), or
    /// none. The grants come in the order asked; `Ok(None)`, holding none,
    /// when a key was busy (or the wait ran out). Cancel safe as
    /// [`acquire`](StoreSession::acquire). `Unsupported` elsewhere.
    async fn acquire_all(&self, requests: &[AcquireRequest]) -> Result<Option<Vec<Grant>>> {
        let _ = requests;
        Err(Error::new(
            crate::ErrorKind::Unsupported,
            "this store takes several keys one at a time",
        ))
    }

    /// Releases a lock this session holds; `NotHeld` if it does not hold it
    /// (any more). Never releases another session's lock.
    async fn release(&self, lock: &HeldLock) -> Result<()>;

    /// Renews the session's lease (and, for stores with a TTL per key, every
    /// held lock). `Err` with [`ErrorKind::Lost`](crate::ErrorKind::Lost)
    /// means the whole session is gone; other errors are retried until the
    /// lease runs out.
    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport>;

    /// Ends the session, releasing everything it holds.
    async fn close(&self) -> Result<()>;

    /// Resolves when the store tells this session that a hold of it ended
    /// (someone forced its release): the core then renews at once, and the
    /// renewal reports the key lost. Never, for stores that cannot tell.
    async fn renewal_wanted(&self) {
        std::future::pending::<()>().await;
    }

    /// Test hook: stop answering for this session as if its process froze,
    /// so that its lease runs out at the store. Stores whose sessions cannot
    /// expire ignore it.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    fn freeze_for_test(&self) {}
}

/// Keeps the items inside only when the `test-hooks` feature is on, as the
/// hooks of [`StoreSession`] are: a store implements a hook inside it, and
/// the implementation follows the trait whatever the store's own features.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[macro_export]
macro_rules! test_hook {
    ($($item:tt)*) => { $($item)* };
}

/// Keeps the items inside only when the `test-hooks` feature is on.
#[cfg(not(feature = "test-hooks"))]
#[doc(hidden)]
#[macro_export]
macro_rules! test_hook {
    ($($item:tt)*) => {};
}

/// Runs `cleanup` in the background on the tokio runtime of the calling
/// thread: the undoing, from a `Drop`, of an acquire dropped or failed
/// half-way. Without a runtime (a drop outside one) nothing runs, and it
/// returns `false`: what the clean-up would remove goes with the session.
pub fn spawn_cleanup(cleanup: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(cleanup);
            true
        }
        Err(_) => false,
    }
}

/// What a release returns: `Ok` if the store found and ended the
/// session's hold of `key`, else [`Error::not_held`](crate::Error::not_held).
pub fn release_outcome(released: bool, key: &str) -> Result<()> {
    if released {
        Ok(())
    } else {
        Err(crate::Error::not_held(key))
    }
}

/// The innermost cause of an error, for messages: "Connection refused (os
/// error 111)" rather than "transport error".
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Takes the store's own parameter `name` out of a URL: the URL without it
/// (for the database driver, which would refuse a parameter it does not
/// know) and its value, if given.
pub fn take_url_param(url: &url::Url, name: &str) -> (url::Url, Option<String>) {
    let mut value = None;
    let mut others = Vec::new();
    // The other pairs are kept as written: written again as a form, a
    // space would become `+`, which libpq-style parsers take literally.
    for pair in url.query().unwrap_or("").split('&') {
        match url::form_urlencoded::parse(pair.as_bytes()).next() {
            Some((key, given)) if key == name => value = Some(given.into_owned()),
            Some(_) => others.push(pair),
            None => {}
        }
    }
    let mut rest = url.clone();
    let query = others.join("&");
    rest.set_query(Some(query.as_str()).filter(|query| !query.is_empty()));
    (rest, value)
}

/// Locks a std mutex. The one way distlock does: a panic while another
/// holder had it does not poison it for the rest, as every piece of state
/// so guarded is whole between statements (a map, a set, an instant).
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The token each key of a session was granted with, for stores whose
/// release cannot name the grant (advisory and named locks end whatever
/// the connection holds of a key): a release must name the token of the
/// hold it ends, or it is `NotHeld` and ends nothing.
#[derive(Debug, Default)]
pub struct GrantedTokens(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl GrantedTokens {
    /// `key` was granted with `token`.
    pub fn granted(&self, key: &str, token: u64) {
        lock(&self.0).insert(key.to_owned(), token);
    }

    /// Whether `key`'s current grant is the one with `token`.
    pub fn holds(&self, key: &str, token: u64) -> bool {
        lock(&self.0).get(key) == Some(&token)
    }

    /// `key`'s grant with `token` ended; a later grant of it is kept.
    pub fn ended(&self, key: &str, token: u64) {
        let mut tokens = lock(&self.0);
        // One lookup in the usual case, where the grant that ended is the
        // key's current one.
        if let Some((key, later)) = tokens.remove_entry(key) {
            if later != token {
                tokens.insert(key, later);
            }
        }
    }
}

/// Proof that a connection is alive, for stores whose sessions are
/// connections: every answer on it is marked, and a renewal that cannot
/// send its own keep-alive (a wait holds the connection) may instead wait
/// for an answer that came after the renewal began.
#[derive(Debug)]
pub struct Heartbeat {
    last: std::sync::Mutex<Instant>,
    beat: tokio::sync::Notify,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            last: std::sync::Mutex::new(Instant::now()),
            beat: tokio::sync::Notify::new(),
        }
    }
}

impl Heartbeat {
    /// The connection answered just now.
    pub fn mark(&self) {
        *lock(&self.last) = Instant::now();
        self.beat.notify_waiters();
    }

    /// Whether an answer comes after `since`, waiting until `deadline`.
    pub async fn answered_since(&self, since: Instant, deadline: Instant) -> bool {
        loop {
            let beat = self.beat.notified();
            tokio::pin!(beat);
            beat.as_mut().enable();
            if *lock(&self.last) >= since {
                return true;
            }
            if tokio::time::timeout_at(deadline, beat).await.is_err() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stores_own_url_parameter_is_taken_out_and_the_rest_kept() {
        let url = url::Url::parse("pg://u@h/db?mode=lease&sslmode=disable").expect("url");
        let (rest, mode) = take_url_param(&url, "mode");
        assert_eq!(mode.as_deref(), Some("lease"));
        assert_eq!(rest.as_str(), "pg://u@h/db?sslmode=disable");
        let (rest, ca) = take_url_param(&rest, "ca");
        assert_eq!(ca, None);
        assert_eq!(rest.as_str(), "pg://u@h/db?sslmode=disable");
        let (rest, _) = take_url_param(&url::Url::parse("r://h?ca=x").expect("url"), "ca");
        assert_eq!(rest.as_str(), "r://h");
        // A space stays `%20`: tokio-postgres, like libpq, takes `+` as
        // itself.
        let url = url::Url::parse("pg://h/db?options=-c%20a%3Db&mode=lease&x=1+2").expect("url");
        let (rest, mode) = take_url_param(&url, "mode");
        assert_eq!(mode.as_deref(), Some("lease"));
        assert_eq!(rest.as_str(), "pg://h/db?options=-c%20a%3Db&x=1+2");
    }

    #[test]
    fn stronger_holds_cover_weaker_requests_only() {
        assert!(Mode::Exclusive.covers(Mode::Shared));
        assert!(Mode::Exclusive.covers(Mode::Exclusive));
        assert!(Mode::Shared.covers(Mode::Shared));
        assert!(!Mode::Shared.covers(Mode::Exclusive));
        let two = Mode::Semaphore { permits: 2 };
        assert!(two.covers(two));
        assert!(!two.covers(Mode::Semaphore { permits: 3 }));
        assert!(!Mode::Exclusive.covers(two));
    }
}

/// The keys a session found taken when it tried them, for stores with a
/// cheap try and a costlier wait: a key known contended goes straight to
/// the wait; any other is tried first. A store forgets a key when it learns
/// the key is free again (or now and then, if it cannot tell). Bounded: past
/// [`ContendedKeys::LIMIT`] keys it forgets them all (costing one try
/// each).
#[derive(Debug, Default)]
pub struct ContendedKeys(std::sync::Mutex<std::collections::HashSet<String>>);

impl ContendedKeys {
    /// How many keys it remembers at most.
    pub const LIMIT: usize = 1024;

    fn keys(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        lock(&self.0)
    }

    /// Whether the last acquire of `key` found it taken.
    pub fn contains(&self, key: &str) -> bool {
        self.keys().contains(key)
    }

    /// Records how an acquire of `key` went: whether it found it taken.
    pub fn record(&self, key: &str, taken: bool) {
        let mut keys = self.keys();
        if !taken {
            keys.remove(key);
            return;
        }
        if keys.len() >= Self::LIMIT {
            keys.clear();
        }
        keys.insert(key.to_owned());
    }
}

#[cfg(test)]
mod contended_tests {
    use super::ContendedKeys;

    #[test]
    fn remembers_taken_keys_forgets_free_ones_and_stays_bounded() {
        let keys = ContendedKeys::default();
        keys.record("a", true);
        assert!(keys.contains("a"));
        keys.record("a", false);
        assert!(!keys.contains("a"));
        for i in 0..=ContendedKeys::LIMIT {
            keys.record(&i.to_string(), true);
        }
        assert!(keys.keys().len() <= ContendedKeys::LIMIT);
        assert!(keys.contains(&ContendedKeys::LIMIT.to_string()));
    }
}
