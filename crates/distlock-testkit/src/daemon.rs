//! Server processes for tests: real processes on free ports, killed when
//! dropped. The store servers in [`super::servers`] are built on these.

use distlock_core::store::lock;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a listening server may take to serve.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A TCP port on 127.0.0.1 that nothing listens on just now, taken below
/// the range the system hands out to outgoing connections
/// (`ip_local_port_range`, 32768 and up by default): a port from that range
/// can be taken by some client's connection between this check and the
/// server's bind, and the server then fails with "address already in use".
pub fn free_port() -> u16 {
    // Held while choosing, so that two threads never choose alike.
    let mut handed_out = lock(&HANDED_OUT);
    let port = unused_port(&handed_out);
    handed_out.insert(port);
    port
}

/// The ports `free_port` handed out in this process: a server may not have
/// bound its port yet when the next is asked for.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn unused_port(handed_out: &std::collections::BTreeSet<u16>) -> u16 {
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral > LOWEST + 1_000 {
        for _ in 0..100 {
            let port = rand::random_range(LOWEST..ephemeral);
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

/// A port on 127.0.0.1 that answers every connection with an HTTP error,
/// for tests of a client pointed at something that is not its store.
pub async fn not_a_store() -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a port on 127.0.0.1");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    port
}

/// Removes `dir` once this test process has exited: for the scratch
/// directory of something kept in a static, which is never dropped.
pub fn remove_when_this_process_exits(dir: &Path) {
    after_this_process(":", dir);
}

/// Runs the shell commands `first` once this process has exited, then
/// removes `dir` (twice if need be: a server's helpers may still be writing
/// when it is first removed).
fn after_this_process(first: &str, dir: &Path) {
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 1; done; {first}; \
         rm -rf -- \"$1\" 2>/dev/null || {{ sleep 1; rm -rf -- \"$1\"; }}",
        parent = std::process::id(),
    );
    let _ = Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// A server process under test.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command`, its output going to `NAME.log` in `log_dir`, and
    /// waits until it accepts connections on `port`. Panics, with the end
    /// of its log, if it exits or does not listen in time.
    pub fn spawn(name: &str, mut command: Command, port: u16, log_dir: &Path) -> Daemon {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create the server log");
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {program}: {err}; install it (./scripts/test does)")
            });
        let mut daemon = Daemon {
            name: name.to_owned(),
            child: Some(child),
            port,
            log,
        };
        daemon.wait_listening();
        daemon
    }

    fn wait_listening(&mut self) {
        let started = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "{} exited ({status}) before listening on {}:\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                panic!(
                    "{} did not listen on {} within {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `ready` says the server serves (it may listen a little
    /// before it does). Panics, with the end of its log, after a minute.
    pub fn wait_ready(&self, mut ready: impl FnMut() -> bool) {
        let started = Instant::now();
        while !ready() {
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "{} on {} did not serve within {READY_TIMEOUT:?}:\n{}",
                self.name,
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Has the server killed, within a second or so, once this test process
    /// has exited, and then its directory `dir` removed: for a server shared
    /// by the tests of a binary (kept in a static, which is never dropped,
    /// so neither the process nor its temporary directory would go away).
    pub fn die_with_this_process(&self, dir: &Path) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        // Kill it, then wait at most five seconds until it is gone (a zombie
        // that nobody reaps would keep `kill -0` succeeding for ever).
        let kill = format!(
            "kill -9 {child} 2>/dev/null; n=0; \
             while kill -0 {child} 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done",
            child = child.id()
        );
        after_this_process(&kill, dir);
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it with SIGSTOP, as a host that froze: its connections stay
    /// open and nothing answers until [`Daemon::resume`] (or a kill).
    pub fn pause(&self) {
        self.send(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused server run on (SIGCONT).
    pub fn resume(&self) {
        self.send(nix::sys::signal::Signal::SIGCONT);
    }

    fn send(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the server was killed");
        let pid = i32::try_from(child.id()).expect("a pid fits in i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .unwrap_or_else(|err| panic!("cannot send {signal} to {}: {err}", self.name));
    }

    /// Kills it with SIGKILL (a crash, not a shutdown) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
