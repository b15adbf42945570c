//! # halfmq-store
//!
//! The storage engine: a segmented commit log with group commit, and the consume-queue
//! indexes and key index derived from it.
//!
//! Writers encode records into one shared batch under a short lock; one flusher thread writes
//! the batch, `fdatasync`s it, appends the consume-queue entries of its messages, and then
//! releases every writer whose record is covered (group commit). See `ARCHITECTURE.md` for
//! the file formats and the recovery rules.
//!
//! ## The path of a record
//!
//! [`Store::submit`] checks an [`Append`] and encodes it into the batch under the writer
//! lock; the [`Ticket`] it returns knows where the record is in the log and which
//! group-commit round writes it. The flusher writes and syncs the round, appends the
//! consume-queue entries, runs the record's [`Hook`], and then releases the round's writers:
//! [`Ticket::wait`] blocks a thread, [`Ticket::wait_async`] suspends a task without blocking
//! an executor thread. The `append*` methods are `submit` (or [`Store::submit_async`]) and
//! one of those two waits. Consumers then read the record through its consume queue
//! ([`Store::read_messages`]).
//!
//! ## Modules
//!
//! The engine's public types are re-exported here; the modules marked *private* hold the
//! `impl Store` blocks and internals behind them.
//!
//! - `store` (private): [`Store`] itself: open (recovery, then the flusher thread), the
//!   consume queues, close.
//! - `append` (private): the write path: [`Append`], [`Store::submit`] and the `append*`
//!   shorthands, encoding into the batch, segment rolls.
//! - `append_run` (private): [`Store::submit_many`]: a run of records under one hold of the
//!   writer lock, acknowledged by one group commit (a producer's batch).
//! - `ticket` (private): [`Ticket`] and [`Appended`]: a record in the batch and the two ways
//!   to wait for its acknowledgement.
//! - `batch` (private): the batch writers fill and the flusher writes, and the signal that
//!   wakes one round's async writers.
//! - `flush` (private): the flusher thread: group commit, consume-queue dispatch,
//!   checkpoints, poisoning.
//! - `state` (private): what handles, writers and the flusher share: the writer state, the
//!   flush progress, and the ways to wait for it.
//! - `epoch` (private): the futex broadcast that wakes every waiting thread at once.
//! - `read` (private): the read side: [`LogReader`], reads by queue or log offset, log
//!   scans ([`RecordVisitor`]), waiting for messages, log statistics.
//! - `retention` (private): deleting segments from the front of the log
//!   ([`Store::truncate_front`]).
//! - `recovery` (private): open-time recovery: segment checks, torn tail cut (told apart
//!   from damage to acknowledged records by the batches' durable marks), index rebuild.
//! - `reindex` (private): damaged consume-queue entries found by a read, rebuilt from the
//!   log.
//! - [`repair`]: `halfmq repair`: quarantine damaged acknowledged bytes, report what was
//!   lost.
//! - `prepare` (private): zero-fills the next segment ahead of the roll.
//! - `seqfile` (private): the numbered, checksummed files that checkpoints and log starts
//!   are written as.
//! - `hooks` (private): the callbacks to the layer above: [`DurableHook`], [`Hook`],
//!   [`StoreObserver`], [`StoreHooks`], [`LogStartListener`].
//! - [`config`]: [`StoreConfig`] and [`FlushPolicy`].
//! - [`record`]: the record format: encode, check, decode (never panics).
//! - [`segment`]: segment file headers, names, create/open/adopt.
//! - [`consume_queue`]: the per (topic, queue) index files, and topic-name rules.
//! - [`checkpoint`]: recovery checkpoints.
//! - [`log_start`]: the persisted log start after retention.
//! - [`key_index`]: the on-disk hash index from message key to log offset.
//! - [`io`]: the [`io::Storage`] and [`io::StorageFile`] traits and the real file system.
//! - `sim` (feature `sim`): the simulated disk with crashes and fault injection.
//! - [`worker`]: a named background thread fed through a channel.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod append;
mod append_run;
mod batch;
pub mod checkpoint;
pub mod config;
pub mod consume_queue;
#[cfg(test)]
mod damage_tests;
mod epoch;
mod flush;
mod hooks;
pub mod io;
pub mod key_index;
#[cfg(test)]
mod lead_tests;
pub mod log_start;
mod prepare;
mod read;
pub mod record;
mod recovery;
mod reindex;
pub mod repair;
mod retention;
pub mod segment;
mod seqfile;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod state;
mod store;
mod ticket;
pub mod worker;

pub use append::Append;
pub use config::{FlushPolicy, StoreConfig};
pub use consume_queue::validate_topic_name;
pub use hooks::{DurableHook, Hook, LogStartListener, StoreHooks, StoreObserver};
pub use read::{LogReader, RecordVisitor, SCAN_CHUNK_BYTES};
pub use recovery::RecoveryReport;
pub use retention::{TruncateLimits, Truncated};
pub use store::Store;
pub use ticket::{Appended, Ticket};
