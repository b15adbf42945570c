//! How the records of one key become stories for [`Broker::trace`]: records grouped per
//! message (a half with its commit, a delayed message with its fire, an original with its
//! dead-letter copies), joined with the journal's events, and a "now" line computed from the
//! broker's live state (consumer offsets, leases, the transaction index).

use std::collections::BTreeSet;

use super::consume::dead_letter_topic;
use super::Broker;
use crate::delivery::HELD;
use crate::journal::{Journal, Recorded};
use halfmq_store::record::{Properties, Record, RecordKind, FLAG_DELAYED_FIRE, FLAG_TXN_COMMIT};
use halfmq_types::error::Result;
use halfmq_types::props::{
    DLQ_TOPIC_PREFIX, PROP_DELAYED, PROP_DELIVER_AT_MS, PROP_DLQ_LOG_OFFSET, PROP_DLQ_REASON,
    PROP_PRODUCER_GROUP, PROP_REPLAYED_FROM, PROP_TXN, REPLAY_GROUP,
};
use halfmq_types::trace::{format_ms, Event, GroupNow, Now, RecKind, TraceLine, TracedMessage};
use halfmq_types::TxnState;

/// The trace's kind of a log record (`None` for records that are no message).
fn rec_kind(kind: RecordKind, flags: u16) -> Option<RecKind> {
    {
        match kind {
            RecordKind::Message if flags & FLAG_TXN_COMMIT != 0 => Some(RecKind::Commit),
            RecordKind::Message if flags & FLAG_DELAYED_FIRE != 0 => Some(RecKind::Fire),
            RecordKind::Message => Some(RecKind::Message),
            RecordKind::Half => Some(RecKind::Half),
            RecordKind::TxnEnd => Some(RecKind::Rollback),
            RecordKind::Delayed => Some(RecKind::Delayed),
            RecordKind::SegmentEnd | RecordKind::Mark | RecordKind::Quarantined => None,
        }
    }
}

/// A record with the key, read back from the log.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) log_offset: u64,
    kind: RecKind,
    topic: String,
    queue: u32,
    queue_offset: u64,
    timestamp_ms: u64,
    props: Properties,
}

impl Found {
    pub(crate) fn of(r: &Record) -> Option<Found> {
        Some(Found {
            log_offset: r.header.log_offset,
            kind: rec_kind(r.header.kind, r.header.flags)?,
            topic: r.topic.clone(),
            queue: r.header.queue_id,
            queue_offset: r.header.queue_offset,
            timestamp_ms: r.header.timestamp_ms,
            props: r.properties.clone(),
        })
    }

    fn prop_u64(&self, name: &str) -> Option<u64> {
        self.props.get(name).and_then(|v| v.parse().ok())
    }

    fn is_dead_letter(&self) -> bool {
        self.kind == RecKind::Message
            && self.topic.starts_with(DLQ_TOPIC_PREFIX)
            && self.props.contains_key(PROP_DLQ_LOG_OFFSET)
    }

    /// The log offset of the first record of the story it belongs to (before dead-letter
    /// copies are attached to their original).
    fn root(&self) -> u64 {
        match self.kind {
            RecKind::Commit | RecKind::Rollback => self.prop_u64(PROP_TXN),
            RecKind::Fire => self.prop_u64(PROP_DELAYED),
            _ => None,
        }
        .unwrap_or(self.log_offset)
    }
}

/// Group records into stories: (root log offset, records in log order), in log order.
pub(crate) fn stories(found: Vec<Found>) -> Vec<(u64, Vec<Found>)> {
    let mut out: Vec<(u64, Vec<Found>)> = Vec::new();
    let mut root_of: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for f in found {
        let mut root = f.root();
        if f.is_dead_letter() {
            if let Some(orig) = f.prop_u64(PROP_DLQ_LOG_OFFSET) {
                root = root_of.get(&orig).copied().unwrap_or(orig);
            }
        }
        root_of.insert(f.log_offset, root);
        match out.iter().position(|s| s.0 == root) {
            Some(i) => out[i].1.push(f),
            None => out.push((root, vec![f])),
        }
    }
    out
}

