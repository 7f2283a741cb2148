//! `distlock run` as a user runs it: exit codes, environment, bad input, and
//! many processes contending for one file lock.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

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

/// `distlock run --url URL --key KEY -- sh -c SCRIPT`, ready to run or spawn.
fn run_sh_command(url: &str, key: &str, script: &str) -> Command {
    let mut command = distlock();
    command.args(["run", "--url", url, "--key", key, "--", "sh", "-c", script]);
    command
}

/// Runs `distlock run --url URL --key KEY -- sh -c SCRIPT` to the end.
fn run_sh(url: &str, key: &str, script: &str) -> Output {
    run_sh_command(url, key, script)
        .output()
        .expect("run distlock")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn passes_the_commands_exit_code_and_exports_token_and_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(dir.path());
    let first = run_sh(&url, "job", "echo $DISTLOCK_KEY $DISTLOCK_TOKEN; exit 7");
    assert_eq!(first.status.code(), Some(7), "{}", stderr(&first));
    assert_eq!(String::from_utf8_lossy(&first.stdout), "job 1\n");
    let second = run_sh(&url, "job", "echo $DISTLOCK_TOKEN");
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        "2\n",
        "token went up"
    );
}

#[test]
fn several_keys_are_held_together_and_exported_as_tokens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(dir.path());
    let show = "echo \"$DISTLOCK_TOKENS|${DISTLOCK_TOKEN-unset}|${DISTLOCK_KEY-unset}\"";
    // An outer run's token is not passed on as if it were one of these.
    let both = distlock()
        .args([
            "run", "--url", &url, "--key", "b", "--key", "a b=%", "--", "sh", "-c", show,
        ])
        .env("DISTLOCK_TOKEN", "99")
        .env("DISTLOCK_KEY", "outer")
        .output()
        .expect("run distlock");
    assert_eq!(both.status.code(), Some(0), "{}", stderr(&both));
    assert_eq!(
        String::from_utf8_lossy(&both.stdout),
        "b=1 a%20b%3D%25=1|unset|unset\n",
        "every key in the order given, escaped"
    );
    // One key held elsewhere: none is taken, and the other stays free.
    let ready = dir.path().join("holding");
    let holder_script = format!("touch {}; sleep 30", ready.display());
    let mut holder = distlock()
        .args([
            "run",
            "--url",
            &url,
            "--key",
            "b",
            "--",
            "sh",
            "-c",
            &holder_script,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the holder");
    wait_for(&ready);
    let busy = run(&[
        "run", "--url", &url, "--key", "a b=%", "--key", "b", "--wait", "300ms", "--", "true",
    ]);
    assert_eq!(busy.status.code(), Some(75), "{}", stderr(&busy));
    let free = run(&[
        "run", "--url", &url, "--key", "a b=%", "--wait", "0s", "--", "sh", "-c", show,
    ]);
    assert_eq!(free.status.code(), Some(0), "{}", stderr(&free));
    assert_eq!(
        String::from_utf8_lossy(&free.stdout),
        "a%20b%3D%25=3|3|a b=%\n",
        "one key: DISTLOCK_TOKEN and DISTLOCK_KEY too"
    );
    holder.kill().expect("stop the holder");
    holder.wait().expect("reap the holder");
    assert_usage_error(
        &run(&[
            "run", "--url", &url, "--key", "a", "--key", "a", "--", "true",
        ]),
        "the key 'a' twice",
    );
}

#[test]
fn exits_75_when_the_key_is_held_past_wait() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(dir.path());
    let ready = dir.path().join("holding");
    let holder_script = format!("touch {}; sleep 30", ready.display());
    let mut holder = distlock()
        .args([
            "run",
            "--url",
            &url,
            "--key",
            "busy",
            "--",
            "sh",
            "-c",
            &holder_script,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the holder");
    wait_for(&ready);
    for wait in ["0s", "300ms"] {
        let output = run(&[
            "run", "--url", &url, "--key", "busy", "--wait", wait, "--", "true",
        ]);
        assert_eq!(
            output.status.code(),
            Some(75),
            "--wait {wait}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("did not get the lock 'busy'"),
            "{}",
            stderr(&output)
        );
    }
    holder.kill().expect("stop the holder");
    holder.wait().expect("reap the holder");
    // The holder's death freed the lock (the kernel drops its flock).
    let output = run(&[
        "run", "--url", &url, "--key", "busy", "--wait", "10s", "--", "true",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

fn assert_usage_error(output: &Output, message: &str) {
    assert_eq!(output.status.code(), Some(2), "{}", stderr(output));
    assert!(
        stderr(output).contains(message),
        "expected {message:?} in {:?}",
        stderr(output)
    );
}

#[test]
fn bad_input_is_a_clear_error_with_exit_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(dir.path());
    assert_usage_error(
        &run(&[
            "run",
            "--url",
            "mongo://db:27017",
            "--key",
            "k",
            "--",
            "true",
        ]),
        "unknown store URL scheme 'mongo://'",
    );
    assert_usage_error(
        &run(&["run", "--url", &url, "--key", "", "--", "true"]),
        "lock key is empty; a key is any UTF-8 string of 1 to 1024 bytes",
    );
    let long = "k".repeat(1025);
    assert_usage_error(
        &run(&["run", "--url", &url, "--key", &long, "--", "true"]),
        "lock key is 1025 bytes long; a key is any UTF-8 string of 1 to 1024 bytes",
    );
    // No --url and no DISTLOCK_URL: the local server, which is not running
    // on this port in the tests.
    let unreachable = distlock()
        .args(["run", "--key", "k", "--", "true"])
        .env("DISTLOCK_URL", "distlock://127.0.0.1:9")
        .output()
        .expect("run distlock");
    assert_usage_error(&unreachable, "start one with `distlock serve`");
    assert_usage_error(
        &run(&[
            "run", "--url", &url, "--key", "k", "--wait", "soon", "--", "true",
        ]),
        "write durations like 300ms, 15s or 2m",
    );
}

#[test]
fn an_unwritable_directory_is_a_clear_error_with_exit_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Root writes through file modes, so as root use a filesystem that
    // refuses everyone.
    let unwritable = if nix::unistd::geteuid().is_root() {
        Path::new("/sys/distlock-test-locks").to_owned()
    } else {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.path().join("read-only");
        std::fs::create_dir(&locked).expect("make dir");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        locked
    };
    let output = run(&[
        "run",
        "--url",
        &file_url(&unwritable),
        "--key",
        "k",
        "--",
        "true",
    ]);
    assert_usage_error(&output, "choose a directory this user can write");
    assert!(
        stderr(&output).contains(&unwritable.display().to_string()),
        "names the directory"
    );
}

/// 8 processes × 100 runs of `distlock run` increment a counter file with a
/// sleep inside; not one increment is lost and the tokens the critical
/// sections saw strictly increase.
#[test]
fn eight_processes_never_overlap_and_tokens_increase() {
    const PROCESSES: usize = 8;
    const RUNS: usize = 100;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(&dir.path().join("locks"));
    let counter = dir.path().join("counter");
    let tokens = dir.path().join("tokens");
    std::fs::write(&counter, "0\n").expect("init counter");
    let script = format!(
        "n=$(cat {c}); sleep 0.002; echo $((n + 1)) > {c}; echo $DISTLOCK_TOKEN >> {t}",
        c = counter.display(),
        t = tokens.display()
    );
    let loop_script = format!(
        "for i in $(seq {RUNS}); do {bin} run --url {url} --key counter --wait 60s -- sh -c '{script}' || exit 1; done",
        bin = env!("CARGO_BIN_EXE_distlock"),
    );
    let workers: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new("sh")
                .args(["-c", &loop_script])
                .env_remove("DISTLOCK_URL")
                .spawn()
                .expect("start a worker")
        })
        .collect();
    for mut worker in workers {
        assert!(worker.wait().expect("worker").success(), "a worker failed");
    }
    let count = std::fs::read_to_string(&counter).expect("read counter");
    assert_eq!(count.trim(), (PROCESSES * RUNS).to_string(), "lost updates");
    let seen: Vec<u64> = std::fs::read_to_string(&tokens)
        .expect("read tokens")
        .lines()
        .map(|line| line.parse().expect("a token per line"))
        .collect();
    assert_eq!(seen.len(), PROCESSES * RUNS);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "tokens did not strictly increase"
    );
}

