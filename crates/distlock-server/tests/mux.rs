//! The multiplexed transport: bad input on it gets a clear `End` frame, and
//! the server keeps serving; sessions on one connection stay apart.

use std::time::Duration;

use bytes::BytesMut;
use distlock_core::ErrorKind;
use distlock_proto::{mux, v1 as proto};
use futures::StreamExt;
use prost::Message;
use proto::mux_event::Body as EventBody;
use proto::mux_request::Body as RequestBody;
use proto::session_event::Body as Event;
use proto::session_request::Body as Request;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

mod common;
use common::{acquire, open, release, waiting};

const SECRET: &str = "open sesame";
const MAX_MESSAGE: usize = 64 * 1024;

async fn start_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    // The server task owns its data dir: both go when the test's runtime ends.
    let data = tempfile::tempdir().expect("temp dir");
    let config = distlock_server::Config {
        data_dir: data.path().to_owned(),
        auth_token: Some(SECRET.to_owned()),
        max_message_bytes: MAX_MESSAGE,
        ..distlock_server::Config::default()
    };
    tokio::spawn(async move {
        let _data = data;
        distlock_server::run(listener, config, std::future::pending()).await
    });
    address
}

/// A mux connection spoken by hand.
struct Connection {
    write: OwnedWriteHalf,
    read: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
}

impl Connection {
    /// Connects and says Hello with `secret`; returns the server's answer.
    async fn hello(address: &str, secret: &str) -> (Connection, proto::MuxEvent) {
        let socket = TcpStream::connect(address).await.expect("connect");
        let (read, mut write) = socket.into_split();
        write.write_all(mux::PREFACE).await.expect("preface");
        let mut connection = Connection {
            write,
            read: FramedRead::new(read, mux::codec(1 << 20)),
        };
        connection
            .send(
                0,
                RequestBody::Hello(proto::Hello {
                    auth_token: secret.to_owned(),
                }),
            )
            .await;
        let answer = connection.next().await.expect("an answer to the Hello");
        (connection, answer)
    }

    async fn welcomed(address: &str) -> Connection {
        let (connection, answer) = Connection::hello(address, SECRET).await;
        assert!(
            matches!(answer.body, Some(EventBody::Welcome(_))),
            "{answer:?}"
        );
        connection
    }

    async fn send(&mut self, stream: u32, body: RequestBody) {
        let mut buf = BytesMut::new();
        mux::put_frame(
            &mut buf,
            &proto::MuxRequest {
                stream,
                body: Some(body),
            },
        );
        self.write.write_all(&buf).await.expect("send");
    }

    async fn request(&mut self, stream: u32, id: u64, body: Request) {
        let request = proto::SessionRequest {
            id,
            body: Some(body),
        };
        self.send(stream, RequestBody::Request(request)).await;
    }

    /// The next frame, or `None` once the server has closed the connection.
    async fn next(&mut self) -> Option<proto::MuxEvent> {
        let frame = tokio::time::timeout(Duration::from_secs(10), self.read.next())
            .await
            .expect("the server answers in time")?
            .expect("a frame");
        Some(proto::MuxEvent::decode(frame).expect("a MuxEvent"))
    }

    /// Checks that `frame` ended the whole connection with `code`, saying
    /// `says`, and that the server then closed it.
    async fn ended(&mut self, frame: Option<proto::MuxEvent>, code: proto::Code, says: &str) {
        let (stream, got, message) = end_of(frame);
        assert_eq!((stream, got), (0, code), "{message}");
        assert!(message.contains(says), "{message}");
        assert!(self.next().await.is_none(), "the connection is closed");
    }

