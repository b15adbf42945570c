//! Retention (issue #7 item 7): old segments are deleted when every group has passed them
//! and a size or age limit is reached; never while a half, a delayed message, an un-acked
//! message or an un-replayed dead letter still needs them. Also: restarts and crashes at
//! each step of a delete, polls of deleted offsets, and index rebuilds of a log that no
//! longer starts at 0.

mod common;

use common::{open_waiting_for_lock, wait_until};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halfmq::clock::now_ms;
use halfmq::GroupSettings;
use halfmq::HalfOptions;
use halfmq::{Broker, BrokerConfig, Error, Message, Pin};
use halfmq_store::sim::{CrashMode, Faults, SimStorage};
use halfmq_store::TruncateLimits;

const SEGMENT_BYTES: u64 = 64 * 1024;
const BODY_BYTES: usize = 1000;

/// Small segments, frequent checkpoints, a size limit of two segments and a background
/// pass that never runs during a test (every pass here is explicit).
fn config(dir: &Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.store.segment_bytes = SEGMENT_BYTES;
    c.store.record_bytes_max = 8 * 1024;
    c.store.pending_bytes_max = 64 * 1024;
    c.store.checkpoint_bytes = 8 * 1024;
    c.default_queues = 2;
    c.txn.check_back = false;
    c.retention.bytes_max = Some(2 * SEGMENT_BYTES);
    c.retention.interval = Duration::from_secs(86_400);
    c
}

fn open(dir: &Path) -> Arc<Broker> {
    Broker::open(config(dir)).unwrap()
}

/// A broker on `dir` with messages 0 to 299 in "t", all consumed and acked by `group`.
fn consumed_by(dir: &Path, group: &str) -> Arc<Broker> {
    let b = open(dir);
    fill(&b, "t", 0, 300);
    drain(&b, group, "t");
    b
}

/// [`consumed_by`] "g", on a simulated disk (sled in the returned temporary directory).
fn consumed_on_sim() -> (tempfile::TempDir, SimStorage, BrokerConfig, Arc<Broker>) {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SimStorage::new();
    let cfg = config(tmp.path());
    let b = Broker::open_with(Arc::new(disk.clone()), cfg.clone()).unwrap();
    fill(&b, "t", 0, 300);
    drain(&b, "g", "t");
    (tmp, disk, cfg, b)
}

/// Power loss (unsynced writes lost), then open again.
fn crash_and_reopen(disk: &SimStorage, b: Arc<Broker>, cfg: BrokerConfig) -> Arc<Broker> {
    let after = disk.crash(CrashMode::DropUnsynced);
    drop(b);
    Broker::open_with(Arc::new(after), cfg).unwrap()
}

/// Delete the files of `dir` whose names start with one of `prefixes`, and every
/// consume-queue index.
fn lose_files(dir: &Path, prefixes: &[&str]) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if prefixes.iter().any(|p| name.starts_with(p)) {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    std::fs::remove_dir_all(dir.join("cq")).unwrap();
}

fn body(i: u64) -> Vec<u8> {
    let mut b = format!("message-{i:08}-").into_bytes();
    b.resize(BODY_BYTES, b'x');
    b
}

/// Send `n` messages numbered from `first`.
fn fill(b: &Broker, topic: &str, first: u64, n: u64) {
    for i in first..first + n {
        b.send(topic, &Message::new(body(i))).unwrap();
    }
}

/// Poll and ack everything there is; returns the message numbers seen, sorted (queues are
/// polled in turn, so the order across queues is not the send order).
fn drain(b: &Broker, group: &str, topic: &str) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let got = b.poll(group, topic, 64).unwrap();
        if got.is_empty() {
            seen.sort_unstable();
            return seen;
        }
        for d in &got {
            seen.push(number(&d.body));
            b.ack(group, topic, d.queue, d.offset).unwrap();
        }
    }
}

fn number(body: &[u8]) -> u64 {
    let s = std::str::from_utf8(&body[8..16]).unwrap();
    s.parse().unwrap()
}

