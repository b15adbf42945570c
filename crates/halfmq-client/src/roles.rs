//! Thin views of a [`Client`] for the usual roles: they fix the producer group, or the
//! consumer group and topic, and forward to the client's methods.

use std::sync::Arc;
use std::time::Duration;

pub mod deliveries;

use crate::Client;
use deliveries::{Deliveries, StreamOptions};
use halfmq_types::error::Result;
use halfmq_types::{
    DelayedReceipt, Delivery, HalfOptions, HalfReceipt, Message, NackOutcome, SendReceipt,
    TransactionChecker, TxnId,
};

/// Sends messages.
#[derive(Debug, Clone)]
pub struct Producer {
    client: Client,
}

impl Producer {
    /// A producer on `client`.
    pub fn new(client: Client) -> Producer {
        Producer { client }
    }

    /// Store a message durably; the receipt says where. Concurrent sends to one topic are
    /// coalesced into batch requests under load ([`ClientConfig::auto_batch`]).
    ///
    /// [`ClientConfig::auto_batch`]: crate::ClientConfig::auto_batch
    pub async fn send(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        self.client.send(topic, msg).await
    }

    /// Store many messages to one topic in one request: one group commit on the broker,
    /// each message with its own receipt or error ([`Client::send_batch`]).
    pub async fn send_batch(
        &self,
        topic: &str,
        msgs: &[Message],
    ) -> Result<Vec<Result<SendReceipt>>> {
        self.client.send_batch(topic, msgs).await
    }

    /// Store a message durably now, to be delivered at `deliver_at_ms`.
    pub async fn send_delayed(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<DelayedReceipt> {
        self.client.send_delayed(topic, msg, deliver_at_ms).await
    }
}

/// Writes half messages, commits or rolls them back, and answers check-backs for its group.
#[derive(Debug, Clone)]
pub struct TransactionalProducer {
    client: Client,
    group: String,
}

impl TransactionalProducer {
    /// A transactional producer of `group`, answering its check-backs with `checker`.
    pub async fn new(
        client: Client,
        group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<Self> {
        client.register_checker(group, checker).await?;
        Ok(TransactionalProducer {
            client,
            group: group.to_owned(),
        })
    }

    /// Write a half message.
    pub async fn send_half(&self, topic: &str, msg: &Message, opts: HalfOptions) -> Result<TxnId> {
        self.client.send_half(topic, msg, &self.group, opts).await
    }

    /// Write a half message; says whether it was a duplicate of an idempotency key.
    pub async fn send_half_receipt(
        &self,
        topic: &str,
        msg: &Message,
        opts: HalfOptions,
    ) -> Result<HalfReceipt> {
        self.client
            .send_half_receipt(topic, msg, &self.group, opts)
            .await
    }

    /// Commit.
    pub async fn commit(&self, txn: TxnId) -> Result<()> {
        self.client.commit(txn).await
    }

    /// Roll back.
    pub async fn rollback(&self, txn: TxnId) -> Result<()> {
        self.client.rollback(txn).await
    }
}

/// Receives the messages of one topic for one consumer group: by polling, or as a
/// [`Stream`](futures_core::Stream) of deliveries that each ack or nack themselves
/// ([`Consumer::stream`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Consumer {
    client: Client,
    group: Arc<str>,
    topic: Arc<str>,
}

impl Consumer {
    /// A consumer of `topic` in `group`.
    pub fn new(client: Client, group: &str, topic: &str) -> Consumer {
        Consumer {
            client,
            group: group.into(),
            topic: topic.into(),
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

    /// The client, for every operation.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Up to `max` messages, waiting up to `wait` for the first ([`Client::poll_wait`]).
    pub async fn poll(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.client
            .poll_wait(&self.group, &self.topic, max, wait)
            .await
    }

    /// Acknowledge a delivered message.
    pub async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let (q, o) = (delivery.queue, delivery.offset);
        self.client.ack(&self.group, &self.topic, q, o).await
    }

    /// Acknowledge delivered messages with one durable write.
    pub async fn ack_many(&self, deliveries: &[Delivery]) -> Result<()> {
        let acks: Vec<(u32, u64)> = deliveries.iter().map(|d| (d.queue, d.offset)).collect();
        self.client.ack_many(&self.group, &self.topic, &acks).await
    }

    /// Give back a delivered message: delivered again after `delay` (or the group's retry
    /// backoff when `None`); past the group's maximum it moves to the dead-letter queue.
    pub async fn nack(&self, delivery: &Delivery, delay: Option<Duration>) -> Result<NackOutcome> {
        let (q, o) = (delivery.queue, delivery.offset);
        self.client
            .nack(&self.group, &self.topic, q, o, delay)
            .await
    }

    /// The topic's messages as a stream of deliveries, each of which acks or nacks itself
    /// (see [`Deliveries`]).
    pub fn stream(&self, options: StreamOptions) -> Deliveries {
        Deliveries::new(self.clone(), options)
    }
}

/// Topics, statistics and transactions.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    /// An admin view of `client`.
    pub fn new(client: Client) -> Admin {
        Admin { client }
    }

    /// The client, for every operation.
    pub fn client(&self) -> &Client {
        &self.client
    }
}
