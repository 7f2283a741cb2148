//! The conformance suite: the behaviours every store must show, run against
//! real servers, never mocks.
//!
//! A store crate runs it with one line in a test file:
//!
//! ```text
//! async fn connect() -> distlock_core::Client { /* start or reach the store */ }
//! distlock_testkit::conformance_suite!(connect);
//! ```
//!
//! That makes one `#[test]` per behaviour. A behaviour that needs a
//! capability the store does not declare is skipped, and the skip is printed
//! (past the test harness's capture) as `SKIP <store>: <test>: <reason>`.
//!
//! Assertions are about order and exclusion, never about how fast a store
//! is; where time matters, only lower bounds (a lock must not come back
//! early) and generous upper bounds (it must come back at all) are checked.

/// Skips a behaviour, with the reason, when the store lacks a capability.
macro_rules! require {
    ($cond:expr, $why:expr) => {
        if !$cond {
            return Outcome::Skipped($why);
        }
    };
}

mod basics;
pub mod cluster;
pub mod daemon;
mod elect;
mod leases;
mod lifecycle;
mod modes;
mod multi;
pub mod proxy;
pub mod restart;
pub mod servers;
mod stale;
mod status;

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use distlock_core::{Capabilities, Client, Session};

pub use basics::*;
pub use elect::*;
pub use leases::*;
pub use lifecycle::*;
pub use modes::*;
pub use multi::*;
pub use stale::*;
pub use status::*;

/// Long enough that a lock that should come never fails to on a slow host.
const PATIENCE: Duration = Duration::from_secs(20);
/// Long enough for a spawned waiter to be queued at the store.
const SETTLE: Duration = Duration::from_millis(200);

/// How a behaviour ended, if it did not panic.
#[derive(Debug)]
pub enum Outcome {
    /// Every assertion held.
    Passed,
    /// The store does not claim what the behaviour needs.
    Skipped(&'static str),
}

/// What a behaviour gets: a client on the store under test and keys of its
/// own, so behaviours can share one store and run at once.
#[derive(Debug)]
pub struct Kit {
    client: Client,
    caps: Capabilities,
    prefix: String,
}

impl Kit {
    /// A kit for the behaviour `name`.
    pub fn new(client: Client, name: &str) -> Self {
        let caps = client.capabilities();
        let prefix = format!("conformance/{name}/{:08x}", rand::random::<u32>());
        Kit {
            client,
            caps,
            prefix,
        }
    }

    /// The client under test.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The store's capabilities.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// A key unique to this behaviour and run.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// A session with a lease long enough never to lapse by accident.
    pub async fn session(&self) -> Session {
        self.session_with(Duration::from_secs(10), Duration::ZERO)
            .await
    }

    /// A session with the given lease and lock-delay.
    pub async fn session_with(&self, ttl: Duration, lock_delay: Duration) -> Session {
        self.client
            .session()
            .ttl(ttl)
            .lock_delay(lock_delay)
            .open()
            .await
            .expect("open a session on the store under test")
    }
}

/// Runs one behaviour on a fresh multi-threaded runtime: `connect` makes the
/// client, `behaviour` checks it. Panics on failure; prints skips.
pub fn run<C, CF, B, BF>(name: &str, connect: C, behaviour: B)
where
    C: FnOnce() -> CF,
    CF: Future<Output = Client>,
    B: FnOnce(Kit) -> BF,
    BF: Future<Output = Outcome>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime for the suite");
    runtime.block_on(async {
        let client = connect().await;
        let store = client.capabilities().name;
        if let Outcome::Skipped(why) = behaviour(Kit::new(client, name)).await {
            // Straight to stderr: the harness captures only print macros.
            let _ = writeln!(std::io::stderr(), "SKIP {store}: {name}: {why}");
        }
    });
}

/// Makes one `#[test]` per conformance behaviour, each connecting with the
/// given `async fn() -> Client`.
#[macro_export]
macro_rules! conformance_suite {
    ($connect:path) => {
        $crate::conformance_suite!(@each $connect;
            exclusion_under_contention,
            reentrant_holds_share_a_token,
            reentrant_upgrade_is_refused,
            try_lock_on_held_key_is_none,
            wait_times_out,
            foreign_release_is_refused,
            release_after_loss_is_not_held,
            lease_expiry_frees_after_holder_vanishes,
            lost_fires_before_regrant,
            lock_delay_blocks_after_expiry,
            renewal_keeps_lock_past_ttl,
            tokens_increase_across_holders_and_modes,
            fifo_order,
            shared_admits_readers_together,
            shared_excludes_writers,
            writers_are_preferred,
            readers_behind_a_writer_enter_together,
            semaphore_admits_exactly_n,
            cancelled_acquire_leaves_no_trace,
            close_releases_all,
            bad_keys_are_rejected,
            dropped_guard_releases_in_background,
            max_hold_releases,
            waiter_whose_session_dies_leaves_queue,
            long_wait_keeps_the_lock_on_arrival,
            status_lists_holders_and_waiters,
            forced_release_ends_holds_and_fences_them,
            lock_all_in_opposite_orders_never_deadlocks,
            lock_all_is_all_or_nothing,
            lock_all_mixes_modes,
            lock_all_refuses_bad_lists,
            lock_all_waits_holding_nothing_and_is_not_overtaken,
            a_lapsed_session_cannot_touch_the_next_hold,
            a_release_with_another_token_does_nothing,
            a_release_by_another_session_does_nothing,
            one_leader_at_a_time_with_rising_terms,
            observers_see_every_leader_in_order,
            resign_hands_over_at_once,
            closing_the_session_ends_its_leadership,
            a_lost_leader_knows_before_the_next_is_elected,
            a_watched_key_signals_each_change,
        );
    };
    (@each $connect:path; $($behaviour:ident),* $(,)?) => {
        $(
            #[test]
            fn $behaviour() {
                $crate::run(stringify!($behaviour), $connect, $crate::$behaviour);
            }
        )*
    };
}
