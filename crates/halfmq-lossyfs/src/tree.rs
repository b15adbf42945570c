//! The model behind the mount: two namespaces (live and durable) and, per file, its durable
//! bytes (a file on the backing disk) and its pending writes (in memory).
//!
//! Every file inode has one *staging* file, `inodes/<ino>`, that holds its content as of its
//! last fsync. The durable tree, `durable/`, is made of hard links to those staging files,
//! so that a fsync of the file updates its durable content under every name it durably has,
//! and a directory fsync only has to add or remove links. Directories cannot be hard-linked:
//! each has the path it durably has (if any), and its durable entries are kept in memory too,
//! so that a directory made durable later can be written out whole.
//!
//! Errors are errno values (`libc` constants), which the FUSE layer passes on.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::extents::Extents;
use crate::{CutReport, Tear, Torn, SECTOR};

/// An inode number, as the kernel sees it.
pub(crate) type Ino = u64;

/// The root directory's inode number (FUSE's).
pub(crate) const ROOT: Ino = 1;

/// An errno value.
pub(crate) type Errno = i32;

type R<T> = Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
}

/// One file or directory.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) perm: u16,
    pub(crate) mtime: SystemTime,
    /// Files: the live length.
    pub(crate) size: u64,
    /// Files: the length of the staging file (the durable content).
    durable_len: u64,
    /// Files: durable bytes at or beyond this offset were truncated away since the last
    /// fsync and read as zeros (unless written again).
    hidden_from: u64,
    /// Files: writes since the last fsync.
    dirty: Extents,
    /// Files: live names. Directories: 1 while linked.
    pub(crate) nlink: u32,
    /// Files: open handles.
    opens: u32,
    /// Directories: the live entries.
    pub(crate) live: BTreeMap<OsString, Ino>,
    /// Directories: the entries as of the last fsync of the directory.
    durable: BTreeMap<OsString, Ino>,
    /// Directories: the live parent (for `..`).
    pub(crate) parent: Ino,
    /// Directories: where the directory durably is, relative to the durable root, and the
    /// durable entry (parent, name) that puts it there. The root is at "".
    durable_at: Option<(PathBuf, Option<(Ino, OsString)>)>,
}

impl Node {
    fn new(kind: Kind, perm: u16, parent: Ino) -> Node {
        Node {
            kind,
            perm,
            mtime: SystemTime::now(),
            size: 0,
            durable_len: 0,
            hidden_from: 0,
            dirty: Extents::default(),
            nlink: 1,
            opens: 0,
            live: BTreeMap::new(),
            durable: BTreeMap::new(),
            parent,
            durable_at: None,
        }
    }
}

/// The whole state of one mount.
pub(crate) struct Tree {
    durable_root: PathBuf,
    inodes_dir: PathBuf,
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    /// Open staging files, by inode.
    files: HashMap<Ino, File>,
    /// The most recent write: (inode, offset, length), while it is still pending.
    last_write: Option<(Ino, u64, u64)>,
}

impl Tree {
    /// The tree as the durable directory holds it: what survives a power cut.
    pub(crate) fn load(durable_root: &Path, inodes_dir: &Path) -> io::Result<Tree> {
        fs::create_dir_all(durable_root)?;
        if inodes_dir.exists() {
            fs::remove_dir_all(inodes_dir)?;
        }
        fs::create_dir_all(inodes_dir)?;
        let mut root = Node::new(Kind::Dir, 0o755, ROOT);
        root.durable_at = Some((PathBuf::new(), None));
        let mut tree = Tree {
            durable_root: durable_root.to_path_buf(),
            inodes_dir: inodes_dir.to_path_buf(),
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            files: HashMap::new(),
            last_write: None,
        };
        let mut seen: HashMap<(u64, u64), Ino> = HashMap::new();
        tree.load_dir(ROOT, PathBuf::new(), &mut seen)?;
        Ok(tree)
    }

