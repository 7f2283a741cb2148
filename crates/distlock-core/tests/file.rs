//! The conformance suite against the file store, in one directory shared by
//! the whole run.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use distlock_core::{Client, FileStore};

fn lock_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir for lock files"))
        .path()
        .to_owned()
}

async fn connect() -> Client {
    let store = FileStore::open(lock_dir())
        .await
        .expect("open the file store");
    Client::new(Arc::new(store))
}

distlock_core::conformance_suite!(connect);
