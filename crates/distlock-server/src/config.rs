//! The server's settings: `distlock serve` flags, or a TOML file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The server's settings. Every field has a default, so an empty TOML file
/// (or none) is a working configuration.
///
/// ```toml
/// data_dir = "/var/lib/distlock"
/// auth_token = "s3cret"            # clients pass it as distlock://:s3cret@host:7890
/// max_ttl = "10m"
/// max_waiters_per_key = 10000
/// ```
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the token epoch is kept (default `./distlock-data`).
    pub data_dir: PathBuf,
    /// A shared secret every call must carry as `authorization: Bearer …`.
    pub auth_token: Option<String>,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_listen: Option<String>,
    /// A PEM certificate chain: with `tls_key`, the server speaks TLS only
    /// (clients use `distlocks://`).
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The longest key, in bytes (at most 1024).
    pub max_key_bytes: usize,
    /// Sessions open at once.
    pub max_sessions: usize,
    /// Queued requests per key.
    pub max_waiters_per_key: usize,
    /// The largest message the server accepts, in bytes.
    pub max_message_bytes: usize,
    /// The shortest session lease accepted.
    #[serde(deserialize_with = "duration")]
    pub min_ttl: Duration,
    /// The longest session lease accepted.
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// The longest lock-delay accepted.
    #[serde(deserialize_with = "duration")]
    pub max_lock_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("distlock-data"),
            auth_token: None,
            metrics_listen: None,
            tls_cert: None,
            tls_key: None,
            max_key_bytes: distlock_core::MAX_KEY_BYTES,
            max_sessions: 100_000,
            max_waiters_per_key: 10_000,
            max_message_bytes: 4 * 1024 * 1024,
            min_ttl: distlock_core::MIN_TTL,
            max_ttl: Duration::from_secs(10 * 60),
            max_lock_delay: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<hidden>"))
            .field("metrics_listen", &self.metrics_listen)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("max_key_bytes", &self.max_key_bytes)
            .field("max_sessions", &self.max_sessions)
            .field("max_waiters_per_key", &self.max_waiters_per_key)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("min_ttl", &self.min_ttl)
            .field("max_ttl", &self.max_ttl)
            .field("max_lock_delay", &self.max_lock_delay)
            .finish()
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// Reads a TOML file; unknown settings are an error naming them.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError(format!("cannot read {}: {err}", path.display())))?;
        let config: Config = toml::from_str(&text).map_err(|err| {
            ConfigError(format!("{} is not a valid config: {err}", path.display()))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the limits make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_key_bytes == 0 || self.max_key_bytes > distlock_core::MAX_KEY_BYTES {
            return Err(ConfigError(format!(
                "max_key_bytes must be 1 to {}, not {}",
                distlock_core::MAX_KEY_BYTES,
                self.max_key_bytes
            )));
        }
        if self.min_ttl.is_zero() || self.min_ttl > self.max_ttl {
            return Err(ConfigError(format!(
                "min_ttl ({:?}) must be above zero and at most max_ttl ({:?})",
                self.min_ttl, self.max_ttl
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError(
                "TLS needs both tls_cert and tls_key (PEM files), or neither".to_owned(),
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError(
                "max_message_bytes below 1024 would refuse ordinary requests".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Durations in config files are written like `300ms`, `15s` or `10m`.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|err| {
        serde::de::Error::custom(format!("{err}; write durations like 300ms, 15s or 10m"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("distlock.toml");
        std::fs::write(&path, "").expect("write");
        assert_eq!(
            Config::from_file(&path).expect("empty").max_ttl,
            Config::default().max_ttl
        );
        std::fs::write(&path, "max_ttl = \"90s\"\nauth_token = \"x\"\n").expect("write");
        let config = Config::from_file(&path).expect("valid");
        assert_eq!(config.max_ttl, Duration::from_secs(90));
        let shown = format!("{config:?}");
        assert!(!shown.contains("\"x\""), "Debug hides the token: {shown}");
        assert!(shown.contains("auth_token: Some(\"<hidden>\")"), "{shown}");
        assert!(shown.contains("max_ttl: 90s"), "{shown}");
        std::fs::write(&path, "max_tll = \"90s\"\n").expect("write");
        let err = Config::from_file(&path).expect_err("typo");
        assert!(err.to_string().contains("max_tll"), "{err}");
    }

    #[test]
    fn limits_out_of_range_are_refused_and_their_edges_taken() {
        let max_key = distlock_core::MAX_KEY_BYTES;
        let ttl = Duration::from_secs(10);
        let pem = || Some(PathBuf::from("x.pem"));
        let edges = [
            Config {
                max_key_bytes: 1,
                ..Config::default()
            },
            Config {
                max_key_bytes: max_key,
                ..Config::default()
            },
            Config {
                min_ttl: ttl,
                max_ttl: ttl,
                ..Config::default()
            },
            Config {
                tls_cert: pem(),
                tls_key: pem(),
                ..Config::default()
            },
            Config {
                max_message_bytes: 1024,
                ..Config::default()
            },
        ];
        for config in edges {
            config.validate().expect("within the limits");
        }
        let refused = [
            (
                Config {
                    max_key_bytes: 0,
                    ..Config::default()
                },
                "max_key_bytes must be 1 to",
            ),
            (
                Config {
                    max_key_bytes: max_key + 1,
                    ..Config::default()
                },
                "max_key_bytes must be 1 to",
            ),
            (
                Config {
                    min_ttl: Duration::ZERO,
                    ..Config::default()
                },
                "min_ttl",
            ),
            (
                Config {
                    min_ttl: ttl + Duration::from_millis(1),
                    max_ttl: ttl,
                    ..Config::default()
                },
                "at most max_ttl",
            ),
            (
                Config {
                    tls_cert: pem(),
                    ..Config::default()
                },
                "both tls_cert and tls_key",
            ),
            (
                Config {
                    tls_key: pem(),
                    ..Config::default()
                },
                "both tls_cert and tls_key",
            ),
            (
                Config {
                    max_message_bytes: 1023,
                    ..Config::default()
                },
                "max_message_bytes",
            ),
        ];
        for (config, says) in refused {
            let err = config.validate().expect_err(says);
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
