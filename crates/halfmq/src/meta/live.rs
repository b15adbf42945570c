//! sled, reopened in place after an I/O error.
//!
//! sled 0.34 latches the first I/O error of its log (a full disk: ENOSPC; EIO) and fails
//! every later write and flush with it until the database is opened again. A broker would
//! then refuse every ack and checkpoint until a restart, even once space is back. The handles
//! here ([`LiveDb`], [`LiveTree`]) have the methods of `sled::Db` and `sled::Tree` that the
//! broker uses, and go through whichever database is open now:
//!
//! - an operation that fails with an I/O error marks the database broken;
//! - the next operation first reopens it: the old handles are dropped (sled releases its
//!   lock once the last one is gone, which is waited for), the directory is opened again
//!   (sled recovers its own log, as after a crash), and every write acknowledged by sled
//!   since the last successful flush is applied again, then flushed. Writes that failed were
//!   reported to their callers and are not applied. If the reopen fails (the disk is still
//!   full), the operation fails with that error and the next one tries again.
//!
//! So a write that sled accepted is never lost by a reopen, and a flush that succeeded
//! after it covers it: the meaning of every `Meta` method stays what it was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use sled::IVec;

/// How long an open waits for sled's lock held by handles of this process that are being
/// dropped (sled releases it lazily, from a background thread).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Unflushed writes kept for a reopen past this many bytes make the writer flush first, so
/// the replay list stays bounded.
const PENDING_BYTES_MAX: usize = 16 << 20;

