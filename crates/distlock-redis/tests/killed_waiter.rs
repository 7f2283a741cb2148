//! A waiter whose process is killed (SIGKILL) while it is queued for a key
//! neither gets the key nor blocks the queue for longer than its lease.
//!
//! A holder H takes the key; a child process P queues for it with a short
//! lease (2 s); three more waiters W1, W2, W3 queue after P, in that order.
//! P is SIGKILLed and H releases the key. The queue is FIFO-fair, so the key
//! goes to P first, but P's session runs out and P is skipped: W1, W2 and W3
//! are then granted in the order they queued, W1 within P's lease (plus a
//! generous margin) of the kill, and P never is.
//!
//! Shown for `redis://` on one server and for `redlock://` on three.
//!
//! The child is this test binary itself, run again with
//! [`killed_waiter_child`] as the only test and the store's URL and the key
//! in [`URL_VAR`] and [`KEY_VAR`]; without them that test passes at once.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock_core::{Client, Session};
use distlock_redis::RedisStore;
use distlock_testkit::servers::Redis;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

/// Tells the child which store to connect to; its absence means "not the
/// child".
const URL_VAR: &str = "DISTLOCK_TEST_WAITER_URL";
/// Tells the child which key to queue for.
const KEY_VAR: &str = "DISTLOCK_TEST_WAITER_KEY";
/// The name of the test that acts as the child.
const CHILD_TEST: &str = "killed_waiter_child";
/// The line the child prints once its wait has started.
const QUEUED: &str = "queued";
/// The line the child prints if it is ever granted the key.
const GRANTED: &str = "granted";

/// The key everyone contends for (each test has servers of its own).
const KEY: &str = "killed-waiter/key";
/// The holder's and the parent's waiters' lease: never runs out by accident.
const LONG_TTL: Duration = Duration::from_secs(10);
/// The child's lease: how long the store must keep its dead waiter queued.
const CHILD_TTL: Duration = Duration::from_secs(2);
/// Past the child's lease, how long W1 may take after the kill: generous,
/// as test machines are noisy.
const SLACK: Duration = Duration::from_secs(8);
/// How long any waiter waits for the key before giving up.
const PATIENCE: Duration = Duration::from_secs(60);
/// How long the child may take to start, connect and queue.
const CHILD_START: Duration = Duration::from_secs(30);
/// Long enough for a just-spawned waiter to be queued at the store.
const SETTLE: Duration = Duration::from_millis(300);
/// The gap between the parent's waiters, so they queue in a known order.
const GAP: Duration = Duration::from_millis(200);

/// A client on the store at `url`.
async fn connect(url: &str) -> Client {
    let store = RedisStore::connect(url)
        .await
        .expect("connect to the test's redis-server(s)");
    Client::new(Arc::new(store))
}

/// A session on `client` with lease `ttl` and no lock-delay.
async fn open(client: &Client, ttl: Duration) -> Session {
    client
        .session()
        .ttl(ttl)
        .lock_delay(Duration::ZERO)
        .open()
        .await
        .expect("open a session")
}

/// `redlock://` on the given servers.
fn redlock_url(servers: &[Redis]) -> String {
    let hosts: Vec<String> = servers.iter().map(Redis::address).collect();
    format!("redlock://{}", hosts.join(","))
}

/// Prints `line` to stdout and flushes it, past the harness's capture (the
/// child runs with `--nocapture`), for the parent to read.
fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").expect("write to the parent");
    stdout.flush().expect("flush to the parent");
}

/// The child: queues for the key with a short lease, says so, and says so
/// again if it is ever granted. Passes at once when not run as the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_waiter_child() {
    let (Ok(url), Ok(key)) = (std::env::var(URL_VAR), std::env::var(KEY_VAR)) else {
        return;
    };
    let client = connect(&url).await;
    let session = open(&client, CHILD_TTL).await;
    let waiting = tokio::spawn(async move { session.lock(key).wait(PATIENCE).await });
    sleep(SETTLE).await;
    say(QUEUED);
    let guard = waiting
        .await
        .expect("the child's waiter task")
        .expect("the child's wait ends with the key");
    say(GRANTED);
    guard.release().await.expect("the child releases");
}

/// The child process P, with its output read as it comes.
struct Child {
    process: tokio::process::Child,
    /// Its stdout, a line at a time; closed at its end.
    stdout: mpsc::UnboundedReceiver<String>,
    /// Its whole stderr, once it has ended.
    stderr: JoinHandle<String>,
}

