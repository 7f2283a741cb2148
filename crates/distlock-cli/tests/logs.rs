//! `distlock serve`'s log as operators keep it: in a file, plain text with no
//! terminal escape codes, or JSON lines with `--log-format json`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use distlock_testkit::daemon::free_port;

/// Runs `distlock serve EXTRA…` with its stderr going to a file, takes one
/// lock through it, stops it with SIGTERM, and returns the file's bytes.
fn serve_log(dir: &Path, extra: &[&str]) -> Vec<u8> {
    serve_log_filtered(dir, extra, None)
}

/// [`serve_log`] with `DISTLOCK_LOG` set to `filter`, if there is one.
fn serve_log_filtered(dir: &Path, extra: &[&str], filter: Option<&str>) -> Vec<u8> {
    let log = dir.join("serve.log");
    let address = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_distlock"))
        .args(["serve", "--listen", &address, "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra)
        .env_remove("DISTLOCK_LOG")
        .envs(filter.map(|filter| ("DISTLOCK_LOG", filter)))
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

/// Each line of `text` as JSON.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: not JSON: {line:?}"))
        })
        .collect()
}

fn messages(events: &[serde_json::Value]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|event| event["fields"]["message"].as_str())
        .collect()
}

#[test]
fn serve_log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = serve_log(dir.path(), &["--log-format", "json"]);
    let text = String::from_utf8(log).expect("utf-8");
    let events = json_lines(&text);
    let messages = messages(&events);
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

/// The filter serve's --help gives as an example picks the server's lines;
/// the start and stop lines come all the same.
#[test]
fn serve_log_format_json_keeps_start_and_stop_under_a_filter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let filter = Some("distlock_server=debug");
    let log = serve_log_filtered(dir.path(), &["--log-format", "json"], filter);
    let text = String::from_utf8(log).expect("utf-8");
    let events = json_lines(&text);
    let messages = messages(&events);
    assert_eq!(messages.first(), Some(&"serving locks"), "{text}");
    assert_eq!(messages.last(), Some(&"shutting down"), "{text}");
}

/// A fatal error is a JSON line too, whatever `DISTLOCK_LOG` says.
#[test]
fn serve_log_format_json_reports_a_fatal_error_under_a_filter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let address = taken.local_addr().expect("address").to_string();
    for filter in ["distlock_server=debug", "off"] {
        let output = Command::new(env!("CARGO_BIN_EXE_distlock"))
            .args(["serve", "--listen", &address, "--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--log-format", "json"])
            .env("DISTLOCK_LOG", filter)
            .output()
            .expect("run distlock serve");
        let text = String::from_utf8(output.stderr).expect("utf-8");
        assert_eq!(output.status.code(), Some(2), "{text}");
        let events = json_lines(&text);
        let fatal = events.last().expect("a log line");
        assert_eq!(fatal["level"], "ERROR", "{text}");
        assert!(
            fatal["fields"]["message"]
                .as_str()
                .is_some_and(|message| message.contains(&format!("cannot listen on {address}"))),
            "DISTLOCK_LOG={filter}: {text}"
        );
    }
}
