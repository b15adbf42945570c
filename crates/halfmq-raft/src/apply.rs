//! Applying committed entries to a node's broker, in log order.
//!
//! Every node must store the same records at the same log offsets: log offsets are part of
//! what a node answers (a receipt's `log_offset`) and of what later commands name (a
//! transaction id is its half's log offset). A node's broker writes no group-commit marks
//! (`StoreConfig::marks`, set by the state machine), so where a record lands depends only on
//! the records before it, not on how they were grouped into store rounds, and applying
//! need not wait for one round before starting the next.
//!
//! So a run of `Send` commands, across as many entries as openraft hands over at once, is
//! staged into the store one after another ([`Broker::stage_send_batch`]: checked, queued,
//! deduplicated and in the pending batch, in log order) and only then waited for, sharing
//! rounds. Any other command first waits for every staged send (so it sees the broker as
//! a one-at-a-time apply would) and is then applied on its own. So does a send whose
//! idempotency keys would not fit in the index's room left when the staged ones were
//! counted (`Broker::idempotency_room`): a key forgotten for room while sends are staged
//! would make what a later send finds depend on timing. With marks, a first attempt
//! at this gave the same messages at the same queue offsets but different log offsets on
//! each node; `tests/cluster.rs`, `concurrent_writes_apply_as_the_same_log_on_every_node`,
//! compares the nodes' logs byte for byte.

use std::sync::Arc;

use halfmq::{Broker, ManualClock, Message, StagedSend};
use halfmq_types::clock::Clock;
use halfmq_types::error::{Error, Result};
use openraft::EntryPayload;

use crate::command::{answer, apply, sent, Applied, Batch, Command, MessageData};
use crate::{Entry, LogId};

/// Set `clock` to `ms` unless it is already later.
pub fn set_clock(clock: &ManualClock, ms: u64) {
    if ms > clock.now_ms() {
        clock.set_ms(ms);
    }
}

/// Sends staged and not yet waited for: the batch and command each answers, and the send.
type Staged<'a> = Vec<(usize, usize, StagedSend<'a>)>;

/// Wait for every staged send, in order, and put its answer in its place.
fn finish(staged: &mut Staged<'_>, answers: &mut [Vec<Option<Applied>>]) -> Result<()> {
    for (b, c, s) in staged.drain(..) {
        answers[b][c] = Some(answer(sent(Ok(s.finish())))?);
    }
    Ok(())
}

/// Apply `batches` in order, each at its time on `clock` (see the module docs): one answer
/// per command, per batch. A command that fails the same way on every node answers its
/// error and the rest go on; a failure of this node's own storage is returned (as
/// [`crate::command::apply_batch`] does).
pub fn apply_batches(
    broker: &Broker,
    clock: &ManualClock,
    batches: &[&Batch],
) -> Result<Vec<Vec<Applied>>> {
    // Every send's messages as the broker's, up front: staged sends borrow them.
    let messages: Vec<Vec<Option<Vec<Message>>>> = batches
        .iter()
        .map(|b| {
            b.commands
                .iter()
                .map(|c| match c {
                    Command::Send { messages, .. } => {
                        Some(messages.iter().map(MessageData::to_message).collect())
                    }
                    _ => None,
                })
                .collect()
        })
        .collect();
    let mut answers: Vec<Vec<Option<Applied>>> = batches
        .iter()
        .map(|b| vec![None; b.commands.len()])
        .collect();
    let mut staged: Staged<'_> = Vec::new();
    // Room in the idempotency index left for the keys of the sends staged since the last
    // wait (`None`: to be read again). Kept within it, no key is forgotten for room while
    // sends are staged, so what each send finds does not depend on when earlier ones were
    // acknowledged (`Broker::idempotency_room`).
    let mut room: Option<(u64, u64)> = None;
    for (bi, batch) in batches.iter().enumerate() {
        set_clock(clock, batch.time_ms);
        for (ci, command) in batch.commands.iter().enumerate() {
            match (command, &messages[bi][ci]) {
                (Command::Send { topic, .. }, Some(msgs)) => {
                    let (keys, bytes) = Broker::idempotency_cost(msgs);
                    let (k, b) = *room.get_or_insert_with(|| broker.idempotency_room());
                    if keys > k || bytes > b {
                        finish(&mut staged, &mut answers)?;
                        room = Some(broker.idempotency_room());
                    }
                    room = room.map(|(k, b)| (k.saturating_sub(keys), b.saturating_sub(bytes)));
                    match broker.stage_send_batch(topic, msgs) {
                        Ok(s) => staged.push((bi, ci, s)),
                        Err(e) => answers[bi][ci] = Some(answer(Err(e))?),
                    }
                }
                _ => {
                    finish(&mut staged, &mut answers)?;
                    answers[bi][ci] = Some(answer(apply(broker, command))?);
                    room = None;
                }
            }
        }
    }
    finish(&mut staged, &mut answers)?;
    answers
        .into_iter()
        .map(|b| {
            b.into_iter()
                .map(|a| {
                    a.ok_or_else(|| Error::Invalid {
                        what: "apply",
                        reason: "a command was left unanswered".into(),
                    })
                })
                .collect()
        })
        .collect()
}

/// Apply `entries` in order, off the async executor: one answer list per entry (empty for
/// blank and membership entries). The batches applied are then handed, in order, to
/// `applied` (the snapshot journal's append) on the same thread.
pub async fn apply_entries<F>(
    broker: Arc<Broker>,
    clock: &ManualClock,
    entries: Vec<Entry>,
    applied: F,
) -> Result<Vec<Vec<Applied>>>
where
    F: FnOnce(&[(LogId, &Batch)]) -> Result<()> + Send + 'static,
{
    let clock = clock.clone();
    tokio::task::spawn_blocking(move || {
        let batches: Vec<(LogId, &Batch)> = entries
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::Normal(batch) => Some((e.log_id, batch)),
                EntryPayload::Blank | EntryPayload::Membership(_) => None,
            })
            .collect();
        let only: Vec<&Batch> = batches.iter().map(|(_, b)| *b).collect();
        let mut applied_answers = apply_batches(&broker, &clock, &only)?.into_iter();
        applied(&batches)?;
        let mut answers = Vec::with_capacity(entries.len());
        for e in &entries {
            match e.payload {
                EntryPayload::Normal(_) => answers.push(applied_answers.next().unwrap_or_default()),
                EntryPayload::Blank | EntryPayload::Membership(_) => answers.push(Vec::new()),
            }
        }
        Ok(answers)
    })
    .await
    .map_err(|e| Error::Invalid {
        what: "apply task",
        reason: e.to_string(),
    })?
}
