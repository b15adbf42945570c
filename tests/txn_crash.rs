//! Crash consistency of transactions, through the embedded [`Broker`] on the simulated disk
//! ([`SimStorage`]).
//!
//! What these tests prove: after a power loss at any step of a transaction — right after
//! `send_half`, `commit` or `rollback` returned, while any of them is in flight, while a
//! checker is being asked, or while the commit a check-back decided is being written — and a
//! reopen, every transaction is exactly one of: committed and visible exactly once (right key
//! and body), rolled back and never visible, or pending (listed by `transactions`, invisible)
//! and checked again, so a checker answering "commit" then makes it visible exactly once.
//! Acknowledged outcomes hold: a `send_half` that returned `Ok` is never lost, a `commit` that
//! returned `Ok` is committed after any crash, a `rollback` that returned `Ok` stays rolled
//! back. A model test runs random interleavings of halves, commits, rollbacks (repeated,
//! opposite and of unknown ids, each checked for its exact `Ok` / `TxnConflict` /
//! `UnknownTxn`), plain sends, check-backs, crashes and clean reopens against a reference model.
//! Check counts survive restarts and crashes: they continue where they were, and a transaction
//! becomes unresolved after exactly `check_max` checks in total, which also survives a crash.
//! A crash during recovery (at its first sync, or at a random moment, twice in a row) changes
//! no transaction; under async flush, unsynced transaction records survive exactly as a prefix.
//! Two bugs found on the way are kept as ignored tests at the end (async-flush phantom
//! transactions; reopen failing on sled's lock right after close).
//!
//! How a crash is simulated: `disk.crash(mode)` returns a new disk holding what survived
//! (`DropUnsynced`: only synced writes; `KeepRandomPrefix`: also a seeded random prefix of the
//! unsynced ones, the last possibly torn) and makes the old disk refuse everything. The sled
//! metadata (pending-transaction index, check counts, outcomes) lives on the real file system
//! and survives as it is. To model that the old process dies with the power, [`crash`] first
//! makes one more write (a half) on the dead disk, which poisons the old store, so that closing
//! it cannot persist the transaction index to sled afterwards (no closing checkpoint): sled
//! stays as the power loss left it, usually behind the log. With `Freeze::No` the old broker is
//! closed without that, so it persists its (durable-only) index on the way down, as a process
//! that outlives a disk failure would.
//!
//! `HALFMQ_MODEL_CASES=N` sets the number of cases of the model test (default 48). A failing
//! case prints its operations, the step that failed, and what differed.

mod common;

use common::{
    check_back, close_after_crash, fresh_sim, open_sim as open, poison, restart_sim as restart,
    small_segments, sole, try_open_sim as try_open, visible, wait_until, CHECKPOINT_BYTES_NEVER,
    CHECKPOINT_BYTES_SMALL,
};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use halfmq::{
    Broker, BrokerConfig, CheckAnswer, Delivery, Error, HalfMessage, HalfOptions, ManualClock,
    Message, TxnConfig, TxnId, TxnInfo, TxnState,
};
use halfmq_store::sim::{CrashMode, Faults, SimStorage};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

/// Property of a committed message naming its transaction.
const PROP_TXN: &str = "halfmq.txn";
/// A user property every half carries, checked on the visible message.
const PROP_ORIGIN: &str = "origin";
/// How long to wait for something the check-back thread does.
const WAIT_LIMIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Check-back soon and often. `check_max` is high so that a half that comes back pending is
/// never unresolved before the test has registered a checker for it.
fn eager_txn() -> TxnConfig {
    check_back((100, 50, 100), 1000, 300)
}

/// No check-back happens on its own within a test; only `rearm` makes one due.
fn quiet_txn() -> TxnConfig {
    check_back((600_000, 600_000, 600_000), 3, 5_000)
}

fn config(dir: &Path, txn: TxnConfig, checkpoint_bytes: u64) -> BrokerConfig {
    let mut cfg = small_segments(dir, checkpoint_bytes);
    cfg.txn = txn;
    cfg
}

/// Checkpoints every few KiB for even seeds, none for odd ones.
fn checkpoints_by_seed(seed: u64) -> u64 {
    if seed.is_multiple_of(2) {
        CHECKPOINT_BYTES_SMALL
    } else {
        CHECKPOINT_BYTES_NEVER
    }
}

/// No check-back on its own, no checkpoint, and the log flushed only every `secs` seconds:
/// within a test nothing is synced but what the broker syncs on purpose.
fn async_flush(dir: &Path, secs: u64) -> BrokerConfig {
    let mut cfg = config(dir, quiet_txn(), CHECKPOINT_BYTES_NEVER);
    cfg.store.flush = halfmq::FlushPolicy::Async {
        interval: Duration::from_secs(secs),
    };
    cfg
}

/// Whether the old process may still write sled after its disk died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freeze {
    /// It may not: sled stays as the power loss left it (the old store is poisoned first).
    Yes,
    /// The old broker closes normally and persists its index to sled on the way down.
    No,
}

/// Power loss under a running broker: returns the disk as it comes back. `probe_topic` must
/// be a topic the broker already has (a write to it poisons the old store, see the module
/// docs). Every other holder of `b` must be gone.
fn crash(
    disk: &SimStorage,
    b: Arc<Broker>,
    mode: CrashMode,
    freeze: Freeze,
    probe_topic: &str,
) -> SimStorage {
    let after = disk.crash(mode);
    close_dead(b, freeze, probe_topic);
    after
}

/// Stop a broker whose disk has crashed (see [`crash`]).
fn close_dead(b: Arc<Broker>, freeze: Freeze, probe_topic: &str) {
    if freeze == Freeze::Yes {
        poison(&b, probe_topic);
    }
    // Stops the check-back thread (joined) and the flusher; errors are expected.
    close_after_crash(b);
}

/// The visible copies of a transaction's message.
fn copies_of(b: &Broker, topic: &str, txn: TxnId) -> Vec<Delivery> {
    let id = txn.0.to_string();
    visible(b, topic)
        .into_iter()
        .filter(|d| d.properties.get(PROP_TXN) == Some(&id))
        .collect()
}

fn listed(b: &Broker, txn: TxnId) -> Option<TxnInfo> {
    b.transactions(None).into_iter().find(|i| i.txn_id == txn.0)
}

/// Busy-wait (the operations it waits for take microseconds), with a generous limit.
fn spin_until(mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT_LIMIT, "timed out spinning");
        std::hint::spin_loop();
    }
}

/// Busy-wait a random 0-40 µs: about the time one append takes on the simulated disk, so a
/// crash lands anywhere in it (before the write, between write and fsync, after).
fn spin_for(rng: &mut fastrand::Rng) {
    let until = Instant::now() + Duration::from_nanos(rng.u64(0..40_000));
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// One half message as its producer sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Half {
    topic: String,
    key: String,
    body: Vec<u8>,
    group: String,
}

impl Half {
    fn new(topic: &str, key: &str, body: impl Into<Vec<u8>>, group: &str) -> Half {
        Half {
            topic: topic.to_owned(),
            key: key.to_owned(),
            body: body.into(),
            group: group.to_owned(),
        }
    }

    fn message(&self) -> Message {
        Message::new(self.body.clone())
            .with_key(self.key.clone())
            .with_property(PROP_ORIGIN, "txn_crash")
    }

    fn send(&self, b: &Broker) -> halfmq::Result<TxnId> {
        b.send_half(
            &self.topic,
            &self.message(),
            &self.group,
            HalfOptions::default(),
        )
    }

    /// Whether a checker sees this half.
    fn matches(&self, h: &HalfMessage) -> bool {
        h.topic == self.topic
            && h.key == self.key
            && h.body == self.body
            && h.producer_group == self.group
            && h.properties.get(PROP_ORIGIN).map(String::as_str) == Some("txn_crash")
            && !h.properties.keys().any(|k| k.starts_with("halfmq."))
    }
}

/// Asserts that `txn` is exactly one of committed-and-visible-once, rolled-back-and-never-
/// visible, or pending-listed-and-invisible, and returns which.
fn classify(b: &Broker, txn: TxnId, h: &Half, ctx: &str) -> TxnState {
    let state = b
        .transaction_state(txn)
        .unwrap_or_else(|e| panic!("{ctx}: state of txn {txn}: {e}"));
    let copies = copies_of(b, &h.topic, txn);
    let info = listed(b, txn);
    match state {
        TxnState::Committed => {
            assert_eq!(copies.len(), 1, "{ctx}: committed txn {txn} visible once");
            let d = &copies[0];
            assert_eq!(
                (&d.key, &d.body),
                (&h.key, &h.body),
                "{ctx}: txn {txn} key and body"
            );
            assert_eq!(
                d.properties.get(PROP_ORIGIN).map(String::as_str),
                Some("txn_crash"),
                "{ctx}: txn {txn} user property"
            );
            assert!(info.is_none(), "{ctx}: committed txn {txn} still listed");
        }
        TxnState::RolledBack => {
            assert!(copies.is_empty(), "{ctx}: rolled-back txn {txn} is visible");
            assert!(info.is_none(), "{ctx}: rolled-back txn {txn} still listed");
        }
        TxnState::Pending | TxnState::Unresolved => {
            assert!(copies.is_empty(), "{ctx}: unfinished txn {txn} is visible");
            let info = info.unwrap_or_else(|| panic!("{ctx}: unfinished txn {txn} not listed"));
            assert_eq!(
                (&info.topic, &info.key, &info.producer_group, info.state),
                (&h.topic, &h.key, &h.group, state),
                "{ctx}: listing of txn {txn}"
            );
        }
    }
    state
}

