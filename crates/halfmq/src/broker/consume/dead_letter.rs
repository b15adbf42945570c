//! Dead letters: moving a message there (from a poll that finds its failures past the
//! maximum, or from a nack), listing them, and replaying them to their topics.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{dead_letter_topic, DeadLetterQueue, GroupTopic};
use crate::broker::wait::{Hook, Wait};
use crate::broker::{validate_group_name, Broker, Topic};
use crate::delivery::Lease;
use crate::meta::RetryState;
use halfmq_store::record::{self, Properties, Record, RecordKind};
use halfmq_types::error::{Error, Result};
use halfmq_types::props::{
    PROP_DLQ_FAILURES, PROP_DLQ_LOG_OFFSET, PROP_DLQ_OFFSET, PROP_DLQ_QUEUE, PROP_DLQ_REASON,
    PROP_DLQ_TOPIC, PROP_REPLAYED_FROM, REPLAY_GROUP, RESERVED_PREFIX,
};
use halfmq_types::trace::Event;
use halfmq_types::{DeadLetter, Replayed, SendReceipt};

impl Broker {
    /// The dead-letter topic of `group`, created on first use.
    fn dead_letter_topic_of(&self, group: &str) -> Result<Arc<Topic>> {
        let name = dead_letter_topic(group);
        if let Some(t) = self.topics.read().get(&name) {
            return Ok(t.clone());
        }
        self.create_topic_unchecked(&name, 1)?;
        self.topics
            .read()
            .get(&name)
            .cloned()
            .ok_or(Error::UnknownTopic(name))
    }