/// Segment files holding a segment (a header): the next segment, zero-filled ahead of the
/// roll with an all-zero header, is not one yet.
fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let mut head = [0u8; 32];
            let n = std::io::Read::read(&mut std::fs::File::open(p).unwrap(), &mut head).unwrap();
            head[..n].iter().any(|&b| b != 0)
        })
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn deletes_when_every_group_passed_and_the_size_limit_is_exceeded() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    fill(&b, "t", 0, 300);
    assert!(segment_files(tmp.path()).len() >= 5);
    assert_eq!(drain(&b, "g1", "t").len(), 300);
    assert_eq!(drain(&b, "g2", "t").len(), 300);

    let log_start_seen = Arc::new(AtomicU64::new(0));
    let seen = log_start_seen.clone();
    b.store()
        .on_log_start(Box::new(move |s| seen.store(s, Ordering::SeqCst)));
    let r = b.enforce_retention().unwrap();
    assert!(r.segments_deleted >= 3, "{r:?}");
    assert!(r.log_bytes <= 2 * SEGMENT_BYTES, "{r:?}");
    assert!(!r.disabled);
    assert_eq!(r.log_start, b.store().log_start());
    assert_eq!(log_start_seen.load(Ordering::SeqCst), r.log_start);
    assert_eq!(segment_files(tmp.path()).len(), 2);
    let stats = b.stats().unwrap();
    assert_eq!(stats.log.log_start, r.log_start);
    assert_eq!(stats.log.log_bytes, r.log_bytes);

    // Business as usual afterwards.
    fill(&b, "t", 300, 10);
    assert_eq!(drain(&b, "g1", "t"), (300..310).collect::<Vec<_>>());
    // A second pass with nothing over the limit deletes nothing.
    let again = b.enforce_retention().unwrap();
    assert_eq!(again.segments_deleted, 0);
}

#[test]
fn nothing_is_deleted_without_a_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.retention.bytes_max = None;
    let b = Broker::open(cfg).unwrap();
    fill(&b, "t", 0, 300);
    drain(&b, "g", "t");
    let r = b.enforce_retention().unwrap();
    assert!(r.disabled);
    assert_eq!(r.segments_deleted, 0);
    assert_eq!(b.store().log_start(), 0);
}

#[test]
fn a_lagging_group_pins_the_log_until_it_acks() {
    let tmp = tempfile::tempdir().unwrap();
    let b = consumed_by(tmp.path(), "fast");
    // The slow group acked only the first message of queue 0.
    let first = b.poll("slow", "t", 1).unwrap();
    b.ack("slow", "t", first[0].queue, first[0].offset).unwrap();

    let r = b.enforce_retention().unwrap();
    assert_eq!(r.segments_deleted, 0, "{r:?}");
    assert!(r.held_by_floor);
    match &r.floor.pinned_by {
        Some(Pin::Group { group, topic, .. }) => assert_eq!((&**group, &**topic), ("slow", "t")),
        other => panic!("pinned by {other:?}"),
    }
    let text = format!("{}", r.floor.pinned_by.as_ref().unwrap());
    assert!(text.contains("group slow"), "{text}");

    // Everything the slow group has not acked is still there for it.
    let rest = drain(&b, "slow", "t");
    assert_eq!(rest.len(), 299);
    let r = b.enforce_retention().unwrap();
    assert!(r.segments_deleted >= 3, "{r:?}");
}

#[test]
fn a_topic_no_group_consumed_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    fill(&b, "consumed", 0, 150);
    fill(&b, "nobody", 1000, 5);
    fill(&b, "consumed", 150, 150);
    drain(&b, "g", "consumed");
    let r = b.enforce_retention().unwrap();
    match &r.floor.pinned_by {
        Some(Pin::Unconsumed { topic, .. }) => assert_eq!(topic, "nobody"),
        other => panic!("pinned by {other:?}"),
    }
    // Segments entirely before the unconsumed messages may go; theirs stay.
    let late = drain(&b, "late", "nobody");
    assert_eq!(late.len(), 5);
    let r = b.enforce_retention().unwrap();
    assert!(r.log_bytes <= 2 * SEGMENT_BYTES, "{r:?}");
}

