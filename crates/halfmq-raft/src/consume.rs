//! The consumer side of a node: deliveries are made by the leader alone, and what a failed
//! delivery comes to goes through the log.
//!
//! Leases are each node's own and are not replicated: only the leader hands messages out
//! (a follower answers `NOT_LEADER`, as for writes), and before its first delivery in a
//! term it waits until it has applied everything committed before that term
//! ([`ReplicaNode::ready_to_deliver`]), so it never hands out a message acked under the
//! previous leader. A nack, a move to the dead-letter queue or a visibility time-out is
//! decided on the leader (`halfmq::Broker::decide_nack`, `poll_deciding`: the lease is
//! held, nothing recorded) and proposed as [`Command::Retry`] or [`Command::DeadLetter`]
//! ([`ReplicaNode::settle`]); every node records it at the same point of the log. So a new
//! leader redelivers a retried message with the failure count the old one reached, and a
//! dead letter is appended once, alike, on every node. A delivery still leased when its
//! leader died is delivered again by the new leader at once, its attempt not counted (the
//! lease was the old leader's alone), as after a crash of a single broker.

use std::time::Duration;

use halfmq::{Decided, Polled};
use halfmq_types::error::Error;
use openraft::ServerState;

use crate::command::{Applied, Command, LeaseData};
use crate::node::{ReplicaError, ReplicaNode};

/// Longest [`ReplicaNode::ready_to_deliver`] waits for the leader to apply the log of the
/// terms before its own.
const READY_WAIT: Duration = Duration::from_secs(5);

impl ReplicaNode {
    /// Returns once this node leads and has applied an entry of its own term (its first,
    /// blank, entry: so everything committed under earlier leaders is applied here). A node
    /// that does not lead answers [`ReplicaError::NotLeader`] with the leader it knows of;
    /// a leader that has not applied its term's first entry within 5 s (it cannot reach a
    /// majority) answers `NotLeader` with no leader known, so its client looks elsewhere.
    pub async fn ready_to_deliver(&self) -> Result<(), ReplicaError> {
        let mut metrics = self.raft().metrics();
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            self.check_leader()?;
            {
                let m = metrics.borrow_and_update();
                let applied_term = m.last_applied.map(|l| l.leader_id.get_term());
                if m.state == ServerState::Leader && applied_term == Some(m.current_term) {
                    return Ok(());
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(ReplicaError::NotLeader {
                        leader: None,
                        addr: None,
                    })
                }
            }
        }
    }

    /// Propose what the decisions `decided` came to ([`Command::settle`]), then `also`
    /// (what a poll did besides: the acks its tag filter made, the deliveries it made), as
    /// one batch: one answer per command, the decisions' first. A proposal that failed
    /// gives every decision's lease back (its fate may be unknown: where it was committed
    /// after all, recording it replaces the lease given back).
    pub async fn settle(
        &self,
        decided: &[Decided],
        also: Vec<Command>,
    ) -> Result<Vec<Applied>, ReplicaError> {
        let mut commands: Vec<Command> = decided.iter().map(Command::settle).collect();
        commands.extend(also);
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let r = self.write(commands).await;
        if r.is_err() {
            let broker = self.broker();
            for d in decided {
                if let Err(e) = broker.give_back(d) {
                    tracing::warn!(group = %d.group, topic = %d.topic, offset = d.offset, error = %e, "could not give a lease back");
                }
            }
        }
        r
    }

    /// A poll's record, made on the leader ([`halfmq::Broker::poll_deciding`]): what its
    /// failures came to, the acks its tag filter made and the deliveries it made, proposed
    /// as one batch ([`ReplicaNode::settle`]). Nothing to propose is `Ok` at once.
    pub async fn settle_poll(
        &self,
        group: &str,
        topic: &str,
        polled: &Polled,
    ) -> Result<(), ReplicaError> {
        let mut also = Vec::new();
        if !polled.filter_acks.is_empty() {
            also.push(Command::Ack {
                group: group.to_owned(),
                topic: topic.to_owned(),
                acks: polled.filter_acks.clone(),
            });
        }
        if !polled.leases.is_empty() {
            also.push(Command::Delivered {
                group: group.to_owned(),
                topic: topic.to_owned(),
                leases: polled.leases.iter().map(LeaseData::from).collect(),
            });
        }
        self.settle(&polled.decided, also).await.map(|_| ())
    }

    /// [`ReplicaNode::settle`] of one decision: its answer.
    pub async fn settle_one(&self, decided: &Decided) -> Result<Applied, ReplicaError> {
        self.settle(std::slice::from_ref(decided), Vec::new())
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                ReplicaError::Broker(Error::Invalid {
                    what: "replicated answer",
                    reason: "a settlement was answered with nothing".into(),
                })
            })
    }
}
