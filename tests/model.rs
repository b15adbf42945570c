//! Model-based crash test of the embedded broker on the simulated disk, under the default
//! `FlushPolicy::Sync`. Random sequences of sends, polls, acks, clean reopens and crashes
//! (every unsynced write lost, or a random, possibly torn, prefix of them kept) run against
//! a [`Broker`] on a [`SimStorage`] and, side by side, against a small in-memory model. After
//! every step the broker must agree with the model, which proves: every send that returned
//! `Ok` survives any sequence of crashes at the queue and offset its receipt named, with its
//! key and body, in send order, with nothing else beside it (no garbage, no duplicates); an
//! ack that returned `Ok` holds (that group never sees the message again, before or after a
//! crash); a message delivered but not acked comes back after a restart (at-least-once), in
//! queue order; and between restarts a group never gets a message twice. A second property
//! crashes the disk while 2 to 4 threads are sending and checks that every send acknowledged
//! before the crash is there exactly once afterwards, at the place its receipt named, and that
//! whatever else survived is a whole message some thread really tried to send.
//!
//! `HALFMQ_MODEL_CASES=N` sets the number of cases of each property (default 64). A failure
//! prints the generated case and the numbered operation sequence; the sequential property
//! replays exactly from that (bodies are generated from a printed length and seed), the
//! concurrent one up to thread timing.
//!
//! Regression: a crash in the middle of a segment roll used to make open fail with
//! `Error::Corrupt` (`crash_during_a_segment_roll_is_a_torn_tail_not_corruption`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::{Broker, BrokerConfig, Delivery, Message, SendReceipt};
use halfmq_store::record::HEADER_BYTES;
use halfmq_store::sim::{CrashMode, Faults, SimStorage};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

mod common;

use common::{
    check_due_order, crash_mode, mark_delivered, model_config, poll_by_queue, release,
    run_ops_then_crash, sole, SimHarness, SimParts,
};

const TOPICS: [&str; 3] = ["orders", "payments", "audit"];
/// Keys a message may have; "" is no key (round robin over the queues).
const KEYS: [&str; 4] = ["", "alice", "bob", "carol"];
const GROUPS: [&str; 2] = ["billing", "shipping"];
/// Small segments, so that cases roll over to new segment files.
const SEGMENT_BYTES: u64 = 64 * 1024;
/// Larger than any poll in these tests: "everything there is".
const POLL_ALL: usize = 1 << 20;

/// splitmix64: a tiny deterministic generator, so bodies are reproducible from a seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn fresh_disk_and_config(queues: u32, checkpoint_bytes: u64) -> (tempfile::TempDir, BrokerConfig) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = BrokerConfig::new(dir.path());
    cfg.store.segment_bytes = SEGMENT_BYTES;
    // At most a quarter of a segment is allowed.
    cfg.store.record_bytes_max = 8 * 1024;
    cfg.store.checkpoint_bytes = checkpoint_bytes;
    cfg.default_queues = queues;
    // No transactions here; without the check-back thread nothing but the test holds the
    // broker, so dropping it releases the metadata database before the next open.
    cfg.txn.check_back = false;
    (dir, cfg)
}

// =============================================================================================
// Property 1: one client, a model, crashes between operations
// =============================================================================================

