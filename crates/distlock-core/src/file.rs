//! The file store (`file:///dir`): locks across the processes of one host,
//! like `flock(1)`.
//!
//! Each key has a lock file under the directory, named readably where the key
//! allows (`nightly-report.lock`) and with a hash otherwise
//! (`coupons_batch_7~1f0c…​.lock`). Exclusive and shared locks are `flock`s on
//! it; a semaphore of N permits is N slot files (`KEY~slot0.lock`, …). The
//! fencing counter of a key is kept beside it in `KEY~fence`, bumped under
//! its own short `flock` and fsynced before the guard is returned, so tokens
//! never go backwards, not across a crash.
//!
//! A session here is the process: a lock is held until it is released or the
//! process exits (the kernel drops the `flock`). There is no lease, so a
//! frozen process keeps its locks; use a store with leases when that matters.
//! Waiting is a short jittered poll; the kernel does not queue waiters fairly.
//! Lock files are never deleted (deleting a `flock`ed file races with
//! lockers); they are a few bytes each.
//!
//! A guard reports `lost()` if its lock file is deleted or replaced while it
//! is held, checked at every renewal.
//!
//! `status` (Linux) finds holders in `/proc/locks`, the kernel's list of
//! `flock`s; an exclusive or semaphore holder writes its key, pid, token,
//! mode and owner into its lock file, so those are shown. A shared holder
//! is shown by its pid: many share the file.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::status::{HolderStatus, KeyStatus, Status, StatusQuery};
use crate::store::{
    lock, AcquireRequest, Capabilities, Fencing, Grant, HeldLock, LockStore, Mode, RenewReport,
    SessionModel, SessionOptions, StoreSession,
};

/// The longest readable part of a lock file name.
const READABLE_NAME_BYTES: usize = 80;

/// A lock store in a directory of one host.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: Arc<PathBuf>,
}

impl FileStore {
    /// Uses `dir` for lock files, creating it if missing. Fails with a
    /// [`ErrorKind::Config`] error if it cannot be created or written.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let checked = dir.clone();
        blocking(move || check_dir(&checked)).await?;
        Ok(FileStore { dir: Arc::new(dir) })
    }

    /// The directory of the lock files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the file store supports.
    pub fn capabilities() -> Capabilities {
        let mut caps = Capabilities::minimal("file");
        caps.shared = true;
        caps.semaphore = true;
        caps.fencing = Fencing::Durable;
        caps.session = SessionModel::Process;
        caps.status = cfg!(target_os = "linux");
        caps.keeps_owner = cfg!(target_os = "linux");
        caps.tells_leader = cfg!(target_os = "linux");
        caps
    }
}

