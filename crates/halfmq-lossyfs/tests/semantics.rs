//! The file system's own promises, through a real mount: what a power cut keeps and drops.
//!
//! Each test mounts a fresh disk; a mount failure fails the test with the reason (FUSE is
//! required, never skipped).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use halfmq_lossyfs::{LossyDisk, Mounted, Tear, SECTOR};

struct Fixture {
    _tmp: tempfile::TempDir,
    disk: LossyDisk,
    mnt: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let disk = LossyDisk::new(&tmp.path().join("disk")).unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    Fixture {
        _tmp: tmp,
        disk,
        mnt,
    }
}

impl Fixture {
    fn mount(&self) -> Mounted {
        self.disk.mount(&self.mnt).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Cut the power and mount again.
    fn cut(&self, m: Mounted, tear: Tear) -> Mounted {
        m.power_cut(tear).unwrap();
        self.mount()
    }

    fn at(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// The contents of `name` on the mount.
    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.at(name)).unwrap()
    }

    /// `name` on the mount, opened for writing.
    fn open(&self, name: &str) -> File {
        OpenOptions::new().write(true).open(self.at(name)).unwrap()
    }
}

fn sync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

fn create(path: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f
}

/// [`create`], then fsync and close: the data is durable, the name only once its directory
/// is synced.
fn create_synced(path: &Path, data: &[u8]) {
    create(path, data).sync_all().unwrap();
}

#[test]
fn a_write_without_fsync_is_lost_and_reads_see_it_before() {
    let fx = fixture();
    let m = fx.mount();
    let f = create(&fx.at("a"), b"durable");
    f.sync_data().unwrap();
    sync_dir(&fx.mnt);
    f.write_all_at(b" and more", 7).unwrap();
    assert_eq!(fx.read("a"), b"durable and more");
    assert!(m.pending().bytes >= 9);
    drop(f);
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("a"), b"durable");
    assert_eq!(
        fs::read(fx.disk.durable_dir().join("a")).unwrap(),
        b"durable"
    );
    drop(m);
}

#[test]
fn fsync_and_fdatasync_keep_data_and_length() {
    let fx = fixture();
    let m = fx.mount();
    let f = create(&fx.at("a"), b"");
    sync_dir(&fx.mnt);
    f.write_all_at(b"one", 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(b"two", 3).unwrap();
    f.sync_data().unwrap();
    // Preallocation and truncation are length changes: durable with the next sync.
    f.set_len(4096).unwrap();
    f.sync_data().unwrap();
    drop(f);
    let m = fx.cut(m, Tear::None);
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
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("a").len(), 4096);
    // The same shrink, synced: the cut bytes stay cut, even once the file grows again.
    let f = fx.open("a");
    f.set_len(2).unwrap();
    f.set_len(8).unwrap();
    f.sync_data().unwrap();
    drop(f);
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("a"), b"on\0\0\0\0\0\0");
    drop(m);
}

#[test]
fn a_new_file_needs_its_directory_synced() {
    let fx = fixture();
    let m = fx.mount();
    fs::create_dir(fx.at("d")).unwrap();
    sync_dir(&fx.mnt);
    create_synced(&fx.at("d/new"), b"data"); // the data, but not the entry
    assert!(m.pending().directories >= 1);
    let report = m.power_cut(Tear::None).unwrap();
    assert_eq!(report.dropped_entries, vec![PathBuf::from("d/new")]);
    let m = fx.mount();
    assert!(fx.at("d").is_dir(), "the synced directory is there");
    assert!(!fx.at("d/new").exists(), "an entry never synced survived");

    create_synced(&fx.at("d/new"), b"data");
    sync_dir(&fx.at("d"));
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("d/new"), b"data");

    // An unlink is undone unless the directory is synced.
    fs::remove_file(fx.at("d/new")).unwrap();
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("d/new"), b"data");
    fs::remove_file(fx.at("d/new")).unwrap();
    sync_dir(&fx.at("d"));
    let m = fx.cut(m, Tear::None);
    assert!(!fx.at("d/new").exists());

    // A directory whose own entry was never synced is lost with everything in it.
    fs::create_dir(fx.at("e")).unwrap();
    create_synced(&fx.at("e/x"), b"x");
    sync_dir(&fx.at("e"));
    let m = fx.cut(m, Tear::None);
    assert!(!fx.at("e").exists());
    // ... and written out whole once it is.
    fs::create_dir(fx.at("e")).unwrap();
    create_synced(&fx.at("e/x"), b"x");
    sync_dir(&fx.at("e"));
    sync_dir(&fx.mnt);
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("e/x"), b"x");
    drop(m);
}

