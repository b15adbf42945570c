//! Damage to acknowledged data at rest: recovery never cuts it, `halfmq repair` quarantines
//! it, and after the repair the broker serves everything else.
//!
//! The two scenarios of the power-loss issue, as a user met them:
//! - 1000 acknowledged messages, clean close, the first 32 bytes of the newest segment
//!   zeroed: the open stops with `Error::Damaged` naming the file and offset 0 (it used to
//!   delete the segment and come up empty); `halfmq repair` restores the header and every
//!   message is served again.
//! - 1000 acknowledged messages, a crash, one byte changed inside record 31: the open stops
//!   with `Error::Damaged` naming the file and the record's offset (it used to cut 969
//!   acknowledged records as a "torn tail"); after repair everything but record 31 is served,
//!   the report names record 31's topic, queue, offset and key, and a read of it is
//!   `Error::Lost`.
//!
//! And repair crashed at every step of its own writes, then run again: the same outcome, and
//! the original bytes are kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use halfmq::{Broker, BrokerConfig, Error, Message};
use halfmq_store::io::{Storage, StorageFile};
use halfmq_store::repair::{self, LostRecord, RepairReport};
use halfmq_store::segment::{self, SEGMENT_HEADER_BYTES};
use halfmq_store::sim::{CrashMode, SimStorage};

mod common;

use common::{open_waiting_for_lock, run};

const TOPIC: &str = "orders";
const MESSAGES: usize = 1000;
const DAMAGED: usize = 31;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Sent {
    queue: u32,
    offset: u64,
    log_offset: u64,
    key: String,
    body: Vec<u8>,
}

fn config(dir: &Path) -> BrokerConfig {
    let mut cfg = BrokerConfig::new(dir);
    // Every message in one segment, the newest: the case a torn tail used to be cut from.
    cfg.store.segment_bytes = 1024 * 1024;
    cfg.store.record_bytes_max = 64 * 1024;
    cfg.txn.check_back = false;
    cfg
}

fn send_all(b: &Broker) -> Vec<Sent> {
    b.create_topic(TOPIC, 4).unwrap();
    (0..MESSAGES)
        .map(|i| {
            let key = format!("order-{i}");
            let body = format!("confirmed {i}: {}", "x".repeat(64)).into_bytes();
            let r = b
                .send(TOPIC, &Message::new(body.clone()).with_key(&key))
                .unwrap();
            Sent {
                queue: r.queue,
                offset: r.offset,
                log_offset: r.log_offset,
                key,
                body,
            }
        })
        .collect()
}

