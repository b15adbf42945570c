//! Proposing through the leader: `propose` makes a batch of commands one raft entry and
//! waits until it is committed and applied on this node; [`ReplicaError`] is why it was not
//! (another node leads, the broker failed, openraft refused).

use halfmq::Message;
use halfmq_types::clock::now_ms;
use halfmq_types::error::Error;
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;

use crate::command::{Applied, Batch, Command};
use crate::{NodeId, Raft};

/// Why a replicated operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// This node is not the leader; ask `leader` at `addr` (both `None` while there is
    /// none known).
    #[error("not the leader; the leader is node {leader:?} at {addr:?}")]
    NotLeader {
        /// The leader's id.
        leader: Option<NodeId>,
        /// The leader's address.
        addr: Option<String>,
    },
    /// The broker or the node's own storage failed.
    #[error(transparent)]
    Broker(#[from] Error),
    /// openraft refused or failed (shut down, a membership change in progress).
    #[error("raft: {0}")]
    Raft(String),
    /// The write was proposed but not known to be committed within `after_ms` (the leader
    /// may be cut off from the majority): its fate is unknown. It may still be committed,
    /// by this leader or not at all; a client makes it again under the same idempotency key.
    #[error("not committed by a majority within {after_ms} ms; its fate is unknown")]
    Unconfirmed {
        /// How long the node waited.
        after_ms: u64,
    },
}

/// A refused or failed proposal: `NotLeader` when another node leads.
pub(crate) fn client_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> ReplicaError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ReplicaError::NotLeader {
            leader: f.leader_id,
            addr: f.leader_node.map(|n| n.addr),
        },
        e => ReplicaError::Raft(e.to_string()),
    }
}

/// Propose `commands` as one batch at this node's clock and wait until it is committed
/// (fsynced on a majority) and applied here: one answer per command.
///
/// A leader that has not heard from a majority for two maximum election time-outs (it may
/// be cut off, and another leader elected: followers keep a leader's lease for one) refuses
/// at once, without proposing: [`ReplicaError::NotLeader`] with no leader known. A proposal
/// still waiting when that happens, or after five maximum election time-outs, is answered
/// [`ReplicaError::Unconfirmed`]. So a minority never acknowledges, and its clients do not
/// hang on it but look for the majority's leader.
pub(crate) async fn propose(
    raft: &Raft,
    commands: Vec<Command>,
) -> Result<Vec<Applied>, ReplicaError> {
    if quorum_lost(raft) {
        return Err(ReplicaError::NotLeader {
            leader: None,
            addr: None,
        });
    }
    let batch = Batch::new(now_ms(), commands);
    let started = std::time::Instant::now();
    let give_up = std::time::Duration::from_millis(5 * raft.config().election_timeout_max);
    let write = raft.client_write(batch);
    tokio::pin!(write);
    // The first look at the majority after 100 ms: it was just made above.
    let every = std::time::Duration::from_millis(100);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            done = &mut write => {
                return match done {
                    Ok(resp) => Ok(resp.data),
                    Err(e) => Err(client_error(e)),
                };
            }
            _ = tick.tick() => {
                if quorum_lost(raft) || started.elapsed() >= give_up {
                    let after_ms = started.elapsed().as_millis() as u64;
                    return Err(ReplicaError::Unconfirmed { after_ms });
                }
            }
        }
    }
}

/// `raft` leads (as far as it knows) but has not heard from a majority for two maximum
/// election time-outs.
fn quorum_lost(raft: &Raft) -> bool {
    let limit = 2 * raft.config().election_timeout_max;
    let metrics = raft.metrics();
    let m = metrics.borrow();
    m.current_leader == Some(m.id) && m.millis_since_quorum_ack.is_some_and(|ms| ms > limit)
}

/// Most bytes of messages ([`Message::payload_bytes`]) a send proposes as one raft entry. A
/// follower must write, fsync and answer an append within one heartbeat (50 ms), or
/// openraft sends it again, the same size, for ever; a batch send larger than this (up to
/// `SEND_BATCH_BYTES_MAX`, 4 MiB) is proposed as several entries, one after another.
pub const ENTRY_BYTES_MAX: usize = 256 << 10;

/// `messages` cut into runs of at most [`ENTRY_BYTES_MAX`] bytes, in order (a message
/// larger than that alone; none empty, except the one run of an empty batch).
pub(crate) fn entry_runs(messages: &[Message]) -> Vec<&[Message]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, m) in messages.iter().enumerate() {
        let b = m.payload_bytes();
        if i > start && bytes + b > ENTRY_BYTES_MAX {
            runs.push(&messages[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += b;
    }
    if start < messages.len() || messages.is_empty() {
        runs.push(&messages[start..]);
    }
    runs
}

/// The answer of each message of a later run of a batch send whose proposal failed after
/// earlier runs were stored (see [`entry_runs`]): why it was not stored, or that its fate
/// is unknown.
pub(crate) fn unsent(e: &ReplicaError) -> Error {
    match e {
        ReplicaError::Broker(e) => Error::from_wire(e.code(), e.to_string()),
        ReplicaError::Unconfirmed { after_ms } => Error::Timeout {
            what:
                "a majority of the cluster to commit this part of the batch (its fate is unknown)"
                    .into(),
            after_ms: *after_ms,
        },
        other => Error::Invalid {
            what: "replicated send",
            reason: format!("this part of the batch was not stored: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_batch_is_cut_into_runs_within_the_bound_in_order() {
        let msgs: Vec<Message> = (0..700).map(|_| Message::new(vec![7u8; 1000])).collect();
        let runs = entry_runs(&msgs);
        assert!(runs.len() >= 3, "{}", runs.len());
        assert!(runs.iter().all(|r| !r.is_empty()
            && r.iter().map(Message::payload_bytes).sum::<usize>() <= ENTRY_BYTES_MAX));
        assert_eq!(runs.concat(), msgs);
        // A message over the bound goes alone; a small batch is one run.
        let big = vec![
            Message::new(vec![1u8; ENTRY_BYTES_MAX + 1]),
            Message::new("x"),
        ];
        assert_eq!(entry_runs(&big).len(), 2);
        assert_eq!(entry_runs(&msgs[..10]).len(), 1);
        assert_eq!(entry_runs(&[]), [&[] as &[Message]]);
    }
}
