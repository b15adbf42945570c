//! A consumer of one topic for one consumer group, as a [`Stream`](futures_core::Stream) of
//! deliveries that each ack or nack themselves: [`Consumer::stream`].
//!
//! The same shape as the network client's (`halfmq_client::Consumer`): the stream is
//! `halfmq-types`' [`Deliveries`](halfmq_types::deliveries::Deliveries), the items are
//! [`Received`] deliveries with `ack()` and `nack()`, the options are [`StreamOptions`]. A loop
//! over the stream reads the same embedded and over the network; only where the consumer
//! comes from differs.
//!
//! ```
//! use halfmq::{Broker, BrokerConfig, Consumer, Message, StreamOptions};
//! # fn main() -> halfmq::Result<()> {
//! # let dir = tempfile::tempdir().expect("a temporary directory");
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
//! # rt.block_on(async {
//! let broker = Broker::open(BrokerConfig::new(dir.path()))?;
//! broker.send_async("orders", &Message::new("created").with_key("order-42")).await?;
//!
//! let consumer = Consumer::new(broker.clone(), "billing", "orders");
//! let mut deliveries = consumer.stream(StreamOptions::default());
//! while let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     assert_eq!((delivery.key.as_str(), delivery.attempt), ("order-42", 1));
//!     delivery.ack().await?;
//!     break;
//! }
//! # drop(deliveries);
//! # drop(consumer);
//! broker.close()?;
//! # Ok(())
//! # })
//! # }
//! ```
//!
//! The stream asks the broker for a batch at a time ([`Broker::poll_wait_async`], which does
//! not block the executor's thread while it waits). At most
//! [`StreamOptions::in_flight_max`] deliveries are out at once (handed out, not yet acked,
//! nacked or dropped): at that bound it asks for nothing more until one is settled, so a slow
//! consumer does not lease messages it cannot get to before their visibility time-out. Acks
//! and nacks are [`Broker::ack_async`] and [`Broker::nack_async`]: durable when they return.

use std::sync::Arc;
use std::time::Duration;

use halfmq_types::deliveries::{self, Source};
use halfmq_types::{Delivery, NackOutcome, Result};

use crate::Broker;

pub use halfmq_types::deliveries::StreamOptions;

/// The messages of a [`Consumer`]'s topic for its group, as a
/// [`Stream`](futures_core::Stream) of [`Received`] deliveries (from [`Consumer::stream`]).
/// It never ends by itself; a failed poll is an `Err` item and the stream goes on. See
/// [`halfmq_types::deliveries::Deliveries`].
pub type Deliveries = deliveries::Deliveries<Consumer>;

/// A delivered message, from a [`Deliveries`] stream: it derefs to the [`Delivery`] and
/// settles itself with `ack()` or `nack()`. See [`halfmq_types::deliveries::Received`].
pub type Received = deliveries::Received<Consumer>;

/// Receives the messages of one topic for one consumer group of an embedded [`Broker`]: by
/// polling, or as a stream of deliveries that each ack or nack themselves
/// ([`Consumer::stream`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Consumer {
    broker: Arc<Broker>,
    group: Arc<str>,
    topic: Arc<str>,
}

impl Consumer {
    /// A consumer of `topic` in `group`. Names are checked by the first poll.
    pub fn new(broker: Arc<Broker>, group: &str, topic: &str) -> Consumer {
        let (group, topic) = (Arc::from(group), Arc::from(topic));
        Consumer {
            broker,
            group,
            topic,
        }
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The broker, for every operation.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Up to `max` messages, waiting up to `wait` for the first
    /// ([`Broker::poll_wait_async`]).
    pub async fn poll(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        Source::poll(self, max, wait).await
    }

    /// Acknowledge a delivered message ([`Broker::ack_async`]); durable when this returns.
    pub async fn ack(&self, delivery: &Delivery) -> Result<()> {
        Source::ack(self, delivery).await
    }

    /// Give back a delivered message ([`Broker::nack_async`]): delivered again after `delay`
    /// (or the group's retry backoff when `None`); past the group's maximum it moves to the
    /// dead-letter queue.
    pub async fn nack(&self, delivery: &Delivery, delay: Option<Duration>) -> Result<NackOutcome> {
        Source::nack(self, delivery, delay).await
    }

    /// The topic's messages as a stream of deliveries, each of which acks or nacks itself
    /// (see [`Deliveries`]).
    pub fn stream(&self, options: StreamOptions) -> Deliveries {
        Deliveries::new(self.clone(), options)
    }
}

/// The embedded source of a stream: the broker's async poll, ack and nack, none of which
/// blocks the executor's thread while it waits.
impl Source for Consumer {
    async fn poll(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let (group, topic) = (&*self.group, &*self.topic);
        (self.broker)
            .poll_wait_async(group, topic, max, usize::MAX, wait)
            .await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let Delivery { queue, offset, .. } = *delivery;
        let (group, topic) = (&*self.group, &*self.topic);
        self.broker.ack_async(group, topic, queue, offset).await
    }

    async fn nack(&self, delivery: &Delivery, delay: Option<Duration>) -> Result<NackOutcome> {
        let Delivery { queue, offset, .. } = *delivery;
        let (group, topic) = (&*self.group, &*self.topic);
        (self.broker)
            .nack_async(group, topic, queue, offset, delay)
            .await
    }
}

#[cfg(test)]
#[path = "consumer_tests.rs"]
mod tests;
