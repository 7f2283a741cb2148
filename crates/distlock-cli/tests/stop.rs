//! `distlock run` when the lock is at risk or lost: a store frozen (SIGSTOP)
//! past the lease, a command that ignores SIGTERM, and `--grace`. Exit 76
//! whenever distlock stopped the command, whatever its own status.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use distlock_testkit::servers::Redis;

/// Long enough for a `run` to end on a slow host once its lease is gone.
const PATIENCE: Duration = Duration::from_secs(30);

/// `distlock run --url URL --key KEY ARGS… -- sh -c SCRIPT`, its stderr piped.
fn spawn_run(url: &str, key: &str, args: &[&str], script: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["run", "--url", url, "--key", key])
        .args(args)
        .args(["--", "sh", "-c", script])
        .env_remove("DISTLOCK_URL")
        .env_remove("DISTLOCK_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start distlock run")
}

/// Its output if it ends within `PATIENCE`; `None` (and still running)
/// otherwise.
fn ended_within_patience(mut run: Child) -> Result<Output, Child> {
    let started = Instant::now();
    while started.elapsed() < PATIENCE {
        if run.try_wait().expect("poll distlock run").is_some() {
            return Ok(run.wait_with_output().expect("collect distlock run"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(run)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until `path` exists: the command's way of saying it holds.
fn wait_for(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < PATIENCE,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the process whose pid `file` holds ends, waiting a while for it.
fn gone(file: &Path) -> bool {
    let pid = std::fs::read_to_string(file).expect("a pid file");
    common::ends_within(&pid, PATIENCE)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn assert_plain(output: &Output) {
    assert!(
        !output.stderr.windows(2).any(|w| w == b"\x1b["),
        "terminal escape codes in a redirected stderr: {:?}",
        stderr(output)
    );
}

/// A `run` with a 2 s lease writes `A` every 50 ms while a second `run`
/// waits for the key; the store is frozen until the first `run` has ended.
/// It ends on its own, with 76, its command stopped, and what the command
/// left running (deaf to SIGTERM) killed; the waiter then gets the key and
/// writes `B`, after which no `A` is ever written.
fn frozen_store_stops_the_command(url: &str, pause: impl Fn(), resume: impl Fn()) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (writes, ready, pid, left) = (
        dir.path().join("writes"),
        dir.path().join("holding"),
        dir.path().join("command.pid"),
        dir.path().join("left-running.pid"),
    );
    let holder = format!(
        "(trap '' TERM; exec sleep 60) & echo $! > {left}; echo $$ > {pid}; touch {ready}; \
         while true; do echo A >> {writes}; sleep 0.05; done",
        left = left.display(),
        pid = pid.display(),
        ready = ready.display(),
        writes = writes.display(),
    );
    let first = spawn_run(url, "frozen", &["--lease", "2s"], &holder);
    wait_for(&ready);
    // The next holder's lease outlasts the freeze.
    let next = format!("echo B >> {}", writes.display());
    let second = spawn_run(url, "frozen", &["--lease", "30s", "--wait", "60s"], &next);
    std::thread::sleep(Duration::from_millis(300));
    pause();
    let first = ended_within_patience(first);
    resume();
    let first = first.unwrap_or_else(|mut run| {
        let _ = run.kill();
        panic!("distlock run did not end while the store was frozen past its lease")
    });
    assert_eq!(first.status.code(), Some(76), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("the lock 'frozen' was at risk and the command was stopped"),
        "{}",
        stderr(&first)
    );
    assert_plain(&first);
    assert!(gone(&pid), "the command outlived its run");
    assert!(
        gone(&left),
        "a process the command started outlived its run"
    );
    let second = second.wait_with_output().expect("the next holder ends");
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let writes = lines(&writes);
    let first_b = writes
        .iter()
        .position(|line| line == "B")
        .expect("the next holder wrote");
    assert!(first_b > 0, "the first holder never wrote: {writes:?}");
    assert!(
        writes[first_b..].iter().all(|line| line != "A"),
        "the first holder's command wrote after the next holder's first write: {writes:?}"
    );
}

#[test]
fn a_server_frozen_past_the_lease_stops_the_command_with_76() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    frozen_store_stops_the_command(&server.url(), || server.pause(), || server.resume());
}

#[test]
fn redis_frozen_past_the_lease_stops_the_command_with_76() {
    let redis = Redis::start();
    frozen_store_stops_the_command(&redis.url(), || redis.pause(), || redis.resume());
}

#[test]
fn a_command_that_ignores_sigterm_is_killed_at_the_deadline_with_76() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let (writes, ready, pid) = (
        dir.path().join("writes"),
        dir.path().join("holding"),
        dir.path().join("command.pid"),
    );
    let stubborn = format!(
        "trap 'echo TERM >> {writes}' TERM; echo $$ > {pid}; touch {ready}; \
         while true; do echo A >> {writes}; sleep 0.05; done",
        pid = pid.display(),
        ready = ready.display(),
        writes = writes.display(),
    );
    let run = spawn_run(&server.url(), "stubborn", &["--lease", "2s"], &stubborn);
    wait_for(&ready);
    server.pause();
    let run = ended_within_patience(run);
    server.resume();
    let run = run.expect("distlock run did not end while the store was frozen past its lease");
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(76), "{text}");
    assert!(text.contains("is at risk"), "{text}");
    assert!(text.contains("lost the lock 'stubborn'"), "{text}");
    assert!(
        text.contains("the lock 'stubborn' was lost and the command was killed"),
        "{text}"
    );
    assert_plain(&run);
    assert!(gone(&pid), "the command outlived its run");
    let writes = lines(&writes);
    let term = writes
        .iter()
        .position(|line| line == "TERM")
        .expect("the command got SIGTERM first");
    assert!(
        writes[term..].iter().any(|line| line == "A"),
        "the command did not run on after SIGTERM: {writes:?}"
    );
}

/// What becomes of `run`'s stderr while its store is frozen.
#[derive(Clone, Copy, Debug)]
enum Stderr {
    /// A pipe nobody reads, which the command fills first.
    Unread,
    /// A pipe whose reader has gone.
    Closed,
}

/// A `run` whose stderr cannot be written still stops its command when its
/// store is frozen past the lease, and exits 76.
fn stops_the_command_whatever_its_stderr(stderr: Stderr) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let (ready, pid) = (dir.path().join("holding"), dir.path().join("command.pid"));
    // More than a pipe holds, from a process of the command's group that
    // then blocks (or, if the reader has gone, dies of SIGPIPE).
    let script = format!(
        "head -c 1048576 /dev/zero >&2 & echo $$ > {pid}; touch {ready}; \
         while true; do sleep 0.05; done",
        pid = pid.display(),
        ready = ready.display(),
    );
    let mut run = spawn_run(&server.url(), "mute", &["--lease", "2s"], &script);
    if let Stderr::Closed = stderr {
        drop(run.stderr.take());
    }
    wait_for(&ready);
    std::thread::sleep(Duration::from_millis(300));
    server.pause();
    let run = ended_within_patience(run);
    server.resume();
    let run = run.unwrap_or_else(|mut run| {
        let _ = run.kill();
        panic!("with its stderr {stderr:?}, distlock run did not end while the store was frozen past its lease")
    });
    assert_eq!(run.status.code(), Some(76), "with its stderr {stderr:?}");
    assert!(gone(&pid), "the command outlived its run");
}

#[test]
fn a_stderr_nobody_reads_does_not_keep_the_command_running() {
    stops_the_command_whatever_its_stderr(Stderr::Unread);
}

#[test]
fn a_stderr_whose_reader_has_gone_does_not_keep_the_command_running() {
    stops_the_command_whatever_its_stderr(Stderr::Closed);
}

/// Two runs under one freeze, with the same lease: the one with the longer
/// grace gets SIGTERM first. The lease is renewed every third of it, so the
/// deadlines differ by at most a third of it (1.3 s), less than the graces
/// do (1.9 s).
#[test]
fn a_longer_grace_stops_the_command_earlier() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let stopped = dir.path().join("stopped");
    let start = |name: &str, grace: &str| {
        let ready = dir.path().join(name);
        let script = format!(
            "trap 'echo {name} >> {stopped}; exit 0' TERM; touch {ready}; \
             while true; do sleep 0.05; done",
            stopped = stopped.display(),
            ready = ready.display(),
        );
        let run = spawn_run(
            &server.url(),
            name,
            &["--lease", "4s", "--grace", grace],
            &script,
        );
        wait_for(&ready);
        run
    };
    let long = start("long", "2s");
    let short = start("short", "100ms");
    server.pause();
    let (long, short) = (ended_within_patience(long), ended_within_patience(short));
    server.resume();
    let long = long.expect("the run with the long grace did not end");
    let short = short.expect("the run with the short grace did not end");
    assert_eq!(long.status.code(), Some(76), "{}", stderr(&long));
    assert!(
        stderr(&long).contains("was at risk and the command was stopped (its own status: 0)"),
        "{}",
        stderr(&long)
    );
    assert_eq!(short.status.code(), Some(76), "{}", stderr(&short));
    assert_eq!(lines(&stopped), ["long", "short"], "SIGTERMs in this order");
}

#[test]
fn a_grace_over_half_the_lease_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["run", "--url", "memory://", "--key", "k", "--lease", "3s"])
        .args(["--grace", "2s", "--", "true"])
        .output()
        .expect("run distlock");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--grace 2s is more than half the 3s lease"),
        "{}",
        stderr(&output)
    );
}