    /// The next session event, skipping pongs.
    async fn event(&mut self) -> (u32, Event) {
        loop {
            let frame = self.next().await.expect("a frame");
            match frame.body {
                Some(EventBody::Event(event)) => {
                    return (frame.stream, event.body.expect("a body"));
                }
                Some(EventBody::Pong(_)) => {}
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }
}

async fn store(url: &str) -> distlock_core::Result<distlock_client::RemoteStore> {
    distlock_client::RemoteStore::connect(&url::Url::parse(url).expect("url")).await
}

/// The `End` of a stream, with its code and message.
fn end_of(frame: Option<proto::MuxEvent>) -> (u32, proto::Code, String) {
    let frame = frame.expect("an End frame");
    match frame.body {
        Some(EventBody::End(end)) => (
            frame.stream,
            proto::Code::try_from(end.code).expect("a known code"),
            end.message,
        ),
        other => panic!("expected End, got {other:?}"),
    }
}

/// A new connection still opens a session and takes a lock.
async fn still_serving(address: &str) {
    let mut connection = Connection::welcomed(address).await;
    connection.request(1, 0, open(10_000)).await;
    assert!(matches!(connection.event().await, (1, Event::Opened(_))));
    connection.request(1, 1, acquire("still-serving")).await;
    let (_, granted) = connection.event().await;
    assert!(matches!(granted, Event::Granted(_)), "{granted:?}");
}

#[tokio::test]
async fn a_wrong_secret_is_refused_with_the_way_to_give_it() {
    let address = start_server().await;
    // A guess as long as a bearer token of a few KiB is read and judged.
    for guess in ["guess".to_owned(), "g".repeat(4096)] {
        let (mut connection, answer) = Connection::hello(&address, &guess).await;
        let (code, says) = (proto::Code::Unauthenticated, "distlock://:SECRET@host:port");
        connection.ended(Some(answer), code, says).await;
    }

    let url = format!("distlock://:guess@{address}");
    let err = store(&url).await.expect_err("a wrong secret");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("shared secret"), "{err}");
    still_serving(&address).await;
}

#[tokio::test]
async fn a_garbled_frame_ends_the_connection_with_the_reason() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    let garbage = [0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
    connection.write.write_all(&garbage).await.expect("send");
    let frame = connection.next().await;
    let code = proto::Code::InvalidArgument;
    connection.ended(frame, code, "garbled frame").await;
    still_serving(&address).await;
}

#[tokio::test]
async fn an_oversized_frame_ends_the_connection_with_the_limit() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    let length = u32::try_from(MAX_MESSAGE + 1).expect("small");
    connection
        .write
        .write_all(&length.to_be_bytes())
        .await
        .expect("send");
    let (stream, code, message) = end_of(connection.next().await);
    assert_eq!((stream, code), (0, proto::Code::InvalidArgument));
    assert!(
        message.contains(&format!("at most {MAX_MESSAGE} bytes")),
        "{message}"
    );
    still_serving(&address).await;
}

#[tokio::test]
async fn a_stream_that_does_not_open_first_ends_alone() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    connection.request(1, 0, open(10_000)).await;
    assert!(matches!(connection.event().await, (1, Event::Opened(_))));
    // Stream 2 skips its Open: it ends, stream 1 goes on.
    connection.request(2, 1, acquire("k")).await;
    let (stream, code, message) = end_of(connection.next().await);
    assert_eq!((stream, code), (2, proto::Code::InvalidArgument));
    assert!(message.contains("must be Open"), "{message}");
    connection.request(1, 1, acquire("k")).await;
    let (stream, granted) = connection.event().await;
    assert_eq!(stream, 1);
    assert!(matches!(granted, Event::Granted(_)), "{granted:?}");
}

#[tokio::test]
async fn sessions_on_one_connection_cannot_release_each_others_locks() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    for stream in [1, 2] {
        connection.request(stream, 0, open(10_000)).await;
        assert!(matches!(connection.event().await, (s, Event::Opened(_)) if s == stream));
    }
    connection.request(1, 1, acquire("mine")).await;
    let token = match connection.event().await {
        (1, Event::Granted(granted)) => granted.token,
        other => panic!("expected a grant on stream 1, got {other:?}"),
    };
    let release = Request::Release(proto::Release {
        key: "mine".to_owned(),
        token,
    });
    connection.request(2, 1, release).await;
    match connection.event().await {
        (2, Event::Failed(failed)) => {
            assert_eq!(failed.code, i32::from(proto::Code::NotHeld), "{failed:?}");
        }
        other => panic!("expected NOT_HELD on stream 2, got {other:?}"),
    }
    // Still held by stream 1's session.
    connection.request(2, 2, acquire("mine")).await;
    assert!(matches!(
        connection.event().await,
        (2, Event::NotGranted(_))
    ));
}

#[tokio::test]
async fn a_port_that_is_not_a_distlock_server_is_named_as_such() {
    let address = format!(
        "127.0.0.1:{}",
        distlock_testkit::daemon::not_a_store().await
    );
    let err = store(&format!("distlock://{address}"))
        .await
        .expect_err("not a distlock server");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains("did not answer as a distlock server does"),
        "{err}"
    );
}

