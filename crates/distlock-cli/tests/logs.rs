//! `distlock serve`'s log as operators keep it: in a file, plain text with no
//! terminal escape codes, or JSON lines with `--log-format json`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use distlock_testkit::daemon::free_port;

/// Runs `distlock serve EXTRA…` with its stderr going to a file, takes one
/// lock through it, stops it with SIGTERM, and returns the file's bytes.
fn serve_log(dir: &Path, extra: &[&str]) -> Vec<u8> {
    let log = dir.join("serve.log");
    let address = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", &address, "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra)
        .env_remove("DISTLOCK_LOG")
        .stderr(std::fs::File::create(&log).expect("create the log"))
        .spawn()
        .expect("start distlock serve");
    let started = Instant::now();
    while std::net::TcpStream::connect(&address).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "distlock serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["run", "--url", &format!("distlock://{address}")])
        .args(["--key", "logged", "--", "true"])
        .stderr(Stdio::null())
        .status()
        .expect("run distlock");
    assert!(run.success(), "a run against the server failed");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(server.wait().expect("wait for serve").success());
    std::fs::read(&log).expect("read the log")
}

#[test]
fn serve_logs_to_a_file_without_escape_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = serve_log(dir.path(), &[]);
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("INFO") && text.contains("distlock server listening"),
        "the server's own log lines are there: {text}"
    );
    assert!(
        !log.windows(2).any(|w| w == b"\x1b["),
        "terminal escape codes in a log file: {text:?}"
    );
}

#[test]
fn serve_log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = serve_log(dir.path(), &["--log-format", "json"]);
    let text = String::from_utf8(log).expect("utf-8");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: not JSON: {line:?}"))
        })
        .collect();
    let messages: Vec<&str> = events
        .iter()
        .filter_map(|event| event["fields"]["message"].as_str())
        .collect();
    assert_eq!(messages.len(), events.len(), "every event has a message");
    assert_eq!(messages.first(), Some(&"serving locks"), "{text}");
    assert!(
        events[0]["fields"]["url"]
            .as_str()
            .is_some_and(|url| url.starts_with("distlock://127.0.0.1:")),
        "{text}"
    );
    assert!(messages.contains(&"distlock server listening"), "{text}");
    assert_eq!(messages.last(), Some(&"shutting down"), "{text}");
}