/// Everything a new group is given, sorted like `Sent`.
fn served(b: &Broker) -> Vec<(u32, u64, String, Vec<u8>)> {
    let group = format!("check-{}", rand_suffix());
    let mut out = Vec::new();
    loop {
        let got = b.poll(&group, TOPIC, 4096).unwrap();
        if got.is_empty() {
            break;
        }
        for d in got {
            out.push((d.queue, d.offset, d.key, d.body));
        }
    }
    out.sort();
    out
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn expected(sent: &[Sent]) -> Vec<(u32, u64, String, Vec<u8>)> {
    let mut v: Vec<_> = sent
        .iter()
        .map(|s| (s.queue, s.offset, s.key.clone(), s.body.clone()))
        .collect();
    v.sort();
    v
}

fn segment_path(dir: &Path) -> PathBuf {
    dir.join("log").join(segment::file_name(0))
}

fn assert_damaged_at(result: halfmq::Result<Arc<Broker>>, path: &Path, offset: u64) {
    match result {
        Err(Error::Damaged {
            path: p,
            offset: o,
            reason,
        }) => assert_eq!((p.as_path(), o), (path, offset), "{reason}"),
        Err(e) => panic!("expected Error::Damaged at {offset}, got {e}"),
        Ok(b) => panic!(
            "open succeeded ({:?}); {} of {MESSAGES} messages served",
            b.recovery_report(),
            served(&b).len()
        ),
    }
}

/// Scenario 1, on real files and through the `halfmq repair` binary.
#[test]
fn a_zeroed_header_of_the_newest_segment_stops_the_open_and_repair_restores_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let cfg = config(&dir);
    let b = Broker::open(cfg.clone()).unwrap();
    let sent = send_all(&b);
    b.close().unwrap();
    drop(b);
    let seg = segment_path(&dir);
    let mut bytes = std::fs::read(&seg).unwrap();
    let header: Vec<u8> = bytes[..32].to_vec();
    bytes[..32].fill(0);
    std::fs::write(&seg, &bytes).unwrap();

    let opened = open_waiting_for_lock(|| Broker::open(cfg.clone()));
    assert_damaged_at(opened, &seg, 0);
    assert!(
        std::fs::read(&seg).unwrap() == bytes,
        "nothing was removed or cut"
    );

    let dry = run(&["repair", "--data-dir", dir.to_str().unwrap(), "--dry-run"]).ok();
    assert!(
        dry.stdout.contains("would quarantine 32 bytes"),
        "{}",
        dry.stdout
    );
    assert!(
        std::fs::read(&seg).unwrap() == bytes,
        "a dry run changes nothing"
    );
    assert!(
        dry.stderr.contains("would quarantine damaged bytes")
            && !dry.stderr.contains("quarantined damaged bytes"),
        "a dry run's log says what it would do, not that it did:\n{}",
        dry.stderr
    );
    let r = run(&["repair", "--data-dir", dir.to_str().unwrap()]).ok();
    assert!(r.stdout.contains("quarantined 32 bytes"), "{}", r.stdout);
    assert_eq!(
        std::fs::read(&seg).unwrap()[..32],
        header[..],
        "header restored"
    );
    let again = run(&["repair", "--data-dir", dir.to_str().unwrap()]).ok();
    assert_eq!(again.stdout.trim(), "no damage found");

    let b = open_waiting_for_lock(|| Broker::open(cfg.clone())).unwrap();
    assert_eq!(served(&b), expected(&sent), "every acknowledged message");
}

/// The store after `MESSAGES` sends and a power loss (every send was acknowledged, so
/// durable; nothing else was synced after the open's checkpoint), and what was sent.
fn crashed() -> (tempfile::TempDir, BrokerConfig, SimStorage, Vec<Sent>) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let disk = SimStorage::new();
    let b = Broker::open_with(Arc::new(disk.clone()), cfg.clone()).unwrap();
    let sent = send_all(&b);
    let image = disk.crash(CrashMode::DropUnsynced);
    drop(b);
    (tmp, cfg, image, sent)
}

fn open_sim(disk: &SimStorage, cfg: &BrokerConfig) -> halfmq::Result<Arc<Broker>> {
    open_waiting_for_lock(|| Broker::open_with(Arc::new(disk.clone()), cfg.clone()))
}

/// One byte changed inside the body of record `DAMAGED`; returns the file position.
fn damage(disk: &SimStorage, seg: &Path, s: &Sent) -> (u64, Vec<u8>) {
    let mut bytes = disk.durable_bytes(seg).unwrap();
    let at = s.log_offset as usize + 52 + TOPIC.len() + s.key.len() + 3;
    bytes[at] ^= 0x20;
    disk.put_bytes(seg, bytes.clone());
    (s.log_offset, bytes)
}

/// The report names the lost record. After a power loss the consume-queue entries written
/// since the open's checkpoint are gone with the page cache, so its place is read from the
/// damaged bytes (reported as unverified).
fn check_report(report: &RepairReport, s: &Sent) {
    let lost: Vec<_> = report.lost().collect();
    assert_eq!(lost.len(), 1, "{report}");
    let l = lost[0];
    let expected = LostRecord {
        log_offset: s.log_offset,
        topic: Some(TOPIC.to_owned()),
        queue: Some(s.queue),
        queue_offset: Some(s.offset),
        key: Some(s.key.clone()),
        from_index: false,
        // Whatever the damaged header still says of these.
        ..l.clone()
    };
    assert_eq!(l, &expected, "{report}");
}

