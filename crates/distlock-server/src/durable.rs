//! What the server keeps on disk: a token epoch and the longest lease it
//! ever granted — two numbers, written only at start-up and when a new
//! record lease is seen, never per request.
//!
//! Tokens are `epoch << 40 | n`. Each start takes a new epoch and saves the
//! next one before serving, so every token of this run is above every token
//! of every earlier run. Should one key use up 2^40 tokens in a run, the
//! saved epoch is raised first (`TokenRange::raise`).
//!
//! Holds are not saved. Instead a restarted server grants nothing until the
//! longest lease (TTL + lock-delay) any earlier session had has run out: by
//! then every holder from before the crash has seen `lost()`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distlock_core::store::lock;
use distlock_core::table::TokenRange;

/// Bits of a token below the epoch.
const EPOCH_SHIFT: u32 = 40;
const STATE_FILE: &str = "state";
const LOCK_FILE: &str = "LOCK";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Saved {
    /// The epoch the next run (or the next raise) takes.
    next_epoch: u64,
    /// The longest TTL + lock-delay of any session, in ms.
    longest_lease_ms: u64,
}

/// The server's data directory, locked for the life of the server.
#[derive(Debug)]
pub(crate) struct DataDir {
    path: PathBuf,
    saved: Mutex<Saved>,
    /// Holding the `flock` of `LOCK` keeps a second server out.
    _lock: File,
}

/// What start-up found on disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Startup {
    /// This run's epoch.
    pub(crate) epoch: u64,
    /// How long to grant nothing: the longest lease of the runs before.
    pub(crate) wait_out: Duration,
}

fn io_context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |err| io::Error::new(err.kind(), format!("{what}: {err}"))
}

impl DataDir {
    /// Opens (creating) the directory, takes its lock, starts a new epoch.
    pub(crate) fn open(path: &Path) -> io::Result<(Arc<DataDir>, Startup)> {
        std::fs::create_dir_all(path).map_err(io_context(format!(
            "cannot create data directory {}",
            path.display()
        )))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(io_context(format!(
                "cannot write in data directory {}",
                path.display()
            )))?;
        if lock.try_lock().is_err() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "data directory {} is in use by another distlock server; stop it or give \
                     this one another --data-dir",
                    path.display()
                ),
            ));
        }
        let state_path = path.join(STATE_FILE);
        let (saved, existed) = match std::fs::read_to_string(&state_path) {
            Ok(text) => (parse(&text, &state_path)?, true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => (
                Saved {
                    next_epoch: 1,
                    longest_lease_ms: 0,
                },
                false,
            ),
            Err(err) => {
                return Err(io_context(format!("cannot read {}", state_path.display()))(
                    err,
                ))
            }
        };
        let epoch = saved.next_epoch;
        if epoch >= 1 << (64 - EPOCH_SHIFT) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} says epoch {epoch}, past the last one tokens can carry; this data \
                     directory is used up (a new one would let tokens go backwards)",
                    state_path.display()
                ),
            ));
        }
        let dir = DataDir {
            path: path.to_owned(),
            saved: Mutex::new(saved),
            _lock: lock,
        };
        dir.update(|saved| {
            Some(Saved {
                next_epoch: epoch + 1,
                ..saved
            })
        })?;
        let wait_out = if existed {
            Duration::from_millis(saved.longest_lease_ms)
        } else {
            Duration::ZERO
        };
        Ok((Arc::new(dir), Startup { epoch, wait_out }))
    }

    fn saved(&self) -> MutexGuard<'_, Saved> {
        lock(&self.saved)
    }

    /// Changes the saved state, if `change` says how, durably (temp file,
    /// fsync, rename, fsync directory), all under one lock; returns the
    /// state now saved.
    fn update(&self, change: impl FnOnce(Saved) -> Option<Saved>) -> io::Result<Saved> {
        let mut current = self.saved();
        let Some(saved) = change(*current) else {
            return Ok(*current);
        };
        let temp = self.path.join(format!("{STATE_FILE}.tmp"));
        let text = format!(
            "# distlock server state: do not edit\nnext_epoch = {}\nlongest_lease_ms = {}\n",
            saved.next_epoch, saved.longest_lease_ms
        );
        let failed = io_context(format!("cannot save {}", temp.display()));
        let mut file = File::create(&temp).map_err(failed)?;
        let failed = io_context(format!("cannot save {}", temp.display()));
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(failed)?;
        std::fs::rename(&temp, self.path.join(STATE_FILE))
            .and_then(|()| File::open(&self.path)?.sync_all())
            .map_err(io_context(format!(
                "cannot save state in {}",
                self.path.display()
            )))?;
        *current = saved;
        Ok(saved)
    }

    /// Records a session's lease if it is the longest yet, so that a restart
    /// waits it out.
    pub(crate) fn note_lease(&self, lease: Duration) -> io::Result<()> {
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        self.update(|saved| {
            (lease_ms > saved.longest_lease_ms).then_some(Saved {
                longest_lease_ms: lease_ms,
                ..saved
            })
        })?;
        Ok(())
    }

    /// Claims the saved next epoch for this run; returns the new ceiling of
    /// this run's tokens.
    fn raise_epoch(&self) -> io::Result<u64> {
        let saved = self.update(|saved| {
            Some(Saved {
                next_epoch: saved.next_epoch + 1,
                ..saved
            })
        })?;
        Ok(saved.next_epoch << EPOCH_SHIFT)
    }
}