#[test]
fn a_pending_half_pins_the_log_until_it_is_resolved() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    fill(&b, "t", 0, 20);
    let txn = b
        .send_half("t", &Message::new(body(7777)), "pg", HalfOptions::default())
        .unwrap();
    fill(&b, "t", 20, 280);
    drain(&b, "g", "t");
    let r = b.enforce_retention().unwrap();
    assert_eq!(r.floor.pinned_by, Some(Pin::Half { txn: txn.0 }));
    assert!(r.log_start <= txn.0, "{r:?}");
    // The half can still be committed and is delivered.
    b.commit(txn).unwrap();
    assert_eq!(drain(&b, "g", "t"), vec![7777]);
    let r = b.enforce_retention().unwrap();
    assert!(r.log_start > txn.0, "{r:?}");
}

#[test]
fn a_pending_delayed_message_pins_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    let d = b
        .send_delayed("t", &Message::new(body(5555)), now_ms() + 3_600_000)
        .unwrap();
    fill(&b, "t", 0, 300);
    drain(&b, "g", "t");
    let r = b.enforce_retention().unwrap();
    assert_eq!(r.floor.pinned_by, Some(Pin::Delayed { id: d.id }));
    assert_eq!(r.segments_deleted, 0);
    assert!(r.log_start <= d.id);
}

/// A broker whose group "g" has dead-lettered message 0 of topic "t" (no retries).
fn with_one_dead_letter(dir: &Path) -> Arc<Broker> {
    let b = Broker::open(config(dir)).unwrap();
    b.set_group_settings(
        "g",
        &GroupSettings {
            max_retries: Some(0),
            ..GroupSettings::default()
        },
    )
    .unwrap();
    fill(&b, "t", 0, 1);
    let d = b.poll("g", "t", 1).unwrap();
    b.nack("g", "t", d[0].queue, d[0].offset, None).unwrap();
    b
}

#[test]
fn an_unreplayed_dead_letter_pins_the_log_until_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let b = with_one_dead_letter(tmp.path());
    fill(&b, "t", 1, 300);
    assert_eq!(drain(&b, "g", "t").len(), 300);
    let r = b.enforce_retention().unwrap();
    match &r.floor.pinned_by {
        Some(Pin::DeadLetters { group, offset }) => assert_eq!((&**group, *offset), ("g", 0)),
        other => panic!("pinned by {other:?}"),
    }
    // Only segments before the dead letter could go.
    assert_eq!(b.dead_letters("g", 0, 10).unwrap().len(), 1);
    let replayed = b.replay_dead_letters("g", 10).unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!(drain(&b, "g", "t"), vec![0]);
    let r = b.enforce_retention().unwrap();
    assert!(r.log_bytes <= 2 * SEGMENT_BYTES, "{r:?}");
}

#[test]
fn a_poll_of_deleted_offsets_skips_them_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let b = consumed_by(tmp.path(), "g");
    let r = b.enforce_retention().unwrap();
    assert!(r.segments_deleted > 0);
    let q0 = b.store().queue("t", 0).unwrap();
    assert!(q0.start() > 0);
    // A direct read of a deleted message is a typed error, not corruption.
    match b.store().read_message(&q0, 0) {
        Err(Error::Expired { offset: 0, .. }) => {}
        other => panic!("{other:?}"),
    }
    // A group that starts now gets what is left, from the new start on, and the rest is
    // counted as skipped.
    let late = drain(&b, "late", "t");
    assert!(!late.is_empty());
    let skipped = b.expired_skipped();
    assert_eq!(skipped + late.len() as u64, 300);
    let stats = b.stats().unwrap();
    assert_eq!(stats.retention.unwrap().expired_skipped, skipped);
}

