//! The distlock server as users run it: `distlock serve`, `run` and
//! `status` against it, a clean stop, and kill -9 restarts under load.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Server;
use distlock::ErrorKind;

fn distlock(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(args)
        .env("DISTLOCK_URL", url)
        .output()
        .expect("run distlock")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_and_status_against_a_server_and_a_clean_stop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    let token = || -> u64 {
        let run = [
            "run",
            "--key",
            "job",
            "--",
            "sh",
            "-c",
            "echo $DISTLOCK_TOKEN",
        ];
        let output = distlock(&url, &run);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        text(&output.stdout).trim().parse().expect("token")
    };
    let (a, b) = (token(), token());
    assert!(b > a, "token {b} after {a}");

    let mut holder = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args([
            "run",
            "--key",
            "report",
            "--owner",
            "nightly report on web1",
        ])
        .args(["--", "sleep", "30"])
        .env("DISTLOCK_URL", &url)
        .spawn()
        .expect("start a holder");
    let status = loop {
        let status = distlock(&url, &["status", "report", "--json"]);
        assert!(status.status.success(), "{}", text(&status.stderr));
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
        if json["keys"].as_array().is_some_and(|keys| !keys.is_empty()) {
            break json;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let key = &status["keys"][0];
    assert_eq!(key["key"], "report");
    assert_eq!(key["holders"][0]["mode"], "exclusive");
    assert_eq!(key["holders"][0]["owner"], "nightly report on web1");
    let busy = distlock(
        &url,
        &["run", "--key", "report", "--wait", "100ms", "--", "true"],
    );
    assert_eq!(busy.status.code(), Some(75), "{}", text(&busy.stderr));
    let table = distlock(&url, &["status", "--prefix", "rep"]);
    let table = text(&table.stdout);
    assert!(
        table.contains("holder   exclusive") && table.contains("nightly report on web1"),
        "{table}"
    );
    holder.kill().expect("stop the holder");
    holder.wait().expect("reap");

    assert!(server.terminate().success(), "SIGTERM is a clean stop");
}

#[test]
fn release_force_takes_the_lock_from_a_stuck_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    let refused = distlock(&url, &["release", "job"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("--force"),
        "{}",
        text(&refused.stderr)
    );
    let mut stuck = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args([
            "run",
            "--key",
            "job",
            "--lease",
            "3s",
            "--owner",
            "stuck job",
        ])
        .args(["--", "sleep", "60"])
        .env("DISTLOCK_URL", &url)
        .spawn()
        .expect("start a holder");
    let started = std::time::Instant::now();
    loop {
        let status = distlock(&url, &["status", "job", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
        if json["keys"][0]["holders"][0]["owner"] == "stuck job" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the holder never held: {json}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let forced = distlock(&url, &["release", "--force", "job"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert!(
        text(&forced.stdout).contains("by stuck job"),
        "{}",
        text(&forced.stdout)
    );
    let taken = distlock(&url, &["run", "--key", "job", "--wait", "5s", "--", "true"]);
    assert!(taken.status.success(), "{}", text(&taken.stderr));
    let code = stuck.wait().expect("the stuck run ends").code();
    assert_eq!(code, Some(76), "the old holder's run reports the lock lost");
    assert!(server.terminate().success());
}

#[test]
fn a_run_survives_a_reset_of_its_connection() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime for the proxy");
    let target = server.url().trim_start_matches("distlock://").to_owned();
    let proxy = runtime.block_on(distlock_testkit::proxy::Proxy::start(
        target.parse().expect("the server's address"),
    ));
    let through = format!("distlock://{}", proxy.addr());
    let mut run = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["run", "--key", "nightly", "--lease", "3s", "--"])
        .args(["sh", "-c", "sleep 5; exit 7"])
        .env("DISTLOCK_URL", &through)
        .spawn()
        .expect("start a run");
    // Reset once the run holds the key.
    let started = std::time::Instant::now();
    loop {
        let status = distlock(&server.url(), &["status", "nightly", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
        if json["keys"][0]["holders"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the run never held: {json}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.reset();
    let code = run.wait().expect("the run ends").code();
    assert_eq!(code, Some(7), "the command's own exit code, not 76 (lost)");
    assert!(server.terminate().success());
}

#[test]
fn metrics_count_grants_and_time_acquires() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let server = Server::start(dir.path(), &["--metrics-listen", &metrics]);
    let output = distlock(&server.url(), &["run", "--key", "measured", "--", "true"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut connection = std::net::TcpStream::connect(&metrics).expect("connect to metrics");
    std::io::Write::write_all(
        &mut connection,
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .expect("request");
    let mut page = String::new();
    std::io::Read::read_to_string(&mut connection, &mut page).expect("response");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for line in [
        "distlock_grants_total 1",
        "distlock_releases_total 1",
        "distlock_acquire_seconds_count 1",
        "# TYPE distlock_wait_seconds histogram",
        "distlock_sessions_expired_total 0",
        "distlock_held_locks 0",
    ] {
        assert!(page.contains(line), "no {line:?} in:\n{page}");
    }
}

#[test]
fn requests_fail_rather_than_hang_when_the_server_dies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), &[]);
    let url = server.url();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let client = distlock::connect(&url).await.expect("connect");
        let session = client.session().open().await.expect("open");
        let guard = session
            .lock("doomed")
            .try_lock()
            .await
            .expect("try")
            .expect("free");
        drop(server); // SIGKILL
        let patience = Duration::from_secs(30);
        let attempt = tokio::time::timeout(patience, session.lock("other").try_lock()).await;
        let err = attempt
            .expect("an acquire hung after the server died")
            .expect_err("no server");
        // The session waits to be resumed until its lease has run out.
        assert!(
            matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Lost),
            "{err}"
        );
        let release = tokio::time::timeout(patience, guard.release()).await;
        assert!(release
            .expect("a release hung after the server died")
            .is_err());
    });
}

/// What the critical sections write to: per key, the highest token seen and
/// who is inside.
#[derive(Default)]
struct Fenced {
    last_token: u64,
    inside: Option<usize>,
    writes: u64,
    /// The server runs (token epochs) in which this key was granted.
    epochs: std::collections::BTreeSet<u64>,
}

/// 16 sessions hammer four keys while the server is killed with SIGKILL and
/// restarted 20 times: no token ever goes backwards or repeats, and no two
/// sessions are ever inside the same key's critical section at once.
#[test]
fn kill_9_restarts_under_load_keep_tokens_rising_and_holders_alone() {
    const WORKERS: usize = 16;
    const KEYS: usize = 4;
    const RESTARTS: usize = 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start(dir.path(), &[]);
    let url = server.url();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let resources: Arc<Vec<Mutex<Fenced>>> =
        Arc::new((0..KEYS).map(|_| Mutex::default()).collect());
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (url, resources, violations, stop) = (
            url.clone(),
            Arc::clone(&resources),
            Arc::clone(&violations),
            Arc::clone(&stop),
        );
        workers.push(runtime.spawn(async move {
            let slot = worker % KEYS;
            let key = format!("restart/{slot}");
            while !stop.load(Ordering::SeqCst) {
                let Ok(client) = distlock::connect(&url).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let session = client
                    .session()
                    .ttl(Duration::from_millis(400))
                    .lock_delay(Duration::from_millis(100))
                    .open()
                    .await;
                let Ok(session) = session else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !stop.load(Ordering::SeqCst) {
                    let guard = match session.lock(&key).wait(Duration::from_secs(2)).await {
                        Ok(guard) => guard,
                        Err(err) if err.kind() == ErrorKind::Timeout => continue,
                        Err(_) => break,
                    };
                    {
                        let mut fenced = resources[slot].lock().expect("resource");
                        if guard.token() <= fenced.last_token {
                            violations.lock().expect("list").push(format!(
                                "{key}: token {} after {}",
                                guard.token(),
                                fenced.last_token
                            ));
                        }
                        if let Some(other) = fenced.inside {
                            violations.lock().expect("list").push(format!(
                                "{key}: worker {worker} entered while worker {other} was inside"
                            ));
                        }
                        fenced.last_token = fenced.last_token.max(guard.token());
                        fenced.epochs.insert(guard.token() >> 40);
                        fenced.inside = Some(worker);
                    }
                    // Stay inside until done or told the lock is lost.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                        () = guard.lost() => {}
                    }
                    {
                        let mut fenced = resources[slot].lock().expect("resource");
                        fenced.inside = None;
                        fenced.writes += 1;
                    }
                    let _ = guard.release().await;
                }
            }
        }));
    }
    // Each restart grants nothing for the longest lease (400 ms + 100 ms),
    // so wait longer than that for load to build up again.
    for _ in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(rand::random_range(800..1300)));
        server.kill_and_restart();
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for worker in workers {
            worker.await.expect("worker");
        }
    });
    let violations = violations.lock().expect("list");
    assert!(
        violations.is_empty(),
        "{} violations: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    let writes: HashMap<usize, u64> = resources
        .iter()
        .enumerate()
        .map(|(slot, fenced)| (slot, fenced.lock().expect("resource").writes))
        .collect();
    assert!(
        writes.values().all(|&w| w > 0),
        "every key was written: {writes:?}"
    );
    let epochs: std::collections::BTreeSet<u64> = resources
        .iter()
        .flat_map(|fenced| fenced.lock().expect("resource").epochs.clone())
        .collect();
    assert!(
        epochs.len() > RESTARTS / 2,
        "grants came in only {} of {} server runs: the load did not span the restarts",
        epochs.len(),
        RESTARTS + 1
    );
}