fn check_dir(dir: &Path) -> Result<()> {
    let unusable = |what: &str, err: io::Error| {
        Error::config(format!(
            "cannot {what} lock directory {}: {err}; choose a directory this user can write, \
             or fix its permissions",
            dir.display()
        ))
        .with_source(err)
    };
    std::fs::create_dir_all(dir).map_err(|err| unusable("create", err))?;
    let probe = dir.join(format!(
        ".distlock-probe-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    File::create(&probe).map_err(|err| unusable("write in", err))?;
    std::fs::remove_file(&probe).map_err(|err| unusable("write in", err))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| Error::store("file store task failed").with_source(err))?
}

/// The file name stem of a key: the key itself when it is short and made of
/// `[A-Za-z0-9._-]` (not starting with a dot), else a cleaned prefix, `~` and
/// a hash of the whole key. Clean names never contain `~`, so the two kinds
/// never meet; two hashed keys that collide share a lock, which costs
/// waiting, never exclusion.
pub(crate) fn file_stem(key: &str) -> String {
    let readable = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if key.len() <= READABLE_NAME_BYTES && !key.starts_with('.') && key.chars().all(readable) {
        return key.to_owned();
    }
    let cleaned: String = key
        .chars()
        .map(|c| if readable(c) { c } else { '_' })
        .take(READABLE_NAME_BYTES)
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    format!("{cleaned}~{:016x}", crate::key_hash(key))
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn io_error(what: String, err: io::Error) -> Error {
    let kind = match err.kind() {
        io::ErrorKind::PermissionDenied => ErrorKind::Config,
        _ => ErrorKind::Store,
    };
    Error::new(kind, format!("{what}: {err}")).with_source(err)
}

/// Tries to lock `path` in the given way without waiting.
fn try_flock(path: &Path, shared: bool) -> Result<Option<File>> {
    let file =
        open_rw(path).map_err(|err| io_error(format!("cannot open {}", path.display()), err))?;
    let attempt = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match attempt {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(err)) => {
            Err(io_error(format!("cannot lock {}", path.display()), err))
        }
    }
}

/// Adds one to the key's fencing counter and makes it durable.
fn bump_fence(path: &Path) -> Result<u64> {
    let failed = |err: io::Error| {
        io_error(
            format!("cannot update fencing counter {}", path.display()),
            err,
        )
    };
    let mut file = open_rw(path).map_err(failed)?;
    file.lock().map_err(failed)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(failed)?;
    let last: u64 = match text.trim() {
        "" => 0,
        digits => digits.parse().map_err(|_| {
            Error::store(format!(
                "fencing counter {} is corrupt (holds {digits:?}); write the highest token \
                 ever used into it, or a larger number",
                path.display()
            ))
        })?,
    };
    let next = last + 1;
    // Overwrite in place, never truncate: a larger number is never shorter,
    // so the new text covers the old, and a crash mid-way cannot leave an
    // empty file that would restart the tokens at 1.
    file.seek(SeekFrom::Start(0)).map_err(failed)?;
    file.write_all(format!("{next}\n").as_bytes())
        .map_err(failed)?;
    file.sync_data().map_err(failed)?;
    Ok(next)
}

/// One held lock: its locked file, where it lives, and the token of its
/// grant (a release must name it).
struct HeldFile {
    file: File,
    path: PathBuf,
    token: u64,
}

impl HeldFile {
    /// Whether the path still names the file we locked.
    fn still_ours(&self) -> bool {
        match (self.file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(ours), Ok(now)) => ours.ino() == now.ino() && ours.dev() == now.dev(),
            _ => false,
        }
    }
}

/// Writes who holds `held` into its lock file, for `status`: the key, then
/// (for a sole holder) its pid, token, mode and owner, a line each. Shared
/// holders write the key only, where the file does not name it already.
/// Written before the file is cut to length, so a reader never finds it
/// empty; a key with a newline is not written (`status` shows the file's
/// name instead). Best effort: the lock is held whether or not this lands.
fn describe(held: &HeldFile, key: &str, token: u64, mode: Mode, owner: &str) {
    let key = if key.contains('\n') { "" } else { key };
    let text = if mode == Mode::Shared {
        let current = std::fs::read_to_string(&held.path).unwrap_or_default();
        if current.lines().next() == Some(key) {
            return;
        }
        format!("{key}\n")
    } else {
        format!(
            "{key}\n{}\n{token}\n{}\n{owner}\n",
            std::process::id(),
            mode.tag()
        )
    };
    let written = held
        .file
        .write_all_at(text.as_bytes(), 0)
        .and_then(|()| held.file.set_len(text.len() as u64));
    if let Err(err) = written {
        tracing::debug!(path = %held.path.display(), "cannot describe a hold for status: {err}");
    }
}

