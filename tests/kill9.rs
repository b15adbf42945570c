//! `kill -9` of the real broker binary under a mixed load, round after round on one data
//! directory (issue #6).
//!
//! Each round starts (or restarts) `halfmq broker` with check-back in fractions of a second
//! and runs, concurrently, through the client library:
//! - plain producers that record every message the broker acknowledged (and the one send
//!   each had in flight when the broker died);
//! - transactional producers that write a half, then commit or roll back at random, or leave
//!   the half with no outcome (a payment service that crashed). Each transaction's intended
//!   outcome is recorded before its half is sent; what the broker acknowledged is recorded
//!   after;
//! - consumers of one group on both topics that poll and ack, recording what they saw.
//!
//! At a random moment (from the seed: 0.3-2 s after the first acknowledgements of the round)
//! the broker gets SIGKILL. It is restarted, a checker of
//! the producer group answers the check-backs from the recorded intents, and the test waits
//! until no transaction is pending. Then a fresh consumer group reads both topics and the
//! test asserts: no acknowledged message lost, and each at the queue and offset it was
//! acknowledged at; every transaction whose half was acknowledged and meant to commit is
//! visible exactly once (whether its commit was acknowledged, in flight, or never sent);
//! no rolled-back transaction is visible, nor was one seen by the consumers during the load;
//! every half left without an outcome was pending after the restart and was resolved by
//! check-back; everything the consumers saw before the kill is still there; what they acked
//! is not delivered to their group again; no message is there twice, and at most the one
//! send each producer had in flight is there without having been acknowledged. Earlier
//! rounds' topics keep their message counts.
//!
//! `HALFMQ_CRASH_ROUNDS=N` runs N rounds (default 5); `HALFMQ_CRASH_SEED=S` replays the
//! random choices (kill moments, outcomes) of a run, which prints its seed first. Timing on
//! a loaded machine still differs between runs, so a replay repeats the plan, not the
//! interleaving. `scripts/kill9-drill` runs the long version.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::load::{
    body_of, connect, drain, message_counts, run_load, runtime, seed_from_env, sent_keys, Plan,
    Shape, Topics, Txn, PRODUCER_GROUP, RESOLVE_TIMEOUT, WORKERS,
};
use common::{env_u64, fast_check_back, BrokerProc};
use halfmq::{CheckAnswer, HalfMessage, TxnState};
use halfmq_client::Delivery;

/// The load: plain and transactional producers, and two consumers on each topic.
const SHAPE: Shape = Shape {
    queues: 4,
    plain: 4,
    keyed: 0,
    txn: 3,
    consumers: 2,
};
/// The kill comes this long after the load's first acknowledgements (uniform).
const KILL_MS: std::ops::Range<u64> = 300..2000;

// ---------------------------------------------------------------------------------------
// Reading back
// ---------------------------------------------------------------------------------------

fn check_body(d: &Delivery, what: &str) {
    assert_eq!(
        d.body,
        body_of(&d.key),
        "{what}: {} at {}/{} has the wrong body",
        d.key,
        d.queue,
        d.offset
    );
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

common::load::counts! {
    struct Counts {
        /// Plain messages acknowledged.
        acked,
        /// Plain sends in flight at the kill that were stored (at most one per producer).
        in_flight_stored,
        /// Commits acknowledged.
        committed,
        /// Rollbacks acknowledged.
        rolled_back,
        /// Halves acknowledged and deliberately left without an outcome.
        abandoned,
        /// Halves, commits and rollbacks without an answer at the kill.
        txn_in_flight,
        /// Transactions pending right after the restart.
        pending_at_restart,
        /// Transactions the checker answered after the restart.
        resolved_by_check_back,
        /// Transaction messages visible in the end.
        txn_visible,
        /// Deliveries to the consumers during the load.
        consumed,
        /// Messages there twice: must stay 0.
        duplicates,
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acknowledged {}, in-flight stored {}, committed {}, rolled back {}, abandoned {}, \
             txn in flight {}, pending at restart {}, resolved by check-back {}, \
             txn visible {}, consumed during load {}, duplicates {}",
            self.acked,
            self.in_flight_stored,
            self.committed,
            self.rolled_back,
            self.abandoned,
            self.txn_in_flight,
            self.pending_at_restart,
            self.resolved_by_check_back,
            self.txn_visible,
            self.consumed,
            self.duplicates
        )
    }
}