/// The messages of `topic` as (key, body, txn property), sorted.
fn topic_contents(b: &Broker, topic: &str) -> Vec<(String, Vec<u8>, Option<String>)> {
    let mut v: Vec<_> = visible(b, topic)
        .into_iter()
        .map(|d| (d.key, d.body, d.properties.get(PROP_TXN).cloned()))
        .collect();
    v.sort();
    v
}

/// Asserts that `topic` holds exactly the messages of these committed transactions (and no
/// plain sends), each once.
fn assert_topic_holds(b: &Broker, topic: &str, committed: &[(TxnId, &Half)], ctx: &str) {
    let mut want: Vec<_> = committed
        .iter()
        .map(|(t, h)| (h.key.clone(), h.body.clone(), Some(t.0.to_string())))
        .collect();
    want.sort();
    assert_eq!(
        topic_contents(b, topic),
        want,
        "{ctx}: messages visible in {topic}"
    );
}

/// Asserts that each of the transactions `hs` (with ids `ids`) is in the state `want` says,
/// and that `topic` holds exactly the committed ones.
fn assert_as_wanted(
    b: &Broker,
    topic: &str,
    (hs, ids, want): (&[Half], &[TxnId], &[TxnState]),
    ctx: &str,
) {
    for (i, h) in hs.iter().enumerate() {
        assert_eq!(classify(b, ids[i], h, ctx), want[i], "{ctx}: txn {i}");
    }
    let committed: Vec<(TxnId, &Half)> = (0..hs.len())
        .filter(|&i| want[i] == TxnState::Committed)
        .map(|i| (ids[i], &hs[i]))
        .collect();
    assert_topic_holds(b, topic, &committed, ctx);
}

/// A checker that answers `answer` for the halves it knows (checking that it is shown the
/// right message) and `Unknown` for anything else.
fn answering(
    known: HashMap<u64, Half>,
    answer: CheckAnswer,
) -> Arc<dyn halfmq::TransactionChecker> {
    Arc::new(move |h: &HalfMessage| match known.get(&h.txn_id.0) {
        Some(want) if want.matches(h) => answer,
        _ => CheckAnswer::Unknown,
    })
}

/// Register a checker answering Commit for `txn`, wait until check-back committed it, and
/// assert it is visible exactly once.
fn commit_by_check_back(b: &Broker, txn: TxnId, h: &Half, ctx: &str) {
    let known = HashMap::from([(txn.0, h.clone())]);
    b.register_checker(&h.group, answering(known, CheckAnswer::Commit))
        .unwrap();
    wait_until(
        &format!("{ctx}: check-back commits txn {txn}"),
        WAIT_LIMIT,
        || b.transaction_state(txn).unwrap() == TxnState::Committed,
    );
    assert_eq!(classify(b, txn, h, ctx), TxnState::Committed);
}

/// `txn` (pending) is committed by a check-back ([`commit_by_check_back`]), and that commit
/// survives the next crash: committed and visible once after the reopen. Closes the broker.
fn committed_by_check_back_survives_a_crash(
    (disk, cfg, b): (&SimStorage, &BrokerConfig, Arc<Broker>),
    (mode, freeze): (CrashMode, Freeze),
    (txn, h): (TxnId, &Half),
    ctx: &str,
) {
    commit_by_check_back(&b, txn, h, ctx);
    let disk = crash(disk, b, mode, freeze, &h.topic);
    let b = open(&disk, cfg);
    assert_eq!(classify(&b, txn, h, ctx), TxnState::Committed);
    assert_topic_holds(&b, &h.topic, &[(txn, h)], ctx);
    b.close().unwrap();
}

fn modes(seeds: std::ops::Range<u64>) -> Vec<CrashMode> {
    std::iter::once(CrashMode::DropUnsynced)
        .chain(seeds.map(|seed| CrashMode::KeepRandomPrefix { seed }))
        .collect()
}

