//! The metadata database (`meta/`, sled) lost, emptied, damaged or put back from an old copy:
//! the broker reopens with every pending half (still checked back), every delayed message
//! and every idempotency key within its window, rebuilt from the log; consumer positions only
//! go back (their messages are delivered again), and that is reported in `stats`. And ids
//! never point past the log: after the log lost its end (an old copy of the log put back
//! under newer metadata), committed offsets are clamped to the end of their queue, and a new
//! half that gets the id of a transaction the lost log had finished stays pending.
//!
//! The broker's clock is a [`ManualClock`]: check-backs and delayed deliveries happen when
//! the test moves it and calls `run_due_now`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{open_waiting_for_lock, visible, wait_for_sled_released, wait_until, POLL_ALL};
use halfmq::{
    Broker, BrokerConfig, CheckAnswer, Clock, HalfMessage, HalfOptions, ManualClock, Message,
    TxnConfig, TxnId, TxnState,
};

const TOPIC: &str = "t";
const GROUP: &str = "g";
const PRODUCERS: &str = "producers";
/// How long the check-back thread may take to write what a checker answered.
const WAIT_LIMIT: Duration = Duration::from_secs(20);

fn config(dir: &Path, clock: &ManualClock) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir).with_clock(clock.clone());
    c.store.segment_bytes = 256 * 1024;
    c.store.record_bytes_max = 16 * 1024;
    // A checkpoint every few KiB: the derived state reaches sled during the test.
    c.store.checkpoint_bytes = 16 * 1024;
    c.default_queues = 2;
    c.txn = TxnConfig::default()
        .with_timeout(Duration::from_secs(5))
        .with_check_interval(Duration::from_secs(5))
        .with_check_backoff_max(Duration::from_secs(5));
    c
}

/// An empty data directory, and a clock that moves only when the test moves it.
fn fresh() -> (tempfile::TempDir, ManualClock) {
    (tempfile::tempdir().unwrap(), ManualClock::starting_now())
}

fn open(dir: &Path, clock: &ManualClock) -> Arc<Broker> {
    open_waiting_for_lock(|| Broker::open(config(dir, clock)))
        .unwrap_or_else(|e| panic!("open failed: {e}"))
}

/// Close, and wait until sled let go of its files.
fn close(b: Arc<Broker>, dir: &Path) {
    common::close(b);
    wait_for_sled_released(&dir.join("meta"));
}

/// A half of [`PRODUCERS`] in [`TOPIC`].
fn send_half(b: &Broker, body: impl Into<Vec<u8>>) -> TxnId {
    b.send_half(
        TOPIC,
        &Message::new(body),
        PRODUCERS,
        HalfOptions::default(),
    )
    .unwrap()
}

/// What the test did, and so what a reopened broker must know.
#[derive(Default, Debug)]
struct Expect {
    /// Halves with no outcome: (id, body).
    pending: Vec<(TxnId, String)>,
    committed: Vec<TxnId>,
    rolled_back: Vec<TxnId>,
    /// Bodies of delayed messages not delivered yet.
    delayed: Vec<String>,
    /// Idempotency keys of stored plain sends.
    keys: Vec<String>,
    /// (queue, offset) of messages `GROUP` acked.
    acked: BTreeSet<(u32, u64)>,
}

