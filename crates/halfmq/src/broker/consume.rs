//! The consumer side of the broker: consumer groups and their state, per-group delivery
//! settings; in the children, `poll` (leases, redelivery, tag filters, FIFO message groups),
//! `ack` (ack and nack), `receipt` (acks, nacks and lease changes by receipt) and
//! `dead_letter` (dead letters and their replay).
//!
//! See `crate::delivery` for the lease model. Dead letters of group `G` are messages of the
//! internal topic `%DLQ%G` (one queue), each carrying the message's key, body and properties
//! plus `halfmq.dlq.*` properties saying where it came from and why. Moving a message there
//! is: mark it dead in sled (its retry state says more failures than allowed), append the
//! dead letter durably, then ack the original. A crash in between finishes the move on the
//! next poll, so a dead letter is never lost; it can at worst be written twice (a crash after
//! the append and before the ack), which `dlq list` shows.

mod ack;
mod dead_letter;
mod decide;
mod poll;
mod receipt;

pub use decide::{Decided, DeliveredLease, Polled, Settlement};
pub(crate) use receipt::LeaseKeys;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{validate_group_name, Broker, Topic};
use crate::config::DeliveryConfig;
use crate::delivery::Cursor;
use halfmq_store::consume_queue::ConsumeQueue;
use halfmq_types::error::{Error, Result};
use halfmq_types::props::{DLQ_TOPIC_PREFIX, INTERNAL_TOPIC_PREFIX, PROP_MESSAGE_GROUP};
use halfmq_types::{GroupDeleted, GroupSettings};

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
    /// Notified when a message may fall due sooner than a waiting poll planned for (a lease
    /// shortened, a nack's redelivery wait set): the long polls waiting plan again.
    due_sooner: Arc<tokio::sync::Notify>,
}

impl GroupTopic {
    /// Wake the long polls of this group and topic to plan their wait again.
    pub(super) fn wake_pollers(&self) {
        self.due_sooner.notify_waiters();
    }
}

/// What a receipt is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseUse {
    /// An ack: a message acked already is fine (acks are idempotent).
    Ack,
    /// A nack or a lease change: the lease must be the message's lease now.
    Settle,
}

/// What a nack asks for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Nack<'a> {
    /// Deliver it again after this wait (`None`: the group's retry backoff), or dead-letter
    /// it when its failures pass the group's maximum.
    After(Option<Duration>),
    /// Move it to the dead-letter queue now, for this reason.
    DeadLetter(&'a str),
}