#[test]
fn restart_after_retention_keeps_queue_offsets_and_unacked_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let (start, lens) = {
        let b = consumed_by(tmp.path(), "g");
        fill(&b, "t", 300, 10);
        let r = b.enforce_retention().unwrap();
        assert!(r.segments_deleted > 0);
        let lens: Vec<u64> = (0..2)
            .map(|q| b.store().queue("t", q).unwrap().len())
            .collect();
        b.close().unwrap();
        (r.log_start, lens)
    };
    let b = open(tmp.path());
    assert_eq!(b.recovery_report().log_start, start);
    assert_eq!(b.store().log_start(), start);
    assert_eq!(drain(&b, "g", "t"), (300..310).collect::<Vec<_>>());
    let rec = b.send("t", &Message::new(body(999))).unwrap();
    assert_eq!(rec.offset, lens[rec.queue as usize]);
}

/// Run retention on a simulated disk, but put the deleted segment files back (as a crash
/// before their removal reached the disk would), crash, and reopen: recovery removes the
/// orphans and nothing else is lost. `keep_deleted` says which of the deleted files (oldest
/// first) come back: all of them = crash right after the log start was persisted; a suffix
/// = crash in the middle of the deletes (they go oldest first).
fn crash_during_delete(restore: fn(usize) -> std::ops::Range<usize>) {
    let (tmp, disk, cfg, b) = consumed_on_sim();
    fill(&b, "t", 300, 20);
    let log_dir = tmp.path().join("log");
    let before: Vec<_> = disk
        .files()
        .into_iter()
        .filter(|p| p.parent() == Some(&*log_dir))
        .map(|p| {
            let bytes = disk.durable_bytes(&p).unwrap();
            (p, bytes)
        })
        .collect();
    let r = b.enforce_retention().unwrap();
    let deleted: Vec<_> = before
        .iter()
        .filter(|(p, _)| !disk.files().contains(p))
        .cloned()
        .collect();
    assert_eq!(deleted.len() as u64, r.segments_deleted);
    let back = restore(deleted.len());
    for (p, bytes) in &deleted[back.clone()] {
        disk.put_bytes(p, bytes.clone());
    }
    let b = crash_and_reopen(&disk, b, cfg);
    let rep = b.recovery_report().clone();
    assert_eq!(rep.orphans_removed, back.len(), "{rep:?}");
    assert_eq!(rep.log_start, r.log_start);
    assert_eq!(drain(&b, "g", "t"), (300..320).collect::<Vec<_>>());
}

#[test]
fn crash_after_the_log_start_is_persisted_before_any_file_is_deleted() {
    crash_during_delete(|n| 0..n);
}

#[test]
fn crash_after_some_files_are_deleted() {
    crash_during_delete(|n| n / 2..n);
}

#[test]
fn a_failed_log_start_write_deletes_nothing() {
    let (_tmp, disk, cfg, b) = consumed_on_sim();
    fill(&b, "t", 300, 5);
    let segments = b.store().log_stats().segments;
    disk.set_faults(Faults {
        fail_syncs: 1,
        ..Faults::default()
    });
    assert!(b.enforce_retention().is_err());
    assert_eq!(b.store().log_stats().segments, segments);
    assert_eq!(b.store().log_start(), 0);
    let b = crash_and_reopen(&disk, b, cfg);
    assert_eq!(b.recovery_report().log_start, 0);
    assert_eq!(drain(&b, "g", "t"), (300..305).collect::<Vec<_>>());
}

