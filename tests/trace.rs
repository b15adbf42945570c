//! `Broker::trace` and `halfmq trace`: every event of every message with a key, in order,
//! with where it is now; across clean restarts and crashes (simulated disk); the on-disk key
//! index rebuilt after its files are deleted or damaged; hash collisions and file rollover
//! (tiny index files); keyless messages not indexed; the CLI through the real binary.

mod common;

use common::{
    check_back, close, crash_sim, fresh_sim, open_sim, open_waiting_for_lock, poison, restart_sim,
    run_env, small_segments, wait_until, BrokerProc,
};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halfmq::trace::{Event, Trace};
use halfmq::GroupSettings;
use halfmq::{Broker, BrokerConfig, CheckAnswer, HalfMessage, HalfOptions, Message, TxnConfig};
use halfmq_store::sim::{CrashMode, SimStorage};

/// How long to wait for what a background thread does.
const WAIT: Duration = Duration::from_secs(20);

fn txn_config(check_max: u32) -> TxnConfig {
    check_back((100, 50, 100), check_max, 500)
}

/// Small segments, and a tiny key index (4 slots, 16 entries per file): every lookup walks
/// chains shared by many keys, and files roll over every 16 keyed records.
fn config(dir: &Path, check_max: u32, checkpoint_bytes: u64) -> BrokerConfig {
    let mut cfg = small_segments(dir, checkpoint_bytes);
    cfg.store.key_index_slots = 4;
    cfg.store.key_index_entries = 16;
    cfg.txn = txn_config(check_max);
    cfg
}

fn open_fs(cfg: &BrokerConfig) -> Arc<Broker> {
    open_waiting_for_lock(|| Broker::open(cfg.clone()))
        .unwrap_or_else(|e| panic!("open failed: {e}"))
}

/// A fresh simulated disk (sled in a new temporary directory) and a broker on it (see
/// [`config`]) with `topic` of `queues` queues.
fn sim_broker(
    check_max: u32,
    checkpoint_bytes: u64,
    topic: &str,
    queues: u32,
) -> (tempfile::TempDir, SimStorage, BrokerConfig, Arc<Broker>) {
    fresh_sim(
        |dir| config(dir, check_max, checkpoint_bytes),
        topic,
        queues,
    )
}

/// A broker on a new temporary directory (see [`config`]; no checkpoints) with `topic` of
/// `queues` queues.
fn fs_broker(topic: &str, queues: u32) -> (tempfile::TempDir, BrokerConfig, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1000, 64 * 1024 * 1024);
    let b = open_fs(&cfg);
    b.create_topic(topic, queues).unwrap();
    (dir, cfg, b)
}

/// A half message of `producer_group` with `body` and `key`.
fn keyed_half(
    b: &Broker,
    topic: &str,
    body: &str,
    key: &str,
    producer_group: &str,
) -> halfmq::TxnId {
    b.send_half(
        topic,
        &Message::new(body).with_key(key),
        producer_group,
        HalfOptions::default(),
    )
    .unwrap()
}

