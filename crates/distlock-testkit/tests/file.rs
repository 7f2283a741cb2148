//! The conformance suite against the file store, in one directory shared by
//! the whole run.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use distlock_core::{Client, FileStore};

fn lock_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir for lock files").keep();
        distlock_testkit::daemon::remove_when_this_process_exits(&dir);
        dir
    })
    .to_owned()
}

async fn connect() -> Client {
    let store = FileStore::open(lock_dir())
        .await
        .expect("open the file store");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);

/// A lock file deleted under its holder is a lost lock: the next renewal
/// sees the path no longer names the locked file.
#[tokio::test]
async fn deleting_the_lock_file_loses_the_lock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FileStore::open(dir.path()).await.expect("open");
    let client = Client::new(Arc::new(store));
    let session = client
        .session()
        .ttl(std::time::Duration::from_millis(300))
        .open()
        .await
        .expect("open session");
    let guard = session
        .lock("victim")
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    assert!(guard.is_held());
    std::fs::remove_file(dir.path().join("victim.lock")).expect("delete the lock file");
    tokio::time::timeout(std::time::Duration::from_secs(20), guard.lost())
        .await
        .expect("lost() after the lock file was deleted");
    assert!(!guard.is_held());
}

/// Tokens continue from the counter on disk when a new store (a new
/// process) opens the same directory.
#[tokio::test]
async fn tokens_continue_across_store_instances() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut last = 0;
    for _ in 0..3 {
        let store = FileStore::open(dir.path()).await.expect("open");
        let session = Client::new(Arc::new(store))
            .session()
            .open()
            .await
            .expect("open session");
        let guard = session
            .lock("k")
            .try_lock()
            .await
            .expect("try")
            .expect("free");
        assert!(guard.token() > last, "token {} after {last}", guard.token());
        last = guard.token();
        guard.release().await.expect("release");
    }
}
