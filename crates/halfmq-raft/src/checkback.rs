//! The leader's loop of a replicated cluster: check-back (the leader alone asks the
//! checkers, and proposes what each check found as a [`Command::Check`] through the log, so
//! that every node records the same outcome, check count and next check) and the firing of
//! delayed messages ([`Command::Fire`]).
//!
//! No node's broker runs its own check-back thread (each would ask the checkers, and an
//! outcome decided on one node would be a write the others never make). Instead
//! `CheckBack::run` waits for this node to lead, then, while it leads (same term):
//!
//! 1. waits until everything committed before its term is applied here (a half finished in
//!    the log is not asked about);
//! 2. every [`TICK`], takes the pending halves that are due by this node's wall clock
//!    ([`halfmq::Broker::due_checks`]; their next check's time is replicated state: the
//!    half's time, which is its leader's clock, plus the time-out or check immunity, then
//!    each recorded check's time plus the backoff), at most `checks_in_flight_max` in
//!    flight, and asks a checker registered on this node for the half's group, on a
//!    blocking thread, for at most `check_answer_timeout`;
//! 3. proposes what came back (commit, rollback, or a failed check with its reason) as one
//!    batch of [`Command::Check`]s, and waits until it is applied before the next round.
//!
//! The same loop fires delayed messages: each node's broker runs no timer thread (it would
//! fire on its own clock, between applies); every tick the leader takes the delayed
//! messages due by its wall clock ([`halfmq::Broker::due_delayed`]) and proposes
//! [`Command::Fire`] with their ids, which every node applies at the batch's time. A
//! message is taken off the schedule when a `Fire` of it is applied, so a second `Fire` of
//! it (a new leader's, for one the old one proposed and died before seeing applied) does
//! nothing: each fires once.
//!
//! What a new leader does with the schedule (the choice, see ARCHITECTURE.md): it keeps it.
//! A half's check immunity is not restarted by an election: what fell due meanwhile is
//! checked at once, the rest when due. A check the old leader asked but did not record is
//! asked again and counts once (only recorded checks count). What is *not* counted: for
//! [`ReplicaConfig::checker_grace`](crate::ReplicaConfig) after a node becomes leader, a
//! due half whose group has no checker registered here waits (is asked as soon as one
//! registers) instead of counting as "no live producer": the checkers were connected to
//! the old leader and need that long to find this one. The ordinary "no live producer"
//! counting resumes after it. And a group whose checker registers here is asked at once
//! about its halves whose last check found no producer of the group, not at their next
//! scheduled check (the backoff may have put it minutes away).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use halfmq::{
    CheckAnswer, Checkers, HalfMessage, TransactionChecker, TxnConfig, TxnId, NO_LIVE_PRODUCER,
};
use halfmq_types::clock::now_ms;
use openraft::ServerState;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::command::{CheckResult, Command};
use crate::propose::{propose, ReplicaError};
use crate::state_machine::BrokerCell;
use crate::{NodeId, Raft};

/// How often the leader looks for due checks and due delayed messages.
pub const TICK: Duration = Duration::from_millis(100);

/// Most delayed messages one `Fire` command delivers.
pub const FIRE_MAX: usize = 1024;

/// The leader's check-back loop of one node.
pub(crate) struct CheckBack {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft,
    pub(crate) broker: BrokerCell,
    pub(crate) checkers: Arc<Checkers>,
    pub(crate) txn: TxnConfig,
    pub(crate) grace: Duration,
}

/// The term this node leads in, if it does.
fn leading(
    raft_metrics: &watch::Receiver<openraft::RaftMetrics<NodeId, openraft::BasicNode>>,
    id: NodeId,
) -> Option<u64> {
    let m = raft_metrics.borrow();
    (m.state == ServerState::Leader && m.current_leader == Some(id)).then_some(m.current_term)
}

