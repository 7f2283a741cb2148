//! Prometheus metrics at `/metrics` on a side port: the table's sizes and
//! totals, read when scraped, and latency histograms the server records.

use std::fmt;

use distlock_core::table::{lock_table, SharedTable};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    /// From an acquire's arrival to its answer (grant, refusal or timeout).
    pub(crate) acquire_seconds: Histogram,
    /// From a waiter's queueing to its grant.
    pub(crate) wait_seconds: Histogram,
}

/// Reads the lock table when scraped.
struct TableCollector(SharedTable);

impl fmt::Debug for TableCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TableCollector")
    }
}

impl Collector for TableCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counters = lock_table(&self.0).counters();
        let gauges = [
            ("distlock_sessions", "Sessions open now.", counters.sessions),
            (
                "distlock_held_locks",
                "Holds now (each holder of a shared key or semaphore counts).",
                counters.held,
            ),
            ("distlock_waiters", "Queued acquires now.", counters.waiters),
        ];
        for (name, help, value) in gauges {
            let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let totals = [
            (
                "distlock_sessions_opened",
                "Sessions opened.",
                counters.sessions_opened,
            ),
            (
                "distlock_sessions_expired",
                "Sessions lost to an expired lease.",
                counters.sessions_expired,
            ),
            (
                "distlock_holds_expired",
                "Holds ended by max_hold.",
                counters.holds_expired,
            ),
            ("distlock_grants", "Locks granted.", counters.grants),
            ("distlock_releases", "Locks released.", counters.releases),
            (
                "distlock_forced_releases",
                "Forced releases that ended a hold.",
                counters.forced_releases,
            ),
        ];
        for (name, help, value) in totals {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub(crate) fn new(table: SharedTable) -> Self {
        // 50 µs to about 13 s, by fours.
        let acquire_seconds = Histogram::new(exponential_buckets(0.000_05, 4.0, 10));
        let wait_seconds = Histogram::new(exponential_buckets(0.000_05, 4.0, 10));
        let mut registry = Registry::default();
        registry.register(
            "distlock_acquire_seconds",
            "Time from an acquire's arrival to its answer.",
            acquire_seconds.clone(),
        );
        registry.register(
            "distlock_wait_seconds",
            "Time queued acquires waited for their grant.",
            wait_seconds.clone(),
        );
        registry.register_collector(Box::new(TableCollector(table)));
        Metrics {
            registry,
            acquire_seconds,
            wait_seconds,
        }
    }

    /// The Prometheus text of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