/// Join the traced records with their journal and the live state into a [`TracedMessage`].
pub(crate) fn story(
    b: &Broker,
    journal: &Journal,
    root: u64,
    records: Vec<Found>,
) -> Result<TracedMessage> {
    let first = records.first();
    let topic = first.map(|f| f.topic.clone()).unwrap_or_default();
    let txn = records
        .iter()
        .any(|f| matches!(f.kind, RecKind::Half | RecKind::Commit | RecKind::Rollback))
        .then_some(root);
    let replayed_from = first.and_then(|f| f.props.get(PROP_REPLAYED_FROM).cloned());
    let mut lines = Vec::new();
    let mut journal_events: Vec<(u64, Recorded)> = Vec::new();
    let mut stored: Option<&Found> = None;
    let mut dead_copies: Vec<&Found> = Vec::new();
    let mut rolled_back_at = None;
    let mut delayed: Option<(&Found, u64)> = None;
    for f in &records {
        let mut push = |event| {
            lines.push(TraceLine {
                at_ms: f.timestamp_ms,
                log_offset: f.log_offset,
                event,
            })
        };
        let stored_event = || Event::Stored {
            topic: f.topic.clone(),
            queue: f.queue,
            offset: f.queue_offset,
        };
        match f.kind {
            RecKind::Half => push(Event::Half {
                txn: f.log_offset,
                topic: f.topic.clone(),
                queue: f.queue,
                producer_group: f
                    .props
                    .get(PROP_PRODUCER_GROUP)
                    .cloned()
                    .unwrap_or_default(),
            }),
            RecKind::Commit => {
                push(Event::Committed { txn: root });
                push(stored_event());
                stored = Some(f);
            }
            RecKind::Rollback => {
                push(Event::RolledBack { txn: root });
                rolled_back_at = Some(f.timestamp_ms);
            }
            RecKind::Delayed => {
                let at = f.prop_u64(PROP_DELIVER_AT_MS).unwrap_or_default();
                push(Event::DelayedStored {
                    topic: f.topic.clone(),
                    deliver_at_ms: at,
                });
                delayed = Some((f, at));
            }
            RecKind::Fire => {
                push(Event::DelayedFired { id: root });
                push(stored_event());
                stored = Some(f);
            }
            RecKind::Message if f.is_dead_letter() && stored.is_some() => {
                push(Event::DeadLetterStored {
                    topic: f.topic.clone(),
                    offset: f.queue_offset,
                    reason: f.props.get(PROP_DLQ_REASON).cloned().unwrap_or_default(),
                });
                dead_copies.push(f);
            }
            RecKind::Message => {
                push(stored_event());
                stored = Some(f);
            }
        }
        for r in journal.events(f.log_offset)? {
            lines.push(TraceLine {
                at_ms: r.at_ms,
                log_offset: f.log_offset,
                event: r.event.clone(),
            });
            journal_events.push((f.log_offset, r));
        }
    }
    // Stable: what happened in the same millisecond keeps log and journal order.
    lines.sort_by_key(|l| l.at_ms);
    let now = match stored {
        Some(f) => now_stored(b, f, &dead_copies, &journal_events)?,
        None => now_unstored(b, txn, &records, rolled_back_at, delayed),
    };
    Ok(TracedMessage {
        topic,
        txn,
        log_offset: first.map_or(root, |f| f.log_offset),
        replayed_from,
        events: lines,
        now,
    })
}

