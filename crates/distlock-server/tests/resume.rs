//! A session survives a dropped connection: its client takes it back on a
//! new one within the lease, on both transports, through the test kit's
//! proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use distlock_client::RemoteStore;
use distlock_core::status::StatusQuery;
use distlock_core::Client;
use distlock_testkit::proxy::{Fault, Proxy};
use tokio::time::{sleep, timeout};

/// A server on its own port, for this test binary.
async fn start_server() -> SocketAddr {
    let data = tempfile::tempdir().expect("temp dir").keep();
    distlock_testkit::daemon::remove_when_this_process_exits(&data);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let config = distlock_server::Config {
        data_dir: data,
        ..distlock_server::Config::default()
    };
    tokio::spawn(distlock_server::run(
        listener,
        config,
        std::future::pending(),
    ));
    address
}

async fn client(address: SocketAddr, query: &str) -> Client {
    let url = url::Url::parse(&format!("distlock://{address}{query}")).expect("url");
    Client::new(Arc::new(RemoteStore::connect(&url).await.expect("connect")))
}

const TTL: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_shorter_than_the_lease_loses_nothing() {
    let server = start_server().await;
    for query in ["", "?transport=grpc"] {
        let proxy = Proxy::start(server).await;
        let through = client(proxy.addr(), query).await;
        let direct = client(server, query).await;
        let holder = through.session().ttl(TTL).open().await.expect("open");
        let rival = direct.session().ttl(TTL).open().await.expect("open");
        let key = format!("resume/held{query}");
        let wanted = format!("resume/wanted{query}");
        let guard = holder.lock(&key).await.expect("free");
        let blocker = rival.lock(&wanted).await.expect("free");
        // The rival waits for the holder's key; the holder waits for the
        // rival's.
        let rival_waits = {
            let (rival, key) = (rival.clone(), key.clone());
            tokio::spawn(async move { rival.lock(&key).wait(Duration::from_secs(30)).await })
        };
        let holder_waits = {
            let (holder, wanted) = (holder.clone(), wanted.clone());
            tokio::spawn(async move { holder.lock(&wanted).wait(Duration::from_secs(30)).await })
        };
        sleep(Duration::from_millis(200)).await;

        proxy.reset();
        // Past the lease the reset would have ended without a resume.
        tokio::select! {
            () = guard.lost() => panic!("{query}: lost() fired for a reset shorter than the lease"),
            () = sleep(TTL + Duration::from_secs(1)) => {}
        }
        assert!(guard.is_held(), "{query}: still held");
        assert!(
            !rival_waits.is_finished(),
            "{query}: nobody else was granted the key"
        );
        let status = direct
            .status(&StatusQuery::Key(key.clone()))
            .await
            .expect("status");
        assert_eq!(
            status.keys[0].holders[0].token,
            Some(guard.token()),
            "{query}: the same hold, with its token"
        );

        // The waiting acquire kept waiting, and is granted on the new
        // connection.
        blocker.release().await.expect("release");
        let taken = timeout(Duration::from_secs(10), holder_waits)
            .await
            .expect("the holder's wait ends")
            .expect("task")
            .expect("granted after the resume");
        taken.release().await.expect("release");
        let token = guard.token();
        guard
            .release()
            .await
            .expect("an owner-checked release works after the resume");
        let next = rival_waits
            .await
            .expect("task")
            .expect("the rival gets the key once released");
        assert!(next.token() > token);
        next.release().await.expect("release");
        holder.close().await.expect("close");
        rival.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_longer_than_the_lease_ends_in_lost_before_the_key_moves() {
    let server = start_server().await;
    for query in ["", "?transport=grpc"] {
        let proxy = Proxy::start(server).await;
        let through = client(proxy.addr(), query).await;
        let direct = client(server, query).await;
        let holder = through.session().ttl(TTL).open().await.expect("open");
        let key = format!("resume/cut{query}");
        let guard = holder.lock(&key).await.expect("free");
        proxy.set(Fault::Blackhole);
        let rival = direct.session().ttl(TTL).open().await.expect("open");
        let taken = rival
            .lock(&key)
            .wait(Duration::from_secs(30))
            .await
            .expect("the key moves on once the lease ran out");
        assert!(
            !guard.is_held(),
            "{query}: lost() came before the key moved"
        );
        assert!(taken.token() > guard.token());
        proxy.set(Fault::None);
        // The session cannot come back: the server ended it.
        let again = holder.lock(format!("{key}/other")).try_lock().await;
        assert!(
            again.is_err(),
            "{query}: a lost session stays lost: {again:?}"
        );
        taken.release().await.expect("release");
        rival.close().await.expect("close");
    }
}
