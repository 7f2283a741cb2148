//! The multiplexed transport: many sessions on one plain TCP connection, in
//! length-prefixed protobuf frames (see `MuxRequest` in the `.proto`).
//!
//! It serves the same sessions as the gRPC stream, through the same
//! [`SessionStream`], without HTTP/2 in between: a connection's reader hands
//! each request to its session in place, and one writer sends every reply
//! that is ready in one write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use distlock_proto::{mux, v1 as proto};
use futures::StreamExt;
use prost::Message;
use proto::mux_event::Body as EventBody;
use proto::mux_request::Body as RequestBody;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::session::{end_frame, Outbound, SessionStream, Waits};
use crate::{same_secret, Shared};
use distlock_core::store::lock;

/// How long a client has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest frame before the Hello has been accepted.
const HELLO_BYTES: usize = 64 * 1024;

/// A connection on which nothing arrives, or that takes nothing, for this
/// long is taken as gone (clients ping every 5 seconds).
const SILENCE: Duration = Duration::from_secs(20);

/// Writes are gathered up to about this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// The threads that serve mux connections: each runs a single-threaded
/// runtime that owns its connections outright, so that serving a request
/// never hands work to another thread. Connections are dealt out in turn.
pub(crate) struct Workers {
    /// `None` once the workers are told to finish.
    inboxes: std::sync::Mutex<Option<Vec<mpsc::UnboundedSender<std::net::TcpStream>>>>,
    next: AtomicUsize,
    done: std::sync::Mutex<Vec<oneshot::Receiver<()>>>,
}

impl Workers {
    /// Starts `threads` workers; they stop once [`Workers::finish`] is
    /// called and `stop` has ended their connections.
    pub(crate) fn start(
        threads: usize,
        shared: &Arc<Shared>,
        stop: &CancellationToken,
    ) -> std::io::Result<Workers> {
        let mut inboxes = Vec::with_capacity(threads);
        let mut done = Vec::with_capacity(threads);
        for index in 0..threads {
            let (inbox, mut sockets) = mpsc::unbounded_channel::<std::net::TcpStream>();
            let (finished, finished_rx) = oneshot::channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (shared, stop) = (Arc::clone(shared), stop.clone());
            std::thread::Builder::new()
                .name(format!("distlock-mux-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let mut connections = JoinSet::new();
                        loop {
                            tokio::select! {
                                socket = sockets.recv() => {
                                    let Some(socket) = socket else { break };
                                    match TcpStream::from_std(socket) {
                                        Ok(socket) => {
                                            let (shared, stop) = (Arc::clone(&shared), stop.clone());
                                            connections.spawn(serve(shared, socket, stop));
                                        }
                                        Err(err) => tracing::warn!("cannot serve a connection: {err}"),
                                    }
                                }
                                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                            }
                        }
                        while connections.join_next().await.is_some() {}
                    });
                    let _ = finished.send(());
                })?;
            inboxes.push(inbox);
            done.push(finished_rx);
        }
        Ok(Workers {
            inboxes: std::sync::Mutex::new(Some(inboxes)),
            next: AtomicUsize::new(0),
            done: std::sync::Mutex::new(done),
        })
    }

    /// Hands a connection that began with the mux preface to a worker;
    /// once the workers are finishing, it is closed instead.
    pub(crate) fn serve(&self, socket: TcpStream) {
        let inboxes = lock(&self.inboxes);
        let Some(inboxes) = inboxes.as_ref() else {
            return;
        };
        let index = self.next.fetch_add(1, Ordering::Relaxed) % inboxes.len();
        match socket.into_std() {
            Ok(socket) => {
                let _ = inboxes[index].send(socket);
            }
            Err(err) => tracing::warn!("cannot serve a connection: {err}"),
        }
    }

    /// Takes no more connections and waits until every worker has stopped
    /// (their connections end on `stop`).
    pub(crate) async fn finish(&self) {
        lock(&self.inboxes).take();
        let done = std::mem::take(&mut *lock(&self.done));
        for finished in done {
            let _ = finished.await;
        }
    }
}

