//! The peer network: how one node's openraft reaches the others'.
//!
//! - [`sim`]: in-process, for tests: every node's `Raft` in one table, with seeded drops
//!   (of requests and of replies), delays and partitions;
//! - [`tcp`]: framed TCP between processes, with the cluster's token checked on every
//!   connection.
//!
//! Both hand a snapshot over the same way: the receiver's `begin_receiving_snapshot` file
//! is filled chunk by chunk, then installed (`Raft::install_full_snapshot`).

pub mod sim;
pub mod tcp;

/// Bytes of a snapshot per chunk on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