#[test]
fn full_index_rebuild_of_a_log_that_starts_above_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let lens: Vec<u64> = {
        let b = consumed_by(tmp.path(), "g");
        fill(&b, "t", 300, 10);
        assert!(b.enforce_retention().unwrap().segments_deleted > 0);
        let lens = (0..2)
            .map(|q| b.store().queue("t", q).unwrap().len())
            .collect();
        b.close().unwrap();
        lens
    };
    // Lose every checkpoint and every index.
    lose_files(tmp.path(), &["checkpoint."]);
    let b = open(tmp.path());
    assert!(b.recovery_report().full_rebuild);
    for (q, len) in lens.iter().enumerate() {
        assert_eq!(b.store().queue("t", q as u32).unwrap().len(), *len);
    }
    assert_eq!(drain(&b, "g", "t"), (300..310).collect::<Vec<_>>());
    let rec = b.send("t", &Message::new(body(999))).unwrap();
    assert_eq!(rec.offset, lens[rec.queue as usize]);
    drop(b);
    // And once more, now from the rebuilt (sparse) indexes and a fresh checkpoint.
    let b = open(tmp.path());
    assert!(!b.recovery_report().full_rebuild);
    assert_eq!(drain(&b, "g", "t"), vec![999]);
}

#[test]
fn a_lost_log_start_file_still_rebuilds_from_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let b = consumed_by(tmp.path(), "g");
        fill(&b, "t", 300, 10);
        assert!(b.enforce_retention().unwrap().segments_deleted > 0);
        b.close().unwrap();
    }
    lose_files(tmp.path(), &["checkpoint.", "logstart."]);
    let b = open(tmp.path());
    assert_eq!(drain(&b, "g", "t"), (300..310).collect::<Vec<_>>());
}

#[test]
fn a_missing_segment_above_the_log_start_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let start = {
        let b = consumed_by(tmp.path(), "g");
        fill(&b, "t", 300, 200);
        let r = b.enforce_retention().unwrap();
        b.close().unwrap();
        r.log_start
    };
    let first = segment_files(tmp.path())[0].clone();
    assert_eq!(first, format!("{start:020}.log"));
    std::fs::remove_file(tmp.path().join("log").join(first)).unwrap();
    match Broker::open(config(tmp.path())) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("missing"), "{reason}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn age_limit_deletes_segments_whose_newest_record_is_old_enough() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.retention.bytes_max = None;
    cfg.retention.age_max = Some(Duration::from_secs(3600));
    let b = Broker::open(cfg).unwrap();
    fill(&b, "t", 0, 300);
    drain(&b, "g", "t");
    // Nothing is an hour old yet.
    let r = b.enforce_retention().unwrap();
    assert_eq!(r.segments_deleted, 0);
    // The store deletes by age against the time it is given: an hour from now, every
    // segment but the newest is old enough.
    let floor = b.retention_floor().unwrap().floor;
    let t = b
        .store()
        .truncate_front(
            floor,
            TruncateLimits {
                bytes_max: None,
                age_max_ms: Some(3_600_000),
                now_ms: now_ms() + 3_600_001,
            },
        )
        .unwrap();
    assert!(t.segments_deleted >= 3, "{t:?}");
}

#[test]
fn retention_settings_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.retention.bytes_max = Some(SEGMENT_BYTES);
    assert!(matches!(
        Broker::open(cfg).map(|_| ()),
        Err(Error::Config {
            setting: "retention_bytes",
            ..
        })
    ));
    let mut cfg = config(tmp.path());
    cfg.retention.interval = Duration::ZERO;
    assert!(matches!(
        Broker::open(cfg).map(|_| ()),
        Err(Error::Config {
            setting: "retention_interval",
            ..
        })
    ));
}

/// Open on a simulated disk, waiting out sled's lazily released lock of the broker closed
/// just before.
fn open_sim(disk: &SimStorage, cfg: &BrokerConfig) -> Arc<Broker> {
    open_waiting_for_lock(|| Broker::open_with(Arc::new(disk.clone()), cfg.clone())).unwrap()
}

/// After an open every group's leases are gone: a poll of everything must return exactly
/// the messages the group has not acked (none deleted, none acked delivered again). Then
/// most of them are acked.
fn check_unacked(
    b: &Broker,
    acked: &mut [std::collections::BTreeSet<u64>],
    sent: u64,
    rng: &mut fastrand::Rng,
    seed: u64,
) {
    for (g, acked) in GROUPS.iter().zip(acked) {
        let mut got = Vec::new();
        loop {
            let batch = b.poll(g, "t", 256).unwrap();
            if batch.is_empty() {
                break;
            }
            got.extend(batch);
        }
        let mut ids: Vec<u64> = got.iter().map(|d| number(&d.body)).collect();
        ids.sort_unstable();
        let want: Vec<u64> = (0..sent).filter(|i| !acked.contains(i)).collect();
        assert_eq!(ids, want, "seed {seed}: group {g}");
        for d in got {
            if rng.u32(0..10) < 9 {
                b.ack(g, "t", d.queue, d.offset).unwrap();
                acked.insert(number(&d.body));
            }
        }
    }
}

