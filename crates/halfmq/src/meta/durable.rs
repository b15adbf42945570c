//! What makes a flush of sled survive a power loss.
//!
//! sled 0.34's `flush` is `sync_file_range`: the written pages go to the device, but neither
//! the device's cache nor the file's size is made durable, and sled's real fsync runs every
//! 500 ms on a background thread. So an ack that returned after `flush` alone could be taken
//! back by a power cut (the lossy-file-system tests showed exactly that). After its flush,
//! every caller of [`Meta::flush`](super::Meta::flush) waits for an `fdatasync` of sled's
//! `db` file that started after its flush ended. One thread does those fsyncs and serves
//! every caller waiting at the time with one of them (group commit, as the log does).
//!
//! Async callers ([`Meta::flush_async`](super::Meta::flush_async)) have that thread run
//! sled's flush for them too, before the fsync (one flush for every async caller waiting at
//! the time). They never await sled's own `flush_async`: in sled 0.34 concurrent
//! `flush_async` calls can wait on each other for good (spacejam/sled#1308; the consumers'
//! bench froze with 8 embedded consumers acking with `ack_many_async`).
//!
//! sled's directory entries (its files, `meta/` itself) are made durable once at open and
//! before every checkpoint (`Meta::sync_files`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use halfmq_types::error::{Error, Result};

/// The outcome handed to the waiters of one fsync (the error as text: every waiter gets it).
type Synced = std::result::Result<(), String>;

enum Waiter {
    /// Flushed sled itself; waits for the fsync.
    Blocking(mpsc::Sender<Synced>),
    /// Wants sled's flush and the fsync.
    Async(tokio::sync::oneshot::Sender<Synced>),
}

/// sled's blocking flush, run by the fsync thread for async callers.
pub(super) type Flush = Box<dyn Fn() -> Synced + Send>;

/// The fsync thread of one database; it ends (and is joined) when the database is dropped,
/// so that sled's files are closed by then.
pub(super) struct DbSync {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DbSync {
    pub(super) fn start(dir: &Path, flush: Flush) -> Result<DbSync> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let file = dir.join("db");
        let thread = std::thread::Builder::new()
            .name("halfmq-meta-sync".into())
            .spawn(move || run(&file, &flush, rx))
            .map_err(|e| Error::io(dir, "start the metadata fsync thread", e))?;
        Ok(DbSync {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, w: Waiter) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(w)
            .map_err(|_| gone())
    }

    /// Wait for an fsync that starts after this call.
    pub(super) fn sync(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Waiter::Blocking(tx))?;
        rx.recv().map_err(|_| gone())?.map_err(Error::Meta)
    }

    /// sled's flush and then an fsync, both on the fsync thread: the executor's thread is
    /// never blocked, and sled's `flush_async` is never awaited (see the module docs).
    pub(super) async fn flush_and_sync_async(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Waiter::Async(tx))?;
        rx.await.map_err(|_| gone())?.map_err(Error::Meta)
    }
}

impl Drop for DbSync {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            // The thread ends once the channel is closed and its last round is answered; a
            // panic there was already reported by the panic hook.
            let _ = t.join();
        }
    }
}

fn gone() -> Error {
    Error::Meta("the metadata fsync thread has stopped".into())
}

fn run(file: &PathBuf, flush: &Flush, rx: mpsc::Receiver<Waiter>) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        // The flush starts after every async waiter of this round queued, so it carries
        // what each of them wrote; blocking waiters flushed before they queued.
        let flushed = if waiters.iter().any(|w| matches!(w, Waiter::Async(_))) {
            flush()
        } else {
            Ok(())
        };
        let synced = flushed.and_then(|()| {
            File::open(file)
                .and_then(|f| f.sync_data())
                .map_err(|e| format!("fsync of {}: {e}", file.display()))
        });
        for w in waiters {
            // A waiter that went away (a dropped future) needs no answer.
            match w {
                Waiter::Blocking(tx) => drop(tx.send(synced.clone())),
                Waiter::Async(tx) => drop(tx.send(synced.clone())),
            }
        }
    }
}
