//! Proposing through the leader: [`propose`] makes a batch of commands one raft entry and
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
pub(crate) async fn propose(
    raft: &Raft,
    commands: Vec<Command>,
) -> Result<Vec<Applied>, ReplicaError> {
    let batch = Batch {
        time_ms: now_ms(),
        commands,
    };
    match raft.client_write(batch).await {
        Ok(resp) => Ok(resp.data),
        Err(e) => Err(client_error(e)),
    }
}
