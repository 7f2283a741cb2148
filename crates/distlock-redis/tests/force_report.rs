//! What a forced release tells: every hold it ended is reported, even one
//! under a mode tag that names no mode, and the warning it logs names each
//! ended hold's owner and token, for an operator's audit.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock_core::{Client, Mode};
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata};

/// Keeps every event's fields as one line of `name=value` pairs.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl Capture {
    /// The one capture of this test binary, the global subscriber: a
    /// per-test default would race the other test's thread over which
    /// callsites are enabled (tracing caches that globally).
    fn global() -> &'static Capture {
        static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
        CAPTURE.get_or_init(|| {
            let capture = Capture::default();
            tracing::subscriber::set_global_default(capture.clone())
                .expect("the only global subscriber of this binary");
            capture
        })
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("not poisoned").clone()
    }
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = String::new();
        event.record(&mut Fields(&mut line));
        self.0.lock().expect("not poisoned").push(line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// The forced release's warning names both ended readers: owner, session
/// and token.
#[tokio::test(flavor = "current_thread")]
async fn the_warning_names_every_ended_owner_and_token() {
    let server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let client = Client::new(Arc::new(store));
    let mut readers = Vec::new();
    for owner in ["audit-a@h pid 1 (t)", "audit-b@h pid 2 (t)"] {
        let session = client
            .session()
            .ttl(Duration::from_secs(10))
            .owner(owner)
            .open()
            .await
            .expect("open");
        let guard = session.read("force/audit").await.expect("read");
        readers.push((owner, guard.token(), session, guard));
    }
    let capture = Capture::global();
    let ended = client.force_release("force/audit").await.expect("force");
    assert_eq!(ended.len(), 2, "{ended:?}");
    let lines = capture.lines();
    let warning = lines
        .iter()
        .find(|line| line.contains("message=forced release ") && line.contains("force/audit"))
        .unwrap_or_else(|| panic!("no warning in {lines:?}"));
    for (owner, token, _, _) in &readers {
        assert!(warning.contains(owner), "{owner} not in {warning}");
        assert!(warning.contains(&format!("token {token}")), "{warning}");
    }
    for holder in &ended {
        assert!(warning.contains(&holder.session), "{warning}");
    }
}

/// A live hold under a main key whose tag names no mode (written directly:
/// the scripts never leave one) is ended and reported, not dropped.
#[tokio::test(flavor = "current_thread")]
async fn a_hold_under_an_empty_mode_tag_is_still_reported() {
    let server = Redis::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let client = Client::new(Arc::new(store));
    let session = "0123456789abcdef0123456789abcdef";
    let member = format!("{session}|0123456789abcdef|0");
    let time = server.cli(&["TIME"]);
    let seconds: u64 = time
        .lines()
        .next()
        .expect("seconds")
        .trim()
        .parse()
        .expect("a number");
    let ends = (seconds * 1000 + 60_000).to_string();
    server.cli(&["SET", "dl:{force/untagged}", "*"]);
    server.cli(&["ZADD", "dl:{force/untagged}:h", &ends, &member]);

    let ended = client.force_release("force/untagged").await.expect("force");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].session, session);
    assert_eq!(ended[0].mode, Mode::Exclusive);
    assert_eq!(server.cli(&["ZCARD", "dl:{force/untagged}:h"]), "0");
}