fn parse(text: &str, path: &Path) -> io::Result<Saved> {
    let corrupt = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is corrupt; restore it from a backup (deleting it would let fencing tokens \
                 go backwards)",
                path.display()
            ),
        )
    };
    let mut next_epoch = None;
    let mut longest_lease_ms = None;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, value) = line.split_once('=').ok_or_else(corrupt)?;
        let value: u64 = value.trim().parse().map_err(|_| corrupt())?;
        match name.trim() {
            "next_epoch" => next_epoch = Some(value),
            "longest_lease_ms" => longest_lease_ms = Some(value),
            _ => return Err(corrupt()),
        }
    }
    Ok(Saved {
        next_epoch: next_epoch.ok_or_else(corrupt)?,
        longest_lease_ms: longest_lease_ms.ok_or_else(corrupt)?,
    })
}

/// The token range of one run: above every earlier run's tokens.
#[derive(Debug)]
pub(crate) struct EpochTokens {
    dir: Arc<DataDir>,
    base: u64,
    ceiling: u64,
}

impl EpochTokens {
    pub(crate) fn new(dir: Arc<DataDir>, epoch: u64) -> Self {
        EpochTokens {
            dir,
            base: epoch << EPOCH_SHIFT,
            ceiling: (epoch + 1) << EPOCH_SHIFT,
        }
    }
}

impl TokenRange for EpochTokens {
    fn base(&self) -> u64 {
        self.base
    }

    fn ceiling(&self) -> u64 {
        self.ceiling
    }

    fn raise(&mut self, needed: u64) -> bool {
        while self.ceiling <= needed {
            match self.dir.raise_epoch() {
                Ok(ceiling) => self.ceiling = ceiling,
                Err(err) => {
                    tracing::error!("cannot raise the token epoch, refusing grants: {err}");
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_takes_a_new_epoch_and_waits_out_the_longest_lease() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (data, first) = DataDir::open(dir.path()).expect("first start");
        assert_eq!((first.epoch, first.wait_out), (1, Duration::ZERO));
        data.note_lease(Duration::from_secs(16)).expect("note");
        data.note_lease(Duration::from_secs(3))
            .expect("shorter leases change nothing");
        drop(data);
        let (_data, second) = DataDir::open(dir.path()).expect("second start");
        assert_eq!(
            (second.epoch, second.wait_out),
            (2, Duration::from_secs(16))
        );
    }

    #[test]
    fn a_second_server_cannot_share_the_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _first = DataDir::open(dir.path()).expect("first");
        let err = DataDir::open(dir.path()).expect_err("second must fail");
        assert!(
            err.to_string()
                .contains("in use by another distlock server"),
            "{err}"
        );
    }

    #[test]
    fn raising_the_ceiling_saves_an_epoch_the_next_start_skips() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (data, start) = DataDir::open(dir.path()).expect("start");
        let mut tokens = EpochTokens::new(Arc::clone(&data), start.epoch);
        let ceiling = tokens.ceiling();
        assert!(tokens.raise(ceiling));
        assert!(tokens.ceiling() > ceiling);
        drop((tokens, data));
        let (_data, next) = DataDir::open(dir.path()).expect("restart");
        assert!(
            next.epoch << EPOCH_SHIFT >= ceiling + (1 << EPOCH_SHIFT),
            "{next:?}"
        );
    }

    #[test]
    fn a_corrupt_state_file_is_refused_with_advice() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(STATE_FILE), "next_epoch = banana\n").expect("write");
        let err = DataDir::open(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("is corrupt; restore it"), "{err}");
    }

    /// A lease no longer than the longest yet writes nothing: opening a
    /// session costs no fsync once its TTL has been seen.
    #[test]
    fn a_lease_already_noted_writes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (data, _) = DataDir::open(dir.path()).expect("start");
        data.note_lease(Duration::from_secs(16)).expect("note");
        // A comment only a rewrite of the file would lose.
        let state = dir.path().join(STATE_FILE);
        let mut text = std::fs::read_to_string(&state).expect("state");
        text.push_str("# noted\n");
        std::fs::write(&state, text).expect("mark");
        data.note_lease(Duration::from_secs(16)).expect("again");
        data.note_lease(Duration::from_secs(3)).expect("shorter");
        let now = std::fs::read_to_string(&state).expect("state");
        assert!(now.ends_with("# noted\n"), "written again: {now}");
    }

    /// A state file that is there but cannot be read is refused, never
    /// taken for a first start, whose epoch 1 would send tokens back.
    #[test]
    fn an_unreadable_state_file_is_not_a_first_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(STATE_FILE), [0xff, 0xfe, b'\n']).expect("write");
        let err = DataDir::open(dir.path()).expect_err("not UTF-8");
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
