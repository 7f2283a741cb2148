//! The connection and the calls the store makes on it: publishes that
//! expect a sequence, batched reads, reads from the stream's leader, and
//! deletes by sequence.
//!
//! Every call is bounded in time, and cut short when the connection is
//! lost while it is under way: its answer would have come on that
//! connection and never will, so waiting for the timeout would only slow
//! the store's recovery. Reads and deletes are then asked again. (A call
//! made while the client is disconnected waits for the new connection,
//! which carries it and its answer.)

use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream::{self, context::PublishErrorKind, message::StreamMessage, stream};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use distlock_core::store::root_cause;
use distlock_core::{Error, Result};
use futures::StreamExt;
use tokio::sync::watch;

use crate::wire::{self, notice_subject, session_subject, Entry, STREAM};
use crate::CALL_TIMEOUT;

/// How often a read or delete cut short by a lost connection is asked again.
const TRIES: usize = 3;

/// How a publish that expected a sequence went.
pub(crate) enum Published {
    /// Stored at this sequence.
    At(u64),
    /// The subject's last sequence was not the one expected.
    WrongLast,
    /// The connection was lost before the answer came: whether it was
    /// stored is not known.
    Unknown,
}

/// Why a call has no answer.
enum Cut {
    TimedOut,
    Disconnected,
}

/// The connection, and the stream.
pub(crate) struct Nats {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) stream: stream::Stream,
    /// The servers, without credentials, for messages.
    pub(crate) servers: String,
    /// Counts the connections the client lost.
    pub(crate) disconnects: Arc<watch::Sender<u64>>,
}