fn acquire_files(
    dir: &Path,
    key: &str,
    mode: Mode,
    owner: &str,
) -> Result<Option<(HeldFile, u64)>> {
    let stem = file_stem(key);
    let locked = match mode {
        Mode::Exclusive | Mode::Shared => {
            let path = dir.join(format!("{stem}.lock"));
            try_flock(&path, mode == Mode::Shared)?.map(|file| (file, path))
        }
        Mode::Semaphore { permits } => {
            let mut found = None;
            for slot in 0..permits {
                let path = dir.join(format!("{stem}~slot{slot}.lock"));
                if let Some(file) = try_flock(&path, false)? {
                    found = Some((file, path));
                    break;
                }
            }
            found
        }
    };
    let Some((file, path)) = locked else {
        return Ok(None);
    };
    let token = bump_fence(&dir.join(format!("{stem}~fence")))?;
    let held = HeldFile { file, path, token };
    describe(&held, key, token, mode, owner);
    Ok(Some((held, token)))
}

/// `flock`s by device (major, minor) and inode: each holder's pid and
/// whether it holds exclusively.
type Flocks = HashMap<(u64, u64, u64), Vec<(u32, bool)>>;

/// The `flock`s of the host, from `/proc/locks`; waiters (`->` lines) are
/// left out.
fn host_flocks() -> Result<Flocks> {
    let text = std::fs::read_to_string("/proc/locks").map_err(|err| {
        Error::unsupported(format!(
            "the file store finds holders in /proc/locks (Linux), which cannot be read \
             here: {err}"
        ))
    })?;
    let mut flocks: HashMap<_, Vec<_>> = HashMap::new();
    for line in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, kind, pid, place, ..] = fields[..] else {
            continue;
        };
        let mut place = place.split(':');
        let (Some(major), Some(minor), Some(inode)) = (place.next(), place.next(), place.next())
        else {
            continue;
        };
        let parsed = (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
            inode.parse::<u64>(),
            pid.parse::<u32>(),
        );
        if let (Ok(major), Ok(minor), Ok(inode), Ok(pid)) = parsed {
            flocks
                .entry((major, minor, inode))
                .or_default()
                .push((pid, kind == "WRITE"));
        }
    }
    Ok(flocks)
}

/// A device number's (major, minor), as `/proc/locks` prints them.
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    (major, minor)
}

/// Who holds the locks of `dir` that `query` names.
fn file_status(dir: &Path, query: &StatusQuery) -> Result<Status> {
    let flocks = host_flocks()?;
    let unreadable = |err: io::Error| io_error(format!("cannot read {}", dir.display()), err);
    let mut keys: BTreeMap<String, KeyStatus> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".lock") else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        let (major, minor) = major_minor(meta.dev());
        let Some(holders) = flocks.get(&(major, minor, meta.ino())) else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        // The named key only if it is this file's (a file written by an
        // older distlock, or half-written, names none): else its stem.
        let fence = stem.rsplit_once("~slot").map_or(stem, |(base, _)| base);
        let key = match lines.first() {
            Some(key) if !key.is_empty() && file_stem(key) == fence => (*key).to_owned(),
            _ => stem.to_owned(),
        };
        if !query.matches(&key) {
            continue;
        }
        let status = keys.entry(key.clone()).or_insert_with(|| KeyStatus {
            key,
            holders: Vec::new(),
            waiters: Vec::new(),
            last_token: std::fs::read_to_string(dir.join(format!("{fence}~fence")))
                .ok()
                .and_then(|text| text.trim().parse().ok()),
        });
        let held_for = meta.modified().ok().and_then(|at| at.elapsed().ok());
        for &(pid, sole) in holders {
            let described = match lines[..] {
                [_, by, token, tag, owner, ..] if sole && by == pid.to_string() => {
                    Some((token.parse().ok(), Mode::from_tag(tag), owner))
                }
                _ => None,
            };
            let holder = match described {
                Some((token, mode, owner)) => HolderStatus {
                    session: format!("pid {pid}"),
                    owner: owner.to_owned(),
                    mode: mode.unwrap_or(Mode::Exclusive),
                    token,
                    held_for,
                    lease_left: None,
                },
                None => HolderStatus {
                    session: format!("pid {pid}"),
                    owner: String::new(),
                    mode: if sole { Mode::Exclusive } else { Mode::Shared },
                    token: None,
                    held_for: None,
                    lease_left: None,
                },
            };
            status.holders.push(holder);
        }
    }
    Ok(Status {
        keys: keys.into_values().collect(),
        counters: None,
    })
}