fn expect_conflict(r: halfmq::Result<()>, txn: TxnId, stands: &str, ctx: &str) {
    match r {
        Err(Error::TxnConflict { txn: t, stands: s }) if t == txn.0 && s == stands => {}
        other => panic!("{ctx}: expected TxnConflict({txn}, {stands}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A crash at every step of a transaction
// ---------------------------------------------------------------------------------------------

/// A half that was acknowledged is never lost: after any crash it is pending (never
/// visible), a checker is asked again and its "commit" makes the message visible once, and
/// that commit survives the next crash. With and without a checkpoint (sled persistence of
/// the index) between the half and the crash.
#[test]
fn acknowledged_half_survives_any_crash_and_is_checked_again() {
    for mode in modes(0..6) {
        for (checkpoint_bytes, filler) in
            [(CHECKPOINT_BYTES_NEVER, 0), (CHECKPOINT_BYTES_SMALL, 40)]
        {
            for freeze in [Freeze::Yes, Freeze::No] {
                let ctx = format!("{mode:?} checkpoint_bytes {checkpoint_bytes} {freeze:?}");
                let (_tmp, disk, cfg, b) =
                    fresh_sim(|dir| config(dir, eager_txn(), checkpoint_bytes), "pay", 3);
                let h = Half::new("pay", "order-1", "charged 12.50", "pay-svc");
                let txn = h.send(&b).unwrap();
                // Traffic after the half, so that checkpoints land after it.
                for i in 0..filler {
                    b.send("other", &Message::new(vec![i as u8; 1000])).unwrap();
                }
                let disk = crash(&disk, b, mode, freeze, "pay");
                let b = open(&disk, &cfg);
                assert!(
                    matches!(classify(&b, txn, &h, &ctx), TxnState::Pending),
                    "{ctx}: an acknowledged half without outcome comes back pending"
                );
                assert_topic_holds(&b, "pay", &[], &ctx);
                committed_by_check_back_survives_a_crash(
                    (&disk, &cfg, b),
                    (mode, freeze),
                    (txn, &h),
                    &ctx,
                );
            }
        }
    }
}

/// A crash right after each step returned: halves (pending), a commit (committed, visible
/// once), a rollback (rolled back, never visible), a check-back's commit (committed). After
/// every reopen the repeated outcome is a no-op and the opposite one is a conflict.
#[test]
fn acknowledged_outcomes_survive_a_crash_right_after_they_returned() {
    for mode in modes(0..4) {
        for freeze in [Freeze::Yes, Freeze::No] {
            let ctx = format!("{mode:?} {freeze:?}");
            let (_tmp, mut disk, cfg, mut b) = fresh_sim(
                |dir| config(dir, eager_txn(), CHECKPOINT_BYTES_SMALL),
                "t",
                2,
            );
            let a = Half::new("t", "a", vec![b'a'; 3000], "g");
            let r = Half::new("t", "r", vec![b'r'; 3000], "g");
            let c = Half::new("t", "c", vec![b'c'; 3000], "g");
            let (ta, tr, tc) = (
                a.send(&b).unwrap(),
                r.send(&b).unwrap(),
                c.send(&b).unwrap(),
            );
            // Crash right after the last step returned, reopen, and check that each of the
            // three is exactly one of the allowed states.
            let mut step = |b: Arc<Broker>, what: &str| -> Arc<Broker> {
                disk = crash(&disk, b, mode, freeze, "t");
                let b = open(&disk, &cfg);
                let ctx = format!("{ctx}, crash after {what}");
                classify(&b, ta, &a, &ctx);
                classify(&b, tr, &r, &ctx);
                classify(&b, tc, &c, &ctx);
                b
            };
            b = step(b, "three halves");
            for (t, h) in [(ta, &a), (tr, &r), (tc, &c)] {
                assert_eq!(classify(&b, t, h, &ctx), TxnState::Pending, "{ctx}");
            }
            b.commit(ta).unwrap();
            b = step(b, "commit");
            assert_eq!(classify(&b, ta, &a, &ctx), TxnState::Committed);
            b.commit(ta).unwrap();
            expect_conflict(b.rollback(ta), ta, "committed", &ctx);
            b.rollback(tr).unwrap();
            b = step(b, "rollback");
            assert_eq!(classify(&b, ta, &a, &ctx), TxnState::Committed);
            assert_eq!(classify(&b, tr, &r, &ctx), TxnState::RolledBack);
            b.rollback(tr).unwrap();
            expect_conflict(b.commit(tr), tr, "rolled back", &ctx);
            assert_topic_holds(&b, "t", &[(ta, &a)], &ctx);
            // Only c is still pending: a checker that would commit anything asked about must
            // resolve c and nothing else.
            let known = HashMap::from([(ta.0, a.clone()), (tr.0, r.clone()), (tc.0, c.clone())]);
            b.register_checker("g", answering(known, CheckAnswer::Commit))
                .unwrap();
            wait_until("check-back commits c", WAIT_LIMIT, || {
                b.transaction_state(tc).unwrap() == TxnState::Committed
            });
            b = step(b, "check-back commit");
            assert_eq!(classify(&b, ta, &a, &ctx), TxnState::Committed);
            assert_eq!(classify(&b, tr, &r, &ctx), TxnState::RolledBack);
            assert_eq!(classify(&b, tc, &c, &ctx), TxnState::Committed);
            assert_topic_holds(&b, "t", &[(ta, &a), (tc, &c)], &ctx);
            b.commit(tc).unwrap();
            expect_conflict(b.rollback(tc), tc, "committed", &ctx);
            assert!(
                b.transactions(None).is_empty(),
                "{ctx}: nothing left pending"
            );
            b.close().unwrap();
        }
    }
}

/// What one step of the scripted transaction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    SendHalf(usize),
    Commit(usize),
    Rollback(usize),
    CheckBackCommit(usize),
}

/// Deterministically, for every step of a script and both sides of it: the step's write
/// fails to sync (then the power goes), or the step returned and then the power goes. The
/// steps before it hold, the failed step left no trace beyond "pending", and the script
/// completes after the reopen with every message visible exactly once.
#[test]
fn every_step_of_a_transaction_either_happened_or_did_not() {
    use Step::*;
    let script = [
        SendHalf(0),
        SendHalf(1),
        Commit(0),
        SendHalf(2),
        Rollback(1),
        CheckBackCommit(2),
        SendHalf(3),
        Rollback(3),
    ];
    let halves: Vec<Half> = (0..4)
        .map(|i| Half::new("s", &format!("k{i}"), format!("body-{i}"), "grp"))
        .collect();
    for cut in 0..script.len() {
        for step_failed in [true, false] {
            for mode in [
                CrashMode::DropUnsynced,
                CrashMode::KeepRandomPrefix { seed: cut as u64 },
            ] {
                let ctx = format!(
                    "cut at step {cut} {:?}, failed {step_failed}, {mode:?}",
                    script[cut]
                );
                let (_tmp, disk, cfg, b) = fresh_sim(
                    |dir| config(dir, eager_txn(), CHECKPOINT_BYTES_NEVER),
                    "s",
                    2,
                );
                let asked = Arc::new(AtomicU32::new(0));
                let mut ids: Vec<Option<TxnId>> = vec![None; halves.len()];
                let mut expect: Vec<Option<TxnState>> = vec![None; halves.len()];
                for (i, &step) in script.iter().enumerate().take(cut + 1) {
                    let failing = i == cut && step_failed;
                    if failing {
                        disk.set_faults(Faults {
                            fail_syncs: 1,
                            ..Faults::default()
                        });
                    }
                    let ok = match step {
                        SendHalf(n) => match halves[n].send(&b) {
                            Ok(t) => {
                                ids[n] = Some(t);
                                expect[n] = Some(TxnState::Pending);
                                true
                            }
                            Err(_) => false,
                        },
                        Commit(n) => b.commit(ids[n].unwrap()).is_ok(),
                        Rollback(n) => b.rollback(ids[n].unwrap()).is_ok(),
                        CheckBackCommit(n) => {
                            let t = ids[n].unwrap();
                            let a = asked.clone();
                            let h = halves[n].clone();
                            b.register_checker(
                                "grp",
                                Arc::new(move |m: &HalfMessage| {
                                    if m.txn_id == t && h.matches(m) {
                                        a.fetch_add(1, Ordering::SeqCst);
                                        CheckAnswer::Commit
                                    } else {
                                        CheckAnswer::Unknown
                                    }
                                }),
                            )
                            .unwrap();
                            if failing {
                                // The checker answers, the commit it decided cannot sync.
                                wait_until(&ctx, WAIT_LIMIT, || asked.load(Ordering::SeqCst) > 0);
                                std::thread::sleep(Duration::from_millis(50));
                                b.transaction_state(t).unwrap() == TxnState::Committed
                            } else {
                                wait_until(&ctx, WAIT_LIMIT, || {
                                    b.transaction_state(t).unwrap() == TxnState::Committed
                                });
                                true
                            }
                        }
                    };
                    assert_eq!(ok, !failing, "{ctx}: step {i} {step:?} result");
                    if ok {
                        match step {
                            SendHalf(_) => {}
                            Commit(n) | CheckBackCommit(n) => expect[n] = Some(TxnState::Committed),
                            Rollback(n) => expect[n] = Some(TxnState::RolledBack),
                        }
                    }
                }
                let disk = crash(&disk, b, mode, Freeze::Yes, "s");
                let b = open(&disk, &cfg);
                // A half whose write failed is not there; a failed outcome leaves it pending.
                for n in 0..halves.len() {
                    if let (Some(t), Some(want)) = (ids[n], expect[n]) {
                        assert_eq!(classify(&b, t, &halves[n], &ctx), want, "{ctx}: txn {n}");
                    }
                }
                let listed_keys: Vec<String> =
                    b.transactions(None).into_iter().map(|i| i.key).collect();
                let want_keys: Vec<String> = (0..halves.len())
                    .filter(|&n| expect[n] == Some(TxnState::Pending))
                    .map(|n| halves[n].key.clone())
                    .collect();
                assert_eq!(listed_keys, want_keys, "{ctx}: pending after the crash");
                // Finish the script's intent: commit what is still pending by check-back.
                let known: HashMap<u64, Half> = (0..halves.len())
                    .filter_map(|n| ids[n].map(|t| (t.0, halves[n].clone())))
                    .collect();
                b.register_checker("grp", answering(known, CheckAnswer::Commit))
                    .unwrap();
                wait_until(&format!("{ctx}: all resolved"), WAIT_LIMIT, || {
                    b.transactions(None).is_empty()
                });
                let committed: Vec<(TxnId, &Half)> = (0..halves.len())
                    .filter(|&n| ids[n].is_some() && expect[n] != Some(TxnState::RolledBack))
                    .map(|n| (ids[n].unwrap(), &halves[n]))
                    .collect();
                assert_topic_holds(&b, "s", &committed, &ctx);
                b.close().unwrap();
            }
        }
    }
}

/// Halves written by two threads while the power goes (after a seeded number of
/// acknowledgements, random surviving prefix). Every acknowledged half is pending after the
/// reopen; the only other halves that may be there are the one each thread had in flight;
/// none is visible; check-back then commits each exactly once. (Under sync flush the in-flight
/// half is in practice always lost: the window between its write and its fsync is too short
/// to hit. Surviving unacknowledged records are covered under async flush below.)
#[test]
fn crash_while_halves_are_in_flight() {
    const THREADS: usize = 2;
    // Small records, so that everything stays in the first segment (a crash during a segment
    // roll is a known store bug, see tests/model.rs).
    const PER_THREAD: usize = 200;
    // What happened to the half each thread had in flight: (survived, lost, none in flight).
    let mut tally = (0u32, 0u32, 0u32);
    for seed in 0..24u64 {
        let ctx = format!("seed {seed}");
        let (_tmp, disk, cfg, b) = fresh_sim(
            |dir| config(dir, eager_txn(), CHECKPOINT_BYTES_NEVER),
            "h",
            4,
        );
        let started = Arc::new(AtomicU32::new(0));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (b, started) = (b.clone(), started.clone());
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0..PER_THREAD {
                        let h = Half::new("h", &format!("t{t}-{i}"), vec![b'x'; 16], "g");
                        match h.send(&b) {
                            Ok(txn) => acked.push((txn, h)),
                            Err(_) => return (acked, Some(h)),
                        }
                        started.fetch_add(1, Ordering::SeqCst);
                    }
                    (acked, None)
                })
            })
            .collect();
        // The power goes after a seeded number of acknowledged halves, while the senders are
        // busy, so that a write is often on its way to the disk.
        let target =
            fastrand::Rng::with_seed(seed).u32(THREADS as u32..(THREADS * PER_THREAD / 2) as u32);
        spin_until(|| started.load(Ordering::SeqCst) >= target);
        spin_for(&mut fastrand::Rng::with_seed(!seed));
        let after = disk.crash(CrashMode::KeepRandomPrefix { seed });
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        close_dead(b, Freeze::Yes, "h");
        let b = open(&after, &cfg);
        let mut all: HashMap<String, (Option<TxnId>, Half)> = HashMap::new();
        for (acked, in_flight) in &results {
            for (t, h) in acked {
                all.insert(h.key.clone(), (Some(*t), h.clone()));
            }
            if let Some(h) = in_flight {
                all.insert(h.key.clone(), (None, h.clone()));
            }
        }
        let pending = b.transactions(None);
        for (_, in_flight) in &results {
            match in_flight {
                Some(h) if pending.iter().any(|i| i.key == h.key) => tally.0 += 1,
                Some(_) => tally.1 += 1,
                None => tally.2 += 1,
            }
        }
        for info in &pending {
            let (acked_id, h) = all
                .get(&info.key)
                .unwrap_or_else(|| panic!("{ctx}: unexpected pending half {info:?}"));
            assert!(
                acked_id.is_none_or(|t| t.0 == info.txn_id),
                "{ctx}: id of {info:?}"
            );
            assert_eq!((&info.topic, &info.producer_group), (&h.topic, &h.group));
        }
        for (t, h) in results.iter().flat_map(|(a, _)| a) {
            assert_eq!(
                classify(&b, *t, h, &ctx),
                TxnState::Pending,
                "{ctx}: acked half"
            );
        }
        assert!(visible(&b, "h").is_empty(), "{ctx}: a half is visible");
        let known: HashMap<u64, Half> = pending
            .iter()
            .map(|i| (i.txn_id, all[&i.key].1.clone()))
            .collect();
        b.register_checker("g", answering(known, CheckAnswer::Commit))
            .unwrap();
        wait_until(&format!("{ctx}: all committed"), WAIT_LIMIT, || {
            b.transactions(None).is_empty()
        });
        let committed: Vec<(TxnId, &Half)> = pending
            .iter()
            .map(|i| (TxnId(i.txn_id), &all[&i.key].1))
            .collect();
        assert_topic_holds(&b, "h", &committed, &ctx);
        b.close().unwrap();
    }
    eprintln!(
        "halves in flight at the crash: {} survived (pending), {} lost, {} threads had none",
        tally.0, tally.1, tally.2
    );
}