/// Serves one connection whose first bytes were the mux preface, until the
/// client goes away, falls silent, or the server stops. Sessions whose
/// connection breaks are not ended: as with a broken gRPC stream, their
/// leases run out first.
///
/// One task reads requests, answers them and drives the waits of all the
/// connection's sessions, so that a release, the grant it makes to a waiter
/// on the same connection and both answers cross no thread; a writer task
/// beside it sends every answer that is ready in one write.
pub(crate) async fn serve(shared: Arc<Shared>, socket: TcpStream, stop: CancellationToken) {
    let (mut read, write) = socket.into_split();
    let mut preface = [0; mux::PREFACE.len()];
    let greeted = tokio::select! {
        read = tokio::time::timeout(HELLO_TIMEOUT, read.read_exact(&mut preface)) => {
            matches!(read, Ok(Ok(_)))
        }
        () = stop.cancelled() => false,
    };
    if !greeted || &preface != mux::PREFACE {
        return;
    }
    let (frames, outgoing) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(outgoing, write));
    // Small frames only until the client has said who it is.
    let mut inbound = FramedRead::new(read, mux::codec(HELLO_BYTES));
    let mut connection = Connection {
        shared,
        frames,
        streams: HashMap::new(),
        waits: Waits::new(),
    };
    let mut open = tokio::select! {
        welcomed = connection.hello(&mut inbound) => welcomed,
        () = stop.cancelled() => false,
    };
    let max_frame = connection.shared.config.max_message_bytes;
    inbound.decoder_mut().set_max_frame_length(max_frame);
    let mut heard = Instant::now();
    while open {
        tokio::select! {
            frame = inbound.next() => {
                heard = Instant::now();
                open = connection.take(frame);
            }
            Some(done) = connection.waits.next(), if !connection.waits.is_empty() => {
                connection.wait_ended(done);
            }
            () = tokio::time::sleep_until(heard + SILENCE) => {
                // Clients ping every 5 s: this one is gone without a word.
                open = false;
            }
            () = stop.cancelled() => open = false,
        }
    }
    // Dropping the sessions and their waits leaves the queues; then the
    // writer sends what is left (a refusal, say) and stops.
    drop(connection);
    let _ = writer.await;
}

/// Sends the connection's frames, every frame that is ready in one write.
/// A client that takes nothing for [`SILENCE`] is cut off, so that the
/// frames it does not read cannot pile up.
async fn write_frames(
    mut outgoing: mpsc::UnboundedReceiver<proto::MuxEvent>,
    mut write: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buf = BytesMut::with_capacity(WRITE_BATCH);
    while let Some(event) = outgoing.recv().await {
        mux::put_frame(&mut buf, &event);
        while buf.len() < WRITE_BATCH {
            match outgoing.try_recv() {
                Ok(event) => mux::put_frame(&mut buf, &event),
                Err(_) => break,
            }
        }
        match tokio::time::timeout(SILENCE, write.write_all(&buf)).await {
            Ok(Ok(())) => buf.clear(),
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!("cut off a mux client that read nothing for {SILENCE:?}");
                return;
            }
        }
    }
    let _ = write.shutdown().await;
}

struct Connection {
    shared: Arc<Shared>,
    frames: mpsc::UnboundedSender<proto::MuxEvent>,
    streams: HashMap<u32, SessionStream>,
    waits: Waits,
}

impl Connection {
    /// Takes what the reader gave; `false` when the connection is over.
    fn take(&mut self, frame: Option<std::io::Result<BytesMut>>) -> bool {
        match frame {
            Some(Ok(frame)) => !self.handle(&frame),
            Some(Err(err)) => {
                self.refuse(Status::invalid_argument(format!(
                    "unreadable frame ({err}); frames are at most {} bytes \
                     (max_message_bytes)",
                    self.shared.config.max_message_bytes
                )));
                false
            }
            None => false,
        }
    }

