//! The fault suite: what distlock survives on each store, with numbers.
//!
//! Worker processes (8 by default) loop lock → critical section → release
//! on one key. The critical section writes a fenced register
//! ([`register`]) that remembers the highest token it accepted and refuses
//! lower ones, and every grant, write, loss and release is reported to it,
//! so one clock orders the whole history. Meanwhile the orchestrator
//! ([`run`]) injects faults one at a time: a holder paused (SIGSTOP) for
//! 1.5–3× its TTL, a holder killed mid-section, the store's process killed
//! and started again, and, through a TCP proxy, connections delayed,
//! blackholed or reset. After each fault heals it waits for the next
//! grant, and after the run it checks that no lock is stuck. The checker
//! ([`mod@check`]) then counts accepted writes from overlapping holds, tokens
//! that went backwards, and losses reported after the key was granted on.
//!
//! `cargo test -p distlock-faults` runs the CI tier (about 1,000 grants per
//! store and fault); `distlock-faults run --long` the long tier (10,000).

mod backend;
pub mod check;
mod harness;
pub mod register;
pub mod run;
pub mod worker;

pub use check::{check, Findings};
pub use run::{run_one, run_store, run_stores, table, Fault, Plan, Row, Store};