fn kind_of(e: &Event) -> String {
    serde_json::to_value(e).unwrap()["kind"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The event kinds of the one message of a trace, as the JSON names them.
fn kinds(t: &Trace) -> Vec<String> {
    assert_eq!(t.messages.len(), 1, "{t}");
    t.messages[0]
        .events
        .iter()
        .map(|l| kind_of(&l.event))
        .collect()
}

/// The trace of `key`, which must be one message with events of these kinds in this order.
fn traced(b: &Broker, key: &str, want: &[&str]) -> Trace {
    let t = b.trace(key).unwrap();
    assert_eq!(kinds(&t), want, "{t}");
    t
}

/// The "now" line of the trace of `key` (its first message) contains `what`.
fn assert_now_says(b: &Broker, key: &str, what: &str) {
    let t = b.trace(key).unwrap();
    assert!(t.messages[0].now.line.contains(what), "{t}");
}

/// The log offsets of the first records of the messages of a trace.
fn offsets(t: &Trace) -> Vec<u64> {
    t.messages.iter().map(|m| m.log_offset).collect()
}

#[test]
fn a_transaction_shows_half_checks_commit_store_delivery_and_ack_in_order() {
    let (_dir, disk, cfg, b) = sim_broker(1000, 64 * 1024 * 1024, "payments", 4);
    // The first check says "unknown", the second "commit".
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    b.register_checker(
        "pay",
        Arc::new(move |_: &HalfMessage| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                CheckAnswer::Unknown
            } else {
                CheckAnswer::Commit
            }
        }),
    )
    .unwrap();
    let msg = Message::new("paid 42").with_key("order-42");
    let txn = b
        .send_half("payments", &msg, "pay", HalfOptions::default())
        .unwrap();
    // Noise with other keys (sharing the 4 slots).
    for i in 0..20 {
        b.send(
            "payments",
            &Message::new("x").with_key(format!("order-{i}x")),
        )
        .unwrap();
    }
    let pending = b.trace("order-42").unwrap();
    assert_eq!(pending.messages[0].now.state, "pending", "{pending}");
    wait_until("commit by check-back", WAIT, || {
        b.trace("order-42").unwrap().messages[0].now.state == "stored"
    });
    let got = b.poll("billing", "payments", 1000).unwrap();
    let d = got.iter().find(|d| d.key == "order-42").unwrap();
    assert_now_says(
        &b,
        "order-42",
        "group billing: delivered (attempt 1), not acked",
    );
    b.ack("billing", "payments", d.queue, d.offset).unwrap();
    let t = traced(
        &b,
        "order-42",
        &[
            "half",
            "check_asked",
            "check_answered",
            "check_asked",
            "check_answered",
            "committed",
            "stored",
            "delivered",
            "acked",
        ],
    );
    let m = &t.messages[0];
    assert_eq!(m.txn, Some(txn.0));
    assert_eq!(m.topic, "payments");
    let ev: Vec<&Event> = m.events.iter().map(|l| &l.event).collect();
    assert_eq!(
        ev[0],
        &Event::Half {
            txn: txn.0,
            topic: "payments".into(),
            queue: d.queue,
            producer_group: "pay".into()
        }
    );
    assert_eq!(
        ev[2],
        &Event::CheckAnswered {
            check: 1,
            answer: "unknown".into()
        }
    );
    assert_eq!(
        ev[4],
        &Event::CheckAnswered {
            check: 2,
            answer: "commit".into()
        }
    );
    assert_eq!(
        ev[6],
        &Event::Stored {
            topic: "payments".into(),
            queue: d.queue,
            offset: d.offset
        }
    );
    assert_eq!(m.events[6].log_offset, d.log_offset);
    assert_eq!(
        ev[7],
        &Event::Delivered {
            group: "billing".into(),
            attempt: 1
        }
    );
    assert!(m.events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert_eq!(
        m.now.stored_at,
        Some(("payments".to_owned(), d.queue, d.offset))
    );
    assert_eq!(m.now.groups.len(), 1);
    assert!(m.now.groups[0].acked);
    let text = t.to_string();
    assert!(
        text.contains("now: committed, stored at payments queue"),
        "{text}"
    );
    assert!(text.contains("group billing: acked"), "{text}");

    // A clean restart keeps all of it (the key index from its files, the journal from sled).
    let b = restart_sim(&disk, b, &cfg);
    let again = b.trace("order-42").unwrap();
    assert_eq!(again.messages[0].events, t.messages[0].events);
    assert!(again.messages[0].now.groups[0].acked);
    close(b);
}

#[test]
fn rollback_unresolved_and_redelivery_show_up() {
    let (_dir, disk, cfg, b) = sim_broker(2, 64 * 1024 * 1024, "t", 2);
    b.rollback(keyed_half(&b, "t", "r", "rb", "nobody"))
        .unwrap();
    let t = traced(&b, "rb", &["half", "rolled_back"]);
    assert_eq!(t.messages[0].now.state, "rolled_back");
    assert!(t.to_string().contains("now: rolled back at"), "{t}");

    // No producer of the group is connected: two failed checks, then unresolved.
    let u = keyed_half(&b, "t", "u", "un", "gone");
    wait_until("unresolved", WAIT, || {
        b.trace("un").unwrap().messages[0].now.state == "unresolved"
    });
    let t = traced(
        &b,
        "un",
        &["half", "check_answered", "check_answered", "unresolved"],
    );
    assert_eq!(
        t.messages[0].events[3].event,
        Event::Unresolved { checks: 2 }
    );
    assert!(
        t.to_string()
            .contains(&format!("halfmq txn commit {}", u.0)),
        "{t}"
    );

    // Delivered, not acked, restart: the history says so, and it is delivered again.
    b.send("t", &Message::new("p").with_key("plain")).unwrap();
    assert_eq!(b.poll("g", "t", 100).unwrap().len(), 1);
    let b = restart_sim(&disk, b, &cfg);
    assert_now_says(&b, "plain", "group g: delivered (attempt 1), not acked");
    assert_eq!(b.poll("g", "t", 100).unwrap().len(), 1);
    traced(&b, "plain", &["stored", "delivered", "delivered"]);
    // Still unresolved after the restart, from the live transaction index.
    assert_eq!(b.trace("un").unwrap().messages[0].now.state, "unresolved");
    close(b);
}

#[test]
fn nack_retry_dead_letter_and_replay_show_up() {
    let (_dir, _disk, _cfg, b) = sim_broker(1000, 64 * 1024 * 1024, "orders", 1);
    b.set_group_settings(
        "ship",
        &GroupSettings {
            max_retries: Some(1),
            retry_backoff_ms: Some(vec![0]),
            ..GroupSettings::default()
        },
    )
    .unwrap();
    b.send("orders", &Message::new("o").with_key("order-1"))
        .unwrap();
    let d = b.poll("ship", "orders", 10).unwrap().remove(0);
    b.nack("ship", "orders", d.queue, d.offset, None).unwrap();
    let t = traced(&b, "order-1", &["stored", "delivered", "retried"]);
    assert!(
        t.messages[0]
            .now
            .line
            .contains("group ship: delivery failed (attempt 1)"),
        "{t}"
    );
    let d = b.poll("ship", "orders", 10).unwrap().remove(0);
    assert_eq!(d.attempt, 2);
    b.nack("ship", "orders", d.queue, d.offset, None).unwrap();
    let t = b.trace("order-1").unwrap();
    let mut k = kinds(&t);
    // The copy's record and the move's event can carry the same millisecond: either order.
    k[4..].sort();
    assert_eq!(
        k,
        [
            "stored",
            "delivered",
            "retried",
            "delivered",
            "dead_letter_stored",
            "dead_lettered"
        ],
        "{t}"
    );
    assert_eq!(
        t.messages[0].events[3].event,
        Event::Delivered {
            group: "ship".into(),
            attempt: 2
        }
    );
    let line = &t.messages[0].now.line;
    assert!(
        line.contains("group ship: parked in dead-letter queue %DLQ%ship"),
        "{t}"
    );
    // Replayed: a new message with the key, and the old story says so.
    let replayed = b.replay_dead_letters("ship", 10).unwrap();
    assert_eq!(replayed.len(), 1);
    let t = b.trace("order-1").unwrap();
    assert_eq!(t.messages.len(), 2, "{t}");
    assert_eq!(
        kind_of(&t.messages[0].events.last().unwrap().event),
        "replayed",
        "{t}"
    );
    assert!(
        t.messages[0]
            .now
            .line
            .contains("then replayed as a new message"),
        "{t}"
    );
    assert_eq!(t.messages[1].log_offset, replayed[0].receipt.log_offset);
    assert_eq!(t.messages[1].replayed_from.as_deref(), Some("ship/0"));
    assert!(
        t.messages[1]
            .now
            .line
            .contains("group ship: not delivered yet"),
        "{t}"
    );
    let text = t.to_string();
    assert!(text.contains("replayed from dead letter ship/0"), "{text}");
    close(b);
}

#[test]
fn delayed_messages_and_idempotency_duplicates_show_up() {
    let (_dir, _disk, _cfg, b) = sim_broker(1000, 64 * 1024 * 1024, "t", 2);
    let at = halfmq::clock::now_ms() + 300;
    let r = b
        .send_delayed("t", &Message::new("later").with_key("late"), at)
        .unwrap();
    let t = traced(&b, "late", &["delayed_stored"]);
    assert_eq!(t.messages[0].now.state, "delayed");
    assert_eq!(t.messages[0].now.next_at_ms, Some(at));
    wait_until("the delayed message fires", WAIT, || {
        b.trace("late").unwrap().messages[0].now.state == "stored"
    });
    let t = traced(&b, "late", &["delayed_stored", "delayed_fired", "stored"]);
    assert_eq!(t.messages[0].log_offset, r.id);
    assert!(
        t.to_string()
            .contains("now: delivered on time, stored at t"),
        "{t}"
    );

    let m = Message::new("once")
        .with_key("pay-9")
        .with_idempotency_key("idem-9");
    let first = b.send("t", &m).unwrap();
    let second = b.send("t", &m).unwrap();
    assert!(second.duplicate);
    let t = traced(&b, "pay-9", &["stored", "duplicate"]);
    assert_eq!(t.messages[0].log_offset, first.log_offset);
    close(b);
}

/// A message with further keys (RocketMQ's keys after the first) is found by any of them:
/// from the index (tiny files, rolled over), from the unindexed tail, after a restart, and a
/// committed half keeps them; bad further keys are refused and store nothing.
#[test]
fn a_message_is_found_by_any_of_its_keys() {
    let (_dir, disk, cfg, b) = sim_broker(1000, 16 * 1024, "t", 4);
    let m = Message::new("paid")
        .with_key("order-1")
        .with_more_keys(["pay-7", "refund-2", "order-1"]);
    assert_eq!(
        m.more_keys().collect::<Vec<_>>(),
        ["pay-7", "refund-2", "order-1"]
    );
    let sent = b.send("t", &m).unwrap();
    // Found at once (the tail), and once indexed among many other keys.
    for key in ["order-1", "pay-7", "refund-2"] {
        assert_eq!(offsets(&b.trace(key).unwrap()), [sent.log_offset], "{key}");
    }
    for i in 0..100 {
        b.send(
            "t",
            &Message::new("x")
                .with_key(format!("k{i}"))
                .with_more_keys([format!("m{i}")]),
        )
        .unwrap();
    }
    wait_until("indexed", WAIT, || b.key_index().files() > 10);
    for key in ["order-1", "pay-7", "refund-2"] {
        let t = b.trace(key).unwrap();
        assert_eq!(offsets(&t), [sent.log_offset], "{key}: {t}");
    }
    assert_eq!(b.trace("m42").unwrap().messages.len(), 1);
    assert!(
        b.trace("pay").unwrap().messages.is_empty(),
        "not a prefix match"
    );
    // A committed half keeps its further keys: its whole story is found by each.
    let txn = b
        .send_half(
            "t",
            &Message::new("held")
                .with_key("order-2")
                .with_more_keys(["pay-8"]),
            "pg",
            HalfOptions::default(),
        )
        .unwrap();
    b.commit(txn).unwrap();
    let by_key = b.trace("order-2").unwrap();
    let by_more = b.trace("pay-8").unwrap();
    assert_eq!(kinds(&by_more), kinds(&by_key), "{by_more}");
    assert_eq!(kinds(&by_more)[..2], ["half", "committed"], "{by_more}");
    let b = restart_sim(&disk, b, &cfg);
    assert_eq!(offsets(&b.trace("refund-2").unwrap()), [sent.log_offset]);

    // Refused, nothing stored: further keys without a key, an empty one, too many.
    let before = b.store().log_stats().records;
    for bad in [
        Message::new("no key").with_more_keys(["a"]),
        Message::new("empty")
            .with_key("k")
            .with_more_keys(["a", ""]),
        Message::new("many")
            .with_key("k")
            .with_more_keys((0..33).map(|i| i.to_string())),
    ] {
        let r = b.send("t", &bad);
        assert!(
            matches!(
                &r,
                Err(halfmq::Error::Invalid {
                    what: "further keys",
                    ..
                })
            ),
            "{r:?}"
        );
    }
    assert_eq!(b.store().log_stats().records, before);
    close(b);
}

#[test]
fn a_key_among_many_rolled_over_files_collisions_and_unknown_keys() {
    let (_dir, disk, cfg, b) = sim_broker(1000, 16 * 1024, "t", 4);
    let mut needles = Vec::new();
    for i in 0..600 {
        b.send("t", &Message::new("x").with_key(format!("k{i}")))
            .unwrap();
        if i % 200 == 7 {
            needles.push(
                b.send("t", &Message::new("n").with_key("needle"))
                    .unwrap()
                    .log_offset,
            );
        }
        if i == 300 {
            // Keys that start like the needle must not be mixed in.
            b.send("t", &Message::new("y").with_key("needle\0tail"))
                .unwrap();
            b.send("t", &Message::new("y").with_key("needle2")).unwrap();
        }
    }
    // 600+ keyed records in files of 16 entries.
    wait_until("indexed", WAIT, || b.key_index().files() > 30);
    let t = b.trace("needle").unwrap();
    assert_eq!(offsets(&t), needles, "{t}");
    assert!(t.messages.iter().all(|m| m.now.state == "stored"));
    let unknown = b.trace("no-such-key").unwrap();
    assert!(unknown.messages.is_empty());
    assert!(unknown
        .to_string()
        .contains("no message with key \"no-such-key\""));
    assert!(b.trace("").unwrap().messages.is_empty());
    assert_eq!(b.trace("needle\0tail").unwrap().messages.len(), 1);
    for i in (0..600).step_by(37) {
        let t = b.trace(&format!("k{i}")).unwrap();
        assert_eq!(t.messages.len(), 1, "k{i}: {t}");
    }
    let b = restart_sim(&disk, b, &cfg);
    assert_eq!(offsets(&b.trace("needle").unwrap()), needles);
    close(b);
}

#[test]
fn keyless_messages_are_not_indexed() {
    let (_dir, cfg, b) = fs_broker("t", 1);
    for _ in 0..100 {
        b.send("t", &Message::new("no key")).unwrap();
    }
    let before = b.store().log_stats().durable_offset;
    wait_until("indexer passed the keyless records", WAIT, || {
        b.key_index().indexed_upto() >= before
    });
    assert_eq!(b.key_index().entries(), 0);
    close(b);
    // The mark survives without entries: nothing to read again on open.
    let b = open_fs(&cfg);
    assert!(b.key_index().indexed_upto() >= before);
    assert_eq!(b.key_index().entries(), 0);
    b.send("t", &Message::new("k").with_key("one")).unwrap();
    assert_eq!(b.trace("one").unwrap().messages.len(), 1);
    assert_eq!(b.key_index().entries(), 1);
    assert_eq!(b.key_index().files(), 1);
    close(b);
}

/// The indexer reads the log only up to the newest keyed record and passes over keyless
/// stretches unread: with senders mixing keyed and keyless messages concurrently (and the
/// indexer catching up in between), no keyed message may fall into a stretch passed over.
#[test]
fn keyed_messages_among_concurrent_keyless_ones_are_all_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1000, 64 * 1024 * 1024);
    cfg.store.key_index_slots = 1024;
    cfg.store.key_index_entries = 4096;
    let b = open_fs(&cfg);
    b.create_topic("t", 4).unwrap();
    let senders: Vec<_> = (0..4u64)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                let mut rng = t * 7 + 1;
                let mut keyed = Vec::new();
                for i in 0..400u64 {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                    if (rng >> 33) % 5 == 0 {
                        let key = format!("t{t}-{i}");
                        let r = b.send("t", &Message::new("v").with_key(&key)).unwrap();
                        keyed.push((key, r.log_offset));
                    } else {
                        b.send("t", &Message::new("no key")).unwrap();
                    }
                    if i % 50 == 0 {
                        // A trace catches the index up at once, between sends.
                        b.trace("t0-0").unwrap();
                    }
                }
                keyed
            })
        })
        .collect();
    let keyed: Vec<(String, u64)> = senders
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(keyed.len() > 100, "{} keyed", keyed.len());
    for (key, off) in &keyed {
        assert_eq!(offsets(&b.trace(key).unwrap()), vec![*off], "{key}");
    }
    assert_eq!(b.key_index().entries(), keyed.len() as u64);
    close(b);
    // And after a reopen, from the persisted index.
    let b = open_fs(&cfg);
    for (key, off) in keyed.iter().step_by(7) {
        assert_eq!(
            offsets(&b.trace(key).unwrap()),
            vec![*off],
            "{key} after reopen"
        );
    }
    close(b);
}