fn assert_repaired(disk: &SimStorage, cfg: &BrokerConfig, sent: &[Sent]) {
    let b = open_sim(disk, cfg).unwrap_or_else(|e| panic!("open after repair: {e}"));
    let s = &sent[DAMAGED];
    let mut rest = sent.to_vec();
    rest.remove(DAMAGED);
    assert_eq!(
        served(&b),
        expected(&rest),
        "everything but record {DAMAGED}"
    );
    let q = b.store().queue(TOPIC, s.queue).unwrap();
    match b.store().read_message(&q, s.offset) {
        Err(Error::Lost {
            topic,
            queue,
            offset,
        }) => assert_eq!((topic.as_str(), queue, offset), (TOPIC, s.queue, s.offset)),
        other => panic!("read of the lost message: {other:?}"),
    }
    // A group whose committed offset stops at the lost message still gets its figures.
    let group = format!("acker-{}", rand_suffix());
    loop {
        let got = b.poll(&group, TOPIC, 4096).unwrap();
        if got.is_empty() {
            break;
        }
        for d in got
            .iter()
            .filter(|d| d.queue == s.queue && d.offset < s.offset)
        {
            b.ack(&group, TOPIC, d.queue, d.offset).unwrap();
        }
    }
    b.stats()
        .unwrap_or_else(|e| panic!("stats with a committed offset at a lost message: {e}"));
    // New messages keep their queue's offsets after the lost one.
    let r = b
        .send(TOPIC, &Message::new(b"after".to_vec()).with_key(&s.key))
        .unwrap();
    assert_eq!(r.queue, s.queue);
    let last_in_queue = sent.iter().filter(|x| x.queue == s.queue).count() as u64;
    assert_eq!(r.offset, last_in_queue);
}

/// Scenario 2, on the simulated disk (for the crash), with the library's repair.
#[test]
fn one_changed_byte_in_record_31_after_a_crash_stops_the_open_and_repair_loses_only_it() {
    let (tmp, cfg, image, sent) = crashed();
    let seg = segment_path(tmp.path());
    let disk = image.crash(CrashMode::DropUnsynced);
    let s = &sent[DAMAGED];
    let (pos, damaged) = damage(&disk, &seg, s);

    assert_damaged_at(open_sim(&disk, &cfg), &seg, pos);
    assert!(
        disk.durable_bytes(&seg).unwrap() == damaged,
        "nothing was cut"
    );

    let dry = repair::repair(&disk, tmp.path(), true).unwrap();
    check_report(&dry, s);
    assert!(
        disk.durable_bytes(&seg).unwrap() == damaged,
        "a dry run changes nothing"
    );
    let report = repair::repair(&disk, tmp.path(), false).unwrap();
    check_report(&report, s);
    let range = &report.damaged[0];
    assert_eq!(
        (range.file_pos, range.len),
        (pos, 52 + (TOPIC.len() + s.key.len() + s.body.len()) as u64)
    );
    let copy = disk
        .durable_bytes(&range.quarantine)
        .expect("the quarantine copy is durable");
    let original = &damaged[pos as usize..(pos + range.len) as usize];
    assert!(
        copy.windows(original.len()).any(|w| w == original),
        "it holds the damaged bytes"
    );
    assert_eq!(
        repair::repair(&disk, tmp.path(), false).unwrap(),
        RepairReport::default()
    );
    assert_repaired(&disk, &cfg, &sent);
}

/// A storage that fails every operation after `ops` writes and syncs: the moment of a crash.
#[derive(Clone)]
struct Failing {
    inner: SimStorage,
    ops: Arc<AtomicI64>,
}

impl Failing {
    fn step(&self, path: &Path) -> halfmq::Result<()> {
        if self.ops.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(Error::io(path, "write", std::io::Error::other("crash")));
        }
        Ok(())
    }
}

struct FailingFile {
    inner: Arc<dyn StorageFile>,
    st: Failing,
}

