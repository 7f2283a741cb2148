//! `distlock serve`: the lock server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use distlock_server::Config;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// The log target of serve's start, stop and fatal lines, which are logged
/// whatever `DISTLOCK_LOG` says. Filters match targets by prefix, and only
/// this module's targets begin with it.
pub const NOTICES: &str = "distlock::serve";

/// How `serve` writes its log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people; coloured only on a terminal.
    Text,
    /// One JSON object per line, for log collectors: every line, the
    /// start and stop notices included.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The address to listen on.
    #[arg(long, default_value_t = format!("127.0.0.1:{}", distlock_server::DEFAULT_PORT))]
    listen: String,
    /// Where the server keeps its state (the token epoch) [default:
    /// ./distlock-data, or the config file's data_dir].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A TOML file of settings: limits, TTL bounds, data_dir, auth_token.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to serve Prometheus metrics at /metrics; `off` for nowhere.
    #[arg(long, default_value = "127.0.0.1:7891")]
    metrics_listen: String,
    /// A PEM certificate chain: with --tls-key, serve TLS only (clients use
    /// distlocks://HOST:PORT?ca=CA.pem).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A shared secret every client must present
    /// (distlock://:SECRET@host:port).
    #[arg(long, env = "DISTLOCK_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// The log's format on stderr. `DISTLOCK_LOG` (e.g. `debug`,
    /// `distlock_server=debug`) sets what is logged; the start, stop and
    /// fatal lines are logged whatever it says.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(token) = args.auth_token {
        config.auth_token = Some(token);
    }
    config.metrics_listen = (args.metrics_listen != "off").then_some(args.metrics_listen);
    if args.tls_cert.is_some() {
        (config.tls_cert, config.tls_key) = (args.tls_cert, args.tls_key);
    }
    let scheme = if config.tls_cert.is_some() {
        "distlocks"
    } else {
        "distlock"
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let metrics = config
        .metrics_listen
        .as_ref()
        .map(|metrics| format!("http://{metrics}/metrics"));
    let url = format!("{scheme}://{address}");
    let data_dir = config.data_dir.display().to_string();
    let json = args.log_format == LogFormat::Json;
    if json {
        let metrics = metrics.as_deref().unwrap_or("off");
        tracing::info!(target: NOTICES, %address, data_dir, metrics, url, "serving locks");
    } else {
        let metrics =
            metrics.map_or_else(|| "no metrics".to_owned(), |m| format!("metrics at {m}"));
        eprintln!(
            "distlock: serving locks on {address}, state in {data_dir}, {metrics}; connect with {url}"
        );
    }
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        if json {
            tracing::info!(target: NOTICES, "shutting down");
        } else {
            eprintln!("distlock: shutting down");
        }
    };
    distlock_server::run(listener, config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
