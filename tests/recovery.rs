//! Recovery of the storage engine after crashes and after damage at rest, through the embedded
//! [`Broker`] on the simulated disk ([`SimStorage`]), plus a few runs on real files.
//!
//! What these tests prove, each with exact expected outcomes: a torn or bit-flipped last
//! record is cut (at every byte position) and nothing acknowledged before it is lost, and the
//! next append lands where the cut record was; damage in an older segment, or damage longer
//! than an unsynced batch can be, fails open with `Error::Corrupt` naming the file and the
//! record's byte offset; segment roll-over, many topics and queues, empty stores and rebuilt
//! consume-queue indexes all come back with every acknowledged message readable in order;
//! recovery is idempotent; and after a crash that keeps a random prefix of the unsynced
//! writes, every acknowledged send is present and nothing present is garbage.
//!
//! How a crash is simulated: `disk.crash(mode)` returns a new disk holding what survived and
//! makes the old one refuse every operation, so the old broker can no longer write; it is
//! dropped after that (its close errors are only logged). A disk returned by `crash` is also
//! used as a read-only "image": `copy_of(image)` forks an independent disk from it, so one
//! image serves many damaged variants. The sled metadata lives on the real file system in the
//! test's temporary directory, outside the simulated disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::{Broker, BrokerConfig, Error, Message};
use halfmq_store::checkpoint::{self, Checkpoint};
use halfmq_store::consume_queue::{self, CQ_HEADER_BYTES, ENTRY_BYTES};
use halfmq_store::io::{FsStorage, Storage};
use halfmq_store::record::{self, RecordKind};
use halfmq_store::segment::{self, SEGMENT_HEADER_BYTES};
use halfmq_store::sim::{CrashMode, Faults, SimStorage};

mod common;

use common::{poll_until, release_last};

/// The smallest segment the configuration allows, so that tests roll over quickly.
const SEGMENT_BYTES: u64 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// One send whose receipt we hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    topic: String,
    queue: u32,
    offset: u64,
    log_offset: u64,
    key: String,
    body: Vec<u8>,
}

/// A message as a consumer sees it: (queue offset, key, body).
type Seen = (u64, String, Vec<u8>);

fn config(dir: &Path) -> BrokerConfig {
    let mut cfg = BrokerConfig::new(dir);
    cfg.store.segment_bytes = SEGMENT_BYTES;
    // At most a quarter of a segment, less headers (the configuration checks it).
    cfg.store.record_bytes_max = 16 * 1024 - 64;
    // No transactions here; without the check-back thread, dropping the last handle to a
    // broker closes it at once.
    cfg.txn.check_back = false;
    cfg
}

fn try_open(disk: &SimStorage, cfg: &BrokerConfig) -> halfmq::Result<Arc<Broker>> {
    Broker::open_with(Arc::new(disk.clone()), cfg.clone())
}

fn open(disk: &SimStorage, cfg: &BrokerConfig) -> Arc<Broker> {
    try_open(disk, cfg).unwrap_or_else(|e| panic!("open failed: {e}"))
}

/// A fresh simulated disk (sled in a new temporary directory) and a broker on it with
/// `topic` of `queues` queues.
fn fresh(topic: &str, queues: u32) -> (tempfile::TempDir, BrokerConfig, SimStorage, Arc<Broker>) {
    fresh_tuned(|_| {}, topic, queues)
}

/// [`fresh`], with `tune` applied to the configuration first.
fn fresh_tuned(
    tune: impl FnOnce(&mut BrokerConfig),
    topic: &str,
    queues: u32,
) -> (tempfile::TempDir, BrokerConfig, SimStorage, Arc<Broker>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    tune(&mut cfg);
    let disk = SimStorage::new();
    let b = open(&disk, &cfg);
    b.create_topic(topic, queues).unwrap();
    (tmp, cfg, disk, b)
}

/// Segment size and the two settings that bound a torn tail (what a crash can leave unsynced:
/// 2 × (pending_bytes_max + record_bytes_max)).
fn tail_limits(
    segment_bytes: u64,
    pending_bytes_max: u64,
    record_bytes_max: u32,
) -> impl FnOnce(&mut BrokerConfig) {
    move |cfg| {
        cfg.store.segment_bytes = segment_bytes;
        cfg.store.pending_bytes_max = pending_bytes_max;
        cfg.store.record_bytes_max = record_bytes_max;
    }
}

/// Messages `range` to `topic`, keys `k0` to `k{keys - 1}` in turn, bodies of `len` bytes.
fn send_many(
    b: &Broker,
    topic: &str,
    range: std::ops::Range<usize>,
    keys: usize,
    len: usize,
) -> Vec<Sent> {
    range
        .map(|i| {
            send(
                b,
                topic,
                &format!("k{}", i % keys),
                &body(&format!("m{i}-"), len),
            )
        })
        .collect()
}

/// Power loss under a running broker: returns the disk as it comes back.
fn crash(disk: &SimStorage, broker: Arc<Broker>, mode: CrashMode) -> SimStorage {
    let after = disk.crash(mode);
    release_last(broker);
    after
}

/// An independent copy of the durable state of `image` (which must not be used for anything
/// but reading and copying afterwards).
fn copy_of(image: &SimStorage) -> SimStorage {
    image.crash(CrashMode::DropUnsynced)
}

fn send(b: &Broker, topic: &str, key: &str, body: &[u8]) -> Sent {
    let r = b
        .send(topic, &Message::new(body.to_vec()).with_key(key))
        .unwrap_or_else(|e| panic!("send to {topic} failed: {e}"));
    Sent {
        topic: r.topic,
        queue: r.queue,
        offset: r.offset,
        log_offset: r.log_offset,
        key: key.to_owned(),
        body: body.to_vec(),
    }
}

/// Encoded size of a message record without properties.
fn record_bytes(topic: &str, key: &str, body: &[u8]) -> u64 {
    (record::HEADER_BYTES + topic.len() + key.len() + body.len()) as u64
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join("log").join(segment::file_name(base))
}

fn cq_path(dir: &Path, topic: &str, queue: u32) -> PathBuf {
    consume_queue::path(&dir.join("cq"), topic, queue)
}

fn log_files(disk: &SimStorage, dir: &Path) -> Vec<PathBuf> {
    let log_dir = dir.join("log");
    disk.files()
        .into_iter()
        .filter(|p| p.parent() == Some(log_dir.as_path()))
        .collect()
}

static GROUPS: AtomicUsize = AtomicUsize::new(0);

/// Everything the broker hands out for `topic` to a group that has never consumed, by queue,
/// in the order poll delivers it.
fn read_all(b: &Broker, topic: &str) -> BTreeMap<u32, Vec<Seen>> {
    let group = format!("check-{}", GROUPS.fetch_add(1, Ordering::Relaxed));
    let mut out: BTreeMap<u32, Vec<Seen>> = BTreeMap::new();
    loop {
        let got = b
            .poll(&group, topic, 4096)
            .unwrap_or_else(|e| panic!("poll of {topic} failed: {e}"));
        if got.is_empty() {
            return out;
        }
        for d in got {
            out.entry(d.queue)
                .or_default()
                .push((d.offset, d.key, d.body));
        }
    }
}

