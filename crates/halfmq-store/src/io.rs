//! The file layer the store writes through.
//!
//! [`FsStorage`] is the real one. The simulated disk for tests, `SimStorage`, is in
//! `crate::sim` (feature `sim`), which builds on this module and not the other way round.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use halfmq_types::error::{Error, Result};

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
    /// Whether writing zeros into a segment ahead of the log makes later writes into it
    /// cheaper (real file systems with extents: see `crate::prepare`, which zero-fills the
    /// next segment, and `flush::zero_ahead`, which writes zeros ahead in the active one).
    /// Default: no.
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
    /// Advise that the cached pages of `len` bytes from `offset` will not be needed soon
    /// (`posix_fadvise(DONTNEED)`): the operating system drops the clean ones from its page
    /// cache (dirty ones are written back and stay). Only advice: what reads return and what
    /// is durable are the same either way. Default: there is no cache to drop.
    fn drop_cache(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }

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

    fn drop_cache(&self, offset: u64, len: u64) -> Result<()> {
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::DontNeed)
            .map_err(|e| Error::io(&self.path, "drop from the page cache", e.into()))
    }
}
