//! `rediss://`: TLS to Redis, trusting the CA the URL names.

use distlock_core::ErrorKind;
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;

#[tokio::test]
async fn locks_over_tls_with_the_servers_ca_and_refuses_without_it() {
    let (server, cert) = Redis::start_tls();
    let url = format!("rediss://localhost:{}?ca={}", server.port(), cert.display());
    let store = RedisStore::connect(&url).await.expect("connect over TLS");
    let client = distlock_core::Client::new(std::sync::Arc::new(store));
    let session = client.session().open().await.expect("open");
    let guard = session
        .lock("tls/key")
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    assert!(guard.token() > 0);
    guard.release().await.expect("release");

    // Without the CA the certificate is not trusted.
    let untrusted = format!("rediss://localhost:{}", server.port());
    let err = RedisStore::connect(&untrusted)
        .await
        .expect_err("a self-signed certificate");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    let missing = format!(
        "rediss://localhost:{}?ca=/nonexistent/ca.pem",
        server.port()
    );
    let err = RedisStore::connect(&missing).await.expect_err("no CA file");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}