    fn load_dir(
        &mut self,
        dir: Ino,
        rel: PathBuf,
        seen: &mut HashMap<(u64, u64), Ino>,
    ) -> io::Result<()> {
        for entry in fs::read_dir(self.durable_root.join(&rel))? {
            let entry = entry?;
            let name = entry.file_name();
            let meta = fs::symlink_metadata(entry.path())?;
            let child_rel = rel.join(&name);
            let ino = if meta.is_dir() {
                let ino = self.alloc();
                let mut n = Node::new(Kind::Dir, (meta.mode() & 0o7777) as u16, dir);
                n.durable_at = Some((child_rel.clone(), Some((dir, name.clone()))));
                self.nodes.insert(ino, n);
                self.load_dir(ino, child_rel, seen)?;
                ino
            } else if meta.is_file() {
                if let Some(&ino) = seen.get(&(meta.dev(), meta.ino())) {
                    if let Some(n) = self.nodes.get_mut(&ino) {
                        n.nlink += 1;
                    }
                    ino
                } else {
                    let ino = self.alloc();
                    fs::hard_link(entry.path(), self.staging(ino))?;
                    let mut n = Node::new(Kind::File, (meta.mode() & 0o7777) as u16, dir);
                    n.size = meta.len();
                    n.durable_len = meta.len();
                    n.hidden_from = meta.len();
                    self.nodes.insert(ino, n);
                    seen.insert((meta.dev(), meta.ino()), ino);
                    ino
                }
            } else {
                continue; // symlinks and the like: nothing here makes them
            };
            let d = self.node_mut(dir).map_err(io::Error::from_raw_os_error)?;
            d.live.insert(name.clone(), ino);
            d.durable.insert(name, ino);
        }
        Ok(())
    }

