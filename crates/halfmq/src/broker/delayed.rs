//! Delayed sends, and the timer thread, owned by the broker, that delivers them when they
//! are due (the index of pending ones is `crate::delayed`).

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::wait::{blocking_and_async, Hook, Wait};
use super::{required_prop, Broker, Topic};
use crate::delayed::DelayedIndex;
use crate::meta::DelayedInfo;
use halfmq_store::record::{self, RecordKind, RecordView, FLAG_DELAYED_FIRE};
use halfmq_store::worker::Worker;
use halfmq_store::{Append, DurableHook};
use halfmq_types::error::{Error, Result};
use halfmq_types::props::{PROP_DELAYED, PROP_DELIVER_AT_MS, PROP_IDEMPOTENCY_KEY};
use halfmq_types::{DelayedReceipt, Message};

/// Farthest a message can be delayed: 90 days.
pub const DELAY_MAX: Duration = Duration::from_secs(90 * 24 * 3600);

/// The index entry of a `Delayed` record (recovery replays it).
pub(super) fn delayed_info_of(view: &RecordView<'_>) -> Result<DelayedInfo> {
    let deliver_at_ms = required_prop(
        view,
        PROP_DELIVER_AT_MS,
        "delayed message without a delivery time",
    )?;
    Ok(DelayedInfo {
        id: view.header.log_offset,
        size: record::encoded_len(view.topic, view.key, view.props, view.body).unwrap_or_default(),
        topic: view.topic.to_owned(),
        queue: view.header.queue_id,
        key: view.key.to_owned(),
        deliver_at_ms,
    })
}

/// Why a fire record without the delayed message it delivers is damaged.
const NO_DELAYED: &str = "delayed delivery record without the delayed message's id";

/// The delayed message a fire record delivers, from its properties.
pub(super) fn delayed_of(view: &RecordView<'_>) -> Result<u64> {
    required_prop(view, PROP_DELAYED, NO_DELAYED)
}

impl Broker {
    blocking_and_async! {
        /// Store a message durably now and deliver it to its topic at `deliver_at_ms` (ms
        /// since the Unix epoch; a time in the past means at once), at most [`DELAY_MAX`]
        /// ahead. Until then no consumer sees it; it is delivered also after a restart or a
        /// crash.
        fn send_delayed;
        /// [`Broker::send_delayed`] for async code.
        async fn send_delayed_async;
        (&self, topic: &str, msg: &Message, deliver_at_ms: u64) -> Result<DelayedReceipt>;
        send_delayed_with(topic, msg, deliver_at_ms)
    }

