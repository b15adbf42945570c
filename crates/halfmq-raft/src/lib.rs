//! Replication of a halfmq broker on raft, with [openraft](https://docs.rs/openraft) 0.9 as
//! the consensus engine (halfmq does not implement raft itself).
//!
//! The shape (see `ARCHITECTURE.md`, "Replication", for the reasons and for what a crash at
//! each step means):
//!
//! - [`command`]: what a raft entry carries: one [`Batch`] of broker commands (sends,
//!   halves, commits and rollbacks, acks, topic creation, group settings) stamped with the
//!   leader's clock, and what applying each one answered;
//! - [`log_store`]: the raft log, durable: segment files of CRC-framed entries, fsynced by
//!   one flusher thread (group commit) before openraft is told an append is done; the vote
//!   is written whole and fsynced;
//! - [`state_machine`]: each node's own embedded [`halfmq::Broker`], which committed
//!   entries are applied to in log order ([`apply`]: one command per store round, so that
//!   log offsets agree), on a clock set from the entries so every node
//!   writes the same bytes; [`snapshot`] keeps the journal of applied batches that snapshots
//!   are made of, so a wiped or far-behind node catches up;
//! - [`checkback`]: the leader's loop: check-back of pending halves and firing of delayed
//!   messages by the leader alone, each check's result and each firing
//!   proposed through the log so every node records it;
//! - [`consume`]: deliveries by the leader alone; nacks, dead-letter moves and visibility
//!   time-outs decided on the leader and recorded through the log;
//! - [`network`]: the peer transports: an in-process simulated network for tests (seeded
//!   drops, delays, partitions) and framed TCP with a token for real processes;
//! - [`node`]: [`ReplicaNode`], one member of a cluster: start, initialize, write through
//!   the leader, add and remove members, read its broker; [`status`]: the cluster as a
//!   node sees it, in the shape `halfmq cluster status --json` prints;
//! - [`propose`]: a batch proposed through the leader, and why it was not ([`ReplicaError`]);
//!   [`merge`]: concurrent writes merged into one proposal while others are in flight;
//! - [`elect`]: when a node stands for election, its own loop with a time-out drawn afresh
//!   for every candidacy (openraft 0.9 draws one per node for its life);
//! - [`gate`]: the door peers' votes, appends and snapshots come in by (refusing votes while
//!   repairing, telling the election loop when a leader was heard);
//! - [`repair`]: a node whose raft log or snapshot journal is damaged moves them aside and
//!   catches up from its peers, voting again only once it holds what the cluster committed;
//! - [`frame`]: the CRC-checked length-prefixed frame shared by the files and the socket.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod apply;
pub mod checkback;
pub mod command;
pub mod consume;
pub mod elect;
pub mod frame;
pub mod gate;
pub mod log_store;
pub mod merge;
pub mod network;
pub mod node;
pub mod propose;
pub mod repair;
pub mod snapshot;
pub mod state_machine;
pub mod status;

pub use command::{
    Applied, Batch, CheckResult, Command, LeaseData, MessageData, Outcome, WireError,
};
pub use node::{ReplicaConfig, ReplicaError, ReplicaNode};
pub use snapshot::JournalSnapshot;
pub use status::{ClusterStatus, NodeStatus, Role};

/// A node's id in the cluster (`halfmq broker --node-id`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft's types for halfmq: an entry carries a [`Batch`], applying it answers one
    /// [`Applied`] per command, a snapshot is the journal of applied batches.
    pub TypeConfig:
        D = Batch,
        R = Vec<Applied>,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = JournalSnapshot,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft instance of a node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A raft log id (term, leader and index).
pub type LogId = openraft::LogId<NodeId>;
/// A storage error as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;