    /// Forgets a wait that has ended.
    fn wait_ended(&mut self, done: Result<(u32, u64), futures::future::Aborted>) {
        if let Ok((stream, id)) = done {
            if let Some(session) = self.streams.get_mut(&stream) {
                session.wait_ended(id);
            }
        }
    }

    /// Checks the client's Hello and welcomes it; `false` if refused.
    async fn hello<S>(&mut self, inbound: &mut S) -> bool
    where
        S: futures::Stream<Item = std::io::Result<BytesMut>> + Unpin,
    {
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await;
        let hello = match first {
            Ok(Some(Ok(frame))) => match proto::MuxRequest::decode(frame) {
                Ok(proto::MuxRequest {
                    body: Some(RequestBody::Hello(hello)),
                    ..
                }) => hello,
                _ => {
                    self.refuse(Status::invalid_argument(
                        "the first frame of a mux connection must be a Hello",
                    ));
                    return false;
                }
            },
            _ => return false,
        };
        if let Some(expected) = &self.shared.config.auth_token {
            if !same_secret(hello.auth_token.as_bytes(), expected.as_bytes()) {
                self.refuse(Status::unauthenticated(
                    "this server needs its shared secret: connect with \
                     distlock://:SECRET@host:port",
                ));
                return false;
            }
        }
        let max_frame_bytes =
            u32::try_from(self.shared.config.max_message_bytes).unwrap_or(u32::MAX);
        let _ = self.frames.send(proto::MuxEvent {
            stream: 0,
            body: Some(EventBody::Welcome(proto::Welcome { max_frame_bytes })),
        });
        true
    }

    /// Ends the whole connection with the reason.
    fn refuse(&self, status: Status) {
        let _ = self.frames.send(end_frame(0, &status));
    }

    /// Handles one frame; `true` when the connection is over.
    fn handle(&mut self, frame: &[u8]) -> bool {
        let request = match proto::MuxRequest::decode(frame) {
            Ok(request) => request,
            Err(err) => {
                self.refuse(Status::invalid_argument(format!(
                    "garbled frame, not a MuxRequest ({err})"
                )));
                return true;
            }
        };
        let stream = request.stream;
        match request.body {
            Some(RequestBody::Request(request)) if stream != 0 => {
                match self.streams.get_mut(&stream) {
                    Some(session) => {
                        if !session.handle(request, &self.waits) {
                            // Closed: the stream ends, as a gRPC stream does.
                            self.streams.remove(&stream);
                            let _ = self.frames.send(end_frame(stream, &Status::ok("closed")));
                        }
                    }
                    None => {
                        let out = Outbound::Mux {
                            stream,
                            frames: self.frames.clone(),
                        };
                        let shared = Arc::clone(&self.shared);
                        if let Some(session) = SessionStream::open(shared, request, out) {
                            self.streams.insert(stream, session);
                        }
                    }
                }
            }
            Some(RequestBody::End(_)) => {
                self.streams.remove(&stream);
            }
            Some(RequestBody::Ping(_)) => {
                let _ = self.frames.send(proto::MuxEvent {
                    stream,
                    body: Some(EventBody::Pong(proto::Pong {})),
                });
            }
            Some(RequestBody::Request(_)) => {
                self.refuse(Status::invalid_argument(
                    "stream 0 is the connection's; sessions use streams 1 and up",
                ));
                return true;
            }
            Some(RequestBody::Hello(_)) | None => {
                self.refuse(Status::invalid_argument(
                    "expected a request, an End or a Ping after the Hello",
                ));
                return true;
            }
        }
        false
    }
}

/// Turns a mux connection away with `status`, e.g. on a server that
/// speaks only TLS.
pub(crate) async fn refuse(mut socket: TcpStream, status: Status) {
    // Read the preface and Hello first: closing with unread bytes would
    // reset the connection before the client reads why.
    let mut hello = [0; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(200), socket.read(&mut hello)).await;
    let mut buf = BytesMut::new();
    mux::put_frame(&mut buf, &end_frame(0, &status));
    let _ = tokio::time::timeout(HELLO_TIMEOUT, socket.write_all(&buf)).await;
    let _ = socket.shutdown().await;
}