/// One round of work, named `tag`: keyed sends (large enough to pass checkpoints), halves
/// left pending, committed and rolled back, a delayed send, and acks by `GROUP` of half of
/// what it polls. Earlier pending halves are committed (`finish_earlier`).
fn work(b: &Broker, clock: &ManualClock, tag: &str, e: &mut Expect, finish_earlier: bool) {
    let pad = "x".repeat(700);
    for i in 0..40 {
        let key = format!("{tag}-key-{i}");
        let r = b
            .send(
                TOPIC,
                &Message::new(format!("{tag}-{i}-{pad}")).with_idempotency_key(key.clone()),
            )
            .unwrap();
        assert!(!r.duplicate);
        e.keys.push(key);
    }
    if finish_earlier {
        for (id, _) in std::mem::take(&mut e.pending) {
            b.commit(id).unwrap();
            e.committed.push(id);
        }
    }
    let half = |n: &str| send_half(b, format!("{tag}-half-{n}"));
    let (p, c, r) = (half("pending"), half("commit"), half("rollback"));
    b.commit(c).unwrap();
    b.rollback(r).unwrap();
    e.pending.push((p, format!("{tag}-half-pending")));
    e.committed.push(c);
    e.rolled_back.push(r);
    let body = format!("{tag}-delayed");
    b.send_delayed(TOPIC, &Message::new(body.clone()), clock.now_ms() + 60_000)
        .unwrap();
    e.delayed.push(body);
    let got = b.poll(GROUP, TOPIC, POLL_ALL).unwrap();
    for d in got.iter().step_by(2) {
        b.ack(GROUP, TOPIC, d.queue, d.offset).unwrap();
        e.acked.insert((d.queue, d.offset));
    }
}

/// Everything `e` says must hold on a reopened broker: pending halves pending and then
/// checked back, outcomes known, keys remembered, delayed messages delivered at their time,
/// and every message `GROUP` did not ack delivered to it again.
fn verify(b: &Broker, clock: &ManualClock, e: &Expect) {
    for (id, _) in &e.pending {
        assert_eq!(
            b.transaction_state(*id).ok(),
            Some(TxnState::Pending),
            "pending half {id} was lost"
        );
    }
    for id in &e.committed {
        b.commit(*id)
            .unwrap_or_else(|err| panic!("the outcome of committed {id} was lost: {err}"));
    }
    for id in &e.rolled_back {
        b.rollback(*id)
            .unwrap_or_else(|err| panic!("the outcome of rolled back {id} was lost: {err}"));
    }
    for key in &e.keys {
        let r = b
            .send(
                TOPIC,
                &Message::new("resend").with_idempotency_key(key.clone()),
            )
            .unwrap();
        assert!(r.duplicate, "idempotency key {key} was forgotten");
    }
    assert_eq!(
        b.delayed_pending(),
        e.delayed.len() as u64,
        "delayed messages were lost"
    );
    // The group gets again everything it did not ack (and maybe more: redelivery).
    let again: BTreeSet<(u32, u64)> = b
        .poll(GROUP, TOPIC, POLL_ALL)
        .unwrap()
        .iter()
        .map(|d| (d.queue, d.offset))
        .collect();
    let all: BTreeSet<(u32, u64)> = visible(b, TOPIC)
        .iter()
        .map(|d| (d.queue, d.offset))
        .collect();
    let missing: Vec<_> = all
        .iter()
        .filter(|m| !e.acked.contains(m) && !again.contains(m))
        .collect();
    assert!(missing.is_empty(), "never acked, yet skipped: {missing:?}");
    // Check-back: the checker commits every pending half; delayed messages fall due.
    let checker = |_: &HalfMessage| CheckAnswer::Commit;
    b.register_checker(PRODUCERS, Arc::new(checker)).unwrap();
    clock.advance_ms(61_000);
    let want: BTreeSet<String> = e
        .pending
        .iter()
        .map(|(_, body)| body.clone())
        .chain(e.delayed.iter().cloned())
        .collect();
    wait_until(
        "pending halves checked back, delayed messages delivered",
        WAIT_LIMIT,
        || {
            b.run_due_now();
            let seen: BTreeSet<String> = visible(b, TOPIC)
                .iter()
                .map(|d| String::from_utf8_lossy(&d.body).into_owned())
                .collect();
            want.is_subset(&seen)
        },
    );
}

