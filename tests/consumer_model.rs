//! Model-based test of consumers that ack, nack, time out and crash (issue #7).
//!
//! Random sequences of sends, polls, acks, nacks (with a zero, tiny or backoff delay),
//! sleeps past the visibility time-out, dead-letter replays, clean reopens and crashes
//! (`SimStorage`, every `CrashMode`; sled lives on the real temp dir) run against a
//! [`Broker`] and, side by side, against a model of every (group, message) pair. Two groups
//! with their own visibility time-out (30–80 ms) and `max_retries` (0–3) consume one topic.
//! The checks:
//!
//! - **Nothing is lost**: a poll returns only messages that are due for that group; when it
//!   returns fewer than it was allowed, every message surely due was in it (or moved to the
//!   dead-letter queue, if that was its fate). At the end, after a crash, one poll of each
//!   group returns exactly the sent messages it neither acked nor dead-lettered.
//! - **Acked means gone**: an ack that returned `Ok` is never followed by a delivery of that
//!   message to that group, across restarts. The only way it comes back is the documented
//!   one: a replayed dead letter is a *new* message (new offset).
//! - **Attempts and failure counts**: every delivery carries `attempt = failures + 1`, where
//!   failures are the nacks plus the time-outs the broker saw (a time-out counts when a poll
//!   redelivers the message). They survive restarts; a delivery in flight at a restart does
//!   not count as failed.
//! - **Dead letters after exactly the maximum**: the failure after `max_retries` failures
//!   moves the message to `%DLQ%<group>` (nack: in the nack's answer; time-out: in the next
//!   poll that finds it), once, with `failures = max_retries + 1` and the right reason; after
//!   every step `dead_letters` lists exactly the model's dead letters, in order, with their
//!   replay flags. A nack of anything not with a consumer (acked, dead, waiting, never
//!   delivered since the open) is `BadAck`.
//! - **Groups are independent**: each has its own model state and settings.
//!
//! Where the model is tolerant (timing only): whether a lease has run out or a nack delay
//! has passed is decided by the broker's millisecond clock at an instant inside the call.
//! The model brackets every poll and nack between two `Instant`s and calls a lease or wait
//! *surely due*, *surely not due* or *maybe* (the bracket straddles the deadline, with 1 ms
//! of margin for clock rounding). A *maybe* may go either way, and the model follows what
//! the broker did (a popped lease is always either returned or dead-lettered, so the answer
//! says which). A poll that returned `max` messages may have left due messages for later.
//! Everything else is exact.
//!
//! `HALFMQ_MODEL_CASES=N` sets the number of cases (default 24). A failure prints the case
//! and the numbered operation list; it replays up to timing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use halfmq::clock::now_ms;
use halfmq::GroupSettings;
use halfmq::NackOutcome;
use halfmq::{Broker, BrokerConfig, Delivery, Error, Message};
use halfmq_store::sim::{CrashMode, SimStorage};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

mod common;

use common::{crash_mode, model_config, run_ops_then_crash, SimHarness, SimParts};

const TOPIC: &str = "jobs";
const GROUPS: [&str; 2] = ["billing", "shipping"];
/// Keys a message may have; "" is no key (round robin over the queues).
const KEYS: [&str; 3] = ["", "alice", "bob"];
/// Larger than any poll in these tests: "everything there is".
const POLL_ALL: usize = 1 << 20;
/// Every group's retry backoff (the wait after a nack without a delay), in ms: tiny.
const BACKOFF_MS: [u64; 2] = [2, 5];
/// Extra slack when comparing `Instant`s with the broker's millisecond wall clock.
const MARGIN: Duration = Duration::from_millis(1);

// =============================================================================================
// Cases
// =============================================================================================

#[derive(Debug, Clone, Copy)]
enum NackDelay {
    Zero,
    /// A tiny explicit delay, in ms.
    Ms(u64),
    /// `None`: the group's backoff for the failure count.
    Backoff,
}

