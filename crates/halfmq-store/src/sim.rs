//! A simulated disk for tests (feature `sim`): it keeps a "live" image (what reads see) and a
//! "durable" image (what survives power loss) of every file, so a test can crash between any
//! two syncs and reopen from what was durable, and it can inject faults (a failing fsync, a
//! full disk, short writes, flipped bits).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use halfmq_types::error::{Error, Result};

use crate::io::{Storage, StorageFile};

/// How a [`SimStorage::crash`] treats writes that were not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost (the page cache is gone).
    DropUnsynced,
    /// A random prefix of the unsynced writes survives, and the last surviving write may be
    /// torn at a 512-byte sector boundary. Seeded, so a failure replays.
    KeepRandomPrefix {
        /// Seed for the choice.
        seed: u64,
    },
}

/// Faults a [`SimStorage`] injects into later operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail the next N `sync_data` calls with EIO (0: none).
    pub fail_syncs: u32,
    /// Every write and allocation fails with ENOSPC while set.
    pub disk_full: bool,
    /// Writes of more than one byte persist only their first half and then fail with EIO.
    pub short_writes: bool,
    /// Every `sync_data` takes this long (a slow disk) before it happens or fails.
    pub sync_delay_ms: u64,
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct SimFile {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Operations since the last sync, oldest first.
    unsynced: Vec<Op>,
    /// Created since the last sync of its directory: gone after a crash.
    created_unsynced: bool,
}

impl SimFile {
    /// An operation since the last sync: reads see it at once, the durable image only after
    /// the next sync (or, in part, after a crash that keeps a random prefix).
    fn record(&mut self, op: Op) {
        apply(&mut self.live, &op);
        self.unsynced.push(op);
    }
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(off, data) => {
            let end = *off as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*off as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => image.resize(*len as usize, 0),
    }
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<PathBuf, SimFile>,
    dirs: BTreeSet<PathBuf>,
    locks: BTreeSet<PathBuf>,
    crashed: bool,
    faults: Faults,
    syncs: u64,
    /// What [`Storage::zero_fill_ahead`] answers (see [`SimStorage::set_zero_fill_ahead`]).
    zero_fill_ahead: bool,
}

/// An in-memory disk with separate live and durable images; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

struct SimHandle {
    state: Arc<Mutex<SimState>>,
    path: PathBuf,
}

struct SimLock {
    state: Arc<Mutex<SimState>>,
    dir: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.state.lock().locks.remove(&self.dir);
    }
}

fn sim_err(path: &Path, op: &'static str, kind: io::ErrorKind, msg: &str) -> Error {
    Error::io(path, op, io::Error::new(kind, msg.to_string()))
}

fn crashed_err(path: &Path, op: &'static str) -> Error {
    sim_err(
        path,
        op,
        io::ErrorKind::Other,
        "simulated machine has crashed",
    )
}

fn enospc(path: &Path, op: &'static str) -> Error {
    Error::io(
        path,
        op,
        io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
    )
}

