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
//! sled's directory entries (its files, `meta/` itself) are made durable once at open and
//! before every checkpoint (`Meta::sync_files`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use halfmq_types::error::{Error, Result};

/// The outcome handed to the waiters of one fsync (the error as text: every waiter gets it).
type Synced = std::result::Result<(), String>;

enum Waiter {
    Blocking(mpsc::Sender<Synced>),
    Async(tokio::sync::oneshot::Sender<Synced>),
}

/// The fsync thread of one database; it ends when the database is dropped.
pub(super) struct DbSync {
    tx: mpsc::Sender<Waiter>,
}

impl DbSync {
    pub(super) fn start(dir: &Path) -> Result<DbSync> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let file = dir.join("db");
        std::thread::Builder::new()
            .name("halfmq-meta-sync".into())
            .spawn(move || run(&file, rx))
            .map_err(|e| Error::io(dir, "start the metadata fsync thread", e))?;
        Ok(DbSync { tx })
    }

    /// Wait for an fsync that starts after this call.
    pub(super) fn sync(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Waiter::Blocking(tx)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?.map_err(Error::Meta)
    }

    /// [`DbSync::sync`] without blocking the executor's thread.
    pub(super) async fn sync_async(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Waiter::Async(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(Error::Meta)
    }
}

fn gone() -> Error {
    Error::Meta("the metadata fsync thread has stopped".into())
}

fn run(file: &PathBuf, rx: mpsc::Receiver<Waiter>) {
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        waiters.extend(rx.try_iter());
        let synced = File::open(file)
            .and_then(|f| f.sync_data())
            .map_err(|e| format!("fsync of {}: {e}", file.display()));
        for w in waiters {
            // A waiter that went away (a dropped future) needs no answer.
            match w {
                Waiter::Blocking(tx) => drop(tx.send(synced.clone())),
                Waiter::Async(tx) => drop(tx.send(synced.clone())),
            }
        }
    }
}