impl Child {
    /// Starts this test binary again as the child, queueing for `key` on
    /// the store at `url`.
    fn spawn(url: &str, key: &str) -> Child {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut process = Command::new(exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--include-ignored"])
            .env(URL_VAR, url)
            .env(KEY_VAR, key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the child test binary");
        let out = process.stdout.take().expect("the child's stdout pipe");
        let mut err = process.stderr.take().expect("the child's stderr pipe");
        let (lines, stdout) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut out = BufReader::new(out).lines();
            while let Ok(Some(line)) = out.next_line().await {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            // Whatever was read is kept even if the rest is not UTF-8.
            let _ = err.read_to_string(&mut text).await;
            text
        });
        Child {
            process,
            stdout,
            stderr,
        }
    }

    /// Waits until the child prints a line containing `marker`; panics,
    /// with what the child printed, if it ends or takes too long first.
    async fn until(&mut self, marker: &str) {
        let mut seen = Vec::new();
        let found = timeout(CHILD_START, async {
            while let Some(line) = self.stdout.recv().await {
                let hit = line.contains(marker);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        let why = match found {
            Ok(true) => return,
            Ok(false) => "ended",
            Err(_) => "timed out",
        };
        let (status, _, stderr) = self.kill_and_reap().await;
        panic!(
            "the child {why} before printing {marker:?} ({status}); \
             stdout: {seen:#?}\nstderr:\n{stderr}"
        );
    }

    /// Whether the child is still running.
    fn is_running(&mut self) -> bool {
        self.process
            .try_wait()
            .expect("ask whether the child ended")
            .is_none()
    }

    /// SIGKILLs the child and reaps it; its exit status, the rest of its
    /// stdout and its whole stderr.
    async fn kill_and_reap(&mut self) -> (ExitStatus, Vec<String>, String) {
        // An error here means it has already ended; wait() tells how.
        let _ = self.process.start_kill();
        let status = self.process.wait().await.expect("reap the child");
        let mut rest = Vec::new();
        while let Some(line) = self.stdout.recv().await {
            rest.push(line);
        }
        let stderr = (&mut self.stderr).await.expect("the child's stderr reader");
        (status, rest, stderr)
    }
}

/// The whole story on the store at `url`; see the module docs.
async fn killed_waiter_is_skipped(url: &str) {
    let client = connect(url).await;

    // 1. H holds the key.
    let holder = open(&client, LONG_TTL).await;
    let held = holder
        .lock(KEY)
        .try_lock()
        .await
        .expect("H tries the key")
        .expect("the key is free for H");

    // 2. P queues for it, in another process.
    let mut child = Child::spawn(url, KEY);
    child.until(QUEUED).await;

    // 3. W1, W2, W3 queue after P, in that order.
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for place in 1..=3usize {
        let session = open(&client, LONG_TTL).await;
        let order = Arc::clone(&order);
        waiters.push(tokio::spawn(async move {
            let guard = session.lock(KEY).wait(PATIENCE).await?;
            let granted = Instant::now();
            order.lock().expect("the order list").push(place);
            guard.release().await?;
            Ok::<_, distlock_core::Error>(granted)
        }));
        sleep(GAP).await;
    }
    assert!(
        child.is_running(),
        "the child ended while queued, before it was killed"
    );

    // 4. P is killed while queued; 5. H releases the key.
    let killed = Instant::now();
    let (status, rest, stderr) = child.kill_and_reap().await;
    held.release().await.expect("H releases the key");

    assert_eq!(
        status.signal(),
        Some(9),
        "the child was not ended by SIGKILL ({status}); stdout after {QUEUED:?}: \
         {rest:#?}\nstderr:\n{stderr}"
    );
    assert!(
        !rest.iter().any(|line| line.contains(GRANTED)),
        "the killed child was granted the key while H held it; its stdout after \
         {QUEUED:?}: {rest:#?}"
    );

    let mut grants = Vec::new();
    for (place, waiter) in (1..).zip(waiters) {
        match waiter.await.expect("a waiter task") {
            Ok(granted) => grants.push(granted),
            Err(err) => panic!(
                "W{place} was never granted the key ({err}); granted so far, in \
                 order: {:?}",
                order.lock().expect("the order list")
            ),
        }
    }
    let order = order.lock().expect("the order list").clone();
    let w1_after_kill = grants[0].duration_since(killed);
    assert_eq!(
        order,
        vec![1, 2, 3],
        "the waiters were not granted in the order they queued (W1 came {w1_after_kill:?} \
         after the kill)"
    );
    assert!(
        w1_after_kill < CHILD_TTL + SLACK,
        "W1 was granted {w1_after_kill:?} after the queued child was killed: the dead \
         waiter held up the queue past its {CHILD_TTL:?} lease plus {SLACK:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_waiter_is_skipped_and_the_rest_keep_their_order() {
    let server = Redis::start();
    killed_waiter_is_skipped(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redlock_waiter_is_skipped_and_the_rest_keep_their_order() {
    let servers: Vec<Redis> = (0..3).map(|_| Redis::start()).collect();
    killed_waiter_is_skipped(&redlock_url(&servers)).await;
}
