//! `distlock elect` and `distlock leader` as a user runs them, on the file
//! store: the term in DISTLOCK_TOKEN, the leader's value, a candidate that
//! gives up, and bad input.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn distlock() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distlock"));
    command.env_remove("DISTLOCK_URL");
    command
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn run(args: &[&str]) -> Output {
    distlock().args(args).output().expect("run distlock")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_leader_runs_with_its_term_and_is_shown_with_its_value() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(dir.path());
    let nobody = run(&["leader", "--url", &url, "jobs", "--json"]);
    assert_eq!(nobody.status.code(), Some(0), "{}", text(&nobody.stderr));
    assert_eq!(
        text(&nobody.stdout),
        "{\"leader\":null,\"name\":\"jobs\"}\n"
    );

    let ready = dir.path().join("leading");
    let script = format!(
        "echo $DISTLOCK_KEY $DISTLOCK_TOKEN; touch {}; exec sleep 30",
        ready.display()
    );
    let mut first = distlock()
        .args([
            "elect",
            "--url",
            &url,
            "--key",
            "jobs",
            "--value",
            "web1:8080",
        ])
        .args(["--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the first candidate");
    let started = Instant::now();
    while !ready.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "never elected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let shown = run(&["leader", "--url", &url, "jobs"]);
    assert_eq!(text(&shown.stdout), "jobs: led by web1:8080 (term 1)\n");

    // A second candidate that will not wait gives up with 75.
    let gave_up = run(&[
        "elect", "--url", &url, "--key", "jobs", "--wait", "300ms", "--", "true",
    ]);
    assert_eq!(gave_up.status.code(), Some(75), "{}", text(&gave_up.stderr));

    first.kill().expect("kill the first leader");
    let first = first.wait_with_output().expect("first");
    assert_eq!(text(&first.stdout), "jobs 1\n");
    let second = run(&[
        "elect",
        "--url",
        &url,
        "--key",
        "jobs",
        "--wait",
        "20s",
        "--",
        "sh",
        "-c",
        "echo $DISTLOCK_TOKEN; exit 3",
    ]);
    assert_eq!(second.status.code(), Some(3), "{}", text(&second.stderr));
    assert_eq!(text(&second.stdout), "2\n", "the term went up");
}

#[test]
fn bad_input_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(dir.path());
    let long = "v".repeat(300);
    let refused = run(&[
        "elect", "--url", &url, "--key", "k", "--value", &long, "--", "true",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("election value refused"),
        "{}",
        text(&refused.stderr)
    );
    let empty = run(&["leader", "--url", &url, ""]);
    assert_eq!(empty.status.code(), Some(2));
    assert!(text(&empty.stderr).contains("lock key is empty"));
}
