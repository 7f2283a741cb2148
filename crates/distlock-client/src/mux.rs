//! The multiplexed transport: every session of a store on one TCP
//! connection, in length-prefixed protobuf frames (see `MuxRequest` in the
//! `.proto`). Requests that are ready together go out in one write, and
//! replies come back the same way, which is what lets many sessions of one
//! process share a connection cheaply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use distlock_core::store::lock;
use distlock_core::{Error, ErrorKind, Result};
use distlock_proto::kinds::kind_of_end;
use distlock_proto::{mux, v1 as proto};
use prost::Message;
use proto::mux_event::Body as EventBody;
use proto::mux_request::Body as RequestBody;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::stream::{Inbox, Outlet, Why};
use crate::CONNECT_TIMEOUT;

/// How often the client pings; the server answers each.
const PING_EVERY: Duration = Duration::from_secs(5);

/// A connection on which nothing arrives for this long is taken as dead.
const SILENCE: Duration = Duration::from_secs(15);

/// The largest frame the client accepts from the server.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Writes are gathered up to about this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// The open streams of a connection, by number.
struct Streams {
    open: HashMap<u32, Arc<Inbox>>,
    /// Why the connection ended, once it has.
    ended: Option<Why>,
}

/// One multiplexed connection to a server.
pub(crate) struct MuxConnection {
    frames: UnboundedSender<proto::MuxRequest>,
    streams: Arc<Mutex<Streams>>,
    next_stream: AtomicU32,
    /// The largest frame the server takes.
    max_frame: usize,
}

impl MuxConnection {
    /// Connects to `target` (`host:port`) and says Hello, with the server's
    /// shared secret if there is one.
    pub(crate) async fn connect(target: &str, auth_token: Option<&str>) -> Result<Arc<Self>> {
        let unreachable = |why: String| {
            Error::unavailable(format!(
                "cannot reach the distlock server at {target} ({why}); start one with \
                 `distlock serve`"
            ))
        };
        let socket = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(socket)) => socket,
            Ok(Err(err)) => return Err(unreachable(err.to_string()).with_source(err)),
            Err(_) => return Err(unreachable(format!("no answer in {CONNECT_TIMEOUT:?}"))),
        };
        let _ = socket.set_nodelay(true);
        let (read, mut write) = socket.into_split();
        let mut inbound = FramedRead::new(read, mux::codec(MAX_FRAME));
        let mut hello = BytesMut::new();
        hello.extend_from_slice(mux::PREFACE);
        mux::put_frame(
            &mut hello,
            &proto::MuxRequest {
                stream: 0,
                body: Some(RequestBody::Hello(proto::Hello {
                    auth_token: auth_token.unwrap_or_default().to_owned(),
                })),
            },
        );
        let handshake = async {
            write
                .write_all(&hello)
                .await
                .map_err(|err| unreachable(err.to_string()).with_source(err))?;
            match inbound.next().await {
                Some(Ok(frame)) => match proto::MuxEvent::decode(frame) {
                    Ok(proto::MuxEvent {
                        body: Some(EventBody::Welcome(welcome)),
                        ..
                    }) => Ok(welcome),
                    Ok(proto::MuxEvent {
                        body: Some(EventBody::End(end)),
                        ..
                    }) => Err(Error::new(
                        kind_of_end(end.code),
                        format!("distlock server at {target}: {}", end.message),
                    )),
                    _ => Err(not_distlock(target)),
                },
                Some(Err(_)) => Err(not_distlock(target)),
                None => Err(unreachable(
                    "it closed the connection during the handshake".to_owned(),
                )),
            }
        };
        let welcome = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer to the handshake in {CONNECT_TIMEOUT:?}"
                )))
            }
        };
        let (frames, outgoing) = mpsc::unbounded_channel();
        let streams = Arc::new(Mutex::new(Streams {
            open: HashMap::new(),
            ended: None,
        }));
        // The reader tells the writer when the connection is dead.
        let dead = CancellationToken::new();
        // How many answers the reader handed out in its latest read (up to
        // when the writer last looked): the writer waits for their sessions
        // when there are several.
        let woken = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write_frames(
            outgoing,
            write,
            Arc::clone(&woken),
            dead.clone(),
        ));
        tokio::spawn(read_frames(
            inbound,
            woken,
            Arc::clone(&streams),
            Arc::from(target),
            dead.drop_guard(),
        ));
        Ok(Arc::new(MuxConnection {
            frames,
            streams,
            next_stream: AtomicU32::new(1),
            max_frame: usize::try_from(welcome.max_frame_bytes).unwrap_or(usize::MAX),
        }))
    }

    /// The largest frame the server takes.
    pub(crate) fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Whether the connection has ended, so that a new one is needed.
    pub(crate) fn is_ended(&self) -> bool {
        lock(&self.streams).ended.is_some() || self.frames.is_closed()
    }

    fn next_stream(&self) -> (u32, Outlet) {
        let mut stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        if stream == 0 {
            // Stream 0 is the connection's; after 2³² sessions, skip it.
            stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        }
        let outlet = Outlet::Mux {
            stream,
            frames: self.frames.clone(),
        };
        (stream, outlet)
    }

    /// A new stream for a session: its inbox and its number. On a
    /// connection that has ended the inbox is ended too.
    pub(crate) fn open_stream(&self, target: Arc<str>) -> (Arc<Inbox>, u32) {
        let (stream, outlet) = self.next_stream();
        let inbox = Arc::new(Inbox::new(target, outlet));
        let mut streams = lock(&self.streams);
        match &streams.ended {
            Some(why) => inbox.end(Some(why.clone())),
            None => {
                streams.open.insert(stream, Arc::clone(&inbox));
            }
        }
        (inbox, stream)
    }

    /// A new stream for a session resuming on this connection, delivering
    /// to its `inbox`: the stream's number and where its requests go;
    /// `None` if this connection has ended too.
    pub(crate) fn attach(&self, inbox: &Arc<Inbox>) -> Option<(u32, Outlet)> {
        let (stream, outlet) = self.next_stream();
        let mut streams = lock(&self.streams);
        if streams.ended.is_some() {
            return None;
        }
        streams.open.insert(stream, Arc::clone(inbox));
        Some((stream, outlet))
    }

    /// Ends a session's stream, as a dropped gRPC stream would be: the
    /// server forgets its waits, and its lease runs out unless closed first.
    pub(crate) fn close_stream(&self, stream: u32) {
        if lock(&self.streams).open.remove(&stream).is_some() {
            let _ = self.frames.send(proto::MuxRequest {
                stream,
                body: Some(RequestBody::End(proto::End::default())),
            });
        }
    }
}