    fn alloc(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    fn staging(&self, ino: Ino) -> PathBuf {
        self.inodes_dir.join(ino.to_string())
    }

    pub(crate) fn node(&self, ino: Ino) -> R<&Node> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: Ino) -> R<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: Ino) -> R<&Node> {
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        Ok(n)
    }

    fn file_mut(&mut self, ino: Ino) -> R<&mut Node> {
        let n = self.node_mut(ino)?;
        if n.kind != Kind::File {
            return Err(libc::EISDIR);
        }
        Ok(n)
    }

    fn staging_file(&mut self, ino: Ino) -> R<&File> {
        if !self.files.contains_key(&ino) {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.staging(ino))
                .map_err(errno)?;
            self.files.insert(ino, f);
        }
        self.files.get(&ino).ok_or(libc::EIO)
    }

    // ----- names -----

    pub(crate) fn lookup(&self, parent: Ino, name: &OsStr) -> R<Ino> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    fn new_entry(&mut self, parent: Ino, name: &OsStr, node: Node) -> R<Ino> {
        if self.dir(parent)?.live.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.alloc();
        if node.kind == Kind::File {
            File::create(self.staging(ino)).map_err(errno)?;
        }
        self.nodes.insert(ino, node);
        let p = self.node_mut(parent)?;
        p.live.insert(name.to_owned(), ino);
        p.mtime = SystemTime::now();
        Ok(ino)
    }

    pub(crate) fn create(&mut self, parent: Ino, name: &OsStr, perm: u16) -> R<Ino> {
        self.new_entry(parent, name, Node::new(Kind::File, perm, parent))
    }

    pub(crate) fn mkdir(&mut self, parent: Ino, name: &OsStr, perm: u16) -> R<Ino> {
        self.new_entry(parent, name, Node::new(Kind::Dir, perm, parent))
    }

    /// Drop a live name of `ino` (already removed from its directory).
    fn unlinked(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.nlink = n.nlink.saturating_sub(1);
            if n.kind == Kind::File && n.nlink == 0 && n.opens == 0 {
                // Nobody can see its pending bytes again, and they are not durable.
                n.dirty = Extents::default();
            }
        }
    }

    pub(crate) fn unlink(&mut self, parent: Ino, name: &OsStr) -> R<()> {
        let ino = self.lookup(parent, name)?;
        if self.node(ino)?.kind == Kind::Dir {
            return Err(libc::EISDIR);
        }
        self.node_mut(parent)?.live.remove(name);
        self.unlinked(ino);
        Ok(())
    }

    pub(crate) fn rmdir(&mut self, parent: Ino, name: &OsStr) -> R<()> {
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.node_mut(parent)?.live.remove(name);
        self.unlinked(ino);
        Ok(())
    }

    pub(crate) fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> R<()> {
        let ino = self.lookup(parent, name)?;
        let kind = self.node(ino)?.kind;
        if let Ok(target) = self.lookup(new_parent, new_name) {
            if target == ino {
                return Ok(());
            }
            if no_replace {
                return Err(libc::EEXIST);
            }
            match (kind, self.node(target)?.kind) {
                (Kind::File, Kind::Dir) => return Err(libc::EISDIR),
                (Kind::Dir, Kind::File) => return Err(libc::ENOTDIR),
                (Kind::Dir, Kind::Dir) if !self.dir(target)?.live.is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                _ => {}
            }
            self.node_mut(new_parent)?.live.remove(new_name);
            self.unlinked(target);
        }
        self.dir(new_parent)?;
        self.node_mut(parent)?.live.remove(name);
        self.node_mut(new_parent)?
            .live
            .insert(new_name.to_owned(), ino);
        if kind == Kind::Dir {
            self.node_mut(ino)?.parent = new_parent;
        }
        Ok(())
    }

    pub(crate) fn link(&mut self, ino: Ino, new_parent: Ino, new_name: &OsStr) -> R<()> {
        self.file_mut(ino)?;
        if self.dir(new_parent)?.live.contains_key(new_name) {
            return Err(libc::EEXIST);
        }
        self.node_mut(new_parent)?
            .live
            .insert(new_name.to_owned(), ino);
        self.node_mut(ino)?.nlink += 1;
        Ok(())
    }

    pub(crate) fn set_perm(&mut self, ino: Ino, perm: u16) -> R<()> {
        self.node_mut(ino)?.perm = perm;
        Ok(())
    }

    pub(crate) fn opened(&mut self, ino: Ino) -> R<()> {
        self.node_mut(ino)?.opens += 1;
        Ok(())
    }

    pub(crate) fn released(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.opens = n.opens.saturating_sub(1);
            if n.kind == Kind::File && n.nlink == 0 && n.opens == 0 {
                n.dirty = Extents::default();
                self.files.remove(&ino);
            }
        }
    }

    // ----- file contents -----

    pub(crate) fn read(&mut self, ino: Ino, offset: u64, len: u32) -> R<Vec<u8>> {
        let n = self.file_mut(ino)?;
        let end = n.size.min(offset.saturating_add(u64::from(len)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let durable_end = end.min(n.hidden_from).min(n.durable_len);
        let mut buf = vec![0u8; (end - offset) as usize];
        if offset < durable_end {
            let want = (durable_end - offset) as usize;
            let f = self.staging_file(ino)?;
            let mut done = 0;
            while done < want {
                match f.read_at(&mut buf[done..want], offset + done as u64) {
                    Ok(0) => break,
                    Ok(k) => done += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
        }
        self.file_mut(ino)?.dirty.overlay(offset, &mut buf);
        Ok(buf)
    }

    pub(crate) fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> R<()> {
        let n = self.file_mut(ino)?;
        n.dirty.write(offset, data);
        n.size = n.size.max(offset + data.len() as u64);
        n.mtime = SystemTime::now();
        self.last_write = Some((ino, offset, data.len() as u64));
        Ok(())
    }

    pub(crate) fn set_size(&mut self, ino: Ino, len: u64) -> R<()> {
        let n = self.file_mut(ino)?;
        if len < n.size {
            n.dirty.truncate(len);
            n.hidden_from = n.hidden_from.min(len);
        }
        n.size = len;
        n.mtime = SystemTime::now();
        Ok(())
    }

    /// `fallocate` with mode 0 or `FALLOC_FL_KEEP_SIZE`; other modes are not supported.
    pub(crate) fn allocate(&mut self, ino: Ino, offset: u64, len: u64, mode: i32) -> R<()> {
        let n = self.file_mut(ino)?;
        match mode {
            0 => {
                n.size = n.size.max(offset.saturating_add(len));
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    // ----- durability -----

    /// fsync or fdatasync of a file (both make its data and length durable), or of a
    /// directory (its entries).
    pub(crate) fn fsync(&mut self, ino: Ino) -> R<()> {
        match self.node(ino)?.kind {
            Kind::File => self.sync_file(ino),
            Kind::Dir => self.sync_dir(ino),
        }
    }

    fn sync_file(&mut self, ino: Ino) -> R<()> {
        let n = self.file_mut(ino)?;
        let (size, hidden_from, durable_len) = (n.size, n.hidden_from, n.durable_len);
        let dirty = n.dirty.take_all();
        let f = self.staging_file(ino)?;
        if hidden_from < durable_len {
            f.set_len(hidden_from).map_err(errno)?; // what was truncated away reads as zeros
        }
        if size != hidden_from.min(durable_len) {
            f.set_len(size).map_err(errno)?;
        }
        for (at, bytes) in dirty {
            f.write_all_at(&bytes, at).map_err(errno)?;
        }
        let n = self.file_mut(ino)?;
        n.durable_len = size;
        n.hidden_from = size;
        if matches!(self.last_write, Some((i, _, _)) if i == ino) {
            self.last_write = None;
        }
        Ok(())
    }

    fn sync_dir(&mut self, dir: Ino) -> R<()> {
        let d = self.dir(dir)?;
        let live = d.live.clone();
        let old = std::mem::replace(&mut self.node_mut(dir)?.durable, live.clone());
        let Some((path, _)) = self.node(dir)?.durable_at.clone() else {
            return Ok(()); // written out once the directory itself becomes durable
        };
        for (name, ino) in &old {
            if live.get(name) != Some(ino) {
                self.remove_durable(&path.join(name), dir, name, *ino)?;
            }
        }
        for (name, ino) in &live {
            if old.get(name) != Some(ino) {
                self.add_durable(&path.join(name), dir, name, *ino)?;
            }
        }
        Ok(())
    }

    fn remove_durable(&mut self, rel: &Path, parent: Ino, name: &OsStr, ino: Ino) -> R<()> {
        let abs = self.durable_root.join(rel);
        match self.node(ino)?.kind {
            Kind::File => match fs::remove_file(&abs) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(errno(e)),
            },
            Kind::Dir => {
                let here = matches!(&self.node(ino)?.durable_at,
                    Some((_, Some((p, n))) ) if *p == parent && n == name);
                if here {
                    fs::remove_dir_all(&abs).map_err(errno)?;
                    self.forget_durable_paths(ino);
                }
                Ok(())
            }
        }
    }

    fn forget_durable_paths(&mut self, dir: Ino) {
        let children: Vec<Ino> = match self.nodes.get_mut(&dir) {
            Some(n) => {
                n.durable_at = None;
                n.durable.values().copied().collect()
            }
            None => return,
        };
        for c in children {
            if self.nodes.get(&c).is_some_and(|n| n.kind == Kind::Dir) {
                self.forget_durable_paths(c);
            }
        }
    }

    fn add_durable(&mut self, rel: &Path, parent: Ino, name: &OsStr, ino: Ino) -> R<()> {
        let abs = self.durable_root.join(rel);
        match self.node(ino)?.kind {
            Kind::File => {
                if let Ok(m) = fs::symlink_metadata(&abs) {
                    if m.is_dir() {
                        fs::remove_dir_all(&abs).map_err(errno)?;
                    } else {
                        fs::remove_file(&abs).map_err(errno)?;
                    }
                }
                fs::hard_link(self.staging(ino), &abs).map_err(errno)
            }
            Kind::Dir => {
                let entry = Some((parent, name.to_owned()));
                if let Some((old, old_entry)) = self.node(ino)?.durable_at.clone() {
                    // Durably moved: the old parent's durable entry goes with it.
                    fs::rename(self.durable_root.join(&old), &abs).map_err(errno)?;
                    if let Some((p, n)) = old_entry {
                        if let Ok(pn) = self.node_mut(p) {
                            if pn.durable.get(&n) == Some(&ino) {
                                pn.durable.remove(&n);
                            }
                        }
                    }
                    self.set_durable_path(ino, rel.to_path_buf(), entry);
                    return Ok(());
                }
                match fs::create_dir(&abs) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        fs::remove_dir_all(&abs).map_err(errno)?;
                        fs::create_dir(&abs).map_err(errno)?;
                    }
                    Err(e) => return Err(errno(e)),
                }
                self.node_mut(ino)?.durable_at = Some((rel.to_path_buf(), entry));
                let children: Vec<(OsString, Ino)> = self
                    .node(ino)?
                    .durable
                    .iter()
                    .map(|(n, i)| (n.clone(), *i))
                    .collect();
                for (n, i) in children {
                    self.add_durable(&rel.join(&n), ino, &n, i)?;
                }
                Ok(())
            }
        }
    }

    fn set_durable_path(&mut self, dir: Ino, rel: PathBuf, entry: Option<(Ino, OsString)>) {
        let children: Vec<(OsString, Ino)> = match self.nodes.get_mut(&dir) {
            Some(n) => {
                n.durable_at = Some((rel.clone(), entry));
                n.durable.iter().map(|(n, i)| (n.clone(), *i)).collect()
            }
            None => return,
        };
        for (name, c) in children {
            if self.nodes.get(&c).is_some_and(|n| n.kind == Kind::Dir) {
                self.set_durable_path(c, rel.join(&name), Some((dir, name)));
            }
        }
    }

    /// What the operating system would eventually write back: every file and directory
    /// made durable (a clean shutdown).
    pub(crate) fn sync_all(&mut self) -> R<()> {
        let mut inos: Vec<Ino> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            self.fsync(ino)?;
        }
        Ok(())
    }

    /// Pending state: (files with pending bytes, pending bytes, directories whose entries
    /// differ from their durable ones).
    pub(crate) fn pending(&self) -> (u64, u64, u64) {
        let (mut files, mut bytes, mut dirs) = (0, 0, 0);
        for n in self.nodes.values() {
            match n.kind {
                Kind::File => {
                    let b = n.dirty.bytes();
                    if b > 0 || n.size != n.durable_len || n.hidden_from < n.durable_len {
                        files += 1;
                    }
                    bytes += b;
                }
                Kind::Dir => dirs += u64::from(n.live != n.durable),
            }
        }
        (files, bytes, dirs)
    }

    /// Power loss: the pending state is dropped (by dropping the tree), except that with
    /// [`Tear::LastWrite`] the most recent write, if still pending, reaches the disk up to a
    /// sector boundary inside it.
    pub(crate) fn power_cut(mut self, tear: Tear) -> CutReport {
        let (files, bytes, dirs) = self.pending();
        let torn = match (tear, self.last_write) {
            (Tear::LastWrite { seed }, Some((ino, offset, len))) => {
                self.tear(ino, offset, len, seed)
            }
            _ => None,
        };
        let mut dropped_entries = Vec::new();
        self.undurable_entries(ROOT, PathBuf::new(), &mut dropped_entries);
        CutReport {
            files_with_pending_data: files,
            pending_bytes_dropped: bytes,
            directories_with_pending_entries: dirs,
            dropped_entries,
            torn,
        }
    }

    /// Live paths (under `dir`, at `rel`) whose entry is not durable: created, replaced or
    /// renamed there since the directory's last fsync.
    fn undurable_entries(&self, dir: Ino, rel: PathBuf, out: &mut Vec<PathBuf>) {
        let Some(d) = self.nodes.get(&dir) else {
            return;
        };
        for (name, ino) in &d.live {
            if d.durable.get(name) != Some(ino) {
                out.push(rel.join(name));
            } else if self.nodes.get(ino).is_some_and(|n| n.kind == Kind::Dir) {
                self.undurable_entries(*ino, rel.join(name), out);
            }
        }
    }

    fn tear(&mut self, ino: Ino, offset: u64, len: u64, seed: u64) -> Option<Torn> {
        let first = (offset / SECTOR + 1) * SECTOR;
        let end = offset + len;
        if first >= end {
            return None; // within one sector: written whole or not at all
        }
        let boundaries = (end - 1 - first) / SECTOR + 1;
        let cut = first + fastrand::Rng::with_seed(seed).u64(0..boundaries) * SECTOR;
        let bytes = self.read(ino, offset, (cut - offset) as u32).ok()?;
        let f = self.staging_file(ino).ok()?;
        f.write_all_at(&bytes, offset).ok()?;
        Some(Torn {
            path: self.durable_path_of(ino),
            offset,
            kept: cut - offset,
            dropped: end - cut,
        })
    }

    /// A durable path of a file, if it has one.
    fn durable_path_of(&self, ino: Ino) -> Option<PathBuf> {
        self.nodes.values().find_map(|d| {
            let (path, _) = d.durable_at.as_ref()?;
            let (name, _) = d.durable.iter().find(|(_, i)| **i == ino)?;
            Some(path.join(name))
        })
    }
}