impl Storage for Failing {
    fn create_dir_all(&self, dir: &Path) -> halfmq::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list_dir(&self, dir: &Path) -> halfmq::Result<Vec<String>> {
        self.inner.list_dir(dir)
    }
    fn open(&self, path: &Path, create: bool) -> halfmq::Result<Arc<dyn StorageFile>> {
        if create && !self.inner.exists(path) {
            self.step(path)?;
        }
        Ok(Arc::new(FailingFile {
            inner: self.inner.open(path, create)?,
            st: self.clone(),
        }))
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove_file(&self, path: &Path) -> halfmq::Result<()> {
        self.step(path)?;
        self.inner.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> halfmq::Result<()> {
        self.step(dir)?;
        self.inner.sync_dir(dir)
    }
    fn lock_dir(&self, dir: &Path) -> halfmq::Result<Box<dyn std::any::Any + Send + Sync>> {
        self.inner.lock_dir(dir)
    }
}

impl StorageFile for FailingFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> halfmq::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> halfmq::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> halfmq::Result<()> {
        self.st.step(self.path())?;
        self.inner.write_all_at(buf, offset)
    }
    fn allocate(&self, len: u64) -> halfmq::Result<()> {
        self.st.step(self.path())?;
        self.inner.allocate(len)
    }
    fn set_len(&self, len: u64) -> halfmq::Result<()> {
        self.st.step(self.path())?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> halfmq::Result<()> {
        self.st.step(self.path())?;
        self.inner.sync_data()
    }
}

/// Repair cut short by a power loss after each of its writes and syncs (keeping a random
/// part of what was not synced), then run again: the broker serves everything but record
/// 31, and an intact quarantine copy holds its original bytes.
#[test]
fn repair_crashed_at_every_step_and_run_again_ends_the_same() {
    let (tmp, cfg, image, sent) = crashed();
    let seg = segment_path(tmp.path());
    let s = &sent[DAMAGED];
    let base = image.crash(CrashMode::DropUnsynced);
    let (pos, damaged) = damage(&base, &seg, s);
    let len = 52 + (TOPIC.len() + s.key.len() + s.body.len());
    let original = damaged[pos as usize..pos as usize + len].to_vec();
    let mut crashed_at = BTreeMap::new();
    for ops in 0.. {
        let disk = base.crash(CrashMode::DropUnsynced);
        let failing = Failing {
            inner: disk.clone(),
            ops: Arc::new(AtomicI64::new(ops)),
        };
        let first = repair::repair(&failing, tmp.path(), false);
        let done = first.is_ok();
        for seed in 0..3 {
            let after = disk.crash(CrashMode::KeepRandomPrefix { seed });
            let report = repair::repair(&after, tmp.path(), false)
                .unwrap_or_else(|e| panic!("repair after a crash at step {ops}: {e}"));
            if let Some(l) = report.lost().next() {
                assert_eq!(l.log_offset, s.log_offset, "{report}");
            }
            let copies: Vec<Vec<u8>> = after
                .files()
                .into_iter()
                .filter(|p| p.parent() == Some(tmp.path().join("quarantine").as_path()))
                .filter_map(|p| after.durable_bytes(&p))
                .collect();
            assert!(
                copies.iter().any(|c| c.windows(len).any(|w| w == original)),
                "step {ops}, seed {seed}: the original bytes are kept"
            );
            assert_repaired(&after, &cfg, &sent);
        }
        *crashed_at.entry(done).or_insert(0) += 1;
        if done {
            break;
        }
    }
    assert!(
        crashed_at[&false] >= 4,
        "crash points tried: {crashed_at:?}"
    );
    let _ = SEGMENT_HEADER_BYTES;
}

/// After a clean close the open re-reads the newest segment below the checkpoint, so the
/// damage stops it with `Error::Damaged` naming the file and the record's offset (it used
/// to open, and the damage showed only when a poll reached it, as `Corrupt` for the whole
/// topic). The consume-queue entries are durable: repair names record 31 from its index
/// entry (key checked against the entry's hash), and its quarantine record keeps the
/// message's queue offset, so the index below the checkpoint still holds.
#[test]
fn after_a_clean_close_the_open_stops_and_repair_names_the_lost_record_from_its_index_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let disk = SimStorage::new();
    let b = Broker::open_with(Arc::new(disk.clone()), cfg.clone()).unwrap();
    let sent = send_all(&b);
    b.close().unwrap();
    drop(b);
    let disk = disk.crash(CrashMode::DropUnsynced);
    let seg = segment_path(tmp.path());
    let s = &sent[DAMAGED];
    let (at, _) = damage(&disk, &seg, s);
    assert_damaged_at(open_sim(&disk, &cfg), &seg, at);

    let report = repair::repair(&disk, tmp.path(), false).unwrap();
    let lost: Vec<_> = report.lost().collect();
    assert_eq!(lost.len(), 1, "{report}");
    assert_eq!(
        (
            lost[0].topic.as_deref(),
            lost[0].queue,
            lost[0].queue_offset,
            lost[0].key.as_deref(),
            lost[0].from_index
        ),
        (
            Some(TOPIC),
            Some(s.queue),
            Some(s.offset),
            Some(s.key.as_str()),
            true
        ),
        "{report}"
    );
    assert_repaired(&disk, &cfg, &sent);
}

/// The input the recovery fuzz target found repair overflowing on (fixed in 429f560): a
/// newest segment whose first record's length field is invalid, followed 8 bytes later by
/// a valid record, under a checkpoint that covers both. The damaged stretch, from the
/// invalid record to the next valid one, is too short to hold a quarantine record: repair
/// refuses it with a typed error (it used to panic computing the record's body length), and
/// the directory still opens only to the same typed `Damaged`.
#[test]
fn a_damaged_stretch_shorter_than_a_record_header_is_refused_by_repair() {
    use halfmq_store::checkpoint::{self, Checkpoint};
    use halfmq_store::record::{self, Header, RecordKind};
    use halfmq_store::{Store, StoreConfig};

    let dir = Path::new("/short");
    let seg = dir.join("log").join(segment::file_name(0));
    let size = 64 * 1024;
    let mut bytes = segment::header_bytes(0, size).to_vec();
    // 8 bytes whose length field says 1: no record can be that short.
    bytes.extend_from_slice(&[1, 0, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd]);
    let at = bytes.len() as u64;
    let header = Header {
        kind: RecordKind::Message,
        flags: 0,
        queue_id: 0,
        log_offset: at,
        queue_offset: 0,
        timestamp_ms: 1,
    };
    record::encode_into(&mut bytes, &header, "t", "k", &[], b"after the damage").unwrap();
    let end = bytes.len() as u64;
    bytes.resize(size as usize, 0);
    let disk = SimStorage::new();
    disk.put_bytes(&seg, bytes);
    let cp = Checkpoint {
        seq: 1,
        log_offset: end,
        queues: vec![("t".into(), 0, 1)],
        clean: true,
    };
    checkpoint::store(&disk, dir, &cp).unwrap();
    let config = || {
        StoreConfig::default()
            .with_segment_bytes(size)
            .with_record_bytes_max(4 * 1024)
    };
    let open = || Store::open(Arc::new(disk.clone()), dir, config(), &mut |_| {}).map(|_| ());
    match open() {
        Err(Error::Damaged { path, offset, .. }) => {
            assert_eq!((path, offset), (seg.clone(), SEGMENT_HEADER_BYTES))
        }
        other => panic!("expected Damaged at the first record: {other:?}"),
    }
    match repair::repair(&disk, dir, false) {
        Err(Error::Invalid { what, reason }) => {
            assert_eq!(what, "quarantine record");
            assert!(reason.contains("shorter than a record header"), "{reason}");
        }
        other => panic!("expected repair to refuse the 8-byte stretch: {other:?}"),
    }
    assert!(
        matches!(open(), Err(Error::Damaged { .. })),
        "still the same damage after the refused repair"
    );
}