#[derive(Debug, Clone)]
enum Op {
    Send {
        key: usize,
        count: usize,
    },
    Poll {
        group: usize,
        max: usize,
    },
    /// Ack one of the messages the group has with a consumer now.
    Ack {
        group: usize,
        pick: Index,
    },
    /// Ack any message of the topic (in flight, waiting, acked, dead or never delivered).
    AckAny {
        group: usize,
        pick: Index,
    },
    /// Nack one of the messages the group has with a consumer now.
    Nack {
        group: usize,
        pick: Index,
        delay: NackDelay,
    },
    /// Nack any message of the topic: refused unless it is with a consumer.
    NackAny {
        group: usize,
        pick: Index,
    },
    /// Sleep past the longest visibility time-out of the case.
    SleepPastTimeout,
    /// Sleep this many ms (often straddles a time-out: the model's "maybe").
    Sleep {
        ms: u64,
    },
    /// Send the group's dead letters back to the topic.
    Replay {
        group: usize,
    },
    /// Power loss, then open the surviving disk.
    Crash(CrashMode),
    /// Clean close, then open.
    Reopen,
}

#[derive(Debug, Clone, Copy)]
struct GroupCfg {
    visibility_timeout_ms: u64,
    max_retries: u32,
}

#[derive(Debug, Clone)]
struct Case {
    queues: u32,
    groups: [GroupCfg; 2],
    ops: Vec<Op>,
    /// The case ends with this crash, a reopen and a drain of every group.
    final_crash: CrashMode,
}

fn nack_delay() -> impl Strategy<Value = NackDelay> {
    prop_oneof![
        3 => Just(NackDelay::Zero),
        1 => (1u64..=4).prop_map(NackDelay::Ms),
        1 => Just(NackDelay::Backoff),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let g = 0..GROUPS.len();
    prop_oneof![
        4 => (0..KEYS.len(), 1usize..=3).prop_map(|(key, count)| Op::Send { key, count }),
        5 => (g.clone(), prop_oneof![1usize..=4, Just(POLL_ALL)])
            .prop_map(|(group, max)| Op::Poll { group, max }),
        3 => (g.clone(), any::<Index>()).prop_map(|(group, pick)| Op::Ack { group, pick }),
        1 => (g.clone(), any::<Index>()).prop_map(|(group, pick)| Op::AckAny { group, pick }),
        4 => (g.clone(), any::<Index>(), nack_delay())
            .prop_map(|(group, pick, delay)| Op::Nack { group, pick, delay }),
        1 => (g.clone(), any::<Index>()).prop_map(|(group, pick)| Op::NackAny { group, pick }),
        2 => Just(Op::SleepPastTimeout),
        1 => (0u64..=60).prop_map(|ms| Op::Sleep { ms }),
        1 => g.prop_map(|group| Op::Replay { group }),
        1 => crash_mode().prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

fn group_cfg() -> impl Strategy<Value = GroupCfg> {
    (30u64..=80, 0u32..=3).prop_map(|(visibility_timeout_ms, max_retries)| GroupCfg {
        visibility_timeout_ms,
        max_retries,
    })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(1u32), Just(2)],
        group_cfg(),
        group_cfg(),
        prop::collection::vec(op_strategy(), 1..60),
        crash_mode(),
    )
        .prop_map(|(queues, g0, g1, ops, final_crash)| Case {
            queues,
            groups: [g0, g1],
            ops,
            final_crash,
        })
}

// =============================================================================================
// The model
// =============================================================================================

/// (queue, queue offset).
type Id = (u32, u64);

/// When something happened: somewhere between these two instants.
#[derive(Clone, Copy)]
struct Window {
    before: Instant,
    after: Instant,
}

/// The origin of the times in failure messages.
static T0: OnceLock<Instant> = OnceLock::new();

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t0 = *T0.get_or_init(Instant::now);
        let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1000.0;
        write!(f, "{:.2}..{:.2} ms", ms(self.before), ms(self.after))
    }
}

/// Whether a deadline `delay` after an event in `at` has passed at a moment in `now`, on
/// the broker's millisecond clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Yes,
    Maybe,
    No,
}

