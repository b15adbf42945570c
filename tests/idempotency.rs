//! Idempotency keys, through the embedded [`Broker`] on the simulated disk ([`SimStorage`]).
//!
//! What these tests prove: a second send with an idempotency key already stored is not stored
//! (exactly one copy is visible) and returns the original receipt, flagged `duplicate`; this
//! holds across clean restarts and across a power loss at each step (before the first send
//! is durable, after it, before and after a checkpoint persisted the keys to sled), for many
//! threads sending one key at once, and for half messages (one transaction, whatever its
//! state). Keys are forgotten after the window and, oldest first, past the count bound, also
//! across restarts. A proptest model runs random sends with repeated keys, fillers (which
//! make checkpoints), crashes and reopens, and checks that no key is ever stored twice and
//! every acknowledged send is readable with its receipt.
//!
//! How a crash is simulated (as in `tests/txn_crash.rs`): `disk.crash(mode)` returns the disk
//! as it comes back; the old broker is first made to write on the dead disk, which poisons
//! it, so that closing it writes nothing more (sled stays as the power loss left it).
//!
//! `HALFMQ_MODEL_CASES=N` sets the number of cases of the model test (default 32).

mod common;

use common::{
    close, crash_sim, open_sim, small_segments, visible, CHECKPOINT_BYTES_NEVER,
    CHECKPOINT_BYTES_SMALL,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use halfmq::props::PROP_IDEMPOTENCY_KEY;
use halfmq::IDEMPOTENCY_KEY_BYTES_MAX;
use halfmq::{
    Broker, BrokerConfig, Clock, Delivery, Error, HalfOptions, ManualClock, Message, SendReceipt,
    TxnState,
};
use halfmq_store::sim::{CrashMode, Faults, SimStorage};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const TOPIC: &str = "orders";
const PROBE: &str = "probe";

fn config(dir: &Path, checkpoint_bytes: u64) -> BrokerConfig {
    let mut cfg = small_segments(dir, checkpoint_bytes);
    cfg.txn.check_back = false;
    cfg
}

fn open(disk: &SimStorage, cfg: &BrokerConfig) -> Arc<Broker> {
    let b = open_sim(disk, cfg);
    b.create_topic(TOPIC, 4).expect("create topic");
    b.create_topic(PROBE, 1).expect("create probe topic");
    b
}

fn restart(disk: &SimStorage, b: Arc<Broker>, cfg: &BrokerConfig) -> Arc<Broker> {
    close(b);
    open(disk, cfg)
}

/// Power loss under a running broker (the old one dies with the power, see
/// [`common::crash_sim`]); returns the reopened broker.
fn crash(
    disk: &mut SimStorage,
    b: Arc<Broker>,
    mode: CrashMode,
    cfg: &BrokerConfig,
) -> Arc<Broker> {
    *disk = crash_sim(disk, b, mode, PROBE);
    open(disk, cfg)
}

/// A fresh simulated disk with a broker on it, checkpointing every `checkpoint_bytes`.
fn fresh(checkpoint_bytes: u64) -> (tempfile::TempDir, SimStorage, BrokerConfig, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimStorage::new();
    let cfg = config(dir.path(), checkpoint_bytes);
    let b = open(&disk, &cfg);
    (dir, disk, cfg, b)
}

/// Visible copies per idempotency key.
fn copies(b: &Broker, topic: &str) -> BTreeMap<String, Vec<Delivery>> {
    let mut out: BTreeMap<String, Vec<Delivery>> = BTreeMap::new();
    for d in visible(b, topic) {
        if let Some(k) = d.properties.get(PROP_IDEMPOTENCY_KEY) {
            out.entry(k.clone()).or_default().push(d);
        }
    }
    out
}

fn keyed(key: &str, body: &str) -> Message {
    Message::new(body)
        .with_key(format!("order-{key}"))
        .with_idempotency_key(key)
}

fn send(b: &Broker, key: &str) -> SendReceipt {
    b.send(TOPIC, &keyed(key, &format!("body of {key}")))
        .unwrap_or_else(|e| panic!("send {key}: {e}"))
}

/// Plain sends without keys, enough to pass a small checkpoint interval.
fn filler(b: &Broker, bytes: usize) {
    let n = bytes / 1024 + 1;
    for _ in 0..n {
        b.send("filler", &Message::new(vec![b'f'; 1024]))
            .expect("filler");
    }
}

/// Wait until a durable checkpoint lies past `offset`. The flusher writes checkpoints in the
/// background of the writers' rounds (a lone writer leads its own round and hands a due
/// checkpoint over), so a test that crashes "after a checkpoint" waits for one.
fn wait_for_checkpoint_past(b: &Broker, offset: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while b.store().checkpoint_offset() <= offset {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint past {offset} within 30 s (newest at {})",
            b.store().checkpoint_offset()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn as_original(r: &SendReceipt) -> SendReceipt {
    SendReceipt {
        duplicate: false,
        ..r.clone()
    }
}

#[test]
fn duplicate_is_not_stored_and_returns_the_original_receipt() {
    let (_dir, _, _, b) = fresh(CHECKPOINT_BYTES_NEVER);
    let first = send(&b, "pay-1");
    assert!(!first.duplicate);
    // A retry with another body and message key: still the original.
    let again = b
        .send(TOPIC, &Message::new("retry").with_idempotency_key("pay-1"))
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(as_original(&again), first);
    let other = send(&b, "pay-2");
    assert!(!other.duplicate);
    assert_ne!(other.log_offset, first.log_offset);
    // The same key in another topic is another key.
    let elsewhere = b.send("refunds", &keyed("pay-1", "x")).unwrap();
    assert!(!elsewhere.duplicate);
    // Messages without a key are never deduplicated.
    let m = Message::new("no key");
    assert!(!b.send(TOPIC, &m).unwrap().duplicate);
    assert!(!b.send(TOPIC, &m).unwrap().duplicate);
    let c = copies(&b, TOPIC);
    assert_eq!(c["pay-1"].len(), 1);
    assert_eq!(c["pay-1"][0].body, b"body of pay-1");
    assert_eq!(c["pay-1"][0].offset, first.offset);
    assert_eq!(c["pay-2"].len(), 1);
    assert_eq!(visible(&b, TOPIC).len(), 4);
    assert_eq!(visible(&b, "refunds").len(), 1);
    assert_eq!(b.idempotency_keys(), 3);
    b.close().unwrap();
}

/// `r` is the refusal of an invalid idempotency key.
fn refused_for_its_key<T: std::fmt::Debug>(r: halfmq::Result<T>) {
    assert!(
        matches!(
            r,
            Err(Error::Invalid {
                what: "idempotency key",
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn invalid_keys_are_refused_and_nothing_is_stored() {
    let (_dir, _, _, b) = fresh(CHECKPOINT_BYTES_NEVER);
    let long = "k".repeat(IDEMPOTENCY_KEY_BYTES_MAX + 1);
    for k in ["", long.as_str()] {
        let msg = Message::new("x").with_idempotency_key(k);
        refused_for_its_key(b.send(TOPIC, &msg));
        refused_for_its_key(b.send_half(TOPIC, &msg, "g", HalfOptions::default()));
    }
    let max = "k".repeat(IDEMPOTENCY_KEY_BYTES_MAX);
    assert!(
        !b.send(TOPIC, &Message::new("x").with_idempotency_key(&max))
            .unwrap()
            .duplicate
    );
    // Other reserved properties stay refused.
    let r = b.send(TOPIC, &Message::new("x").with_property("halfmq.txn", "1"));
    assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    assert_eq!(visible(&b, TOPIC).len(), 1);
    b.close().unwrap();
}

#[test]
fn a_failed_send_frees_its_key() {
    let (_dir, _, _, b) = fresh(CHECKPOINT_BYTES_NEVER);
    // Too large for record_bytes_max: refused before anything is written.
    let big = Message::new(vec![0u8; 32 * 1024]).with_idempotency_key("k");
    assert!(matches!(b.send(TOPIC, &big), Err(Error::Invalid { .. })));
    let r = send(&b, "k");
    assert!(
        !r.duplicate,
        "the failed send must not have claimed the key"
    );
    assert!(send(&b, "k").duplicate);
    b.close().unwrap();
}

#[test]
fn duplicates_are_caught_across_clean_restarts_before_and_after_a_checkpoint() {
    let (_dir, disk, cfg, mut b) = fresh(CHECKPOINT_BYTES_SMALL);
    let before = send(&b, "early");
    // Past a checkpoint: "early" now lives in sled, not in the replayed log.
    filler(&b, 3 * CHECKPOINT_BYTES_SMALL as usize);
    let after = send(&b, "late");
    b = restart(&disk, b, &cfg);
    assert!(
        b.recovery_report().scanned_from > before.log_offset,
        "the key must come from sled, not from the log"
    );
    for (k, orig) in [("early", &before), ("late", &after)] {
        let r = send(&b, k);
        assert!(r.duplicate, "{k}");
        assert_eq!(&as_original(&r), orig);
    }
    b = restart(&disk, b, &cfg);
    assert!(send(&b, "early").duplicate);
    let c = copies(&b, TOPIC);
    assert_eq!((c["early"].len(), c["late"].len()), (1, 1));
    b.close().unwrap();
}

#[test]
fn acknowledged_keys_survive_a_crash_at_each_step() {
    for mode in [
        CrashMode::DropUnsynced,
        CrashMode::KeepRandomPrefix { seed: 7 },
    ] {
        let (_dir, mut disk, cfg, mut b) = fresh(CHECKPOINT_BYTES_SMALL);

        // 1. Durable, no checkpoint since: found again by replaying the log.
        let a = send(&b, "a");
        b = crash(&mut disk, b, mode, &cfg);
        assert_eq!(as_original(&send(&b, "a")), a);
        assert!(send(&b, "a").duplicate);

        // 2. Durable, then checkpoints (the key is in sled), then a crash.
        let k = send(&b, "k");
        filler(&b, 3 * CHECKPOINT_BYTES_SMALL as usize);
        wait_for_checkpoint_past(&b, k.log_offset);
        b = crash(&mut disk, b, mode, &cfg);
        assert!(b.recovery_report().scanned_from > k.log_offset);
        let r = send(&b, "k");
        assert!(r.duplicate);
        assert_eq!(as_original(&r), k);

        // 3. A crash right after a checkpoint that came between the send and the crash,
        //    and a crash during the first recovery's aftermath (before any new checkpoint).
        let m = send(&b, "m");
        filler(&b, CHECKPOINT_BYTES_SMALL as usize + 1024);
        wait_for_checkpoint_past(&b, m.log_offset);
        b = crash(&mut disk, b, mode, &cfg);
        b = crash(&mut disk, b, mode, &cfg);
        assert!(send(&b, "m").duplicate);
        assert_eq!(b.idempotency_key_stored(TOPIC, "m"), Some(m.log_offset));

        // 4. Not durable when the power went: the sync fails, the send is not
        //    acknowledged. Whether or not its record survived, the key is stored once.
        disk.set_faults(Faults {
            fail_syncs: 1,
            ..Faults::default()
        });
        let r = b.send(TOPIC, &keyed("u", "unacknowledged"));
        assert!(matches!(r, Err(Error::Poisoned(_))), "{r:?}");
        disk.set_faults(Faults::default());
        let after = disk.crash(mode);
        let _ = b.close();
        drop(b);
        disk = after;
        b = open(&disk, &cfg);
        let r = send(&b, "u");
        let again = send(&b, "u");
        assert!(again.duplicate);
        assert_eq!(as_original(&again), as_original(&r));

        let c = copies(&b, TOPIC);
        for key in ["a", "k", "m", "u"] {
            assert_eq!(
                c.get(key).map(Vec::len),
                Some(1),
                "{mode:?}: copies of {key}"
            );
        }
        b.close().unwrap();
    }
}

#[test]
fn many_threads_sending_one_key_store_it_once() {
    let (_dir, _, _, b) = fresh(CHECKPOINT_BYTES_SMALL);
    for round in 0..5 {
        let key = format!("hot-{round}");
        let threads = 16;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (b, barrier, key) = (b.clone(), barrier.clone(), key.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    b.send(TOPIC, &keyed(&key, &format!("from {i}"))).unwrap()
                })
            })
            .collect();
        let receipts: Vec<SendReceipt> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let originals: Vec<&SendReceipt> = receipts.iter().filter(|r| !r.duplicate).collect();
        assert_eq!(originals.len(), 1, "{receipts:?}");
        for r in &receipts {
            assert_eq!(&as_original(r), originals[0]);
        }
    }
    // The same with async senders on a multi-threaded runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let receipts: Vec<SendReceipt> = rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    b.send_async(TOPIC, &keyed("hot-async", &format!("from {i}")))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert_eq!(receipts.iter().filter(|r| !r.duplicate).count(), 1);
    let c = copies(&b, TOPIC);
    assert_eq!(c.len(), 6);
    assert!(c.values().all(|v| v.len() == 1), "{c:?}");
    b.close().unwrap();
}

#[test]
fn keys_expire_after_the_window_also_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimStorage::new();
    // The broker's clock moves only when the test moves it; the restarted broker shares it.
    let clock = ManualClock::starting_now();
    let cfg = config(dir.path(), CHECKPOINT_BYTES_SMALL)
        .with_dedup_window(Duration::from_millis(300))
        .with_clock(clock.clone());
    let mut b = open(&disk, &cfg);
    let first = send(&b, "w");
    clock.advance_ms(299);
    assert!(send(&b, "w").duplicate, "inside the window: the original");
    clock.advance_ms(1);
    let second = send(&b, "w");
    assert!(!second.duplicate, "the window is over: stored again");
    assert_ne!(second.log_offset, first.log_offset);
    assert!(send(&b, "w").duplicate);
    // Persisted (checkpoint), then expired while the broker is down: forgotten on open.
    filler(&b, 2 * CHECKPOINT_BYTES_SMALL as usize);
    b.close().unwrap();
    drop(b);
    clock.advance_ms(300);
    b = open(&disk, &cfg);
    assert_eq!(b.idempotency_keys(), 0);
    assert!(!send(&b, "w").duplicate);
    assert_eq!(copies(&b, TOPIC)["w"].len(), 3);
    b.close().unwrap();
}

/// A delayed send with a key: a retry is answered with the original delayed message (same
/// id, its own delivery time), also after a crash before and after a checkpoint; the key has
/// its own scope (a plain send with it is not a duplicate); the delivered message carries no
/// key and claims none; after delivery a retry within the window is still the original.
#[test]
fn delayed_sends_with_a_key_are_stored_and_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut disk = SimStorage::new();
    let clock = ManualClock::starting_now();
    let cfg = config(dir.path(), CHECKPOINT_BYTES_SMALL)
        .with_dedup_window(Duration::from_secs(3600))
        .with_clock(clock.clone());
    let mut b = open(&disk, &cfg);
    let at = clock.now_ms() + 60_000;
    let msg = keyed("pay-9", "confirm later");
    let first = b.send_delayed(TOPIC, &msg, at).unwrap();
    // A retry, even with another delivery time: the original.
    let again = b.send_delayed(TOPIC, &msg, at + 5_000).unwrap();
    assert_eq!(again, first);
    assert_eq!(b.delayed_pending(), 1);
    // Plain sends have their own scope.
    assert!(!send(&b, "pay-9").duplicate);

    // Power loss with no checkpoint since (found by replaying the log), then after one
    // (found in sled).
    b = crash(&mut disk, b, CrashMode::DropUnsynced, &cfg);
    assert_eq!(b.send_delayed(TOPIC, &msg, at).unwrap(), first);
    filler(&b, 3 * CHECKPOINT_BYTES_SMALL as usize);
    wait_for_checkpoint_past(&b, first.id);
    b = crash(&mut disk, b, CrashMode::KeepRandomPrefix { seed: 3 }, &cfg);
    assert!(b.recovery_report().scanned_from > first.id);
    assert_eq!(b.send_delayed(TOPIC, &msg, at).unwrap(), first);
    assert_eq!(b.delayed_pending(), 1);

    // Delivered once, without the key; a retry after delivery is still the original.
    clock.advance_ms(60_000);
    b.run_due_now();
    assert_eq!(b.delayed_pending(), 0);
    let delivered: Vec<Delivery> = visible(&b, TOPIC)
        .into_iter()
        .filter(|d| d.body == b"confirm later")
        .collect();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert!(!delivered[0].properties.contains_key(PROP_IDEMPOTENCY_KEY));
    assert_eq!(b.send_delayed(TOPIC, &msg, at).unwrap(), first);
    b = restart(&disk, b, &cfg);
    assert_eq!(b.send_delayed(TOPIC, &msg, at).unwrap(), first);
    assert_eq!(b.delayed_pending(), 0);
    let delivered = visible(&b, TOPIC)
        .into_iter()
        .filter(|d| d.body == b"confirm later")
        .count();
    assert_eq!(delivered, 1);
    b.close().unwrap();
}

#[test]
fn the_count_bound_forgets_the_oldest_keys_first_also_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimStorage::new();
    let mut cfg = config(dir.path(), CHECKPOINT_BYTES_SMALL);
    cfg.dedup_keys_max = 3;
    let mut b = open(&disk, &cfg);
    for i in 0..5 {
        send(&b, &format!("c{i}"));
    }
    assert_eq!(b.idempotency_keys(), 3);
    assert_eq!(b.idempotency_key_stored(TOPIC, "c1"), None);
    assert!(send(&b, "c4").duplicate);
    assert!(send(&b, "c2").duplicate);
    filler(&b, 2 * CHECKPOINT_BYTES_SMALL as usize);
    b = restart(&disk, b, &cfg);
    assert_eq!(b.idempotency_keys(), 3);
    assert!(send(&b, "c3").duplicate);
    // c0 was forgotten: stored again, which makes it the newest and forgets c2.
    assert!(!send(&b, "c0").duplicate);
    assert_eq!(b.idempotency_key_stored(TOPIC, "c2"), None);
    // The bytes bound works the same way.
    let mut cfg2 = config(&dir.path().join("bytes"), CHECKPOINT_BYTES_NEVER);
    cfg2.dedup_bytes_max = 4096;
    b.close().unwrap();
    drop(b);
    let disk2 = SimStorage::new();
    let b = open(&disk2, &cfg2);
    for i in 0..100 {
        send(&b, &format!("{i:0>100}"));
    }
    // Each key costs 100 bytes + 96 + the topic: at most 4096 / 200 of them remain.
    assert!(
        b.idempotency_keys() <= 4096 / 200,
        "{}",
        b.idempotency_keys()
    );
    assert!(send(&b, &format!("{:0>100}", 99)).duplicate);
    b.close().unwrap();
}

#[test]
fn a_retried_half_is_one_transaction_whatever_its_state() {
    let (_dir, mut disk, cfg, mut b) = fresh(CHECKPOINT_BYTES_SMALL);
    let half = || keyed("payment-7", "paid 12.50");
    let first = b
        .send_half_receipt(TOPIC, &half(), "pay", HalfOptions::default())
        .unwrap();
    assert!(!first.duplicate);
    let again = b
        .send_half_receipt(TOPIC, &half(), "pay", HalfOptions::default())
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.txn, first.txn);
    assert_eq!(b.transactions(None).len(), 1);
    // A plain send with the same key is not the half: keys of halves have their own scope.
    assert!(!send(&b, "payment-7").duplicate);
    b.commit(first.txn).unwrap();
    let r = b
        .send_half_receipt(TOPIC, &half(), "pay", HalfOptions::default())
        .unwrap();
    assert!(r.duplicate);
    assert_eq!(r.txn, first.txn);
    assert_eq!(b.transaction_state(r.txn).unwrap(), TxnState::Committed);
    // Across a crash (from the log) and after checkpoints (from sled).
    b = crash(&mut disk, b, CrashMode::DropUnsynced, &cfg);
    assert_eq!(
        b.send_half(TOPIC, &half(), "pay", HalfOptions::default())
            .unwrap(),
        first.txn
    );
    filler(&b, 2 * CHECKPOINT_BYTES_SMALL as usize);
    wait_for_checkpoint_past(&b, first.txn.0);
    b = crash(&mut disk, b, CrashMode::DropUnsynced, &cfg);
    assert!(b.recovery_report().scanned_from > first.txn.0);
    let r = b
        .send_half_receipt(TOPIC, &half(), "pay", HalfOptions::default())
        .unwrap();
    assert_eq!((r.txn, r.duplicate), (first.txn, true));
    assert!(b.transactions(None).is_empty());
    // Exactly one committed copy (and the plain send) are visible.
    let paid: Vec<Delivery> = visible(&b, TOPIC)
        .into_iter()
        .filter(|d| d.body == b"paid 12.50")
        .collect();
    assert_eq!(paid.len(), 1);
    b.close().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Send with key number `0` (a small key space, so keys repeat).
    Send(u8),
    /// Sends without keys, passing the checkpoint interval.
    Filler,
    /// Power loss and reopen.
    Crash(bool),
    /// Clean close and reopen.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..8).prop_map(Op::Send),
        2 => Just(Op::Filler),
        2 => any::<bool>().prop_map(Op::Crash),
        1 => Just(Op::Restart),
    ]
}