#[tokio::test]
async fn close_answers_then_ends_the_stream() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    connection.request(1, 0, open(10_000)).await;
    assert!(matches!(connection.event().await, (1, Event::Opened(_))));
    connection
        .request(1, 1, Request::Close(proto::Close {}))
        .await;
    assert!(matches!(connection.event().await, (1, Event::Closed(_))));
    let (stream, code, _) = end_of(connection.next().await);
    assert_eq!((stream, code), (1, proto::Code::Unspecified));
}

#[tokio::test]
async fn a_request_id_that_is_already_waiting_is_refused() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    for stream in [1, 2] {
        connection.request(stream, 0, open(10_000)).await;
        assert!(matches!(connection.event().await, (s, Event::Opened(_)) if s == stream));
    }
    connection.request(1, 1, acquire("busy")).await;
    assert!(matches!(connection.event().await, (1, Event::Granted(_))));
    connection.request(2, 7, waiting("busy", 60_000)).await;
    connection.request(2, 7, waiting("other", 60_000)).await;
    match connection.event().await {
        (2, Event::Failed(failed)) => {
            assert_eq!(failed.code, i32::from(proto::Code::InvalidArgument));
            assert!(failed.message.contains("already waiting"), "{failed:?}");
        }
        other => panic!("expected the second id 7 refused, got {other:?}"),
    }
    // Once its wait has ended, the id may be used again.
    connection.request(1, 2, release("busy")).await;
    let mut answers = [connection.event().await, connection.event().await];
    answers.sort_by_key(|(stream, _)| *stream);
    assert!(matches!(answers[0], (1, Event::Released(_))), "{answers:?}");
    assert!(matches!(answers[1], (2, Event::Granted(_))), "{answers:?}");
    connection.request(2, 7, waiting("other", 60_000)).await;
    let (stream, again) = connection.event().await;
    assert!(
        stream == 2 && matches!(again, Event::Granted(_)),
        "id 7 again after its wait ended: {again:?}"
    );
}

/// A stream ended by its client while it waits leaves the queue; the
/// connection's other streams go on.
#[tokio::test]
async fn a_wait_whose_stream_ends_leaves_the_queue() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    for stream in [1, 2, 3] {
        connection.request(stream, 0, open(10_000)).await;
        assert!(matches!(connection.event().await, (s, Event::Opened(_)) if s == stream));
    }
    connection.request(1, 1, acquire("ended")).await;
    assert!(matches!(connection.event().await, (1, Event::Granted(_))));
    connection.request(2, 1, waiting("ended", 60_000)).await;
    connection.request(3, 1, waiting("ended", 60_000)).await;
    connection
        .send(2, RequestBody::End(proto::End::default()))
        .await;
    connection.request(1, 2, release("ended")).await;
    let mut answers = [connection.event().await, connection.event().await];
    answers.sort_by_key(|(stream, _)| *stream);
    assert!(matches!(answers[0], (1, Event::Released(_))), "{answers:?}");
    assert!(matches!(answers[1], (3, Event::Granted(_))), "{answers:?}");
}

/// A connection whose first byte is the preface's, and not the rest, is
/// closed unanswered, whatever follows.
#[tokio::test]
async fn a_connection_that_only_begins_like_the_preface_is_closed() {
    let address = start_server().await;
    let socket = TcpStream::connect(&address).await.expect("connect");
    let (read, mut write) = socket.into_split();
    let mut wrong = mux::PREFACE.to_vec();
    *wrong.last_mut().expect("a preface") ^= 0xff;
    write.write_all(&wrong).await.expect("preface");
    let mut connection = Connection {
        write,
        read: FramedRead::new(read, mux::codec(1 << 20)),
    };
    let hello = proto::Hello {
        auth_token: SECRET.to_owned(),
    };
    connection.send(0, RequestBody::Hello(hello)).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), connection.read.next())
        .await
        .expect("closed at once");
    assert!(!matches!(answer, Some(Ok(_))), "answered: {answer:?}");
}

/// Stream 0 is the connection's own: a session request on it ends the
/// connection, saying which streams sessions use.
#[tokio::test]
async fn a_request_on_stream_0_ends_the_connection() {
    let address = start_server().await;
    let mut connection = Connection::welcomed(&address).await;
    connection.request(0, 0, open(10_000)).await;
    let frame = connection.next().await;
    let code = proto::Code::InvalidArgument;
    connection
        .ended(frame, code, "sessions use streams 1 and up")
        .await;
}