/// Commits and rollbacks written by another thread while the power goes. Each acknowledged
/// outcome holds; the one in flight is either done or the transaction is pending; the rest are
/// pending; nothing is visible twice. A checker then finishes each the way it was meant.
#[test]
fn crash_while_outcomes_are_in_flight() {
    // Small records, so that everything stays in the first segment (see above).
    const N: usize = 200;
    let meant = |i: usize| {
        if i % 3 == 2 {
            TxnState::RolledBack
        } else {
            TxnState::Committed
        }
    };
    // What happened to the outcome in flight: (done, still pending, none in flight).
    let mut tally = (0u32, 0u32, 0u32);
    for seed in 0..16u64 {
        for freeze in [Freeze::Yes, Freeze::No] {
            let ctx = format!("seed {seed} {freeze:?}");
            let (_tmp, disk, cfg, b) = fresh_sim(
                |dir| config(dir, eager_txn(), checkpoints_by_seed(seed)),
                "o",
                3,
            );
            let halves: Vec<Half> = (0..N)
                .map(|i| Half::new("o", &format!("k{i}"), vec![i as u8; 20], "g"))
                .collect();
            let ids: Vec<TxnId> = halves.iter().map(|h| h.send(&b).unwrap()).collect();
            let done = Arc::new(AtomicU32::new(0));
            let worker = {
                let (b, ids, done) = (b.clone(), ids.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    for (i, &t) in ids.iter().enumerate() {
                        let r = if meant(i) == TxnState::RolledBack {
                            b.rollback(t)
                        } else {
                            b.commit(t)
                        };
                        done.fetch_add(1, Ordering::SeqCst);
                        match r {
                            Ok(()) => acked.push(i),
                            Err(_) => return (acked, Some(i)),
                        }
                    }
                    (acked, None)
                })
            };
            let target = fastrand::Rng::with_seed(seed).u32(1..N as u32 / 2);
            spin_until(|| done.load(Ordering::SeqCst) >= target);
            spin_for(&mut fastrand::Rng::with_seed(!seed));
            let mode = CrashMode::KeepRandomPrefix { seed };
            let after = disk.crash(mode);
            let (acked, in_flight) = worker.join().unwrap();
            close_dead(b, freeze, "o");
            let b = open(&after, &cfg);
            for (i, h) in halves.iter().enumerate() {
                let got = classify(&b, ids[i], h, &ctx);
                if acked.contains(&i) {
                    assert_eq!(got, meant(i), "{ctx}: acknowledged outcome of {i}");
                } else if in_flight == Some(i) {
                    if got == TxnState::Pending {
                        tally.1 += 1;
                    } else {
                        tally.0 += 1;
                    }
                    assert!(
                        got == meant(i) || got == TxnState::Pending,
                        "{ctx}: in-flight outcome of {i} is {got:?}"
                    );
                } else {
                    assert_eq!(got, TxnState::Pending, "{ctx}: never resolved {i}");
                }
            }
            // A checker finishes each pending one the way it was meant.
            let known: HashMap<u64, (Half, CheckAnswer)> = halves
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let a = if meant(i) == TxnState::RolledBack {
                        CheckAnswer::Rollback
                    } else {
                        CheckAnswer::Commit
                    };
                    (ids[i].0, (h.clone(), a))
                })
                .collect();
            b.register_checker(
                "g",
                Arc::new(move |m: &HalfMessage| match known.get(&m.txn_id.0) {
                    Some((h, a)) if h.matches(m) => *a,
                    _ => CheckAnswer::Unknown,
                }),
            )
            .unwrap();
            wait_until(&format!("{ctx}: all resolved"), WAIT_LIMIT, || {
                b.transactions(None).is_empty()
            });
            let committed: Vec<(TxnId, &Half)> = (0..N)
                .filter(|&i| meant(i) == TxnState::Committed)
                .map(|i| (ids[i], &halves[i]))
                .collect();
            assert_topic_holds(&b, "o", &committed, &ctx);
            // And once more through a crash.
            let disk2 = crash(&after, b, CrashMode::DropUnsynced, freeze, "o");
            let b = open(&disk2, &cfg);
            for (i, h) in halves.iter().enumerate() {
                assert_eq!(classify(&b, ids[i], h, &ctx), meant(i), "{ctx}: final {i}");
            }
            assert_topic_holds(&b, "o", &committed, &ctx);
            b.close().unwrap();
            tally.2 += u32::from(in_flight.is_none());
        }
    }
    eprintln!(
        "outcomes in flight at the crash: {} done, {} left pending, {} runs had none",
        tally.0, tally.1, tally.2
    );
}

/// The checker is being asked when the power goes; it answers "commit" only after the crash,
/// so nothing can be written: after the reopen the transaction is pending (not lost, not
/// visible) and is checked again.
#[test]
fn crash_while_a_checker_is_being_asked() {
    for mode in modes(0..4) {
        let ctx = format!("{mode:?}");
        let (_tmp, disk, cfg, b) = fresh_sim(
            |dir| config(dir, eager_txn(), CHECKPOINT_BYTES_NEVER),
            "c",
            2,
        );
        let h = Half::new("c", "order-9", "ship it", "shop");
        let (entered_tx, entered_rx) = mpsc::channel::<TxnId>();
        let (answer_tx, answer_rx) = mpsc::channel::<CheckAnswer>();
        let (entered_tx, answer_rx) = (Mutex::new(entered_tx), Mutex::new(answer_rx));
        b.register_checker(
            "shop",
            Arc::new(move |m: &HalfMessage| {
                let _ = entered_tx.lock().unwrap().send(m.txn_id);
                answer_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or(CheckAnswer::Unknown)
            }),
        )
        .unwrap();
        let txn = h.send(&b).unwrap();
        let asked = entered_rx.recv_timeout(WAIT_LIMIT).unwrap();
        assert_eq!(asked, txn);
        let after = disk.crash(mode);
        answer_tx.send(CheckAnswer::Commit).unwrap();
        // Give the old broker's check-back loop time to try the commit on the dead disk.
        std::thread::sleep(Duration::from_millis(100));
        assert_ne!(b.transaction_state(txn).unwrap(), TxnState::Committed);
        close_dead(b, Freeze::Yes, "c");
        let b = open(&after, &cfg);
        assert_eq!(classify(&b, txn, &h, &ctx), TxnState::Pending);
        committed_by_check_back_survives_a_crash(
            (&after, &cfg, b),
            (mode, Freeze::Yes),
            (txn, &h),
            &ctx,
        );
    }
}

