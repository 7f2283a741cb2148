//! Several keys at once: `session.lock_all(["a", "b"]).wait(d).await`.
//!
//! Every store takes the keys one at a time in one canonical order (by
//! their bytes), so no two multi-key requests wait for each other in a
//! cycle (as long as their sessions hold none of the keys beforehand: a
//! key held outside the request is not taken in that order); a request
//! that cannot have them all gives back the ones it took.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::guard::Guard;
use super::{Session, SessionInner, Wait};
use crate::error::{Error, ErrorKind, Result};
use crate::store::Mode;

/// How many keys one request may name unless the session says otherwise
/// ([`SessionBuilder::max_keys`](crate::SessionBuilder::max_keys)).
pub const DEFAULT_MAX_KEYS: usize = 64;

/// A key of a [`Session::lock_all`] request: a key alone (`"a"`, taken
/// exclusively), or a key and its mode (`("a", Mode::Shared)`).
pub trait KeyMode {
    /// The key and the mode to take it in.
    fn key_mode(self) -> (String, Mode);
}

impl KeyMode for &str {
    fn key_mode(self) -> (String, Mode) {
        (self.to_owned(), Mode::Exclusive)
    }
}

impl KeyMode for String {
    fn key_mode(self) -> (String, Mode) {
        (self, Mode::Exclusive)
    }
}

impl KeyMode for &String {
    fn key_mode(self) -> (String, Mode) {
        (self.clone(), Mode::Exclusive)
    }
}

impl<K: Into<String>> KeyMode for (K, Mode) {
    fn key_mode(self) -> (String, Mode) {
        (self.0.into(), self.1)
    }
}

/// A request for several locks at once, made by [`Session::lock_all`]:
/// either every key is held, each with its own token, or none is.
///
/// Await it to wait for them all (with [`wait`](MultiLockRequest::wait),
/// at most that long in all, then `Timeout`), or call
/// [`try_lock`](MultiLockRequest::try_lock) not to wait.
///
/// # Cancel safety
///
/// Dropping the future before it completes leaves no trace: the keys taken
/// so far are given back (in the background) and no waiter stays queued.
#[derive(Debug)]
#[must_use = "a lock request does nothing until it is awaited or try_lock()ed"]
pub struct MultiLockRequest {
    session: Session,
    keys: Vec<(String, Mode)>,
    wait: Option<Duration>,
}

impl MultiLockRequest {
    pub(crate) fn new(session: Session, keys: Vec<(String, Mode)>) -> Self {
        MultiLockRequest {
            session,
            keys,
            wait: None,
        }
    }

    /// Waits at most `wait` for all the keys, then fails with `Timeout`,
    /// holding none.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Takes every key if each is free now; `Ok(None)` (holding none) if
    /// any is held by another session.
    pub async fn try_lock(self) -> Result<Option<MultiGuard>> {
        take_all(self.session.inner, self.keys, Wait::TryOnce).await
    }

    async fn acquire(self) -> Result<MultiGuard> {
        let wait = match self.wait {
            Some(wait) => Wait::Until(Instant::now() + wait),
            None => Wait::Forever,
        };
        let guard = take_all(self.session.inner, self.keys, wait).await?;
        Ok(guard.expect("a waiting acquire ends with guards or an error"))
    }
}

impl IntoFuture for MultiLockRequest {
    type Output = Result<MultiGuard>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<MultiGuard>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.acquire())
    }
}

/// The keys in the order they are taken, each with its place in the
/// request; a clear error for an empty list, a key named twice, too many
/// keys, or a bad key.
fn canonical(keys: Vec<(String, Mode)>, max_keys: usize) -> Result<Vec<(usize, String, Mode)>> {
    if keys.is_empty() {
        return Err(Error::invalid_key(
            "lock_all was given no key; name at least one",
        ));
    }
    if keys.len() > max_keys {
        return Err(Error::config(format!(
            "lock_all was given {} keys, more than this session's limit of {max_keys}; raise it \
             with max_keys, or take fewer at once",
            keys.len()
        )));
    }
    let mut order: Vec<(usize, String, Mode)> = keys
        .into_iter()
        .enumerate()
        .map(|(place, (key, mode))| (place, key, mode))
        .collect();
    order.sort_by(|a, b| a.1.as_bytes().cmp(b.1.as_bytes()));
    for pair in order.windows(2) {
        if pair[0].1 == pair[1].1 {
            return Err(Error::invalid_key(format!(
                "lock_all was given the key '{}' twice; name each key once",
                pair[0].1
            )));
        }
    }
    for (_, key, _) in &order {
        crate::key::validate_key(key)?;
    }
    Ok(order)
}

