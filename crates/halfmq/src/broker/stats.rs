//! What the broker reports about itself: figures per queue and consumer group.

use std::collections::{BTreeMap, BTreeSet};

use super::consume::GroupKey;
use super::Broker;
use halfmq_store::consume_queue::ConsumeQueue;
use halfmq_types::error::{Error, Result};
use halfmq_types::props::{DLQ_TOPIC_PREFIX, INTERNAL_TOPIC_PREFIX};
use halfmq_types::stats::{DeadLetterStats, GroupLag, QueueStats, RetentionStats, Stats};

impl Broker {
    /// Figures per queue and consumer group.
    pub fn stats(&self) -> Result<Stats> {
        // Groups with stored acks, and groups that polled since the start but acked nothing
        // yet (their backlog counts too).
        let mut groups_of: BTreeMap<(String, u32), BTreeSet<String>> = BTreeMap::new();
        let mut replayed: BTreeMap<String, u64> = BTreeMap::new();
        let mut all = self.meta.consumer_queues()?;
        let loaded: Vec<GroupKey> = self.groups.lock().keys().cloned().collect();
        for (g, t) in &loaded {
            if let Some(topic) = self.topics.read().get(t) {
                for q in &topic.queues {
                    all.push((g.clone(), t.clone(), q.queue_id()));
                }
            }
        }
        for (g, t, q) in all {
            if g.starts_with(INTERNAL_TOPIC_PREFIX) {
                // The broker's own group that remembers replayed dead letters.
                if let Some(group) = t.strip_prefix(DLQ_TOPIC_PREFIX) {
                    let acks = self.meta.queue_acks(&g, &t, q)?;
                    replayed.insert(
                        group.to_owned(),
                        acks.committed + acks.acked_above.len() as u64,
                    );
                }
                continue;
            }
            groups_of.entry((t, q)).or_default().insert(g);
        }
        let mut queues = Vec::new();
        for info in self.topics() {
            let Some(t) = self.topics.read().get(&info.name).cloned() else {
                continue;
            };
            for q in &t.queues {
                let messages = q.len();
                let mut groups = Vec::new();
                for g in groups_of
                    .get(&(t.name.clone(), q.queue_id()))
                    .into_iter()
                    .flatten()
                {
                    let acks = self.meta.queue_acks(g, &t.name, q.queue_id())?;
                    let acked = acks.committed + acks.acked_above.len() as u64;
                    let (in_flight, retrying) = self.leases_of(g, &t.name, q.queue_id());
                    groups.push(GroupLag {
                        group: g.clone(),
                        committed: acks.committed,
                        backlog: messages.saturating_sub(acked),
                        in_flight,
                        retrying,
                        lag: messages.saturating_sub(acks.committed),
                        oldest_unacked_age_ms: self.oldest_unacked_age_ms(q, acks.committed)?,
                    });
                }
                queues.push(QueueStats {
                    topic: t.name.clone(),
                    queue: q.queue_id(),
                    messages,
                    groups,
                });
            }
        }
        let (txn_pending, txn_unresolved) = self.txns.counts();
        let dead_letters = queues
            .iter()
            .filter_map(|q| {
                let group = q.topic.strip_prefix(DLQ_TOPIC_PREFIX)?;
                Some(DeadLetterStats {
                    group: group.to_owned(),
                    messages: q.messages,
                    replayed: replayed.get(group).copied().unwrap_or(0),
                })
            })
            .collect();
        Ok(Stats {
            log: self.store.log_stats(),
            queues,
            txn_pending,
            txn_unresolved,
            dead_letters,
            delayed_pending: self.delayed.pending(),
            retention: Some(RetentionStats {
                floor: self.retention_floor()?,
                expired_skipped: self.expired_skipped(),
                last_pass: self.last_retention(),
            }),
            meta: self.meta_recovery.clone(),
        })
    }

    /// How long ago the message at `committed`, the first one a group has not acked, was
    /// stored; `None` past the end of the queue (everything acked).
    fn oldest_unacked_age_ms(&self, q: &ConsumeQueue, committed: u64) -> Result<Option<u64>> {
        // Messages below the queue's start were deleted by retention: never delivered again.
        let committed = committed.max(q.start());
        if committed >= q.len() {
            return Ok(None);
        }
        let rec = match self.store.read_message(q, committed) {
            // Retention deleted it just now: the age of what is left shows next time.
            Err(Error::Expired { .. }) => return Ok(None),
            // Lost to damage (quarantined by repair): it has no age.
            Err(Error::Lost { .. }) => return Ok(None),
            other => other?,
        };
        Ok(rec.map(|r| self.now().saturating_sub(r.header.timestamp_ms)))
    }
}
