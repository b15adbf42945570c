//! The file system's own promises, through a real mount: what a power cut keeps and drops.
//!
//! Each test mounts a fresh disk; a mount failure fails the test with the reason (FUSE is
//! required, never skipped).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use halfmq_lossyfs::{CutReport, LossyDisk, Mounted, Pending, Tear, SECTOR};

/// A fresh disk, mounted. Each power cut mounts it again; the drop unmounts it.
struct Fixture {
    /// The mount (`None` only between an unmount and the next mount); declared first, so
    /// that it is unmounted before the directories go.
    mounted: Option<Mounted>,
    disk: LossyDisk,
    mnt: PathBuf,
    _tmp: tempfile::TempDir,
}

fn mounted() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let disk = LossyDisk::new(&tmp.path().join("disk")).unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut fx = Fixture {
        mounted: None,
        disk,
        mnt,
        _tmp: tmp,
    };
    fx.mount();
    fx
}

impl Fixture {
    fn mount(&mut self) {
        let m = self.disk.mount(&self.mnt).unwrap_or_else(|e| panic!("{e}"));
        self.mounted = Some(m);
    }

    fn take(&mut self) -> Mounted {
        self.mounted.take().expect("the disk is mounted")
    }

    /// Cut the power (every file on the mount closed) and mount again: what the cut dropped.
    fn cut(&mut self, tear: Tear) -> CutReport {
        let report = self.take().power_cut(tear).unwrap();
        self.mount();
        report
    }

    /// Unmount cleanly: everything written becomes durable.
    fn unmount_clean(&mut self) {
        self.take().unmount_clean().unwrap();
    }

    /// What a power cut now would drop.
    fn pending(&self) -> Pending {
        self.mounted
            .as_ref()
            .expect("the disk is mounted")
            .pending()
    }

    /// `name` on the mount (`.` is the mount's root).
    fn at(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// The contents of `name` on the mount.
    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.at(name)).unwrap()
    }

    /// The durable contents of `name`, read behind the mount.
    fn read_durable(&self, name: &str) -> Vec<u8> {
        fs::read(self.disk.durable_dir().join(name)).unwrap()
    }

    /// `name` on the mount, opened for writing.
    fn open(&self, name: &str) -> File {
        OpenOptions::new().write(true).open(self.at(name)).unwrap()
    }

    /// Write `data` at `offset` of `name` and close it, without a sync.
    fn write_at(&self, name: &str, data: &[u8], offset: u64) {
        self.open(name).write_all_at(data, offset).unwrap();
    }

    /// `name` created (or truncated) with `data`, open for reading and writing.
    fn create(&self, name: &str, data: &[u8]) -> File {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.at(name))
            .unwrap();
        f.write_all(data).unwrap();
        f
    }

    /// [`Fixture::create`], then fsync and close: the data is durable, the name only once
    /// its directory is synced.
    fn create_synced(&self, name: &str, data: &[u8]) {
        self.create(name, data).sync_all().unwrap();
    }

    fn mkdir(&self, name: &str) {
        fs::create_dir(self.at(name)).unwrap();
    }

    fn remove(&self, name: &str) {
        fs::remove_file(self.at(name)).unwrap();
    }

    fn rename(&self, from: &str, to: &str) {
        fs::rename(self.at(from), self.at(to)).unwrap();
    }

    fn exists(&self, name: &str) -> bool {
        self.at(name).exists()
    }

    /// fsync of directory `name`: its entries become durable.
    fn sync_dir(&self, name: &str) {
        File::open(self.at(name)).unwrap().sync_all().unwrap();
    }
}

#[test]
fn a_write_without_fsync_is_lost_and_reads_see_it_before() {
    let mut fx = mounted();
    let f = fx.create("a", b"durable");
    f.sync_data().unwrap();
    fx.sync_dir(".");
    f.write_all_at(b" and more", 7).unwrap();
    assert_eq!(fx.read("a"), b"durable and more");
    assert!(fx.pending().bytes >= 9);
    drop(f);
    fx.cut(Tear::None);
    assert_eq!(fx.read("a"), b"durable");
    assert_eq!(fx.read_durable("a"), b"durable");
}

