//! # halfmq-lossyfs
//!
//! A FUSE file system for tests that loses, on a simulated power cut, everything that was not
//! made durable, in the spirit of LazyFS (used by Jepsen).
//!
//! A [`LossyDisk`] is a directory on a real file system. Its `durable/` subdirectory always
//! holds exactly what would survive a power cut right now. [`LossyDisk::mount`] mounts a
//! view of it in-process (FUSE, on a background thread of the calling process) where:
//!
//! - **file data** written since the last `fsync`/`fdatasync` of that file, and length
//!   changes (`set_len`, `fallocate`, truncation), are kept in memory; the fsync writes them
//!   to the file's durable copy (both calls make data *and* length durable, as `fdatasync`
//!   must for a length that the data needs);
//! - **directory entries** created, renamed or removed since the directory's last `fsync`
//!   are kept in memory too; the directory's fsync writes them out. A new file whose entry
//!   was never synced disappears at a power cut, whatever was fsynced of its data, and a
//!   rename is durable only once the directories involved are synced;
//! - reads see everything written, as a page cache would; no I/O on the mount goes through
//!   the kernel's page cache (direct I/O), so `sync_file_range` and `close` make nothing
//!   durable;
//! - file locks (`flock`, `fcntl`) are the kernel's own, local to the mount.
//!
//! [`Mounted::power_cut`] unmounts and drops all of that pending state; with
//! [`Tear::LastWrite`] the most recent write, if it was still pending, reaches the disk up to
//! a sector boundary (512 bytes) inside it, as a write torn by the power cut. Mount again to
//! see the surviving state. [`Mounted::unmount_clean`] writes everything back first, as the
//! operating system does on a clean shutdown.
//!
//! The test process must be allowed to mount FUSE file systems (`/dev/fuse` and root, or the
//! `fusermount3` helper); [`LossyDisk::mount`] says so in its error otherwise.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod extents;
mod fuse;
mod tree;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

/// The unit a write is torn at: a disk sector.
pub const SECTOR: u64 = 512;

/// What a power cut does to the most recent write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tear {
    /// It is lost with the rest of the pending state.
    None,
    /// If still pending, its first part reaches the disk up to a sector boundary inside it,
    /// chosen from `seed`; a write within one sector is lost whole.
    LastWrite {
        /// Chooses the boundary.
        seed: u64,
    },
}

/// A write torn by a power cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Torn {
    /// A durable path of the file (relative to the durable directory), if it has one.
    pub path: Option<PathBuf>,
    /// Where the write started.
    pub offset: u64,
    /// Bytes of it that reached the disk.
    pub kept: u64,
    /// Bytes of it that were lost.
    pub dropped: u64,
}

/// What a power cut dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// Files with data or a length change that was not durable.
    pub files_with_pending_data: u64,
    /// Bytes written and not durable.
    pub pending_bytes_dropped: u64,
    /// Directories whose entries were not durable.
    pub directories_with_pending_entries: u64,
    /// The names (relative to the mount) that were lost: created, replaced or renamed and
    /// not made durable by a directory fsync. Under a lost directory only the directory is
    /// listed.
    pub dropped_entries: Vec<PathBuf>,
    /// The torn write, with [`Tear::LastWrite`].
    pub torn: Option<Torn>,
}

/// A directory that holds the durable state of a lossy file system (in `durable/`) and the
/// files behind it (in `inodes/`).
#[derive(Debug, Clone)]
pub struct LossyDisk {
    root: PathBuf,
}

impl LossyDisk {
    /// A disk kept in `root` (created if missing); what `root/durable` holds is its durable
    /// state.
    pub fn new(root: &Path) -> io::Result<LossyDisk> {
        std::fs::create_dir_all(root.join("durable"))?;
        Ok(LossyDisk {
            root: root.to_path_buf(),
        })
    }

    /// The directory that holds exactly the durable state (while nothing is mounted, a test
    /// may read and change it, e.g. to damage a file).
    pub fn durable_dir(&self) -> PathBuf {
        self.root.join("durable")
    }

    /// Mount the disk's durable state at `mountpoint` (an empty directory), served by a
    /// background thread of this process until [`Mounted::power_cut`],
    /// [`Mounted::unmount_clean`] or the handle's drop (which unmounts, dropping the pending
    /// state).
    pub fn mount(&self, mountpoint: &Path) -> io::Result<Mounted> {
        let tree = tree::Tree::load(&self.durable_dir(), &self.root.join("inodes"))?;
        let tree = Arc::new(Mutex::new(Some(tree)));
        let fs = fuse::LossyFuse { tree: tree.clone() };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("halfmq-lossyfs".into()),
            fuser::MountOption::NoAtime,
        ];
        let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot mount the lossy file system (FUSE) at {}: {e}. It needs /dev/fuse \
                     and either root (CAP_SYS_ADMIN) or the fusermount3 helper \
                     (`apt-get install fuse3`)",
                    mountpoint.display()
                ),
            )
        })?;
        Ok(Mounted {
            session: Some(session),
            tree,
            mountpoint: mountpoint.to_path_buf(),
        })
    }
}

/// Whether something (a live or a dead mount) is mounted at `path`.
fn still_mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(parent) = path.parent() else {
        return false;
    };
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.dev() != p.dev(),
        // A dead FUSE mount answers ENOTCONN.
        (Err(e), _) => e.raw_os_error() == Some(libc::ENOTCONN),
        _ => false,
    }
}

/// A mounted lossy file system.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    tree: Arc<Mutex<Option<tree::Tree>>>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

/// Pending state right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Files with data or a length change not yet durable.
    pub files: u64,
    /// Bytes written and not yet durable.
    pub bytes: u64,
    /// Directories with entries not yet durable.
    pub directories: u64,
}

impl Mounted {
    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// What a power cut now would drop.
    pub fn pending(&self) -> Pending {
        let g = self.tree.lock();
        let (files, bytes, directories) = g.as_ref().map_or((0, 0, 0), |t| t.pending());
        Pending {
            files,
            bytes,
            directories,
        }
    }

    /// Unmount (every process using the mount must have stopped) and take the tree back.
    fn unmount(&mut self) -> io::Result<tree::Tree> {
        if let Some(s) = self.session.take() {
            let ended = s.umount_and_join();
            // A connection the kernel aborted (it answers ECONNABORTED then) leaves a dead
            // mount behind that fuser does not unmount: detach it.
            if still_mounted(&self.mountpoint) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
            match ended {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "cannot unmount the lossy file system at {}: {e}",
                            self.mountpoint.display()
                        ),
                    ))
                }
            }
            if still_mounted(&self.mountpoint) {
                return Err(io::Error::other(format!(
                    "the lossy file system at {} is still mounted",
                    self.mountpoint.display()
                )));
            }
        }
        self.tree
            .lock()
            .take()
            .ok_or_else(|| io::Error::other("the lossy file system was unmounted before"))
    }

    /// Power loss: unmount and drop everything that was not made durable (see [`Tear`]).
    /// Every process using the mount must have stopped (e.g. been killed) before.
    pub fn power_cut(mut self, tear: Tear) -> io::Result<CutReport> {
        let tree = self.unmount()?;
        Ok(tree.power_cut(tear))
    }

    /// A clean shutdown: everything written becomes durable, then unmount.
    pub fn unmount_clean(mut self) -> io::Result<()> {
        let mut tree = self.unmount()?;
        tree.sync_all()
            .map_err(|e| io::Error::other(format!("writing back: errno {e}")))
    }
}