fn due(at: Window, delay: Duration, now: Window) -> Due {
    // The broker compares whole milliseconds: due iff floor(b) >= floor(a) + delay for its
    // clock readings a (event) and b (now). floor(b) - floor(a) lies in (b - a - 1, b - a + 1).
    if delay.is_zero() || now.before >= at.after + delay + MARGIN {
        Due::Yes
    } else if now.after + Duration::from_millis(1) + MARGIN <= at.before + delay {
        Due::No
    } else {
        Due::Maybe
    }
}

/// One group's view of one message. A message not in the map is `Waiting` with no wait:
/// never delivered, deliverable now.
#[derive(Debug, Clone, Copy)]
enum St {
    /// Not with a consumer; deliverable once `wait` (event window, delay) has passed, or
    /// now when `None`.
    Waiting {
        failures: u32,
        wait: Option<(Window, Duration)>,
    },
    /// With a consumer since a poll in `at`; the lease runs for the group's time-out.
    Leased { failures: u32, at: Window },
    /// An ack returned `Ok`.
    Acked,
    /// Moved to the dead-letter queue (and so acked in the topic).
    Dead,
}

const FRESH: St = St::Waiting {
    failures: 0,
    wait: None,
};

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelDead {
    id: Id,
    key: String,
    failures: u32,
    /// Dead because of a nack (else a time-out).
    nacked: bool,
    replayed: bool,
}

#[derive(Debug, Default)]
struct GroupModel {
    states: BTreeMap<Id, St>,
    dead: Vec<ModelDead>,
}

impl GroupModel {
    fn state(&self, id: Id) -> St {
        self.states.get(&id).copied().unwrap_or(FRESH)
    }

    fn leased(&self) -> Vec<Id> {
        self.states
            .iter()
            .filter(|(_, s)| matches!(s, St::Leased { .. }))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// What a poll may do with one message.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Deliver it as this attempt.
    Deliver { attempt: u32 },
    /// Move it to the dead-letter queue with this failure count (a lease that ran out after
    /// `max_retries` failures).
    DeadLetter { failures: u32 },
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

struct Harness {
    _dir: tempfile::TempDir,
    cfg: BrokerConfig,
    groups: [GroupCfg; 2],
    disk: SimStorage,
    broker: Option<Arc<Broker>>,
    /// queue → (key, body) by queue offset.
    queues: Vec<Vec<(String, Vec<u8>)>>,
    model: [GroupModel; 2],
    /// Whether the group's state was loaded since the last open (by a poll, ack or nack of
    /// it): before that, stats count none of its leases.
    loaded: [bool; 2],
    sent: u64,
}

impl SimHarness for Harness {
    fn parts(&mut self) -> SimParts<'_> {
        (&mut self.disk, &self.cfg, &mut self.broker)
    }

    fn opened(&mut self, when: &str) -> Check {
        for (name, g) in GROUPS.iter().zip(&self.groups) {
            let (_, s) = self
                .broker()
                .group_settings(name)
                .map_err(|e| format!("group settings of {name} {when}: {e}"))?;
            ensure!(
                s == Self::settings(g),
                "{when}: {name} has settings {s:?}; set were {g:?}"
            );
        }
        self.loaded = [false; 2];
        // A delivery in flight does not count as failed: it is deliverable again at once,
        // with the failures it had.
        for m in &mut self.model {
            for st in m.states.values_mut() {
                if let St::Leased { failures, .. } = *st {
                    *st = St::Waiting {
                        failures,
                        wait: None,
                    };
                }
            }
        }
        Ok(())
    }
}

impl Harness {
    fn new(case: &Case) -> Result<Harness, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut cfg = BrokerConfig::new(dir.path());
        cfg.store.segment_bytes = 256 * 1024;
        cfg.store.record_bytes_max = 16 * 1024;
        cfg.default_queues = case.queues;
        // Without the check-back thread nothing but the test holds the broker, so dropping
        // it closes the metadata database before the next open.
        cfg.txn.check_back = false;
        let disk = SimStorage::new();
        let broker = Broker::open_with(Arc::new(disk.clone()), cfg.clone())
            .map_err(|e| format!("first open: {e}"))?;
        for (name, g) in GROUPS.iter().zip(&case.groups) {
            broker
                .set_group_settings(name, &Self::settings(g))
                .map_err(|e| format!("settings of {name}: {e}"))?;
        }
        Ok(Harness {
            _dir: dir,
            cfg,
            groups: case.groups,
            disk,
            broker: Some(broker),
            queues: vec![Vec::new(); case.queues as usize],
            model: [GroupModel::default(), GroupModel::default()],
            loaded: [false; 2],
            sent: 0,
        })
    }

