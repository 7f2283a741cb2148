//! The store's messages in JetStream: the stream, its subjects, and the
//! headers of each kind of message.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use distlock_core::store::root_cause;
use distlock_core::{Error, Result};
use sha2::{Digest, Sha256};

/// The stream that holds everything.
pub(crate) const STREAM: &str = "DISTLOCK";
const SUBJECTS: &str = "distlock.>";

/// How long the delete marker of an expired message stays. Nothing reads
/// an old one: a session's absence counts as its end, as its marker does.
const MARKER_TTL: Duration = Duration::from_secs(1);

/// How long a notice stays: a waiter starts its consumer right after it
/// read the queue, and a consumer started later than this misses it (and
/// reads the queue again after [`queue::WATCH_SLICE`](distlock_core::store::queue::WATCH_SLICE)).
pub(crate) const NOTICE_TTL_SECS: u64 = 10;

/// The mode's tag of a queue entry.
pub(crate) const MODE: &str = "Distlock-Mode";
/// The session's owner, in a queue entry.
pub(crate) const OWNER: &str = "Distlock-Owner";
/// The sequence a notice says was deleted.
pub(crate) const ENTRY: &str = "Distlock-Entry";
/// Marks a session's message as the session's end (`close`).
pub(crate) const CLOSED: &str = "Distlock-Closed";
/// A message's time to live, in whole seconds.
pub(crate) const TTL: &str = "Nats-TTL";
/// A publish goes through only if this is its subject's last sequence (0:
/// the subject has no message).
pub(crate) const EXPECTED: &str = "Nats-Expected-Last-Subject-Sequence";
/// Set on the delete marker the server leaves when a message expires.
const MARKER: &str = "Nats-Marker-Reason";

/// The subject-safe name of a lock: 128 bits of SHA-256 of its key, in hex.
/// The key itself is each entry's payload, and entries of another key
/// (were two ever to share a hash) are told apart by it.
pub(crate) fn lock_hash(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A session's subject.
pub(crate) fn session_subject(session: &str) -> String {
    format!("distlock.s.{session}")
}

/// The subject of a session's entry number `slot` in the queue `hash`.
pub(crate) fn entry_subject(hash: &str, session: &str, slot: u64) -> String {
    format!("distlock.q.{hash}.{session}.{slot}")
}

/// The queue of lock `hash`, as a filter.
pub(crate) fn queue_filter(hash: &str) -> String {
    format!("distlock.q.{hash}.>")
}

/// Every queue, as a filter.
pub(crate) const ALL_QUEUES: &str = "distlock.q.>";

/// The notice subject of an entry's subject.
pub(crate) fn notice_subject(entry_subject: &str) -> String {
    entry_subject.replacen("distlock.q.", "distlock.g.", 1)
}

/// The notices of every entry of lock `hash`, as a filter.
pub(crate) fn notice_filter(hash: &str) -> String {
    format!("distlock.g.{hash}.>")
}

/// Headers of a publish that must find its subject at `expected`, with a
/// time to live of `ttl_secs` if given.
pub(crate) fn expecting(expected: u64, ttl_secs: Option<u64>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(EXPECTED, expected.to_string().as_str());
    if let Some(ttl) = ttl_secs {
        headers.insert(TTL, ttl.to_string().as_str());
    }
    headers
}

/// Whether a session's last message says it is alive: its own, neither
/// the server's delete marker nor the session's end.
pub(crate) fn session_is_live(headers: &HeaderMap) -> bool {
    headers.get(MARKER).is_none() && headers.get(CLOSED).is_none()
}

/// The sequence a notice names.
pub(crate) fn noticed(headers: &HeaderMap) -> Option<u64> {
    headers.get(ENTRY)?.as_str().parse().ok()
}

/// One queue entry, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) subject: String,
    /// Its stream sequence: its place in the queue, and its token.
    pub(crate) seq: u64,
    /// The session it belongs to.
    pub(crate) session: String,
    pub(crate) tag: String,
    pub(crate) owner: String,
    pub(crate) key: String,
}

