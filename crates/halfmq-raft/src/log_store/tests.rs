//! Tests of the raft log: segments, torn tails and damage, the vote's copies, entries kept
//! in memory.

use super::*;
use openraft::{CommittedLeaderId, EntryPayload};

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Blank,
    }
}

fn indexes(log: &LogStore) -> Vec<u64> {
    let all = log.entries(..).unwrap();
    all.iter().map(|e| e.log_id.index).collect()
}

/// A log of entries 1..=n in segments of about 100 bytes (a few entries each).
fn filled(dir: &Path, n: u64) -> LogStore {
    let log = LogStore::open(dir, 100).unwrap();
    for i in 1..=n {
        log.append_now(vec![entry(i)]).unwrap();
    }
    log
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn a_torn_append_at_the_end_is_cut_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    drop(filled(dir.path(), 9));
    let segs = segments(dir.path());
    assert!(segs.len() > 1, "{segs:?}");
    let newest = segs.last().unwrap();
    let whole = std::fs::metadata(newest).unwrap().len();
    // Half a frame written when the power went.
    let torn = &frame::encode(&entry(10), "test").unwrap()[..10];
    let f = OpenOptions::new().append(true).open(newest).unwrap();
    f.write_all_at(torn, whole).unwrap();
    let log = LogStore::open(dir.path(), 100).unwrap();
    assert_eq!(indexes(&log), (1..=9).collect::<Vec<_>>());
    assert_eq!(std::fs::metadata(newest).unwrap().len(), whole);
    log.append_now(vec![entry(10)]).unwrap();
    drop(log);
    let log = LogStore::open(dir.path(), 100).unwrap();
    assert_eq!(indexes(&log), (1..=10).collect::<Vec<_>>());
}

#[test]
fn damage_in_an_older_segment_stops_opening_and_names_the_byte() {
    let dir = tempfile::tempdir().unwrap();
    drop(filled(dir.path(), 9));
    let oldest = segments(dir.path())[0].clone();
    let mut bytes = std::fs::read(&oldest).unwrap();
    bytes[frame::HEADER_BYTES + 1] ^= 0x40;
    std::fs::write(&oldest, &bytes).unwrap();
    match LogStore::open(dir.path(), 100) {
        Err(Error::Damaged { path, offset, .. }) => assert_eq!((path, offset), (oldest, 0)),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a damaged log"),
    }
}

#[test]
fn entries_kept_in_memory_are_the_ones_on_disk_and_leave_with_a_truncate() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(dir.path(), 100).unwrap();
    // Room for about three of these entries in memory: the older ones come from disk.
    let one = frame::encode(&entry(1), "test").unwrap().len() as u64;
    Arc::get_mut(&mut log.shared).unwrap().recent_bytes_max = 3 * one;
    for i in 1..=9 {
        log.append_now(vec![entry(i)]).unwrap();
    }
    {
        let inner = log.shared.inner.lock();
        let kept: Vec<u64> = inner.recent.keys().copied().collect();
        assert!(!kept.is_empty() && kept.len() < 9, "{kept:?}");
        assert_eq!(kept.last(), Some(&9));
        assert!(inner.recent_bytes <= 3 * one);
    }
    let served = log.entries(..).unwrap();
    drop(log);
    let log = LogStore::open(dir.path(), 100).unwrap();
    assert!(log.shared.inner.lock().recent.is_empty());
    assert_eq!(log.entries(..).unwrap(), served);
    // A truncate takes the kept entries with it; what is appended after is served.
    let other = Entry {
        log_id: LogId::new(CommittedLeaderId::new(2, 1), 7),
        payload: EntryPayload::Blank,
    };
    log.append_now(vec![entry(10)]).unwrap();
    log.truncate_now(entry(7).log_id).unwrap();
    assert!(log.shared.inner.lock().recent.keys().all(|i| *i < 7));
    log.append_now(vec![other.clone()]).unwrap();
    assert_eq!(log.entries(7..).unwrap(), vec![other]);
}