/// The checker answers "commit" at once and the power goes while the broker writes that
/// commit (random moment, random surviving prefix): afterwards it is committed and visible
/// once, or pending and committed by the next check — never visible twice, never lost.
#[test]
fn crash_while_a_check_back_commit_is_written() {
    let mut outcomes = BTreeMap::new();
    for seed in 0..16u64 {
        let ctx = format!("seed {seed}");
        let (_tmp, disk, cfg, b) = fresh_sim(
            |dir| config(dir, eager_txn(), CHECKPOINT_BYTES_NEVER),
            "w",
            2,
        );
        let hs: Vec<Half> = (0..3)
            .map(|i| Half::new("w", &format!("k{i}"), vec![b'w'; 700], "shop"))
            .collect();
        let ids: Vec<TxnId> = hs.iter().map(|h| h.send(&b).unwrap()).collect();
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let entered_tx = Mutex::new(entered_tx);
        b.register_checker(
            "shop",
            Arc::new(move |_: &HalfMessage| {
                let _ = entered_tx.lock().unwrap().send(());
                CheckAnswer::Commit
            }),
        )
        .unwrap();
        entered_rx.recv_timeout(WAIT_LIMIT).unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        std::thread::sleep(Duration::from_micros(rng.u64(0..400)));
        let after = disk.crash(CrashMode::KeepRandomPrefix { seed });
        close_dead(b, Freeze::Yes, "w");
        let b = open(&after, &cfg);
        for (t, h) in ids.iter().zip(&hs) {
            let got = classify(&b, *t, h, &ctx);
            assert!(
                matches!(got, TxnState::Committed | TxnState::Pending),
                "{ctx}: {got:?}"
            );
            *outcomes.entry(got.as_str()).or_insert(0u32) += 1;
        }
        let known: HashMap<u64, Half> = ids.iter().map(|t| t.0).zip(hs.iter().cloned()).collect();
        b.register_checker("shop", answering(known, CheckAnswer::Commit))
            .unwrap();
        wait_until(&format!("{ctx}: all committed"), WAIT_LIMIT, || {
            b.transactions(None).is_empty()
        });
        let committed: Vec<(TxnId, &Half)> = ids.iter().copied().zip(hs.iter()).collect();
        assert_topic_holds(&b, "w", &committed, &ctx);
        b.close().unwrap();
    }
    eprintln!("crash while a check-back commit is written: states after reopen {outcomes:?}");
}

/// One operation of the async-flush script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxOp {
    Half(usize),
    Commit(usize),
    Rollback(usize),
}

/// The state of each half after the first `k` operations of `ops` (None: not written).
fn states_after(ops: &[TxOp], k: usize, halves: usize) -> Vec<Option<TxnState>> {
    let mut st = vec![None; halves];
    for op in &ops[..k] {
        match *op {
            TxOp::Half(n) => st[n] = Some(TxnState::Pending),
            TxOp::Commit(n) => st[n] = Some(TxnState::Committed),
            TxOp::Rollback(n) => st[n] = Some(TxnState::RolledBack),
        }
    }
    st
}

