//! Bad input gets a clear gRPC status or `Failed` event, and the server
//! keeps serving. Here too, on streams spoken by hand, what the server
//! does on its own: ending a hold at `max_hold`, and a wait whose stream
//! broke.

use std::time::Duration;

use distlock_proto::v1 as proto;
use proto::locks_client::LocksClient;
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

mod common;
use common::{acquire, open, release, waiting};

const SECRET: &str = "open sesame";

async fn start_server() -> String {
    start_server_with(Some(SECRET)).await
}

/// A server with small limits (64-byte keys) and `secret`, if any.
async fn start_server_with(secret: Option<&str>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    // The server task owns its data dir: both go when the test's runtime ends.
    let data = tempfile::tempdir().expect("temp dir");
    let config = distlock_server::Config {
        data_dir: data.path().to_owned(),
        auth_token: secret.map(str::to_owned),
        max_key_bytes: 64,
        max_message_bytes: 64 * 1024,
        max_ttl: Duration::from_secs(60),
        ..distlock_server::Config::default()
    };
    tokio::spawn(async move {
        let _data = data;
        distlock_server::run(listener, config, std::future::pending()).await
    });
    address
}

async fn client(address: &str) -> LocksClient<Channel> {
    LocksClient::connect(format!("http://{address}"))
        .await
        .expect("connect")
}

fn authorized<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {secret}").parse().expect("ascii");
    request.metadata_mut().insert("authorization", value);
    request
}

/// A session stream: send requests, read events.
struct Stream {
    requests: mpsc::UnboundedSender<proto::SessionRequest>,
    events: Streaming<proto::SessionEvent>,
}

impl Stream {
    async fn open(address: &str, first: Request) -> Result<Stream, tonic::Status> {
        let (requests, outgoing) = mpsc::unbounded_channel();
        requests
            .send(proto::SessionRequest {
                id: 1,
                body: Some(first),
            })
            .expect("queue");
        let stream = authorized(UnboundedReceiverStream::new(outgoing), SECRET);
        let events = client(address).await.session(stream).await?.into_inner();
        Ok(Stream { requests, events })
    }

    async fn next(&mut self) -> Result<Event, tonic::Status> {
        let event = self.events.message().await?.expect("an event");
        Ok(event.body.expect("a body"))
    }

    async fn ask(&mut self, id: u64, body: Request) -> Event {
        self.requests
            .send(proto::SessionRequest {
                id,
                body: Some(body),
            })
            .expect("send");
        self.next().await.expect("an answer")
    }
}

