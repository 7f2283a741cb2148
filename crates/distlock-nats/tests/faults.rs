//! NATS when things go wrong: a holder whose process froze, entries left by
//! a session that ended, a restart of the server, and bad URLs, servers and
//! streams.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::status::StatusQuery;
use distlock_core::{Client, ErrorKind};
use distlock_nats::NatsStore;
use distlock_testkit::restart::tokens_rise_and_the_holder_stays_honest;
use distlock_testkit::servers::Nats;
use futures::StreamExt;
use tokio::time::timeout;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(NatsStore::connect(url).await.expect("connect")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_the_end_of_a_frozen_holders_lease() {
    let client = client(&Nats::shared().url()).await;
    let key = "faults/frozen";
    let frozen = client
        .session()
        .ttl(Duration::from_secs(1))
        .open()
        .await
        .expect("open");
    let held = frozen
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiter = client.session().open().await.expect("open");
    let waiting = tokio::spawn(async move {
        let guard = waiter.lock(key).wait(Duration::from_secs(30)).await;
        guard.map(|guard| guard.token())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    frozen.freeze_for_test();
    // Within less than a watch slice (5 s): the server's delete marker for
    // the expired session wakes the waiter, which does not poll.
    let token = timeout(Duration::from_secs(4), waiting)
        .await
        .expect("woken by the lease's end, not by a slice")
        .expect("waiter task")
        .expect("granted once the holder's lease ran out");
    assert!(token > held.token(), "{token} after {}", held.token());
    assert!(!held.is_held(), "the frozen holder still says it holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_takes_out_the_entry_of_a_session_that_ended() {
    let client = client(&Nats::shared().url()).await;
    let key = "faults/ended";
    let frozen = client
        .session()
        .ttl(Duration::from_secs(1))
        .owner("frozen")
        .open()
        .await
        .expect("open");
    let held = frozen
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    frozen.freeze_for_test();
    // Nobody waits: the entry stays until someone finds it, after the
    // lease (1 s at the server) has run out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Status already leaves the ended session's entry out.
    let before = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status");
    let listed = before.keys.iter().flat_map(|key| &key.holders).count();
    assert_eq!(listed, 0, "{before:?}");
    let other = client.session().owner("other").open().await.expect("open");
    let taken = other
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("the ended session's entry was taken out");
    assert!(taken.token() > held.token());
    let status = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status");
    let holders: Vec<&str> = status.keys[0]
        .holders
        .iter()
        .map(|holder| holder.owner.as_str())
        .collect();
    assert_eq!(holders, ["other"], "{status:?}");
    assert!(status.keys[0].waiters.is_empty(), "{status:?}");
    // Read from the session's last message and its TTL.
    let left = status.keys[0].holders[0].lease_left;
    let left = left.expect("the holder's lease has time left");
    assert!(
        left > Duration::ZERO && left <= distlock_core::DEFAULT_TTL,
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_across_a_crash_of_the_server() {
    let server = Nats::start();
    let client = client(&server.url()).await;
    let server = tokens_rise_and_the_holder_stays_honest(
        &client,
        "faults/restart",
        Duration::from_secs(10),
        server,
        Nats::crash_and_restart,
    )
    .await;
    drop(server);
}

#[tokio::test]
async fn bad_urls_are_config_errors_that_say_what_to_write() {
    for bad in [
        "nats://",
        "nats://127.0.0.1",
        "nats://127.0.0.1:x",
        "nats://127.0.0.1:4222?replicas=7",
        "nats://127.0.0.1:4222?bucket=x",
    ] {
        let err = NatsStore::connect(bad).await.expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::Config, "{bad}: {err}");
        assert!(err.to_string().contains("nats://"), "{bad}: {err}");
    }
}

#[tokio::test]
async fn a_dead_server_or_something_else_is_unavailable_and_says_so() {
    // A port nothing listens on.
    let port = distlock_testkit::daemon::free_port();
    let err = NatsStore::connect(&format!("nats://127.0.0.1:{port}"))
        .await
        .expect_err("nothing there");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("is it running?"), "{err}");
    // A port that answers, but not as NATS does.
    let port = distlock_testkit::daemon::not_a_store().await;
    let err = NatsStore::connect(&format!("nats://127.0.0.1:{port}"))
        .await
        .expect_err("not NATS");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

#[tokio::test]
async fn a_server_without_jetstream_is_refused_with_the_flag_to_use() {
    let server = Nats::start_without_jetstream();
    let err = NatsStore::connect(&server.url())
        .await
        .expect_err("no JetStream");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("--jetstream"), "{err}");
}

/// The error of a connect to a new server on which a stream `name`, made
/// by hand with defaults, already takes the store's subjects.
async fn refused_beside_a_stream(name: &str) -> distlock_core::Error {
    let server = Nats::start();
    let nats = async_nats::connect(format!("127.0.0.1:{}", server.port()))
        .await
        .expect("connect");
    async_nats::jetstream::new(nats)
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec!["distlock.>".into()],
            ..Default::default()
        })
        .await
        .expect("a stream of another making");
    NatsStore::connect(&server.url())
        .await
        .expect_err("a stream made otherwise")
}

#[tokio::test]
async fn a_stream_made_otherwise_is_refused() {
    // It lacks TTLs, among others.
    let err = refused_beside_a_stream("DISTLOCK").await;
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("DISTLOCK"), "{err}");
}

/// A stream as the store makes it, but for what `change` does.
async fn refused_stream(change: impl FnOnce(&mut async_nats::jetstream::stream::Config)) -> String {
    use async_nats::jetstream::stream;
    let server = Nats::start();
    let nats = async_nats::connect(format!("127.0.0.1:{}", server.port()))
        .await
        .expect("connect");
    let mut config = stream::Config {
        name: "DISTLOCK".into(),
        subjects: vec!["distlock.>".into()],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        allow_direct: true,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    change(&mut config);
    async_nats::jetstream::new(nats)
        .create_stream(config)
        .await
        .expect("a stream of another making");
    let err = NatsStore::connect(&server.url())
        .await
        .expect_err("the stream would lose entries");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    err.to_string()
}

#[tokio::test]
async fn a_stream_that_would_lose_entries_is_refused_with_what_to_change() {
    use async_nats::jetstream::stream::StorageType;
    let err = refused_stream(|config| config.storage = StorageType::Memory).await;
    assert!(err.contains("memory") && err.contains("delete it"), "{err}");
    let err = refused_stream(|config| config.max_age = Duration::from_secs(3600)).await;
    assert!(err.contains("--max-age=0"), "{err}");
    let err = refused_stream(|config| config.max_bytes = 1 << 20).await;
    assert!(err.contains("--max-bytes=-1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_leave_no_consumer_behind() {
    let server = Nats::start();
    let client = client(&server.url()).await;
    let key = "faults/consumers";
    let holder = client.session().open().await.expect("open");
    let mut waiters = Vec::new();
    for _ in 0..4 {
        let session = client.session().open().await.expect("open");
        waiters.push(tokio::spawn(async move {
            let guard = session.lock(key).wait(Duration::from_secs(30)).await;
            guard.expect("granted").release().await.expect("release");
            session.close().await.expect("close");
        }));
    }
    let held = holder.lock(key).wait(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.expect("held").release().await.expect("release");
    for waiter in waiters {
        waiter.await.expect("waiter");
    }
    holder.close().await.expect("close");
    // Deleted in the background: soon, not at once. Within 6 s, before the
    // server's 10 s inactive threshold would remove them: the client's
    // own deletes are what is checked.
    let nats = async_nats::connect(format!("127.0.0.1:{}", server.port()))
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(nats);
    let mut left = u64::MAX;
    for _ in 0..60 {
        let mut stream = js.get_stream("DISTLOCK").await.expect("stream");
        left = stream.info().await.expect("info").state.consumer_count as u64;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "consumers left behind");
}

/// A holder of `key` and a waiter with `wait`, exclusive or, with
/// `permits`, a semaphore, in sessions whose leases outlast any test here
/// (no renewal falls due): the holder's guard and the waiter's wait (its
/// token once granted).
async fn held_and_waited_for(
    client: &Client,
    key: &'static str,
    permits: Option<u32>,
    wait: Duration,
) -> (
    distlock_core::Guard,
    tokio::task::JoinHandle<distlock_core::Result<u64>>,
) {
    let long = Duration::from_secs(60);
    let request = move |session: &distlock_core::Session| match permits {
        Some(permits) => session.semaphore(key, permits),
        None => session.lock(key),
    };
    let holder = client.session().ttl(long).open().await.expect("open");
    let held = request(&holder)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiter = client.session().ttl(long).open().await.expect("open");
    let waiting = tokio::spawn(async move {
        let guard = request(&waiter).wait(wait).await;
        guard.map(|guard| guard.token())
    });
    (held, waiting)
}

/// Releases `held` and expects `waiting` to be granted soon, above it.
async fn handed_over(
    held: distlock_core::Guard,
    waiting: tokio::task::JoinHandle<distlock_core::Result<u64>>,
) {
    let first = held.token();
    held.release().await.expect("release");
    let token = timeout(Duration::from_secs(10), waiting)
        .await
        .expect("granted soon after the release")
        .expect("waiter task")
        .expect("granted");
    assert!(token > first, "{token} after {first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_asks_nothing_of_the_server_between_its_reads() {
    let server = Nats::start();
    let client = client(&server.url()).await;
    // Everything a client sends the server: JetStream's API and the
    // store's own subjects.
    let nats = async_nats::connect(format!("127.0.0.1:{}", server.port()))
        .await
        .expect("connect");
    let api = nats.subscribe("$JS.API.>").await.expect("subscribe");
    let own = nats.subscribe("distlock.>").await.expect("subscribe");
    nats.flush().await.expect("flush");
    let mut sent = futures::stream::select(api, own).map(|message| message.subject.to_string());
    let (held, waiting) =
        held_and_waited_for(&client, "faults/quiet", None, Duration::from_secs(30)).await;
    // From the moment the wait makes its consumer...
    let made = timeout(Duration::from_secs(10), async {
        while let Some(subject) = sent.next().await {
            if subject.contains("distlock-wait-") {
                return;
            }
        }
    });
    made.await.expect("the wait made its consumer");
    // ...for 3 s, before its 5 s slice ends or heartbeats are missed, it
    // asks nothing. One that polled, woke on its consumer's heartbeats
    // (every second) or renewed in a loop would show here. The sessions'
    // holds watches, made as they opened, may still be on their way.
    let window = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(window);
    let mut asked = Vec::new();
    loop {
        let subject = tokio::select! {
            Some(subject) = sent.next() => subject,
            () = &mut window => break,
        };
        if !subject.contains("distlock-holds-") {
            asked.push(subject);
        }
    }
    assert!(asked.is_empty(), "asked between reads: {asked:?}");
    handed_over(held, waiting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_watches_only_what_it_needs_and_takes_no_acks() {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
    let server = Nats::start();
    // A writer waits for the one entry ahead; a semaphore's waiter, for
    // any change ahead.
    let client = client(&server.url()).await;
    let long = Duration::from_secs(30);
    let exclusive = held_and_waited_for(&client, "faults/consumers-made", None, long).await;
    let semaphore = held_and_waited_for(&client, "faults/permits-made", Some(1), long).await;
    let nats = async_nats::connect(format!("127.0.0.1:{}", server.port()))
        .await
        .expect("connect");
    let stream = async_nats::jetstream::new(nats)
        .get_stream("DISTLOCK")
        .await
        .expect("stream");
    // Each of the four sessions makes its holds watch as it opens, and each
    // wait its consumer once it has read the queue: looked for until all
    // six are there (an old consumer's background delete may linger).
    let mut configs = Vec::new();
    for _ in 0..50 {
        configs = Vec::new();
        let mut infos = stream.consumers();
        while let Some(info) = infos.next().await {
            configs.push(info.expect("consumer info").config);
        }
        if configs.len() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut holds, mut entry_waits, mut any_waits) = (0, 0, 0);
    for config in configs {
        let name = config.name.clone().unwrap_or_default();
        // Without acks nothing is sent again or waits for an ack; headers
        // only and in memory, a delivery costs the least.
        assert_eq!(config.ack_policy, AckPolicy::None, "{name}");
        assert!(config.headers_only, "{name}");
        assert!(config.memory_storage, "{name}");
        assert_eq!(config.num_replicas, 1, "{name}");
        assert_eq!(config.inactive_threshold, Duration::from_secs(10), "{name}");
        assert!(
            matches!(config.deliver_policy, DeliverPolicy::ByStartSequence { .. }),
            "{name}: {:?}",
            config.deliver_policy
        );
        if name.starts_with("distlock-holds-") {
            holds += 1;
            // The notices of the session's own entries, of any lock.
            let filter = &config.filter_subject;
            assert!(
                filter.starts_with("distlock.g.*.") && filter.ends_with(".*"),
                "{name}: {filter}"
            );
            assert_eq!(config.idle_heartbeat, Duration::from_secs(5), "{name}");
        } else if name.starts_with("distlock-wait-") {
            // The notice of the one entry ahead, or of every entry of the
            // lock; and the session of each entry ahead.
            let filters = &config.filter_subjects;
            assert_eq!(filters.len(), 2, "{name}: {filters:?}");
            let notices = &filters[0];
            assert!(notices.starts_with("distlock.g."), "{name}: {filters:?}");
            match notices.strip_suffix(".>") {
                Some(lock) => {
                    any_waits += 1;
                    assert!(!lock.contains(['*', '>']), "{name}: {filters:?}");
                }
                None => {
                    entry_waits += 1;
                    assert!(!notices.contains(['*', '>']), "{name}: {filters:?}");
                }
            }
            assert!(filters[1].starts_with("distlock.s."), "{name}: {filters:?}");
            assert_eq!(config.idle_heartbeat, Duration::from_secs(1), "{name}");
        } else {
            panic!("a consumer the store did not make: {name}");
        }
    }
    assert_eq!(
        (holds, entry_waits, any_waits),
        (4, 1, 1),
        "a holds watch per session, one wait of each kind"
    );
    handed_over(exclusive.0, exclusive.1).await;
    handed_over(semaphore.0, semaphore.1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_page_through_a_queue_longer_than_one_batch() {
    // A read asks for 256 entries at a time: 260 readers make two pages.
    // Each reader's try reads the queue up to its own entry, and status
    // reads it all. Leases of a minute: no renewal falls due.
    const READERS: usize = 260;
    let server = Nats::start();
    let client = client(&server.url()).await;
    let key = "faults/long-queue";
    let mut guards = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let session = client
            .session()
            .ttl(Duration::from_secs(60))
            .open()
            .await
            .expect("open");
        let tried = timeout(Duration::from_secs(10), session.read(key).try_lock()).await;
        let guard = tried.expect("a try that ends").expect("try");
        guards.push((session, guard.expect("readers share the key")));
    }
    let status = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status");
    let tokens: std::collections::BTreeSet<u64> = status.keys[0]
        .holders
        .iter()
        .filter_map(|holder| holder.token)
        .collect();
    assert_eq!(status.keys[0].holders.len(), READERS, "each reader once");
    assert_eq!(tokens.len(), READERS, "each reader once");
    let writer = client.session().open().await.expect("open");
    let tried = timeout(Duration::from_secs(10), writer.write(key).try_lock())
        .await
        .expect("a try that ends")
        .expect("try");
    assert!(tried.is_none(), "a writer granted beside {READERS} readers");
    for (session, guard) in guards {
        drop(guard);
        session.close().await.expect("close");
    }
}

#[tokio::test]
async fn a_stores_debug_form_names_its_servers_not_its_password() {
    let server = Nats::start();
    // A server without auth takes any credentials.
    let url = format!("nats://app:s3cret@127.0.0.1:{}", server.port());
    let store = NatsStore::connect(&url).await.expect("connect");
    let shown = format!("{store:?}");
    let bare = format!("127.0.0.1:{}", server.port());
    assert!(
        shown.contains("NatsStore") && shown.contains(&bare),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_rides_out_a_server_that_stops_answering_for_a_while() {
    let server = Nats::start();
    let client = client(&server.url()).await;
    let key = "faults/paused-under-a-wait";
    let (held, waiting) = held_and_waited_for(&client, key, None, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Past three missed heartbeats of the wait's consumer (3 s) and then a
    // call's 5 s limit, with room: a read fails, and the wait asks again.
    server.pause();
    tokio::time::sleep(Duration::from_secs(12)).await;
    server.resume();
    assert!(
        !waiting.is_finished(),
        "the wait ended: {:?}",
        waiting.await
    );
    handed_over(held, waiting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_ends_at_its_deadline_while_the_server_does_not_answer() {
    let server = Nats::start();
    let client = client(&server.url()).await;
    let key = "faults/paused-past-a-deadline";
    let (held, waiting) = held_and_waited_for(&client, key, None, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.pause();
    // The first call to fail (at its 5 s limit) ends the wait, whose 2 s
    // have run out, while the server is still paused: it does not ride on
    // until the server answers again.
    let ended = timeout(Duration::from_secs(20), waiting).await;
    server.resume();
    let err = ended
        .expect("the wait ended while the server was paused")
        .expect("waiter task")
        .expect_err("nothing was granted");
    assert!(
        matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "{err}"
    );
    drop(held);
}

#[tokio::test]
async fn more_copies_than_servers_is_a_config_error_that_says_what_to_write() {
    let server = Nats::start();
    let url = format!("{}?replicas=3", server.url());
    let err = NatsStore::connect(&url)
        .await
        .expect_err("a lone server keeps one copy");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("?replicas=N"), "{err}");
}

#[tokio::test]
async fn a_stream_refused_for_another_reason_says_the_servers_reason() {
    // Another stream takes the store's subjects.
    let err = refused_beside_a_stream("OTHER").await;
    let said = err.to_string();
    assert!(
        said.contains("overlap") && said.contains("DISTLOCK"),
        "{said}"
    );
    assert!(!said.contains("replicas"), "not a matter of copies: {said}");
}