impl SimStorage {
    /// A new, empty simulated disk.
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// Set the faults injected from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().faults = faults;
    }

    /// Make the store treat this disk as one with extents, where zeros written ahead of
    /// the log pay (`crate::prepare`, `flush::zero_ahead`): off by default, as the
    /// simulated disk gains nothing from them; on, tests see where those zeros land.
    pub fn set_zero_fill_ahead(&self, on: bool) {
        self.state.lock().zero_fill_ahead = on;
    }

    /// How many successful `sync_data` calls this disk has seen.
    pub fn sync_count(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Power loss: this disk stops accepting any operation (so the old store instance can no
    /// longer change anything), and a new disk is returned holding what survived.
    pub fn crash(&self, mode: CrashMode) -> SimStorage {
        let mut st = self.state.lock();
        st.crashed = true;
        let mut rng = match mode {
            CrashMode::DropUnsynced => None,
            CrashMode::KeepRandomPrefix { seed } => Some(fastrand::Rng::with_seed(seed)),
        };
        let mut files = BTreeMap::new();
        for (path, f) in st.files.iter() {
            if f.created_unsynced {
                continue;
            }
            let mut image = f.durable.clone();
            if let Some(rng) = rng.as_mut() {
                let keep = rng.usize(0..=f.unsynced.len());
                for (i, op) in f.unsynced[..keep].iter().enumerate() {
                    match op {
                        Op::Write(off, data) if i + 1 == keep && data.len() > 512 && rng.bool() => {
                            // Tear the last surviving write at a sector boundary.
                            let sectors = data.len().div_ceil(512);
                            let cut = (rng.usize(0..sectors) * 512).min(data.len());
                            apply(&mut image, &Op::Write(*off, data[..cut].to_vec()));
                        }
                        _ => apply(&mut image, op),
                    }
                }
            }
            files.insert(
                path.clone(),
                SimFile {
                    live: image.clone(),
                    durable: image,
                    ..SimFile::default()
                },
            );
        }
        SimStorage {
            state: Arc::new(Mutex::new(SimState {
                files,
                dirs: st.dirs.clone(),
                ..SimState::default()
            })),
        }
    }

    /// The durable bytes of a file (for tests that inspect or damage files).
    pub fn durable_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        self.state.lock().files.get(path).map(|f| f.durable.clone())
    }

    /// Replace a file's contents, live and durable alike (for tests that damage data at rest).
    pub fn put_bytes(&self, path: &Path, bytes: Vec<u8>) {
        let mut st = self.state.lock();
        let f = st.files.entry(path.to_path_buf()).or_default();
        f.live = bytes.clone();
        f.durable = bytes;
        f.unsynced.clear();
        f.created_unsynced = false;
    }

    /// Paths of all files, in order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.state.lock().files.keys().cloned().collect()
    }

    /// The faults in force now (a failing sync counts down as it is used up).
    pub fn faults(&self) -> Faults {
        self.state.lock().faults
    }

    /// Damage data at rest: flip bit `bit` (0 = least significant) of the byte at `offset`
    /// of `path`, in the durable image and in what reads return alike, as a medium error
    /// would. Only bytes that are at rest can be flipped: the byte must lie inside the
    /// durable image and no unsynced write or length change of the file may be pending
    /// (such a write would later put its own bytes there). Returns whether a bit was
    /// flipped; `false` for a missing file, a byte that is not at rest, or `bit > 7`.
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) -> bool {
        if bit > 7 {
            return false;
        }
        let mut st = self.state.lock();
        let Some(f) = st.files.get_mut(path) else {
            return false;
        };
        let Ok(at) = usize::try_from(offset) else {
            return false;
        };
        let in_flight = f.unsynced.iter().any(|op| match op {
            Op::Write(off, data) => {
                let start = *off as usize;
                at >= start && at < start + data.len()
            }
            Op::SetLen(_) => true,
        });
        if in_flight || at >= f.durable.len() || at >= f.live.len() {
            return false;
        }
        let mask = 1u8 << bit;
        f.durable[at] ^= mask;
        f.live[at] ^= mask;
        true
    }
}

impl Storage for SimStorage {
    fn zero_fill_ahead(&self) -> bool {
        self.state.lock().zero_fill_ahead
    }