/// A message body, generated from its length and a seed so that a printed case is replayable
/// and short.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Body {
    len: usize,
    seed: u64,
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        pseudo_random_bytes(self.len, self.seed)
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Body {{ len: {}, seed: {:#x} }}", self.len, self.seed)
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// `topic` is an index into the case's topics (taken modulo their number).
    Send {
        topic: usize,
        key: usize,
        body: Body,
    },
    /// `count` sends like `Send`, the i-th with `body.seed + i`: fills segments faster, so
    /// that cases cross segment boundaries.
    SendMany {
        topic: usize,
        key: usize,
        count: u64,
        body: Body,
    },
    Poll {
        group: usize,
        topic: usize,
        max: usize,
    },
    /// Ack one of the group's delivered-but-not-acked messages (any topic).
    Ack { group: usize, pick: Index },
    /// Power loss, then open the surviving disk.
    Crash(CrashMode),
    /// Clean close, then open.
    Reopen,
}

#[derive(Debug, Clone)]
struct Case {
    /// How many of `TOPICS` are used.
    topics: usize,
    /// Queues per topic.
    queues: u32,
    /// `StoreConfig::checkpoint_bytes`: small values make the flusher write checkpoints
    /// (and sync the indexes) during the case, the default only at close and recovery.
    checkpoint_bytes: u64,
    ops: Vec<Op>,
    /// The case ends with this crash, a reopen, and a full check (including draining every
    /// group).
    final_crash: CrashMode,
}

fn body_strategy() -> impl Strategy<Value = Body> {
    (
        prop_oneof![1 => 0usize..64, 3 => 64usize..=2048],
        any::<u64>(),
    )
        .prop_map(|(len, seed)| Body { len, seed })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..TOPICS.len(), 0..KEYS.len(), body_strategy())
            .prop_map(|(topic, key, body)| Op::Send { topic, key, body }),
        1 => (0..TOPICS.len(), 0..KEYS.len(), 1u64..=24, body_strategy())
            .prop_map(|(topic, key, count, body)| Op::SendMany { topic, key, count, body }),
        3 => (0..GROUPS.len(), 0..TOPICS.len(), 1usize..=10)
            .prop_map(|(group, topic, max)| Op::Poll { group, topic, max }),
        3 => (0..GROUPS.len(), any::<Index>()).prop_map(|(group, pick)| Op::Ack { group, pick }),
        1 => crash_mode().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        2usize..=3,
        prop_oneof![Just(1u32), Just(2), Just(4)],
        prop_oneof![Just(64u64 * 1024 * 1024), 4096u64..=65536],
        prop::collection::vec(op_strategy(), 1..100),
        crash_mode(),
    )
        .prop_map(
            |(topics, queues, checkpoint_bytes, ops, final_crash)| Case {
                topics,
                queues,
                checkpoint_bytes,
                ops,
                final_crash,
            },
        )
}

/// (topic, queue, queue offset): one message.
type MsgId = (String, u32, u64);
/// (key, body) of a message that was sent.
type Sent = (String, Vec<u8>);

#[derive(Debug, Default)]
struct GroupModel {
    /// Acks that returned `Ok`.
    acked: BTreeSet<MsgId>,
    /// Handed to the group since the broker was last opened.
    delivered: BTreeSet<MsgId>,
    /// Handed to the group at some time and not acked yet, oldest first: what a consumer
    /// could still ack.
    outstanding: Vec<MsgId>,
}

#[derive(Debug, Default)]
struct Model {
    /// (topic, queue) → (key, body) of every message sent there, by queue offset.
    queues: BTreeMap<(String, u32), Vec<Sent>>,
    /// (topic, key) → the queue that key goes to; must never change.
    key_queue: BTreeMap<(String, String), u32>,
    groups: BTreeMap<String, GroupModel>,
}

impl Model {
    fn len(&self, topic: &str, queue: u32) -> u64 {
        self.queues
            .get(&(topic.to_owned(), queue))
            .map_or(0, |q| q.len() as u64)
    }
}

/// What a step failed on, as text for the assertion message.
type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+).into());
        }
    };
}

struct Harness {
    _dir: tempfile::TempDir,
    cfg: BrokerConfig,
    topics: Vec<&'static str>,
    disk: SimStorage,
    broker: Option<Arc<Broker>>,
    model: Model,
    /// Fresh check groups used so far.
    checks: u32,
}

impl Harness {
    fn new(case: &Case) -> Result<Harness, String> {
        let (dir, cfg) = fresh_disk_and_config(case.queues, case.checkpoint_bytes);
        let disk = SimStorage::new();
        let broker = Broker::open_with(Arc::new(disk.clone()), cfg.clone())
            .map_err(|e| format!("first open failed: {e}"))?;
        Ok(Harness {
            _dir: dir,
            cfg,
            topics: TOPICS[..case.topics].to_vec(),
            disk,
            broker: Some(broker),
            model: Model::default(),
            checks: 0,
        })
    }

    fn broker(&self) -> &Broker {
        self.broker
            .as_ref()
            .expect("the broker is open between steps")
    }