/// Fill a real directory with keyed messages (tiny index files), close it cleanly, and
/// return each key's log offset.
fn fill_fs(cfg: &BrokerConfig, n: usize) -> Vec<(String, u64)> {
    let b = open_fs(cfg);
    b.create_topic("t", 2).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let key = format!("key-{}", i % (n / 2));
        let r = b.send("t", &Message::new("v").with_key(&key)).unwrap();
        out.push((key, r.log_offset));
    }
    close(b);
    out
}

fn check_all(b: &Broker, sent: &[(String, u64)], what: &str) {
    let mut keys: Vec<&String> = sent.iter().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let want: Vec<u64> = sent
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, o)| *o)
            .collect();
        let t = b.trace(key).unwrap();
        assert_eq!(offsets(&t), want, "{what}: {key}: {t}");
    }
}

fn index_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Something done to a data directory's index files.
type Damage = Box<dyn Fn(&Path)>;

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn the_index_is_rebuilt_after_its_files_are_deleted_or_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1000, 64 * 1024 * 1024);
    let sent = fill_fs(&cfg, 100);
    let files = index_files(dir.path());
    assert!(files.len() >= 6, "{files:?}");
    // Geometry of the tiny files: 64-byte header, 4 slots, 16 entries of 40 bytes.
    let (slots_at, entries_at) = (64u64, 64u64 + 4 * 4);
    let damage: Vec<(&str, Damage)> = vec![
        ("nothing", Box::new(|_: &Path| {})),
        (
            "all files deleted",
            Box::new(|d: &Path| {
                for f in index_files(d) {
                    std::fs::remove_file(f).unwrap();
                }
            }),
        ),
        (
            "header byte flipped",
            Box::new(|d: &Path| flip(&index_files(d)[2], 30)),
        ),
        (
            "slot byte flipped",
            Box::new(move |d: &Path| flip(&index_files(d)[1], slots_at + 5)),
        ),
        (
            "entry byte flipped (found at lookup)",
            Box::new(move |d: &Path| flip(&index_files(d)[3], entries_at + 40 * 2 + 9)),
        ),
        (
            "file truncated",
            Box::new(|d: &Path| {
                let f = &index_files(d)[4];
                let len = std::fs::metadata(f).unwrap().len();
                let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
                file.set_len(len - 100).unwrap();
            }),
        ),
        (
            "newest file emptied",
            Box::new(|d: &Path| {
                let f = index_files(d).pop().unwrap();
                std::fs::write(f, b"").unwrap();
            }),
        ),
        (
            "garbage file",
            Box::new(|d: &Path| {
                std::fs::write(
                    d.join("index").join("00000000000000000001.idx"),
                    vec![7u8; 700],
                )
                .unwrap();
            }),
        ),
    ];
    for (what, hurt) in damage {
        hurt(dir.path());
        let b = open_fs(&cfg);
        check_all(&b, &sent, what);
        close(b);
    }
}