/// Open sled in `dir`, waiting out a lock held by an earlier handle of this process.
pub(super) fn open_db(dir: &Path) -> sled::Result<sled::Db> {
    let started = Instant::now();
    loop {
        match sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
        {
            Ok(db) => return Ok(db),
            // sled reports its lock as an I/O error whose text says so.
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A write sled acknowledged, kept until a flush covers it.
#[derive(Clone)]
enum Write {
    Insert(IVec, IVec),
    Remove(IVec),
    Batch(sled::Batch),
    Clear,
}

/// One opened database and its trees.
struct Opened {
    db: sled::Db,
    trees: RwLock<HashMap<String, sled::Tree>>,
}

impl Opened {
    fn tree(&self, name: Option<&str>) -> sled::Result<sled::Tree> {
        let Some(name) = name else {
            return Ok((*self.db).clone());
        };
        if let Some(t) = self.trees.read().get(name) {
            return Ok(t.clone());
        }
        let t = self.db.open_tree(name)?;
        self.trees.write().insert(name.to_owned(), t.clone());
        Ok(t)
    }
}

struct Shared {
    dir: PathBuf,
    /// The database in use; `None` only while a reopen failed.
    current: RwLock<Option<Arc<Opened>>>,
    /// An operation failed with an I/O error: reopen before the next one.
    broken: AtomicBool,
    /// Held by the one thread that reopens.
    reopening: Mutex<()>,
    /// Writes since the last successful flush, numbered, with their trees (`None`: the
    /// default tree), and their bytes.
    pending: Mutex<Pending>,
    reopens: AtomicU64,
}

#[derive(Default)]
struct Pending {
    next: u64,
    bytes: usize,
    writes: Vec<(u64, Option<String>, Write)>,
}

fn is_io(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(_))
}

impl Shared {
    /// Reopen the database if it is broken (or a reopen failed before).
    fn ensure_open(&self) -> sled::Result<()> {
        if self.broken.load(Ordering::Acquire) || self.current.read().is_none() {
            self.reopen()?;
        }
        Ok(())
    }

    fn reopen(&self) -> sled::Result<()> {
        let _one = self.reopening.lock();
        if !self.broken.load(Ordering::Acquire) && self.current.read().is_some() {
            return Ok(()); // another thread reopened it meanwhile
        }
        // Operations run under the read side: taking the write side waits for those in
        // flight and holds back new ones, so no write lands on the old database unseen.
        let mut current = self.current.write();
        // Drop this handle of the broken database; sled's lock goes with the last one.
        drop(current.take());
        let db = open_db(&self.dir).inspect_err(|e| {
            tracing::warn!(dir = %self.dir.display(), error = %e, "metadata store still failing; will retry");
        })?;
        let opened = Arc::new(Opened {
            db,
            trees: RwLock::new(HashMap::new()),
        });
        // Everything sled acknowledged since the last good flush, again, in order; then
        // flushed, so nothing accepted before the error is lost.
        let (upto, writes) = {
            let p = self.pending.lock();
            (p.next, p.writes.clone())
        };
        for (_, tree, w) in &writes {
            let t = opened.tree(tree.as_deref())?;
            match w {
                Write::Insert(k, v) => {
                    t.insert(k, v.clone())?;
                }
                Write::Remove(k) => {
                    t.remove(k)?;
                }
                Write::Batch(b) => t.apply_batch(b.clone())?,
                Write::Clear => t.clear()?,
            }
        }
        opened.db.flush()?;
        self.drop_pending_below(upto);
        *current = Some(opened);
        self.broken.store(false, Ordering::Release);
        let n = self.reopens.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::warn!(
            dir = %self.dir.display(), reopens = n, replayed = writes.len(),
            "metadata store reopened after an I/O error; unflushed writes applied again"
        );
        Ok(())
    }

    fn drop_pending_below(&self, upto: u64) {
        let mut p = self.pending.lock();
        p.writes.retain(|(seq, _, _)| *seq >= upto);
        p.bytes = p.writes.iter().map(|(_, _, w)| write_bytes(w)).sum();
    }

    /// Run `f` on tree `name` of the current database (under the read side of `current`,
    /// see [`Shared::reopen`]) and remember the write it reports, if any; an I/O error marks
    /// the database broken.
    fn run<T>(
        &self,
        name: Option<&str>,
        f: impl FnOnce(&sled::Tree) -> sled::Result<(T, Option<Write>)>,
    ) -> sled::Result<T> {
        self.ensure_open()?;
        let (out, full) = {
            // Recursive: a caller may still hold a scan of the same database.
            let current = self.current.read_recursive();
            let Some(o) = current.as_ref() else {
                // A reopen failed between `ensure_open` and here.
                return Err(sled::Error::Io(std::io::Error::other(
                    "the metadata store is being reopened after an I/O error",
                )));
            };
            match o.tree(name).and_then(|t| f(&t)) {
                Ok((v, w)) => {
                    let full = w.is_some_and(|w| self.note(name, w));
                    (v, full)
                }
                Err(e) => {
                    if is_io(&e) {
                        self.broken.store(true, Ordering::Release);
                    }
                    return Err(e);
                }
            }
        };
        if full {
            self.flush()?;
        }
        Ok(out)
    }

    /// Remember an acknowledged write for a reopen; whether so many wait that the writer
    /// should flush.
    fn note(&self, name: Option<&str>, w: Write) -> bool {
        let mut p = self.pending.lock();
        let seq = p.next;
        p.next += 1;
        p.bytes += write_bytes(&w);
        p.writes.push((seq, name.map(str::to_owned), w));
        p.bytes > PENDING_BYTES_MAX
    }

    fn flush(&self) -> sled::Result<usize> {
        let upto = self.pending.lock().next;
        let n = self.run(None, |t| Ok((t.flush()?, None)))?;
        self.drop_pending_below(upto);
        Ok(n)
    }
}

fn write_bytes(w: &Write) -> usize {
    match w {
        Write::Insert(k, v) => k.len() + v.len() + 32,
        Write::Remove(k) => k.len() + 32,
        // A batch does not tell its size; count it as one small write.
        Write::Batch(_) => 256,
        Write::Clear => 32,
    }
}

/// The database, reopened in place after an I/O error (see the module docs).
pub(crate) struct LiveDb {
    shared: Arc<Shared>,
}

impl LiveDb {
    /// Take over a database sled has opened in `dir`.
    pub(crate) fn from_db(dir: &Path, db: sled::Db) -> LiveDb {
        LiveDb {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                current: RwLock::new(Some(Arc::new(Opened {
                    db,
                    trees: RwLock::new(HashMap::new()),
                }))),
                broken: AtomicBool::new(false),
                reopening: Mutex::new(()),
                pending: Mutex::new(Pending::default()),
                reopens: AtomicU64::new(0),
            }),
        }
    }

    /// Another handle of the same database (for the metadata fsync thread).
    pub(crate) fn handle(&self) -> LiveDb {
        LiveDb {
            shared: self.shared.clone(),
        }
    }

    /// A handle of tree `name`, valid across reopens.
    pub(crate) fn open_tree(&self, name: &str) -> sled::Result<LiveTree> {
        self.shared.run(Some(name), |_| Ok(((), None)))?;
        Ok(LiveTree {
            shared: self.shared.clone(),
            name: name.to_owned(),
        })
    }

    /// `sled::Db::flush`: everything sled accepted so far is on disk.
    pub(crate) fn flush(&self) -> sled::Result<usize> {
        self.shared.flush()
    }
}