    fn settings(g: &GroupCfg) -> GroupSettings {
        GroupSettings {
            visibility_timeout_ms: Some(g.visibility_timeout_ms),
            max_retries: Some(g.max_retries),
            retry_backoff_ms: Some(BACKOFF_MS.to_vec()),
            fifo: None,
        }
    }

    fn broker(&self) -> &Broker {
        self.broker
            .as_ref()
            .expect("the broker is open between steps")
    }

    fn vt(&self, gi: usize) -> Duration {
        Duration::from_millis(self.groups[gi].visibility_timeout_ms)
    }

    fn ids(&self) -> Vec<Id> {
        let mut out = Vec::new();
        for (q, msgs) in self.queues.iter().enumerate() {
            out.extend((0..msgs.len() as u64).map(|o| (q as u32, o)));
        }
        out
    }

    fn step(&mut self, op: &Op) -> Check {
        match *op {
            Op::Send { key, count } => {
                for _ in 0..count {
                    self.send(KEYS[key])?;
                }
            }
            Op::Poll { group, max } => self.poll(group, max).map(|_| ())?,
            Op::Ack { group, pick } => {
                let leased = self.model[group].leased();
                if !leased.is_empty() {
                    self.ack(group, leased[pick.index(leased.len())])?;
                }
            }
            Op::AckAny { group, pick } => {
                let ids = self.ids();
                if !ids.is_empty() {
                    self.ack(group, ids[pick.index(ids.len())])?;
                }
            }
            Op::Nack { group, pick, delay } => {
                let leased = self.model[group].leased();
                if !leased.is_empty() {
                    self.nack(group, leased[pick.index(leased.len())], delay)?;
                }
            }
            Op::NackAny { group, pick } => {
                let ids = self.ids();
                if !ids.is_empty() {
                    self.nack(group, ids[pick.index(ids.len())], NackDelay::Zero)?;
                }
            }
            Op::SleepPastTimeout => {
                let vt = self.vt(0).max(self.vt(1));
                thread::sleep(vt + Duration::from_millis(3));
            }
            Op::Sleep { ms } => thread::sleep(Duration::from_millis(ms)),
            Op::Replay { group } => self.replay(group)?,
            Op::Crash(mode) => self.crash(mode)?,
            Op::Reopen => self.clean_restart()?,
        }
        for (gi, group) in GROUPS.iter().enumerate() {
            let new = self.new_dead_letters(gi)?;
            ensure!(
                new.is_empty(),
                "{group} has dead letters the model does not expect: {new:?}"
            );
        }
        self.check_stats()
    }