/// What `read_all` must return after `sent` (in send order) was stored.
fn expected(sent: &[Sent], topic: &str) -> BTreeMap<u32, Vec<Seen>> {
    let mut out: BTreeMap<u32, Vec<Seen>> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.topic == topic) {
        out.entry(s.queue)
            .or_default()
            .push((s.offset, s.key.clone(), s.body.clone()));
    }
    out
}

/// Assert that the broker holds exactly `sent` for `topic`, each queue in send order.
fn assert_holds(b: &Broker, topic: &str, sent: &[Sent], what: &str) {
    let want = expected(sent, topic);
    // The receipts themselves must number each queue 0, 1, 2, ... in send order.
    for (q, msgs) in &want {
        let offsets: Vec<u64> = msgs.iter().map(|m| m.0).collect();
        let dense: Vec<u64> = (0..msgs.len() as u64).collect();
        assert_eq!(offsets, dense, "{what}: receipts of {topic}/{q}");
    }
    let got = read_all(b, topic);
    if got != want {
        let count = |m: &BTreeMap<u32, Vec<Seen>>| m.values().map(Vec::len).sum::<usize>();
        panic!(
            "{what}: {topic} holds {} messages, {} expected; first difference in queue {:?}",
            count(&got),
            count(&want),
            want.keys()
                .chain(got.keys())
                .find(|q| got.get(q) != want.get(q))
        );
    }
}

/// The records of a segment image from its first record on: (file position, length, kind),
/// without the marks that begin each group-commit batch. Stops after a SegmentEnd record or
/// at the first position that holds no valid record, and returns that position too.
fn walk(image: &[u8]) -> (Vec<(u64, u64, RecordKind)>, u64) {
    let mut pos = SEGMENT_HEADER_BYTES;
    let mut out = Vec::new();
    while let Ok((view, len)) = record::decode(&image[pos as usize..]) {
        if view.header.kind != RecordKind::Mark {
            out.push((pos, len as u64, view.header.kind));
        }
        pos += len as u64;
        if view.header.kind == RecordKind::SegmentEnd {
            break;
        }
    }
    (out, pos)
}

fn total_len_at(image: &[u8], pos: u64) -> u64 {
    let p = pos as usize;
    u64::from(u32::from_le_bytes([
        image[p],
        image[p + 1],
        image[p + 2],
        image[p + 3],
    ]))
}

/// A body of `len` bytes that no single bit flip can make zero anywhere (every byte has
/// several bits set), tagged with `tag` at the start.
fn body(tag: &str, len: usize) -> Vec<u8> {
    let mut b = tag.as_bytes().to_vec();
    b.resize(len.max(tag.len()), b'w'); // 0x77
    b
}