/// After a power loss at any point, every acknowledged keyed send is traced, exactly once,
/// at its log offset; nothing that is not in the log is shown; and a second crash during
/// the next run changes none of that. The log is on the simulated disk; the key index (like
/// sled) on real files, so it comes back with entries for records the crash took, and for
/// offsets that the next run fills with other records: the read-back check must hide them.
#[test]
fn crashes_keep_the_key_index_complete() {
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = SimStorage::new();
        let cfg = config(dir.path(), 1000, 8 * 1024);
        let mut acked: Vec<(String, u64)> = Vec::new();
        let mut rng = fastrand::Rng::with_seed(seed);
        for round in 0..3 {
            let b = open_sim(&disk, &cfg);
            b.create_topic("c", 3).unwrap();
            for (key, off) in &acked {
                let t = b.trace(key).unwrap();
                assert_eq!(
                    offsets(&t),
                    vec![*off],
                    "seed {seed} round {round} key {key}: {t}"
                );
            }
            let n = rng.usize(50..300);
            for i in 0..n {
                let key = format!("s{seed}-r{round}-{i}");
                let r = b.send(
                    "c",
                    &Message::new(vec![b'z'; rng.usize(1..300)]).with_key(&key),
                );
                acked.push((key, r.unwrap().log_offset));
                if i % 97 == 0 {
                    // Let the indexer persist now and then.
                    std::thread::sleep(Duration::from_millis(rng.u64(0..30)));
                }
            }
            // Some unacknowledged writes in flight at the crash.
            let b2 = b.clone();
            let inflight = std::thread::spawn(move || {
                for i in 0..50 {
                    if b2
                        .send(
                            "c",
                            &Message::new("late").with_key(format!("late-{round}-{i}")),
                        )
                        .is_err()
                    {
                        break;
                    }
                }
            });
            std::thread::sleep(Duration::from_micros(rng.u64(0..2000)));
            let mode = if rng.bool() {
                CrashMode::DropUnsynced
            } else {
                CrashMode::KeepRandomPrefix { seed }
            };
            let after = disk.crash(mode);
            inflight.join().unwrap();
            poison(&b, "c");
            let _ = b.close();
            drop(b);
            disk = after;
        }
        let b = open_sim(&disk, &cfg);
        for (key, off) in &acked {
            let t = b.trace(key).unwrap();
            assert_eq!(offsets(&t), vec![*off], "seed {seed} final, key {key}: {t}");
        }
        // Late sends that survived are traced at most once, and only if really stored.
        for round in 0..3 {
            for i in 0..50 {
                let t = b.trace(&format!("late-{round}-{i}")).unwrap();
                assert!(t.messages.len() <= 1, "{t}");
            }
        }
        close(b);
    }
}

