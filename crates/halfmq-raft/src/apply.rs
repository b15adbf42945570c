//! Applying committed entries to a node's broker: in log order, one command at a time, each
//! waited for before the next starts.
//!
//! Why not several at once: the store begins every group commit with a mark record, so
//! where a record lands in the log depends on how records were grouped into store rounds.
//! Log offsets are part of what a node answers (a receipt's `log_offset`) and of what later
//! commands name (a transaction id is its half's log offset), so every node must group the
//! same way. Applying one command per round makes the grouping a function of the log
//! alone. Pipelining sends (several entries per round) was tried and gave the same
//! messages at the same queue offsets but different log offsets on each node
//! (`tests/cluster.rs`, `concurrent_writes_apply_as_the_same_log_on_every_node`, checks
//! this). It is the limit on a node's apply rate until the commit log itself is the raft
//! log (ARCHITECTURE.md, "Replication").

use std::sync::Arc;

use halfmq::{Broker, ManualClock};
use halfmq_types::clock::Clock;
use halfmq_types::error::{Error, Result};
use openraft::EntryPayload;

use crate::command::{apply_batch, Applied, Batch};
use crate::{Entry, LogId};

/// Set `clock` to `ms` unless it is already later.
pub fn set_clock(clock: &ManualClock, ms: u64) {
    if ms > clock.now_ms() {
        clock.set_ms(ms);
    }
}

/// Apply `entries` in order, off the async executor: one answer list per entry (empty for
/// blank and membership entries), and the batches applied, for the snapshot journal.
pub async fn apply_entries(
    broker: Arc<Broker>,
    clock: &ManualClock,
    entries: Vec<Entry>,
) -> Result<(Vec<Vec<Applied>>, Vec<(LogId, Batch)>)> {
    let clock = clock.clone();
    tokio::task::spawn_blocking(move || {
        let mut answers = Vec::with_capacity(entries.len());
        let mut applied = Vec::new();
        for e in entries {
            match e.payload {
                EntryPayload::Normal(batch) => {
                    set_clock(&clock, batch.time_ms);
                    answers.push(apply_batch(&broker, &batch)?);
                    applied.push((e.log_id, batch));
                }
                EntryPayload::Blank | EntryPayload::Membership(_) => answers.push(Vec::new()),
            }
        }
        Ok((answers, applied))
    })
    .await
    .map_err(|e| Error::Invalid {
        what: "apply task",
        reason: e.to_string(),
    })?
}
