//! Token checks the stores' fault tests share, and a store's server killed
//! and started again under a holder (for the stores whose sessions outlive
//! a connection: etcd, ZooKeeper).

use std::time::Duration;

use distlock_core::{Client, ErrorKind, Session};

/// Takes `key` `times` times in a row, each by a new session of `client`
/// that finds it free; the tokens, in order.
pub async fn take_in_turn(client: &Client, key: &str, times: usize) -> Vec<u64> {
    let mut tokens = Vec::with_capacity(times);
    for _ in 0..times {
        let session = client.session().open().await.expect("open");
        tokens.push(take_once(&session, key).await);
    }
    tokens
}

/// Takes `key`, which `session` finds free, and gives it back; its token.
pub async fn take_once(session: &Session, key: &str) -> u64 {
    let guard = session
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let token = guard.token();
    guard.release().await.expect("release");
    token
}

/// Fails unless `tokens` rise strictly.
pub fn assert_rising(tokens: &[u64]) {
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens went back: {tokens:?}"
    );
}

/// Takes `key` a few times, holds it with a session of `hold_ttl`, has
/// `restart` kill the server and start it again (it gets `server` and
/// returns the new one), and checks: tokens rise strictly across all of it,
/// and after the restart the holder either keeps the lock or no longer
/// says it holds it, never both with another holder. Returns the server.
pub async fn tokens_rise_and_the_holder_stays_honest<S: Send + 'static>(
    client: &Client,
    key: &str,
    hold_ttl: Duration,
    server: S,
    restart: impl FnOnce(S) -> S + Send + 'static,
) -> S {
    let mut tokens = take_in_turn(client, key, 3).await;
    let holder = client.session().ttl(hold_ttl).open().await.expect("open");
    let held = holder
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    tokens.push(held.token());
    let server = tokio::task::spawn_blocking(move || restart(server))
        .await
        .expect("restart");
    // Back within the lease: the holder either keeps the lock or is told
    // it lost it, never silently both.
    let other = client
        .session()
        .open()
        .await
        .expect("open after the restart");
    let taken = loop {
        match other.lock(key).try_lock().await {
            Ok(taken) => break taken,
            Err(err) => {
                assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    match taken {
        Some(guard) => {
            assert!(!held.is_held(), "two holders after the restart");
            tokens.push(guard.token());
            guard.release().await.expect("release");
        }
        // Still held at the store: by the holder, which, if it still says
        // so, can release it.
        None if held.is_held() => held.release().await.expect("the holder kept the lock"),
        None => drop(held),
    }
    let session = client.session().open().await.expect("open");
    let guard = session
        .lock(key)
        .wait(Duration::from_secs(30))
        .await
        .expect("granted after the restart");
    tokens.push(guard.token());
    assert_rising(&tokens);
    server
}