    /// Per queue and group: committed offset, backlog, in flight and retrying, exactly.
    fn check_stats(&self) -> Check {
        let stats = self.broker().stats().map_err(|e| format!("stats: {e}"))?;
        for (q, msgs) in self.queues.iter().enumerate() {
            let q = q as u32;
            let len = msgs.len() as u64;
            let qs = stats
                .queues
                .iter()
                .find(|s| s.topic == TOPIC && s.queue == q);
            if len == 0 && qs.is_none() {
                continue; // the topic is created by the first send
            }
            let qs = qs.ok_or_else(|| format!("stats do not list {TOPIC}/{q}"))?;
            ensure!(
                qs.messages == len,
                "stats: {TOPIC}/{q} holds {} messages; {len} were sent",
                qs.messages
            );
            for (gi, group) in GROUPS.iter().enumerate() {
                let m = &self.model[gi];
                let st = |o: u64| m.state((q, o));
                let acked = |o: u64| matches!(st(o), St::Acked | St::Dead);
                let committed = (0..len).find(|&o| !acked(o)).unwrap_or(len);
                let backlog = (0..len).filter(|&o| !acked(o)).count() as u64;
                let in_flight = (0..len)
                    .filter(|&o| matches!(st(o), St::Leased { .. }))
                    .count() as u64;
                let retrying = if self.loaded[gi] {
                    (0..len)
                        .filter(|&o| matches!(st(o), St::Waiting { failures, .. } if failures > 0))
                        .count() as u64
                } else {
                    0
                };
                let Some(lag) = qs.groups.iter().find(|l| l.group == *group) else {
                    ensure!(
                        committed == 0 && backlog == len && in_flight == 0,
                        "stats do not list {group} in {TOPIC}/{q}; the model has committed {committed} backlog {backlog} in flight {in_flight}"
                    );
                    continue;
                };
                ensure!(
                    (lag.committed, lag.backlog, lag.in_flight, lag.retrying)
                        == (committed, backlog, in_flight, retrying),
                    "stats of {group} in {TOPIC}/{q}: {lag:?}; the model says committed {committed} backlog {backlog} in flight {in_flight} retrying {retrying}"
                );
            }
        }
        Ok(())
    }

    fn send(&mut self, key: &str) -> Check {
        self.sent += 1;
        let body = format!("m{}", self.sent).into_bytes();
        let r = self
            .broker()
            .send(TOPIC, &Message::new(body.clone()).with_key(key))
            .map_err(|e| format!("send: {e}"))?;
        let q = self
            .queues
            .get_mut(r.queue as usize)
            .ok_or_else(|| format!("send went to queue {} which does not exist", r.queue))?;
        ensure!(
            r.topic == TOPIC && r.offset == q.len() as u64,
            "send got receipt {r:?}; the queue held {} messages",
            q.len()
        );
        q.push((key.to_owned(), body));
        Ok(())
    }

    /// What a poll at `now` may do with every message of group `gi`, and whether that is
    /// sure (`Due::Yes`) or depends on timing (`Due::Maybe`). Messages it must not touch are
    /// left out.
    fn fates(&self, gi: usize, now: Window) -> BTreeMap<Id, (Fate, Due)> {
        let m = &self.model[gi];
        let max_retries = self.groups[gi].max_retries;
        let mut out = BTreeMap::new();
        for id in self.ids() {
            let (fate, due) = match m.state(id) {
                St::Acked | St::Dead => continue,
                St::Waiting { failures, wait } => {
                    let d = wait.map_or(Due::Yes, |(at, delay)| due(at, delay, now));
                    (
                        Fate::Deliver {
                            attempt: failures + 1,
                        },
                        d,
                    )
                }
                St::Leased { failures, at } => {
                    let d = due(at, self.vt(gi), now);
                    let failures = failures + 1;
                    if failures > max_retries {
                        (Fate::DeadLetter { failures }, d)
                    } else {
                        (
                            Fate::Deliver {
                                attempt: failures + 1,
                            },
                            d,
                        )
                    }
                }
            };
            if due != Due::No {
                out.insert(id, (fate, due));
            }
        }
        out
    }

