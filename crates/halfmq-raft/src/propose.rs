//! Proposing through the leader: `propose` makes a batch of commands one raft entry and
//! waits until it is committed and applied on this node; [`ReplicaError`] is why it was not
//! (another node leads, the broker failed, openraft refused).

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
    let batch = Batch {
        time_ms: now_ms(),
        commands,
    };
    let started = std::time::Instant::now();
    let give_up = std::time::Duration::from_millis(5 * raft.config().election_timeout_max);
    let write = raft.client_write(batch);
    tokio::pin!(write);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
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