const GROUPS: [&str; 2] = ["a", "b"];

/// Seeded model: random sends, polls with random acks by two groups, retention passes,
/// clean reopens and power losses. After every open each group gets exactly what it has not
/// acked: retention never loses an un-acked message. `HALFMQ_RETENTION_SEEDS=N` runs more
/// seeds; a failure names its seed.
#[test]
fn seeded_model_retention_never_loses_an_unacked_message() {
    let seeds: u64 = std::env::var("HALFMQ_RETENTION_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut deleted_total = 0;
    for seed in 0..seeds {
        let mut rng = fastrand::Rng::with_seed(seed);
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let mut disk = SimStorage::new();
        let mut b = open_sim(&disk, &cfg);
        let mut acked = vec![std::collections::BTreeSet::new(); GROUPS.len()];
        let mut sent = 0u64;
        // Both groups become known (an ack is what survives a restart).
        fill(&b, "t", 0, 2);
        sent += 2;
        for (gi, g) in GROUPS.iter().enumerate() {
            for d in b.poll(g, "t", 2).unwrap() {
                b.ack(g, "t", d.queue, d.offset).unwrap();
                acked[gi].insert(number(&d.body));
            }
        }
        check_unacked(&b, &mut acked, sent, &mut rng, seed);
        for _ in 0..60 {
            match rng.u32(0..10) {
                0..=3 => {
                    let n = rng.u64(1..60);
                    fill(&b, "t", sent, n);
                    sent += n;
                }
                4..=6 => {
                    let gi = rng.usize(0..GROUPS.len());
                    let g = GROUPS[gi];
                    for d in b.poll(g, "t", rng.usize(1..200)).unwrap() {
                        // Most are acked; the rest stay leased until the next open.
                        if rng.u32(0..10) < 9 {
                            b.ack(g, "t", d.queue, d.offset).unwrap();
                            acked[gi].insert(number(&d.body));
                        }
                    }
                }
                7 => {
                    deleted_total += b.enforce_retention().unwrap().segments_deleted;
                }
                8 => {
                    b.close().unwrap();
                    drop(b);
                    b = open_sim(&disk, &cfg);
                    check_unacked(&b, &mut acked, sent, &mut rng, seed);
                }
                _ => {
                    deleted_total += b.enforce_retention().unwrap().segments_deleted;
                    let mode = if rng.bool() {
                        CrashMode::DropUnsynced
                    } else {
                        CrashMode::KeepRandomPrefix { seed: rng.u64(..) }
                    };
                    let after = disk.crash(mode);
                    drop(b);
                    disk = after;
                    b = open_sim(&disk, &cfg);
                    check_unacked(&b, &mut acked, sent, &mut rng, seed);
                }
            }
        }
        b.close().unwrap();
        drop(b);
        b = open_sim(&disk, &cfg);
        check_unacked(&b, &mut acked, sent, &mut rng, seed);
    }
    eprintln!("segments deleted over {seeds} seeds: {deleted_total}");
    assert!(
        deleted_total > 0,
        "no schedule deleted anything: the model checks nothing"
    );
}

/// The measurement behind README "Retention, measured" (not run by default):
/// `cargo test --release --test retention -- --ignored --nocapture measure`.
/// Part 1: the cost of a pass with 100 groups × 8 queues. Part 2: disk usage under a steady
/// send + ack load with a size limit stays bounded.
#[test]
#[ignore]
fn measure_retention_pass_cost_and_bounded_disk() {
    const MIB: u64 = 1024 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = BrokerConfig::new(tmp.path());
    cfg.store.segment_bytes = MIB;
    cfg.store.record_bytes_max = 64 * 1024;
    cfg.store.checkpoint_bytes = MIB;
    cfg.default_queues = 8;
    cfg.txn.check_back = false;
    cfg.retention.bytes_max = Some(4 * MIB);
    cfg.retention.interval = Duration::from_secs(86_400);
    let b = Broker::open(cfg).unwrap();
    let groups: Vec<String> = (0..100).map(|i| format!("group-{i:03}")).collect();
    let ack_all = |b: &Broker, g: &str| loop {
        let got = b.poll(g, "t", 1024).unwrap();
        if got.is_empty() {
            break;
        }
        let acks: Vec<(u32, u64)> = got.iter().map(|d| (d.queue, d.offset)).collect();
        b.ack_many(g, "t", &acks).unwrap();
    };
    // Part 1.
    fill(&b, "t", 0, 8000);
    for g in &groups {
        ack_all(&b, g);
    }
    let t = std::time::Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        b.retention_floor().unwrap();
    }
    let floor_avg = t.elapsed() / rounds;
    let r = b.enforce_retention().unwrap();
    println!(
        "pass, 100 groups x 8 queues, {} segments of 1 MiB: floor {floor_avg:?} (mean of {rounds}), \
         one pass {} us (floor {} us), deleted {} segments",
        r.segments_deleted + b.store().log_stats().segments as u64,
        r.pass_us,
        r.floor_us,
        r.segments_deleted
    );
    // Part 2: 50 rounds of 1000 sends of 1 KiB acked by two groups, a pass after each.
    let mut max_bytes = 0;
    let mut sent = 8000;
    let t = std::time::Instant::now();
    for _ in 0..50 {
        fill(&b, "t", sent, 1000);
        sent += 1000;
        for g in &groups[..2] {
            ack_all(&b, g);
        }
        // The other 98 groups keep up too (acked in bulk, as a busy deployment would).
        for g in &groups[2..] {
            ack_all(&b, g);
        }
        let r = b.enforce_retention().unwrap();
        max_bytes = max_bytes.max(r.log_bytes);
    }
    let written = b.store().log_stats().durable_offset;
    println!(
        "steady load: {} MiB written in {:?}, largest log after a pass {} MiB (limit 4 MiB), log start {} MiB",
        written / MIB,
        t.elapsed(),
        max_bytes / MIB,
        b.store().log_start() / MIB
    );
    assert!(max_bytes <= 5 * MIB, "log grew to {max_bytes} bytes");
}

