//! The consumer side of the broker: poll, ack, nack, redelivery, dead letters and their
//! replay, and per-group delivery settings.
//!
//! See [`crate::delivery`] for the lease model. Dead letters of group `G` are messages of
//! the internal topic `%DLQ%G` (one queue), each carrying the message's key, body and
//! properties plus `halfmq.dlq.*` properties saying where it came from and why. Moving a
//! message there is: mark it dead in sled (its retry state says more failures than allowed),
//! append the dead letter durably, then ack the original. A crash in between finishes the
//! move on the next poll, so a dead letter is never lost; it can at worst be written twice
//! (a crash after the append and before the ack), which `dlq list` shows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{now_ms, validate_group_name, Broker, Delivery, SendReceipt, Topic};
use crate::config::DeliveryConfig;
use crate::delivery::{Cursor, Lease};
use crate::error::{Error, Result};
use crate::meta::{GroupSettings, RetryState};
use crate::record::{self, Properties, Record, RecordKind};
use crate::store::consume_queue::ConsumeQueue;
use crate::store::Append;
use crate::txn::RESERVED_PREFIX;

/// Topics whose names start with this are the broker's own (dead-letter queues).
pub const INTERNAL_TOPIC_PREFIX: &str = "%";
/// Dead letters of group `G` are in topic `%DLQ%G`.
pub const DLQ_TOPIC_PREFIX: &str = "%DLQ%";
/// The group that remembers which dead letters were replayed.
pub(crate) const REPLAY_GROUP: &str = "%replay";

/// Property of a dead letter: the topic it came from.
pub const PROP_DLQ_TOPIC: &str = "halfmq.dlq.topic";
/// Property of a dead letter: its queue there.
pub const PROP_DLQ_QUEUE: &str = "halfmq.dlq.queue";
/// Property of a dead letter: its queue offset there.
pub const PROP_DLQ_OFFSET: &str = "halfmq.dlq.offset";
/// Property of a dead letter: its log offset there.
pub const PROP_DLQ_LOG_OFFSET: &str = "halfmq.dlq.log_offset";
/// Property of a dead letter: why its last delivery failed.
pub const PROP_DLQ_REASON: &str = "halfmq.dlq.reason";
/// Property of a dead letter: failed deliveries.
pub const PROP_DLQ_FAILURES: &str = "halfmq.dlq.failures";
/// Property of a replayed message: `group/dead-letter offset` it was replayed from.
pub const PROP_REPLAYED_FROM: &str = "halfmq.replayed_from";

/// The dead-letter topic of a group.
pub fn dead_letter_topic(group: &str) -> String {
    format!("{DLQ_TOPIC_PREFIX}{group}")
}

/// (group, topic).
pub(super) type GroupKey = (String, String);

/// A group's dead-letter topic and the state of what was replayed from it.
type DeadLetterQueue = (Arc<Topic>, Arc<Mutex<GroupTopic>>);

/// One consumer group's state in one topic.
pub(super) struct GroupTopic {
    cursors: Vec<Cursor>,
    /// Queue to start the next poll at, so no queue starves.
    start: usize,
    /// The group's delivery settings.
    delivery: Arc<DeliveryConfig>,
}

/// What a nack did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NackOutcome {
    /// The message will be delivered again (as attempt `attempt`) at `at_ms`.
    Redeliver {
        /// The number of the next delivery (1 is the first).
        attempt: u32,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// It failed `max_retries + 1` times and moved to the group's dead-letter queue.
    DeadLettered {
        /// Where the dead letter is.
        dead_letter: SendReceipt,
    },
}

/// A message in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The group whose deliveries failed.
    pub group: String,
    /// Offset in the dead-letter queue.
    pub dlq_offset: u64,
    /// Topic, queue and queue offset it came from.
    pub topic: String,
    /// Queue it came from.
    pub queue: u32,
    /// Queue offset it had.
    pub offset: u64,
    /// Log offset it had.
    pub log_offset: u64,
    /// Key.
    pub key: String,
    /// Payload size.
    pub body_len: usize,
    /// Why its last delivery failed.
    pub reason: String,
    /// Failed deliveries.
    pub failures: u32,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub at_ms: u64,
    /// Replayed to its topic since.
    pub replayed: bool,
}

