//! The conformance suite against the memory store.

use std::sync::Arc;

use distlock_core::{Client, MemoryStore};

async fn connect() -> Client {
    Client::new(Arc::new(MemoryStore::named("conformance")))
}

distlock_testkit::conformance_suite!(connect);
