//! Damage at rest after a clean close, found by the store: in the newest segment below the
//! checkpoint on open (`recovery`), in an older segment when a read reaches it, and in a
//! consume-queue file when a read goes through it (`reindex`, which rebuilds the entries).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::consume_queue::{self, ConsumeQueue, ENTRY_BYTES};
use crate::io::FsStorage;
use crate::record::RecordKind;
use crate::{repair, Append, Store, StoreConfig};
use halfmq_types::error::Error;

const TOPIC: &str = "t";
const QUEUES: u32 = 2;

fn config() -> StoreConfig {
    StoreConfig::default()
        .with_segment_bytes(64 * 1024)
        .with_record_bytes_max(4096)
}

fn open(dir: &Path) -> halfmq_types::error::Result<Store> {
    Store::open(Arc::new(FsStorage), dir, config(), &mut |_| {}).map(|(s, _)| s)
}

fn body(i: usize) -> Vec<u8> {
    format!("message {i}: {}", "x".repeat(i % 200)).into_bytes()
}

/// A message sent: queue, queue offset, log offset, key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    queue: u32,
    offset: u64,
    log_offset: u64,
    key: String,
}

/// `n` keyed messages over the queues of `TOPIC`, then a clean close.
fn fill(dir: &Path, n: usize) -> Vec<Sent> {
    let store = open(dir).unwrap();
    let queues: Vec<Arc<ConsumeQueue>> = (0..QUEUES)
        .map(|q| store.queue(TOPIC, q).unwrap())
        .collect();
    let sent = (0..n)
        .map(|i| {
            let key = format!("key-{i}");
            let queue = (i as u32 * 7 + i as u32 / 3) % QUEUES;
            let b = body(i);
            let a = store
                .append(Append {
                    kind: RecordKind::Message,
                    flags: 0,
                    topic: TOPIC,
                    queue_id: queue,
                    key: &key,
                    props: &[],
                    body: &b,
                    timestamp_ms: 1,
                    dispatch_to: Some(&queues[queue as usize]),
                })
                .unwrap();
            Sent {
                queue,
                offset: a.queue_offset.unwrap(),
                log_offset: a.log_offset,
                key,
            }
        })
        .collect();
    store.close().unwrap();
    sent
}

/// Every message of every queue, read through the consume queues.
fn read_all(store: &Store) -> halfmq_types::error::Result<Vec<Sent>> {
    let mut out = Vec::new();
    for q in 0..QUEUES {
        let cq = store.queue(TOPIC, q)?;
        let mut from = 0;
        loop {
            let got = store.read_messages(&cq, from, 7)?;
            let Some(last) = got.last() else { break };
            from = last.0 + 1;
            for (offset, rec) in got {
                let i: usize = rec.key["key-".len()..].parse().unwrap();
                assert_eq!(rec.body, body(i), "{offset}");
                out.push(Sent {
                    queue: q,
                    offset,
                    log_offset: rec.header.log_offset,
                    key: rec.key,
                });
            }
        }
    }
    out.sort_by_key(|s| s.log_offset);
    Ok(out)
}

/// The segment file holding `log_offset`, and the position in it.
fn segment_of(dir: &Path, log_offset: u64) -> (PathBuf, u64) {
    let base = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            crate::segment::parse_file_name(&name)
        })
        .filter(|&b| b <= log_offset)
        .max()
        .unwrap();
    (
        dir.join("log").join(crate::segment::file_name(base)),
        log_offset - base,
    )
}

/// Invert every bit of `len` bytes of `file` from `at`.
fn invert(file: &Path, at: u64, len: usize) {
    let mut bytes = std::fs::read(file).unwrap();
    for b in &mut bytes[at as usize..at as usize + len] {
        *b ^= 0xff;
    }
    std::fs::write(file, bytes).unwrap();
}

/// A closed store of 400 messages, the consume-queue file of `queue` and its bytes.
fn filled_queue(queue: u32) -> (tempfile::TempDir, Vec<Sent>, PathBuf, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let sent = fill(tmp.path(), 400);
    let file = consume_queue::path(&tmp.path().join("cq"), TOPIC, queue);
    let before = std::fs::read(&file).unwrap();
    (tmp, sent, file, before)
}

#[test]
fn a_damaged_record_of_the_newest_segment_below_a_clean_checkpoint_stops_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = fill(tmp.path(), 400);
    let (newest, _) = segment_of(tmp.path(), sent.last().unwrap().log_offset);
    let victim = sent
        .iter()
        .rev()
        .find(|s| segment_of(tmp.path(), s.log_offset).0 == newest)
        .map(|s| sent.iter().position(|t| t == s).unwrap())
        .unwrap()
        .saturating_sub(5);
    let (seg, pos) = segment_of(tmp.path(), sent[victim].log_offset);
    assert_eq!(seg, newest, "the victim is in the newest segment");
    invert(&seg, pos + 60, 1);

    match open(tmp.path()) {
        Err(Error::Damaged { path, offset, .. }) => {
            assert_eq!((path, offset), (seg.clone(), pos));
        }
        other => panic!("expected Damaged at {} {pos}: {other:?}", seg.display()),
    }

    // Repair quarantines it; everything else is served, and the lost one is skipped.
    let report = repair::repair(&FsStorage, tmp.path(), false).unwrap();
    let lost: Vec<_> = report.lost().collect();
    assert_eq!(lost.len(), 1, "{report}");
    assert_eq!(lost[0].queue_offset, Some(sent[victim].offset), "{report}");
    let store = open(tmp.path()).unwrap();
    let mut want = sent.clone();
    want.remove(victim);
    assert_eq!(read_all(&store).unwrap(), want);
}