impl CheckBack {
    /// Run until `stop` is true: check back while this node leads.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut metrics = self.raft.metrics();
        loop {
            let term = match leading(&metrics, self.id) {
                Some(t) => t,
                None => {
                    tokio::select! {
                        r = metrics.changed() => if r.is_err() { return },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            };
            let mut watch = metrics.clone();
            let lost = async {
                while leading(&watch, self.id) == Some(term) {
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                () = self.lead(term) => {}
                () = lost => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Check back as the leader of `term`, until a proposal finds this node is not the
    /// leader any more (the caller also stops it when the metrics say so).
    async fn lead(&self, term: u64) {
        // What was committed before this term is applied here first.
        if let Err(e) = self.raft.ensure_linearizable().await {
            tracing::debug!(term, error = %e, "not leading after all; no check-back");
            return;
        }
        tracing::info!(
            term,
            "leading: check-back of pending halves runs on this node"
        );
        let since = Instant::now();
        let max = self.txn.checks_in_flight_max as usize;
        let mut asks: JoinSet<(u64, CheckResult)> = JoinSet::new();
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut found: Vec<Command> = Vec::new();
        loop {
            while let Some(r) = asks.try_join_next() {
                found.extend(self.answered(r, &mut in_flight));
            }
            // Recorded before the next look at what is due: a check answered but not yet
            // recorded is still due, and would be asked again.
            if !self.record(term, &mut found).await {
                return;
            }
            let broker = self.broker.read().clone();
            // Delayed messages due by this node's clock: fired through the log (each node
            // delivers exactly these, at the batch's time; one fired before is left alone).
            let due = broker.due_delayed(now_ms(), FIRE_MAX);
            if !due.is_empty() {
                found.push(Command::Fire(due));
            }
            let graced = since.elapsed() < self.grace;
            let room = if self.txn.check_back {
                max.saturating_sub(in_flight.len())
            } else {
                0
            };
            // Groups whose checker just registered are asked at once about their halves
            // that found no producer, whatever their next check's time.
            let mut due =
                broker.waiting_for_arrived(&self.checkers, room, |t| in_flight.contains(&t));
            let left = room.saturating_sub(due.len());
            let asked: HashSet<u64> = due.iter().map(|i| i.txn_id).collect();
            due.extend(broker.due_checks(now_ms(), left, |t| {
                in_flight.contains(&t) || asked.contains(&t)
            }));
            for info in due {
                let txn = info.txn_id;
                let Some(checker) = self.checkers.get(&info.producer_group) else {
                    if !graced {
                        found.push(failed(txn, NO_LIVE_PRODUCER));
                    }
                    continue;
                };
                match broker.half_message(&info) {
                    Ok(half) => {
                        in_flight.insert(txn);
                        asks.spawn(ask(checker, half, self.txn.check_answer_timeout));
                    }
                    Err(e) => {
                        tracing::error!(txn, error = %e, "cannot read the half message to check it");
                        found.push(failed(txn, "half message unreadable"));
                    }
                }
            }
            if !self.record(term, &mut found).await {
                return;
            }
            tokio::select! {
                Some(r) = asks.join_next(), if !asks.is_empty() => {
                    found.extend(self.answered(r, &mut in_flight));
                }
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Propose the check results in `found` as one batch and wait until they are applied
    /// here. False when this node is not the leader any more. On another failure they are
    /// dropped: the checks stay due, and are asked again.
    async fn record(&self, term: u64, found: &mut Vec<Command>) -> bool {
        if found.is_empty() {
            return true;
        }
        match propose(&self.raft, std::mem::take(found)).await {
            Ok(_) => true,
            Err(ReplicaError::NotLeader { .. }) => false,
            Err(e) => {
                tracing::warn!(term, error = %e, "check-back results not recorded");
                true
            }
        }
    }

    /// The command recording a finished ask.
    fn answered(
        &self,
        r: Result<(u64, CheckResult), tokio::task::JoinError>,
        in_flight: &mut HashSet<u64>,
    ) -> Option<Command> {
        // `ask` catches the checker's panics; a join error is the task's abort, and then
        // the loop is ending.
        let (txn, result) = r.ok()?;
        in_flight.remove(&txn);
        Some(Command::Check {
            txn: TxnId(txn),
            result,
        })
    }
}

fn failed(txn: u64, why: &str) -> Command {
    Command::Check {
        txn: TxnId(txn),
        result: CheckResult::Failed(why.to_owned()),
    }
}

/// Ask `checker` about `half` on a blocking thread, for at most `timeout`.
async fn ask(
    checker: Arc<dyn TransactionChecker>,
    half: HalfMessage,
    timeout: Duration,
) -> (u64, CheckResult) {
    let txn = half.txn_id.0;
    let task = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checker.check(&half)))
    });
    let result = match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(CheckAnswer::Commit))) => CheckResult::Commit,
        Ok(Ok(Ok(CheckAnswer::Rollback))) => CheckResult::Rollback,
        Ok(Ok(Ok(CheckAnswer::Unknown))) => CheckResult::Failed("unknown".to_owned()),
        Ok(Ok(Err(_))) | Ok(Err(_)) => CheckResult::Failed("the checker panicked".to_owned()),
        Err(_) => CheckResult::Failed("no answer within check_answer_timeout".to_owned()),
    };
    (txn, result)
}