impl Entry {
    /// The entry a stored message is; `None` for anything else (a marker).
    pub(crate) fn read(
        subject: &str,
        seq: u64,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Option<Entry> {
        let headers = headers?;
        let tag = headers.get(MODE)?.as_str().to_owned();
        let mut parts = subject.split('.');
        let session = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("distlock"), Some("q"), Some(_), Some(session)) => session.to_owned(),
            _ => return None,
        };
        Some(Entry {
            subject: subject.to_owned(),
            seq,
            session,
            tag,
            owner: headers
                .get(OWNER)
                .map(|owner| owner.as_str().to_owned())
                .unwrap_or_default(),
            key: String::from_utf8_lossy(payload).into_owned(),
        })
    }
}

/// The headers of a new entry.
pub(crate) fn entry_headers(tag: &str, owner: &str) -> HeaderMap {
    let mut headers = expecting(0, None);
    headers.insert(MODE, tag);
    if !owner.is_empty() {
        headers.insert(OWNER, owner);
    }
    headers
}

/// The headers of the notice that the entry at `seq` was deleted.
pub(crate) fn notice_headers(seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(ENTRY, seq.to_string().as_str());
    headers.insert(TTL, NOTICE_TTL_SECS.to_string().as_str());
    headers
}

/// Makes sure the stream exists, as the store needs it.
pub(crate) async fn open_stream(
    js: &jetstream::Context,
    servers: &str,
    replicas: Option<usize>,
    clustered: bool,
) -> Result<stream::Stream> {
    // A cluster keeps 3 copies unless the URL says otherwise: a majority
    // then survives the loss of any one server.
    let copies = replicas.unwrap_or(if clustered { 3 } else { 1 });
    let config = stream::Config {
        name: STREAM.to_owned(),
        description: Some("distlock: sessions, lock queues, notices".to_owned()),
        subjects: vec![SUBJECTS.to_owned()],
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        num_replicas: copies,
        allow_direct: true,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(MARKER_TTL),
        ..Default::default()
    };
    // A cluster that has just started answers no JetStream request until it
    // has elected a meta leader, which takes seconds: asked again until then.
    let patience = tokio::time::Instant::now() + ELECTION_PATIENCE;
    let mut asked_again = false;
    let made = loop {
        let made = js.get_or_create_stream(config.clone()).await;
        match &made {
            Err(err) if clustered && electing(err) && tokio::time::Instant::now() < patience => {
                if !asked_again {
                    tracing::warn!(
                        "NATS at {servers} is electing a leader; asking again for up to \
                         {ELECTION_PATIENCE:?}: {err}"
                    );
                    asked_again = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            _ => break made,
        }
    };
    let stream = made.map_err(|err| not_made(err, servers, copies, asked_again))?;
    let config = &stream.cached_info().config;
    if !made_as_the_store_makes_it(config) {
        return Err(Error::config(format!(
            "NATS at {servers} has a stream {STREAM} made otherwise than the NATS store makes \
             it; delete it (its locks go with it) or point the store at another account"
        )));
    }
    if let Some(why) = unfit(config, replicas) {
        return Err(Error::config(format!(
            "NATS at {servers} has a stream {STREAM} that {why}"
        )));
    }
    if clustered && replicas.is_none() && config.num_replicas < 3 {
        tracing::warn!(
            "NATS at {servers} is a cluster, but its stream {STREAM} is kept in {} copy(ies): \
             a server's loss can lose locks and tokens; `nats stream edit {STREAM} \
             --replicas=3` keeps 3",
            config.num_replicas.max(1)
        );
    }
    Ok(stream)
}

/// Whether `config` has what the store's reads and writes count on:
/// message TTLs and delete markers (sessions end at the server), direct
/// gets, deletes, one message a subject, and the store's subjects alone.
fn made_as_the_store_makes_it(config: &stream::Config) -> bool {
    config.allow_message_ttl
        && config.subject_delete_marker_ttl.is_some()
        && config.allow_direct
        && !config.deny_delete
        && config.max_messages_per_subject == 1
        && config.subjects == [SUBJECTS]
}

/// The error for a stream that could not be made or read; `asked_again`
/// says whether it was asked again while a cluster elected its leader.
fn not_made(
    err: jetstream::context::CreateStreamError,
    servers: &str,
    copies: usize,
    asked_again: bool,
) -> Error {
    use jetstream::context::CreateStreamErrorKind;
    let at = format!("NATS at {servers}");
    let made = match err.kind() {
        CreateStreamErrorKind::JetStreamUnavailable => Error::unavailable(format!(
            "{at} has JetStream off; start nats-server with --jetstream"
        )),
        CreateStreamErrorKind::TimedOut => {
            let how_long = if asked_again { " in 30 s" } else { "" };
            Error::unavailable(format!(
                "{at} answered no JetStream request{how_long}; check that a majority of its \
                 servers run, and that this user may use $JS.API"
            ))
        }
        CreateStreamErrorKind::JetStream(api) if too_few_servers(&api) => Error::config(format!(
            "{at} cannot keep the stream {STREAM} in {copies} copies ({}); give it as many \
                 JetStream servers, or write ?replicas=N in the URL",
            root_cause(&err)
        )),
        _ => Error::unavailable(format!(
            "{at} did not make the stream {STREAM} ({})",
            root_cause(&err)
        )),
    };
    made.with_source(err)
}

/// How long opening the stream asks again while a cluster elects its
/// leaders (plus one call's timeout: about 30 s in all).
const ELECTION_PATIENCE: Duration = Duration::from_secs(25);

/// Whether JetStream refused a stream for want of servers to keep its
/// copies: no suitable peers for placement (10005), insufficient resources
/// (10023), or replicas on a server that is not clustered (10074).
fn too_few_servers(api: &jetstream::Error) -> bool {
    use jetstream::ErrorCode;
    [
        ErrorCode::CLUSTER_NO_PEERS,
        ErrorCode::INSUFFICIENT_RESOURCES,
        ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
    ]
    .contains(&api.error_code())
}

/// Whether making or reading the stream failed because JetStream has no
/// leader yet: no answer in time, or "JetStream system temporarily
/// unavailable" (10008).
fn electing(err: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind;
    match err.kind() {
        CreateStreamErrorKind::TimedOut => true,
        CreateStreamErrorKind::JetStream(err) => {
            err.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
        }
        _ => false,
    }
}

/// What is wrong, for the store, with an existing stream's `config`, and
/// what to change; `None` if nothing. Each of these would drop or lose
/// entries and sessions the store counts on: a lock would go free while
/// its holder holds it.
fn unfit(config: &stream::Config, replicas: Option<usize>) -> Option<String> {
    const REMAKE: &str = "delete it (its locks go with it) and let the store make it again";
    if config.storage != stream::StorageType::File {
        return Some(format!(
            "keeps its messages in memory, which a restart loses; the store needs file \
             storage, which a stream cannot change to: {REMAKE}"
        ));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        return Some(format!(
            "has a retention of {:?}, which drops messages the store still needs; the store \
             needs limits retention, which a stream cannot change to: {REMAKE}",
            config.retention
        ));
    }
    let mut limits = Vec::new();
    if !config.max_age.is_zero() {
        limits.push(format!("max age {:?} (--max-age=0)", config.max_age));
    }
    if config.max_messages > 0 {
        limits.push(format!(
            "max messages {} (--max-msgs=-1)",
            config.max_messages
        ));
    }
    if config.max_bytes > 0 {
        limits.push(format!("max bytes {} (--max-bytes=-1)", config.max_bytes));
    }
    if !limits.is_empty() {
        return Some(format!(
            "has limits that would drop live sessions and queue entries: {}; remove them \
             with `nats stream edit {STREAM}` and the flags shown, or {REMAKE}",
            limits.join(", ")
        ));
    }
    match replicas {
        Some(replicas) if config.num_replicas.max(1) != replicas => Some(format!(
            "has {} replica(s) where the URL asks for replicas={replicas}; change it with \
             `nats stream edit {STREAM} --replicas={replicas}`, or write replicas={} in the URL",
            config.num_replicas.max(1),
            config.num_replicas.max(1)
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_lacking_any_of_what_the_store_counts_on_is_made_otherwise() {
        let made = stream::Config {
            subjects: vec![SUBJECTS.to_owned()],
            max_messages_per_subject: 1,
            allow_direct: true,
            allow_message_ttl: true,
            subject_delete_marker_ttl: Some(MARKER_TTL),
            ..Default::default()
        };
        assert!(made_as_the_store_makes_it(&made));
        let otherwise: [fn(&mut stream::Config); 6] = [
            |config| config.allow_message_ttl = false,
            |config| config.subject_delete_marker_ttl = None,
            |config| config.allow_direct = false,
            |config| config.deny_delete = true,
            |config| config.max_messages_per_subject = 2,
            |config| config.subjects = vec!["distlock.>".into(), "other.>".into()],
        ];
        for (at, change) in otherwise.iter().enumerate() {
            let mut config = made.clone();
            change(&mut config);
            assert!(!made_as_the_store_makes_it(&config), "change {at}");
        }
    }

    #[test]
    fn streams_that_would_lose_entries_are_unfit() {
        let good = stream::Config {
            storage: stream::StorageType::File,
            num_replicas: 3,
            ..Default::default()
        };
        assert_eq!(unfit(&good, None), None);
        assert_eq!(unfit(&good, Some(3)), None);
        let why = unfit(&good, Some(1)).expect("replicas differ");
        assert!(why.contains("--replicas=1"), "{why}");
        let bad = [
            (
                stream::Config {
                    storage: stream::StorageType::Memory,
                    ..good.clone()
                },
                "memory",
            ),
            (
                stream::Config {
                    retention: stream::RetentionPolicy::WorkQueue,
                    ..good.clone()
                },
                "retention",
            ),
            (
                stream::Config {
                    max_age: Duration::from_secs(60),
                    ..good.clone()
                },
                "--max-age=0",
            ),
            (
                stream::Config {
                    max_messages: 1000,
                    ..good.clone()
                },
                "--max-msgs=-1",
            ),
            (
                stream::Config {
                    max_bytes: 1 << 20,
                    ..good.clone()
                },
                "--max-bytes=-1",
            ),
        ];
        for (config, says) in bad {
            let why = unfit(&config, None).expect(says);
            assert!(why.contains(says), "{why}");
        }
    }

    #[test]
    fn subjects_are_safe_whatever_the_key() {
        for key in ["a", "a.b", "a b", "*", ">", "line\nbreak", "ü 🔒"] {
            let hash = lock_hash(key);
            assert_eq!(hash.len(), 32);
            assert!(hash.bytes().all(|byte| byte.is_ascii_hexdigit()), "{hash}");
        }
        assert_ne!(lock_hash("a"), lock_hash("b"));
        let subject = entry_subject("h", "s", 7);
        assert_eq!(subject, "distlock.q.h.s.7");
        assert_eq!(notice_subject(&subject), "distlock.g.h.s.7");
    }

    #[test]
    fn entries_read_back_and_markers_are_none() {
        let headers = entry_headers("p3", "me@host pid 7 (x y)");
        let entry =
            Entry::read("distlock.q.h.s1.4", 9, Some(&headers), b"jobs/a.b").expect("an entry");
        assert_eq!(
            (entry.seq, entry.session.as_str(), entry.tag.as_str()),
            (9, "s1", "p3")
        );
        assert_eq!(
            (entry.owner.as_str(), entry.key.as_str()),
            ("me@host pid 7 (x y)", "jobs/a.b")
        );
        let mut marker = HeaderMap::new();
        marker.insert(MARKER, "MaxAge");
        assert!(Entry::read("distlock.q.h.s1.4", 9, Some(&marker), b"").is_none());
        assert!(Entry::read("distlock.q.h.s1.4", 9, None, b"").is_none());
        assert!(!session_is_live(&marker));
        assert!(session_is_live(&expecting(3, Some(1))));
    }
}