/// Waits until `path` exists: the child's way of saying it is running.
fn wait_for(path: &Path) {
    while !path.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a process ends within 20 s.
fn gone(pid: &str) -> bool {
    common::ends_within(pid, std::time::Duration::from_secs(20))
}

#[test]
fn exits_76_and_kills_the_command_and_its_children_when_the_lock_is_lost() {
    let dir = tempfile::tempdir().expect("temp dir");
    let locks = dir.path().join("locks");
    let grandchild = dir.path().join("grandchild.pid");
    // Deleting the lock file under the holder loses the lock; the next
    // renewal (every third of the lease) notices.
    let script = format!(
        "sleep 60 & echo $! > {pid}; rm {lock}; wait",
        pid = grandchild.display(),
        lock = locks.join("victim.lock").display(),
    );
    let output = run(&[
        "run",
        "--url",
        &file_url(&locks),
        "--key",
        "victim",
        "--lease",
        "600ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(output.status.code(), Some(76), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("lost the lock 'victim'"),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("the lock 'victim' was lost and the command was killed"),
        "{}",
        stderr(&output)
    );
    // The store's warning comes through the log, plain in a pipe.
    assert!(
        stderr(&output).contains("the store says this lock is gone"),
        "{}",
        stderr(&output)
    );
    assert!(
        !output.stderr.windows(2).any(|w| w == b"\x1b["),
        "terminal escape codes in a redirected stderr: {:?}",
        stderr(&output)
    );
    let pid = std::fs::read_to_string(&grandchild).expect("grandchild pid");
    assert!(
        gone(&pid),
        "a process the command started outlived the lock"
    );
}

#[test]
fn the_command_dies_with_distlock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("command.pid");
    let script = format!("echo $$ > {}; sleep 60", pid_file.display());
    let mut distlock_run = run_sh_command(&file_url(dir.path()), "k", &script)
        .spawn()
        .expect("start distlock run");
    wait_for(&pid_file);
    distlock_run.kill().expect("SIGKILL distlock");
    distlock_run.wait().expect("reap distlock");
    let pid = std::fs::read_to_string(&pid_file).expect("command pid");
    assert!(
        gone(&pid),
        "the command ran on after distlock (and its lock) died"
    );
}

#[test]
fn signals_are_forwarded_to_the_command() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ready = dir.path().join("ready");
    let script = format!(
        "trap 'exit 9' TERM; touch {}; sleep 30 & wait",
        ready.display()
    );
    let child = run_sh_command(&file_url(dir.path()), "k", &script)
        .spawn()
        .expect("start distlock run");
    wait_for(&ready);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal distlock");
    let output = child.wait_with_output().expect("wait for distlock");
    assert_eq!(
        output.status.code(),
        Some(9),
        "the command's trap did not run: {}",
        stderr(&output)
    );
}

#[test]
fn status_on_the_file_store_shows_another_process_and_its_owner() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = file_url(dir.path());
    let ready = dir.path().join("holding");
    let holder_script = format!("touch {}; sleep 30", ready.display());
    let mut holder = distlock()
        .args(["run", "--url", &url, "--key", "jobs/nightly report"])
        .args([
            "--owner",
            "nightly on web1",
            "--",
            "sh",
            "-c",
            &holder_script,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start the holder");
    wait_for(&ready);
    let output = run(&["status", "--url", &url, "--prefix", "jobs/", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let key = &json["keys"][0];
    assert_eq!(key["key"], "jobs/nightly report", "{json}");
    let holder_json = &key["holders"][0];
    assert_eq!(holder_json["owner"], "nightly on web1", "{json}");
    assert_eq!(holder_json["mode"], "exclusive", "{json}");
    assert_eq!(holder_json["token"], key["last_token"], "{json}");
    assert_eq!(
        holder_json["session"],
        format!("pid {}", holder.id()),
        "{json}"
    );
    holder.kill().expect("stop the holder");
    holder.wait().expect("reap");
    let output = run(&["status", "--url", &url, "jobs/nightly report"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "no key held or waited for",
        "the kernel dropped the flock with the process"
    );
}
