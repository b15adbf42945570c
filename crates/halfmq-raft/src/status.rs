//! What `halfmq cluster status --json` prints, one line, from a node's raft metrics:
//!
//! ```text
//! {"leader": 1, "term": 7, "nodes": [{"id": 1, "addr": "127.0.0.1:10911", "role": "leader",
//!   "last_log_index": 1234, "matched": 1234}, ...]}
//! ```
//!
//! `leader` is null while there is none. A node's `role` is `leader`, `follower`,
//! `candidate` or `learner`. Asked of the leader, `matched` is the last index it knows each
//! node holds (its own last index for itself); asked of a follower it is null for the
//! others. `last_log_index` is the node's own for itself and, for the others, the same as
//! `matched` (the most a node can know of another's log).

use openraft::{BasicNode, RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};

use crate::NodeId;

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes.
    Leader,
    /// A voter following the leader.
    Follower,
    /// Asking for votes.
    Candidate,
    /// Receives the log without voting (a node being added).
    Learner,
}

/// One member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its id.
    pub id: NodeId,
    /// Its address.
    pub addr: String,
    /// Its role.
    pub role: Role,
    /// Its last log index, as far as this node knows.
    pub last_log_index: Option<u64>,
    /// The last index the leader knows it holds.
    pub matched: Option<u64>,
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The leader, if one is known.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Every member, by id.
    pub nodes: Vec<NodeStatus>,
}

impl ClusterStatus {
    /// The status in `m`, a node's metrics.
    pub fn from_metrics(m: &RaftMetrics<NodeId, BasicNode>) -> ClusterStatus {
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, node)| {
                let role = if *id == m.id {
                    match m.state {
                        ServerState::Leader => Role::Leader,
                        ServerState::Candidate => Role::Candidate,
                        ServerState::Learner => Role::Learner,
                        ServerState::Follower | ServerState::Shutdown => Role::Follower,
                    }
                } else if m.current_leader == Some(*id) {
                    Role::Leader
                } else if voters.contains(id) {
                    Role::Follower
                } else {
                    Role::Learner
                };
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index);
                let (last_log_index, matched) = if *id == m.id {
                    let own = m.last_log_index;
                    (
                        own,
                        if m.state == ServerState::Leader {
                            own
                        } else {
                            matched
                        },
                    )
                } else {
                    (matched, matched)
                };
                NodeStatus {
                    id: *id,
                    addr: node.addr.clone(),
                    role,
                    last_log_index,
                    matched,
                }
            })
            .collect();
        ClusterStatus {
            leader: m.current_leader,
            term: m.current_term,
            nodes,
        }
    }
}