fn run_model(ops: &[Op], seed: u64) -> Result<(), TestCaseError> {
    let (_dir, mut disk, cfg, mut b) = fresh(CHECKPOINT_BYTES_SMALL);
    // key -> the original receipt.
    let mut stored: BTreeMap<String, SendReceipt> = BTreeMap::new();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Send(k) => {
                let key = format!("key-{k}");
                let r = b
                    .send(TOPIC, &keyed(&key, &format!("step {step}")))
                    .map_err(|e| TestCaseError::fail(format!("step {step}: send {key}: {e}")))?;
                match stored.get(&key) {
                    Some(orig) => {
                        prop_assert!(r.duplicate, "step {step}: {key} stored twice: {r:?}");
                        prop_assert_eq!(&as_original(&r), orig, "step {}", step);
                    }
                    None => {
                        prop_assert!(!r.duplicate, "step {step}: {key} was never stored");
                        stored.insert(key, r);
                    }
                }
            }
            Op::Filler => filler(&b, CHECKPOINT_BYTES_SMALL as usize),
            Op::Crash(keep) => {
                let mode = if *keep {
                    CrashMode::KeepRandomPrefix {
                        seed: seed.wrapping_add(step as u64),
                    }
                } else {
                    CrashMode::DropUnsynced
                };
                b = crash(&mut disk, b, mode, &cfg);
            }
            Op::Restart => b = restart(&disk, b, &cfg),
        }
        if matches!(op, Op::Crash(_) | Op::Restart) {
            // Every acknowledged send is readable, once, where its receipt says.
            let c = copies(&b, TOPIC);
            prop_assert_eq!(c.len(), stored.len(), "step {}: keys visible", step);
            for (key, orig) in &stored {
                let v = &c[key];
                prop_assert_eq!(v.len(), 1, "step {}: copies of {}", step, key);
                prop_assert_eq!(
                    (v[0].queue, v[0].offset, v[0].log_offset),
                    (orig.queue, orig.offset, orig.log_offset),
                    "step {}: {}",
                    step,
                    key
                );
            }
        }
    }
    let c = copies(&b, TOPIC);
    for (key, v) in &c {
        prop_assert_eq!(v.len(), 1, "end: copies of {}", key);
    }
    prop_assert_eq!(c.len(), stored.len());
    b.close().unwrap();
    Ok(())
}

fn model_cases() -> u32 {
    std::env::var("HALFMQ_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: model_cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn model_no_key_is_stored_twice_and_acknowledged_sends_are_readable(
        ops in proptest::collection::vec(op(), 1..40),
        seed in any::<u64>(),
    ) {
        run_model(&ops, seed)?;
    }
}