#[async_trait]
impl LockStore for FileStore {
    fn capabilities(&self) -> Capabilities {
        FileStore::capabilities()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        Ok(Box::new(FileSession {
            dir: Arc::clone(&self.dir),
            owner: Arc::from(options.owner.as_str()),
            held: Arc::default(),
        }))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        let (dir, query) = (Arc::clone(&self.dir), query.clone());
        blocking(move || file_status(&dir, &query)).await
    }
}

type HeldFiles = Arc<Mutex<HashMap<String, HeldFile>>>;

struct FileSession {
    dir: Arc<PathBuf>,
    owner: Arc<str>,
    held: HeldFiles,
}

fn held(files: &Mutex<HashMap<String, HeldFile>>) -> MutexGuard<'_, HashMap<String, HeldFile>> {
    lock(files)
}

#[async_trait]
impl StoreSession for FileSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let (dir, owner) = (Arc::clone(&self.dir), Arc::clone(&self.owner));
        let (key, mode) = (request.key.clone(), request.mode);
        // The attempt never blocks. If this future is dropped before the task
        // answers, the task's result is dropped with it, closing the file and
        // so dropping its flock: a cancelled acquire leaves no holder.
        let Some((file, token)) = blocking(move || acquire_files(&dir, &key, mode, &owner)).await?
        else {
            return Ok(None);
        };
        held(&self.held).insert(request.key.clone(), file);
        Ok(Some(Grant::new(token)))
    }

    async fn release(&self, lock: &HeldLock) -> Result<()> {
        let mut files = held(&self.held);
        // Only the life of the key that was granted with this token.
        if files
            .get(&lock.key)
            .is_none_or(|file| file.token != lock.token)
        {
            return Err(Error::not_held(&lock.key));
        }
        // Closing the file drops its flock.
        files.remove(&lock.key);
        Ok(())
    }

    async fn renew(&self, locks: &[HeldLock]) -> Result<RenewReport> {
        let files = Arc::clone(&self.held);
        let keys: Vec<String> = locks.iter().map(|lock| lock.key.clone()).collect();
        blocking(move || {
            let files = held(&files);
            let lost = keys
                .into_iter()
                .filter(|key| !files.get(key).is_some_and(HeldFile::still_ours))
                .collect();
            Ok(RenewReport::lost(lost))
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        held(&self.held).clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_short_keys_keep_their_name() {
        assert_eq!(file_stem("nightly-report_v2.1"), "nightly-report_v2.1");
    }

    #[test]
    fn odd_or_long_keys_get_a_cleaned_prefix_and_a_hash() {
        let stem = file_stem("coupons/batch 7");
        assert!(stem.starts_with("coupons_batch_7~"), "{stem}");
        assert_ne!(
            file_stem("a/b"),
            file_stem("a b"),
            "different keys, different hashes"
        );
        assert!(!file_stem("..").starts_with('.'));
        let long = file_stem(&"x".repeat(1024));
        assert!(long.len() <= READABLE_NAME_BYTES + 17, "{}", long.len());
        assert_eq!(file_stem("ü"), file_stem("ü"), "stable");
    }

    #[test]
    fn fence_counts_up_and_rejects_garbage() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("k~fence");
        assert_eq!(bump_fence(&path).expect("bump"), 1);
        assert_eq!(bump_fence(&path).expect("bump"), 2);
        std::fs::write(&path, "99\n").expect("write");
        assert_eq!(bump_fence(&path).expect("bump"), 100);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "100\n");
        std::fs::write(&path, "not a number").expect("write");
        let err = bump_fence(&path).expect_err("garbage is refused");
        assert!(err.to_string().contains("is corrupt"), "{err}");
    }
}