    fn step(&mut self, op: &Op) -> Check {
        match op {
            Op::Send { topic, key, body } => {
                let topic = self.topics[topic % self.topics.len()];
                self.send(topic, KEYS[*key], body.bytes())?;
            }
            Op::SendMany {
                topic,
                key,
                count,
                body,
            } => {
                let topic = self.topics[topic % self.topics.len()];
                for i in 0..*count {
                    let body = Body {
                        seed: body.seed.wrapping_add(i),
                        ..*body
                    };
                    self.send(topic, KEYS[*key], body.bytes())?;
                }
            }
            Op::Poll { group, topic, max } => {
                let topic = self.topics[topic % self.topics.len()];
                self.poll(GROUPS[*group], topic, *max)?;
            }
            Op::Ack { group, pick } => self.ack(GROUPS[*group], pick)?,
            Op::Crash(mode) => self.crash(*mode)?,
            Op::Reopen => self.clean_restart()?,
        }
        self.check_stats()
    }

    fn send(&mut self, topic: &str, key: &str, body: Vec<u8>) -> Check {
        let r: SendReceipt = self
            .broker()
            .send(topic, &Message::new(body.clone()).with_key(key))
            .map_err(|e| format!("send to {topic} failed: {e}"))?;
        ensure!(
            r.topic == topic && r.queue < self.cfg.default_queues,
            "receipt {r:?} for a send to {topic}"
        );
        if !key.is_empty() {
            let q = *self
                .model
                .key_queue
                .entry((topic.to_owned(), key.to_owned()))
                .or_insert(r.queue);
            ensure!(
                q == r.queue,
                "key {key:?} of {topic} went to queue {} but earlier to queue {q}",
                r.queue
            );
        }
        let q = self
            .model
            .queues
            .entry((topic.to_owned(), r.queue))
            .or_default();
        ensure!(
            r.offset == q.len() as u64,
            "send to {topic}/{} got offset {}, but the queue held {} messages",
            r.queue,
            r.offset,
            q.len()
        );
        q.push((key.to_owned(), body));
        Ok(())
    }

    /// Poll and check the answer exactly: per queue, the next messages the group has neither
    /// been given since the last open nor acked, in queue order; as many as there are, up to
    /// `max`.
    fn poll(&mut self, group: &str, topic: &str, max: usize) -> Result<usize, String> {
        let got = self
            .broker()
            .poll(group, topic, max)
            .map_err(|e| format!("poll {group} {topic} failed: {e}"))?;
        let g = self.model.groups.entry(group.to_owned()).or_default();
        let mut pending: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for queue in 0..self.cfg.default_queues {
            let len = self
                .model
                .queues
                .get(&(topic.to_owned(), queue))
                .map_or(0, |q| q.len() as u64);
            let ids = (0..len).filter(|&o| {
                let id = (topic.to_owned(), queue, o);
                !g.acked.contains(&id) && !g.delivered.contains(&id)
            });
            pending.insert(queue, ids.collect());
        }
        let pending_total: usize = pending.values().map(Vec::len).sum();
        let brief = |ds: &[Delivery]| -> Vec<(u32, u64)> {
            ds.iter().map(|d| (d.queue, d.offset)).collect()
        };
        ensure!(
            got.len() == max.min(pending_total),
            "poll {group} {topic} max {max} returned {} messages {:?}; {pending_total} were due: {pending:?}",
            got.len(),
            brief(&got),
        );
        let mut per_queue: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for d in &got {
            ensure!(
                d.topic == topic,
                "poll of {topic} returned a message of {}",
                d.topic
            );
            let Some(sent) = self
                .model
                .queues
                .get(&(topic.to_owned(), d.queue))
                .and_then(|q| q.get(d.offset as usize))
            else {
                return Err(format!(
                    "poll {group} {topic} returned {}/{} which was never sent",
                    d.queue, d.offset
                ));
            };
            ensure!(
                d.key == sent.0 && d.body == sent.1,
                "{topic}/{}@{} came back with key {:?} and a body of {} bytes; sent with key {:?} and {} bytes (equal: {})",
                d.queue,
                d.offset,
                d.key,
                d.body.len(),
                sent.0,
                sent.1.len(),
                d.body == sent.1
            );
            per_queue.entry(d.queue).or_default().push(d.offset);
        }
        check_due_order(group, topic, &per_queue, &pending)?;
        let ids = got.iter().map(|d| (topic.to_owned(), d.queue, d.offset));
        mark_delivered(&mut g.delivered, &mut g.outstanding, ids);
        Ok(got.len())
    }

