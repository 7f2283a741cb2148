//! TLS: a client that trusts the server's CA locks over `distlocks://`; a
//! plain client is refused with a clear error.

use std::sync::Arc;
use std::time::Duration;

use distlock_client::RemoteStore;
use distlock_core::{Client, ErrorKind};

/// A TLS server for `localhost` with a self-signed certificate; returns its
/// port and the certificate's path.
async fn tls_server(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let config = distlock_server::Config {
        data_dir: dir.join("data"),
        tls_cert: Some(cert.clone()),
        tls_key: Some(key),
        ..distlock_server::Config::default()
    };
    tokio::spawn(distlock_server::run(
        listener,
        config,
        std::future::pending(),
    ));
    (port, cert)
}

async fn connect(url: &str) -> distlock_core::Result<Client> {
    let url = url::Url::parse(url).expect("url");
    Ok(Client::new(Arc::new(RemoteStore::connect(&url).await?)))
}

#[tokio::test]
async fn locks_over_tls_with_the_servers_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, cert) = tls_server(dir.path()).await;
    let client = connect(&format!(
        "distlocks://localhost:{port}?ca={}",
        cert.display()
    ))
    .await
    .expect("TLS connect");
    let session = client.session().open().await.expect("open");
    let guard = session
        .lock("over-tls")
        .wait(Duration::from_secs(5))
        .await
        .expect("lock");
    assert!(guard.token() > 0);
    guard.release().await.expect("release");
}

#[tokio::test]
async fn a_plain_client_is_told_to_use_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, _cert) = tls_server(dir.path()).await;
    let err = connect(&format!("distlock://localhost:{port}"))
        .await
        .expect_err("a mux connection to a TLS server");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(
        err.to_string().contains("connect with distlocks://"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plain_grpc_client_cannot_use_a_tls_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, _cert) = tls_server(dir.path()).await;
    let failed = match connect(&format!("distlock://localhost:{port}?transport=grpc")).await {
        Err(err) => err,
        Ok(client) => client
            .session()
            .open()
            .await
            .expect_err("plain HTTP/2 to a TLS server"),
    };
    assert!(
        matches!(failed.kind(), ErrorKind::Unavailable | ErrorKind::Store),
        "{failed}"
    );
}

#[tokio::test]
async fn a_missing_ca_file_is_a_clear_config_error() {
    let err = connect("distlocks://localhost:7890?ca=/nonexistent/ca.pem")
        .await
        .expect_err("no such CA file");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string()
            .contains("cannot read the CA certificate /nonexistent/ca.pem"),
        "{err}"
    );
}
