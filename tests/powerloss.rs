//! Power loss under the real broker: `halfmq broker` runs on a lossy file system
//! (`halfmq-lossyfs`), which keeps in memory everything not yet fsynced (file data, lengths,
//! directory entries) and drops it at a power cut, sometimes tearing the last write at a
//! sector boundary. The whole data directory is on it: log, consume queues, key index,
//! checkpoints and sled.
//!
//! Each round runs, concurrently, through the network client:
//! - plain producers, recording every acknowledged send (and the one in flight);
//! - keyed producers whose sends carry idempotency keys, recording each receipt;
//! - transactional producers that commit, roll back, or leave the half pending (a producer
//!   that died), their intent recorded before the half leaves;
//! - consumers of one group that poll and ack, recording what they saw and acked.
//!
//! At a random moment the power is cut: `kill -9` of the broker, then the file system drops
//! its pending state (and, every other round, tears the last write), and is mounted again.
//! The broker restarts on what survived, a checker answers the check-backs from the recorded
//! intents, and the test checks, against what the clients saw acknowledged (kept in this
//! process's memory): every acknowledged send is there, at its queue and offset, with its
//! bytes; every committed transaction is visible exactly once and no rolled-back one ever;
//! every half left pending is pending after the restart and resolved by check-back; every
//! acknowledged idempotency key is still remembered (a re-send is a duplicate with the
//! original's receipt); what the consumers acked is not delivered to them again; nothing is
//! there twice; earlier rounds' topics keep their messages.
//!
//! Each loss is listed (which message or key, and where) before the round fails.
//! `HALFMQ_POWERLOSS_ROUNDS=N` runs N rounds (default 3); `HALFMQ_POWERLOSS_SEED=S` replays
//! the random choices of a run. `scripts/powerloss-drill N` runs the long version.
//! `HALFMQ_POWERLOSS_META_DURABLE=1` stops the broker cleanly once before the first round,
//! so that sled's files already exist durably (which tells sled's data durability apart from
//! its files' names never being made durable by a directory fsync).

mod common;
mod lossy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::env_u64;
use common::load::{
    connect, drain, message_counts, run_load, seed_from_env, sent_keys, Ended, Load, Plan, Sends,
    Shape, Topics, PRODUCER_GROUP, RESOLVE_TIMEOUT, WORKERS,
};
use halfmq::{CheckAnswer, HalfMessage, Message, TxnState};
use halfmq_client::{Client, Delivery};
use halfmq_lossyfs::Tear;
use lossy::{body_of, runtime, Rig};

/// The load: plain, keyed and transactional producers, and a consumer on each topic.
const SHAPE: Shape = Shape {
    queues: 2,
    plain: 2,
    keyed: 2,
    txn: 2,
    consumers: 1,
};
/// The cut comes this long after the load's first acknowledgements (uniform).
const CUT_MS: std::ops::Range<u64> = 200..1500;

// ---------------------------------------------------------------------------------------
// After the restart
// ---------------------------------------------------------------------------------------

common::load::counts! {
    struct Counts {
        sends_acked,
        keyed_acked,
        committed,
        rolled_back,
        abandoned,
        resolved_by_check_back,
        consumer_acks,
        torn_writes,
        pending_bytes_dropped,
        lost,
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acknowledged sends {} (keyed {}), transactions {} (committed {}, rolled back {}, \
             abandoned {}, resolved by check-back {}), consumer acks {}, pending bytes dropped \
             {}, torn writes {}, lost {}",
            self.sends_acked + self.keyed_acked,
            self.keyed_acked,
            self.committed + self.rolled_back + self.abandoned,
            self.committed,
            self.rolled_back,
            self.abandoned,
            self.resolved_by_check_back,
            self.consumer_acks,
            self.pending_bytes_dropped,
            self.torn_writes,
            self.lost
        )
    }
}

/// The checks of one round after the restart; every broken promise is pushed to `lost`.
struct Verify<'a> {
    round: u64,
    topics: &'a Topics,
    load: &'a Load,
    intents: &'a Arc<Mutex<HashMap<String, bool>>>,
    lost: Vec<String>,
    counts: Counts,
}