    fn ack(&mut self, group: &str, pick: &Index) -> Check {
        let g = self.model.groups.entry(group.to_owned()).or_default();
        if g.outstanding.is_empty() {
            return Ok(());
        }
        let id = g.outstanding.remove(pick.index(g.outstanding.len()));
        let b = self.broker.as_ref().expect("open");
        b.ack(group, &id.0, id.1, id.2)
            .map_err(|e| format!("ack {group} {id:?} failed: {e}"))?;
        g.acked.insert(id);
        Ok(())
    }

    /// A group that never existed sees, per queue, exactly what the model holds.
    fn check_contents(&mut self, when: &str) -> Check {
        self.checks += 1;
        let group = format!("check-{}", self.checks);
        for &topic in &self.topics.clone() {
            let mut got = poll_by_queue(self.broker(), &group, topic)
                .map_err(|e| format!("poll {group} {topic} {when} failed: {e}"))?;
            for queue in 0..self.cfg.default_queues {
                let have = got.remove(&queue).unwrap_or_default();
                let want = self
                    .model
                    .queues
                    .get(&(topic.to_owned(), queue))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let offsets: Vec<u64> = have.iter().map(|d| d.offset).collect();
                ensure!(
                    offsets == (0..want.len() as u64).collect::<Vec<_>>(),
                    "{when}: a fresh group sees offsets {offsets:?} in {topic}/{queue}; {} messages were acknowledged there",
                    want.len()
                );
                for (d, (key, body)) in have.iter().zip(want) {
                    ensure!(
                        d.topic == topic && &d.key == key && &d.body == body,
                        "{when}: {topic}/{queue}@{} holds key {:?} and {} bytes; sent key {key:?} and {} bytes (bodies equal: {})",
                        d.offset,
                        d.key,
                        d.body.len(),
                        body.len(),
                        &d.body == body
                    );
                }
            }
            ensure!(
                got.is_empty(),
                "{when}: a fresh group got messages from queues that do not exist: {:?}",
                got.keys().collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    /// Queue lengths and every group's durable position agree with the model.
    fn check_stats(&self) -> Check {
        let stats = self
            .broker()
            .stats()
            .map_err(|e| format!("stats failed: {e}"))?;
        let mut seen: BTreeSet<(String, String, u32)> = BTreeSet::new();
        for q in &stats.queues {
            let len = self.model.len(&q.topic, q.queue);
            ensure!(
                q.messages == len,
                "{}/{} holds {} messages; {len} were acknowledged",
                q.topic,
                q.queue,
                q.messages
            );
            for lag in &q.groups {
                let Some(g) = self.model.groups.get(&lag.group) else {
                    // A group that polled but never acked: all of the queue is its backlog.
                    ensure!(
                        lag.committed == 0 && lag.backlog == len,
                        "group {} never acked in {}/{}, but stats say committed {} backlog {} of {len}",
                        lag.group,
                        q.topic,
                        q.queue,
                        lag.committed,
                        lag.backlog
                    );
                    continue;
                };
                let acked = |o: u64| g.acked.contains(&(q.topic.clone(), q.queue, o));
                let committed = (0..).find(|&o| !acked(o)).unwrap_or(0);
                let acked_count = (0..len).filter(|&o| acked(o)).count() as u64;
                ensure!(
                    lag.committed == committed && lag.backlog == len - acked_count,
                    "group {} in {}/{}: committed {} backlog {}; the model says {committed} and {}",
                    lag.group,
                    q.topic,
                    q.queue,
                    lag.committed,
                    lag.backlog,
                    len - acked_count
                );
                seen.insert((lag.group.clone(), q.topic.clone(), q.queue));
            }
        }
        for (name, g) in &self.model.groups {
            for (t, q, _) in &g.acked {
                ensure!(
                    seen.contains(&(name.clone(), t.clone(), *q)),
                    "group {name} acked messages of {t}/{q}, but stats do not list it"
                );
            }
        }
        Ok(())
    }

    /// Drain every group: after the last open it must get exactly its un-acked messages.
    fn drain_groups(&mut self) -> Check {
        for group in GROUPS {
            for topic in self.topics.clone() {
                // `poll` checks each answer against the model; the last, empty answer proves
                // nothing was left.
                while self.poll(group, topic, POLL_ALL)? > 0 {}
            }
        }
        Ok(())
    }
}

impl SimHarness for Harness {
    fn parts(&mut self) -> SimParts<'_> {
        (&mut self.disk, &self.cfg, &mut self.broker)
    }

    fn opened(&mut self, when: &str) -> Check {
        for g in self.model.groups.values_mut() {
            g.delivered.clear();
        }
        self.check_contents(when)
    }
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    run_ops_then_crash(
        &format!(
            "topics {} queues {} checkpoint_bytes {} final crash {:?}",
            case.topics, case.queues, case.checkpoint_bytes, case.final_crash
        ),
        &case.ops,
        (|| Harness::new(case), Harness::step),
        case.final_crash,
        |h| {
            h.check_stats()?;
            h.drain_groups()
        },
    )
}

proptest! {
    #![proptest_config(model_config(64, 2048))]

    #[test]
    fn sends_and_acks_survive_crashes(case in case_strategy()) {
        run_case(&case)?;
    }
}

// =============================================================================================
// Property 2: concurrent senders, a crash in the middle
// =============================================================================================

#[derive(Debug, Clone)]
struct Round {
    /// How long the senders run after each has had one send acknowledged.
    run_us: u64,
    mode: CrashMode,
}

#[derive(Debug, Clone)]
struct ConcurrentCase {
    threads: u32,
    queues: u32,
    checkpoint_bytes: u64,
    /// Each round: senders run, the disk crashes under them, the broker is opened again.
    rounds: Vec<Round>,
}

fn concurrent_strategy() -> impl Strategy<Value = ConcurrentCase> {
    let round = (0u64..5000, crash_mode()).prop_map(|(run_us, mode)| Round { run_us, mode });
    (
        2u32..=4,
        prop_oneof![Just(1u32), Just(4)],
        prop_oneof![Just(64u64 * 1024 * 1024), 4096u64..=65536],
        prop::collection::vec(round, 1..=3),
    )
        .prop_map(
            |(threads, queues, checkpoint_bytes, rounds)| ConcurrentCase {
                threads,
                queues,
                checkpoint_bytes,
                rounds,
            },
        )
}

/// Who sent a message: (round, thread, sequence number within the thread's round).
type SenderId = (u32, u32, u64);

const ID_BYTES: usize = 16;

/// The topic, key and body a sender uses for its `seq`th message; the body starts with the
/// id, so a surviving message says who sent it.
fn concurrent_message(id: SenderId) -> (&'static str, &'static str, Vec<u8>) {
    let (round, thread, seq) = id;
    let mut h = (u64::from(round) << 40) ^ (u64::from(thread) << 32) ^ seq;
    let pad = (splitmix(&mut h) % 1500) as usize;
    let mut body = Vec::with_capacity(ID_BYTES + pad);
    body.extend_from_slice(&round.to_le_bytes());
    body.extend_from_slice(&thread.to_le_bytes());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(&pseudo_random_bytes(pad, h));
    let topic = TOPICS[(seq % 2) as usize];
    let key = KEYS[((seq + u64::from(thread)) % KEYS.len() as u64) as usize];
    (topic, key, body)
}

fn sender_id(body: &[u8]) -> Option<SenderId> {
    if body.len() < ID_BYTES {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&body[8..16]);
    Some((u32_at(0), u32_at(4), u64::from_le_bytes(seq)))
}

/// One send attempt: `Some(receipt)` if it returned `Ok`.
type Attempt = (SenderId, Option<SendReceipt>);

fn send_until_stopped(
    broker: &Broker,
    round: u32,
    thread: u32,
    stop: &AtomicBool,
    acked: &AtomicU64,
) -> Vec<Attempt> {
    let mut out = Vec::new();
    for seq in 0.. {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let id = (round, thread, seq);
        let (topic, key, body) = concurrent_message(id);
        match broker.send(topic, &Message::new(body).with_key(key)) {
            Ok(r) => {
                acked.fetch_add(1, Ordering::AcqRel);
                out.push((id, Some(r)));
            }
            Err(_) => {
                // The disk is gone: this and every later send fails.
                out.push((id, None));
                break;
            }
        }
    }
    out
}

fn run_concurrent(case: &ConcurrentCase) -> Result<(), String> {
    let (_dir, cfg) = fresh_disk_and_config(case.queues, case.checkpoint_bytes);
    let mut disk = SimStorage::new();
    let mut broker = Broker::open_with(Arc::new(disk.clone()), cfg.clone())
        .map_err(|e| format!("first open: {e}"))?;
    // Every send ever attempted, and where each message found after a crash was.
    let mut attempts: BTreeMap<SenderId, Option<SendReceipt>> = BTreeMap::new();
    let mut survivors: BTreeMap<(String, u32, u64), SenderId> = BTreeMap::new();
    for (round_no, round) in case.rounds.iter().enumerate() {
        let round_no = round_no as u32;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..case.threads)
            .map(|thread| {
                let (b, stop, acked) = (broker.clone(), stop.clone(), acked.clone());
                std::thread::spawn(move || send_until_stopped(&b, round_no, thread, &stop, &acked))
            })
            .collect();
        // Let every sender get going before the clock starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while acked.load(Ordering::Acquire) < u64::from(case.threads) && Instant::now() < deadline {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_micros(round.run_us));
        let survivor = disk.crash(round.mode);
        stop.store(true, Ordering::Release);
        for h in handles {
            let log = h
                .join()
                .map_err(|_| "a sender thread panicked".to_string())?;
            attempts.extend(log);
        }
        release(Some(broker))?;
        disk = survivor;
        broker = match Broker::open_with(Arc::new(disk.clone()), cfg.clone()) {
            Ok(b) => b,
            Err(e) => return Err(format!("open after the crash of round {round_no}: {e}")),
        };

        // Everything there is, as a fresh group sees it.
        let group = format!("check-{round_no}");
        let mut found: BTreeMap<(String, u32, u64), SenderId> = BTreeMap::new();
        let mut ids: BTreeSet<SenderId> = BTreeSet::new();
        for topic in &TOPICS[..2] {
            let mut next_offset: BTreeMap<u32, u64> = BTreeMap::new();
            loop {
                let batch = broker
                    .poll(&group, topic, POLL_ALL)
                    .map_err(|e| format!("round {round_no}: poll {topic}: {e}"))?;
                if batch.is_empty() {
                    break;
                }
                for d in batch {
                    let next = next_offset.entry(d.queue).or_default();
                    ensure!(
                        d.offset == *next,
                        "round {round_no}: {topic}/{} skipped from offset {next} to {}",
                        d.queue,
                        d.offset
                    );
                    *next += 1;
                    let Some(id) = sender_id(&d.body) else {
                        return Err(format!(
                            "round {round_no}: {topic}/{}@{} holds a body of {} bytes that no sender wrote",
                            d.queue,
                            d.offset,
                            d.body.len()
                        )
                        );
                    };
                    let (t, k, body) = concurrent_message(id);
                    ensure!(
                        attempts.contains_key(&id),
                        "round {round_no}: {topic}/{}@{} holds {id:?}, which was never sent",
                        d.queue,
                        d.offset
                    );
                    ensure!(
                        t == *topic && k == d.key && body == d.body,
                        "round {round_no}: {topic}/{}@{} holds {id:?} damaged (topic {t}, key {:?} vs {k:?}, body equal: {})",
                        d.queue,
                        d.offset,
                        d.key,
                        body == d.body
                    );
                    ensure!(
                        ids.insert(id),
                        "round {round_no}: {id:?} is stored twice (again at {topic}/{}@{})",
                        d.queue,
                        d.offset
                    );
                    found.insert((topic.to_string(), d.queue, d.offset), id);
                }
            }
        }
        for (id, receipt) in &attempts {
            if let Some(r) = receipt {
                let at = (r.topic.clone(), r.queue, r.offset);
                ensure!(
                    found.get(&at) == Some(id),
                    "round {round_no}: {id:?} was acknowledged at {at:?} but that place holds {:?}",
                    found.get(&at)
                );
            }
        }
        for (at, id) in &survivors {
            ensure!(
                found.get(at) == Some(id),
                "round {round_no}: {id:?} was at {at:?} after an earlier crash, now that place holds {:?}",
                found.get(at)
            );
        }
        survivors = found;
    }
    sole(broker)
        .map_err(|_| "the broker is still shared".to_string())?
        .close()
        .map_err(|e| format!("final close: {e}"))?;
    Ok(())
}

proptest! {
    #![proptest_config(model_config(64, 256))]

    #[test]
    fn concurrent_sends_acknowledged_before_a_crash_survive_it(case in concurrent_strategy()) {
        if let Err(msg) = run_concurrent(&case) {
            return Err(TestCaseError::fail(format!("{msg}\ncase: {case:?}")));
        }
    }
}

// =============================================================================================
// Regressions
// =============================================================================================

/// BUG, found by `concurrent_sends_acknowledged_before_a_crash_survive_it`: a power loss
/// while the log rolls over to a new segment can make open fail with `Error::Corrupt`
/// although nothing acknowledged was damaged.
///
/// A roll (`Shared::roll` in `src/store/mod.rs`, under the writer lock) creates the next
/// segment file at once (`Segment::create`: allocate, write the header, sync the directory;
/// the header is not synced) and puts the old segment's SegmentEnd record into the batch; the
/// flusher writes and syncs that SegmentEnd later. If the machine stops in between, the new
/// file's header can be durable while the old segment's SegmentEnd is not (the kernel writes
/// dirty pages back in any order). Recovery (`open_segments` and the scan in
/// `src/store/recovery.rs`) then sees two valid segments, treats the older one as full, and
/// reports its unwritten tail as "no record (zeros), before the end of a full segment". The
/// crash is ordinary: the lost tail held only records that were never acknowledged.
///
/// Here the window is held open deterministically: the fsync of the SegmentEnd fails (EIO,
/// which drops the dirty pages), and then the power goes; for some seeds the new segment's
/// header survives.
#[test]
fn crash_during_a_segment_roll_is_a_torn_tail_not_corruption() {
    let (_dir, cfg) = fresh_disk_and_config(1, 64 * 1024 * 1024);
    let disk = SimStorage::new();
    let broker = Broker::open_with(Arc::new(disk.clone()), cfg.clone()).unwrap();
    let body = vec![7u8; 1000];
    let send = |b: &Broker| b.send("orders", &Message::new(body.clone()));
    let mut acked = vec![send(&broker).unwrap(), send(&broker).unwrap()];
    let record_bytes = acked[1].log_offset - acked[0].log_offset;
    // Fill the first segment until the next record no longer fits beside the SegmentEnd.
    loop {
        let next = acked.last().unwrap().log_offset + record_bytes;
        if next % SEGMENT_BYTES + record_bytes + HEADER_BYTES as u64 > SEGMENT_BYTES {
            break;
        }
        acked.push(send(&broker).unwrap());
    }
    disk.set_faults(Faults {
        fail_syncs: 1,
        ..Faults::default()
    });
    assert!(
        send(&broker).is_err(),
        "the send that rolls fails: its SegmentEnd could not be synced"
    );
    let _ = disk.crash(CrashMode::DropUnsynced);
    release(Some(broker)).unwrap();
    // The first disk has crashed; each `crash` of it is one more way the power loss could
    // have ended.
    let mut failures = Vec::new();
    for seed in 0..32 {
        let after = disk.crash(CrashMode::KeepRandomPrefix { seed });
        match Broker::open_with(Arc::new(after), cfg.clone()) {
            Ok(b) => {
                let got = b
                    .poll(&format!("check-{seed}"), "orders", POLL_ALL)
                    .unwrap();
                assert_eq!(
                    got.len(),
                    acked.len(),
                    "seed {seed}: every acknowledged send"
                );
            }
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "open after a crash during a segment roll failed:\n{}",
        failures.join("\n")
    );
}