    /// Poll and check the answer against the model; returns the deliveries.
    fn poll(&mut self, gi: usize, max: usize) -> Result<Vec<Delivery>, String> {
        let group = GROUPS[gi];
        self.loaded[gi] = true;
        let before = Instant::now();
        let got = self
            .broker()
            .poll(group, TOPIC, max)
            .map_err(|e| format!("poll {group} max {max}: {e}"))?;
        let now = Window {
            before,
            after: Instant::now(),
        };
        let fates = self.fates(gi, now);
        let brief = |ds: &[Delivery]| -> Vec<(u32, u64, u32)> {
            ds.iter().map(|d| (d.queue, d.offset, d.attempt)).collect()
        };
        ensure!(
            got.len() <= max,
            "poll {group} max {max} returned {} messages",
            got.len()
        );
        let mut seen = BTreeSet::new();
        for d in &got {
            let id = (d.queue, d.offset);
            ensure!(
                d.topic == TOPIC && seen.insert(id),
                "poll {group} returned {id:?} twice or from topic {}: {:?}",
                d.topic,
                brief(&got)
            );
            let sent = self
                .queues
                .get(d.queue as usize)
                .and_then(|q| q.get(d.offset as usize))
                .ok_or_else(|| format!("poll {group} returned {id:?}, which was never sent"))?;
            ensure!(
                d.key == sent.0 && d.body == sent.1,
                "poll {group}: {id:?} came back with key {:?} body {:?}; sent key {:?} body {:?}",
                d.key,
                String::from_utf8_lossy(&d.body),
                sent.0,
                String::from_utf8_lossy(&sent.1)
            );
            match fates.get(&id) {
                Some((Fate::Deliver { attempt }, _)) => ensure!(
                    d.attempt == *attempt,
                    "poll {group}: {id:?} delivered as attempt {}; the model says {attempt} (state {:?})",
                    d.attempt,
                    self.model[gi].state(id)
                ),
                other => {
                    return Err(format!(
                        "poll {group}: {id:?} delivered (attempt {}) but must not be: state {:?}, fate {other:?}",
                        d.attempt,
                        self.model[gi].state(id)
                    ))
                }
            }
        }
        let new_dead = self.new_dead_letters(gi)?;
        let mut dead_ids = BTreeSet::new();
        for dl in &new_dead {
            let id = (dl.queue, dl.offset);
            ensure!(
                dead_ids.insert(id) && !seen.contains(&id),
                "poll {group}: {id:?} dead-lettered twice or also delivered"
            );
            match fates.get(&id) {
                Some((Fate::DeadLetter { failures }, _)) => ensure!(
                    dl.failures == *failures && dl.reason.contains("visibility time-out"),
                    "poll {group}: {id:?} dead-lettered with {} failures ({:?}); the model says {failures} after a time-out",
                    dl.failures,
                    dl.reason
                ),
                other => {
                    return Err(format!(
                        "poll {group}: {id:?} dead-lettered but must not be: state {:?}, fate {other:?}",
                        self.model[gi].state(id)
                    ))
                }
            }
        }
        if got.len() < max {
            // Nothing stopped the poll early: every message surely due was handled.
            for (id, (fate, d)) in &fates {
                if *d != Due::Yes {
                    continue;
                }
                let handled = match fate {
                    Fate::Deliver { .. } => seen.contains(id),
                    Fate::DeadLetter { .. } => dead_ids.contains(id),
                };
                ensure!(
                    handled,
                    "poll {group} max {max} returned {:?} and dead-lettered {dead_ids:?}, but {id:?} was surely due ({fate:?}, state {:?})",
                    brief(&got),
                    self.model[gi].state(*id)
                );
            }
        }
        let m = &mut self.model[gi];
        for d in &got {
            m.states.insert(
                (d.queue, d.offset),
                St::Leased {
                    failures: d.attempt - 1,
                    at: now,
                },
            );
        }
        for dl in new_dead {
            let id = (dl.queue, dl.offset);
            m.states.insert(id, St::Dead);
            m.dead.push(ModelDead {
                id,
                key: dl.key,
                failures: dl.failures,
                nacked: false,
                replayed: false,
            });
        }
        Ok(got)
    }