#[test]
fn a_damaged_record_of_an_older_segment_is_a_damaged_error_naming_it_when_read() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = fill(tmp.path(), 400);
    let (first_seg, _) = segment_of(tmp.path(), sent[0].log_offset);
    let (newest, _) = segment_of(tmp.path(), sent.last().unwrap().log_offset);
    assert_ne!(first_seg, newest, "the messages fill more than one segment");
    let victim = &sent[10];
    let (seg, pos) = segment_of(tmp.path(), victim.log_offset);
    invert(&seg, pos + 60, 1);

    // Not read on open: older segments are checked when they are read.
    let store = open(tmp.path()).unwrap();
    match read_all(&store) {
        Err(Error::Damaged { path, offset, .. }) => assert_eq!((path, offset), (seg, pos)),
        other => panic!("expected Damaged: {other:?}"),
    }
    // No index entry was taken for damaged: the log's record was.
    assert_eq!(store.log_stats().index_entries_rebuilt, 0);
}

#[test]
fn a_damaged_sector_of_a_consume_queue_is_rebuilt_from_the_log_when_read() {
    let (tmp, sent, file, before) = filled_queue(0);
    let entries = sent.iter().filter(|s| s.queue == 0).count() as u64;
    assert!(entries > 64, "{entries} entries");
    let used = consume_queue::CQ_HEADER_BYTES + entries * ENTRY_BYTES as u64;
    // One 512-byte sector in the middle of the entries: 32 of them, every bit inverted.
    let sector = (used / 2) / 512 * 512;
    invert(&file, sector, 512);

    let store = open(tmp.path()).unwrap();
    assert_eq!(read_all(&store).unwrap(), sent);
    assert_eq!(store.log_stats().index_entries_rebuilt, 32);
    drop(store);
    assert!(
        std::fs::read(&file)
            .unwrap()
            .starts_with(&before[..used as usize]),
        "the entries are written back as they were"
    );

    // A damaged key hash alone is found too.
    invert(
        &file,
        consume_queue::CQ_HEADER_BYTES + 3 * ENTRY_BYTES as u64 + 12,
        1,
    );
    let store = open(tmp.path()).unwrap();
    assert_eq!(read_all(&store).unwrap(), sent);
    assert_eq!(store.log_stats().index_entries_rebuilt, 1);
}

#[test]
fn what_retention_reads_of_a_damaged_consume_queue_is_checked_and_rebuilt() {
    let (tmp, sent, file, before) = filled_queue(1);
    let in_q1: Vec<&Sent> = sent.iter().filter(|s| s.queue == 1).collect();
    // The file's second sector: entries 31 to 62 (entry i is at 16 + 16 i).
    invert(&file, 512, 512);
    let store = open(tmp.path()).unwrap();
    let q = store.queue(TOPIC, 1).unwrap();
    let target = in_q1[40];
    let e = store.entry_checked(&q, target.offset).unwrap().unwrap();
    assert_eq!(e.log_offset, target.log_offset);
    let raw = &before[consume_queue::CQ_HEADER_BYTES as usize + 40 * ENTRY_BYTES..][..ENTRY_BYTES];
    assert_eq!(e, consume_queue::Entry::decode(raw));
    // The binary search retention uses for new queue starts, over a freshly damaged file.
    drop(q);
    drop(store);
    invert(&file, 512, 512);
    let store = open(tmp.path()).unwrap();
    let q = store.queue(TOPIC, 1).unwrap();
    for k in [0, 31, 35, 50, 63, in_q1.len() - 1] {
        assert_eq!(
            store.first_at_or_after(&q, in_q1[k].log_offset).unwrap(),
            k as u64,
            "entry {k}"
        );
    }
    assert!(store.log_stats().index_entries_rebuilt > 0);
}

#[test]
fn damaged_entries_around_a_message_lost_to_repair_are_rebuilt_and_it_stays_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let sent = fill(tmp.path(), 400);
    let victim = sent
        .iter()
        .position(|s| s.queue == 0 && s.offset == 40)
        .unwrap();
    let (seg, pos) = segment_of(tmp.path(), sent[victim].log_offset);
    invert(&seg, pos + 60, 1);
    let report = repair::repair(&FsStorage, tmp.path(), false).unwrap();
    assert_eq!(report.lost().count(), 1, "{report}");
    // Entries 31 to 62 of queue 0, the lost message's among them.
    let file = consume_queue::path(&tmp.path().join("cq"), TOPIC, 0);
    invert(&file, 512, 512);
    let store = open(tmp.path()).unwrap();
    let mut want = sent.clone();
    want.remove(victim);
    assert_eq!(read_all(&store).unwrap(), want);
    assert_eq!(store.log_stats().index_entries_rebuilt, 32);
    let q = store.queue(TOPIC, 0).unwrap();
    assert!(matches!(
        store.read_message(&q, 40),
        Err(Error::Lost { offset: 40, .. })
    ));
}