fn failed(event: Event) -> proto::Failed {
    match event {
        Event::Failed(failed) => failed,
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// A working session on the same server, to show it keeps serving.
async fn still_serving(address: &str) {
    let mut stream = Stream::open(address, open(5_000)).await.expect("open");
    assert!(matches!(stream.next().await, Ok(Event::Opened(_))));
    assert!(matches!(
        stream.ask(2, acquire("still-serving")).await,
        Event::Granted(_)
    ));
}

#[tokio::test]
async fn bad_ttls_are_refused_with_the_range() {
    let address = start_server().await;
    for ttl_ms in [0, 3_600_000] {
        let mut stream = Stream::open(&address, open(ttl_ms)).await.expect("stream");
        let status = stream.next().await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("this server accepts 50ms to 60s"),
            "{status:?}"
        );
    }
    // The ends of the range are in it.
    for ttl_ms in [50, 60_000] {
        let mut stream = Stream::open(&address, open(ttl_ms)).await.expect("stream");
        let opened = stream.next().await;
        assert!(
            matches!(opened, Ok(Event::Opened(_))),
            "{ttl_ms}: {opened:?}"
        );
    }
    // So is the longest lock-delay (60 s by default); a millisecond more
    // is not.
    for (lock_delay_ms, taken) in [(60_000, true), (60_001, false)] {
        let first = Request::Open(proto::Open {
            ttl_ms: 5_000,
            lock_delay_ms,
            max_hold_ms: 0,
            owner: String::new(),
        });
        let mut stream = Stream::open(&address, first).await.expect("stream");
        let opened = stream.next().await;
        match opened {
            Ok(Event::Opened(_)) => assert!(taken, "{lock_delay_ms} ms taken"),
            Err(status) => {
                assert!(!taken, "{lock_delay_ms} ms refused: {status:?}");
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(status.message().contains("lock-delay"), "{status:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    still_serving(&address).await;
}

/// A hold past its session's `max_hold` is ended by the server itself,
/// whatever its client does, and the key goes to the next.
#[tokio::test]
async fn the_server_ends_a_hold_at_max_hold() {
    let address = start_server().await;
    let first = Request::Open(proto::Open {
        ttl_ms: 10_000,
        lock_delay_ms: 0,
        max_hold_ms: 300,
        owner: String::new(),
    });
    let mut holder = Stream::open(&address, first).await.expect("stream");
    assert!(matches!(holder.next().await, Ok(Event::Opened(_))));
    assert!(matches!(
        holder.ask(2, acquire("max-hold")).await,
        Event::Granted(_)
    ));
    let mut next = Stream::open(&address, open(10_000)).await.expect("stream");
    assert!(matches!(next.next().await, Ok(Event::Opened(_))));
    let wait = waiting("max-hold", 5_000);
    let granted = tokio::time::timeout(Duration::from_secs(5), next.ask(2, wait))
        .await
        .expect("an answer");
    assert!(matches!(granted, Event::Granted(_)), "{granted:?}");
    // The holder's next renewal names the key lost.
    let renewal = Request::KeepAlive(proto::KeepAlive {
        keys: vec!["max-hold".to_owned()],
    });
    let renewed = holder.ask(3, renewal).await;
    assert!(
        matches!(&renewed, Event::Renewed(r) if r.lost_keys == ["max-hold"]),
        "{renewed:?}"
    );
}

/// A wait whose stream broke leaves the queue: the key passes it by.
#[tokio::test]
async fn a_wait_whose_stream_broke_leaves_the_queue() {
    let address = start_server().await;
    let mut holder = Stream::open(&address, open(30_000)).await.expect("stream");
    assert!(matches!(holder.next().await, Ok(Event::Opened(_))));
    assert!(matches!(
        holder.ask(2, acquire("broken")).await,
        Event::Granted(_)
    ));
    let queue = |stream: &Stream| {
        stream
            .requests
            .send(proto::SessionRequest {
                id: 2,
                body: Some(waiting("broken", 30_000)),
            })
            .expect("send");
    };
    // The sessions waiting for the key, in queue order, once they are `n`.
    let waiters = |n: usize| {
        let address = address.clone();
        async move {
            let mut client = client(&address).await;
            let ask = || {
                authorized(
                    proto::StatusRequest {
                        key: "broken".to_owned(),
                        prefix: String::new(),
                    },
                    SECRET,
                )
            };
            let waiting = async {
                loop {
                    let reply = client.status(ask()).await.expect("status").into_inner();
                    let waiters: Vec<u64> = reply
                        .keys
                        .iter()
                        .flat_map(|key| key.waiters.iter().map(|w| w.session_id))
                        .collect();
                    if waiters.len() == n {
                        return waiters;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .unwrap_or_else(|_| panic!("never {n} waiters"))
        }
    };
    let mut gone = Stream::open(&address, open(30_000)).await.expect("stream");
    let Ok(Event::Opened(gone_session)) = gone.next().await else {
        panic!("opened");
    };
    queue(&gone);
    waiters(1).await;
    let mut next = Stream::open(&address, open(30_000)).await.expect("stream");
    let Ok(Event::Opened(next_session)) = next.next().await else {
        panic!("opened");
    };
    queue(&next);
    let both = waiters(2).await;
    assert_eq!(both, [gone_session.session_id, next_session.session_id]);
    drop(gone);
    assert_eq!(waiters(1).await, [next_session.session_id]);
    assert!(matches!(
        holder.ask(3, release("broken")).await,
        Event::Released(_)
    ));
    let granted = tokio::time::timeout(Duration::from_secs(5), next.next())
        .await
        .expect("the next waiter is granted");
    assert!(matches!(granted, Ok(Event::Granted(_))), "{granted:?}");
}

#[tokio::test]
async fn over_long_keys_and_bad_modes_fail_the_request_not_the_stream() {
    let address = start_server().await;
    let mut stream = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(stream.next().await, Ok(Event::Opened(_))));
    let too_long = failed(stream.ask(2, acquire(&"k".repeat(65))).await);
    assert_eq!(too_long.code, i32::from(proto::Code::InvalidKey));
    assert!(too_long.message.contains("1 to 64 bytes"), "{too_long:?}");
    let bad_mode = Request::Acquire(proto::Acquire {
        key: "k".to_owned(),
        mode: 7,
        permits: 0,
        wait_ms: 0,
    });
    assert!(failed(stream.ask(3, bad_mode).await)
        .message
        .contains("unknown mode 7"));
    let no_permits = Request::Acquire(proto::Acquire {
        key: "k".to_owned(),
        mode: proto::Mode::Semaphore.into(),
        permits: 0,
        wait_ms: 0,
    });
    assert!(failed(stream.ask(4, no_permits).await)
        .message
        .contains("at least 1 permit"));
    assert!(
        matches!(stream.ask(5, acquire("k")).await, Event::Granted(_)),
        "the stream goes on"
    );
}

/// A key the client takes but the server does not is `InvalidKey` to the
/// Rust client, from the code alone, over both transports.
#[tokio::test]
async fn a_key_over_the_servers_limit_is_an_invalid_key() {
    let address = start_server_with(None).await;
    for query in ["", "?transport=grpc"] {
        let url = url::Url::parse(&format!("distlock://{address}{query}")).expect("url");
        let store = distlock_client::RemoteStore::connect(&url)
            .await
            .expect("connect");
        let client = distlock_core::Client::new(std::sync::Arc::new(store));
        let session = client.session().open().await.expect("session");
        let err = session
            .lock("k".repeat(65))
            .try_lock()
            .await
            .expect_err("over the server's 64 bytes");
        assert_eq!(err.kind(), distlock_core::ErrorKind::InvalidKey, "{err}");
        assert!(err.to_string().contains("1 to 64 bytes"), "{err}");
    }
}

/// A secret with characters a URL must escape (here a space) is written
/// percent-encoded, and the server gets the secret itself, on both
/// transports.
#[tokio::test]
async fn a_percent_encoded_secret_in_the_url_authenticates() {
    let address = start_server().await;
    for query in ["", "?transport=grpc"] {
        let url = format!("distlock://:open%20sesame@{address}{query}");
        let store = distlock_client::RemoteStore::connect(&url::Url::parse(&url).expect("url"))
            .await
            .expect("connect");
        let client = distlock_core::Client::new(std::sync::Arc::new(store));
        let session = client.session().open().await.expect("session");
        let guard = session.lock("k").try_lock().await.expect("try");
        let guard = guard.unwrap_or_else(|| panic!("{url}: a free key"));
        // Given back before the next transport asks for the same key.
        guard.release().await.expect("release");
        session.close().await.expect("close");
    }
}

#[tokio::test]
async fn requests_without_a_session_are_refused() {
    let address = start_server().await;
    let mut stream = Stream::open(&address, acquire("k")).await.expect("stream");
    let status = stream.next().await.expect_err("no session yet");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("must be Open"), "{status:?}");

    // A session whose lease ran out is unknown to the server.
    let mut expired = Stream::open(&address, open(100)).await.expect("open");
    assert!(matches!(expired.next().await, Ok(Event::Opened(_))));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lost = failed(
        expired
            .ask(2, Request::KeepAlive(proto::KeepAlive { keys: vec![] }))
            .await,
    );
    assert_eq!(lost.code, i32::from(proto::Code::SessionLost), "{lost:?}");
    let release = failed(expired.ask(3, release("k")).await);
    assert_eq!(release.code, i32::from(proto::Code::NotHeld), "{release:?}");
    still_serving(&address).await;
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_unauthenticated() {
    let address = start_server().await;
    // A prefix of the secret, a byte off, two bytes swapped.
    let guesses = ["guess", "open", "open sesamf", "poen sesame"];
    for secret in std::iter::once(None).chain(guesses.map(Some)) {
        let request = match secret {
            Some(secret) => authorized(
                proto::CheckRequest {
                    key: "k".to_owned(),
                    token: 1,
                },
                secret,
            ),
            None => tonic::Request::new(proto::CheckRequest {
                key: "k".to_owned(),
                token: 1,
            }),
        };
        let status = client(&address)
            .await
            .check(request)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("distlock://:SECRET@host:port"),
            "{status:?}"
        );
    }
    still_serving(&address).await;
}

/// A watch of an empty key or one over the server's limit is refused with
/// the limit; one of exactly the limit is watched.
#[tokio::test]
async fn a_watch_of_a_bad_key_is_refused_with_the_range() {
    let address = start_server_with(None).await;
    let mut client = client(&address).await;
    for key in [String::new(), "k".repeat(65)] {
        let request = proto::WatchRequest { key: key.clone() };
        let status = client.watch(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{key:?}: {status:?}");
        assert!(status.message().contains("1 to 64 bytes"), "{status:?}");
    }
    let longest = proto::WatchRequest {
        key: "k".repeat(64),
    };
    client
        .watch(longest)
        .await
        .expect("the longest key is watched");
    still_serving(&address).await;
}

#[tokio::test]
async fn a_forced_release_needs_the_token_and_ends_the_hold() {
    let address = start_server().await;
    let mut owner = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(owner.next().await, Ok(Event::Opened(_))));
    let Event::Granted(granted) = owner.ask(2, acquire("stuck")).await else {
        panic!("the key is free");
    };
    let ask = || proto::ForceReleaseRequest {
        key: "stuck".to_owned(),
        requested_by: "ops@console pid 1 (test)".to_owned(),
    };
    for request in [tonic::Request::new(ask()), authorized(ask(), "guess")] {
        let status = client(&address)
            .await
            .force_release(request)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let reply = client(&address)
        .await
        .check(authorized(
            proto::CheckRequest {
                key: "stuck".to_owned(),
                token: granted.token,
            },
            SECRET,
        ))
        .await
        .expect("check");
    assert!(reply.into_inner().current, "still held after refused asks");
    let released = client(&address)
        .await
        .force_release(authorized(ask(), SECRET))
        .await
        .expect("with the token")
        .into_inner()
        .released;
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0].token, granted.token);
    let reply = client(&address)
        .await
        .check(authorized(
            proto::CheckRequest {
                key: "stuck".to_owned(),
                token: granted.token,
            },
            SECRET,
        ))
        .await
        .expect("check");
    assert!(
        !reply.into_inner().current,
        "a fenced write with it is refused"
    );
    // The server pushes the loss to the holder's stream at once.
    assert!(
        matches!(owner.next().await, Ok(Event::Lost(lost))
            if lost.ended.len() == 1 && lost.ended[0].key == "stuck"
                && lost.ended[0].token == granted.token),
        "the holder's stream gets a Lost event"
    );
    let Event::Renewed(renewed) = owner
        .ask(
            3,
            Request::KeepAlive(proto::KeepAlive {
                keys: vec!["stuck".to_owned()],
            }),
        )
        .await
    else {
        panic!("the keep-alive is answered");
    };
    assert_eq!(renewed.lost_keys, ["stuck"], "the holder learns it lost");
    still_serving(&address).await;
}

#[tokio::test]
async fn one_session_cannot_release_another_sessions_lock() {
    let address = start_server().await;
    let mut owner = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(owner.next().await, Ok(Event::Opened(_))));
    assert!(matches!(
        owner.ask(2, acquire("mine")).await,
        Event::Granted(_)
    ));
    let mut intruder = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(intruder.next().await, Ok(Event::Opened(_))));
    let refused = failed(intruder.ask(2, release("mine")).await);
    assert_eq!(refused.code, i32::from(proto::Code::NotHeld));
    assert!(
        matches!(intruder.ask(3, acquire("mine")).await, Event::NotGranted(_)),
        "still held"
    );
}

#[tokio::test]
async fn an_oversized_message_ends_its_stream_with_a_clear_status() {
    let address = start_server().await;
    let mut stream = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(stream.next().await, Ok(Event::Opened(_))));
    stream
        .requests
        .send(proto::SessionRequest {
            id: 2,
            body: Some(acquire(&"k".repeat(100_000))),
        })
        .expect("send");
    let status = stream.next().await.expect_err("too large");
    assert!(
        matches!(
            status.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{status:?}"
    );
    assert!(
        status.message().contains("too large") || status.message().contains("length"),
        "{status:?}"
    );
    still_serving(&address).await;
}

#[tokio::test]
async fn a_wait_without_end_and_a_second_acquire_of_a_held_key() {
    let address = start_server().await;
    let mut owner = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(owner.next().await, Ok(Event::Opened(_))));
    assert!(matches!(
        owner.ask(2, acquire("busy")).await,
        Event::Granted(_)
    ));
    let twice = failed(owner.ask(3, acquire("busy")).await);
    assert_eq!(twice.code, i32::from(proto::Code::AlreadyHeld), "{twice:?}");

    let mut waiter = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(waiter.next().await, Ok(Event::Opened(_))));
    let forever = waiting("busy", u64::MAX);
    waiter
        .requests
        .send(proto::SessionRequest {
            id: 2,
            body: Some(forever),
        })
        .expect("send");
    // Released by token: the owner's grant goes to the waiter at once.
    let released = owner.ask(4, release("busy")).await;
    assert!(matches!(released, Event::Released(_)), "{released:?}");
    assert!(
        matches!(waiter.next().await, Ok(Event::Granted(_))),
        "the endless wait was granted"
    );
    still_serving(&address).await;
}

/// A resume needs the session's own secret; once it took the session to a
/// new stream, the old stream (still open, as a half-open one may be)
/// serves nothing more: a late acquire on it grants nothing.
#[tokio::test]
async fn a_resume_needs_the_secret_and_retires_the_old_stream() {
    let address = start_server().await;
    let mut old = Stream::open(&address, open(10_000)).await.expect("open");
    let Ok(Event::Opened(opened)) = old.next().await else {
        panic!("opened");
    };
    assert_eq!(opened.resume_secret.len(), 16, "a secret to resume with");
    let resume = |secret: Vec<u8>| {
        Request::Resume(proto::Resume {
            session_id: opened.session_id,
            secret,
            held: Vec::new(),
        })
    };
    // Zeros, the secret's first half, and the secret with two unlike
    // bytes swapped.
    let secret = opened.resume_secret.clone();
    let mut swapped = secret.clone();
    let unlike = (1..swapped.len()).find(|&i| swapped[i] != swapped[0]);
    swapped.swap(0, unlike.expect("a random secret has two unlike bytes"));
    for wrong in [vec![0; 16], secret[..8].to_vec(), swapped] {
        let mut guess = Stream::open(&address, resume(wrong)).await.expect("stream");
        let refused = guess.next().await.expect_err("a wrong secret is refused");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }

    let mut new = Stream::open(&address, resume(opened.resume_secret.clone()))
        .await
        .expect("stream");
    assert!(
        matches!(new.next().await, Ok(Event::Opened(again)) if again.session_id == opened.session_id),
        "the same session, resumed"
    );
    old.requests
        .send(proto::SessionRequest {
            id: 7,
            body: Some(acquire("late")),
        })
        .expect("send");
    let ended = old.next().await.expect_err("the old stream is retired");
    assert_eq!(ended.code(), Code::Aborted, "{ended:?}");
    assert!(
        matches!(new.ask(8, acquire("late")).await, Event::Granted(_)),
        "the key was not taken by the old stream's late acquire"
    );
    // The retired stream gone, what the server pushes reaches the new one.
    let force = proto::ForceReleaseRequest {
        key: "late".to_owned(),
        requested_by: "test".to_owned(),
    };
    client(&address)
        .await
        .force_release(authorized(force, SECRET))
        .await
        .expect("force release");
    let lost = tokio::time::timeout(Duration::from_secs(5), new.next())
        .await
        .expect("the resumed stream hears of it");
    assert!(matches!(lost, Ok(Event::Lost(_))), "{lost:?}");
    still_serving(&address).await;
}

fn acquire_all(keys: &[&str]) -> Request {
    Request::AcquireAll(proto::AcquireAll {
        keys: keys
            .iter()
            .map(|key| proto::AcquireKey {
                key: (*key).to_owned(),
                mode: proto::Mode::Exclusive.into(),
                permits: 0,
            })
            .collect(),
        wait_ms: 0,
    })
}

/// A bad AcquireAll (no key, a key twice, a key too long) fails alone and
/// takes nothing; a good one takes every key, each with its token.
#[tokio::test]
async fn a_bad_acquire_all_fails_alone_and_takes_nothing() {
    let address = start_server().await;
    let mut stream = Stream::open(&address, open(5_000)).await.expect("open");
    assert!(matches!(stream.next().await, Ok(Event::Opened(_))));
    let none = failed(stream.ask(2, acquire_all(&[])).await);
    assert!(
        none.message.contains("name 1 to 1024 distinct keys"),
        "{none:?}"
    );
    let twice = failed(stream.ask(3, acquire_all(&["a", "b", "a"])).await);
    assert!(twice.message.contains("'a' twice"), "{twice:?}");
    let long = "k".repeat(65);
    let too_long = failed(stream.ask(4, acquire_all(&["a", &long])).await);
    assert_eq!(too_long.code, i32::from(proto::Code::InvalidKey));
    let longest = "k".repeat(64);
    let taken = stream.ask(41, acquire_all(&[&longest])).await;
    assert!(matches!(taken, Event::GrantedAll(_)), "{taken:?}");
    // Nothing was taken by the refused requests: a is free.
    assert!(matches!(
        stream.ask(5, acquire("a")).await,
        Event::Granted(_)
    ));
    assert!(matches!(
        stream.ask(6, acquire_all(&["b", "c"])).await,
        Event::GrantedAll(all) if all.granted.len() == 2 && all.granted[0].key == "b"
    ));
    let busy = stream.ask(7, acquire_all(&["a", "d"])).await;
    assert!(
        matches!(busy, Event::Failed(_)),
        "a is this session's: {busy:?}"
    );
    still_serving(&address).await;
}