#[test]
fn dead_letters_acked_by_a_group_polling_the_dead_letter_queue_are_released() {
    let tmp = tempfile::tempdir().unwrap();
    let b = with_one_dead_letter(tmp.path());
    fill(&b, "t", 1, 300);
    drain(&b, "g", "t");
    // An operator's group reads and acks the dead letters instead of replaying them.
    let dlq = halfmq::dead_letter_topic("g");
    assert_eq!(drain(&b, "ops", &dlq), vec![0]);
    let r = b.enforce_retention().unwrap();
    assert!(r.log_bytes <= 2 * SEGMENT_BYTES, "{r:?}");
    // The dead letter is gone; listing and replay start at what is kept, without errors.
    assert!(b.dead_letters("g", 0, 10).unwrap().is_empty());
    assert!(b.replay_dead_letters("g", 10).unwrap().is_empty());
}

/// The background pass: with a short interval it deletes without being asked. Waits for
/// the outcome (at most 20 s), not for a fixed time.
#[test]
fn the_background_pass_deletes_on_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.retention.interval = Duration::from_millis(10);
    let b = Broker::open(cfg).unwrap();
    fill(&b, "t", 0, 300);
    drain(&b, "g", "t");
    wait_until(
        "a background pass deleted something",
        Duration::from_secs(20),
        || b.last_retention().is_some_and(|r| r.log_start > 0),
    );
    assert!(b.store().log_start() > 0);
    b.close().unwrap();
}

