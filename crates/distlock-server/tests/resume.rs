//! A session survives a dropped connection: its client takes it back on a
//! new one within the lease, on both transports, through the test kit's
//! proxy. A session does not survive a restart of the server, which then
//! grants nothing until every lease from before has run out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock_client::RemoteStore;
use distlock_core::status::StatusQuery;
use distlock_core::Client;
use distlock_testkit::proxy::{Fault, Proxy};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, sleep_until, timeout, Instant};

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

/// A port that carries every connection to `upstream`, and how many
/// connections were made to it: what clients cost the server.
async fn counting(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let made = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&made);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (address, made)
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_resume_cut_short_is_tried_again() {
    let server = start_server().await;
    let proxy = Proxy::start(server).await;
    let through = client(proxy.addr(), "?transport=grpc").await;
    let holder = through.session().ttl(TTL).open().await.expect("open");
    let guard = holder.lock("resume/cut-short").await.expect("free");
    proxy.set(Fault::Blackhole);
    proxy.reset();
    // The first resume hangs; its connection is then cut (a transport
    // error, not the server's answer).
    sleep(Duration::from_millis(1500)).await;
    proxy.reset();
    proxy.set(Fault::None);
    guard
        .release()
        .await
        .expect("the session was resumed on a later try");
    holder.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_need_a_connection_while_a_connect_hangs_share_it() {
    let server = start_server().await;
    let proxy = Proxy::start(server).await;
    let (counted, made) = counting(proxy.addr()).await;
    let store = client(counted, "").await;
    assert_eq!(made.load(Ordering::SeqCst), 1);
    // The connection ends, and a new one would hang in its handshake.
    proxy.set(Fault::Blackhole);
    proxy.reset();
    sleep(Duration::from_millis(500)).await;
    let opens: Vec<_> = (0..5)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.session().ttl(TTL).open().await })
        })
        .collect();
    for open in opens {
        let opened = open.await.expect("task");
        assert!(opened.is_err(), "no session over a hanging connect");
    }
    // One connect for all five, each failing at its timeout: not one after
    // another, nor one each.
    assert_eq!(
        made.load(Ordering::SeqCst),
        2,
        "the sessions waited for the one connect under way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_again_at_once_is_tried_again_after_a_backoff() {
    let server = start_server().await;
    let proxy = Proxy::start(server).await;
    let (counted, made) = counting(proxy.addr()).await;
    let through = client(counted, "").await;
    let holder = through
        .session()
        .ttl(Duration::from_secs(10))
        .open()
        .await
        .expect("open");
    let guard = holder.lock("resume/flapping").await.expect("free");
    let before = made.load(Ordering::SeqCst);
    // Every resumed stream breaks again within 20 ms, for 3 s.
    let flapping = Instant::now() + Duration::from_secs(3);
    while Instant::now() < flapping {
        proxy.reset();
        sleep(Duration::from_millis(20)).await;
    }
    let resumes = made.load(Ordering::SeqCst) - before;
    // Without backoff between breaks that is one connection per break
    // (about 150); with it, about 8.
    assert!(
        resumes <= 20,
        "{resumes} connections in 3 s of breaks: the resumer did not back off"
    );
    guard
        .release()
        .await
        .expect("the session was resumed once the breaks stopped");
    holder.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_not_taken_back_once_its_client_saw_it_lost() {
    const LEASE: Duration = Duration::from_secs(6);
    let server = start_server().await;
    for query in ["", "?transport=grpc"] {
        let proxy = Proxy::start(server).await;
        let through = client(proxy.addr(), query).await;
        let direct = client(server, query).await;
        let holder = through
            .session()
            .ttl(LEASE)
            .lock_delay(Duration::ZERO)
            .open()
            .await
            .expect("open");
        let key = format!("resume/after-lost{query}");
        let guard = holder.lock(&key).await.expect("free");
        // A renewal that takes 1 s each way: the server's lease then ends
        // 1 s after the client's, which counts from the send.
        proxy.set(Fault::Delay(Duration::from_secs(1)));
        let first = holder.lease_deadline();
        timeout(Duration::from_secs(20), async {
            while holder.lease_deadline() == first {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a renewal succeeds through the delay");
        // Cut at once, before the next renewal gets through.
        proxy.set(Fault::Blackhole);
        proxy.reset();
        let lost_by = holder.lease_deadline().expect("a lease");
        timeout(LEASE, guard.lost())
            .await
            .expect("lost() at the client's lease end");
        // The way to the server is open again while its lease still runs.
        proxy.reset();
        proxy.set(Fault::None);
        // Past the server's lease end, well before a lease renewed by a
        // resume after lost() would end.
        sleep_until(lost_by + Duration::from_millis(3500)).await;
        let status = direct
            .status(&StatusQuery::Key(key.clone()))
            .await
            .expect("status");
        let holders = status.keys.first().map_or(0, |key| key.holders.len());
        assert_eq!(
            holders, 0,
            "{query}: the session was taken back after lost(), holding the key for nobody"
        );
    }
}

/// A server restarted on the same data grants nothing while a holder from
/// before may still believe it holds: not before that session's lease has
/// run out, and then above every token it handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_grants_nothing_until_the_leases_from_before_ran_out() {
    let data = tempfile::tempdir().expect("temp dir");
    let start = |data: std::path::PathBuf| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let config = distlock_server::Config {
            data_dir: data,
            ..distlock_server::Config::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(distlock_server::run(listener, config, async {
            let _ = stopped.await;
        }));
        (address, stop, running)
    };
    let (first, stop, running) = start(data.path().to_owned()).await;
    let before = client(first, "").await;
    let holder = before.session().ttl(TTL).open().await.expect("open");
    let guard = holder.lock("resume/restart").await.expect("free");
    let _ = stop.send(());
    timeout(Duration::from_secs(10), running)
        .await
        .expect("the server stops, its streams ended")
        .expect("server task")
        .expect("a clean stop");

    let (second, _stop, _running) = start(data.path().to_owned()).await;
    let restarted = Instant::now();
    let after = client(second, "").await;
    let session = after.session().ttl(TTL).open().await.expect("open");
    let early = session.lock("resume/restart").try_lock().await;
    assert!(
        matches!(early, Ok(None)),
        "granted at once after a restart: {early:?}"
    );
    let taken = session
        .lock("resume/restart")
        .wait(Duration::from_secs(30))
        .await
        .expect("granted once the leases from before ran out");
    assert!(
        restarted.elapsed() >= TTL - Duration::from_secs(1),
        "granted {:?} after the restart, within the {TTL:?} lease",
        restarted.elapsed()
    );
    assert!(taken.token() > guard.token());
}