#[test]
fn fsync_and_fdatasync_keep_data_and_length() {
    let mut fx = mounted();
    let f = fx.create("a", b"");
    fx.sync_dir(".");
    f.write_all_at(b"one", 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(b"two", 3).unwrap();
    f.sync_data().unwrap();
    // Preallocation and truncation are length changes: durable with the next sync.
    f.set_len(4096).unwrap();
    f.sync_data().unwrap();
    drop(f);
    fx.cut(Tear::None);
    let got = fx.read("a");
    assert_eq!(got.len(), 4096);
    assert_eq!(&got[..6], b"onetwo");
    assert!(got[6..].iter().all(|b| *b == 0));
    // A shrink that was not synced is undone, and so is a write beyond it.
    let f = fx.open("a");
    f.set_len(2).unwrap();
    f.write_all_at(b"X", 10).unwrap();
    assert_eq!(fx.read("a"), b"on\0\0\0\0\0\0\0\0X");
    drop(f);
    fx.cut(Tear::None);
    assert_eq!(fx.read("a").len(), 4096);
    // The same shrink, synced: the cut bytes stay cut, even once the file grows again.
    let f = fx.open("a");
    f.set_len(2).unwrap();
    f.set_len(8).unwrap();
    f.sync_data().unwrap();
    drop(f);
    fx.cut(Tear::None);
    assert_eq!(fx.read("a"), b"on\0\0\0\0\0\0");
}

#[test]
fn a_new_file_needs_its_directory_synced() {
    let mut fx = mounted();
    fx.mkdir("d");
    fx.sync_dir(".");
    fx.create_synced("d/new", b"data"); // the data, but not the entry
    assert!(fx.pending().directories >= 1);
    let report = fx.cut(Tear::None);
    assert_eq!(report.dropped_entries, vec![PathBuf::from("d/new")]);
    assert!(fx.at("d").is_dir(), "the synced directory is there");
    assert!(!fx.exists("d/new"), "an entry never synced survived");

    fx.create_synced("d/new", b"data");
    fx.sync_dir("d");
    fx.cut(Tear::None);
    assert_eq!(fx.read("d/new"), b"data");

    // An unlink is undone unless the directory is synced.
    fx.remove("d/new");
    fx.cut(Tear::None);
    assert_eq!(fx.read("d/new"), b"data");
    fx.remove("d/new");
    fx.sync_dir("d");
    fx.cut(Tear::None);
    assert!(!fx.exists("d/new"));

    // A directory whose own entry was never synced is lost with everything in it, and
    // written out whole once it is.
    for sync_its_entry in [false, true] {
        fx.mkdir("e");
        fx.create_synced("e/x", b"x");
        fx.sync_dir("e");
        if sync_its_entry {
            fx.sync_dir(".");
        }
        fx.cut(Tear::None);
        assert_eq!(
            fx.exists("e"),
            sync_its_entry,
            "e survived: {}",
            fx.exists("e")
        );
    }
    assert_eq!(fx.read("e/x"), b"x");
}

#[test]
fn a_rename_is_durable_only_with_its_directory() {
    let mut fx = mounted();
    fx.create_synced("old", b"old");
    fx.create_synced("tmp", b"new");
    fx.sync_dir(".");
    fx.rename("tmp", "old");
    assert_eq!(fx.read("old"), b"new");
    fx.cut(Tear::None);
    assert_eq!(fx.read("old"), b"old", "the rename was not synced");
    assert_eq!(fx.read("tmp"), b"new");

    fx.rename("tmp", "old");
    fx.sync_dir(".");
    fx.cut(Tear::None);
    assert_eq!(fx.read("old"), b"new");
    assert!(!fx.exists("tmp"));

    // Data written after the durable rename, without fsync, is lost under the new name.
    fx.write_at("old", b"NEWER", 0);
    fx.cut(Tear::None);
    assert_eq!(fx.read("old"), b"new");
}

#[test]
fn a_torn_write_keeps_whole_sectors_of_its_start_only() {
    let mut fx = mounted();
    let len = 8 * SECTOR as usize;
    let f = fx.create("seg", &vec![0u8; len]);
    f.sync_all().unwrap();
    fx.sync_dir(".");
    let data: Vec<u8> = (0..5 * SECTOR as usize)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    let start = 100u64; // not sector-aligned
    f.write_all_at(&data, start).unwrap();
    drop(f);
    let report = fx.cut(Tear::LastWrite { seed: 7 });
    let torn = report
        .torn
        .expect("the last write was pending, so it is torn");
    assert_eq!(torn.path.as_deref(), Some(Path::new("seg")));
    assert_eq!(torn.offset, start);
    assert_eq!((start + torn.kept) % SECTOR, 0, "torn at a sector boundary");
    assert!(torn.kept > 0 && torn.dropped > 0);
    assert_eq!(torn.kept + torn.dropped, data.len() as u64);
    let got = fx.read("seg");
    let cut = (start + torn.kept) as usize;
    assert_eq!(&got[start as usize..cut], &data[..torn.kept as usize]);
    assert!(got[..start as usize].iter().all(|b| *b == 0));
    assert!(
        got[cut..].iter().all(|b| *b == 0),
        "bytes after the tear survived"
    );

    // A write that was synced is not torn; nor is one inside a single sector.
    fx.write_at("seg", b"abc", 600);
    let report = fx.cut(Tear::LastWrite { seed: 1 });
    assert_eq!(report.torn, None);
    assert_eq!(fx.read("seg"), got);
    fx.unmount_clean();
}

#[test]
fn a_clean_unmount_writes_everything_back() {
    let mut fx = mounted();
    fs::create_dir_all(fx.at("a/b")).unwrap();
    fx.create("a/b/f", b"kept");
    fx.unmount_clean();
    assert_eq!(fx.read_durable("a/b/f"), b"kept");
    fx.mount();
    assert_eq!(fx.read("a/b/f"), b"kept");
}

#[test]
fn flock_works_on_the_mount() {
    let fx = mounted();
    let a = fx.create("LOCK", b"");
    let b = fx.open("LOCK");
    a.try_lock().unwrap();
    assert!(b.try_lock().is_err(), "a second exclusive lock was granted");
    drop(a);
    b.try_lock().unwrap();
}