/// A tree of a [`LiveDb`]: `sled::Tree`'s methods, on whichever database is open now.
#[derive(Clone)]
pub(crate) struct LiveTree {
    shared: Arc<Shared>,
    name: String,
}

impl LiveTree {
    fn read<T>(&self, f: impl FnOnce(&sled::Tree) -> sled::Result<T>) -> sled::Result<T> {
        self.shared.run(Some(&self.name), |t| Ok((f(t)?, None)))
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&sled::Tree) -> sled::Result<(T, Option<Write>)>,
    ) -> sled::Result<T> {
        self.shared.run(Some(&self.name), f)
    }

    pub(crate) fn get<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<IVec>> {
        self.read(|t| t.get(key))
    }

    pub(crate) fn contains_key<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<bool> {
        self.read(|t| t.contains_key(key))
    }

    pub(crate) fn insert<K: AsRef<[u8]>, V: Into<IVec>>(
        &self,
        key: K,
        value: V,
    ) -> sled::Result<Option<IVec>> {
        let (k, v) = (IVec::from(key.as_ref()), value.into());
        self.write(|t| Ok((t.insert(&k, v.clone())?, Some(Write::Insert(k, v)))))
    }

    pub(crate) fn remove<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<IVec>> {
        let k = IVec::from(key.as_ref());
        self.write(|t| Ok((t.remove(&k)?, Some(Write::Remove(k)))))
    }

    pub(crate) fn clear(&self) -> sled::Result<()> {
        self.write(|t| {
            t.clear()?;
            Ok(((), Some(Write::Clear)))
        })
    }

    pub(crate) fn apply_batch(&self, batch: sled::Batch) -> sled::Result<()> {
        self.write(|t| {
            t.apply_batch(batch.clone())?;
            Ok(((), Some(Write::Batch(batch))))
        })
    }

    pub(crate) fn compare_and_swap<K, OV, NV>(
        &self,
        key: K,
        old: Option<OV>,
        new: Option<NV>,
    ) -> sled::Result<std::result::Result<(), sled::CompareAndSwapError>>
    where
        K: AsRef<[u8]>,
        OV: AsRef<[u8]>,
        NV: Into<IVec>,
    {
        let k = IVec::from(key.as_ref());
        let new: Option<IVec> = new.map(Into::into);
        self.write(|t| {
            let r = t.compare_and_swap(&k, old, new.clone())?;
            let w = r.is_ok().then(|| match new {
                Some(v) => Write::Insert(k, v),
                None => Write::Remove(k),
            });
            Ok((r, w))
        })
    }

    pub(crate) fn iter(&self) -> LiveIter {
        LiveIter::of(self.read(|t| Ok(t.iter())))
    }

    pub(crate) fn scan_prefix<P: AsRef<[u8]>>(&self, prefix: P) -> LiveIter {
        LiveIter::of(self.read(|t| Ok(t.scan_prefix(prefix))))
    }

    pub(crate) fn range<K: AsRef<[u8]>, R: std::ops::RangeBounds<K>>(&self, range: R) -> LiveIter {
        LiveIter::of(self.read(|t| Ok(t.range(range))))
    }
}

/// `sled::Iter`, or the error that kept the scan from starting (yielded once).
pub(crate) enum LiveIter {
    Scan(Box<sled::Iter>),
    Failed(Option<sled::Error>),
}

impl LiveIter {
    fn of(r: sled::Result<sled::Iter>) -> LiveIter {
        match r {
            Ok(it) => LiveIter::Scan(Box::new(it)),
            Err(e) => LiveIter::Failed(Some(e)),
        }
    }
}

impl Iterator for LiveIter {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            LiveIter::Scan(it) => it.next(),
            LiveIter::Failed(e) => e.take().map(Err),
        }
    }
}