/// A broker that did two rounds of work and was closed; what it did.
fn worked(dir: &Path, clock: &ManualClock) -> Expect {
    let mut e = Expect::default();
    let b = open(dir, clock);
    work(&b, clock, "a", &mut e, false);
    work(&b, clock, "b", &mut e, false);
    close(b, dir);
    e
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Reopen after `damage` was done to the closed broker's `meta/`; everything must be there,
/// and the loss of consumer positions reported.
fn survives(damage: impl FnOnce(&Path)) {
    let (tmp, clock) = fresh();
    let e = worked(tmp.path(), &clock);
    damage(&tmp.path().join("meta"));
    let b = open(tmp.path(), &clock);
    let report = b.stats().unwrap().meta;
    assert!(report.rebuilt.is_some(), "no rebuild reported: {report:?}");
    assert!(
        !report.offsets_lost.is_empty(),
        "lost consumer positions not reported: {report:?}"
    );
    verify(&b, &clock, &e);
    close(b, tmp.path());
    // Once rebuilt, sled is trusted again: the next open rebuilds nothing.
    let b = open(tmp.path(), &clock);
    assert!(b.meta_recovery().is_clean(), "{:?}", b.meta_recovery());
    close(b, tmp.path());
}

#[test]
fn deleted_meta_loses_no_half_delayed_message_or_key() {
    survives(|meta| std::fs::remove_dir_all(meta).unwrap());
}

#[test]
fn emptied_meta_loses_no_half_delayed_message_or_key() {
    survives(|meta| {
        for f in files_under(meta) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
    });
}

#[test]
fn corrupt_sled_file_loses_no_half_delayed_message_or_key() {
    survives(|meta| {
        // Every byte of sled's files after their first 512 replaced: whatever sled makes of
        // it (an error, a panic, or a database missing what was there), nothing derived from
        // the log may be lost.
        use std::os::unix::fs::FileExt;
        let mut damaged = 0;
        for path in files_under(meta) {
            let len = std::fs::metadata(&path).unwrap().len();
            if len <= 512 {
                continue;
            }
            let junk: Vec<u8> = (0..len - 512).map(|i| (i * 131 % 251) as u8).collect();
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&junk, 512).unwrap();
            f.sync_all().unwrap();
            damaged += 1;
        }
        assert!(
            damaged > 0,
            "no sled file to damage: {:?}",
            files_under(meta)
        );
    });
}

#[test]
fn stale_meta_put_back_loses_no_half_delayed_message_or_key() {
    let (tmp, clock) = fresh();
    let dir = tmp.path();
    let mut e = worked(dir, &clock);
    // T1: a copy of meta/ is kept aside.
    let aside = tempfile::tempdir().unwrap();
    copy_dir(&dir.join("meta"), &aside.path().join("meta"), &[]);
    // Work goes on: new halves, the earlier pending ones committed, delayed and keyed sends,
    // acks.
    let b = open(dir, &clock);
    assert!(b.meta_recovery().is_clean(), "{:?}", b.meta_recovery());
    work(&b, &clock, "c", &mut e, true);
    work(&b, &clock, "d", &mut e, false);
    close(b, dir);
    // The old copy is put back.
    std::fs::remove_dir_all(dir.join("meta")).unwrap();
    copy_dir(&aside.path().join("meta"), &dir.join("meta"), &[]);
    let b = open(dir, &clock);
    let report = b.stats().unwrap().meta;
    assert!(
        report
            .rebuilt
            .as_deref()
            .is_some_and(|r| r.contains("older")),
        "{report:?}"
    );
    assert!(
        report
            .offsets_lost
            .iter()
            .any(|o| o.group.as_deref() == Some(GROUP) && o.topic == TOPIC),
        "the group's positions that may have gone back are not reported: {report:?}"
    );
    verify(&b, &clock, &e);
    close(b, dir);
}

/// Copy the directory `from` to `to`, but for the entries of `from` named in `skip`.
fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target, &[]);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// What is not the log in a data directory: `meta/` and the lock file.
const NOT_LOG: &[&str] = &["meta", "LOCK"];