/// Unacknowledged-as-durable transaction records surviving in part: under async flush with
/// a long interval nothing is synced, each operation is one unsynced write of the log, and a
/// crash keeping a random prefix of them (the last possibly torn) must leave the broker
/// exactly as after some prefix of the operations — each half absent (unknown) or there, each
/// outcome there only with its half, committed ones visible once — and check-back then
/// finishes every surviving pending one. (Under sync flush the window between a write and its
/// fsync is too short for a crash to land in; no check or checkpoint writes sled here, so the
/// async phantom bug below does not interfere.)
#[test]
fn unsynced_transaction_records_survive_as_a_prefix_under_async_flush() {
    let mut kept = Vec::new();
    for seed in 0..24u64 {
        let ctx = format!("seed {seed}");
        let (_tmp, disk, cfg, b) = fresh_sim(|dir| async_flush(dir, 60), "u", 2);
        // Recovery's own checkpoint, and the topic's index files, are durable; from here on
        // nothing is synced.
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut halves: Vec<Half> = Vec::new();
        let mut ids: Vec<TxnId> = Vec::new();
        let mut pending: Vec<usize> = Vec::new();
        let mut ops = Vec::new();
        for _ in 0..40 {
            if pending.is_empty() || rng.bool() {
                let n = halves.len();
                let h = Half::new("u", &format!("k{n}"), vec![b'u'; rng.usize(1..1500)], "g");
                ids.push(h.send(&b).unwrap());
                halves.push(h);
                pending.push(n);
                ops.push(TxOp::Half(n));
            } else {
                let n = pending.swap_remove(rng.usize(..pending.len()));
                if rng.bool() {
                    b.commit(ids[n]).unwrap();
                    ops.push(TxOp::Commit(n));
                } else {
                    b.rollback(ids[n]).unwrap();
                    ops.push(TxOp::Rollback(n));
                }
            }
        }
        let mode = if seed == 0 {
            CrashMode::DropUnsynced
        } else {
            CrashMode::KeepRandomPrefix { seed }
        };
        let disk = crash(&disk, b, mode, Freeze::No, "u");
        let b = open(&disk, &cfg);
        let observed: Vec<Option<TxnState>> = ids
            .iter()
            .map(|&t| match b.transaction_state(t) {
                Ok(s) => Some(s),
                Err(Error::UnknownTxn(_)) => None,
                Err(e) => panic!("{ctx}: state of {t}: {e}"),
            })
            .collect();
        let k = (0..=ops.len())
            .rev()
            .find(|&k| states_after(&ops, k, halves.len()) == observed)
            .unwrap_or_else(|| {
                panic!("{ctx}: the state after the crash is no prefix of {ops:?}: {observed:?}")
            });
        kept.push(k);
        for (n, h) in halves.iter().enumerate() {
            if observed[n].is_some() {
                classify(&b, ids[n], h, &ctx);
            }
        }
        let live: Vec<u64> = b.transactions(None).iter().map(|i| i.txn_id).collect();
        let want: Vec<u64> = (0..halves.len())
            .filter(|&n| observed[n] == Some(TxnState::Pending))
            .map(|n| ids[n].0)
            .collect();
        assert_eq!(live, want, "{ctx}: pending after the crash (prefix {k})");
        let known: HashMap<u64, Half> = (0..halves.len())
            .filter(|&n| observed[n].is_some())
            .map(|n| (ids[n].0, halves[n].clone()))
            .collect();
        b.register_checker("g", answering(known, CheckAnswer::Commit))
            .unwrap();
        // The quiet configuration checks only re-armed transactions.
        for &t in &live {
            b.rearm(TxnId(t)).unwrap();
        }
        wait_until(&format!("{ctx}: all committed"), WAIT_LIMIT, || {
            b.transactions(None).is_empty()
        });
        let committed: Vec<(TxnId, &Half)> = (0..halves.len())
            .filter(|&n| matches!(observed[n], Some(TxnState::Pending | TxnState::Committed)))
            .map(|n| (ids[n], &halves[n]))
            .collect();
        assert_topic_holds(&b, "u", &committed, &ctx);
        b.close().unwrap();
    }
    eprintln!("async flush: operations kept (of 40) per seed: {kept:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Model test
// ---------------------------------------------------------------------------------------------

const TOPICS: [&str; 2] = ["orders", "refunds"];
/// Keys a message may have; "" is no key (round robin over the queues).
const KEYS: [&str; 3] = ["", "alice", "bob"];
const GROUPS: [&str; 2] = ["billing", "shipping"];
/// An id no record can have (log offsets of records are far smaller).
const NEVER_A_TXN: u64 = u64::MAX - 1;

/// Cases of the model test: `HALFMQ_MODEL_CASES`, or 48.
fn cases() -> u32 {
    std::env::var("HALFMQ_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
}

#[derive(Debug, Clone)]
enum Op {
    /// send_half(TOPICS[topic], KEYS[key], GROUPS[group], a body of `len` bytes).
    SendHalf {
        topic: usize,
        key: usize,
        group: usize,
        len: usize,
    },
    /// Commit one of the transactions so far (whatever its state).
    Commit(Index),
    /// Roll back one of the transactions so far (whatever its state).
    Rollback(Index),
    /// Commit or roll back an id that is not a transaction (a plain message's log offset).
    NotATxn { rollback: bool, which: Index },
    /// A plain send.
    Send {
        topic: usize,
        key: usize,
        len: usize,
    },
    /// Re-arm one of the transactions so far and let its checker answer this.
    CheckBack { which: Index, answer: CheckAnswer },
    /// Power loss and reopen.
    Crash { mode: CrashMode, freeze: bool },
    /// Clean close and reopen.
    Reopen,
}

#[derive(Debug, Clone)]
struct Case {
    checkpoint_bytes: u64,
    ops: Vec<Op>,
    final_crash: CrashMode,
}

fn mode_strategy() -> impl Strategy<Value = CrashMode> {
    prop_oneof![
        Just(CrashMode::DropUnsynced),
        any::<u64>().prop_map(|seed| CrashMode::KeepRandomPrefix { seed }),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let answer = prop_oneof![
        Just(CheckAnswer::Commit),
        Just(CheckAnswer::Rollback),
        Just(CheckAnswer::Unknown)
    ];
    prop_oneof![
        6 => (0..TOPICS.len(), 0..KEYS.len(), 0..GROUPS.len(), 1usize..4000)
            .prop_map(|(topic, key, group, len)| Op::SendHalf { topic, key, group, len }),
        3 => any::<Index>().prop_map(Op::Commit),
        3 => any::<Index>().prop_map(Op::Rollback),
        1 => (any::<bool>(), any::<Index>())
            .prop_map(|(rollback, which)| Op::NotATxn { rollback, which }),
        2 => (0..TOPICS.len(), 0..KEYS.len(), 1usize..4000)
            .prop_map(|(topic, key, len)| Op::Send { topic, key, len }),
        2 => (any::<Index>(), answer).prop_map(|(which, answer)| Op::CheckBack { which, answer }),
        2 => (mode_strategy(), any::<bool>()).prop_map(|(mode, freeze)| Op::Crash { mode, freeze }),
        1 => Just(Op::Reopen),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(CHECKPOINT_BYTES_SMALL), Just(CHECKPOINT_BYTES_NEVER)],
        prop::collection::vec(op_strategy(), 1..40),
        mode_strategy(),
    )
        .prop_map(|(checkpoint_bytes, ops, final_crash)| Case {
            checkpoint_bytes,
            ops,
            final_crash,
        })
}

/// A transaction in the model.
#[derive(Debug, Clone)]
struct MTxn {
    id: TxnId,
    half: Half,
    state: TxnState,
    /// Checks so far (while pending).
    checks: u32,
}

/// A plain message in the model.
#[derive(Debug, Clone)]
struct Plain {
    topic: String,
    key: String,
    body: Vec<u8>,
    log_offset: u64,
}

/// Shared with the checkers: what to answer per transaction, and what each half must be.
#[derive(Default)]
struct CheckerState {
    answers: HashMap<u64, CheckAnswer>,
    halves: HashMap<u64, Half>,
    /// Checks of halves the model did not expect to be checked, or that looked wrong.
    complaints: Vec<String>,
}

struct Harness {
    _tmp: tempfile::TempDir,
    cfg: BrokerConfig,
    disk: SimStorage,
    b: Option<Arc<Broker>>,
    shared: Arc<Mutex<CheckerState>>,
    txns: Vec<MTxn>,
    plain: Vec<Plain>,
    bodies: u64,
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

impl Harness {
    fn new(case: &Case) -> Result<Harness, String> {
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let cfg = config(tmp.path(), quiet_txn(), case.checkpoint_bytes);
        let mut h = Harness {
            _tmp: tmp,
            cfg,
            disk: SimStorage::new(),
            b: None,
            shared: Arc::new(Mutex::new(CheckerState::default())),
            txns: Vec::new(),
            plain: Vec::new(),
            bodies: 0,
        };
        h.open()?;
        for t in TOPICS {
            h.b().create_topic(t, 3).map_err(|e| e.to_string())?;
        }
        Ok(h)
    }

    fn b(&self) -> &Arc<Broker> {
        self.b.as_ref().expect("broker open")
    }

    fn open(&mut self) -> Result<(), String> {
        let b = try_open(&self.disk, &self.cfg).map_err(|e| format!("open: {e}"))?;
        for g in GROUPS {
            let shared = self.shared.clone();
            b.register_checker(
                g,
                Arc::new(move |m: &HalfMessage| {
                    let mut s = shared.lock().unwrap();
                    let Some(&answer) = s.answers.get(&m.txn_id.0) else {
                        s.complaints
                            .push(format!("unexpected check of {}", m.txn_id));
                        return CheckAnswer::Unknown;
                    };
                    if !s.halves.get(&m.txn_id.0).is_some_and(|h| h.matches(m)) {
                        s.complaints
                            .push(format!("check of {} shows the wrong half: {m:?}", m.txn_id));
                    }
                    answer
                }),
            )
            .map_err(|e| e.to_string())?;
        }
        self.b = Some(b);
        Ok(())
    }

    fn body(&mut self, tag: &str, len: usize) -> Vec<u8> {
        self.bodies += 1;
        let mut body = format!("{tag}-{}:", self.bodies).into_bytes();
        let fill = b'a' + (self.bodies % 26) as u8;
        body.resize(len.max(body.len()), fill);
        body
    }

    fn pick(&self, which: &Index) -> Option<usize> {
        (!self.txns.is_empty()).then(|| which.index(self.txns.len()))
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::SendHalf {
                topic,
                key,
                group,
                len,
            } => {
                let body = self.body("half", *len);
                let half = Half::new(TOPICS[*topic], KEYS[*key], body, GROUPS[*group]);
                let id = half.send(self.b()).map_err(|e| format!("send_half: {e}"))?;
                ensure!(
                    self.txns.iter().all(|t| t.id != id),
                    "send_half returned the id {id} of an earlier transaction"
                );
                let mut s = self.shared.lock().unwrap();
                s.halves.insert(id.0, half.clone());
                drop(s);
                self.txns.push(MTxn {
                    id,
                    half,
                    state: TxnState::Pending,
                    checks: 0,
                });
            }
            Op::Commit(which) | Op::Rollback(which) => {
                let commit = matches!(op, Op::Commit(_));
                let Some(i) = self.pick(which) else {
                    return self.not_a_txn(!commit, NEVER_A_TXN);
                };
                let t = self.txns[i].id;
                let got = if commit {
                    self.b().commit(t)
                } else {
                    self.b().rollback(t)
                };
                let (want_state, other) = if commit {
                    (TxnState::Committed, TxnState::RolledBack)
                } else {
                    (TxnState::RolledBack, TxnState::Committed)
                };
                let now = self.txns[i].state;
                if now == other {
                    let stands = other.as_str();
                    ensure!(
                        matches!(&got, Err(Error::TxnConflict { txn, stands: s }) if *txn == t.0 && *s == stands),
                        "txn {t} is {stands}: expected TxnConflict, got {got:?}"
                    );
                } else {
                    ensure!(
                        got.is_ok(),
                        "txn {t} is {}: expected Ok, got {got:?}",
                        now.as_str()
                    );
                    self.txns[i].state = want_state;
                }
            }
            Op::NotATxn { rollback, which } => {
                let id = if self.plain.is_empty() {
                    NEVER_A_TXN
                } else {
                    self.plain[which.index(self.plain.len())].log_offset
                };
                self.not_a_txn(*rollback, id)?;
            }
            Op::Send { topic, key, len } => {
                let body = self.body("plain", *len);
                let msg = Message::new(body.clone()).with_key(KEYS[*key]);
                let r = self
                    .b()
                    .send(TOPICS[*topic], &msg)
                    .map_err(|e| format!("send: {e}"))?;
                self.plain.push(Plain {
                    topic: TOPICS[*topic].to_owned(),
                    key: KEYS[*key].to_owned(),
                    body,
                    log_offset: r.log_offset,
                });
            }
            Op::CheckBack { which, answer } => {
                let Some(i) = self.pick(which) else {
                    return Ok(());
                };
                self.check_back(i, *answer)?;
            }
            Op::Crash { mode, freeze } => {
                let b = self.b.take().expect("broker open");
                let freeze = if *freeze { Freeze::Yes } else { Freeze::No };
                self.disk = crash(&self.disk, b, *mode, freeze, TOPICS[0]);
                self.open()?;
                self.verify()?;
            }
            Op::Reopen => {
                let b = self.b.take().expect("broker open");
                b.close().map_err(|e| format!("clean close: {e}"))?;
                ensure!(sole(b).is_ok(), "the old broker is still shared");
                self.open()?;
                self.verify()?;
            }
        }
        let complaints = std::mem::take(&mut self.shared.lock().unwrap().complaints);
        ensure!(complaints.is_empty(), "checker: {complaints:?}");
        Ok(())
    }

    fn not_a_txn(&self, rollback: bool, id: u64) -> Result<(), String> {
        let got = if rollback {
            self.b().rollback(TxnId(id))
        } else {
            self.b().commit(TxnId(id))
        };
        ensure!(
            matches!(got, Err(Error::UnknownTxn(t)) if t == id),
            "outcome of non-transaction {id}: expected UnknownTxn, got {got:?}"
        );
        let state = self.b().transaction_state(TxnId(id));
        ensure!(
            matches!(state, Err(Error::UnknownTxn(t)) if t == id),
            "state of non-transaction {id}: expected UnknownTxn, got {state:?}"
        );
        Ok(())
    }

    /// Re-arm transaction `i` (due now) and let its checker answer `answer`.
    fn check_back(&mut self, i: usize, answer: CheckAnswer) -> Result<(), String> {
        let t = self.txns[i].id;
        if self.txns[i].state != TxnState::Pending {
            let got = self.b().rearm(t);
            ensure!(
                matches!(got, Err(Error::UnknownTxn(x)) if x == t.0),
                "re-arm of finished txn {t}: expected UnknownTxn, got {got:?}"
            );
            return Ok(());
        }
        self.shared.lock().unwrap().answers.insert(t.0, answer);
        self.b().rearm(t).map_err(|e| format!("rearm {t}: {e}"))?;
        let b = self.b().clone();
        let start = Instant::now();
        let done = loop {
            let state = b.transaction_state(t).map_err(|e| e.to_string())?;
            let info = listed(&b, t);
            let done = match answer {
                CheckAnswer::Commit => state == TxnState::Committed,
                CheckAnswer::Rollback => state == TxnState::RolledBack,
                CheckAnswer::Unknown => info.as_ref().is_some_and(|i| i.checks == 1),
            };
            if done || start.elapsed() > WAIT_LIMIT {
                break done;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        self.shared.lock().unwrap().answers.remove(&t.0);
        ensure!(
            done,
            "check-back answering {answer:?} did not take effect on txn {t}"
        );
        match answer {
            CheckAnswer::Commit => self.txns[i].state = TxnState::Committed,
            CheckAnswer::Rollback => self.txns[i].state = TxnState::RolledBack,
            CheckAnswer::Unknown => self.txns[i].checks = 1,
        }
        Ok(())
    }

    /// Compare the broker with the model.
    fn verify(&self) -> Result<(), String> {
        let b = self.b();
        for t in &self.txns {
            let got = b
                .transaction_state(t.id)
                .map_err(|e| format!("state of txn {}: {e}", t.id))?;
            ensure!(
                got == t.state,
                "txn {} ({:?}) is {got:?}, the model says {:?}",
                t.id,
                t.half.key,
                t.state
            );
        }
        let got: Vec<_> = b
            .transactions(None)
            .into_iter()
            .map(|i| {
                (
                    i.txn_id,
                    i.state,
                    i.topic,
                    i.key,
                    i.producer_group,
                    i.checks,
                )
            })
            .collect();
        let want: Vec<_> = self
            .txns
            .iter()
            .filter(|t| t.state == TxnState::Pending)
            .map(|t| {
                (
                    t.id.0,
                    TxnState::Pending,
                    t.half.topic.clone(),
                    t.half.key.clone(),
                    t.half.group.clone(),
                    t.checks,
                )
            })
            .collect();
        ensure!(
            got == want,
            "unfinished transactions:\n  broker {got:?}\n  model  {want:?}"
        );
        let stats = b.stats().map_err(|e| e.to_string())?;
        ensure!(
            (stats.txn_pending, stats.txn_unresolved) == (want.len() as u64, 0),
            "stats count {} pending, {} unresolved; the model {}",
            stats.txn_pending,
            stats.txn_unresolved,
            want.len()
        );
        for topic in TOPICS {
            let mut want: Vec<(String, Vec<u8>, Option<String>)> = self
                .txns
                .iter()
                .filter(|t| t.state == TxnState::Committed && t.half.topic == topic)
                .map(|t| {
                    (
                        t.half.key.clone(),
                        t.half.body.clone(),
                        Some(t.id.0.to_string()),
                    )
                })
                .chain(
                    self.plain
                        .iter()
                        .filter(|p| p.topic == topic)
                        .map(|p| (p.key.clone(), p.body.clone(), None)),
                )
                .collect();
            want.sort();
            let got = topic_contents(b, topic);
            if got != want {
                let brief = |v: &[(String, Vec<u8>, Option<String>)]| {
                    v.iter()
                        .map(|(k, body, t)| {
                            let head = String::from_utf8_lossy(&body[..body.len().min(12)]);
                            format!("{k:?}/{head}/{t:?}")
                        })
                        .collect::<Vec<_>>()
                };
                return Err(format!(
                    "visible in {topic}:\n  broker {:?}\n  model  {:?}",
                    brief(&got),
                    brief(&want)
                ));
            }
        }
        Ok(())
    }
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let fail = |at: &str, msg: String| {
        let ops: Vec<String> = case
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| format!("  {i:2}: {op:?}"))
            .collect();
        TestCaseError::fail(format!(
            "{at}: {msg}\ncheckpoint_bytes {}, final crash {:?}, ops:\n{}",
            case.checkpoint_bytes,
            case.final_crash,
            ops.join("\n")
        ))
    };
    let mut h = Harness::new(case).map_err(|m| fail("setup", m))?;
    for (i, op) in case.ops.iter().enumerate() {
        h.step(op)
            .map_err(|m| fail(&format!("step {i} {op:?}"), m))?;
    }
    let last = Op::Crash {
        mode: case.final_crash,
        freeze: true,
    };
    h.step(&last)
        .map_err(|m| fail(&format!("final {last:?}"), m))?;
    let b = h.b.take().expect("broker open");
    b.close().map_err(|e| fail("final close", e.to_string()))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        max_shrink_iters: 512,
        ..ProptestConfig::with_cases(cases())
    })]

    /// Random interleavings of transactions, plain sends, check-backs, crashes and reopens
    /// agree with the model after every crash and reopen.
    #[test]
    fn transactions_agree_with_the_model_across_crashes(case in case_strategy()) {
        run_case(&case)?;
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Check counts survive restarts
// ---------------------------------------------------------------------------------------------

/// First check 200 ms after the half, then one every second; unresolved after 3. The tests
/// give the broker a `ManualClock`, so a check happens only when the test moves the clock.
fn counting_txn() -> TxnConfig {
    check_back((200, 1000, 1000), 3, 300)
}

/// How a check-count test restarts the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    Clean,
    Crash(CrashMode),
}

/// A half of a group with no checker ("no live producer") gets a check, the broker restarts,
/// the count and the next deadline continue; again after the second check; it becomes
/// unresolved after exactly `check_max` checks in total, which survives one more restart, and
/// it is checked no more but still resolvable by hand. The broker's clock (shared by every
/// reopened broker) moves only when the test moves it: no restart can race a deadline.
fn check_counts_continue(restart_how: Restart, filler: usize) {
    let ctx = format!("{restart_how:?}, filler {filler}");
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let cfg = config(tmp.path(), counting_txn(), CHECKPOINT_BYTES_SMALL).with_clock(clock.clone());
    let mut disk = SimStorage::new();
    let mut b = open(&disk, &cfg);
    b.create_topic("cc", 2).unwrap();
    let h = Half::new("cc", "k", "counted", "nobody");
    let txn = h.send(&b).unwrap();
    // Traffic after the half, so that checkpoints (and sled persistence) land after it.
    for i in 0..filler {
        b.send("cc", &Message::new(vec![i as u8; 1000])).unwrap();
    }
    let mut do_restart = |b: Arc<Broker>| match restart_how {
        Restart::Clean => restart(&disk, b, &cfg),
        Restart::Crash(mode) => {
            disk = crash(&disk, b, mode, Freeze::Yes, "cc");
            open(&disk, &cfg)
        }
    };
    for checks in 1..=2u32 {
        // To the first check (the time-out), then to the next one (the check interval).
        clock.advance_ms(if checks == 1 { 200 } else { 1000 });
        b.run_due_now();
        wait_until(&format!("{ctx}: check {checks}"), WAIT_LIMIT, || {
            listed(&b, txn).is_some_and(|i| i.checks >= checks)
        });
        let before = listed(&b, txn).unwrap();
        assert_eq!(
            (before.state, before.checks),
            (TxnState::Pending, checks),
            "{ctx}: one check at a time"
        );
        b = do_restart(b);
        let after = listed(&b, txn).unwrap_or_else(|| panic!("{ctx}: lost after a restart"));
        assert_eq!(
            after.last_answer.as_deref(),
            Some("no live producer of the group"),
            "{ctx}: {after:?}"
        );
        assert_eq!(
            (
                after.state,
                after.checks,
                after.next_check_ms,
                after.last_check_ms
            ),
            (
                TxnState::Pending,
                before.checks,
                before.next_check_ms,
                before.last_check_ms
            ),
            "{ctx}: the count and the deadline continue after restart {checks}"
        );
    }
    clock.advance_ms(1000);
    b.run_due_now();
    wait_until(&format!("{ctx}: unresolved"), WAIT_LIMIT, || {
        b.transaction_state(txn).unwrap() == TxnState::Unresolved
    });
    assert_eq!(
        listed(&b, txn).unwrap().checks,
        3,
        "{ctx}: exactly check_max checks"
    );
    b = do_restart(b);
    let info = listed(&b, txn).unwrap();
    assert_eq!(
        (info.state, info.checks),
        (TxnState::Unresolved, 3),
        "{ctx}"
    );
    assert_eq!(b.unresolved_transactions().len(), 1);
    assert_eq!(b.stats().unwrap().txn_unresolved, 1);
    // Not checked any more, even with the deadline long past.
    clock.advance_ms(3_600_000);
    b.run_due_now();
    assert_eq!(
        listed(&b, txn).unwrap().checks,
        3,
        "{ctx}: checked after unresolved"
    );
    assert!(visible(&b, "cc")
        .iter()
        .all(|d| !d.properties.contains_key(PROP_TXN)));
    b.commit(txn).unwrap();
    b = do_restart(b);
    assert_eq!(classify(&b, txn, &h, &ctx), TxnState::Committed);
    b.close().unwrap();
}

#[test]
fn check_counts_continue_after_clean_restarts() {
    check_counts_continue(Restart::Clean, 0);
}

#[test]
fn check_counts_continue_after_crashes_and_unresolved_survives_them() {
    check_counts_continue(Restart::Crash(CrashMode::DropUnsynced), 0);
    check_counts_continue(Restart::Crash(CrashMode::KeepRandomPrefix { seed: 7 }), 40);
}

// ---------------------------------------------------------------------------------------------
// 4. Recovery interrupted, and regressions
// ---------------------------------------------------------------------------------------------

/// A power loss at the first sync of recovery (it syncs every consume-queue index, before
/// it persists the rebuilt transaction index to sled and writes its checkpoint), with sled
/// frozen behind the log: the second recovery gives the same transactions and messages.
/// Later moments of recovery: `a_crash_at_any_moment_of_recovery_changes_no_transaction`.
#[test]
fn a_crash_during_recovery_changes_no_transaction() {
    for commits_after_checkpoint in [false, true] {
        for mode in modes(0..3) {
            let ctx = format!("commits after checkpoint {commits_after_checkpoint}, {mode:?}");
            let (_tmp, disk, cfg, b) = fresh_sim(
                |dir| config(dir, quiet_txn(), CHECKPOINT_BYTES_NEVER),
                "r",
                2,
            );
            let hs: Vec<Half> = (0..6)
                .map(|i| Half::new("r", &format!("k{i}"), vec![b'0' + i as u8; 500], "g"))
                .collect();
            let ids: Vec<TxnId> = hs.iter().map(|h| h.send(&b).unwrap()).collect();
            let mut want = vec![TxnState::Pending; hs.len()];
            for i in [1, 4] {
                b.rollback(ids[i]).unwrap();
                want[i] = TxnState::RolledBack;
            }
            if commits_after_checkpoint {
                for i in [0, 3] {
                    b.commit(ids[i]).unwrap();
                    want[i] = TxnState::Committed;
                }
            }
            let disk = crash(&disk, b, mode, Freeze::Yes, "r");
            disk.set_faults(Faults {
                fail_syncs: 1,
                ..Faults::default()
            });
            let failed = try_open(&disk, &cfg);
            assert!(
                failed.is_err(),
                "{ctx}: recovery with a failing sync opened"
            );
            drop(failed);
            let disk = disk.crash(mode);
            let b = open(&disk, &cfg);
            assert_as_wanted(&b, "r", (&hs, &ids, &want), &ctx);
            b.close().unwrap();
        }
    }
}

/// A power loss at a random moment of recovery, twice in a row (recovery of the recovery),
/// with sled frozen wherever it was — before recovery persisted the rebuilt transaction index,
/// between that persist and recovery's checkpoint, or after it — and a third open: every
/// transaction is as acknowledged before the first crash, committed messages visible once.
#[test]
fn a_crash_at_any_moment_of_recovery_changes_no_transaction() {
    let mut opened = 0;
    let mut interrupted = 0;
    for seed in 0..32u64 {
        let ctx = format!("seed {seed}");
        let (_tmp, disk, cfg, b) = fresh_sim(
            |dir| config(dir, quiet_txn(), checkpoints_by_seed(seed)),
            "r",
            2,
        );
        let hs: Vec<Half> = (0..12)
            .map(|i| Half::new("r", &format!("k{i}"), vec![b'a' + i as u8; 2500], "g"))
            .collect();
        let mut ids = Vec::new();
        let mut want = Vec::new();
        for (i, h) in hs.iter().enumerate() {
            let t = h.send(&b).unwrap();
            ids.push(t);
            want.push(match i % 3 {
                0 => {
                    b.commit(t).unwrap();
                    TxnState::Committed
                }
                1 => {
                    b.rollback(t).unwrap();
                    TxnState::RolledBack
                }
                _ => TxnState::Pending,
            });
        }
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut current = crash(&disk, b, CrashMode::DropUnsynced, Freeze::Yes, "r");
        for round in 0..2u64 {
            let (d, c) = (current.clone(), cfg.clone());
            let opener = std::thread::spawn(move || try_open(&d, &c));
            std::thread::sleep(Duration::from_micros(rng.u64(0..15_000)));
            let next = current.crash(CrashMode::KeepRandomPrefix {
                seed: seed * 2 + round,
            });
            match opener.join().unwrap() {
                Ok(b) => {
                    opened += 1;
                    close_dead(b, Freeze::Yes, "r");
                }
                Err(_) => interrupted += 1,
            }
            current = next;
        }
        let b = open(&current, &cfg);
        assert_as_wanted(&b, "r", (&hs, &ids, &want), &ctx);
        b.close().unwrap();
    }
    eprintln!("recoveries crashed: {interrupted} interrupted, {opened} finished first");
}

/// Regression (found while writing these tests, under `FlushPolicy::Async`): a half that was
/// acknowledged but never synced could be lost in a crash yet come back as a *phantom*
/// pending transaction (its check count had reached sled), and the next half written at the
/// same log offset inherited the phantom's id, key and producer group.
///
/// The fix: transaction records are synced before they are acknowledged under any flush
/// policy (their durable-hooks run only after an fsync), and on open persisted transactions
/// the log does not confirm are dropped, a replayed half replacing a stale entry. So here the
/// half survives the crash with its check count, and the next half is a transaction of its
/// own.
#[test]
fn async_flush_acknowledged_half_survives_and_no_phantom_is_made() {
    let (_tmp, disk, cfg, b) = fresh_sim(|dir| async_flush(dir, 30), "a", 1);
    b.register_checker("g", Arc::new(|_: &HalfMessage| CheckAnswer::Unknown))
        .unwrap();
    let first = Half::new("a", "lost-key", "lost body", "g");
    let txn = first.send(&b).unwrap();
    b.rearm(txn).unwrap();
    wait_until("one check", WAIT_LIMIT, || {
        listed(&b, txn).is_some_and(|i| i.checks == 1)
    });
    // Acknowledged means durable for a transaction record, even under async flush.
    let disk = crash(&disk, b, CrashMode::DropUnsynced, Freeze::Yes, "a");
    let b = open(&disk, &cfg);
    let info = listed(&b, txn).expect("the acknowledged half survives the crash");
    assert_eq!(
        (info.key.as_str(), info.producer_group.as_str(), info.checks),
        ("lost-key", "g", 1)
    );
    let fresh = Half::new("a", "newk-key", "newk body", "h");
    let t2 = fresh.send(&b).unwrap();
    assert_ne!(t2, txn, "a new half gets its own id");
    let info = listed(&b, t2).expect("the new half is listed");
    assert_eq!(
        (info.key.as_str(), info.producer_group.as_str()),
        ("newk-key", "h")
    );
    b.commit(t2).unwrap();
    let got = visible(&b, "a");
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].key.as_str(), got[0].body.as_slice()),
        ("newk-key", &b"newk body"[..]),
    );
}