fn now_stored(
    b: &Broker,
    f: &Found,
    dead_copies: &[&Found],
    journal: &[(u64, Recorded)],
) -> Result<Now> {
    let (topic, queue, offset) = (&f.topic, f.queue, f.queue_offset);
    let mut names: BTreeSet<String> = b
        .meta()
        .consumer_queues()?
        .into_iter()
        .filter(|(_, t, q)| t == topic && *q == queue)
        .map(|(g, _, _)| g)
        .collect();
    names.extend(b.polling_groups(topic));
    for (o, r) in journal {
        if *o != f.log_offset {
            continue;
        }
        if let Event::Delivered { group, .. }
        | Event::Acked { group }
        | Event::Filtered { group, .. } = &r.event
        {
            names.insert(group.clone());
        }
    }
    names.remove(REPLAY_GROUP);
    let mut groups = Vec::new();
    for g in names {
        let acks = b.meta().queue_acks(&g, topic, queue)?;
        let acked = offset < acks.committed || acks.acked_above.contains(&offset);
        let journal_attempt = journal
            .iter()
            .filter(|(o, _)| *o == f.log_offset)
            .filter_map(|(_, r)| match &r.event {
                Event::Delivered { group, attempt } if *group == g => Some(*attempt),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let live = b.lease_of(&g, topic, queue, offset);
        let mut gn = GroupNow {
            group: g.clone(),
            delivered: acked || journal_attempt > 0,
            attempts: journal_attempt,
            acked,
            in_flight_until_ms: None,
            retry_at_ms: None,
            dead_letter_topic: None,
            replayed: false,
        };
        if let Some(l) = live {
            gn.delivered |= l.delivered || l.failures > 0 || l.handed_out;
            gn.attempts = gn.attempts.max(l.failures + u32::from(l.delivered));
            if l.delivered {
                gn.in_flight_until_ms = Some(l.due_ms);
            } else if l.failures > 0 && l.due_ms != HELD && l.due_ms != 0 {
                gn.retry_at_ms = Some(l.due_ms);
            }
        }
        let dlq = dead_letter_topic(&g);
        if let Some(copy) = dead_copies.iter().find(|c| c.topic == dlq) {
            gn.dead_letter_topic = Some(dlq.clone());
            let replay = b.meta().queue_acks(REPLAY_GROUP, &dlq, 0)?;
            gn.replayed = copy.queue_offset < replay.committed
                || replay.acked_above.contains(&copy.queue_offset);
        }
        groups.push(gn);
    }
    let mut line = if f.topic.starts_with(DLQ_TOPIC_PREFIX) {
        format!("parked in dead-letter queue {topic} at offset {offset}")
    } else {
        let what = match f.kind {
            RecKind::Commit => "committed, stored",
            RecKind::Fire => "delivered on time, stored",
            _ => "stored",
        };
        format!("{what} at {topic} queue {queue} offset {offset}")
    };
    if f.topic.starts_with(DLQ_TOPIC_PREFIX) {
        let replay = b.meta().queue_acks(REPLAY_GROUP, topic, 0)?;
        if offset < replay.committed || replay.acked_above.contains(&offset) {
            line = format!("replayed from dead-letter queue {topic} (offset {offset})");
        }
    } else if groups.is_empty() {
        line.push_str("; no consumer group reads this topic yet");
    }
    for g in &groups {
        line.push_str("; ");
        line.push_str(&g.describe());
    }
    Ok(Now {
        state: "stored".into(),
        since_ms: f.timestamp_ms,
        checks: 0,
        last_answer: None,
        next_at_ms: None,
        stored_at: Some((topic.clone(), queue, offset)),
        groups,
        line,
    })
}

fn now_unstored(
    b: &Broker,
    txn: Option<u64>,
    records: &[Found],
    rolled_back_at: Option<u64>,
    delayed: Option<(&Found, u64)>,
) -> Now {
    let mut now = Now {
        state: "finished".into(),
        since_ms: records.first().map_or(0, |f| f.timestamp_ms),
        checks: 0,
        last_answer: None,
        next_at_ms: None,
        stored_at: None,
        groups: Vec::new(),
        line: String::new(),
    };
    if let Some((f, at)) = delayed {
        now.state = "delayed".into();
        now.next_at_ms = Some(at);
        now.line = format!(
            "DELAYED: stored for {} since {}, to be delivered at {}; not visible to consumers yet",
            f.topic,
            format_ms(f.timestamp_ms),
            format_ms(at)
        );
        return now;
    }
    let Some(txn) = txn else {
        now.line = "unknown".into();
        return now;
    };
    if let Some(at) = rolled_back_at {
        now.state = "rolled_back".into();
        now.since_ms = at;
        now.line = format!(
            "rolled back at {}: never visible to consumers",
            format_ms(at)
        );
        return now;
    }
    match b.txn_index().get(txn) {
        Some(info) => {
            now.checks = info.checks;
            now.last_answer = info.last_answer.clone();
            let last = info
                .last_answer
                .as_deref()
                .map(|a| format!(", last answer: {a}"))
                .unwrap_or_default();
            if info.state == TxnState::Unresolved {
                now.state = "unresolved".into();
                now.line = format!(
                    "UNRESOLVED since {}: checked {} times{last}; not visible. \
                     Resolve by hand: halfmq txn commit {txn} (or rollback, or rearm)",
                    format_ms(info.created_ms),
                    info.checks
                );
            } else {
                now.state = "pending".into();
                now.next_at_ms = Some(info.next_check_ms);
                now.line = format!(
                    "PENDING (half written, not committed) since {}: checked {} times{last}; \
                     next check at {}; not visible to consumers",
                    format_ms(info.created_ms),
                    info.checks,
                    format_ms(info.next_check_ms)
                );
            }
        }
        None => {
            let outcome = b.txn_index().finished(txn, b.meta()).ok().flatten();
            now.line = match outcome {
                Some(o) => format!(
                    "{} (its outcome record is no longer in the log)",
                    o.as_str()
                ),
                None => "finished; its outcome is no longer known".into(),
            };
        }
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(format_ms(0), "1970-01-01 00:00:00.000");
        assert_eq!(format_ms(951_782_400_001), "2000-02-29 00:00:00.001");
        assert_eq!(format_ms(1_796_066_521_123), "2026-11-30 19:22:01.123");
    }
}
