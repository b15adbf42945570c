//! The check-back loop: one thread, owned by the broker, that asks producers about halves
//! whose outcome is overdue.
//!
//! Each round takes only the halves that are due (from the index ordered by next check), so
//! its cost follows the number of due halves, not the number pending. Every check runs on a
//! thread of its own with a time-out: a checker that hangs or panics costs one check, never
//! the broker. At most `checks_in_flight_max` checks run at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use crate::broker::Broker;
use crate::metrics::CheckOutcome;
use halfmq_store::worker::Worker;
use halfmq_types::error::Result;
use halfmq_types::{
    CheckAnswer, HalfMessage, Outcome, TransactionChecker, TxnId, TxnInfo, TxnState,
};

/// Messages to the check-back thread.
pub(crate) enum Msg {
    /// A check finished: the answer, or why there is none.
    Answer {
        txn: u64,
        answer: std::result::Result<CheckAnswer, &'static str>,
    },
    /// Something became due earlier than planned (a re-arm): look again now.
    Wake,
    /// Run a round now and say when it is done ([`Broker::run_due_now`]).
    Round(Sender<()>),
    /// Shut down.
    Stop,
}

/// The running check-back thread.
pub(crate) type CheckerThread = Worker<Msg>;

/// Start the check-back thread of `broker`.
pub(crate) fn spawn(broker: Weak<Broker>) -> Result<CheckerThread> {
    Worker::spawn(
        "halfmq-txn-check",
        || Msg::Stop,
        move |rx, own| run(broker, rx, own),
    )
}

/// The longest the loop sleeps, so that it notices a dropped broker promptly.
const IDLE_MAX: Duration = Duration::from_millis(500);

fn run(broker: Weak<Broker>, rx: Receiver<Msg>, tx: Sender<Msg>) {
    // Checks running now: txn id → when their answer is overdue.
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut answers = Vec::new();
    let mut rounds: Vec<Sender<()>> = Vec::new();
    loop {
        let sleep = match broker.upgrade() {
            Some(b) => next_wake(&b, &in_flight),
            None => return,
        };
        match rx.recv_timeout(sleep) {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Msg::Answer { txn, answer }) => answers.push((txn, answer)),
            Ok(Msg::Round(done)) => rounds.push(done),
            Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
        }
        loop {
            match rx.try_recv() {
                Ok(Msg::Stop) => return,
                Ok(Msg::Answer { txn, answer }) => answers.push((txn, answer)),
                Ok(Msg::Round(done)) => rounds.push(done),
                Ok(Msg::Wake) => {}
                Err(_) => break,
            }
        }
        let Some(b) = broker.upgrade() else { return };
        b.check_round(&mut in_flight, std::mem::take(&mut answers), &tx);
        for done in rounds.drain(..) {
            let _ = done.send(());
        }
    }
}

fn next_wake(b: &Broker, in_flight: &HashMap<u64, Instant>) -> Duration {
    let now = Instant::now();
    let mut sleep = IDLE_MAX;
    if let Some(due) = b.txn_index().next_due_ms() {
        sleep = sleep.min(Duration::from_millis(due.saturating_sub(b.now())));
    }
    if let Some(&first) = in_flight.values().min() {
        sleep = sleep.min(first.saturating_duration_since(now));
    }
    sleep
}