impl Verify<'_> {
    fn lose(&mut self, what: String) {
        self.lost.push(format!("round {}: {what}", self.round));
    }

    /// Acknowledged plain or keyed sends against what a fresh group reads back.
    fn sends(&mut self, logs: &[(Sends, Ended)], got: &[Delivery], what: &str) {
        let mut at: HashMap<&str, Vec<&Delivery>> = HashMap::new();
        for d in got {
            at.entry(d.key.as_str()).or_default().push(d);
        }
        for (log, _) in logs {
            for (key, r) in &log.acked {
                match at.get(key.as_str()).map(Vec::as_slice) {
                    Some([d]) if (d.queue, d.offset) == (r.queue, r.offset) => {
                        if d.body != body_of(key) {
                            self.lose(format!(
                                "{what} {key} at {}/{}/{} has the wrong bytes",
                                r.topic, r.queue, r.offset
                            ));
                        }
                    }
                    Some([d]) => self.lose(format!(
                        "{what} {key}, acknowledged at {}/{}/{} (log offset {}), is at {}/{}",
                        r.topic, r.queue, r.offset, r.log_offset, d.queue, d.offset
                    )),
                    Some(ds) => self.lose(format!("{what} {key} is there {} times", ds.len())),
                    None => self.lose(format!(
                        "{what} {key}, acknowledged at {}/{}/{} (log offset {}), is lost",
                        r.topic, r.queue, r.offset, r.log_offset
                    )),
                }
            }
        }
        let (acked, in_flight) = sent_keys(logs);
        for (key, ds) in &at {
            if !acked.contains(key) && (!in_flight.contains(key) || ds.len() > 1) {
                self.lose(format!(
                    "{what} {key} is stored {} times but was never acknowledged nor in flight",
                    ds.len()
                ));
            }
        }
    }

    /// Every acknowledged idempotency key is remembered: a re-send answers the original.
    async fn keys_remembered(&mut self, client: &Client) {
        for (log, _) in &self.load.keyed {
            for (key, r) in &log.acked {
                let msg = Message::new(body_of(key))
                    .with_key(key.clone())
                    .with_idempotency_key(key.clone());
                match client.send(&self.topics.keyed, &msg).await {
                    Ok(again)
                        if again.duplicate
                            && again.offset == r.offset
                            && again.queue == r.queue => {}
                    Ok(again) => self.lose(format!(
                        "idempotency key {key} (acknowledged at {}/{}) is forgotten: a re-send \
                         answered {again:?}",
                        r.queue, r.offset
                    )),
                    Err(e) => self.lose(format!("re-send of idempotency key {key}: {e}")),
                }
            }
        }
    }

    fn transactions(&mut self, visible: &[Delivery], pending: &BTreeMap<u64, String>) {
        let mut seen: HashMap<&str, Vec<&Delivery>> = HashMap::new();
        for d in visible {
            seen.entry(d.key.as_str()).or_default().push(d);
        }
        for (log, _) in &self.load.txns {
            for t in log {
                match (t.plan, t.outcome_acked) {
                    (Plan::Commit, true) => self.counts.committed += 1,
                    (Plan::Rollback, true) => self.counts.rolled_back += 1,
                    (Plan::Abandon(_), _) if t.id.is_some() => self.counts.abandoned += 1,
                    _ => {}
                }
                if let (Some(id), Plan::Abandon(_)) = (t.id, t.plan) {
                    if pending.get(&id) != Some(&t.key) {
                        self.lose(format!(
                            "half {id} ({}) was acknowledged and left pending, but is not \
                             pending after the restart",
                            t.key
                        ));
                    }
                }
                if let (Some(id), true) = (t.id, t.outcome_acked) {
                    if pending.contains_key(&id) {
                        self.lose(format!(
                            "{id} ({}) had its {:?} acknowledged but is pending again",
                            t.key, t.plan
                        ));
                    }
                }
                let n = seen.get(t.key.as_str()).map_or(0, Vec::len);
                let must = t.plan.commits() && t.id.is_some();
                if must && n != 1 {
                    self.lose(format!(
                        "transaction {:?} ({}, {:?}, outcome acknowledged: {}) is visible {n} \
                         times, not once",
                        t.id, t.key, t.plan, t.outcome_acked
                    ));
                } else if !t.plan.commits() && n > 0 {
                    self.lose(format!(
                        "{} ({:?}, txn {:?}) was rolled back but is visible",
                        t.key, t.plan, t.id
                    ));
                } else if n > 1 {
                    self.lose(format!("{} is visible {n} times", t.key));
                }
            }
        }
        let intents = self.intents.lock().unwrap();
        for key in seen.keys() {
            if !intents.contains_key(*key) {
                self.lose(format!("{key} is visible but was never sent"));
            }
        }
    }

    /// What the consumers saw is still there; what they acked is not delivered again.
    fn consumers(&mut self, durable: &[Delivery], redelivered: &[Delivery]) {
        let there: HashMap<(&str, u32, u64), &str> = durable
            .iter()
            .map(|d| ((d.topic.as_str(), d.queue, d.offset), d.key.as_str()))
            .collect();
        let mut acked = HashSet::new();
        for (c, _) in &self.load.consumed {
            for d in &c.seen {
                if there.get(&(d.topic.as_str(), d.queue, d.offset)) != Some(&d.key.as_str()) {
                    self.lose(format!(
                        "{} was delivered at {}/{}/{} before the cut but is not there after it",
                        d.key, d.topic, d.queue, d.offset
                    ));
                }
            }
            for (t, q, o) in &c.acked {
                acked.insert((t.as_str(), *q, *o));
            }
            self.counts.consumer_acks += c.acked.len() as u64;
        }
        for d in redelivered {
            if acked.contains(&(d.topic.as_str(), d.queue, d.offset)) {
                self.lose(format!(
                    "{} at {}/{}/{} was acked by {WORKERS} before the cut and is delivered to it \
                     again",
                    d.key, d.topic, d.queue, d.offset
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The rounds
// ---------------------------------------------------------------------------------------

/// One round: load, power cut, restart, checks. Returns the round's counts; losses are in
/// `counts.lost` and listed on stderr.
fn round(
    rig: &mut Rig,
    round: u64,
    seed: u64,
    intents: &Arc<Mutex<HashMap<String, bool>>>,
    settled: &mut BTreeMap<String, u64>,
) -> (Counts, Vec<String>) {
    let mut rng = fastrand::Rng::with_seed(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let cut_after = Duration::from_millis(rng.u64(CUT_MS));
    let tear = if rng.bool() {
        Tear::LastWrite { seed: rng.u64(..) }
    } else {
        Tear::None
    };
    let topics = Topics::of_round(round);
    let addr = rig.addr();
    let (load, _) = run_load(
        &addr,
        round,
        (&topics, &SHAPE),
        (rng.u64(..), intents),
        cut_after,
        // The broker dies here; the power cut follows once the load has stopped.
        || rig.broker.as_mut().expect("running").kill9(),
    );
    let (cut, old_stderr) = rig.power_cut(tear);
    let mut counts = Counts {
        sends_acked: load.plain.iter().map(|(l, _)| l.acked.len() as u64).sum(),
        keyed_acked: load.keyed.iter().map(|(l, _)| l.acked.len() as u64).sum(),
        pending_bytes_dropped: cut.pending_bytes_dropped,
        torn_writes: u64::from(cut.torn.is_some()),
        ..Counts::default()
    };
    if let Err(e) = rig.try_start() {
        let lost = vec![format!(
            "round {round}: the broker does not start after the power cut ({cut:?}):\n{e}\n\
             broker before the cut:\n{old_stderr}"
        )];
        counts.lost = 1;
        return (counts, lost);
    }
    let addr = rig.addr();
    let mut v = Verify {
        round,
        topics: &topics,
        load: &load,
        intents,
        lost: Vec::new(),
        counts,
    };
    let answered: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
    let counts_now = runtime().block_on(async {
        let client = connect(&addr, "verify").await;
        let listed = client.transactions(None).await.unwrap();
        let mut pending = BTreeMap::new();
        for t in listed {
            if t.state != TxnState::Pending {
                v.lose(format!("{t:?} is not pending"));
            }
            if !t.key.starts_with(&format!("t{round}.")) {
                v.lose(format!("transaction {} ({}) of an earlier round is pending", t.txn_id, t.key));
            }
            pending.insert(t.txn_id, t.key);
        }
        let (intents_c, answered_c) = (intents.clone(), answered.clone());
        let checker = move |h: &HalfMessage| -> CheckAnswer {
            let intent = intents_c.lock().unwrap().get(&h.key).copied();
            answered_c.lock().unwrap().insert(h.txn_id.0, h.key.clone());
            match intent {
                Some(true) if h.body == body_of(&h.key) => CheckAnswer::Commit,
                Some(false) => CheckAnswer::Rollback,
                _ => CheckAnswer::Unknown,
            }
        };
        client.register_checker(PRODUCER_GROUP, Arc::new(checker)).await.unwrap();
        let deadline = Instant::now() + RESOLVE_TIMEOUT;
        loop {
            let left = client.transactions(None).await.unwrap();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                v.lose(format!("{} transactions still unfinished {RESOLVE_TIMEOUT:?} after the restart, e.g. {:?}", left.len(), left[0]));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        {
            let a = answered.lock().unwrap().clone();
            for (id, key) in &pending {
                if a.get(id) != Some(key) {
                    v.lose(format!("pending transaction {id} ({key}) was resolved, but not by check-back"));
                }
            }
            v.counts.resolved_by_check_back = a.len() as u64;
        }
        let group = format!("fresh-{round}");
        let plain = drain(&client, &group, &topics.plain).await;
        let keyed = drain(&client, &group, &topics.keyed).await;
        let pay = drain(&client, &group, &topics.pay).await;
        v.sends(&load.plain, &plain, "plain send");
        v.sends(&load.keyed, &keyed, "keyed send");
        v.transactions(&pay, &pending);
        v.keys_remembered(&client).await;
        let mut redelivered = Vec::new();
        for t in [&topics.plain, &topics.keyed, &topics.pay] {
            redelivered.extend(drain(&client, WORKERS, t).await);
        }
        let durable: Vec<Delivery> = plain.iter().chain(&keyed).chain(&pay).cloned().collect();
        v.consumers(&durable, &redelivered);
        // Nothing new after the re-sends of known keys.
        let again = drain(&client, &format!("again-{round}"), &topics.keyed).await;
        if again.len() != keyed.len() {
            v.lose(format!("re-sending acknowledged idempotency keys stored {} more messages", again.len() as i64 - keyed.len() as i64));
        }
        let now = message_counts(&client).await;
        for (t, n) in [(&topics.plain, plain.len()), (&topics.keyed, keyed.len()), (&topics.pay, pay.len())] {
            settled.insert(t.clone(), n as u64);
        }
        now
    });
    for (topic, n) in settled.iter_mut() {
        let now = counts_now.get(topic).copied().unwrap_or(0);
        if now != *n {
            v.lose(format!("topic {topic} had {n} messages and now has {now}"));
            *n = now; // reported once
        }
    }
    v.counts.lost = v.lost.len() as u64;
    if !v.lost.is_empty() {
        v.lost.push(format!(
            "(seed {seed}; cut: {cut:?}; broker before the cut:\n{old_stderr})"
        ));
    }
    (v.counts, v.lost)
}

fn rounds(default: u64) {
    let rounds = env_u64("HALFMQ_POWERLOSS_ROUNDS").unwrap_or(default);
    let seed = seed_from_env("HALFMQ_POWERLOSS_SEED");
    eprintln!("powerloss: seed {seed}, {rounds} rounds (replay: HALFMQ_POWERLOSS_SEED={seed})");
    let started = Instant::now();
    let mut rig = Rig::new();
    rig.start();
    if std::env::var_os("HALFMQ_POWERLOSS_META_DURABLE").is_some() {
        // Isolates sled's own data durability from the durability of its files' names: one
        // clean stop first, so that `meta/`'s files exist durably before the first cut.
        rig.shut_down();
        rig.remount();
        rig.start();
    }
    let intents: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let mut settled = BTreeMap::new();
    let mut totals = Counts::default();
    let mut losses: Vec<String> = Vec::new();
    for r in 0..rounds {
        let (counts, lost) = round(&mut rig, r, seed, &intents, &mut settled);
        eprintln!("powerloss round {r}: {counts}");
        for l in &lost {
            eprintln!("LOST {l}");
        }
        totals += counts;
        losses.extend(lost);
        if rig.broker.is_none() {
            break; // it did not start after the cut: nothing more to run on
        }
        assert!(
            counts.sends_acked > 0 && counts.committed + counts.rolled_back > 0,
            "round {r}: the load did nothing before the cut: {counts}"
        );
    }
    if rig.broker.is_some() {
        rig.shut_down();
    }
    eprintln!(
        "powerloss totals: rounds {rounds}, power cuts {rounds}, acknowledged sends {}, \
         transactions {}, lost {} ({:.1} s, seed {seed}): {totals}",
        totals.sends_acked + totals.keyed_acked,
        totals.committed + totals.rolled_back + totals.abandoned,
        totals.lost,
        started.elapsed().as_secs_f64()
    );
    assert!(
        losses.is_empty(),
        "{} broken promises after power cuts (seed {seed}), the first ones:\n{}",
        totals.lost,
        losses
            .iter()
            .take(
                std::env::var("HALFMQ_POWERLOSS_SHOW")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(30)
            )
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The short version, in every `cargo test`.
#[test]
fn power_cuts_under_load_lose_nothing_acknowledged() {
    rounds(3);
}

/// The long version: `scripts/powerloss-drill N` (`HALFMQ_POWERLOSS_ROUNDS=N`, release).
#[test]
#[ignore = "the long drill: scripts/powerloss-drill"]
fn powerloss_drill() {
    rounds(20);
}