async fn take_all(
    inner: Arc<SessionInner>,
    keys: Vec<(String, Mode)>,
    wait: Wait,
) -> Result<Option<MultiGuard>> {
    let order = canonical(keys, inner.config.max_keys)?;
    if inner.caps.atomic_lock_all && order.len() > 1 {
        if let Some(taken) = inner.acquire_all_at_once(&order, wait).await {
            let Some(mut taken) = taken? else {
                return Ok(None);
            };
            taken.sort_by_key(|(place, _)| *place);
            return Ok(Some(MultiGuard {
                guards: taken.into_iter().map(|(_, guard)| guard).collect(),
            }));
        }
    }
    loop {
        let Some(mut taken) = take_in_order(&inner, &order, wait).await? else {
            return Ok(None);
        };
        // A key taken early can be lost while a later one is waited for
        // (max_hold, a forced release, its lease): then none is kept, and
        // all are asked for again.
        if let Some((_, lost)) = taken.iter().find(|(_, guard)| !guard.is_held()) {
            tracing::debug!(
                key = lost.key(),
                "lock_all: a key was lost while waiting for the others"
            );
            give_back(taken).await;
            if matches!(wait, Wait::TryOnce) {
                return Ok(None);
            }
            continue;
        }
        taken.sort_by_key(|(place, _)| *place);
        return Ok(Some(MultiGuard {
            guards: taken.into_iter().map(|(_, guard)| guard).collect(),
        }));
    }
}

/// Takes the keys of `order` one after the other; each guard with its
/// place in the request. `None` (holding none) if one is busy under
/// `TryOnce`; an error (holding none) if one cannot be had.
async fn take_in_order(
    inner: &Arc<SessionInner>,
    order: &[(usize, String, Mode)],
    wait: Wait,
) -> Result<Option<Vec<(usize, Guard)>>> {
    // Dropped with this future, the guards taken give their keys back.
    let mut taken: Vec<(usize, Guard)> = Vec::with_capacity(order.len());
    for (place, key, mode) in order {
        let busy = match inner.acquire(key.clone(), *mode, wait).await {
            Ok(Some(guard)) => {
                taken.push((*place, guard));
                continue;
            }
            Ok(None) => None,
            Err(err) => Some(err),
        };
        give_back(taken).await;
        return match busy {
            None => Ok(None),
            Some(err) if err.kind() == ErrorKind::Timeout => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "timed out waiting for '{key}', one of the {} keys asked for; none of them \
                     is held",
                    order.len()
                ),
            )
            .with_source(err)),
            Some(err) => Err(err),
        };
    }
    Ok(Some(taken))
}

/// Releases `taken`, the last taken first; a release that fails is left
/// to the guard's background release.
async fn give_back(taken: Vec<(usize, Guard)>) {
    for (_, guard) in taken.into_iter().rev() {
        let key = guard.key().to_owned();
        if let Err(err) = guard.release().await {
            tracing::debug!(%key, "giving back a key of an incomplete lock_all: {err}");
        }
    }
}

/// Proof of holding every key of a [`Session::lock_all`] request, one
/// [`Guard`] per key in the order asked.
///
/// Dropping it releases every key in the background; prefer
/// [`release`](MultiGuard::release).
#[derive(Debug)]
#[must_use = "dropping a guard releases the locks"]
pub struct MultiGuard {
    guards: Vec<Guard>,
}

impl From<Guard> for MultiGuard {
    /// One key's guard, to hand to what takes a `MultiGuard`.
    fn from(guard: Guard) -> Self {
        MultiGuard {
            guards: vec![guard],
        }
    }
}

impl MultiGuard {
    /// One guard per key, in the order the request named them.
    pub fn guards(&self) -> &[Guard] {
        &self.guards
    }

    /// The guards, to release or keep one at a time.
    pub fn into_guards(self) -> Vec<Guard> {
        self.guards
    }

    /// The fencing token of `key`, if the request named it.
    pub fn token(&self, key: &str) -> Option<u64> {
        self.guards
            .iter()
            .find(|guard| guard.key() == key)
            .map(Guard::token)
    }