impl Nats {
    pub(crate) fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        stream: stream::Stream,
        servers: String,
        disconnects: Arc<watch::Sender<u64>>,
    ) -> Self {
        Nats {
            client,
            js,
            stream,
            servers,
            disconnects,
        }
    }

    /// A failed call, with its cause.
    pub(crate) fn failed(
        &self,
        what: &str,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::unavailable(format!(
            "NATS at {}: {what} failed ({}); check that it runs with JetStream",
            self.servers,
            root_cause(&err)
        ))
        .with_source(err)
    }

    pub(crate) fn timed_out(&self, what: &str) -> Error {
        Error::unavailable(format!(
            "NATS at {}: {what} got no answer in {CALL_TIMEOUT:?}",
            self.servers
        ))
    }

    fn cut(&self, what: &str, cut: Cut) -> Error {
        match cut {
            Cut::TimedOut => self.timed_out(what),
            Cut::Disconnected => Error::unavailable(format!(
                "NATS at {}: the connection was lost during {what}; whether it was done is not \
                 known",
                self.servers
            )),
        }
    }

    /// `call`'s answer, unless it takes [`CALL_TIMEOUT`] or the connection
    /// is lost first.
    async fn bounded<T>(&self, call: impl Future<Output = T>) -> std::result::Result<T, Cut> {
        let mut disconnects = self.disconnects.subscribe();
        tokio::select! {
            answer = call => Ok(answer),
            () = tokio::time::sleep(CALL_TIMEOUT) => Err(Cut::TimedOut),
            _ = disconnects.changed() => Err(Cut::Disconnected),
        }
    }

    /// Asks `call` again while a lost connection cuts it short, a few
    /// times: for calls that may be made twice.
    async fn again<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        for _ in 1..TRIES {
            match self.bounded(call()).await {
                Ok(answer) => return answer,
                Err(Cut::Disconnected) => continue,
                Err(cut) => return Err(self.cut(what, cut)),
            }
        }
        match self.bounded(call()).await {
            Ok(answer) => answer,
            Err(cut) => Err(self.cut(what, cut)),
        }
    }

    /// Publishes to the stream and waits until it is stored. Not asked
    /// again: whether a publish cut short was stored is not known, and the
    /// caller finds out as it must.
    pub(crate) async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Published> {
        let stored = async {
            let ack = self
                .js
                .publish_with_headers(subject, headers, payload)
                .await?;
            ack.await
        };
        match self.bounded(stored).await {
            Err(Cut::Disconnected) => Ok(Published::Unknown),
            Err(cut) => Err(self.cut("a publish", cut)),
            Ok(Ok(ack)) => Ok(Published::At(ack.sequence)),
            Ok(Err(err)) if wrong_last(&err) => Ok(Published::WrongLast),
            Ok(Err(err)) => Err(self.failed("a publish", err)),
        }
    }

    /// Every stored message a direct get `request` answers with (one batch).
    async fn batch(&self, request: &serde_json::Value) -> Result<Vec<async_nats::Message>> {
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|err| self.failed("a subscribe", err))?;
        let body = Bytes::from(serde_json::to_vec(request).expect("a JSON value serializes"));
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{STREAM}"), inbox, body)
            .await
            .map_err(|err| self.failed("a read", err))?;
        let mut messages = Vec::new();
        while let Some(answer) = answers.next().await {
            match answer.status {
                None => messages.push(answer),
                // The end of the batch (204), or nothing matched.
                Some(status) if status.as_u16() == 204 || status == StatusCode::NOT_FOUND => {
                    return Ok(messages)
                }
                Some(status) => {
                    return Err(Error::unavailable(format!(
                        "NATS at {}: a read was refused ({status} {}); check that it runs with \
                         JetStream",
                        self.servers,
                        answer.description.unwrap_or_default()
                    )))
                }
            }
        }
        Err(Error::unavailable(format!(
            "NATS at {}: the connection closed during a read",
            self.servers
        )))
    }

    /// The entries on subjects matching `filter`, oldest first, up to
    /// sequence `up_to` if given (a few past it may come too). Any replica
    /// may answer (see `docs/0010-nats.md` for why that is safe).
    pub(crate) async fn read_entries(
        &self,
        filter: &str,
        up_to: Option<u64>,
    ) -> Result<Vec<Entry>> {
        const PAGE: usize = 256;
        let mut entries = Vec::new();
        let mut from = 0;
        loop {
            let request = serde_json::json!({ "seq": from, "next_by_subj": filter, "batch": PAGE });
            let page = self.again("a read", || self.batch(&request)).await?;
            let Some(last) = page
                .last()
                .and_then(|message| header_u64(message, "Nats-Sequence"))
            else {
                return Ok(entries);
            };
            let more = page
                .last()
                .and_then(|message| header_u64(message, "Nats-Num-Pending"))
                .unwrap_or(0);
            entries.extend(page.iter().filter_map(|message| {
                let headers = message.headers.as_ref()?;
                let subject = headers.get("Nats-Subject")?.as_str();
                let seq = headers.get("Nats-Sequence")?.as_str().parse().ok()?;
                Entry::read(subject, seq, Some(headers), &message.payload)
            }));
            if more == 0 || up_to.is_some_and(|up_to| last >= up_to) {
                return Ok(entries);
            }
            from = last + 1;
        }
    }

    /// The last message on `subject`, as the stream's leader has it.
    pub(crate) async fn leader_last(&self, subject: &str) -> Result<Option<StreamMessage>> {
        use jetstream::stream::LastRawMessageErrorKind;
        self.again("a read", || async {
            match self.stream.get_last_raw_message_by_subject(subject).await {
                Ok(message) => Ok(Some(message)),
                Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(err) => Err(self.failed("a read", err)),
            }
        })
        .await
    }

    /// Whether `session` is alive, as the stream's leader knows: a replica
    /// that lags could miss a session that is.
    pub(crate) async fn session_alive(&self, session: &str) -> Result<bool> {
        let last = self.leader_last(&session_subject(session)).await?;
        Ok(last.is_some_and(|message| wire::session_is_live(&message.headers)))
    }

    /// Whether the message at `seq` is on `subject`, as the leader has it.
    pub(crate) async fn stored(&self, seq: u64, subject: &str) -> Result<bool> {
        use jetstream::stream::RawMessageErrorKind;
        self.again("a read", || async {
            match self.stream.get_raw_message(seq).await {
                Ok(message) => Ok(message.subject.as_str() == subject),
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
                Err(err) => Err(self.failed("a read", err)),
            }
        })
        .await
    }

    /// Deletes the message at `seq`; `false` if there was none. A delete
    /// cut short is asked again, and "none" then counts as deleted: the
    /// first may have been.
    async fn delete(&self, seq: u64) -> Result<bool> {
        let request = serde_json::json!({ "seq": seq, "no_erase": true });
        let subject = format!("STREAM.MSG.DELETE.{STREAM}");
        let mut cut_short = false;
        for _ in 0..TRIES {
            let answer = self
                .bounded(self.js.request(subject.clone(), &request))
                .await;
            let answer: serde_json::Value = match answer {
                Ok(answer) => answer.map_err(|err| self.failed("a delete", err))?,
                Err(Cut::Disconnected) => {
                    cut_short = true;
                    continue;
                }
                Err(cut) => return Err(self.cut("a delete", cut)),
            };
            if answer["success"] == serde_json::Value::Bool(true) {
                return Ok(true);
            }
            // Nothing at that sequence: "sequence N not found" (10043) when
            // the server looks it up, "no message found" (10057) when it
            // tries to remove it (a delete of it got there first), "stream
            // store EOF" (10057) when it is past the stream's last (a
            // server that restarted without its unsynced writes).
            let error = &answer["error"];
            let code = error["err_code"].as_u64();
            let description = error["description"].as_str().unwrap_or_default();
            let gone = ["no message found", "stream store EOF"].contains(&description);
            if code == Some(10043) || (code == Some(10057) && gone) {
                return Ok(cut_short);
            }
            return Err(Error::unavailable(format!(
                "NATS at {}: a delete was refused: {error}",
                self.servers
            )));
        }
        Err(self.cut("a delete", Cut::Disconnected))
    }

    /// Takes the entry at `seq` (on `subject`) out of its queue, and tells
    /// whoever waits for it; `false` if it was gone already. Only that
    /// entry: the message at `seq` is first checked to be on `subject`, as
    /// the leader has it. A sequence is used once while the stream keeps
    /// its writes, but a server that crashed before syncing them uses the
    /// lost ones again, and the message there may be another session's.
    pub(crate) async fn remove_entry(&self, subject: &str, seq: u64) -> Result<bool> {
        if !self.stored(seq, subject).await? {
            return Ok(false);
        }
        if !self.delete(seq).await? {
            return Ok(false);
        }
        // Not waited for: the entry is gone whatever becomes of the notice,
        // and a waiter that misses it reads the queue again after a slice.
        let sent = self
            .js
            .publish_with_headers(
                notice_subject(subject),
                wire::notice_headers(seq),
                Bytes::new(),
            )
            .await;
        match sent {
            Ok(ack) => {
                tokio::spawn(async move {
                    if let Err(err) = ack.await {
                        tracing::debug!("a notice was not stored: {err}");
                    }
                });
            }
            Err(err) => tracing::debug!("a notice was not sent: {err}"),
        }
        Ok(true)
    }
}

