//! The file layer the store writes through.
//!
//! [`FsStorage`] is the real one. [`SimStorage`] is a simulated disk for tests: it keeps a
//! "live" image (what reads see) and a "durable" image (what survives power loss) of every
//! file, so a test can crash between any two syncs and reopen from what was durable, and it
//! can inject faults (a failing fsync, a full disk, short writes, flipped bits).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// A directory tree of files the store can use.
pub trait Storage: Send + Sync + 'static {
    /// Create a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> Result<()>;
    /// Names of the entries of a directory (empty if it does not exist).
    fn list_dir(&self, dir: &Path) -> Result<Vec<String>>;
    /// Open a file for reading and writing, creating it (empty) if `create`.
    fn open(&self, path: &Path, create: bool) -> Result<Arc<dyn StorageFile>>;
    /// Whether a file exists.
    fn exists(&self, path: &Path) -> bool;
    /// Delete a file.
    fn remove_file(&self, path: &Path) -> Result<()>;
    /// Make the directory's entries (created, removed files) durable.
    fn sync_dir(&self, dir: &Path) -> Result<()>;
    /// Take an exclusive lock on a data directory, held until the guard is dropped.
    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>>;
    /// Whether writing zeros over the next segment ahead of time makes later writes into it
    /// cheaper (real file systems with extents: see `store::prepare`). Default: no.
    fn zero_fill_ahead(&self) -> bool {
        false
    }
}

/// One open file.
pub trait StorageFile: Send + Sync {
    /// The file's path, for error messages.
    fn path(&self) -> &Path;
    /// Current length in bytes.
    fn len(&self) -> Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Read as many bytes as are there, up to `buf.len()`, starting at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
    /// Write all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make the file at least `len` bytes long, with the space reserved on disk where the
    /// file system allows it (so later writes cannot fail for lack of space).
    fn allocate(&self, len: u64) -> Result<()>;
    /// Truncate or extend to exactly `len` bytes.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Make written data durable (`fdatasync`).
    fn sync_data(&self) -> Result<()>;

    /// Fill `buf` completely from `offset`, or fail naming the file.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(Error::Corrupt {
                path: self.path().to_path_buf(),
                offset: offset + n as u64,
                reason: format!("file ends {} bytes early", buf.len() - n),
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Real files
// ---------------------------------------------------------------------------------------------

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

struct FsFile {
    path: PathBuf,
    file: File,
}

impl Storage for FsStorage {
    fn zero_fill_ahead(&self) -> bool {
        true
    }

    fn create_dir_all(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))
    }

    fn list_dir(&self, dir: &Path) -> Result<Vec<String>> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(dir, "list directory", e)),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(dir, "list directory", e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        Ok(Arc::new(FsFile {
            path: path.to_path_buf(),
            file,
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path).map_err(|e| Error::io(path, "remove", e))
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let d = File::open(dir).map_err(|e| Error::io(dir, "open directory", e))?;
        d.sync_all()
            .map_err(|e| Error::io(dir, "sync directory", e))
    }

    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        let lock = dir.join("LOCK");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(|e| Error::io(&lock, "open lock file", e))?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
                path: dir.to_path_buf(),
                lock,
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&lock, "lock", e)),
        }
    }
}

impl StorageFile for FsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?
            .len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, "read", e)),
            }
        }
        Ok(done)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "write", e))
    }

    fn allocate(&self, len: u64) -> Result<()> {
        if self.len()? >= len {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // File systems without fallocate get a sparse file instead.
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                self.set_len(len)
            }
            Err(e) => Err(Error::io(&self.path, "allocate", e.into())),
        }
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(&self.path, "set length", e))
    }

    fn sync_data(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "sync", e))
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated disk
// ---------------------------------------------------------------------------------------------

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
                let half = buf[..buf.len() / 2].to_vec();
                let op = Op::Write(offset, half);
                apply(&mut f.live, &op);
                f.unsynced.push(op);
                return Err(sim_err(
                    p,
                    "write",
                    io::ErrorKind::Other,
                    "simulated short write",
                ));
            }
            let op = Op::Write(offset, buf.to_vec());
            apply(&mut f.live, &op);
            f.unsynced.push(op);
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
                let op = Op::SetLen(len);
                apply(&mut f.live, &op);
                f.unsynced.push(op);
            }
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.with("set length", |st, p| {
            let f = file(st, p);
            let op = Op::SetLen(len);
            apply(&mut f.live, &op);
            f.unsynced.push(op);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_drops_unsynced_writes_and_unsynced_files() {
        let disk = SimStorage::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let f = disk.open(&dir.join("a"), true).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(dir).unwrap();
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
        let disk = SimStorage::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let path = dir.join("a");
        let f = disk.open(&path, true).unwrap();
        f.write_all_at(&[0u8; 8], 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(dir).unwrap();

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
        let disk = SimStorage::new();
        let dir = Path::new("/d");
        disk.create_dir_all(dir).unwrap();
        let path = dir.join("a");
        let f = disk.open(&path, true).unwrap();
        f.write_all_at(b"abcd", 0).unwrap();
        f.sync_data().unwrap();
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