fn not_distlock(target: &str) -> Error {
    Error::unavailable(format!(
        "{target} did not answer as a distlock server does; check the host and port \
         (a server older than the mux transport needs ?transport=grpc)"
    ))
}

/// Sends the connection's frames, every frame that is ready in one write,
/// and a ping every [`PING_EVERY`].
async fn write_frames(
    mut outgoing: UnboundedReceiver<proto::MuxRequest>,
    mut write: OwnedWriteHalf,
    woken: Arc<AtomicUsize>,
    dead: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    // Not `interval`: its first tick, due at once, would hold the first
    // frames back until the timer's next millisecond.
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            request = outgoing.recv() => {
                let Some(request) = request else { break };
                mux::put_frame(&mut buf, &request);
                // When the latest read handed answers to several sessions,
                // let them run first, so that their next requests go out in
                // this write too. Otherwise the first of them wakes this
                // task, which tokio runs next, and each request costs a
                // write of its own. One or two answers (a hand-over) are
                // not waited for: the yield would cost more than it saves.
                if woken.swap(0, Ordering::Relaxed) > 2 {
                    tokio::task::yield_now().await;
                }
                while buf.len() < WRITE_BATCH {
                    match outgoing.try_recv() {
                        Ok(request) => mux::put_frame(&mut buf, &request),
                        Err(_) => break,
                    }
                }
            }
                        () = dead.cancelled() => return,
            _ = ping.tick() => {
                let ping = proto::MuxRequest {
                    stream: 0,
                    body: Some(RequestBody::Ping(proto::Ping {})),
                };
                mux::put_frame(&mut buf, &ping);
            }
        }
        if write.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = write.shutdown().await;
}