impl Nack<'_> {
    /// Why the message failed, as its lease, retry state and dead letter record it.
    fn reason(&self) -> String {
        match self {
            Nack::After(_) => "nacked by the consumer".to_owned(),
            Nack::DeadLetter(why) => {
                format!("sent to the dead-letter queue by the consumer: {why}")
            }
        }
    }

    /// Whether the message goes to the dead letters, with `failures` failed deliveries
    /// (this one counted) against the group's `max_retries`.
    fn dead_letters(&self, failures: u32, max_retries: u32) -> bool {
        matches!(self, Nack::DeadLetter(_)) || failures > max_retries
    }

    /// The wait before it is delivered again that the nack asks for (`None`: the group's
    /// retry backoff).
    fn delay(&self) -> Option<Duration> {
        match self {
            Nack::After(delay) => *delay,
            Nack::DeadLetter(_) => None,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
        if let Some(v) = s.fifo {
            d.fifo = v;
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
                let mut gt = gt.lock();
                if gt.delivery.fifo && !d.fifo {
                    gt.cursors.iter_mut().for_each(Cursor::unblock_all);
                }
                gt.delivery = d.clone();
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
        self.delete_group_with(group, true)
    }

    /// Whether [`Broker::delete_group`] would delete `group` now: the error it would
    /// refuse with (a bad or internal name, a consumer holding one of its messages), else
    /// `Ok`. A replicated cluster's leader asks this of its own leases before it proposes
    /// the deletion, which every node then makes with [`Broker::delete_group_settled`].
    pub fn check_group_deletion(&self, group: &str) -> Result<()> {
        validate_group_name(group)?;
        if group.starts_with(INTERNAL_TOPIC_PREFIX) {
            return Err(Error::Invalid {
                what: "consumer group",
                reason: format!("`{group}` is internal to the broker"),
            });
        }
        let held = self.held_of(&self.groups.lock(), group).0;
        Self::refuse_held(group, held)
    }

    /// [`Broker::delete_group`] without the check that no consumer holds one of its
    /// messages (checked by the node that decided the deletion, on its own leases): what a
    /// node of a replicated cluster applies.
    pub fn delete_group_settled(&self, group: &str) -> Result<GroupDeleted> {
        self.delete_group_with(group, false)
    }

    /// Messages of `group` with a consumer now (by this node's leases), and whether the
    /// group has state in memory.
    fn held_of(
        &self,
        groups: &HashMap<GroupKey, Arc<Mutex<GroupTopic>>>,
        group: &str,
    ) -> (usize, bool) {
        let now = self.lease_now();
        let mut held = 0;
        let mut in_memory = false;
        for ((g, _), gt) in groups.iter() {
            if g == group {
                in_memory = true;
                held += gt.lock().cursors.iter().map(|c| c.held(now)).sum::<usize>();
            }
        }
        (held, in_memory)
    }

    fn refuse_held(group: &str, held: usize) -> Result<()> {
        if held == 0 {
            return Ok(());
        }
        Err(Error::Invalid {
            what: "consumer group deletion",
            reason: format!(
                "group `{group}` has {held} message(s) with a consumer now; stop its consumers (or wait for the visibility time-out) first"
            ),
        })
    }

    fn delete_group_with(&self, group: &str, check_held: bool) -> Result<GroupDeleted> {
        validate_group_name(group)?;
        if group.starts_with(INTERNAL_TOPIC_PREFIX) {
            return Err(Error::Invalid {
                what: "consumer group",
                reason: format!("`{group}` is internal to the broker"),
            });
        }
        // Held across the whole deletion: no poll can load the group's state meanwhile.
        let mut groups = self.groups.lock();
        let (held, in_memory) = self.held_of(&groups, group);
        if check_held {
            Self::refuse_held(group, held)?;
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
            let (mut c, stale) = Cursor::load(acks.committed, acks.acked_above, retries);
            let stale: Vec<_> = stale.into_iter().map(|o| (o, None)).collect();
            self.meta
                .store_retries(group, &topic.name, queue, &stale, false)?;
            if delivery.fifo {
                self.restore_fifo(&mut c, q)?;
            }
            cursors.push(c);
        }
        let g = Arc::new(Mutex::new(GroupTopic {
            cursors,
            start: 0,
            delivery,
            due_sooner: Arc::new(tokio::sync::Notify::new()),
        }));
        groups.insert(key, g.clone());
        Ok(g)
    }

    /// FIFO after a (re)start: the messages waiting for redelivery hold their message
    /// groups (the first of each), so the scan holds back the rest of each group behind them.
    fn restore_fifo(&self, c: &mut Cursor, q: &ConsumeQueue) -> Result<()> {
        for offset in c.waiting_offsets() {
            let rec = match self.store.read_message(q, offset) {
                // Gone: the poll that reaches its lease drops it.
                Err(Error::Lost { .. } | Error::Expired { .. }) => continue,
                other => other?,
            };
            if let Some(g) = rec.and_then(|r| r.properties.get(PROP_MESSAGE_GROUP).cloned()) {
                c.restore(offset, Arc::from(g.as_str()));
            }
        }
        Ok(())
    }

    /// A topic to read from: a user topic (created on first use when allowed) or an existing
    /// internal one (a dead-letter queue).
    pub(super) fn topic_to_read(&self, name: &str) -> Result<Arc<Topic>> {
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

    /// Whether queue offset `offset` of `q` is a stored message, once everything written
    /// is visible: under an asynchronous flush policy a message written but not yet synced
    /// is not visible yet, and a replicated node applies an ack (or a nack's record) of a
    /// message right after the send that stored it (a whole log at once when it restarts).
    /// Syncs the store only when `offset` is past what is visible.
    pub(super) fn is_stored(&self, q: &ConsumeQueue, offset: u64) -> Result<bool> {
        if offset < q.len() {
            return Ok(true);
        }
        self.store.sync()?;
        Ok(offset < q.len())
    }

    pub(super) fn bad_ack(
        group: &str,
        t: &Topic,
        queue: u32,
        offset: u64,
        reason: String,
    ) -> Error {
        Error::BadAck {
            group: group.to_owned(),
            topic: t.name.clone(),
            queue,
            offset,
            reason,
        }
    }

    pub(super) fn acked_queue<'t>(
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

    /// The queue of a message named by (queue, offset), which must hold it (an ack, a
    /// decision or a record of one names only stored messages): [`Broker::acked_queue`]
    /// and [`Broker::is_stored`] together, with the same error for each.
    pub(super) fn stored_queue<'t>(
        &self,
        group: &str,
        t: &'t Topic,
        queue: u32,
        offset: u64,
    ) -> Result<&'t Arc<ConsumeQueue>> {
        let q = self.acked_queue(group, t, queue, offset)?;
        if !self.is_stored(q, offset)? {
            let why = format!("the queue has {} messages", q.len());
            return Err(Self::bad_ack(group, t, queue, offset, why));
        }
        Ok(q)
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