#[test]
fn a_group_that_polled_but_never_acked_pins_the_log_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let b = consumed_by(tmp.path(), "fast");
        // "slow" takes messages and crashes before its first ack.
        assert!(!b.poll("slow", "t", 10).unwrap().is_empty());
        b.close().unwrap();
    }
    let b = open(tmp.path());
    let r = b.enforce_retention().unwrap();
    assert_eq!(r.segments_deleted, 0, "{r:?}");
    match &r.floor.pinned_by {
        Some(Pin::Group { group, .. }) => assert_eq!(group, "slow"),
        other => panic!("pinned by {other:?}"),
    }
    assert_eq!(drain(&b, "slow", "t"), (0..300).collect::<Vec<_>>());
}

/// A group that is no longer used pins the log until it is deleted; deleting it is refused
/// while one of its consumers holds a message, keeps its dead letters, survives a restart,
/// and a later consumer under the same name starts over.
#[test]
fn deleting_an_abandoned_group_releases_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let b = Broker::open(cfg.clone()).unwrap();
    fill(&b, "t", 0, 300);
    drain(&b, "live", "t");
    // "old" took two messages, failed one (dead-lettered at once: no retries), and went
    // away still holding the other.
    b.set_group_settings(
        "old",
        &GroupSettings {
            max_retries: Some(0),
            ..GroupSettings::default()
        },
    )
    .unwrap();
    let got = b.poll("old", "t", 2).unwrap();
    b.nack("old", "t", got[1].queue, got[1].offset, None)
        .unwrap();
    let r = b.enforce_retention().unwrap();
    assert_eq!(r.segments_deleted, 0, "{r:?}");
    assert!(
        matches!(&r.floor.pinned_by, Some(Pin::Group { group, .. }) if group == "old"),
        "{r:?}"
    );

    // Its consumer still holds the first message: refused, nothing changes.
    let e = b.delete_group("old").unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    assert!(e.to_string().contains("1 message"), "{e}");
    assert!(b.enforce_retention().unwrap().held_by_floor);

    // Once the consumer lets go of it (a nack; here it is dead-lettered too), deletion works.
    b.nack("old", "t", got[0].queue, got[0].offset, None)
        .unwrap();
    let d = b.delete_group("old").unwrap();
    assert_eq!(d.group, "old");
    assert_eq!(d.queues, 2, "{d:?}");
    assert_eq!(d.dead_letter_queue.as_deref(), Some("%DLQ%old"));
    assert!(matches!(
        b.delete_group("old").unwrap_err(),
        Error::UnknownGroup(_)
    ));
    assert!(matches!(
        b.delete_group("%replay").unwrap_err(),
        Error::Invalid { .. }
    ));
    assert!(matches!(
        b.delete_group("never-seen").unwrap_err(),
        Error::UnknownGroup(_)
    ));

    // The log is released (the dead letters were written after the old messages)...
    let r = b.enforce_retention().unwrap();
    assert!(r.segments_deleted >= 3, "{r:?}");
    assert!(
        !matches!(&r.floor.pinned_by, Some(Pin::Group { group, .. }) if group == "old"),
        "{r:?}"
    );
    // ...and its dead letters are kept, replayable to the topic.
    assert_eq!(b.dead_letters("old", 0, 10).unwrap().len(), 2);
    assert_eq!(b.replay_dead_letters("old", 10).unwrap().len(), 2);
    assert_eq!(drain(&b, "live", "t").len(), 2);

    // Gone across a restart too; the name starts over at the log's first message.
    b.close().unwrap();
    drop(b);
    let b = Broker::open(cfg).unwrap();
    assert!(matches!(
        b.delete_group("old").unwrap_err(),
        Error::UnknownGroup(_)
    ));
    let again = drain(&b, "old", "t");
    assert!(!again.is_empty());
    assert!(
        again.len() < 300,
        "deleted segments are not delivered again"
    );
    b.close().unwrap();
}