    /// The group's dead letters past those in the model; the ones in the model must be
    /// listed exactly as the model has them.
    fn new_dead_letters(&self, gi: usize) -> Result<Vec<halfmq::DeadLetter>, String> {
        let group = GROUPS[gi];
        let mut all = self
            .broker()
            .dead_letters(group, 0, 100_000)
            .map_err(|e| format!("dead_letters {group}: {e}"))?;
        let m = &self.model[gi];
        ensure!(
            all.len() >= m.dead.len(),
            "{group} lists {} dead letters; the model has {}: {all:?} vs {:?}",
            all.len(),
            m.dead.len(),
            m.dead
        );
        for (i, (dl, want)) in all.iter().zip(&m.dead).enumerate() {
            let reason_ok = if want.nacked {
                dl.reason.contains("nack")
            } else {
                dl.reason.contains("visibility time-out")
            };
            ensure!(
                dl.group == group
                    && dl.dlq_offset == i as u64
                    && dl.topic == TOPIC
                    && (dl.queue, dl.offset) == want.id
                    && dl.key == want.key
                    && dl.failures == want.failures
                    && dl.replayed == want.replayed
                    && reason_ok,
                "{group}: dead letter {i} is {dl:?}; the model says {want:?}"
            );
        }
        Ok(all.split_off(m.dead.len()))
    }

    fn ack(&mut self, gi: usize, id: Id) -> Check {
        let group = GROUPS[gi];
        self.loaded[gi] = true;
        let st = self.model[gi].state(id);
        self.broker()
            .ack(group, TOPIC, id.0, id.1)
            .map_err(|e| format!("ack {group} {id:?} (state {st:?}): {e}"))?;
        if !matches!(st, St::Dead) {
            self.model[gi].states.insert(id, St::Acked);
        }
        Ok(())
    }

    fn nack(&mut self, gi: usize, id: Id, delay: NackDelay) -> Check {
        let group = GROUPS[gi];
        self.loaded[gi] = true;
        let st = self.model[gi].state(id);
        let cfg = self.groups[gi];
        let delay_arg = match delay {
            NackDelay::Zero => Some(Duration::ZERO),
            NackDelay::Ms(ms) => Some(Duration::from_millis(ms)),
            NackDelay::Backoff => None,
        };
        let before = Instant::now();
        let before_ms = now_ms();
        let r = self.broker().nack(group, TOPIC, id.0, id.1, delay_arg);
        let after_ms = now_ms();
        let at = Window {
            before,
            after: Instant::now(),
        };
        let St::Leased { failures, .. } = st else {
            ensure!(
                matches!(r, Err(Error::BadAck { .. })),
                "nack {group} {id:?} in state {st:?} answered {r:?}; want BadAck"
            );
            return Ok(());
        };
        let failures = failures + 1;
        let r = r.map_err(|e| format!("nack {group} {id:?} (state {st:?}): {e}"))?;
        if failures > cfg.max_retries {
            let NackOutcome::DeadLettered { dead_letter } = r else {
                return Err(format!(
                    "nack {group} {id:?}: failure {failures} > max_retries {} but the answer is {r:?}",
                    cfg.max_retries
                ));
            };
            let m = &mut self.model[gi];
            ensure!(
                dead_letter.topic == format!("%DLQ%{group}")
                    && dead_letter.offset == m.dead.len() as u64,
                "nack {group} {id:?}: dead letter at {dead_letter:?}; {} were there",
                m.dead.len()
            );
            m.states.insert(id, St::Dead);
            m.dead.push(ModelDead {
                id,
                key: self.queues[id.0 as usize][id.1 as usize].0.clone(),
                failures,
                nacked: true,
                replayed: false,
            });
            return Ok(());
        }
        let wait = delay_arg.unwrap_or_else(|| {
            let i = (failures as usize - 1).min(BACKOFF_MS.len() - 1);
            Duration::from_millis(BACKOFF_MS[i])
        });
        let wait_ms = wait.as_millis() as u64;
        match r {
            NackOutcome::Redeliver { attempt, at_ms } => ensure!(
                attempt == failures + 1
                    && at_ms >= before_ms + wait_ms
                    && at_ms <= after_ms + wait_ms,
                "nack {group} {id:?} ({delay:?}): redeliver as {attempt} at {at_ms}; want attempt {} at {before_ms}..={after_ms} + {wait_ms}",
                failures + 1
            ),
            other => {
                return Err(format!(
                    "nack {group} {id:?}: failure {failures} of max {} answered {other:?}",
                    cfg.max_retries
                ))
            }
        }
        self.model[gi].states.insert(
            id,
            St::Waiting {
                failures,
                wait: Some((at, wait)),
            },
        );
        Ok(())
    }

