//! Poll: hand out messages of a topic to a consumer group, redeliveries that are due first,
//! each leased to its consumer for the group's visibility time-out (or the poll's own lease);
//! and the long poll that waits for messages (blocking or async). A poll's tag filter acks
//! what it skips; a FIFO group's scan holds back a message group's later messages.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::ms;
use crate::broker::wait::{block_on, Async, Blocking, Wait};
use crate::broker::{validate_group_name, Broker, Topic};
use crate::config::DeliveryConfig;
use crate::delivery::{Cursor, Lease, HELD};
use crate::meta::RetryState;
use halfmq_store::consume_queue::ConsumeQueue;
use halfmq_store::record::Record;
use halfmq_types::error::{Error, Result};
use halfmq_types::props::{PROP_MESSAGE_GROUP, PROP_TAG};
use halfmq_types::trace::Event;
use halfmq_types::{Delivery, PollOptions, Receipt};

/// The poll methods that are their options-taking twin (`$with`, whose last parameter is
/// `&PollOptions`) with [`PollOptions::default()`], each declared once by its parameters and
/// the twin it calls.
macro_rules! with_default_options {
    () => {};
    (
        $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $with:ident;
        $($rest:tt)*
    ) => {
        $(#[$doc])*
        pub fn $name(&self, $($arg: $ty),*) -> Result<Vec<Delivery>> {
            self.$with($($arg,)* &PollOptions::default())
        }

        with_default_options! { $($rest)* }
    };
    (
        $(#[$doc:meta])* async fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $with:ident;
        $($rest:tt)*
    ) => {
        $(#[$doc])*
        pub async fn $name(&self, $($arg: $ty),*) -> Result<Vec<Delivery>> {
            self.$with($($arg,)* &PollOptions::default()).await
        }

        with_default_options! { $($rest)* }
    };
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

fn delivery(
    t: &Topic,
    q: &ConsumeQueue,
    offset: u64,
    rec: Record,
    attempt: u32,
    receipt: Option<Receipt>,
) -> Delivery {
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
        receipt,
    }
}

/// What one poll of one queue gathers.
struct PollState<'a> {
    out: Vec<Delivery>,
    bytes: usize,
    max: usize,
    max_bytes: usize,
    /// (queue index, queue offset, lease) of messages to dead-letter.
    dead: Vec<(usize, u64, Lease)>,
    /// Trace events of keyed messages: (log offset, event).
    events: Vec<(u64, Event)>,
    /// What the poll asked for.
    opts: &'a PollOptions,
    /// Messages its filter skipped, to be acked for the group: (queue id, queue offset, log
    /// offset, whether the message has a key).
    filtered: Vec<(u32, u64, u64, bool)>,
    /// Deciding ([`Broker::poll_deciding`]): the failures found (time-outs, moves to the
    /// dead-letter queue), held and left for the caller to settle, instead of being
    /// recorded and redelivered (or moved) here.
    decided: Option<Vec<super::decide::Found>>,
}

/// How often a waiting poll of a FIFO group with messages waiting behind their message
/// group's head looks again.
const FIFO_RECHECK: Duration = Duration::from_millis(50);

/// The notice a waiting poll takes that a message of its group may fall due sooner.
type DueSooner = std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>;

/// Wait until the store's wait `woken` ends or the notice `sooner` comes.
async fn until_either<T>(woken: impl Future<Output = T>, mut sooner: DueSooner) {
    let mut woken = std::pin::pin!(woken);
    std::future::poll_fn(|cx| {
        if woken.as_mut().poll(cx).is_ready() || sooner.as_mut().poll(cx).is_ready() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Most messages one poll skips by its filter: a long run of them ends the poll early (with
/// what it has), and the next poll, which is not held back by waiting, goes on.
const FILTERED_MAX: usize = 4096;

impl PollState<'_> {
    fn full(&self) -> bool {
        self.out.len() >= self.max
    }

    /// Whether the poll's filter lets the message through; if not, it is noted to be acked.
    fn passes(&mut self, q: &ConsumeQueue, offset: u64, rec: &Record) -> bool {
        let tag = rec.properties.get(PROP_TAG).map(String::as_str);
        if self.opts.filter.matches(tag) {
            return true;
        }
        let keyed = !rec.key.is_empty();
        self.filtered
            .push((q.queue_id(), offset, rec.header.log_offset, keyed));
        false
    }

    /// Whether a delivery of `size` bytes still fits (the first always does).
    fn fits(&self, size: usize) -> bool {
        self.out.is_empty() || self.bytes + size <= self.max_bytes
    }
}

impl Broker {
    /// Up to `max` messages of `queue` of an existing topic from queue offset `from` on (from
    /// the queue's start when `from` is below it), read without delivering them: no group,
    /// no lease, nothing written. Each is attempt 0 and carries no receipt.
    pub fn browse(&self, topic: &str, queue: u32, from: u64, max: usize) -> Result<Vec<Delivery>> {
        let t = self
            .topics
            .read()
            .get(topic)
            .cloned()
            .ok_or_else(|| Error::UnknownTopic(topic.to_owned()))?;
        let q = t.queues.get(queue as usize).ok_or_else(|| Error::Invalid {
            what: "queue",
            reason: format!("topic `{topic}` has {} queues", t.queues.len()),
        })?;
        let read = self.store.read_messages(q, from.max(q.start()), max)?;
        let out = read.into_iter();
        Ok(out
            .map(|(o, rec)| delivery(&t, q, o, rec, 0, None))
            .collect())
    }

    with_default_options! {
        /// Hand out up to `max` messages of `topic` to `group`, from all queues: first messages
        /// whose redelivery is due (a lease that ran out, a nack whose delay passed), then ones
        /// never delivered. Each message goes to one consumer of the group and is leased to it
        /// for the group's visibility time-out: not acked by then, it is delivered again.
        /// Messages not acked are also delivered again after a restart (at-least-once).
        fn poll(group: &str, topic: &str, max: usize) => poll_with;

        /// [`Broker::poll`] that also stops before the messages' bytes (key, body,
        /// properties) would pass `max_bytes`; at least one message is returned when any is
        /// there.
        fn poll_limited(group: &str, topic: &str, max: usize, max_bytes: usize)
            => poll_limited_with;

        /// Like [`Broker::poll`], but waits up to `timeout` for a message when there is none.
        fn poll_wait(group: &str, topic: &str, max: usize, timeout: Duration) => poll_wait_with;

        /// [`Broker::poll_limited`] that waits up to `timeout` for a message without
        /// blocking the executor.
        async fn poll_wait_async(
            group: &str,
            topic: &str,
            max: usize,
            max_bytes: usize,
            timeout: Duration,
        ) => poll_wait_with_async;
    }

    /// [`Broker::poll`] with options: each message is leased for `opts.lease` instead of the
    /// group's visibility time-out, and only messages that pass `opts.filter` are handed out
    /// (the others are acked for the group; see [`PollOptions`]). A lease outside
    /// [`LEASE_MIN`](halfmq_types::lease::LEASE_MIN) ..=
    /// [`LEASE_MAX`](halfmq_types::lease::LEASE_MAX) is [`Error::Invalid`].
    pub fn poll_with(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        opts: &PollOptions,
    ) -> Result<Vec<Delivery>> {
        self.poll_limited_with(group, topic, max, usize::MAX, opts)
    }

    /// [`Broker::poll_limited`] with options ([`Broker::poll_with`]).
    pub fn poll_limited_with(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        max_bytes: usize,
        opts: &PollOptions,
    ) -> Result<Vec<Delivery>> {
        validate_group_name(group)?;
        opts.validate()?;
        let t = self.topic_to_read(topic)?;
        self.poll_group(group, &t, (max, max_bytes), opts, None)
            .map(|(out, _, _)| out)
    }

    /// The poll of [`Broker::poll_limited_with`]; deciding (`decided` is `Some`, see
    /// [`Broker::poll_deciding`]) it also returns the failures found and the acks its
    /// filter made.
    #[allow(clippy::type_complexity)]
    pub(super) fn poll_group(
        &self,
        group: &str,
        t: &Arc<Topic>,
        (max, max_bytes): (usize, usize),
        opts: &PollOptions,
        decided: Option<Vec<super::decide::Found>>,
    ) -> Result<(Vec<Delivery>, Vec<super::decide::Found>, Vec<(u32, u64)>)> {
        let gt = self.group_topic(group, t)?;
        let mut g = gt.lock();
        let now = self.lease_now();
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
            opts,
            filtered: Vec::new(),
            decided,
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
        // Skipped by the filter: acked for the group (not flushed: after a crash they are
        // looked at, and skipped, again).
        let mut filter_acks = Vec::new();
        if !st.filtered.is_empty() {
            let acks: Vec<(u32, u64)> = st.filtered.iter().map(|f| (f.0, f.1)).collect();
            if st.decided.is_some() {
                filter_acks = acks.clone();
            }
            match self.ack_apply(group, t, &mut g, &acks, false) {
                Ok(()) => {
                    let filter = opts.filter.to_string();
                    for &(_, _, log_offset, keyed) in &st.filtered {
                        if keyed {
                            let event = Event::Filtered {
                                group: group.to_owned(),
                                filter: filter.clone(),
                            };
                            st.events.push((log_offset, event));
                        }
                    }
                }
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
        // Dead letters found on the way are moved even when the poll failed later, without
        // the group's lock (their leases are held, never due, meanwhile). One that cannot be
        // moved now (say, the disk is full) gets its lease back, due at once, so the next poll
        // tries again; it is never dropped.
        drop(g);
        for (qi, offset, lease) in std::mem::take(&mut st.dead) {
            let moved =
                self.move_to_dead_letters(&Blocking, group, t, &gt, qi, offset, lease.clone());
            if let Err(e) = block_on(moved) {
                tracing::error!(group, topic = %t.name, offset, error = %e, "could not move a message to the dead-letter queue; will retry");
                let retry = Lease {
                    delivered: false,
                    due_ms: now,
                    ..lease
                };
                gt.lock().cursors[qi].release_held(offset, retry);
                if result.is_ok() && st.out.is_empty() {
                    result = Err(e);
                }
            }
        }
        crate::metrics::delivered(group, &t.name, st.out.len());
        for d in st.out.iter().filter(|d| !d.key.is_empty()) {
            let event = Event::Delivered {
                group: group.to_owned(),
                attempt: d.attempt,
            };
            st.events.push((d.log_offset, event));
        }
        self.trace_events(std::mem::take(&mut st.events));
        let decided = st.decided.take().unwrap_or_default();
        result.map(|()| (st.out, decided, filter_acks))
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
        let vt = ms(st.opts.lease.unwrap_or(delivery_cfg.visibility_timeout));
        // Lease the message at `offset` (of `size` bytes) to this poll, as `base` with a new
        // number running out `vt` from now, and hand it out as its `attempt`th delivery, with
        // the new lease's receipt.
        let hand_out = |st: &mut PollState,
                        c: &mut Cursor,
                        (offset, rec, size): (u64, Record, usize),
                        base: Lease,
                        attempt: u32| {
            st.bytes += size;
            let number = self.leases.number();
            let lease = Lease {
                due_ms: now.saturating_add(vt),
                delivered: true,
                number,
                lease_ms: vt,
                ..base
            };
            c.insert(offset, lease);
            let receipt = self
                .leases
                .receipt(group, &t.name, q.queue_id(), offset, number);
            st.out
                .push(delivery(t, q, offset, rec, attempt, Some(receipt)));
        };
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
                c.forget(offset, &lease);
                continue;
            }
            let timed_out = lease.delivered;
            if let Some(decided) = &mut st.decided {
                if timed_out || lease.failures > delivery_cfg.max_retries {
                    // Settled by the caller (through the cluster's log); held meanwhile.
                    let found = super::decide::Found::new(qi, offset, &lease, now, delivery_cfg);
                    decided.push(found);
                    let held = Lease {
                        due_ms: HELD,
                        delivered: false,
                        ..lease
                    };
                    c.insert(offset, held);
                    continue;
                }
            }
            if timed_out {
                lease.failures += 1;
                lease.reason = format!(
                    "not acked within the visibility time-out ({} ms)",
                    lease.lease_ms
                );
            }
            if lease.failures > delivery_cfg.max_retries {
                // Held (never due) until the move ends it, so the scan below skips it.
                c.insert(
                    offset,
                    Lease {
                        due_ms: HELD,
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
            let read = match self.store.read_message(q, offset) {
                // Lost to damage and quarantined by repair: nothing to deliver again.
                Err(Error::Lost { .. }) => Ok(None),
                other => other,
            };
            let Some(rec) = read? else {
                // Leases are only made for messages below the queue's length.
                tracing::warn!(topic = %t.name, queue = q.queue_id(), offset, "lease of a message past the end of its queue dropped");
                c.forget(offset, &lease);
                continue;
            };
            if !st.passes(q, offset, &rec) {
                // Held (never due) until the ack after the loop ends it.
                c.insert(
                    offset,
                    Lease {
                        due_ms: HELD,
                        delivered: false,
                        ..lease
                    },
                );
                continue;
            }
            if timed_out && !rec.key.is_empty() {
                let event = Event::Retried {
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
            let attempt = lease.failures + 1;
            hand_out(st, c, (offset, rec, size), lease, attempt);
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
                if !st.passes(q, offset, &rec) {
                    c.next = offset + 1;
                    if st.filtered.len() >= FILTERED_MAX {
                        break 'scan;
                    }
                    continue;
                }
                let size = delivery_size(&t.name, &rec);
                if !st.fits(size) {
                    stopped = true;
                    break 'scan;
                }
                // FIFO: one message of a message group out at a time; the others wait behind
                // it (in the cursor, not in the scan) until it is acked or dead-lettered.
                let fifo_group = delivery_cfg
                    .fifo
                    .then(|| rec.properties.get(PROP_MESSAGE_GROUP))
                    .flatten()
                    .map(|g| Arc::<str>::from(g.as_str()));
                c.next = offset + 1;
                if let Some(g) = &fifo_group {
                    if !c.admit(offset, g) {
                        continue;
                    }
                }
                let lease = Lease {
                    group: fifo_group,
                    ..Lease::default()
                };
                hand_out(st, c, (offset, rec, size), lease, 1);
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

    /// [`Broker::poll_wait`] with options ([`Broker::poll_with`]).
    pub fn poll_wait_with(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        timeout: Duration,
        opts: &PollOptions,
    ) -> Result<Vec<Delivery>> {
        let limits = (max, usize::MAX);
        block_on(self.poll_waiting(&Blocking, group, topic, limits, timeout, opts))
    }

    /// [`Broker::poll_wait_async`] with options ([`Broker::poll_with`]).
    pub async fn poll_wait_with_async(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        max_bytes: usize,
        timeout: Duration,
        opts: &PollOptions,
    ) -> Result<Vec<Delivery>> {
        let limits = (max, max_bytes);
        self.poll_waiting(&Async, group, topic, limits, timeout, opts)
            .await
    }

    /// The long poll of [`Broker::poll_wait_with`] and [`Broker::poll_wait_with_async`],
    /// waiting as `w` does: poll (at most `max` messages of at most `max_bytes`); while
    /// nothing came and `timeout` has not passed, wait until a poll may find a message
    /// ([`Broker::wait_plan`]) and poll again.
    async fn poll_waiting<W: Wait>(
        &self,
        w: &W,
        group: &str,
        topic: &str,
        (max, max_bytes): (usize, usize),
        timeout: Duration,
        opts: &PollOptions,
    ) -> Result<Vec<Delivery>> {
        let deadline = w.now() + timeout;
        loop {
            let got = self.poll_limited_with(group, topic, max, max_bytes, opts)?;
            let now = w.now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let sooner = self.due_sooner(group, topic)?;
            let (t, from, wait) = self.wait_plan(group, topic, deadline - now)?;
            until_either(w.wait_for_messages(&self.store, &t, &from, wait), sooner).await;
        }
    }

    /// Wait, handing nothing out, until a poll of `topic` by `group` may find a message (a
    /// new one past the group's scan position, or a redelivery falling due), or `timeout`
    /// passes. The network server waits with this before it makes room for a poll's answer,
    /// so that a waiting long poll holds none. The poll after it may still come back empty
    /// (another consumer of the group took the message).
    pub async fn wait_for_poll_async(
        &self,
        group: &str,
        topic: &str,
        timeout: Duration,
    ) -> Result<()> {
        validate_group_name(group)?;
        let sooner = self.due_sooner(group, topic)?;
        let (t, from, wait) = self.wait_plan(group, topic, timeout)?;
        until_either(
            Async.wait_for_messages(&self.store, &t, &from, wait),
            sooner,
        )
        .await;
        Ok(())
    }

    /// The group's notice that a message may fall due sooner than planned (a lease changed,
    /// a nack ended), on which an async long poll plans its wait again. Taken before the
    /// plan ([`Broker::wait_plan`]), so that a notice given after the plan is not lost.
    fn due_sooner(&self, group: &str, topic: &str) -> Result<DueSooner> {
        let t = self.topic_to_read(topic)?;
        let g = self.group_topic(group, &t)?;
        let mut sooner = Box::pin(g.lock().due_sooner.clone().notified_owned());
        sooner.as_mut().enable();
        Ok(sooner)
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
        let mut wait = match g.cursors.iter().filter_map(Cursor::next_due_ms).min() {
            // Wake a millisecond after it falls due.
            Some(due) => Duration::from_millis(due.saturating_sub(self.lease_now()) + 1).min(left),
            None => left,
        };
        // FIFO: an ack of a message group's head makes the next one due, and no new message
        // wakes the wait for it: look again soon.
        if g.cursors.iter().any(Cursor::has_blocked) {
            wait = wait.min(FIFO_RECHECK);
        }
        Ok((t, from, wait))
    }
}