/// A dead letter sent back to its topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replayed {
    /// Offset in the dead-letter queue.
    pub dlq_offset: u64,
    /// Key.
    pub key: String,
    /// Where the new copy is.
    pub receipt: SendReceipt,
}

/// What [`Broker::delete_group`] removed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupDeleted {
    /// The group.
    pub group: String,
    /// (topic, queue) pairs it had offsets for.
    pub queues: u64,
    /// Its dead-letter topic, kept, if it has one.
    pub dead_letter_queue: Option<String>,
}

/// Bytes a delivery counts against a poll's byte limit.
fn delivery_size(topic: &str, rec: &Record) -> usize {
    topic.len()
        + rec.key.len()
        + rec.body.len()
        + rec
            .properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum::<usize>()
        + 64
}

fn delivery(t: &Topic, q: &ConsumeQueue, offset: u64, rec: Record, attempt: u32) -> Delivery {
    Delivery {
        topic: t.name.clone(),
        queue: q.queue_id(),
        offset,
        log_offset: rec.header.log_offset,
        key: rec.key,
        body: rec.body,
        properties: rec.properties,
        timestamp_ms: rec.header.timestamp_ms,
        attempt,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What one poll of one queue gathers.
struct PollState {
    out: Vec<Delivery>,
    bytes: usize,
    max: usize,
    max_bytes: usize,
    /// (queue index, queue offset, lease) of messages to dead-letter.
    dead: Vec<(usize, u64, Lease)>,
    /// Trace events of keyed messages: (log offset, event).
    events: Vec<(u64, crate::trace::Event)>,
}

impl PollState {
    fn full(&self) -> bool {
        self.out.len() >= self.max
    }

    /// Whether a delivery of `size` bytes still fits (the first always does).
    fn fits(&self, size: usize) -> bool {
        self.out.is_empty() || self.bytes + size <= self.max_bytes
    }
}

impl Broker {
    /// The delivery settings of a group: the broker's defaults with its overrides.
    fn resolve_delivery(&self, s: &GroupSettings) -> Result<DeliveryConfig> {
        let mut d = self.config.delivery.clone();
        if let Some(v) = s.visibility_timeout_ms {
            d.visibility_timeout = Duration::from_millis(v);
        }
        if let Some(v) = s.max_retries {
            d.max_retries = v;
        }
        if let Some(v) = &s.retry_backoff_ms {
            d.retry_backoff = v.iter().map(|&m| Duration::from_millis(m)).collect();
        }
        d.validate()?;
        Ok(d)
    }

    /// Override the delivery settings of `group` (durably; `None` fields keep the broker
    /// default). Applies at once to its loaded state. Returns the settings now in force.
    pub fn set_group_settings(
        &self,
        group: &str,
        settings: &GroupSettings,
    ) -> Result<DeliveryConfig> {
        validate_group_name(group)?;
        let d = self.resolve_delivery(settings)?;
        self.meta.set_group_settings(group, settings)?;
        let d = Arc::new(d);
        for ((g, _), gt) in self.groups.lock().iter() {
            if g == group {
                gt.lock().delivery = d.clone();
            }
        }
        Ok((*d).clone())
    }

    /// Forget consumer group `group`: its committed offsets, acks, retry states and settings.
    /// A group that is no longer used otherwise keeps its first un-acked message, and
    /// everything after it, from retention forever. Refused (nothing changes) while a
    /// consumer of the group holds a message whose visibility time-out has not run out:
    /// stop the group's consumers first. Its dead-letter queue (`%DLQ%<group>`) is kept:
    /// dead letters are never dropped silently; replay or consume them. A consumer that
    /// polls or acks under the name afterwards starts a new group from the beginning of each
    /// queue.
    pub fn delete_group(&self, group: &str) -> Result<GroupDeleted> {
        validate_group_name(group)?;
        if group.starts_with(INTERNAL_TOPIC_PREFIX) {
            return Err(Error::Invalid {
                what: "consumer group",
                reason: format!("`{group}` is internal to the broker"),
            });
        }
        // Held across the whole deletion: no poll can load the group's state meanwhile.
        let mut groups = self.groups.lock();
        let now = now_ms();
        let mut held = 0;
        let mut in_memory = false;
        for ((g, _), gt) in groups.iter() {
            if g == group {
                in_memory = true;
                held += gt.lock().cursors.iter().map(|c| c.held(now)).sum::<usize>();
            }
        }
        if held > 0 {
            return Err(Error::Invalid {
                what: "consumer group deletion",
                reason: format!(
                    "group `{group}` has {held} message(s) with a consumer now; stop its consumers (or wait for the visibility time-out) first"
                ),
            });
        }
        let (queues, stored) = self.meta.delete_group(group)?;
        if !stored && !in_memory {
            return Err(Error::UnknownGroup(group.to_owned()));
        }
        groups.retain(|(g, _), _| g != group);
        drop(groups);
        let dlq = dead_letter_topic(group);
        let dead_letter_queue = self.topics.read().contains_key(&dlq).then_some(dlq);
        Ok(GroupDeleted {
            group: group.to_owned(),
            queues: queues.len() as u64,
            dead_letter_queue,
        })
    }

    /// The delivery settings in force for `group`, and its overrides.
    pub fn group_settings(&self, group: &str) -> Result<(DeliveryConfig, GroupSettings)> {
        validate_group_name(group)?;
        let s = self.meta.group_settings(group)?;
        Ok((self.resolve_delivery(&s)?, s))
    }

    pub(super) fn group_topic(&self, group: &str, topic: &Topic) -> Result<Arc<Mutex<GroupTopic>>> {
        let key = (group.to_owned(), topic.name.clone());
        let mut groups = self.groups.lock();
        if let Some(g) = groups.get(&key) {
            return Ok(g.clone());
        }
        let delivery = Arc::new(self.resolve_delivery(&self.meta.group_settings(group)?)?);
        let mut cursors = Vec::with_capacity(topic.queues.len());
        for q in &topic.queues {
            let queue = q.queue_id();
            let acks = self.meta.queue_acks(group, &topic.name, queue)?;
            if acks.committed == 0 {
                self.meta.note_consumer(group, &topic.name, queue)?;
            }
            let retries = self.meta.retry_states(group, &topic.name, queue)?;
            let (c, stale) = Cursor::load(acks.committed, acks.acked_above, retries);
            let stale: Vec<_> = stale.into_iter().map(|o| (o, None)).collect();
            self.meta
                .store_retries(group, &topic.name, queue, &stale, false)?;
            cursors.push(c);
        }
        let g = Arc::new(Mutex::new(GroupTopic {
            cursors,
            start: 0,
            delivery,
        }));
        groups.insert(key, g.clone());
        Ok(g)
    }

    /// A topic to read from: a user topic (created on first use when allowed) or an existing
    /// internal one (a dead-letter queue).
    fn topic_to_read(&self, name: &str) -> Result<Arc<Topic>> {
        if name.starts_with(INTERNAL_TOPIC_PREFIX) {
            return self
                .topics
                .read()
                .get(name)
                .cloned()
                .ok_or_else(|| Error::UnknownTopic(name.to_owned()));
        }
        self.topic(name)
    }

    /// Hand out up to `max` messages of `topic` to `group`, from all queues: first messages
    /// whose redelivery is due (a lease that ran out, a nack whose delay passed), then ones
    /// never delivered. Each message goes to one consumer of the group and is leased to it
    /// for the group's visibility time-out: not acked by then, it is delivered again.
    /// Messages not acked are also delivered again after a restart (at-least-once).
    pub fn poll(&self, group: &str, topic: &str, max: usize) -> Result<Vec<Delivery>> {
        self.poll_limited(group, topic, max, usize::MAX)
    }

    /// [`Broker::poll`] that also stops before the messages' bytes (key, body, properties)
    /// would pass `max_bytes`; at least one message is returned when any is there.
    pub fn poll_limited(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        self.poll_group(group, &t, max, max_bytes)
    }

    fn poll_group(
        &self,
        group: &str,
        t: &Arc<Topic>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>> {
        let g = self.group_topic(group, t)?;
        let mut g = g.lock();
        let now = now_ms();
        let n = t.queues.len();
        let start = g.start;
        g.start = (start + 1) % n;
        let delivery = g.delivery.clone();
        let mut st = PollState {
            out: Vec::new(),
            bytes: 0,
            max,
            max_bytes,
            dead: Vec::new(),
            events: Vec::new(),
        };
        let mut result = Ok(());
        for i in 0..n {
            if st.full() {
                break;
            }
            let qi = (start + i) % n;
            let done = self.poll_queue(group, t, qi, &mut g.cursors[qi], &delivery, now, &mut st);
            match done {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Dead letters found on the way are moved even when the poll failed later. One that
        // cannot be moved now (say, the disk is full) gets its lease back, due at once, so
        // the next poll tries again; it is never dropped.
        for (qi, offset, lease) in std::mem::take(&mut st.dead) {
            if let Err(e) = self.dead_letter(group, t, &mut g, qi, offset, lease.clone()) {
                tracing::error!(group, topic = %t.name, offset, error = %e, "could not move a message to the dead-letter queue; will retry");
                g.cursors[qi].insert(
                    offset,
                    Lease {
                        delivered: false,
                        due_ms: now,
                        ..lease
                    },
                );
                if result.is_ok() && st.out.is_empty() {
                    result = Err(e);
                }
            }
        }
        crate::metrics::delivered(group, &t.name, st.out.len());
        for d in st.out.iter().filter(|d| !d.key.is_empty()) {
            let event = crate::trace::Event::Delivered {
                group: group.to_owned(),
                attempt: d.attempt,
            };
            st.events.push((d.log_offset, event));
        }
        self.trace_events(std::mem::take(&mut st.events));
        result.map(|()| st.out)
    }

    /// Poll one queue into `st`. Returns true when the byte limit stopped it.
    #[allow(clippy::too_many_arguments)]
    fn poll_queue(
        &self,
        group: &str,
        t: &Topic,
        qi: usize,
        c: &mut Cursor,
        delivery_cfg: &DeliveryConfig,
        now: u64,
        st: &mut PollState,
    ) -> Result<bool> {
        let q = &t.queues[qi];
        let vt = ms(delivery_cfg.visibility_timeout);
        let mut retries: Vec<(u64, Option<RetryState>)> = Vec::new();
        let mut stopped = false;
        let mut expired = 0u64;
        // 1. Redeliveries that are due.
        while !st.full() {
            let Some((offset, mut lease)) = c.pop_due(now) else {
                break;
            };
            if offset < q.start() {
                // Retention deleted it (possible only where the group did not pin it, as in
                // a dead-letter queue someone else replayed): the lease ends, counted.
                expired += 1;
                continue;
            }
            let timed_out = lease.delivered;
            if timed_out {
                lease.failures += 1;
                lease.reason = format!("not acked within the visibility time-out ({vt} ms)");
            }
            if lease.failures > delivery_cfg.max_retries {
                // Held (never due) until the move ends it, so the scan below skips it.
                c.insert(
                    offset,
                    Lease {
                        due_ms: u64::MAX,
                        delivered: false,
                        ..lease.clone()
                    },
                );
                st.dead.push((qi, offset, lease));
                continue;
            }
            if timed_out {
                retries.push((
                    offset,
                    Some(RetryState {
                        failures: lease.failures,
                        due_ms: now,
                        reason: lease.reason.clone(),
                    }),
                ));
            }
            let Some(rec) = self.store.read_message(q, offset)? else {
                // Leases are only made for messages below the queue's length.
                tracing::warn!(topic = %t.name, queue = q.queue_id(), offset, "lease of a message past the end of its queue dropped");
                continue;
            };
            if timed_out && !rec.key.is_empty() {
                let event = crate::trace::Event::Retried {
                    group: group.to_owned(),
                    attempt: lease.failures,
                    reason: lease.reason.clone(),
                    next_at_ms: now,
                };
                st.events.push((rec.header.log_offset, event));
            }
            let size = delivery_size(&t.name, &rec);
            if !st.fits(size) {
                // Deliver it on the next poll; the failure (if any) is already counted.
                lease.delivered = false;
                lease.due_ms = now;
                c.insert(offset, lease);
                stopped = true;
                break;
            }
            st.bytes += size;
            let attempt = lease.failures + 1;
            c.insert(
                offset,
                Lease {
                    due_ms: now + vt,
                    delivered: true,
                    ..lease
                },
            );
            st.out.push(delivery(t, q, offset, rec, attempt));
        }
        // 2. Messages never delivered.
        'scan: while !stopped && !st.full() && c.next < q.len() {
            let start = q.start();
            if c.next < start {
                // Deleted by retention before this group got them (a group that first polls
                // after retention ran, or one that did not pin them): skipped, counted.
                let from = c.next.max(c.committed);
                if from < start {
                    let acked = c.acked_above.range(from..start).count() as u64;
                    expired += (start - from).saturating_sub(acked);
                }
                c.next = start;
                continue;
            }
            let want = st.max - st.out.len();
            let batch = match self.store.read_messages(q, c.next, want) {
                // Retention raced with this poll: go round and skip to the new start.
                Err(Error::Expired { .. }) if q.start() > c.next => continue,
                other => other?,
            };
            if batch.is_empty() {
                break;
            }
            for (offset, rec) in batch {
                if c.is_acked(offset) || c.is_leased(offset) {
                    c.next = offset + 1;
                    continue;
                }
                let size = delivery_size(&t.name, &rec);
                if !st.fits(size) {
                    stopped = true;
                    break 'scan;
                }
                st.bytes += size;
                c.next = offset + 1;
                c.insert(
                    offset,
                    Lease {
                        due_ms: now + vt,
                        failures: 0,
                        delivered: true,
                        reason: String::new(),
                    },
                );
                st.out.push(delivery(t, q, offset, rec, 1));
            }
        }
        if expired > 0 {
            tracing::warn!(group, topic = %t.name, queue = q.queue_id(), messages = expired, first_kept = q.start(), "poll skipped messages that retention had deleted");
            self.expired_skipped
                .fetch_add(expired, std::sync::atomic::Ordering::Relaxed);
            crate::metrics::expired_skipped(group, &t.name, expired);
        }
        // Failure counts are durable before the redeliveries are handed out.
        self.meta
            .store_retries(group, &t.name, q.queue_id(), &retries, true)?;
        Ok(stopped)
    }

    /// Like [`Broker::poll`], but waits up to `timeout` for a message when there is none.
    pub fn poll_wait(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.poll(group, topic, max)?;
            let now = std::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let (t, from, wait) = self.wait_plan(group, topic, deadline - now)?;
            self.store.wait_for_messages(&t.queues, &from, wait);
        }
    }

    /// [`Broker::poll_limited`] that waits up to `timeout` for a message without blocking
    /// the executor.
    pub async fn poll_wait_async(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.poll_limited(group, topic, max, max_bytes)?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let (t, from, wait) = self.wait_plan(group, topic, deadline - now)?;
            self.store
                .wait_for_messages_async(&t.queues, &from, now + wait)
                .await;
        }
    }

    /// What an empty poll waits for: new messages past each queue's scan position, or the
    /// next redelivery falling due, for at most `left`.
    fn wait_plan(
        &self,
        group: &str,
        topic: &str,
        left: Duration,
    ) -> Result<(Arc<Topic>, Vec<u64>, Duration)> {
        let t = self.topic_to_read(topic)?;
        let g = self.group_topic(group, &t)?;
        let g = g.lock();
        let from = g.cursors.iter().map(|c| c.next).collect();
        let wait = match g.cursors.iter().filter_map(Cursor::next_due_ms).min() {
            // Wake a millisecond after it falls due.
            Some(due) => Duration::from_millis(due.saturating_sub(now_ms()) + 1).min(left),
            None => left,
        };
        Ok((t, from, wait))
    }

    /// Acknowledge one message; durable when this returns.
    pub fn ack(&self, group: &str, topic: &str, queue: u32, offset: u64) -> Result<()> {
        self.ack_many(group, topic, &[(queue, offset)])
    }

    /// Acknowledge several messages of one topic with one durable write.
    pub fn ack_many(&self, group: &str, topic: &str, acks: &[(u32, u64)]) -> Result<()> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let g = self.group_topic(group, &t)?;
        let mut g = g.lock();
        self.ack_locked(group, &t, &mut g, acks, true)?;
        crate::metrics::acked(group, &t.name, acks.len());
        Ok(())
    }

    /// Ack under the group's lock. `trace`: record an `acked` trace event for each keyed
    /// message (not for the acks that end a dead-letter move or a replay).
    fn ack_locked(
        &self,
        group: &str,
        t: &Topic,
        g: &mut GroupTopic,
        acks: &[(u32, u64)],
        trace: bool,
    ) -> Result<()> {
        let mut by_queue: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &(queue, offset) in acks {
            let q = self.acked_queue(group, t, queue, offset)?;
            if offset >= q.len() {
                return Err(Self::bad_ack(
                    group,
                    t,
                    queue,
                    offset,
                    format!("the queue has {} messages", q.len()),
                ));
            }
            by_queue.entry(queue).or_default().push(offset);
        }
        for (queue, offsets) in by_queue {
            let c = &mut g.cursors[queue as usize];
            let mut added = Vec::new();
            let mut acked = c.acked_above.clone();
            for off in offsets {
                if off >= c.committed && acked.insert(off) {
                    added.push(off);
                }
            }
            if added.is_empty() {
                continue; // all acked before: acks are idempotent
            }
            let mut committed = c.committed;
            let mut removed = Vec::new();
            while acked.remove(&committed) {
                removed.push(committed);
                committed += 1;
            }
            let newly: Vec<u64> = added.clone();
            added.retain(|o| *o >= committed);
            removed.retain(|o| c.acked_above.contains(o));
            if trace {
                // Inserted before the ack's flushed sled write, so a durable ack always keeps
                // its event (sled writes its log in order).
                self.trace_events(Self::ack_events(group, &t.queues[queue as usize], &newly)?);
            }
            self.meta
                .store_acks(group, &t.name, queue, committed, &added, &removed)?;
            c.committed = committed;
            c.acked_above = acked;
            c.next = c.next.max(committed);
            // The acks are durable; now forget the leases and failure counts. A crash before
            // the removal leaves retry states that the next load drops (they are acked).
            let mut cleared = Vec::new();
            for off in newly {
                if let Some(l) = c.remove(off) {
                    if l.failures > 0 {
                        cleared.push((off, None));
                    }
                }
            }
            self.meta
                .store_retries(group, &t.name, queue, &cleared, false)?;
        }
        Ok(())
    }

    /// The `acked` trace events of the keyed messages at these offsets of `q`.
    fn ack_events(
        group: &str,
        q: &ConsumeQueue,
        offsets: &[u64],
    ) -> Result<Vec<(u64, crate::trace::Event)>> {
        let mut out = Vec::new();
        for &off in offsets {
            for e in q.read(off, 1)? {
                // key_hash 0 means "no key" (a key whose CRC is 0 is not traced as acked).
                if e.key_hash != 0 {
                    let event = crate::trace::Event::Acked {
                        group: group.to_owned(),
                    };
                    out.push((e.log_offset, event));
                }
            }
        }
        Ok(out)
    }

    fn bad_ack(group: &str, t: &Topic, queue: u32, offset: u64, reason: String) -> Error {
        Error::BadAck {
            group: group.to_owned(),
            topic: t.name.clone(),
            queue,
            offset,
            reason,
        }
    }

    fn acked_queue<'t>(
        &self,
        group: &str,
        t: &'t Topic,
        queue: u32,
        offset: u64,
    ) -> Result<&'t Arc<ConsumeQueue>> {
        t.queues.get(queue as usize).ok_or_else(|| {
            Self::bad_ack(
                group,
                t,
                queue,
                offset,
                format!("the topic has {} queues", t.queues.len()),
            )
        })
    }

    /// Give back a delivered message un-processed: it is delivered again after `delay`, or
    /// after the group's retry backoff for its failure count when `None`. The nack counts as
    /// a failed delivery; past the group's `max_retries` the message moves to the group's
    /// dead-letter queue instead. Durable when this returns.
    pub fn nack(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
        delay: Option<Duration>,
    ) -> Result<NackOutcome> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let g = self.group_topic(group, &t)?;
        let mut g = g.lock();
        let q = self.acked_queue(group, &t, queue, offset)?.clone();
        let c = &mut g.cursors[queue as usize];
        if c.is_acked(offset) {
            return Err(Self::bad_ack(
                group,
                &t,
                queue,
                offset,
                "it is acked".into(),
            ));
        }
        let lease = match c.lease(offset) {
            Some(l) if l.delivered => l.clone(),
            Some(_) => {
                return Err(Self::bad_ack(
                    group,
                    &t,
                    queue,
                    offset,
                    "it is waiting for redelivery, not with a consumer".into(),
                ))
            }
            None => {
                return Err(Self::bad_ack(
                    group,
                    &t,
                    queue,
                    offset,
                    format!(
                        "it was not delivered to this group{}",
                        if offset >= q.len() {
                            " (past the end of the queue)"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        };
        let d = g.delivery.clone();
        let failures = lease.failures + 1;
        let reason = "nacked by the consumer".to_owned();
        if failures > d.max_retries {
            g.cursors[queue as usize].remove(offset);
            let dead = Lease {
                failures,
                reason,
                ..lease.clone()
            };
            return match self.dead_letter(group, &t, &mut g, queue as usize, offset, dead) {
                Ok(dead_letter) => Ok(NackOutcome::DeadLettered { dead_letter }),
                Err(e) => {
                    // Still with the consumer, who may nack again.
                    g.cursors[queue as usize].insert(offset, lease);
                    Err(e)
                }
            };
        }
        let at_ms = now_ms() + ms(delay.unwrap_or_else(|| d.backoff(failures)));
        self.meta.store_retries(
            group,
            &t.name,
            queue,
            &[(
                offset,
                Some(RetryState {
                    failures,
                    due_ms: at_ms,
                    reason: reason.clone(),
                }),
            )],
            true,
        )?;
        if let Some(e) = q.read(offset, 1)?.into_iter().find(|e| e.key_hash != 0) {
            let event = crate::trace::Event::Retried {
                group: group.to_owned(),
                attempt: failures,
                reason: reason.clone(),
                next_at_ms: at_ms,
            };
            self.trace_events(vec![(e.log_offset, event)]);
        }
        g.cursors[queue as usize].insert(
            offset,
            Lease {
                due_ms: at_ms,
                failures,
                delivered: false,
                reason,
            },
        );
        Ok(NackOutcome::Redeliver {
            attempt: failures + 1,
            at_ms,
        })
    }

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
    /// The ack at the end ends its lease.
    fn dead_letter(
        &self,
        group: &str,
        t: &Topic,
        g: &mut GroupTopic,
        qi: usize,
        offset: u64,
        lease: Lease,
    ) -> Result<SendReceipt> {
        let q = &t.queues[qi];
        let queue = q.queue_id();
        // 1. Mark it dead durably: if we crash before the ack below, the next load finds a
        //    failure count past the maximum and finishes the move.
        self.meta.store_retries(
            group,
            &t.name,
            queue,
            &[(
                offset,
                Some(RetryState {
                    failures: lease.failures,
                    due_ms: 0,
                    reason: lease.reason.clone(),
                }),
            )],
            true,
        )?;
        let rec = self.store.read_message(q, offset)?.ok_or_else(|| {
            Self::bad_ack(group, t, queue, offset, "past the end of the queue".into())
        })?;
        // 2. The dead letter, durable.
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
        let dq = &dlq.queues[0];
        let a = self.store.append(Append {
            kind: RecordKind::Message,
            flags: 0,
            topic: &dlq.name,
            queue_id: dq.queue_id(),
            key: &rec.key,
            props: &props,
            body: &rec.body,
            timestamp_ms: now_ms(),
            dispatch_to: Some(dq),
        })?;
        tracing::warn!(
            group, topic = %t.name, queue, offset, key = %rec.key, failures = lease.failures,
            reason = %lease.reason, "message moved to the dead-letter queue"
        );
        if !rec.key.is_empty() {
            let event = crate::trace::Event::DeadLettered {
                group: group.to_owned(),
                attempts: lease.failures,
                reason: lease.reason.clone(),
                dlq_topic: dlq.name.clone(),
                dlq_log_offset: a.log_offset,
            };
            self.trace_events(vec![(rec.header.log_offset, event)]);
        }
        // 3. Ack the original (which also drops its retry state).
        self.ack_locked(group, t, g, &[(queue, offset)], false)?;
        crate::metrics::dead_lettered(group, &t.name);
        Ok(SendReceipt {
            topic: dlq.name.clone(),
            queue: dq.queue_id(),
            offset: a.queue_offset.unwrap_or_default(),
            log_offset: a.log_offset,
            duplicate: false,
        })
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
                let a = self.store.append(Append {
                    kind: RecordKind::Message,
                    flags: 0,
                    topic: &t.name,
                    queue_id: t.queues[qi].queue_id(),
                    key: &msg_key,
                    props: &props,
                    body: &rec.body,
                    timestamp_ms: now_ms(),
                    dispatch_to: Some(&t.queues[qi]),
                })?;
                if !msg_key.is_empty() {
                    let event = crate::trace::Event::Replayed {
                        group: group.to_owned(),
                        new_topic: t.name.clone(),
                        new_log_offset: a.log_offset,
                    };
                    self.trace_events(vec![(rec.header.log_offset, event)]);
                }
                self.ack_locked(REPLAY_GROUP, &dlq, &mut replay, &[(0, dlq_offset)], false)?;
                out.push(Replayed {
                    dlq_offset,
                    key: msg_key,
                    receipt: Self::receipt(&t, qi, a),
                });
            }
        }
        Ok(out)
    }

    /// What this process knows of `group`'s delivery of one message (None: the group has not
    /// polled the topic since the broker opened).
    pub(crate) fn lease_of(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Option<LeaseView> {
        let key = (group.to_owned(), topic.to_owned());
        let g = self.groups.lock().get(&key)?.clone();
        let g = g.lock();
        let c = g.cursors.get(queue as usize)?;
        let handed_out = c.next > offset;
        Some(match c.lease(offset) {
            Some(l) => LeaseView {
                delivered: l.delivered,
                due_ms: l.due_ms,
                failures: l.failures,
                handed_out,
            },
            None => LeaseView {
                delivered: false,
                due_ms: 0,
                failures: 0,
                handed_out,
            },
        })
    }

    /// Messages with a consumer now and messages waiting for redelivery, of a group in one
    /// queue (0, 0 when the group has not polled the topic since the start).
    pub(super) fn leases_of(&self, group: &str, topic: &str, queue: u32) -> (u64, u64) {
        let key = (group.to_owned(), topic.to_owned());
        let Some(g) = self.groups.lock().get(&key).cloned() else {
            return (0, 0);
        };
        let g = g.lock();
        match g.cursors.get(queue as usize) {
            Some(c) => (c.in_flight() as u64, c.waiting() as u64),
            None => (0, 0),
        }
    }
}

/// A group's live delivery state of one message ([`Broker::lease_of`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseView {
    /// With a consumer now.
    pub(crate) delivered: bool,
    /// Lease end (with a consumer) or redelivery time (waiting).
    pub(crate) due_ms: u64,
    /// Failed deliveries so far.
    pub(crate) failures: u32,
    /// The group's scan has passed it (it was handed out at least once).
    pub(crate) handed_out: bool,
}