#[test]
fn a_bad_frame_in_the_newest_segment_with_a_whole_one_after_it_is_damage_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogStore::open(dir.path(), 1 << 20).unwrap();
    for i in 1..=5 {
        log.append_now(vec![entry(i)]).unwrap();
    }
    drop(log);
    let seg = segments(dir.path())[0].clone();
    let one = frame::encode(&entry(1), "test").unwrap().len();
    let mut bytes = std::fs::read(&seg).unwrap();
    // The body of entry 3, synced and followed by entries 4 and 5.
    bytes[2 * one + frame::HEADER_BYTES + 1] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    match LogStore::open(dir.path(), 1 << 20) {
        Err(Error::Damaged { path, offset, .. }) => {
            assert_eq!((path, offset), (seg.clone(), 2 * one as u64))
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("cut synced entries as a torn tail"),
    }
    // Nothing was cut.
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

#[test]
fn entries_after_a_gap_start_a_new_segment_and_the_log_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogStore::open(dir.path(), 1 << 20).unwrap();
    log.append_now((1..=3).map(entry).collect()).unwrap();
    // A snapshot up to 10 installed over this log: purged, then appends from 11.
    log.purge_now(entry(10).log_id).unwrap();
    log.append_now(vec![entry(11), entry(12)]).unwrap();
    drop(log);
    assert_eq!(segments(dir.path()).len(), 2);
    let log = LogStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(indexes(&log), vec![11, 12]);
}

#[test]
fn a_damaged_vote_is_read_from_its_copy_and_both_damaged_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let v = Vote::new_committed(7, 2);
    write_vote(dir.path(), &v).unwrap();
    let vote = dir.path().join("vote");
    let mut bytes = std::fs::read(&vote).unwrap();
    bytes[frame::HEADER_BYTES] ^= 1;
    std::fs::write(&vote, &bytes).unwrap();
    assert_eq!(read_vote(dir.path()).unwrap(), Some(v));
    assert_eq!(
        std::fs::read(dir.path().join("vote.damaged")).unwrap(),
        bytes
    );
    // Both whole again; now damage both.
    for name in ["vote", "vote.copy"] {
        std::fs::write(dir.path().join(name), &bytes).unwrap();
    }
    assert!(matches!(read_vote(dir.path()), Err(Error::Corrupt { .. })));
}

#[test]
fn truncate_and_purge_hold_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = filled(dir.path(), 12);
    log.truncate_now(entry(8).log_id).unwrap();
    assert_eq!(log.last_log_id().map(|l| l.index), Some(7));
    log.purge_now(entry(4).log_id).unwrap();
    assert_eq!(indexes(&log), (5..=7).collect::<Vec<_>>());
    log.append_now(vec![entry(8), entry(9)]).unwrap();
    drop(log);
    let log = LogStore::open(dir.path(), 100).unwrap();
    assert_eq!(indexes(&log), (5..=9).collect::<Vec<_>>());
    let inner = log.shared.inner.lock();
    assert_eq!(inner.last_purged.map(|l| l.index), Some(4));
    // Segments wholly below the purge are gone.
    let first_kept = *inner.segments.keys().next().unwrap();
    assert!(first_kept <= 5, "{first_kept}");
    assert!(segments(dir.path()).len() < 12);
}

#[test]
fn one_append_across_several_segments_reads_back_from_each() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of two entries each.
    let seg = 2 * frame::encode(&entry(1), "test").unwrap().len() as u64;
    let mut log = LogStore::open(dir.path(), seg).unwrap();
    // Nothing kept decoded: every read goes to the place the append recorded.
    Arc::get_mut(&mut log.shared).unwrap().recent_bytes_max = 0;
    log.append_now((1..=5).map(entry).collect()).unwrap();
    // A second append, whose frames go into the buffer the first one left, across rolls.
    log.append_now((6..=12).map(entry).collect()).unwrap();
    assert_eq!(indexes(&log), (1..=12).collect::<Vec<_>>());
    assert!(log.shared.inner.lock().recent.is_empty());
    drop(log);
    assert_eq!(segments(dir.path()).len(), 6, "{:?}", segments(dir.path()));
    // Reopened: the segments scan as whole frames in sequence.
    let log = LogStore::open(dir.path(), seg).unwrap();
    assert_eq!(indexes(&log), (1..=12).collect::<Vec<_>>());
    log.append_now(vec![entry(13)]).unwrap();
    assert_eq!(indexes(&log), (1..=13).collect::<Vec<_>>());
}
