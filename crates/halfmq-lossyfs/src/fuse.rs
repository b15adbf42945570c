//! The FUSE side: each kernel request becomes one call on the [`Tree`] under its lock.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::tree::{Ino, Kind, Tree};

/// How long the kernel may cache names and attributes. Only this file system changes them,
/// through the kernel, so the caches stay right; a remount starts with empty ones.
const TTL: Duration = Duration::from_secs(1);

/// The file system the kernel talks to; the tree is shared with the [`crate::Mounted`]
/// handle, which takes it back after the unmount.
pub(crate) struct LossyFuse {
    pub(crate) tree: Arc<Mutex<Option<Tree>>>,
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn attr_of(tree: &Tree, ino: Ino) -> Result<FileAttr, Errno> {
    let n = tree.node(ino).map_err(err)?;
    let (kind, size, nlink) = match n.kind {
        Kind::File => (FileType::RegularFile, n.size, n.nlink),
        Kind::Dir => (FileType::Directory, 0, 2),
    };
    Ok(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind,
        perm: n.perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    })
}

impl LossyFuse {
    /// Run `f` on the tree; `EIO` once the tree was taken back (after the unmount).
    fn with<T>(&self, f: impl FnOnce(&mut Tree) -> Result<T, i32>) -> Result<T, Errno> {
        let mut g = self.tree.lock();
        let t = g.as_mut().ok_or(Errno::EIO)?;
        f(t).map_err(err)
    }

    fn entry(&self, reply: ReplyEntry, f: impl FnOnce(&mut Tree) -> Result<Ino, i32>) {
        match self.with(|t| {
            let ino = f(t)?;
            attr_of(t, ino).map_err(|e| e.code())
        }) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    /// Run `f`, then answer with the attributes of `ino`.
    fn attr(&self, reply: ReplyAttr, ino: Ino, f: impl FnOnce(&mut Tree) -> Result<(), i32>) {
        match self.with(|t| {
            f(t)?;
            attr_of(t, ino).map_err(|e| e.code())
        }) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn empty(&self, reply: ReplyEmpty, f: impl FnOnce(&mut Tree) -> Result<(), i32>) {
        match self.with(f) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for LossyFuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |t| t.lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.attr(reply, ino.0, |_| Ok(()));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.attr(reply, ino.0, |t| {
            if let Some(len) = size {
                t.set_size(ino.0, len)?;
            }
            if let Some(m) = mode {
                t.set_perm(ino.0, (m & 0o7777) as u16)?;
            }
            Ok(())
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        self.entry(reply, |t| t.mkdir(parent.0, name, perm));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |t| t.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |t| t.rmdir(parent.0, name));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.empty(reply, |t| {
            t.rename(parent.0, name, newparent.0, newname, no_replace)
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, |t| {
            t.link(ino.0, newparent.0, newname).map(|()| ino.0)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.with(|t| {
            if t.node(ino.0)?.kind == Kind::File && flags.0 & libc::O_TRUNC != 0 {
                t.set_size(ino.0, 0)?;
            }
            t.opened(ino.0)
        });
        match r {
            // Direct I/O: every read and write comes here, none stays in the page cache.
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let r = self.with(|t| {
            let ino = match t.lookup(parent.0, name) {
                Ok(_) if flags & libc::O_EXCL != 0 => return Err(libc::EEXIST),
                Ok(ino) => {
                    if flags & libc::O_TRUNC != 0 {
                        t.set_size(ino, 0)?;
                    }
                    ino
                }
                Err(_) => t.create(parent.0, name, perm)?,
            };
            t.opened(ino)?;
            attr_of(t, ino).map_err(|e| e.code())
        });
        match r {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|t| t.read(ino.0, offset, size)) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|t| t.write(ino.0, offset, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // close() makes nothing durable
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |t| {
            t.released(ino.0);
            Ok(())
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |t| t.fsync(ino.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.with(|t| {
            let d = t.node(ino.0)?;
            if d.kind != Kind::Dir {
                return Err(libc::ENOTDIR);
            }
            let mut all = vec![
                (ino.0, FileType::Directory, OsStr::new(".").to_owned()),
                (d.parent, FileType::Directory, OsStr::new("..").to_owned()),
            ];
            for (name, child) in &d.live {
                let kind = match t.node(*child)?.kind {
                    Kind::File => FileType::RegularFile,
                    Kind::Dir => FileType::Directory,
                };
                all.push((*child, kind, name.clone()));
            }
            Ok(all)
        });
        match r {
            Ok(all) => {
                for (i, (child, kind, name)) in all.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*child), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    /// A directory is synced as a file is ([`Tree::fsync`] makes either kind durable).
    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync(req, ino, fh, datasync, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 28, 1 << 28, 1 << 28, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |t| t.allocate(ino.0, offset, length, mode));
    }
}