/// A copy of the log of the closed data directory `dir` (everything but [`NOT_LOG`]).
fn save_log(dir: &Path) -> tempfile::TempDir {
    let saved = tempfile::tempdir().unwrap();
    copy_dir(dir, saved.path(), NOT_LOG);
    saved
}

/// Put the log saved by [`save_log`] back in `dir`.
fn restore_log(saved: &Path, dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if NOT_LOG.iter().any(|s| entry.file_name() == *s) {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            std::fs::remove_dir_all(entry.path()).unwrap();
        } else {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    copy_dir(saved, dir, &[]);
}

#[test]
fn committed_offsets_past_a_shorter_log_are_clamped_and_new_messages_delivered() {
    let (tmp, clock) = fresh();
    let dir = tmp.path();
    let b = open(dir, &clock);
    for i in 0..10 {
        b.send(TOPIC, &Message::new(format!("old-{i}"))).unwrap();
    }
    close(b, dir);
    let saved = save_log(dir);
    // More messages, all acked: the group's committed offsets go past the saved log's end.
    let b = open(dir, &clock);
    for i in 0..30 {
        b.send(TOPIC, &Message::new(format!("lost-{i}"))).unwrap();
    }
    let got = b.poll(GROUP, TOPIC, POLL_ALL).unwrap();
    let acks: Vec<(u32, u64)> = got.iter().map(|d| (d.queue, d.offset)).collect();
    b.ack_many(GROUP, TOPIC, &acks).unwrap();
    close(b, dir);
    // The log loses its end (the saved copy is what is left).
    restore_log(saved.path(), dir);
    let b = open(dir, &clock);
    let report = b.stats().unwrap().meta;
    assert!(
        !report.offsets_clamped.is_empty()
            && report
                .offsets_clamped
                .iter()
                .all(|c| c.group.as_deref() == Some(GROUP) && c.committed > c.end),
        "clamp not reported: {report:?}"
    );
    // New messages get the offsets the lost ones had: the group must get them.
    for i in 0..10 {
        b.send(TOPIC, &Message::new(format!("new-{i}"))).unwrap();
    }
    let bodies: BTreeSet<String> = b
        .poll(GROUP, TOPIC, POLL_ALL)
        .unwrap()
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    let want: BTreeSet<String> = (0..10).map(|i| format!("new-{i}")).collect();
    assert!(
        want.is_subset(&bodies),
        "new messages skipped: got {bodies:?}"
    );
    close(b, dir);
}

#[test]
fn a_new_half_with_the_id_of_a_lost_outcome_stays_pending() {
    let (tmp, clock) = fresh();
    let dir = tmp.path();
    let b = open(dir, &clock);
    b.send(TOPIC, &Message::new("before")).unwrap();
    close(b, dir);
    let saved = save_log(dir);
    // A transaction right at the end of the saved log, committed: its outcome reaches sled.
    let b = open(dir, &clock);
    let old = send_half(&b, "old");
    b.commit(old).unwrap();
    close(b, dir);
    // The log loses its end; a new half gets the same id.
    restore_log(saved.path(), dir);
    let b = open(dir, &clock);
    let new = send_half(&b, "new");
    assert_eq!(new, old, "the test needs the new half to get the old id");
    assert_eq!(b.transaction_state(new).ok(), Some(TxnState::Pending));
    close(b, dir);
    // Reopened (the half reached sled at the closing checkpoint): still pending, and its
    // commit makes the new message visible.
    let b = open(dir, &clock);
    assert_eq!(
        b.transaction_state(new).ok(),
        Some(TxnState::Pending),
        "the new half was taken for the lost transaction"
    );
    b.commit(new).unwrap();
    let bodies: Vec<Vec<u8>> = visible(&b, TOPIC).into_iter().map(|d| d.body).collect();
    assert!(bodies.contains(&b"new".to_vec()), "got {bodies:?}");
    assert!(!bodies.contains(&b"old".to_vec()), "got {bodies:?}");
    close(b, dir);
}