#[test]
fn a_crash_after_commit_keeps_the_story() {
    let (_dir, disk, cfg, b) = sim_broker(1000, 64 * 1024 * 1024, "p", 2);
    let txn = keyed_half(&b, "p", "a", "k", "pay");
    b.commit(txn).unwrap();
    let disk = crash_sim(&disk, b, CrashMode::DropUnsynced, "p");
    let b = open_sim(&disk, &cfg);
    let t = traced(&b, "k", &["half", "committed", "stored"]);
    assert_eq!(t.messages[0].txn, Some(txn.0));
    close(b);
}

#[test]
fn index_files_below_the_log_start_can_be_dropped() {
    let (_dir, _cfg, b) = fs_broker("t", 1);
    let mut last = 0;
    for i in 0..100 {
        last = b
            .send("t", &Message::new("v").with_key(format!("r{i}")))
            .unwrap()
            .log_offset;
    }
    assert_eq!(b.trace("r99").unwrap().messages.len(), 1);
    let files = b.key_index().files();
    // As retention would after deleting every segment before `last`.
    let dropped = b.key_index().drop_below(last).unwrap();
    assert_eq!(dropped, files - 1);
    assert!(b.trace("r0").unwrap().messages.is_empty());
    assert_eq!(b.trace("r99").unwrap().messages.len(), 1);
    close(b);
}