impl Nats {
    /// Makes a push consumer; `false` if the connection was lost meanwhile
    /// (made or not, nobody listens to it, and the server drops it).
    pub(crate) async fn create_consumer(
        &self,
        what: &str,
        config: jetstream::consumer::push::Config,
    ) -> Result<bool> {
        match self.bounded(self.stream.create_consumer(config)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(err)) => Err(self.failed(what, err)),
            Err(Cut::Disconnected) => Ok(false),
            Err(cut) => Err(self.cut(what, cut)),
        }
    }
}

/// Whether a publish was refused for its expected last sequence: the
/// subject's last message is another (10071), or, in a cluster, another
/// publish to the subject is in flight (10164, which says no number).
fn wrong_last(err: &jetstream::context::PublishError) -> bool {
    if err.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|api| {
            api.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
        })
}

/// A number in a header of a direct get's answer.
fn header_u64(message: &async_nats::Message, name: &str) -> Option<u64> {
    message.headers.as_ref()?.get(name)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream;
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    use bytes::Bytes;
    use distlock_testkit::servers;

    use async_nats::HeaderMap;

    use crate::client::Published;
    use crate::wire::{entry_headers, entry_subject, STREAM};
    use crate::NatsStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_by_sequence_spares_a_message_on_another_subject() {
        let server = servers::Nats::start();
        let store = NatsStore::connect(&server.url()).await.expect("connect");
        let nats = &store.nats;
        let theirs = entry_subject("h", "theirs", 1);
        let Published::At(seq) = nats
            .publish(theirs.clone(), entry_headers("x", ""), Bytes::from("k"))
            .await
            .expect("publish")
        else {
            panic!("not stored");
        };
        // What a release retried after a crash that lost writes asks: its
        // own entry's subject, at a sequence now used by another.
        let mine = entry_subject("h", "mine", 1);
        assert!(!nats.remove_entry(&mine, seq).await.expect("remove"));
        assert!(nats.stored(seq, &theirs).await.expect("read"), "deleted");
        assert!(nats.remove_entry(&theirs, seq).await.expect("remove"));
        assert!(!nats.stored(seq, &theirs).await.expect("read"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_there_is_an_answer_and_a_refusal_an_error() {
        let server = servers::Nats::start();
        let store = NatsStore::connect(&server.url()).await.expect("connect");
        let nats = &store.nats;
        // A refused publish is not a lost race for the subject.
        let outside = nats
            .publish("outside.x".into(), HeaderMap::new(), Bytes::new())
            .await;
        assert!(outside.is_err(), "no stream takes it");
        // A read refused is not an empty batch, nor "no message": a session
        // that cannot be read is not taken for ended.
        let bad = serde_json::json!({ "seq": 1, "last_by_subj": "x" });
        assert!(nats.batch(&bad).await.is_err(), "a bad direct get");
        let last = nats.leader_last("distlock.s.none").await.expect("read");
        assert!(last.is_none());
        assert!(nats.leader_last("").await.is_err(), "an invalid subject");
        assert!(!nats.stored(999, "distlock.s.a").await.expect("read"));
        assert!(nats.stored(0, "distlock.s.a").await.is_err(), "sequence 0");
        // Three messages on one subject keep the last; a delete of one
        // already gone, or gone before, is false.
        let subject = "distlock.s.a".to_owned();
        let mut last = 0;
        for _ in 0..3 {
            let published = nats.publish(subject.clone(), HeaderMap::new(), Bytes::new());
            let Published::At(seq) = published.await.expect("publish") else {
                panic!("not stored");
            };
            last = seq;
        }
        assert!(!nats.delete(last - 1).await.expect("delete"), "rolled up");
        assert!(nats.delete(last).await.expect("delete"));
        assert!(!nats.delete(last).await.expect("delete"), "deleted before");
        assert!(
            !nats.delete(last + 100).await.expect("delete"),
            "past the last"
        );
        // A delete refused for another reason is an error.
        nats.js.delete_stream(STREAM).await.expect("delete stream");
        assert!(nats.delete(last).await.is_err(), "no stream");
    }

    fn refused(code: u64) -> PublishError {
        let api: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": "wrong last sequence"
        }))
        .expect("an API error");
        PublishError::with_source(PublishErrorKind::Other, api)
    }

    #[test]
    fn a_clustered_refusal_of_the_expected_sequence_is_wrong_last() {
        // A cluster's leader refuses a publish to a subject with another in
        // flight with 10164, not 10071: both mean "not stored".
        assert!(super::wrong_last(&refused(10164)));
        assert!(super::wrong_last(&PublishError::new(
            PublishErrorKind::WrongLastSequence
        )));
        assert!(!super::wrong_last(&refused(10077)));
        assert!(!super::wrong_last(&PublishError::new(
            PublishErrorKind::TimedOut
        )));
    }
}