/// Hands the server's events to their sessions until the connection ends,
/// then tells every session why.
async fn read_frames(
    mut inbound: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    woken: Arc<AtomicUsize>,
    streams: Arc<Mutex<Streams>>,
    target: Arc<str>,
    _stop_writer: DropGuard,
) {
    let lost = |why: String| {
        Why::new(
            ErrorKind::Unavailable,
            format!("the connection to the distlock server at {target} was lost: {why}"),
        )
    };
    // Answers handed out since the read buffer was last empty.
    let mut batch = 0;
    let why = loop {
        let frame = match tokio::time::timeout(SILENCE, inbound.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(err))) => break lost(err.to_string()).caused_by(err),
            Ok(None) => break lost("the server closed it".to_owned()),
            Err(_) => break lost(format!("nothing heard for {SILENCE:?}")),
        };
        let last_of_read = inbound.read_buffer().is_empty();
        let event = match proto::MuxEvent::decode(frame) {
            Ok(event) => event,
            Err(err) => break lost(format!("garbled frame ({err})")).caused_by(err),
        };
        match event.body {
            Some(EventBody::Event(event_of)) => {
                let inbox = lock(&streams).open.get(&event.stream).cloned();
                if let Some(inbox) = inbox {
                    inbox.deliver(event_of);
                    batch += 1;
                    woken.store(batch, Ordering::Relaxed);
                }
            }
            Some(EventBody::End(end)) if event.stream == 0 => {
                break Why::new(
                    kind_of_end(end.code),
                    format!("distlock server at {target}: {}", end.message),
                );
            }
            Some(EventBody::End(end)) => {
                let inbox = lock(&streams).open.remove(&event.stream);
                if let Some(inbox) = inbox {
                    inbox.end(Some(Why::new(
                        kind_of_end(end.code),
                        format!("distlock server at {target}: {}", end.message),
                    )));
                }
            }
            Some(EventBody::Pong(_) | EventBody::Welcome(_)) | None => {}
        }
        if last_of_read {
            batch = 0;
        }
    };
    let open = {
        let mut streams = lock(&streams);
        streams.ended = Some(why.clone());
        std::mem::take(&mut streams.open)
    };
    tracing::warn!("{}", why.error());
    // Their sessions live on at the server until their leases end: each
    // resumes on a new connection.
    for inbox in open.values() {
        inbox.broken();
    }
}

/// A store's connection, made again when the last one has ended (e.g. the
/// server restarted), so that new sessions work once the server is back.
///
/// One connect at a time, which every caller that needs a connection while
/// it runs waits for: a connect that hangs delays each of them by its timeout
/// once, not once per caller ahead of it, and resuming sessions open one
/// connection, not one each.
pub(crate) struct Connections {
    target: Arc<str>,
    auth_token: Option<Arc<str>>,
    dialing: Arc<Mutex<Dialing>>,
}

/// What a connect ends with, for each of its callers.
type Dialed = Result<Arc<MuxConnection>, Why>;

struct Dialing {
    live: Option<Arc<MuxConnection>>,
    /// The connect under way: its outcome arrives here (`None` until then).
    under_way: Option<watch::Receiver<Option<Dialed>>>,
}

impl Connections {
    /// Connects now, so that a wrong address or secret is known at once.
    pub(crate) async fn connect(target: String, auth_token: Option<String>) -> Result<Self> {
        let first = MuxConnection::connect(&target, auth_token.as_deref()).await?;
        Ok(Connections {
            target: Arc::from(target),
            auth_token: auth_token.map(Arc::from),
            dialing: Arc::new(Mutex::new(Dialing {
                live: Some(first),
                under_way: None,
            })),
        })
    }

    /// The live connection, connecting again if the last one has ended.
    /// Cancel safe: the connect runs in a task of its own.
    pub(crate) async fn get(&self) -> Result<Arc<MuxConnection>> {
        let mut outcome = {
            let mut dialing = lock(&self.dialing);
            if let Some(connection) = dialing.live.as_ref().filter(|c| !c.is_ended()) {
                return Ok(Arc::clone(connection));
            }
            match &dialing.under_way {
                // A connect whose task went away unanswered (cancelled with
                // its runtime, or panicked) is under way no more.
                Some(outcome) if outcome.has_changed().is_ok() => outcome.clone(),
                _ => {
                    let (tell, outcome) = watch::channel(None);
                    dialing.under_way = Some(outcome.clone());
                    tokio::spawn(dial(
                        Arc::clone(&self.target),
                        self.auth_token.clone(),
                        Arc::clone(&self.dialing),
                        tell,
                    ));
                    outcome
                }
            }
        };
        let dialed = match outcome.wait_for(Option::is_some).await {
            Ok(dialed) => dialed.clone(),
            // The task went away without an answer (the runtime is ending).
            Err(_) => None,
        };
        match dialed {
            Some(Ok(connection)) => Ok(connection),
            Some(Err(why)) => Err(why.error()),
            None => Err(Error::unavailable(format!(
                "cannot reach the distlock server at {}: the connect was cut short",
                self.target
            ))),
        }
    }
}

/// Makes the store's new connection and tells every caller waiting for it;
/// the next caller after a failure starts another.
async fn dial(
    target: Arc<str>,
    auth_token: Option<Arc<str>>,
    dialing: Arc<Mutex<Dialing>>,
    tell: watch::Sender<Option<Dialed>>,
) {
    let dialed = MuxConnection::connect(&target, auth_token.as_deref())
        .await
        .map_err(|err| Why::new(err.kind(), err.message().to_owned()).caused_by(err));
    {
        let mut dialing = lock(&dialing);
        dialing.under_way = None;
        if let Ok(connection) = &dialed {
            dialing.live = Some(Arc::clone(connection));
        }
    }
    tell.send_replace(Some(dialed));
}