fn fill_dir(dir: &Path) {
    let b = open_fs(&BrokerConfig::new(dir));
    b.create_topic("orders", 2).unwrap();
    let txn = keyed_half(&b, "orders", "paid", "order-7", "pay");
    b.commit(txn).unwrap();
    b.send("orders", &Message::new("other").with_key("order-8"))
        .unwrap();
    let d = b.poll("billing", "orders", 10).unwrap();
    for d in d.iter().filter(|d| d.key == "order-7") {
        b.ack("billing", "orders", d.queue, d.offset).unwrap();
    }
    close(b);
}

fn run_bin(args: &[&str]) -> String {
    run_env(args, &[("HALFMQ_LOG", "warn")]).ok().stdout
}

#[test]
fn cli_trace_on_a_data_dir_and_against_a_broker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    fill_dir(&dir);
    let d = dir.to_str().unwrap();
    let text = run_bin(&["trace", "order-7", "--data-dir", d]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("key \"order-7\": 1 message"), "{text}");
    for what in ["half ", "committed ", "stored ", "delivered ", "acked "] {
        assert!(
            lines.iter().any(|l| l.contains(what)),
            "no {what:?} line:\n{text}"
        );
    }
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("  now: committed, stored at orders queue")
            && last.ends_with("group billing: acked"),
        "{text}"
    );
    let json = run_bin(&["trace", "order-7", "--data-dir", d, "--json"]);
    let t: Trace = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(
        kinds(&t),
        ["half", "committed", "stored", "delivered", "acked"]
    );
    // An unknown key is an answer, not a failure.
    let none = run_bin(&["trace", "order-9", "--data-dir", d]);
    assert!(none.contains("no message with key \"order-9\""), "{none}");

    // The same through a running broker (--addr).
    let mut broker = BrokerProc::start(&dir, &[]);
    let json = run_bin(&["trace", "order-7", "--addr", &broker.addr, "--json"]);
    let none = run_bin(&["trace", "order-9", "--addr", &broker.addr]);
    broker.kill9();
    let over_net: Trace = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(over_net.messages[0].events, t.messages[0].events);
    assert!(none.contains("no message with key \"order-9\""), "{none}");
}