    fn create_dir_all(&self, dir: &Path) -> Result<()> {
        let mut st = self.state.lock();
        if st.crashed {
            return Err(crashed_err(dir, "create directory"));
        }
        let mut d = dir.to_path_buf();
        loop {
            st.dirs.insert(d.clone());
            if !d.pop() || d.as_os_str().is_empty() {
                break;
            }
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> Result<Vec<String>> {
        let st = self.state.lock();
        let mut names: BTreeSet<String> = BTreeSet::new();
        for p in st.files.keys().chain(st.dirs.iter()) {
            if p.parent() == Some(dir) {
                if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    names.insert(n.to_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    fn open(&self, path: &Path, create: bool) -> Result<Arc<dyn StorageFile>> {
        let mut st = self.state.lock();
        if st.crashed {
            return Err(crashed_err(path, "open"));
        }
        if !st.files.contains_key(path) {
            if !create {
                return Err(sim_err(
                    path,
                    "open",
                    io::ErrorKind::NotFound,
                    "no such file",
                ));
            }
            st.files.insert(
                path.to_path_buf(),
                SimFile {
                    created_unsynced: true,
                    ..SimFile::default()
                },
            );
        }
        Ok(Arc::new(SimHandle {
            state: self.state.clone(),
            path: path.to_path_buf(),
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        let st = self.state.lock();
        st.files.contains_key(path) || st.dirs.contains(path)
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        let mut st = self.state.lock();
        if st.crashed {
            return Err(crashed_err(path, "remove"));
        }
        st.files.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let mut st = self.state.lock();
        if st.crashed {
            return Err(crashed_err(dir, "sync directory"));
        }
        for (p, f) in st.files.iter_mut() {
            if p.parent() == Some(dir) {
                f.created_unsynced = false;
            }
        }
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        let mut st = self.state.lock();
        if !st.locks.insert(dir.to_path_buf()) {
            return Err(Error::Locked {
                path: dir.to_path_buf(),
                lock: dir.join("LOCK"),
            });
        }
        Ok(Box::new(SimLock {
            state: self.state.clone(),
            dir: dir.to_path_buf(),
        }))
    }
}

impl SimHandle {
    fn with<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut SimState, &Path) -> Result<T>,
    ) -> Result<T> {
        let mut st = self.state.lock();
        if st.crashed {
            return Err(crashed_err(&self.path, op));
        }
        if !st.files.contains_key(&self.path) {
            return Err(sim_err(
                &self.path,
                op,
                io::ErrorKind::NotFound,
                "file was removed",
            ));
        }
        f(&mut st, &self.path)
    }
}

fn file<'a>(st: &'a mut SimState, path: &Path) -> &'a mut SimFile {
    // `SimHandle::with` checked that the file exists while holding the same lock.
    st.files
        .get_mut(path)
        .expect("file presence checked under the lock")
}

impl StorageFile for SimHandle {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> Result<u64> {
        self.with("stat", |st, p| Ok(file(st, p).live.len() as u64))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.with("read", |st, p| {
            let f = file(st, p);
            let start = (offset as usize).min(f.live.len());
            let n = buf.len().min(f.live.len() - start);
            buf[..n].copy_from_slice(&f.live[start..start + n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.with("write", |st, p| {
            let faults = st.faults;
            if faults.disk_full {
                let f = file(st, p);
                if offset as usize + buf.len() > f.live.len() {
                    return Err(enospc(p, "write"));
                }
            }
            let f = file(st, p);
            if faults.short_writes && buf.len() > 1 {
                f.record(Op::Write(offset, buf[..buf.len() / 2].to_vec()));
                return Err(sim_err(
                    p,
                    "write",
                    io::ErrorKind::Other,
                    "simulated short write",
                ));
            }
            f.record(Op::Write(offset, buf.to_vec()));
            Ok(())
        })
    }

    fn allocate(&self, len: u64) -> Result<()> {
        self.with("allocate", |st, p| {
            if st.faults.disk_full {
                return Err(enospc(p, "allocate"));
            }
            let f = file(st, p);
            if (f.live.len() as u64) < len {
                f.record(Op::SetLen(len));
            }
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.with("set length", |st, p| {
            file(st, p).record(Op::SetLen(len));
            Ok(())
        })
    }

    fn sync_data(&self) -> Result<()> {
        let delay = self.state.lock().faults.sync_delay_ms;
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        self.with("sync", |st, p| {
            if st.faults.fail_syncs > 0 {
                st.faults.fail_syncs -= 1;
                // Like Linux after a failed writeback: the dirty pages are dropped, so the
                // unsynced writes are gone from the durable image for good.
                let f = file(st, p);
                f.unsynced.clear();
                return Err(sim_err(
                    p,
                    "sync",
                    io::ErrorKind::Other,
                    "simulated EIO on fsync",
                ));
            }
            st.syncs += 1;
            let f = file(st, p);
            for op in std::mem::take(&mut f.unsynced) {
                apply(&mut f.durable, &op);
            }
            Ok(())
        })
    }
}

/// A store in `/s` on `disk`, for the engine's own unit tests.
#[cfg(test)]
pub(crate) fn open_store(disk: &SimStorage, config: crate::StoreConfig) -> crate::Store {
    crate::Store::open(Arc::new(disk.clone()), Path::new("/s"), config, &mut |_| {})
        .unwrap()
        .0
}

/// A runtime for async writers in tests: two workers, like the machines this runs on.
#[cfg(test)]
pub(crate) fn test_runtime() -> tokio::runtime::Runtime {
    // Building a runtime fails only when the OS refuses threads: no test can go on then.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a test runtime")
}

/// A store on `disk` under async flush, syncing every `interval`.
#[cfg(test)]
pub(crate) fn open_async_flush(disk: &SimStorage, interval: std::time::Duration) -> crate::Store {
    open_store(
        disk,
        crate::StoreConfig::default().with_flush(crate::FlushPolicy::Async { interval }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk with the file `/d/a` holding `bytes`, synced, and its directory synced.
    fn disk_with_file(bytes: &[u8]) -> (SimStorage, PathBuf, Arc<dyn StorageFile>) {
        let disk = SimStorage::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let path = dir.join("a");
        let f = disk.open(&path, true).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(dir).unwrap();
        (disk, path, f)
    }

    #[test]
    fn crash_drops_unsynced_writes_and_unsynced_files() {
        let (disk, _, f) = disk_with_file(b"hello");
        let dir = Path::new("/d");
        f.write_all_at(b"world", 5).unwrap();
        let g = disk.open(&dir.join("b"), true).unwrap();
        g.write_all_at(b"x", 0).unwrap();
        g.sync_data().unwrap();
        let after = disk.crash(CrashMode::DropUnsynced);
        assert!(
            f.write_all_at(b"!", 0).is_err(),
            "old handles are dead after a crash"
        );
        assert_eq!(after.durable_bytes(&dir.join("a")).unwrap(), b"hello");
        assert!(
            !after.exists(&dir.join("b")),
            "file whose directory was never synced is gone"
        );
    }

    #[test]
    fn flip_bit_damages_data_at_rest_in_reads_and_after_a_crash() {
        let (disk, path, f) = disk_with_file(&[0u8; 8]);

        assert!(disk.flip_bit(&path, 3, 0));
        assert!(disk.flip_bit(&path, 5, 7));
        let mut buf = [0u8; 8];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 8);
        assert_eq!(buf, [0, 0, 0, 1, 0, 0x80, 0, 0], "reads see the damage");
        assert_eq!(
            disk.durable_bytes(&path).unwrap(),
            vec![0, 0, 0, 1, 0, 0x80, 0, 0],
            "the durable image holds it"
        );
        // Flipping the same bit again restores the byte.
        assert!(disk.flip_bit(&path, 5, 7));
        let after = disk.crash(CrashMode::DropUnsynced);
        assert_eq!(
            after.durable_bytes(&path).unwrap(),
            vec![0, 0, 0, 1, 0, 0, 0, 0],
            "the damage survives power loss"
        );
        let g = after.open(&path, false).unwrap();
        assert_eq!(g.read_at(&mut buf, 0).unwrap(), 8);
        assert_eq!(buf, [0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn flip_bit_refuses_what_is_not_at_rest() {
        let (disk, path, f) = disk_with_file(b"abcd");
        let dir = Path::new("/d");
        assert!(!disk.flip_bit(&dir.join("missing"), 0, 0), "no such file");
        assert!(!disk.flip_bit(&path, 4, 0), "past the durable image");
        assert!(!disk.flip_bit(&path, 0, 8), "no ninth bit");
        // An unsynced write over byte 1 would put its own bytes there.
        f.write_all_at(b"X", 1).unwrap();
        assert!(!disk.flip_bit(&path, 1, 0));
        // Byte 3 is outside that write: still at rest.
        assert!(disk.flip_bit(&path, 3, 1));
        f.sync_data().unwrap();
        assert_eq!(disk.durable_bytes(&path).unwrap(), b"aXcf".to_vec());
        f.set_len(2).unwrap();
        assert!(!disk.flip_bit(&path, 0, 0), "a pending length change");
        let mut buf = [0u8; 4];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), 2);
        assert_eq!(&buf[..2], b"aX");
    }

    #[test]
    fn failed_sync_loses_the_dirty_data() {
        let disk = SimStorage::new();
        let f = disk.open(Path::new("/f"), true).unwrap();
        disk.sync_dir(Path::new("/")).unwrap();
        f.write_all_at(b"abc", 0).unwrap();
        disk.set_faults(Faults {
            fail_syncs: 1,
            ..Faults::default()
        });
        assert!(f.sync_data().is_err());
        f.sync_data().unwrap();
        let after = disk.crash(CrashMode::DropUnsynced);
        assert_eq!(after.durable_bytes(Path::new("/f")).unwrap(), b"");
    }
}