    /// The one path of a delayed send: a `Delayed` record, synced whatever the flush policy,
    /// indexed by its hook once durable.
    async fn send_delayed_with<W: Wait>(
        &self,
        w: &W,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<DelayedReceipt> {
        let (t, qi, props, size) = self.prepare_delayed(topic, msg, deliver_at_ms)?;
        // A key already stored answers with the original delayed message (nothing is stored
        // again, whatever this send's delivery time).
        let reservation = match self
            .claim_or_original(w, RecordKind::Delayed, (&t.name, &msg.properties), |rec| {
                (rec.header.log_offset, rec.header.queue_id, rec.properties)
            })
            .await?
        {
            Ok(reservation) => reservation,
            Err((id, queue, props)) => {
                return Ok(DelayedReceipt {
                    id,
                    topic: t.name.clone(),
                    queue,
                    deliver_at_ms: props
                        .get(PROP_DELIVER_AT_MS)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_default(),
                });
            }
        };
        let hook = self.delayed_hook(&t, qi, msg, deliver_at_ms, size);
        let a = t.append(
            qi,
            RecordKind::Delayed,
            (&msg.key, &props, &msg.body),
            self.now(),
        );
        let hook = Self::with_reservation(&a, hook, reservation);
        let appended = w.append(&self.store, a, Hook::Durable(hook)).await?;
        Ok(DelayedReceipt {
            id: appended.log_offset,
            topic: t.name.clone(),
            queue: t.queues[qi].queue_id(),
            deliver_at_ms,
        })
    }

    fn prepare_delayed(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<(Arc<Topic>, usize, Vec<u8>, u32)> {
        let max = self.now() + DELAY_MAX.as_millis() as u64;
        if deliver_at_ms > max {
            return Err(Error::Invalid {
                what: "delivery time",
                reason: format!(
                    "{deliver_at_ms} is more than {} days ahead",
                    DELAY_MAX.as_secs() / 86_400
                ),
            });
        }
        let (t, qi, _) = self.prepare_send(topic, msg)?;
        let mut props = msg.properties.clone();
        props.insert(PROP_DELIVER_AT_MS.into(), deliver_at_ms.to_string());
        let props = record::encode_properties(&props)?;
        let size = record::encoded_len(&t.name, &msg.key, &props, &msg.body).map_err(|reason| {
            Error::Invalid {
                what: "message",
                reason,
            }
        })?;
        Ok((t, qi, props, size))
    }

    /// Index the delayed message once its record is durable, and wake the timer.
    fn delayed_hook(
        &self,
        t: &Topic,
        qi: usize,
        msg: &Message,
        deliver_at_ms: u64,
        size: u32,
    ) -> DurableHook {
        let index = self.delayed.clone();
        let wake = self.delay_thread.lock().as_ref().map(|d| d.sender());
        let mut info = DelayedInfo {
            id: 0,
            size,
            topic: t.name.clone(),
            queue: t.queues[qi].queue_id(),
            key: msg.key.clone(),
            deliver_at_ms,
        };
        Box::new(move |log_offset| {
            info.id = log_offset;
            index.insert(info);
            if let Some(tx) = wake {
                let _ = tx.send(Msg::Wake);
            }
        })
    }

    pub(crate) fn delayed_index(&self) -> &DelayedIndex {
        &self.delayed
    }

    /// Deliver a delayed message that is due: a `Message` record in its queue, durable,
    /// after which it is no longer pending.
    pub(crate) fn deliver_delayed(&self, d: &DelayedInfo) -> Result<()> {
        let rec = self.store.read_at(d.id, d.size)?;
        let t = self.topic(&d.topic)?;
        let qi = (d.queue as usize).min(t.queues.len() - 1);
        let mut props = rec.properties;
        props.remove(PROP_DELIVER_AT_MS);
        // The idempotency key belonged to the delayed send (its own scope); the delivered
        // message does not claim it again among plain sends.
        props.remove(PROP_IDEMPOTENCY_KEY);
        props.insert(PROP_DELAYED.into(), d.id.to_string());
        let props = record::encode_properties(&props)?;
        let a = Append {
            flags: FLAG_DELAYED_FIRE,
            ..t.append(
                qi,
                RecordKind::Message,
                (&rec.key, &props, &rec.body),
                self.now(),
            )
        };
        let (index, id) = (self.delayed.clone(), d.id);
        self.store
            .append_hooked(a, Some(Box::new(move |_| index.fired(id))))?;
        Ok(())
    }

    /// The ids of up to `max` delayed messages due at `now_ms` (ms since the Unix epoch),
    /// soonest first: for a timer outside the broker (a replicated cluster's leader, whose
    /// nodes run no timer thread, [`crate::BrokerConfig::delayed_timer`]), which fires them
    /// with [`Broker::fire_delayed`].
    pub fn due_delayed(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.delayed.due_ids(now_ms, max)
    }

    /// Deliver delayed message `id` now, at the broker's clock, if it is still waiting:
    /// true when it was delivered by this call, false when it was delivered (or taken to
    /// be) before, or is unknown. So a message is fired once however often it is asked.
    pub fn fire_delayed(&self, id: u64) -> Result<bool> {
        let Some(d) = self.delayed.take(id) else {
            return Ok(false);
        };
        self.deliver_delayed(&d)?;
        Ok(true)
    }

    /// Delayed messages not delivered yet.
    pub fn delayed_pending(&self) -> u64 {
        self.delayed.pending()
    }
}

/// Messages to the timer thread.
pub(crate) enum Msg {
    /// Something may be due earlier than planned.
    Wake,
    /// Run a round now and say when it is done ([`Broker::run_due_now`]).
    Round(Sender<()>),
    /// Shut down.
    Stop,
}

/// The running timer thread.
pub(crate) type DelayThread = Worker<Msg>;

/// The longest the timer sleeps, so that it notices a dropped broker promptly.
const IDLE_MAX: Duration = Duration::from_millis(500);
/// Wait before retrying a delivery that failed (say, on a full disk).
const RETRY_AFTER_MS: u64 = 1000;
/// Deliveries per round, so that a stop request is noticed between rounds.
const ROUND_MAX: usize = 1024;

/// Start the timer thread of `broker`.
pub(crate) fn spawn(broker: Weak<Broker>) -> Result<DelayThread> {
    Worker::spawn("halfmq-delayed", || Msg::Stop, move |rx, _| run(broker, rx))
}

fn run(broker: Weak<Broker>, rx: Receiver<Msg>) {
    let mut rounds: Vec<Sender<()>> = Vec::new();
    loop {
        let sleep = {
            let Some(b) = broker.upgrade() else {
                return;
            };
            let now = b.now();
            let due = b.delayed_index().take_due(now, ROUND_MAX);
            let full = due.len() == ROUND_MAX;
            for d in due {
                if let Err(e) = b.deliver_delayed(&d) {
                    tracing::error!(id = d.id, topic = %d.topic, error = %e, "could not deliver a delayed message; will retry");
                    b.delayed_index().retry(&d, now + RETRY_AFTER_MS);
                    if matches!(e, Error::Closed | Error::Poisoned(_)) {
                        // The store will not take writes again: stop trying.
                        return;
                    }
                }
            }
            if full {
                Duration::ZERO
            } else {
                match b.delayed_index().next_due_ms() {
                    Some(at) => Duration::from_millis(at.saturating_sub(b.now())).min(IDLE_MAX),
                    None => IDLE_MAX,
                }
            }
        };
        for done in rounds.drain(..) {
            let _ = done.send(());
        }
        match rx.recv_timeout(sleep) {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Msg::Round(done)) => rounds.push(done),
            Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
        }
    }
}