impl Broker {
    /// One round of the check-back loop: apply the answers that came in, give up on checks
    /// that took too long, and start checks for the halves that are due.
    pub(crate) fn check_round(
        &self,
        in_flight: &mut HashMap<u64, Instant>,
        answers: Vec<(u64, std::result::Result<CheckAnswer, &'static str>)>,
        tx: &Sender<Msg>,
    ) {
        let cfg = &self.config().txn;
        let mut failed: Vec<(u64, &'static str)> = Vec::new();
        for (txn, answer) in answers {
            if in_flight.remove(&txn).is_none() {
                continue; // answered after its time-out: already counted as no answer
            }
            crate::metrics::check_back(CheckOutcome::of(&answer));
            match answer {
                Ok(CheckAnswer::Commit) => self.apply_check_answer(txn, Outcome::Committed),
                Ok(CheckAnswer::Rollback) => self.apply_check_answer(txn, Outcome::RolledBack),
                Ok(CheckAnswer::Unknown) => failed.push((txn, "unknown")),
                Err(why) => failed.push((txn, why)),
            }
        }
        let now = Instant::now();
        in_flight.retain(|&txn, deadline| {
            let keep = *deadline > now;
            if !keep {
                crate::metrics::check_back(CheckOutcome::NoAnswer);
                failed.push((txn, "no answer within check_answer_timeout"));
            }
            keep
        });
        let room = (cfg.checks_in_flight_max as usize).saturating_sub(in_flight.len());
        let mut asks = self.arrived_waiting(&self.checkers, room, |_| false, true);
        let room = room.saturating_sub(asks.len());
        asks.extend(self.txn_index().take_due(self.now(), room));
        for info in asks {
            let txn = info.txn_id;
            let Some(checker) = self.checker_for(&info.producer_group) else {
                crate::metrics::check_back(CheckOutcome::NoProducer);
                failed.push((txn, crate::NO_LIVE_PRODUCER));
                continue;
            };
            let half = match self.read_half(&info) {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(txn, error = %e, "cannot read the half message to check it");
                    crate::metrics::check_back(CheckOutcome::Error);
                    failed.push((txn, "half message unreadable"));
                    continue;
                }
            };
            in_flight.insert(txn, now + cfg.check_answer_timeout);
            // Recorded by the check's own thread, as it asks: a sled write here would cost
            // the whole round its latency (sled inserts can wait behind sled's flushes).
            let asked = (!info.key.is_empty()).then(|| {
                let event = halfmq_types::trace::Event::CheckAsked {
                    producer_group: info.producer_group.clone(),
                    check: info.checks + 1,
                };
                (self.journal_handle(), event)
            });
            self.check_pool().run(checker, half, asked, tx.clone());
        }
        if let Err(e) = self.checks_failed(&failed) {
            tracing::error!(error = %e, "cannot persist check-back bookkeeping; counts may repeat after a restart");
        }
    }

    /// Checks that ended without resolving their transactions (unknown, no answer, no
    /// producer), at the broker's clock: count each, schedule the next or mark it
    /// unresolved, record the trace events, and persist the bookkeeping.
    fn checks_failed(&self, failed: &[(u64, &str)]) -> Result<()> {
        if failed.is_empty() {
            return Ok(());
        }
        let cfg = &self.config().txn;
        let ms = self.now();
        let updates: Vec<_> = failed
            .iter()
            .filter_map(|&(txn, why)| self.txn_index().check_failed(txn, why, ms, cfg))
            .collect();
        let mut events = Vec::new();
        for info in updates.iter().filter(|i| !i.key.is_empty()) {
            // check_failed just stored this check's answer in last_answer.
            let answer = info.last_answer.clone().unwrap_or_default();
            let check = info.checks;
            let event = halfmq_types::trace::Event::CheckAnswered { check, answer };
            events.push((info.txn_id, event));
            if info.state == TxnState::Unresolved {
                events.push((
                    info.txn_id,
                    halfmq_types::trace::Event::Unresolved { checks: check },
                ));
            }
        }
        self.trace_events_later(events);
        self.txn_index().persist_checks(self.meta(), &updates)
    }

    fn apply_check_answer(&self, txn: u64, outcome: Outcome) {
        match self.record_check_answer(TxnId(txn), outcome) {
            Ok(()) => tracing::info!(
                txn,
                outcome = outcome.as_str(),
                "check-back resolved the transaction"
            ),
            // The producer (or an operator) resolved it differently in the meantime: the first
            // outcome stands.
            Err(e) => tracing::warn!(txn, error = %e, "check-back answer not applied"),
        }
    }

    /// Pending transactions whose check is due at `now_ms` (ms since the Unix epoch), up to
    /// `max`, soonest first, leaving out those `skip` names: for a check-back driven from
    /// outside the broker (a replicated cluster's leader, whose brokers run no check-back
    /// thread). Nothing is marked: the caller keeps its own checks in flight, and records
    /// each one's end with [`Broker::record_check_answer`] or
    /// [`Broker::record_check_failed`].
    pub fn due_checks(&self, now_ms: u64, max: usize, skip: impl Fn(u64) -> bool) -> Vec<TxnInfo> {
        self.txn_index().due_unmarked(now_ms, max, skip)
    }

    /// The pending transactions to ask about at once because a checker of their group
    /// registered in `checkers` since the last look
    /// ([`Checkers::take_arrived`](crate::Checkers::take_arrived)): those whose last check
    /// found no producer of the group ([`NO_LIVE_PRODUCER`](crate::NO_LIVE_PRODUCER)),
    /// whatever their next check's time, oldest first per group, up to `max`, leaving out
    /// those `skip` names. For a check-back driven from outside the broker, with its own
    /// checkers (a replicated cluster's leader); nothing is marked, as with
    /// [`Broker::due_checks`].
    pub fn waiting_for_arrived(
        &self,
        checkers: &crate::Checkers,
        max: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Vec<TxnInfo> {
        self.arrived_waiting(checkers, max, skip, false)
    }

    /// [`Broker::waiting_for_arrived`]; with `mark`, each is taken off the schedule and
    /// marked in flight (this broker's own check-back thread).
    fn arrived_waiting(
        &self,
        checkers: &crate::Checkers,
        max: usize,
        skip: impl Fn(u64) -> bool,
        mark: bool,
    ) -> Vec<TxnInfo> {
        let mut out = Vec::new();
        for group in checkers.take_arrived() {
            if checkers.get(&group).is_none() {
                continue; // gone again already: its halves wait for their next check
            }
            let left = max.saturating_sub(out.len());
            let waiting = self
                .txn_index()
                .waiting_for_producer(&group, left, &skip, mark);
            if !waiting.is_empty() {
                tracing::info!(
                    group, halves = waiting.len(),
                    "a checker of the group registered: asking now about its halves that found no producer"
                );
            }
            out.extend(waiting);
        }
        out
    }

    /// The half message of a pending transaction, as its checker is asked about it.
    pub fn half_message(&self, info: &TxnInfo) -> Result<HalfMessage> {
        self.read_half(info)
    }

    /// A check answered commit or rollback: record the check (its trace event) and write
    /// the outcome, as [`Broker::commit`] or [`Broker::rollback`] would (with their errors:
    /// a different outcome already recorded stands).
    pub fn record_check_answer(&self, txn: TxnId, outcome: Outcome) -> Result<()> {
        if let Some(info) = self.txn_index().get(txn.0).filter(|i| !i.key.is_empty()) {
            let answer = match outcome {
                Outcome::Committed => "commit",
                Outcome::RolledBack => "rollback",
            };
            let event = halfmq_types::trace::Event::CheckAnswered {
                check: info.checks + 1,
                answer: answer.into(),
            };
            self.trace_events_later(vec![(txn.0, event)]);
        }
        self.txn_index().check_answered(txn.0);
        match outcome {
            Outcome::Committed => self.commit(txn),
            Outcome::RolledBack => self.rollback(txn),
        }
    }

    /// A check ended without an outcome (`why`: "unknown", no answer, no producer), at the
    /// broker's clock: counted, the next check scheduled with the backoff (or the
    /// transaction marked unresolved after `check_max`), and persisted. A transaction that
    /// is not pending any more is left alone.
    pub fn record_check_failed(&self, txn: TxnId, why: &str) -> Result<()> {
        self.checks_failed(&[(txn.0, why)])
    }
}

/// The trace event of a check, recorded by the thread that asks.
type Asked = (Arc<crate::journal::Journal>, halfmq_types::trace::Event);

/// One check to run: record `asked`, ask `checker` about `half`, send the answer to `reply`.
struct Job {
    checker: Arc<dyn TransactionChecker>,
    half: HalfMessage,
    asked: Option<Asked>,
    reply: Sender<Msg>,
}

/// Threads that run checks. A worker stuck in a checker that never returns is simply not
/// idle: the pool starts another one while fewer than `max` exist, so a hung checker costs
/// one thread and one check, never the check-back loop.
pub(crate) struct CheckPool {
    jobs: Mutex<Option<Sender<Job>>>,
    queue: Arc<Mutex<Receiver<Job>>>,
    idle: Arc<AtomicUsize>,
    workers: Arc<AtomicUsize>,
    max: usize,
}

impl CheckPool {
    pub(crate) fn new(max: usize) -> CheckPool {
        let (tx, rx) = std::sync::mpsc::channel();
        CheckPool {
            jobs: Mutex::new(Some(tx)),
            queue: Arc::new(Mutex::new(rx)),
            idle: Arc::new(AtomicUsize::new(0)),
            workers: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    fn run(
        &self,
        checker: Arc<dyn TransactionChecker>,
        half: HalfMessage,
        asked: Option<Asked>,
        reply: Sender<Msg>,
    ) {
        let txn = half.txn_id.0;
        if self.idle.load(Ordering::Acquire) == 0 && self.workers.load(Ordering::Acquire) < self.max
        {
            self.start_worker();
        }
        let sent = match self.jobs.lock().as_ref() {
            Some(tx) => tx
                .send(Job {
                    checker,
                    half,
                    asked,
                    reply: reply.clone(),
                })
                .is_ok(),
            None => false,
        };
        if !sent {
            let _ = reply.send(Msg::Answer {
                txn,
                answer: Err("the check pool is shut down"),
            });
        }
    }

    fn start_worker(&self) {
        let (queue, idle, workers) = (self.queue.clone(), self.idle.clone(), self.workers.clone());
        workers.fetch_add(1, Ordering::AcqRel);
        let started = std::thread::Builder::new()
            .name("halfmq-check".into())
            .spawn(move || {
                loop {
                    idle.fetch_add(1, Ordering::AcqRel);
                    let job = queue.lock().recv();
                    idle.fetch_sub(1, Ordering::AcqRel);
                    let Ok(Job {
                        checker,
                        half,
                        asked,
                        reply,
                    }) = job
                    else {
                        break;
                    };
                    let txn = half.txn_id.0;
                    if let Some((journal, event)) = asked {
                        journal.record_later(vec![(txn, event)]);
                    }
                    let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        checker.check(&half)
                    }))
                    .map_err(|_| "the checker panicked");
                    let _ = reply.send(Msg::Answer { txn, answer });
                }
                workers.fetch_sub(1, Ordering::AcqRel);
            });
        if started.is_err() {
            self.workers.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("could not start a check thread");
        }
    }

    /// Stop handing out work; idle workers exit, busy ones after their check.
    pub(crate) fn shut_down(&self) {
        self.jobs.lock().take();
    }
}
impl Broker {
    /// For `halfmq bench --check-tick` only: run one check-back round by hand (the broker's
    /// own check-back thread must be off), wait for the `due` checks it starts to answer, and
    /// apply the answers in a second round. Returns the time of the two rounds, in µs
    /// (dispatch, apply): the cost of one tick, which must follow the due transactions, not
    /// the pending ones.
    #[doc(hidden)]
    pub fn measure_check_tick(&self, due: u64) -> Result<(u64, u64)> {
        let broker = self;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut in_flight = std::collections::HashMap::new();
        let t = Instant::now();
        broker.check_round(&mut in_flight, Vec::new(), &tx);
        let dispatch_us = t.elapsed().as_micros() as u64;
        if in_flight.len() as u64 != due {
            return Err(halfmq_types::Error::Invalid {
                what: "bench",
                reason: format!("{} checks started, {due} due", in_flight.len()),
            });
        }
        let mut answers = Vec::new();
        while (answers.len() as u64) < due {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Msg::Answer { txn, answer }) => answers.push((txn, answer)),
                Ok(_) => {}
                Err(_) => {
                    return Err(halfmq_types::Error::Invalid {
                        what: "bench",
                        reason: "checks did not answer".into(),
                    })
                }
            }
        }
        let t = Instant::now();
        broker.check_round(&mut in_flight, answers, &tx);
        let apply_us = t.elapsed().as_micros() as u64;
        Ok((dispatch_us, apply_us))
    }
}