/// `Error::Corrupt`, or `Error::Damaged` (damage recovery knows is in acknowledged data),
/// naming `path` and `offset`.
fn assert_corrupt_at(result: halfmq::Result<Arc<Broker>>, path: &Path, offset: u64, what: &str) {
    match result {
        Err(Error::Corrupt {
            path: p,
            offset: o,
            reason,
        })
        | Err(Error::Damaged {
            path: p,
            offset: o,
            reason,
        }) => {
            assert_eq!(
                (p.as_path(), o),
                (path, offset),
                "{what}: wrong place reported ({reason})"
            );
        }
        Err(e) => panic!("{what}: expected Error::Corrupt, got {e}"),
        Ok(_) => panic!("{what}: open succeeded, expected Error::Corrupt"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1, 2. The last record torn or damaged in every possible way
// ---------------------------------------------------------------------------------------------

/// A store holding `n` small messages in topic "torn" (3 queues) after a crash: every
/// message is durable, the indexes are not, and the only checkpoint is the one written at
/// the first open (start of the log), which is how a real crash leaves it.
struct TornFixture {
    _tmp: tempfile::TempDir,
    cfg: BrokerConfig,
    image: SimStorage,
    sent: Vec<Sent>,
    log: PathBuf,
    /// Durable bytes of the (only) segment.
    bytes: Vec<u8>,
    /// File position and length of the last record.
    last_pos: usize,
    last_len: usize,
}

fn torn_fixture(n: usize) -> TornFixture {
    let (tmp, cfg, disk, b) = fresh("torn", 3);
    let sent: Vec<Sent> = send_many(&b, "torn", 0..n, 4, 12);
    let image = crash(&disk, b, CrashMode::DropUnsynced);
    let log = segment_path(tmp.path(), 0);
    let bytes = image.durable_bytes(&log).unwrap();
    let last = sent.last().unwrap();
    let last_pos = last.log_offset as usize;
    let last_len = total_len_at(&bytes, last.log_offset) as usize;
    assert_eq!(last_len as u64, record_bytes("torn", &last.key, &last.body));
    // The image is what we think it is: n records back to back, zeros after.
    let (recs, end) = walk(&bytes);
    assert_eq!(recs.len(), n);
    assert_eq!(end as usize, last_pos + last_len);
    assert!(bytes[end as usize..].iter().all(|&x| x == 0));
    TornFixture {
        _tmp: tmp,
        cfg,
        image,
        sent,
        log,
        bytes,
        last_pos,
        last_len,
    }
}

impl TornFixture {
    /// Open a copy of the image whose last record is replaced by `last`, and check that
    /// recovery keeps exactly the other messages, cut `torn_expected` bytes, zeroed the whole
    /// record on disk, and puts the next message exactly where the cut one was.
    fn check(&self, last: &[u8], torn_expected: u64, what: &str) {
        let mut damaged = self.bytes.clone();
        damaged[self.last_pos..self.last_pos + self.last_len].copy_from_slice(last);
        let disk = copy_of(&self.image);
        disk.put_bytes(&self.log, damaged);
        let b = try_open(&disk, &self.cfg).unwrap_or_else(|e| panic!("{what}: open: {e}"));
        let r = b.recovery_report().clone();
        let cut = self.sent.last().unwrap();
        assert_eq!(
            r.torn_bytes_cut, torn_expected,
            "{what}: torn bytes ({r:?})"
        );
        assert_eq!(r.log_end, cut.log_offset, "{what}: log end ({r:?})");
        assert!(!r.full_rebuild, "{what}");
        let mut zeroed = self.bytes.clone();
        zeroed[self.last_pos..self.last_pos + self.last_len].fill(0);
        assert!(
            disk.durable_bytes(&self.log).unwrap() == zeroed,
            "{what}: the cut must be zeroed durably, everything else untouched"
        );
        let n = self.sent.len();
        assert_holds(&b, "torn", &self.sent[..n - 1], what);
        // The next message with the same key takes the cut record's place in log (after the
        // mark of its batch) and queue.
        let again = send(&b, "torn", &cut.key, b"after-the-cut");
        assert_eq!(
            (again.queue, again.offset, again.log_offset),
            (
                cut.queue,
                cut.offset,
                cut.log_offset + record::MARK_BYTES as u64
            ),
            "{what}: the next record"
        );
        let mut all = self.sent[..n - 1].to_vec();
        all.push(again);
        assert_holds(&b, "torn", &all, what);
    }
}

/// Test 1: The last record cut short at every byte: the bytes from the cut to its end read as zeros
/// (a preallocated file), as after a crash in the middle of the write.
#[test]
fn last_record_truncated_at_every_byte_is_cut_and_the_rest_survives() {
    let f = torn_fixture(12);
    let record = f.bytes[f.last_pos..f.last_pos + f.last_len].to_vec();
    for cut in 0..f.last_len {
        let mut last = record.clone();
        last[cut..].fill(0);
        // Recovery reports the non-zero bytes it had to zero.
        let torn = last
            .iter()
            .rposition(|&x| x != 0)
            .map_or(0, |i| i as u64 + 1);
        // The first byte (the low byte of the length) is not zero: any cut but the one at 0
        // leaves something to zero.
        assert_eq!(torn > 0, cut > 0);
        f.check(&last, torn, &format!("cut at byte {cut} of {}", f.last_len));
    }
}

/// Test 2: One flipped bit, at every bit of the last record.
#[test]
fn last_record_with_any_flipped_bit_is_cut_and_the_rest_survives() {
    let f = torn_fixture(12);
    let record = f.bytes[f.last_pos..f.last_pos + f.last_len].to_vec();
    assert_ne!(*record.last().unwrap(), 0);
    for i in 0..f.last_len {
        for bit in 0..8 {
            let mut last = record.clone();
            last[i] ^= 1 << bit;
            // The last byte of the record is a body byte that no flip makes zero, so the
            // whole record is what gets cut.
            f.check(
                &last,
                f.last_len as u64,
                &format!("bit {bit} of byte {i} flipped"),
            );
        }
    }
}

/// Test 2b: A valid record in the wrong place after the last one (stale bytes that happen to be a
/// whole record, here a copy of the first record) is not taken for data: every record knows its own
/// log offset, so it is cut as part of the torn tail and nothing is indexed twice.
#[test]
fn valid_record_in_the_wrong_place_at_the_tail_is_cut_not_indexed() {
    let f = torn_fixture(12);
    let first = f.sent[0].log_offset as usize;
    let first_len = total_len_at(&f.bytes, first as u64) as usize;
    let end = f.last_pos + f.last_len;
    let mut damaged = f.bytes.clone();
    damaged[end..end + first_len].copy_from_slice(&f.bytes[first..first + first_len]);
    let disk = copy_of(&f.image);
    disk.put_bytes(&f.log, damaged);
    let b = open(&disk, &f.cfg);
    let r = b.recovery_report().clone();
    assert_eq!(
        (r.torn_bytes_cut, r.log_end),
        (first_len as u64, end as u64),
        "{r:?}"
    );
    assert!(disk.durable_bytes(&f.log).unwrap() == f.bytes);
    assert_holds(&b, "torn", &f.sent, "stale copy of a record at the tail");
}

// ---------------------------------------------------------------------------------------------
// 3. Damage in an older segment
// ---------------------------------------------------------------------------------------------

/// Test 3: A flipped bit in any record of a full segment fails open, naming the segment file and
/// the record's position in it; nothing is cut.
#[test]
fn flipped_bit_in_an_older_segment_fails_open_naming_file_and_offset() {
    let (tmp, cfg, disk, b) = fresh("old", 2);
    let sent: Vec<Sent> = send_many(&b, "old", 0..160, 3, 900);
    let image = crash(&disk, b, CrashMode::DropUnsynced);
    assert!(
        sent.last().unwrap().log_offset >= 2 * SEGMENT_BYTES,
        "three segments"
    );

    for base in [0, SEGMENT_BYTES] {
        let path = segment_path(tmp.path(), base);
        let bytes = image.durable_bytes(&path).unwrap();
        let (recs, _) = walk(&bytes);
        assert_eq!(
            recs.last().unwrap().2,
            RecordKind::SegmentEnd,
            "segment {base} is full"
        );
        // The first record, one in the middle, the last message, and the SegmentEnd.
        let picks = [0, recs.len() / 2, recs.len() - 2, recs.len() - 1];
        for &ri in &picks {
            let (pos, len, kind) = recs[ri];
            // Bytes in the length, CRC, kind, log offset, and the last byte of the record.
            for at in [0, 5, 9, 17, len - 1] {
                let mut damaged = bytes.clone();
                damaged[(pos + at) as usize] ^= 0x10;
                let d = copy_of(&image);
                d.put_bytes(&path, damaged);
                assert_corrupt_at(
                    try_open(&d, &cfg),
                    &path,
                    pos,
                    &format!("segment {base}, {kind:?} record at {pos}, byte {at} flipped"),
                );
                // Open changed nothing on disk.
                let mut damaged = bytes.clone();
                damaged[(pos + at) as usize] ^= 0x10;
                assert!(d.durable_bytes(&path).unwrap() == damaged);
            }
        }
    }
    // The undamaged image opens with everything in it.
    let b = open(&copy_of(&image), &cfg);
    assert_eq!(b.recovery_report().torn_bytes_cut, 0);
    assert_holds(&b, "old", &sent, "undamaged image");
}

/// Test 3b: After a clean close, recovery does not re-read older segments (the checkpoint is at the
/// end of the log; only the newest segment is re-read); damage there is reported when the record
/// is read, as `Error::Damaged` naming the file and offset, and is never skipped or returned as
/// data.
#[test]
fn flipped_bit_in_an_older_segment_after_a_clean_close_fails_the_read() {
    let (tmp, cfg, disk, b) = fresh("old", 1);
    let sent: Vec<Sent> = (0..100)
        .map(|i| send(&b, "old", "k", &body(&format!("m{i}-"), 900)))
        .collect();
    b.close().unwrap();
    release_last(b);
    let image = copy_of(&disk);
    let victim = &sent[10];
    assert!(victim.log_offset < SEGMENT_BYTES && sent.last().unwrap().log_offset > SEGMENT_BYTES);
    let path = segment_path(tmp.path(), 0);
    let mut bytes = image.durable_bytes(&path).unwrap();
    bytes[victim.log_offset as usize + 60] ^= 0x01;
    let d = copy_of(&image);
    d.put_bytes(&path, bytes);
    let b = open(&d, &cfg);
    assert_eq!(b.recovery_report().records_scanned, 0);
    // The ten messages before it are delivered; then the damaged one stops the poll.
    let got = b.poll("g", "old", 10).unwrap();
    assert_eq!(got.len(), 10);
    match b.poll("g", "old", 10) {
        Err(Error::Damaged {
            path: p, offset, ..
        }) => {
            assert_eq!((p, offset), (path, victim.log_offset))
        }
        other => panic!("expected Error::Damaged, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Segment roll-over
// ---------------------------------------------------------------------------------------------

/// Test 4: Many segments: each full one ends in a SegmentEnd record right after its last message,
/// the number of files is what the receipts say, and every message survives a clean reopen and a
/// crash.
#[test]
fn roll_over_across_many_segments_survives_reopen_and_crash() {
    let (tmp, cfg, disk, b) = fresh("roll", 4);
    let dir = tmp.path();
    let mut sent: Vec<Sent> = (0..420)
        .map(|i| {
            // Sizes vary so that segments end at different distances from their end.
            let len = 200 + (i * 397) % 1400;
            send(
                &b,
                "roll",
                &format!("key-{}", i % 7),
                &body(&format!("m{i}-"), len),
            )
        })
        .collect();
    let segments = |sent: &[Sent]| (sent.last().unwrap().log_offset / SEGMENT_BYTES + 1) as usize;
    let n_segments = segments(&sent);
    assert!(n_segments >= 6, "{n_segments} segments");
    assert_eq!(log_files(&disk, dir).len(), n_segments);
    b.close().unwrap();
    release_last(b);

    // The layout on disk: every message where its receipt says, SegmentEnd after the last
    // message of every full segment, zeros after the last record of the newest.
    let image = copy_of(&disk);
    for k in 0..n_segments as u64 {
        let base = k * SEGMENT_BYTES;
        let bytes = image.durable_bytes(&segment_path(dir, base)).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES);
        let (recs, end) = walk(&bytes);
        let want: Vec<u64> = sent
            .iter()
            .filter(|s| s.log_offset / SEGMENT_BYTES == k)
            .map(|s| s.log_offset - base)
            .collect();
        let messages: Vec<u64> = recs
            .iter()
            .filter(|r| r.2 == RecordKind::Message)
            .map(|r| r.0)
            .collect();
        assert_eq!(messages, want, "messages of segment {base}");
        let newest = k + 1 == n_segments as u64;
        assert_eq!(
            recs.last().unwrap().2 == RecordKind::SegmentEnd,
            !newest,
            "segment {base}"
        );
        assert!(
            bytes[end as usize..].iter().all(|&x| x == 0),
            "segment {base}"
        );
        if !newest {
            // It was closed because the next message did not fit.
            let next = sent
                .iter()
                .find(|s| s.log_offset >= base + SEGMENT_BYTES)
                .unwrap();
            let need = record_bytes("roll", &next.key, &next.body) + record::HEADER_BYTES as u64;
            let end_of_messages = end - record::HEADER_BYTES as u64;
            assert!(end_of_messages + need > SEGMENT_BYTES, "segment {base}");
        }
    }

    let b = open(&copy_of(&image), &cfg);
    let r = b.recovery_report().clone();
    assert_eq!(r.segments, n_segments);
    assert_eq!((r.records_scanned, r.torn_bytes_cut), (0, 0), "{r:?}");
    assert_holds(&b, "roll", &sent, "after a clean reopen");
    release_last(b);

    // Continue on a copy, then lose power right after the last acknowledged send.
    let disk = copy_of(&image);
    let b = open(&disk, &cfg);
    for i in 420..700 {
        let len = 200 + (i * 397) % 1400;
        sent.push(send(
            &b,
            "roll",
            &format!("key-{}", i % 7),
            &body(&format!("m{i}-"), len),
        ));
    }
    let n_segments = segments(&sent);
    let after = crash(&disk, b, CrashMode::DropUnsynced);
    assert_eq!(log_files(&after, dir).len(), n_segments);
    let b = open(&after, &cfg);
    let r = b.recovery_report().clone();
    assert_eq!(r.segments, n_segments, "{r:?}");
    assert_eq!(r.torn_bytes_cut, 0, "{r:?}");
    assert_holds(&b, "roll", &sent, "after a crash");
}

/// Test 4b: A roll-over creates the next segment file and writes its header before the flusher
/// has written and synced the SegmentEnd of the full one (so that a full disk changes nothing).
/// Power can fail in between with the new header already on disk (written back early, or the
/// fsync of the full segment failed). The full segment then ends in zeros instead of a
/// SegmentEnd and the newest segment holds no record: a torn tail of unacknowledged data (the
/// SegmentEnd and the message that did not fit). The store must open with every acknowledged
/// message. (Open failed with `Error::Corrupt` before commit d195ecd.)
#[test]
fn crash_between_roll_over_and_sealing_the_full_segment_is_a_torn_tail() {
    let (tmp, cfg, disk, b) = fresh("roll", 1);
    let dir = tmp.path();
    let msg = body("m-", 1000);
    let size = record_bytes("roll", "k", &msg);
    let mut sent = Vec::new();
    // Fill the first segment up to the message that will not fit.
    loop {
        let end = sent
            .last()
            .map_or(SEGMENT_HEADER_BYTES, |s: &Sent| s.log_offset + size);
        // Each send is one group commit: a mark, then the message.
        if end + record::MARK_BYTES as u64 + size + record::HEADER_BYTES as u64 > SEGMENT_BYTES {
            break;
        }
        sent.push(send(&b, "roll", "k", &msg));
    }
    // The next send rolls over; the fsync that seals the full segment fails, so the
    // SegmentEnd never becomes durable, while the new segment's header write is still
    // pending and may reach the disk.
    disk.set_faults(Faults {
        fail_syncs: 1,
        ..Faults::default()
    });
    let failed = b.send("roll", &Message::new(msg.clone()).with_key("k"));
    assert!(matches!(failed, Err(Error::Poisoned(_))), "{failed:?}");
    let old = segment_path(dir, 0);
    let new = segment_path(dir, SEGMENT_BYTES);
    // Find a power loss that kept the new header (the unsynced writes that survive are
    // chosen by the seed).
    let after = (0..64)
        .map(|seed| disk.crash(CrashMode::KeepRandomPrefix { seed }))
        .find(|d| {
            d.durable_bytes(&new)
                .is_some_and(|h| h.len() as u64 == SEGMENT_BYTES && h[..8] == *b"HALFMQLG")
        })
        .expect("a seed that keeps the new segment's header");
    release_last(b);
    let old_bytes = after.durable_bytes(&old).unwrap();
    let (recs, end) = walk(&old_bytes);
    assert_eq!(
        recs.len(),
        sent.len(),
        "every acknowledged record, no SegmentEnd"
    );
    assert!(old_bytes[end as usize..].iter().all(|&x| x == 0));
    assert!(after.durable_bytes(&new).unwrap()[32..]
        .iter()
        .all(|&x| x == 0));

    let b = try_open(&after, &cfg)
        .unwrap_or_else(|e| panic!("open after a crash in the middle of a roll-over: {e}"));
    assert_holds(&b, "roll", &sent, "after a crash during roll-over");
    let next = send(&b, "roll", "k", &msg);
    sent.push(next);
    assert_holds(&b, "roll", &sent, "after a crash during roll-over");
}

// ---------------------------------------------------------------------------------------------
// 5. Many topics and queues
// ---------------------------------------------------------------------------------------------

/// Test 5: Twenty topics of 4 to 8 queues, written concurrently (one thread per topic) with keys:
/// after a clean reopen and after a crash, every queue holds its messages in send order.
#[test]
fn many_topics_and_queues_keep_per_key_order_across_reopen_and_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let disk = SimStorage::new();
    let b = open(&disk, &cfg);
    let topics: Vec<(String, u32)> = (0..20)
        .map(|t| (format!("topic-{t:02}"), 4 + t % 5))
        .collect();
    for (t, q) in &topics {
        b.create_topic(t, *q).unwrap();
    }
    let send_round = |b: &Arc<Broker>, round: usize| -> Vec<Sent> {
        let handles: Vec<_> = topics
            .iter()
            .map(|(t, _)| {
                let b = b.clone();
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .map(|i| {
                            let key = format!("{t}-key-{}", i % 11);
                            send(
                                &b,
                                &t,
                                &key,
                                &body(&format!("{t}-r{round}-m{i}-"), 40 + i * 7),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    };
    let mut sent = send_round(&b, 0);
    let check = |b: &Broker, sent: &[Sent], what: &str| {
        for (t, queues) in &topics {
            assert_holds(b, t, sent, what);
            // Keys stay in their queue, in send order.
            let got = read_all(b, t);
            assert!(got.keys().all(|q| q < queues), "{what}: {t}");
            for k in 0..11 {
                let key = format!("{t}-key-{k}");
                let bodies: Vec<&Vec<u8>> = got
                    .values()
                    .flatten()
                    .filter(|m| m.1 == key)
                    .map(|m| &m.2)
                    .collect();
                let want: Vec<&Vec<u8>> = sent
                    .iter()
                    .filter(|s| s.key == key)
                    .map(|s| &s.body)
                    .collect();
                assert_eq!(bodies, want, "{what}: order of key {key}");
            }
        }
    };
    check(&b, &sent, "before reopen");
    b.close().unwrap();
    release_last(b);

    let b = open(&disk, &cfg);
    assert_eq!(b.recovery_report().records_scanned, 0);
    check(&b, &sent, "after a clean reopen");
    sent.extend(send_round(&b, 1));
    let after = crash(&disk, b, CrashMode::DropUnsynced);
    let b = open(&after, &cfg);
    assert_eq!(b.recovery_report().torn_bytes_cut, 0);
    check(&b, &sent, "after a crash");
}

// ---------------------------------------------------------------------------------------------
// 6. Empty stores
// ---------------------------------------------------------------------------------------------

fn empty_store_cycles(storage: Arc<dyn Storage>, cfg: &BrokerConfig) {
    for cycle in 0..3 {
        let b = Broker::open_with(storage.clone(), cfg.clone()).unwrap();
        let r = b.recovery_report().clone();
        assert_eq!(
            (
                r.segments,
                r.log_end,
                r.records_scanned,
                r.torn_bytes_cut,
                r.full_rebuild
            ),
            (1, SEGMENT_HEADER_BYTES, 0, 0, false),
            "cycle {cycle}: {r:?}"
        );
        if cycle > 0 {
            assert_eq!(r.scanned_from, SEGMENT_HEADER_BYTES, "cycle {cycle}");
        }
        assert!(b.store().queues().is_empty());
        assert!(b.topics().is_empty());
        assert_eq!(b.store().log_stats().durable_offset, SEGMENT_HEADER_BYTES);
        b.close().unwrap();
    }
    // A store reopened several times keeps what it was given, however often it is reopened.
    let b = Broker::open_with(storage.clone(), cfg.clone()).unwrap();
    b.create_topic("late", 2).unwrap();
    let sent: Vec<Sent> = (0..25)
        .map(|i| {
            send(
                &b,
                "late",
                &format!("k{}", i % 3),
                format!("m{i}").as_bytes(),
            )
        })
        .collect();
    b.close().unwrap();
    release_last(b);
    for cycle in 0..3 {
        let b = Broker::open_with(storage.clone(), cfg.clone()).unwrap();
        let r = b.recovery_report().clone();
        let end = sent.last().unwrap().log_offset + record_bytes("late", "k0", b"m24");
        assert_eq!(
            (r.log_end, r.records_scanned, r.torn_bytes_cut),
            (end, 0, 0)
        );
        assert_holds(&b, "late", &sent, &format!("reopen {cycle}"));
        b.close().unwrap();
    }
}

/// Test 6: Open and close an empty store three times, on the simulated disk and on real files: no
/// records, no errors, no files piling up; then the same store keeps its messages over repeated
/// reopens.
#[test]
fn empty_store_reopens_cleanly_and_keeps_later_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SimStorage::new();
    empty_store_cycles(Arc::new(disk.clone()), &config(tmp.path()));
    let dir = tmp.path();
    let mut files = disk.files();
    // Consume queues and the key index are derived files, not counted here.
    files.retain(|p| !p.starts_with(dir.join("cq")) && !p.starts_with(dir.join("index")));
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names.len(),
        3,
        "one segment and the newest two checkpoints: {names:?}"
    );
    assert!(names[0].starts_with("checkpoint.") && names[1].starts_with("checkpoint."));
    assert_eq!(names[2], format!("log/{}", segment::file_name(0)));

    let tmp = tempfile::tempdir().unwrap();
    empty_store_cycles(Arc::new(FsStorage), &config(tmp.path()));

    // An empty store that loses power right after it was created opens again, empty.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let mut disk = SimStorage::new();
    for round in 0..3 {
        let b = open(&disk, &cfg);
        disk = crash(&disk, b, CrashMode::DropUnsynced);
        let b = open(&disk, &cfg);
        let r = b.recovery_report().clone();
        assert_eq!(
            (r.segments, r.log_end, r.records_scanned),
            (1, 32, 0),
            "{round}: {r:?}"
        );
        disk = crash(&disk, b, CrashMode::DropUnsynced);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Idempotent recovery
// ---------------------------------------------------------------------------------------------

/// The durable state that recovery derives: every log and index file byte for byte, the
/// newest checkpoint without its sequence number, and what a consumer reads.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    files: BTreeMap<PathBuf, Vec<u8>>,
    checkpoint: Option<Checkpoint>,
}

fn snapshot(disk: &SimStorage, dir: &Path) -> Snapshot {
    let files = disk
        .files()
        .into_iter()
        .filter(|p| p.starts_with(dir.join("log")) || p.starts_with(dir.join("cq")))
        .map(|p| {
            let bytes = disk.durable_bytes(&p).unwrap();
            (p, bytes)
        })
        .collect();
    let checkpoint = checkpoint::load(disk, dir).unwrap().map(|mut c| {
        c.seq = 0;
        c.queues.sort();
        c
    });
    Snapshot { files, checkpoint }
}

/// Test 7: After a torn tail, recovering, crashing, and recovering again leaves exactly the same
/// files and messages as the first recovery; recovering two copies of the same damaged image gives
/// the same result; and a recovery interrupted by a failed fsync and a crash is simply done again.
#[test]
fn recovery_is_idempotent() {
    let (tmp, cfg, disk, b) = fresh("idem", 3);
    let dir = tmp.path();
    let mut sent: Vec<Sent> = send_many(&b, "idem", 0..140, 5, 700);
    let image = crash(&disk, b, CrashMode::DropUnsynced);
    // Tear the last record in its middle, in the second segment.
    let last = sent.pop().unwrap();
    let base = last.log_offset / SEGMENT_BYTES * SEGMENT_BYTES;
    assert!(base > 0);
    let path = segment_path(dir, base);
    let mut bytes = image.durable_bytes(&path).unwrap();
    let pos = (last.log_offset - base) as usize;
    let len = total_len_at(&bytes, last.log_offset - base) as usize;
    bytes[pos + len / 2..pos + len].fill(0);
    image.put_bytes(&path, bytes);

    let d1 = copy_of(&image);
    let b = open(&d1, &cfg);
    assert_eq!(b.recovery_report().torn_bytes_cut, (len / 2) as u64);
    let read1 = read_all(&b, "idem");
    assert_eq!(read1, expected(&sent, "idem"));
    let d2 = crash(&d1, b, CrashMode::DropUnsynced);
    let first = snapshot(&d2, dir);

    let b = open(&d2, &cfg);
    let r = b.recovery_report().clone();
    assert_eq!((r.torn_bytes_cut, r.full_rebuild), (0, false), "{r:?}");
    assert_eq!(read_all(&b, "idem"), read1);
    let d3 = crash(&d2, b, CrashMode::DropUnsynced);
    assert_eq!(
        snapshot(&d3, dir),
        first,
        "second recovery changed the state"
    );

    // The same damaged image recovered on its own copy comes out the same.
    let other = copy_of(&image);
    let b = open(&other, &cfg);
    let again = crash(&other, b, CrashMode::DropUnsynced);
    assert_eq!(
        snapshot(&again, dir),
        first,
        "recovery is not deterministic"
    );

    // Recovery's first fsync fails (cutting the tail), then power is lost: what is left
    // recovers to the same state.
    for mode in [
        CrashMode::DropUnsynced,
        CrashMode::KeepRandomPrefix { seed: 1 },
        CrashMode::KeepRandomPrefix { seed: 2 },
    ] {
        let d = copy_of(&image);
        d.set_faults(Faults {
            fail_syncs: 1,
            ..Faults::default()
        });
        assert!(try_open(&d, &cfg).is_err(), "the failed fsync fails open");
        let d = d.crash(mode);
        let b = open(&d, &cfg);
        assert_eq!(read_all(&b, "idem"), read1, "{mode:?}");
        let after = crash(&d, b, CrashMode::DropUnsynced);
        assert_eq!(snapshot(&after, dir), first, "{mode:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Missing or short consume-queue indexes
// ---------------------------------------------------------------------------------------------

/// Test 8: An index file deleted or cut short (whole entries, in the middle of an entry, down to
/// its header or to nothing) is rebuilt from the log: the report says so, every message is
/// readable, and the rebuilt file is byte for byte the one that was lost.
#[test]
fn missing_or_short_index_is_rebuilt_from_the_log() {
    let (tmp, cfg, disk, b) = fresh("idx", 4);
    let dir = tmp.path();
    b.create_topic("other", 2).unwrap();
    let mut sent: Vec<Sent> = Vec::new();
    for i in 0..150 {
        sent.push(send(
            &b,
            "idx",
            &format!("k{}", i % 9),
            &body(&format!("m{i}-"), 600),
        ));
        sent.push(send(
            &b,
            "other",
            &format!("o{}", i % 2),
            format!("o{i}").as_bytes(),
        ));
    }
    b.close().unwrap();
    release_last(b);
    let image = copy_of(&disk);
    let q1 = cq_path(dir, "idx", 1);
    let original = image.durable_bytes(&q1).unwrap();
    // The file may be preallocated past its entries (zeros); `used` is the part with data.
    let n = sent
        .iter()
        .filter(|s| s.topic == "idx" && s.queue == 1)
        .count() as u64;
    assert!(n > 10);
    let entry = ENTRY_BYTES as u64;
    let used = (CQ_HEADER_BYTES + n * entry) as usize;
    assert!(original.len() >= used);
    assert!(original[used - ENTRY_BYTES..used].iter().any(|&x| x != 0));
    assert!(original[used..].iter().all(|&x| x == 0));
    enum Damage {
        Delete,
        /// Keep only this many bytes.
        Truncate(u64),
        /// Zero this many entries at the end, in place (the file keeps its length, as a
        /// preallocated index whose last writes were lost would).
        ZeroLast(u64),
    }
    let cases = [
        ("deleted", Damage::Delete),
        ("empty", Damage::Truncate(0)),
        ("header only", Damage::Truncate(CQ_HEADER_BYTES)),
        (
            "three entries",
            Damage::Truncate(CQ_HEADER_BYTES + 3 * entry),
        ),
        (
            "cut inside an entry",
            Damage::Truncate(CQ_HEADER_BYTES + 5 * entry + 7),
        ),
        ("one entry short", Damage::Truncate(used as u64 - entry)),
        ("last entry zeroed", Damage::ZeroLast(1)),
        ("last four entries zeroed", Damage::ZeroLast(4)),
    ];
    for (what, damage) in cases {
        let d = copy_of(&image);
        match damage {
            Damage::Delete => d.remove_file(&q1).unwrap(),
            Damage::Truncate(keep) => d.put_bytes(&q1, original[..keep as usize].to_vec()),
            Damage::ZeroLast(k) => {
                let mut bytes = original.clone();
                bytes[used - (k * entry) as usize..used].fill(0);
                d.put_bytes(&q1, bytes);
            }
        }
        let b = open(&d, &cfg);
        let r = b.recovery_report().clone();
        assert!(r.full_rebuild, "{what}: {r:?}");
        assert_eq!(r.scanned_from, SEGMENT_HEADER_BYTES, "{what}: {r:?}");
        assert_eq!(r.torn_bytes_cut, 0, "{what}");
        let rebuilt = d.durable_bytes(&q1).unwrap();
        assert!(
            rebuilt.len() >= used && rebuilt[..used] == original[..used],
            "{what}: rebuilt index differs"
        );
        assert!(rebuilt[used..].iter().all(|&x| x == 0), "{what}");
        assert_holds(&b, "idx", &sent, what);
        assert_holds(&b, "other", &sent, what);
        // And the store goes on from there.
        let next = send(&b, "idx", "k1", b"after rebuild");
        let mut all = sent.clone();
        all.push(next);
        assert_holds(&b, "idx", &all, what);
        release_last(b);
    }
    // Every index of a topic gone at once.
    let d = copy_of(&image);
    for q in 0..4 {
        d.remove_file(&cq_path(dir, "idx", q)).unwrap();
    }
    let b = open(&d, &cfg);
    assert!(b.recovery_report().full_rebuild);
    assert_holds(&b, "idx", &sent, "all indexes of idx deleted");
    assert_holds(&b, "other", &sent, "all indexes of idx deleted");
}

/// Test 8b: An index cut inside its 16-byte header is short too, and should be rebuilt like the
/// others instead of stopping open: it is derived data and the log is intact.
#[test]
fn index_cut_inside_its_header_is_rebuilt() {
    let (tmp, cfg, disk, b) = fresh("idx", 2);
    let dir = tmp.path();
    let sent: Vec<Sent> = (0..20)
        .map(|i| send(&b, "idx", &format!("k{i}"), format!("m{i}").as_bytes()))
        .collect();
    b.close().unwrap();
    release_last(b);
    let image = copy_of(&disk);
    let q0 = cq_path(dir, "idx", 0);
    let original = image.durable_bytes(&q0).unwrap();
    let in_q0 = sent.iter().filter(|s| s.queue == 0).count();
    assert!(in_q0 > 0);
    // Header and entries; a preallocated file has zeros after them.
    let used = CQ_HEADER_BYTES as usize + in_q0 * ENTRY_BYTES;
    for keep in [4usize, 8, 12] {
        let d = copy_of(&image);
        d.put_bytes(&q0, original[..keep].to_vec());
        let b = try_open(&d, &cfg).unwrap_or_else(|e| panic!("index cut to {keep} bytes: {e}"));
        assert!(b.recovery_report().full_rebuild);
        let rebuilt = d.durable_bytes(&q0).unwrap();
        assert!(rebuilt.len() >= used && rebuilt[..used] == original[..used]);
        assert_holds(&b, "idx", &sent, &format!("index cut to {keep} bytes"));
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Damage too long to be a torn tail
// ---------------------------------------------------------------------------------------------

/// Test 9: In the newest segment, a damaged record followed by more valid data than an unclean stop
/// can leave unsynced (2 × (pending_bytes_max + record_bytes_max)) is corruption: open fails naming
/// the record. One record later, where the damage just fits, it is a torn tail.
#[test]
fn damage_longer_than_a_torn_tail_in_the_newest_segment_fails_open() {
    let tune = tail_limits(4 * 1024 * 1024, 64 * 1024, 16 * 1024);
    let (tmp, cfg, disk, b) = fresh_tuned(tune, "long", 2);
    let dir = tmp.path();
    let limit = 2 * (64 * 1024 + 16 * 1024);
    let sent: Vec<Sent> = send_many(&b, "long", 0..400, 3, 1000);
    let image = crash(&disk, b, CrashMode::DropUnsynced);
    let path = segment_path(dir, 0);
    let bytes = image.durable_bytes(&path).unwrap();
    let last = sent.last().unwrap();
    let end = last.log_offset + record_bytes("long", &last.key, &last.body);
    assert!(end - sent[0].log_offset > limit + 10_000);
    // The first record whose damage would still fit a torn tail.
    let fits = sent
        .iter()
        .position(|s| end - s.log_offset <= limit)
        .unwrap();
    assert!(fits > 100);

    let damage = |i: usize| {
        let mut d = bytes.clone();
        d[sent[i].log_offset as usize + 70] ^= 0x04;
        let disk = copy_of(&image);
        disk.put_bytes(&path, d.clone());
        (disk, d)
    };
    for i in [0, 1, fits / 2, fits - 1] {
        let (d, damaged) = damage(i);
        assert_corrupt_at(
            try_open(&d, &cfg),
            &path,
            sent[i].log_offset,
            &format!(
                "record {i} damaged, {} bytes from the end",
                end - sent[i].log_offset
            ),
        );
        assert!(
            d.durable_bytes(&path).unwrap() == damaged,
            "nothing was cut"
        );
    }
    // Just inside the limit it is still damage to acknowledged data: the marks of the later
    // group commits say it was durable. (Before batches carried marks, this was cut as a
    // torn tail, losing acknowledged messages.)
    let (d, damaged) = damage(fits);
    assert!(
        matches!(try_open(&d, &cfg), Err(Error::Damaged { offset, .. }) if offset == sent[fits].log_offset)
    );
    assert!(
        d.durable_bytes(&path).unwrap() == damaged,
        "nothing was cut"
    );
    // The last record has no mark after it that covers it: a torn tail, cut.
    let n = sent.len() - 1;
    let (d, _) = damage(n);
    let b = open(&d, &cfg);
    assert_eq!(b.recovery_report().torn_bytes_cut, end - sent[n].log_offset);
    assert_holds(&b, "long", &sent[..n], "damage in the last batch");
}

/// Test 9b: The same rule holds when the damage is in the first record of the newest of several
/// segments: a flipped bit there, followed by more acknowledged data than a torn tail can be,
/// is corruption, and the segment must not be taken for one whose creation never finished
/// (whose first record never became durable) and deleted with everything in it. After a crash
/// recovery reads that segment, so open fails; after a clean close it does not re-read it, so
/// open succeeds and the read reports the damage. Either way the data stays on disk.
#[test]
fn damaged_first_record_of_a_newest_segment_full_of_data_is_corruption() {
    for clean_close in [false, true] {
        let tune = tail_limits(256 * 1024, 16 * 1024, 4 * 1024);
        let (tmp, cfg, disk, b) = fresh_tuned(tune, "first", 2);
        let dir = tmp.path();
        let limit = 2 * (16 * 1024 + 4 * 1024);
        let sent: Vec<Sent> = send_many(&b, "first", 0..360, 3, 1000);
        let image = if clean_close {
            b.close().unwrap();
            release_last(b);
            copy_of(&disk)
        } else {
            crash(&disk, b, CrashMode::DropUnsynced)
        };
        let what = if clean_close {
            "after a clean close"
        } else {
            "after a crash"
        };
        let newest = segment_path(dir, cfg.store.segment_bytes);
        let last = sent.last().unwrap();
        let end = last.log_offset + record_bytes("first", &last.key, &last.body);
        let first = sent
            .iter()
            .find(|s| s.log_offset >= cfg.store.segment_bytes)
            .unwrap();
        // The new segment starts with the mark of the batch that rolled over.
        assert_eq!(
            first.log_offset,
            cfg.store.segment_bytes + SEGMENT_HEADER_BYTES + record::MARK_BYTES as u64
        );
        let first_pos = first.log_offset - cfg.store.segment_bytes;
        assert!(
            end - first.log_offset > limit + 10_000,
            "more than a torn tail after it"
        );
        assert_eq!(log_files(&image, dir).len(), 2);

        let mut bytes = image.durable_bytes(&newest).unwrap();
        bytes[first_pos as usize + 70] ^= 0x04;
        let d = copy_of(&image);
        d.put_bytes(&newest, bytes.clone());
        let opened = try_open(&d, &cfg);
        let data_kept = d.durable_bytes(&newest).as_ref() == Some(&bytes);
        let result = match opened {
            Err(e) => Err(e),
            Ok(b) if !data_kept => {
                let got: usize = read_all(&b, "first").values().map(Vec::len).sum();
                panic!(
                    "{what}: open succeeded ({:?}) and deleted the newest segment's data: {got} of \
                     {} acknowledged messages readable",
                    b.recovery_report(),
                    sent.len()
                );
            }
            Ok(b) => {
                assert!(
                    clean_close,
                    "{what}: open succeeded ({:?})",
                    b.recovery_report()
                );
                b.poll("g", "first", 10_000).map(|_| b)
            }
        };
        assert_corrupt_at(result, &newest, first_pos, what);
        assert!(
            d.durable_bytes(&newest) == Some(bytes),
            "{what}: nothing was cut or removed"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Crashes in the middle of concurrent sends
// ---------------------------------------------------------------------------------------------

const WRITERS: usize = 4;

/// What one writer thread tried and what it was told.
struct WriterLog {
    key: String,
    /// Bodies in the order they were sent; the last one may have failed.
    attempted: Vec<Vec<u8>>,
    /// Receipts of the sends that returned Ok (a prefix of `attempted`).
    acked: Vec<Sent>,
}

/// Several threads send until the disk loses power (random prefix of unsynced writes kept,
/// seeded); then every acknowledged message must be there, and what is there must be, per
/// writer, exactly a prefix of what it sent: nothing garbled, nothing reordered, no gaps.
fn burst_and_crash(seed: u64, cfg: &BrokerConfig) {
    let disk = SimStorage::new();
    let b = open(&disk, cfg);
    b.create_topic("burst", 4).unwrap();
    let acked = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let b = b.clone();
            let acked = acked.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed * 100 + w as u64);
                let key = format!("writer-{w}");
                let mut log = WriterLog {
                    key: key.clone(),
                    attempted: Vec::new(),
                    acked: Vec::new(),
                };
                for i in 0..100_000 {
                    let mut body = format!("s{seed}-w{w}-m{i}-").into_bytes();
                    let len = body.len() + rng.usize(0..2500);
                    while body.len() < len {
                        body.push(rng.u8(1..=255));
                    }
                    log.attempted.push(body.clone());
                    match b.send("burst", &Message::new(body.clone()).with_key(&key)) {
                        Ok(r) => {
                            log.acked.push(Sent {
                                topic: r.topic,
                                queue: r.queue,
                                offset: r.offset,
                                log_offset: r.log_offset,
                                key: key.clone(),
                                body,
                            });
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
                log
            })
        })
        .collect();
    let target = 40 + (seed as usize * 37) % 160;
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "seed {seed}: sends stalled");
        std::thread::yield_now();
    }
    let after = disk.crash(CrashMode::KeepRandomPrefix { seed });
    let logs: Vec<WriterLog> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    release_last(b);

    let b = try_open(&after, cfg).unwrap_or_else(|e| panic!("seed {seed}: reopen failed: {e}"));
    let got = read_all(&b, "burst");
    // Queue offsets are dense from 0 in every queue.
    for (q, msgs) in &got {
        let offsets: Vec<u64> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            offsets,
            (0..msgs.len() as u64).collect::<Vec<_>>(),
            "seed {seed}, queue {q}"
        );
    }
    let mut present_total = 0;
    for log in &logs {
        let present: Vec<&Seen> = got.values().flatten().filter(|m| m.1 == log.key).collect();
        present_total += present.len();
        assert!(
            present.len() >= log.acked.len(),
            "seed {seed}: {} lost acknowledged messages ({} present, {} acknowledged)",
            log.key,
            present.len(),
            log.acked.len()
        );
        assert!(
            present.len() <= log.attempted.len(),
            "seed {seed}: {}",
            log.key
        );
        for (i, m) in present.iter().enumerate() {
            assert!(
                m.2 == log.attempted[i],
                "seed {seed}: {} message {i} differs",
                log.key
            );
        }
        for (a, m) in log.acked.iter().zip(&present) {
            assert_eq!(
                (a.offset, &a.body),
                (m.0, &m.2),
                "seed {seed}: receipt of {}",
                log.key
            );
        }
    }
    assert_eq!(
        present_total,
        got.values().map(Vec::len).sum::<usize>(),
        "seed {seed}: messages of no writer"
    );
    // The recovered store takes new messages after what survived.
    let next = send(&b, "burst", "writer-0", b"after the crash");
    let q = got.get(&next.queue).map_or(0, Vec::len) as u64;
    assert_eq!(next.offset, q, "seed {seed}");
}

/// Test 10: Fifty seeded power losses in the middle of concurrent sends within one segment: every
/// acknowledged send survives, and what survives is exactly what was sent, in order.
#[test]
fn random_prefix_crashes_during_concurrent_sends_lose_nothing_acknowledged() {
    for seed in 0..50 {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.store.segment_bytes = 16 * 1024 * 1024;
        // Checkpoints (index syncs) happen during the burst too.
        cfg.store.checkpoint_bytes = 48 * 1024;
        burst_and_crash(seed, &cfg);
    }
}

/// Test 10b: The same with 64 KiB segments, so that crashes also hit segment roll-overs (this
/// failed now and then, on the bug of test 4b, before commit d195ecd).
#[test]
fn random_prefix_crashes_during_concurrent_sends_across_roll_overs() {
    for seed in 0..50 {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.store.checkpoint_bytes = 48 * 1024;
        burst_and_crash(seed, &cfg);
    }
}

/// Files in the log directory of a real data directory that hold no segment yet: an all-zero
/// header (the next segment, zero-filled ahead of the roll by the preparer thread).
fn blank_segment_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("log")).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let head = &bytes[..bytes.len().min(SEGMENT_HEADER_BYTES as usize)];
        if head.iter().all(|&b| b == 0) {
            out.push((p, bytes.len() as u64));
        }
    }
    out
}

/// On real files, with small group commits, the segment after the active one is zero-filled
/// ahead by a background thread: rolls adopt it (at most one such file exists at a time), every message survives
/// reopen, a clean close removes the unused one, and one left behind by a crash (a blank
/// newest segment) is removed by recovery and prepared again.
#[test]
fn segments_prepared_ahead_on_real_files_are_adopted_and_never_hold_data() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let b = Broker::open(cfg.clone()).unwrap();
    b.create_topic("t", 2).unwrap();
    let wait_prepared = |what: &str| {
        let prepared = format!("{what}: a segment prepared");
        poll_until(
            Duration::from_millis(2),
            Duration::from_secs(20),
            &prepared,
            || {
                let blank = blank_segment_files(tmp.path());
                assert!(blank.len() <= 1, "{what}: {blank:?}");
                (blank.len() == 1 && blank[0].1 == SEGMENT_BYTES).then(|| blank[0].0.clone())
            },
        )
    };
    let send_kb = |key: String, tag: String| send(&b, "t", &key, &body(&tag, 1000));
    let mut sent = Vec::new();
    // The segment after the active one is prepared at open; after a roll, when the group
    // commits that filled the segment were small (here one record each).
    for i in 0..70 {
        sent.push(send_kb(format!("first-{i}"), format!("f{i}")));
    }
    for round in 0..5 {
        let prepared = wait_prepared(&format!("round {round}"));
        let segments_before = b.store().log_stats().segments;
        // 70 records of ~1 KiB: past the end of a 64 KiB segment.
        for i in 0..70 {
            sent.push(send_kb(format!("k{round}-{i}"), format!("r{round}-{i}")));
        }
        assert!(b.store().log_stats().segments > segments_before);
        // The prepared file is a segment now: it has a header.
        let head = std::fs::read(&prepared).unwrap();
        assert!(head[..SEGMENT_HEADER_BYTES as usize]
            .iter()
            .any(|&x| x != 0));
    }
    assert_holds(&b, "t", &sent, "after rolls onto prepared segments");
    wait_prepared("before close");
    release_last(b);
    assert!(
        blank_segment_files(tmp.path()).is_empty(),
        "a clean close removes it"
    );

    // What a crash leaves: the next segment, zero-filled, no header.
    let b = Broker::open(cfg.clone()).unwrap();
    assert_holds(&b, "t", &sent, "after reopen");
    let stats = b.store().log_stats();
    release_last(b);
    let last_base = (stats.log_bytes / SEGMENT_BYTES - 1) * SEGMENT_BYTES;
    let next = segment_path(tmp.path(), last_base + SEGMENT_BYTES);
    std::fs::write(&next, vec![0u8; SEGMENT_BYTES as usize]).unwrap();
    let b = Broker::open(cfg.clone()).unwrap();
    assert_holds(&b, "t", &sent, "after a crash left a prepared segment");
    for i in 0..140 {
        sent.push(send(
            &b,
            "t",
            &format!("after-{i}"),
            &body(&format!("a{i}"), 1000),
        ));
    }
    release_last(b);
    let b = Broker::open(cfg).unwrap();
    assert_holds(&b, "t", &sent, "after rolls past it");
    release_last(b);
}