#[test]
fn retention_drops_index_files_and_reports_expired_records() {
    let dir = tempfile::tempdir().unwrap();
    // Frequent checkpoints: recovery's start does not pin the log.
    let mut cfg = config(dir.path(), 1000, 16 * 1024);
    cfg.retention.bytes_max = Some(2 * cfg.store.segment_bytes);
    cfg.retention.interval = Duration::from_secs(24 * 3600);
    let b = open_fs(&cfg);
    b.create_topic("t", 1).unwrap();
    let mut sent = Vec::new();
    for i in 0..300 {
        let r = b
            .send(
                "t",
                &Message::new(vec![b'b'; 1000]).with_key(format!("m{i}")),
            )
            .unwrap();
        sent.push(r.log_offset);
    }
    // Everything acked, so nothing pins the log.
    let got = b.poll("g", "t", 1000).unwrap();
    assert_eq!(got.len(), 300);
    let acks: Vec<(u32, u64)> = got.iter().map(|d| (d.queue, d.offset)).collect();
    b.ack_many("g", "t", &acks).unwrap();
    assert_eq!(b.trace("m0").unwrap().messages.len(), 1);
    let files_before = b.key_index().files();
    let report = b.enforce_retention().unwrap();
    assert!(report.segments_deleted > 0, "{report:?}");
    let start = b.store().log_start();
    assert!(b.key_index().files() < files_before);
    let mut expired = 0;
    for (i, off) in sent.iter().enumerate() {
        let t = b.trace(&format!("m{i}")).unwrap();
        if *off < start {
            assert!(t.messages.is_empty(), "m{i} below the log start: {t}");
            expired += t.expired;
            if t.expired > 0 {
                assert!(t.to_string().contains("deleted by retention"), "{t}");
            }
        } else {
            assert_eq!(offsets(&t), vec![*off], "m{i}: {t}");
        }
    }
    // The index file that straddles the new start still has entries below it.
    assert!(expired > 0);
    close(b);
}