    /// Move a message whose deliveries failed too often to the group's dead-letter queue.
    /// Its lease is held (never due) by the caller meanwhile; the ack at the end ends it.
    /// Waits the way `w` waits, without holding the group's lock (`group_topic`) while it
    /// waits.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn move_to_dead_letters<W: Wait>(
        &self,
        w: &W,
        group: &str,
        t: &Topic,
        group_topic: &Mutex<GroupTopic>,
        qi: usize,
        offset: u64,
        lease: Lease,
    ) -> Result<SendReceipt> {
        let q = &t.queues[qi];
        let queue = q.queue_id();
        // 1. Mark it dead durably: if we crash before the ack below, the next load finds a
        //    failure count past the maximum and finishes the move.
        let dead = RetryState {
            failures: lease.failures,
            due_ms: 0,
            reason: lease.reason.clone(),
        };
        self.meta
            .store_retries(group, &t.name, queue, &[(offset, Some(dead))], false)?;
        w.flush(&self.meta).await?;
        let rec = self.store.read_message(q, offset)?.ok_or_else(|| {
            Self::bad_ack(group, t, queue, offset, "past the end of the queue".into())
        })?;
        // 2. The dead letter, durable before the ack below under every flush policy: a power
        //    loss after the ack must find it in the log.
        let dlq = self.dead_letter_topic_of(group)?;
        let mut props = rec.properties.clone();
        props.insert(PROP_DLQ_TOPIC.into(), t.name.clone());
        props.insert(PROP_DLQ_QUEUE.into(), queue.to_string());
        props.insert(PROP_DLQ_OFFSET.into(), offset.to_string());
        props.insert(
            PROP_DLQ_LOG_OFFSET.into(),
            rec.header.log_offset.to_string(),
        );
        props.insert(PROP_DLQ_REASON.into(), lease.reason.clone());
        props.insert(PROP_DLQ_FAILURES.into(), lease.failures.to_string());
        let props = record::encode_properties(&props)?;
        let a = dlq.append(
            0,
            RecordKind::Message,
            (&rec.key, &props, &rec.body),
            self.now(),
        );
        let a = w.append(&self.store, a, Hook::Sync).await?;
        tracing::warn!(
            group, topic = %t.name, queue, offset, key = %rec.key, failures = lease.failures,
            reason = %lease.reason, "message moved to the dead-letter queue"
        );
        if !rec.key.is_empty() {
            let event = Event::DeadLettered {
                group: group.to_owned(),
                attempts: lease.failures,
                reason: lease.reason.clone(),
                dlq_topic: dlq.name.clone(),
                dlq_log_offset: a.log_offset,
            };
            self.trace_events(vec![(rec.header.log_offset, event)]);
        }
        // 3. Ack the original (which also drops its retry state and ends its lease).
        self.ack_apply(group, t, &mut group_topic.lock(), &[(queue, offset)], false)?;
        w.flush(&self.meta).await?;
        crate::metrics::dead_lettered(group, &t.name);
        Ok(Self::receipt(&dlq, 0, a))
    }

    /// The dead-letter topic of `group` and the state of what was replayed from it, if the
    /// group has dead letters.
    fn dead_letter_queue(&self, group: &str) -> Result<Option<DeadLetterQueue>> {
        let Some(dlq) = self.topics.read().get(&dead_letter_topic(group)).cloned() else {
            return Ok(None);
        };
        let replay = self.group_topic(REPLAY_GROUP, &dlq)?;
        Ok(Some((dlq, replay)))
    }

    /// Dead letters of `group` from dead-letter offset `from`, at most `max`.
    pub fn dead_letters(&self, group: &str, from: u64, max: usize) -> Result<Vec<DeadLetter>> {
        validate_group_name(group)?;
        let Some((dlq, replay)) = self.dead_letter_queue(group)? else {
            return Ok(Vec::new());
        };
        let replay = replay.lock();
        let c = &replay.cursors[0];
        let mut out = Vec::new();
        // Dead letters below the queue's start were deleted by retention after some group
        // acked them: the listing starts at the first one kept.
        let from = from.max(dlq.queues[0].start());
        for (dlq_offset, rec) in self.store.read_messages(&dlq.queues[0], from, max)? {
            out.push(Self::dead_letter_of(
                group,
                dlq_offset,
                &rec,
                c.is_acked(dlq_offset),
            ));
        }
        Ok(out)
    }

    fn dead_letter_of(group: &str, dlq_offset: u64, rec: &Record, replayed: bool) -> DeadLetter {
        let p = &rec.properties;
        let num = |k: &str| p.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        DeadLetter {
            group: group.to_owned(),
            dlq_offset,
            topic: p.get(PROP_DLQ_TOPIC).cloned().unwrap_or_default(),
            queue: num(PROP_DLQ_QUEUE) as u32,
            offset: num(PROP_DLQ_OFFSET),
            log_offset: num(PROP_DLQ_LOG_OFFSET),
            key: rec.key.clone(),
            body_len: rec.body.len(),
            reason: p.get(PROP_DLQ_REASON).cloned().unwrap_or_default(),
            failures: num(PROP_DLQ_FAILURES) as u32,
            at_ms: rec.header.timestamp_ms,
            replayed,
        }
    }

    /// Send up to `max` dead letters of `group` that were not replayed yet back to their
    /// topics, as new messages with their key, body and user properties (and
    /// `halfmq.replayed_from`). At-least-once: a crash between the send and remembering it
    /// can replay one twice.
    pub fn replay_dead_letters(&self, group: &str, max: usize) -> Result<Vec<Replayed>> {
        validate_group_name(group)?;
        let Some((dlq, replay)) = self.dead_letter_queue(group)? else {
            return Ok(Vec::new());
        };
        let mut replay = replay.lock();
        let q = &dlq.queues[0];
        let mut out = Vec::new();
        let mut at = replay.cursors[0].committed;
        while out.len() < max && at < q.len() {
            // Deleted by retention after a group polling the dead-letter queue acked them:
            // handled there, nothing to replay.
            at = at.max(q.start());
            let batch = self.store.read_messages(q, at, max - out.len())?;
            if batch.is_empty() {
                break;
            }
            for (dlq_offset, rec) in batch {
                at = dlq_offset + 1;
                if replay.cursors[0].is_acked(dlq_offset) {
                    continue;
                }
                let dl = Self::dead_letter_of(group, dlq_offset, &rec, false);
                let mut props: Properties = rec.properties.clone();
                props.retain(|k, _| !k.starts_with(RESERVED_PREFIX));
                props.insert(PROP_REPLAYED_FROM.into(), format!("{group}/{dlq_offset}"));
                let t = self.topic(&dl.topic)?;
                let qi = (dl.queue as usize).min(t.queues.len() - 1);
                let props = record::encode_properties(&props)?;
                let msg_key = rec.key.clone();
                let a = t.append(
                    qi,
                    RecordKind::Message,
                    (&msg_key, &props, &rec.body),
                    self.now(),
                );
                // Durable before the dead letter counts as replayed, whatever the flush
                // policy: a power loss must leave it replayed or still waiting, never neither.
                let a = self.store.submit(a, halfmq_store::Hook::Sync)?.wait()?;
                if !msg_key.is_empty() {
                    let event = Event::Replayed {
                        group: group.to_owned(),
                        new_topic: t.name.clone(),
                        new_log_offset: a.log_offset,
                    };
                    self.trace_events(vec![(rec.header.log_offset, event)]);
                }
                self.ack_locked(REPLAY_GROUP, &dlq, &mut replay, &[(0, dlq_offset)])?;
                out.push(Replayed {
                    dlq_offset,
                    key: msg_key,
                    receipt: Self::receipt(&t, qi, a),
                });
            }
        }
        Ok(out)
    }
}