    /// Every key and its token, in the order asked.
    pub fn tokens(&self) -> Vec<(&str, u64)> {
        self.guards
            .iter()
            .map(|guard| (guard.key(), guard.token()))
            .collect()
    }

    /// Whether every key is still held.
    pub fn is_held(&self) -> bool {
        self.guards.iter().all(Guard::is_held)
    }

    /// The earliest of the keys' [`Guard::expires_at`].
    pub fn expires_at(&self) -> Option<Instant> {
        self.guards.iter().filter_map(Guard::expires_at).min()
    }

    /// Resolves when any of the keys is lost (see [`Guard::lost`]). Cancel
    /// safe.
    pub async fn lost(&self) {
        self.lost_owned().await;
    }

    /// [`lost`](MultiGuard::lost) as a future that owns what it needs, as
    /// [`Guard::lost_owned`].
    pub fn lost_owned(&self) -> impl Future<Output = ()> + Send + 'static {
        type Watch = Pin<Box<dyn Future<Output = ()> + Send>>;
        let mut watches: Vec<Watch> = self
            .guards
            .iter()
            .map(|guard| Box::pin(guard.lost_owned()) as Watch)
            .collect();
        std::future::poll_fn(move |cx| {
            if watches
                .iter_mut()
                .any(|watch| watch.as_mut().poll(cx).is_ready())
            {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// Releases every key; the first error, once every release was tried
    /// (`NotHeld` if a key was lost first).
    pub async fn release(self) -> Result<()> {
        let mut first = None;
        for guard in self.guards.into_iter().rev() {
            if let Err(err) = guard.release().await {
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exclusive(keys: &[&str]) -> Vec<(String, Mode)> {
        keys.iter().map(|key| key.key_mode()).collect()
    }

    #[test]
    fn keys_are_taken_in_byte_order_and_remember_their_place() {
        let order = canonical(exclusive(&["b", "a", "c"]), 8).expect("fine");
        let taken: Vec<(usize, &str)> = order
            .iter()
            .map(|(place, key, _)| (*place, key.as_str()))
            .collect();
        assert_eq!(taken, [(1, "a"), (0, "b"), (2, "c")]);
    }

    #[test]
    fn bad_lists_get_clear_errors() {
        let err = canonical(Vec::new(), 8).expect_err("empty");
        assert_eq!(err.kind(), ErrorKind::InvalidKey);
        assert!(err.to_string().contains("no key"), "{err}");
        let err = canonical(exclusive(&["a", "b", "a"]), 8).expect_err("twice");
        assert_eq!(err.kind(), ErrorKind::InvalidKey);
        assert!(err.to_string().contains("'a' twice"), "{err}");
        let twice = vec![
            ("a".to_owned(), Mode::Shared),
            ("a".to_owned(), Mode::Exclusive),
        ];
        assert!(canonical(twice, 8).is_err(), "a key twice in two modes");
        let err = canonical(exclusive(&["a", "b", "c"]), 2).expect_err("too many");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("limit of 2"), "{err}");
        let err = canonical(exclusive(&["a", ""]), 8).expect_err("bad key");
        assert_eq!(err.kind(), ErrorKind::InvalidKey);
    }

    /// The first key is lost (max_hold) while the second is waited for:
    /// what comes back is every key held, not a lost guard.
    #[tokio::test]
    async fn a_key_lost_while_waiting_for_the_next_is_asked_for_again() {
        use crate::{Client, MemoryStore};
        let client = Client::new(Arc::new(MemoryStore::new()));
        let holder = client.session().open().await.expect("open");
        let held = holder.lock("b").await.expect("b");
        let asker = client
            .session()
            .max_hold(Duration::from_millis(200))
            .open()
            .await
            .expect("open");
        let both = {
            let asker = asker.clone();
            tokio::spawn(async move {
                asker
                    .lock_all(["a", "b"])
                    .wait(Duration::from_secs(10))
                    .await
            })
        };
        // Past a's max_hold, then b comes free.
        tokio::time::sleep(Duration::from_millis(400)).await;
        held.release().await.expect("release b");
        let both = both.await.expect("task").expect("both");
        assert!(both.is_held(), "a guard came back lost: {both:?}");
        assert!(both.token("a").expect("a") > 1, "a was taken again");
        both.release().await.expect("release");
    }
}
