//! A worker process: loops lock → critical section (a write to the fenced
//! register) → release, reporting every step to the register.

use std::time::Duration;

use distlock::ErrorKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// What a worker is told.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The lock store.
    #[arg(long)]
    pub url: String,
    /// The register's address.
    #[arg(long)]
    pub register: String,
    /// The worker's slot.
    #[arg(long)]
    pub id: u32,
    /// The key all workers contend for.
    #[arg(long)]
    pub key: String,
    /// Session TTL, in milliseconds.
    #[arg(long)]
    pub ttl_ms: u64,
    /// Lock-delay, in milliseconds.
    #[arg(long)]
    pub lock_delay_ms: u64,
    /// Time in the critical section, in milliseconds.
    #[arg(long)]
    pub hold_ms: u64,
}

/// The worker's line to the register.
struct Line {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Line {
    async fn call(&mut self, message: &str) -> anyhow::Result<String> {
        self.write
            .write_all(format!("{}\n", message.replace('\n', " ")).as_bytes())
            .await?;
        self.lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("the register went away"))
    }
}

/// Runs until killed.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let socket = TcpStream::connect(&args.register).await?;
    socket.set_nodelay(true)?;
    let (read, write) = socket.into_split();
    let mut line = Line {
        lines: BufReader::new(read).lines(),
        write,
    };
    line.call(&format!("hello {} {}", args.id, std::process::id()))
        .await?;
    let client = loop {
        match distlock::connect(&args.url).await {
            Ok(client) => break client,
            Err(err) => {
                line.call(&format!("err connect: {err}")).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let hold = Duration::from_millis(args.hold_ms);
    loop {
        let session = match client
            .session()
            .ttl(Duration::from_millis(args.ttl_ms))
            .lock_delay(Duration::from_millis(args.lock_delay_ms))
            .open()
            .await
        {
            Ok(session) => session,
            Err(err) => {
                line.call(&format!("err open: {err}")).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            line.call("try").await?;
            let guard = match session.lock(&args.key).wait(Duration::from_secs(30)).await {
                Ok(guard) => guard,
                Err(err) if matches!(err.kind(), ErrorKind::Lost | ErrorKind::Closed) => {
                    line.call(&format!("err session: {err}")).await?;
                    break;
                }
                Err(err) => {
                    line.call(&format!("err lock: {err}")).await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let token = guard.token();
            // The section: told to go on (a fault may stop this process
            // right here), work, then write. It writes even if the lock was
            // lost meanwhile, as a process that paused between its check
            // and its write would: the register's fence must refuse it.
            line.call(&format!("acq {token}")).await?;
            let mut lost = false;
            tokio::select! {
                () = tokio::time::sleep(hold) => {}
                () = guard.lost() => {
                    lost = true;
                    line.call(&format!("lost {token}")).await?;
                }
            }
            let held = u8::from(guard.is_held());
            line.call(&format!("write {token} {held}")).await?;
            // A release cut off from the store may outlast the lease: the
            // guard's lost() fires at its deadline, which is when the loss
            // counts as known.
            let deadline = guard.expires_at();
            let release = guard.release();
            tokio::pin!(release);
            let released = tokio::select! {
                released = &mut release => released,
                                () = sleep_until_some(deadline), if !lost => {
                    line.call(&format!("lost {token}")).await?;
                    release.await
                }
            };
            // A release that finds the lock gone (NotHeld, Lost) says
            // nothing about when the loss was known: lost() and the
            // deadline above do.
            match released {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotHeld || err.kind() == ErrorKind::Lost => {}
                Err(err) => {
                    line.call(&format!("err release: {err}")).await?;
                }
            }
            line.call(&format!("rel {token}")).await?;
            if session.is_lost() {
                break;
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