/// The check-back answers of the restarted broker's producer group.
#[derive(Default)]
struct Answered {
    /// txn id → key, for every check answered from an intent.
    by_txn: HashMap<u64, String>,
    /// Checks for keys nobody sent, or with the wrong body.
    wrong: Vec<String>,
}

#[test]
fn kill_9_under_load_with_transactions_and_consumers() {
    let rounds = env_u64("HALFMQ_CRASH_ROUNDS").unwrap_or(5);
    let seed = seed_from_env("HALFMQ_CRASH_SEED");
    eprintln!("kill9: seed {seed}, {rounds} rounds (replay: HALFMQ_CRASH_SEED={seed})");
    let started = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    // Check-back fast enough for a test, and never "unresolved" within one.
    let mut broker = BrokerProc::start(dir.path(), &fast_check_back("10000"));
    let intents: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    // Message counts of the topics of finished rounds.
    let mut settled: BTreeMap<String, u64> = BTreeMap::new();
    let mut totals = Counts::default();

    for round in 0..rounds {
        let mut rng = fastrand::Rng::with_seed(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let kill_after = Duration::from_millis(rng.u64(KILL_MS));
        let topics = Topics::of_round(round);
        let (plain_topic, pay_topic) = (topics.plain.clone(), topics.pay.clone());
        let addr = broker.addr.clone();

        // ----- load, then kill -9 -----
        let (load, killed_at) = run_load(
            &addr,
            round,
            (&topics, &SHAPE),
            (rng.u64(..), &intents),
            kill_after,
            || broker.kill9(),
        );
        let (plain_logs, txn_logs, consumer_logs) = (load.plain, load.txns, load.consumed);
        // Every load task must have run until the kill: an error before it is a bug.
        let ends = plain_logs
            .iter()
            .map(|(_, e)| e)
            .chain(txn_logs.iter().map(|(_, e)| e))
            .chain(consumer_logs.iter().map(|(_, e)| e));
        for e in ends {
            assert!(
                e.at >= killed_at,
                "round {round}: a load task failed {:?} before the kill: {} (seed {seed})",
                killed_at - e.at,
                e.error
            );
        }

        // ----- restart; check-back resolves what is pending -----
        let old_stderr = broker.stderr();
        broker = broker.restart();
        let addr = broker.addr.clone();
        let mut counts = Counts::default();
        let answered: Arc<Mutex<Answered>> = Arc::default();
        let (fresh_plain, fresh_pay, workers_plain, workers_pay, counts_now) =
            runtime().block_on(async {
                let client = connect(&addr, "verify").await;
                let pending = client.transactions(None).await.unwrap();
                for t in &pending {
                    assert_eq!(
                        t.state,
                        TxnState::Pending,
                        "round {round}: {t:?} (seed {seed})"
                    );
                }
                let pending: BTreeMap<u64, String> =
                    pending.into_iter().map(|t| (t.txn_id, t.key)).collect();
                counts.pending_at_restart = pending.len() as u64;
                for (log, _) in &txn_logs {
                    for t in log {
                        match (t.id, t.plan, t.outcome_acked) {
                            (Some(id), Plan::Abandon(_), _) => assert_eq!(
                                pending.get(&id),
                                Some(&t.key),
                                "round {round}: half {id} ({}) was acknowledged and left without \
                             an outcome, so it must be pending after the restart (seed {seed})",
                                t.key
                            ),
                            (Some(id), _, true) => assert!(
                            !pending.contains_key(&id),
                            "round {round}: {id} ({}) had its {:?} acknowledged but is pending \
                             after the restart (seed {seed})",
                            t.key,
                            t.plan
                        ),
                            _ => {}
                        }
                    }
                }
                for (id, key) in &pending {
                    assert!(
                        key.starts_with(&format!("t{round}.")),
                        "round {round}: transaction {id} ({key}) of an earlier round is pending \
                     (seed {seed})"
                    );
                }

                let intents_c = intents.clone();
                let answered_c = answered.clone();
                let checker = move |h: &HalfMessage| -> CheckAnswer {
                    let intent = intents_c.lock().unwrap().get(&h.key).copied();
                    let mut a = answered_c.lock().unwrap();
                    if h.body != body_of(&h.key) {
                        a.wrong
                            .push(format!("{} ({}) has the wrong body", h.txn_id.0, h.key));
                    }
                    match intent {
                        Some(commit) => {
                            a.by_txn.insert(h.txn_id.0, h.key.clone());
                            if commit {
                                CheckAnswer::Commit
                            } else {
                                CheckAnswer::Rollback
                            }
                        }
                        None => {
                            a.wrong
                                .push(format!("{} ({}) was never sent", h.txn_id.0, h.key));
                            CheckAnswer::Unknown
                        }
                    }
                };
                client
                    .register_checker(PRODUCER_GROUP, Arc::new(checker))
                    .await
                    .unwrap();
                let deadline = Instant::now() + RESOLVE_TIMEOUT;
                loop {
                    let left = client.transactions(None).await.unwrap();
                    if left.is_empty() {
                        break;
                    }
                    assert!(
                    Instant::now() < deadline,
                    "round {round}: {} transactions still unfinished {RESOLVE_TIMEOUT:?} after \
                     the restart, e.g. {:?} (seed {seed})",
                    left.len(),
                    left[0]
                );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                {
                    let a = answered.lock().unwrap();
                    assert!(
                        a.wrong.is_empty(),
                        "round {round}: wrong check-backs: {:?}",
                        a.wrong
                    );
                    for (id, key) in &pending {
                        assert_eq!(
                            a.by_txn.get(id),
                            Some(key),
                            "round {round}: pending transaction {id} was resolved, but not by \
                         check-back (seed {seed})"
                        );
                    }
                    assert_eq!(
                        a.by_txn.len(),
                        pending.len(),
                        "round {round}: check-backs for transactions that were not pending at the \
                     restart (seed {seed})"
                    );
                    counts.resolved_by_check_back = a.by_txn.len() as u64;
                }

                let group = format!("fresh-{round}");
                let fresh_plain = drain(&client, &group, &plain_topic).await;
                let fresh_pay = drain(&client, &group, &pay_topic).await;
                let workers_plain = drain(&client, WORKERS, &plain_topic).await;
                let workers_pay = drain(&client, WORKERS, &pay_topic).await;
                let counts_now = message_counts(&client).await;
                (
                    fresh_plain,
                    fresh_pay,
                    workers_plain,
                    workers_pay,
                    counts_now,
                )
            });

        // ----- plain messages: nothing acknowledged lost, nothing twice -----
        let mut at: HashMap<String, (u32, u64)> = HashMap::new();
        for d in &fresh_plain {
            check_body(d, "after the restart");
            if at.insert(d.key.clone(), (d.queue, d.offset)).is_some() {
                counts.duplicates += 1;
            }
        }
        for (log, _) in &plain_logs {
            for (key, r) in &log.acked {
                counts.acked += 1;
                let (q, o) = (r.queue, r.offset);
                assert_eq!(
                    at.get(key),
                    Some(&(q, o)),
                    "round {round}: {key}, acknowledged at {q}/{o}, is lost after kill -9 \
                     (seed {seed}); broker before the kill:\n{old_stderr}"
                );
            }
        }
        let (acked_keys, in_flight) = sent_keys(&plain_logs);
        for key in at.keys() {
            if !acked_keys.contains(key.as_str()) {
                assert!(
                    in_flight.contains(key.as_str()),
                    "round {round}: {key} is stored but was neither acknowledged nor in flight \
                     (seed {seed})"
                );
                counts.in_flight_stored += 1;
            }
        }

        // ----- transactions: committed once, rolled back never -----
        let mut visible: HashMap<String, Vec<&Delivery>> = HashMap::new();
        for d in &fresh_pay {
            check_body(d, "after the restart");
            visible.entry(d.key.clone()).or_default().push(d);
        }
        let mut recs: HashMap<&str, &Txn> = HashMap::new();
        for (log, _) in &txn_logs {
            for t in log {
                recs.insert(t.key.as_str(), t);
                match (t.plan, t.outcome_acked) {
                    (Plan::Commit, true) => counts.committed += 1,
                    (Plan::Rollback, true) => counts.rolled_back += 1,
                    (Plan::Abandon(_), _) if t.id.is_some() => counts.abandoned += 1,
                    _ => counts.txn_in_flight += 1,
                }
                let got = visible.get(&t.key).map_or(0, Vec::len);
                if got > 1 {
                    counts.duplicates += got as u64 - 1;
                }
                if t.plan.commits() {
                    if t.id.is_some() {
                        assert_eq!(
                            got,
                            1,
                            "round {round}: transaction {} ({}, {:?}, outcome acknowledged: \
                             {}) must be visible exactly once (seed {seed})",
                            t.id.unwrap_or_default(),
                            t.key,
                            t.plan,
                            t.outcome_acked
                        );
                    } else {
                        // The half was in flight at the kill: stored and committed by
                        // check-back, or never stored.
                        assert!(got <= 1, "round {round}: {} visible {got} times", t.key);
                    }
                } else {
                    assert_eq!(
                        got, 0,
                        "round {round}: {} ({:?}, txn {:?}) was rolled back but is visible \
                         (seed {seed})",
                        t.key, t.plan, t.id
                    );
                }
                if let (Some(id), Some(ds)) = (t.id, visible.get(&t.key)) {
                    for d in ds {
                        assert_eq!(
                            d.properties.get("halfmq.txn"),
                            Some(&id.to_string()),
                            "round {round}: {} should carry its transaction id",
                            t.key
                        );
                    }
                }
            }
        }
        for key in visible.keys() {
            assert!(
                recs.contains_key(key.as_str()),
                "round {round}: {key} is visible but was never sent (seed {seed})"
            );
        }
        counts.txn_visible = visible.values().map(|v| v.len() as u64).sum();

        // ----- the consumers of the load -----
        let durable: HashMap<(&str, u32, u64), &str> = fresh_plain
            .iter()
            .chain(&fresh_pay)
            .map(|d| ((d.topic.as_str(), d.queue, d.offset), d.key.as_str()))
            .collect();
        let mut seen_by_workers: HashSet<(&str, u32, u64)> = HashSet::new();
        let mut acked_by_workers: HashSet<(&str, u32, u64)> = HashSet::new();
        for (log, _) in &consumer_logs {
            for d in &log.seen {
                counts.consumed += 1;
                check_body(d, "during the load");
                let p = (d.topic.as_str(), d.queue, d.offset);
                assert_eq!(
                    durable.get(&p),
                    Some(&d.key.as_str()),
                    "round {round}: {} was delivered at {}/{}/{} during the load but is not \
                     there after the restart (seed {seed})",
                    d.key,
                    d.topic,
                    d.queue,
                    d.offset
                );
                if d.topic == pay_topic {
                    let commits = intents.lock().unwrap().get(&d.key).copied();
                    assert_eq!(
                        commits,
                        Some(true),
                        "round {round}: {} was delivered during the load, but its transaction \
                         was not to commit (seed {seed})",
                        d.key
                    );
                }
                seen_by_workers.insert(p);
            }
            for (t, q, o) in &log.acked {
                acked_by_workers.insert((t.as_str(), *q, *o));
            }
        }
        for d in workers_plain.iter().chain(&workers_pay) {
            let p = (d.topic.as_str(), d.queue, d.offset);
            assert!(
                !acked_by_workers.contains(&p),
                "round {round}: {} at {}/{}/{} was acked by {WORKERS} before the kill and is \
                 delivered to it again (seed {seed})",
                d.key,
                d.topic,
                d.queue,
                d.offset
            );
            seen_by_workers.insert(p);
        }
        for (p, key) in &durable {
            assert!(
                seen_by_workers.contains(p),
                "round {round}: {key} at {p:?} was never delivered to {WORKERS} (seed {seed})"
            );
        }

        // ----- earlier rounds keep what they had -----
        for (topic, n) in &settled {
            assert_eq!(
                counts_now.get(topic),
                Some(n),
                "round {round}: topic {topic} of an earlier round changed (seed {seed})"
            );
        }
        for t in [&plain_topic, &pay_topic] {
            let expect = if *t == plain_topic {
                fresh_plain.len() as u64
            } else {
                fresh_pay.len() as u64
            };
            assert_eq!(counts_now.get(t.as_str()), Some(&expect), "stats of {t}");
            settled.insert(t.clone(), expect);
        }

        assert_eq!(
            counts.duplicates, 0,
            "round {round}: duplicates (seed {seed})"
        );
        assert!(
            counts.in_flight_stored <= SHAPE.plain as u64,
            "at most one in-flight send per producer"
        );
        assert!(
            counts.acked > 0 && counts.committed + counts.rolled_back > 0,
            "round {round}: the load did nothing before the kill at {kill_after:?}: {counts}"
        );
        eprintln!(
            "kill9 round {round}: kill -9 after {} ms: {counts}",
            kill_after.as_millis()
        );
        totals += counts;
    }
    broker.terminate();
    eprintln!(
        "kill9 totals: {rounds} rounds in {:.1} s, seed {seed}: {totals}",
        started.elapsed().as_secs_f64()
    );
}