    fn replay(&mut self, gi: usize) -> Check {
        let group = GROUPS[gi];
        let got = self
            .broker()
            .replay_dead_letters(group, 1000)
            .map_err(|e| format!("replay {group}: {e}"))?;
        let want: Vec<usize> = (0..self.model[gi].dead.len())
            .filter(|&i| !self.model[gi].dead[i].replayed)
            .collect();
        ensure!(
            got.len() == want.len(),
            "replay {group} replayed {got:?}; the model expected dead letters {want:?}"
        );
        for (r, &i) in got.iter().zip(&want) {
            let d = self.model[gi].dead[i].clone();
            let (key, body) = self.queues[d.id.0 as usize][d.id.1 as usize].clone();
            let q = &mut self.queues[d.id.0 as usize];
            ensure!(
                r.dlq_offset == i as u64
                    && r.key == key
                    && r.receipt.topic == TOPIC
                    && r.receipt.queue == d.id.0
                    && r.receipt.offset == q.len() as u64,
                "replay {group}: {r:?}; the model expected dead letter {i} ({d:?}) at offset {} of queue {}",
                q.len(),
                d.id.0
            );
            // A new message, new to every group.
            q.push((key, body));
            self.model[gi].dead[i].replayed = true;
        }
        Ok(())
    }

    /// After the final crash: each group gets exactly its messages neither acked nor
    /// dead-lettered, in one poll; acked, they never come back.
    fn drain(&mut self) -> Check {
        // Every nack wait is at most a few ms.
        thread::sleep(Duration::from_millis(20));
        for (gi, group) in GROUPS.iter().enumerate() {
            let want: BTreeSet<Id> = self
                .ids()
                .into_iter()
                .filter(|&id| !matches!(self.model[gi].state(id), St::Dead | St::Acked))
                .collect();
            let got = self.poll(gi, POLL_ALL)?;
            let ids: BTreeSet<Id> = got.iter().map(|d| (d.queue, d.offset)).collect();
            ensure!(
                ids == want,
                "drain {group}: got {ids:?}; un-acked and not dead: {want:?}"
            );
            if !got.is_empty() {
                let acks: Vec<(u32, u64)> = got.iter().map(|d| (d.queue, d.offset)).collect();
                self.broker()
                    .ack_many(group, TOPIC, &acks)
                    .map_err(|e| format!("drain {group}: ack_many: {e}"))?;
                for id in acks {
                    self.model[gi].states.insert(id, St::Acked);
                }
            }
        }
        thread::sleep(self.vt(0).max(self.vt(1)) + Duration::from_millis(3));
        for (gi, group) in GROUPS.iter().enumerate() {
            let got = self.poll(gi, POLL_ALL)?;
            ensure!(
                got.is_empty(),
                "drain {group}: everything was acked, yet {} came back",
                got.len()
            );
            let new = self.new_dead_letters(gi)?;
            ensure!(
                new.is_empty(),
                "drain {group}: unexpected dead letters {new:?}"
            );
        }
        Ok(())
    }
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    T0.get_or_init(Instant::now);
    let what = format!(
        "queues {} groups {:?} final crash {:?}",
        case.queues, case.groups, case.final_crash
    );
    let setup = || Harness::new(case);
    run_ops_then_crash(
        &what,
        &case.ops,
        (setup, Harness::step),
        case.final_crash,
        |h| {
            h.drain()?;
            h.broker().close().map_err(|e| format!("final close: {e}"))
        },
    )
}

proptest! {
    #![proptest_config(model_config(24, 512))]

    #[test]
    fn consumers_that_ack_nack_time_out_and_crash_lose_nothing(case in case_strategy()) {
        run_case(&case)?;
    }
}