/// BUG (a race, so this fails in most runs, not all: 5 of 5 on a quiet machine, 3 of 4 under
/// load): `Broker::open` right
/// after `Broker::close` of a broker on the same data directory, in the same process, can fail
/// with `Error::Meta("... could not acquire lock on \".../meta/db\": WouldBlock")`.
///
/// sled 0.34 releases its `flock` on `meta/db` only when its background I/O work has let go
/// of the file, which can be after the `Db` is dropped (spacejam/sled#1234, #1289), so
/// `Meta::open` (src/meta.rs) racing that release gets `WouldBlock`. Here 6 threads each
/// close and reopen a broker 120 times while check-back writes sled; typically a few of the
/// 720 opens fail (it depends on load: rarely, none does). An embedded application that
/// restarts its broker in-process hits the same.
///
/// Suggested fix: in `Meta::open`, retry `sled` open with a short bounded backoff (say up to
/// 1 s) while the error is an I/O error of kind `WouldBlock`. It masks nothing: `open_with`
/// takes the data directory's own lock (`Storage::lock_dir`) before opening sled, so a live
/// second broker is refused with `Error::Locked` before sled is touched.
#[test]
fn reopen_right_after_close_never_fails_on_the_metadata_lock() {
    let handles: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(|| {
                let tmp = tempfile::tempdir().unwrap();
                let cfg = config(tmp.path(), eager_txn(), CHECKPOINT_BYTES_SMALL);
                let disk = SimStorage::new();
                let mut failures = Vec::new();
                for i in 0..120 {
                    match Broker::open_with(Arc::new(disk.clone()), cfg.clone()) {
                        Ok(b) => {
                            let h = Half::new("x", &format!("k{i}"), vec![1u8; 3000], "g");
                            h.send(&b).unwrap();
                            std::thread::sleep(Duration::from_millis(5));
                            b.close().unwrap();
                        }
                        Err(e) => failures.push(format!("open {i}: {e}")),
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "reopen failed:\n{}",
        failures.join("\n")
    );
}
