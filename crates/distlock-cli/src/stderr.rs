//! stderr that never holds `run` up.
//!
//! A write to a pipe nobody reads blocks once the pipe is full, and one to a
//! pipe whose reader has gone fails (`eprintln!` then panics). `run` must
//! still stop its command on time, so once [`start`] has run, its lines and
//! its log wait in a bounded queue for a thread of their own, which alone
//! ever blocks on stderr. Neither the task that signals the command nor the
//! runtime's workers (which drive its timers, and log through [`event`])
//! ever wait for stderr. Lines that find the queue full are dropped, and a
//! note says how many.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Lines kept while stderr is slow; past that, lines are dropped.
const CAPACITY: usize = 1024;

struct Queue {
    lines: VecDeque<Vec<u8>>,
    /// The writer has taken a line and not finished writing it.
    writing: bool,
    /// Lines dropped since the queue was last full.
    dropped: u64,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    lines: VecDeque::new(),
    writing: false,
    dropped: 0,
});
/// Wakes the writer for a new line, and [`flush`] for a written one.
static CHANGED: Condvar = Condvar::new();
static STARTED: AtomicBool = AtomicBool::new(false);

fn queue() -> MutexGuard<'static, Queue> {
    // A panic while the lock is held leaves the queue consistent: each
    // change to it is a single step.
    QUEUE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the writer thread: from then on nothing here waits for stderr.
/// Before it (and in the commands that never start it), writes go straight
/// to stderr; they may block, but never panic.
pub fn start() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("distlock-stderr".to_owned())
        .spawn(write_queued)?;
    STARTED.store(true, Ordering::SeqCst);
    Ok(())
}

fn write_queued() {
    let mut queue = queue();
    loop {
        let Some(line) = queue.lines.pop_front() else {
            queue = CHANGED.wait(queue).unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        queue.writing = true;
        drop(queue);
        // A reader that went away makes this fail; there is no one to tell.
        let _ = std::io::stderr().write_all(&line);
        queue = self::queue();
        queue.writing = false;
        CHANGED.notify_all();
    }
}

/// Writes `text` to stderr without waiting for it.
pub fn text(text: impl Into<String>) {
    write(text.into().into_bytes());
}

/// Writes `line` and a newline to stderr without waiting for them.
pub fn line(line: impl Into<String>) {
    let mut line = line.into();
    line.push('\n');
    text(line);
}

fn write(bytes: Vec<u8>) {
    if !STARTED.load(Ordering::SeqCst) {
        let _ = std::io::stderr().write_all(&bytes);
        return;
    }
    let mut queue = queue();
    if queue.lines.len() >= CAPACITY {
        queue.dropped += 1;
        return;
    }
    note_dropped(&mut queue);
    queue.lines.push_back(bytes);
    CHANGED.notify_all();
}

/// Says, where they would have been, how many lines were dropped.
fn note_dropped(queue: &mut Queue) {
    if queue.dropped > 0 {
        let note = format!(
            "distlock: {} lines to stderr dropped: it was not being read\n",
            std::mem::take(&mut queue.dropped)
        );
        queue.lines.push_back(note.into_bytes());
    }
}

/// Waits up to `patience` for what is queued to be written: the last lines
/// say how `run` ended, but a stderr nobody reads must not hold the exit.
pub fn flush(patience: Duration) {
    if !STARTED.load(Ordering::SeqCst) {
        return;
    }
    let mut queue = queue();
    note_dropped(&mut queue);
    CHANGED.notify_all();
    let _ = CHANGED
        .wait_timeout_while(queue, patience, |queue| {
            !queue.lines.is_empty() || queue.writing
        })
        .unwrap_or_else(PoisonError::into_inner);
}

/// One log event on its way to the queue; `tracing_subscriber` writes each
/// event into one of these.
pub struct Event(Vec<u8>);

/// The log's writer: `fmt().with_writer(stderr::event)`.
pub fn event() -> Event {
    Event(Vec::new())
}

impl Write for Event {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            write(std::mem::take(&mut self.0));
        }
    }
}