#[test]
fn a_rename_is_durable_only_with_its_directory() {
    let fx = fixture();
    let m = fx.mount();
    create_synced(&fx.at("old"), b"old");
    create_synced(&fx.at("tmp"), b"new");
    sync_dir(&fx.mnt);
    fs::rename(fx.at("tmp"), fx.at("old")).unwrap();
    assert_eq!(fx.read("old"), b"new");
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("old"), b"old", "the rename was not synced");
    assert_eq!(fx.read("tmp"), b"new");

    fs::rename(fx.at("tmp"), fx.at("old")).unwrap();
    sync_dir(&fx.mnt);
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("old"), b"new");
    assert!(!fx.at("tmp").exists());

    // Data written after the durable rename, without fsync, is lost under the new name.
    let f = fx.open("old");
    f.write_all_at(b"NEWER", 0).unwrap();
    drop(f);
    let m = fx.cut(m, Tear::None);
    assert_eq!(fx.read("old"), b"new");
    drop(m);
}

#[test]
fn a_torn_write_keeps_whole_sectors_of_its_start_only() {
    let fx = fixture();
    let m = fx.mount();
    let len = 8 * SECTOR as usize;
    let f = create(&fx.at("seg"), &vec![0u8; len]);
    f.sync_all().unwrap();
    sync_dir(&fx.mnt);
    let data: Vec<u8> = (0..5 * SECTOR as usize)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    let start = 100u64; // not sector-aligned
    f.write_all_at(&data, start).unwrap();
    drop(f);
    let report = m.power_cut(Tear::LastWrite { seed: 7 }).unwrap();
    let torn = report
        .torn
        .expect("the last write was pending, so it is torn");
    assert_eq!(torn.path.as_deref(), Some(Path::new("seg")));
    assert_eq!(torn.offset, start);
    assert_eq!((start + torn.kept) % SECTOR, 0, "torn at a sector boundary");
    assert!(torn.kept > 0 && torn.dropped > 0);
    assert_eq!(torn.kept + torn.dropped, data.len() as u64);
    let m = fx.mount();
    let got = fx.read("seg");
    let cut = (start + torn.kept) as usize;
    assert_eq!(&got[start as usize..cut], &data[..torn.kept as usize]);
    assert!(got[..start as usize].iter().all(|b| *b == 0));
    assert!(
        got[cut..].iter().all(|b| *b == 0),
        "bytes after the tear survived"
    );

    // A write that was synced is not torn; nor is one inside a single sector.
    let f = fx.open("seg");
    f.write_all_at(b"abc", 600).unwrap();
    drop(f);
    let report = m.power_cut(Tear::LastWrite { seed: 1 }).unwrap();
    assert_eq!(report.torn, None);
    let m = fx.mount();
    assert_eq!(fx.read("seg"), got);
    m.unmount_clean().unwrap();
}

#[test]
fn a_clean_unmount_writes_everything_back() {
    let fx = fixture();
    let m = fx.mount();
    fs::create_dir_all(fx.at("a/b")).unwrap();
    create(&fx.at("a/b/f"), b"kept");
    m.unmount_clean().unwrap();
    assert_eq!(
        fs::read(fx.disk.durable_dir().join("a/b/f")).unwrap(),
        b"kept"
    );
    let m = fx.mount();
    assert_eq!(fx.read("a/b/f"), b"kept");
    drop(m);
}

#[test]
fn flock_works_on_the_mount() {
    let fx = fixture();
    let m = fx.mount();
    let a = create(&fx.at("LOCK"), b"");
    let b = fx.open("LOCK");
    a.try_lock().unwrap();
    assert!(b.try_lock().is_err(), "a second exclusive lock was granted");
    drop(a);
    b.try_lock().unwrap();
    drop(b);
    drop(m);
}
