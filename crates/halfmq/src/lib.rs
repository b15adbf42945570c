//! # halfmq
//!
//! A transactional message queue with an embedded, durable commit log.
//!
//! ## Guarantees, in plain words
//! - With the default flush policy ([`FlushPolicy::Sync`]), `send` returns only after the
//!   message is on disk (`fdatasync`). It survives `kill -9` and power loss. Many concurrent
//!   senders share one fsync (group commit).
//! - A message is visible to consumers only after it is acknowledged to its producer and
//!   durable, under every flush policy (under [`FlushPolicy::Async`], after the sync that
//!   follows the acknowledgement).
//! - On open, a torn tail (the unsynced end of the log after a crash) is detected by CRC and
//!   cut off; damage to acknowledged records is reported as [`Error::Damaged`] naming the
//!   file and byte offset, never skipped: on open for the newest segment (re-read in full),
//!   by the read that reaches it for older ones. A damaged consume-queue entry is rebuilt
//!   from the log by the read that finds it.
//! - A consumer's `ack` is durable when it returns; after a restart the group resumes after
//!   its acked messages. Delivery is at-least-once: what was handed out but not acked is
//!   delivered again.
//! - Retention is off by default. With a size or age limit
//!   ([`RetentionConfig`]), whole old segments are deleted only once every consumer group
//!   that polled the topic acked past them and no pending half, delayed message, un-replayed
//!   dead letter or remembered idempotency key needs them ([`Broker::enforce_retention`]).
//!
//! ## Example: the payment confirmation
//!
//! ```
//! use halfmq::{Broker, BrokerConfig, HalfOptions, Message};
//! # fn main() -> halfmq::Result<()> {
//! # let dir = tempfile::tempdir().expect("a temporary directory");
//! let broker = Broker::open(BrokerConfig::new(dir.path()))?;
//!
//! // The payment service writes the confirmation as a half message: stored, invisible.
//! let msg = Message::new("paid 12.50").with_key("order-42");
//! let txn = broker.send_half("payments", &msg, "payment-service", HalfOptions::default())?;
//! assert!(broker.poll("order-service", "payments", 10)?.is_empty());
//!
//! // The card is charged: commit makes it visible, exactly once.
//! broker.commit(txn)?;
//! let got = broker.poll("order-service", "payments", 10)?;
//! assert_eq!((got.len(), got[0].key.as_str()), (1, "order-42"));
//!
//! // The order service applies it (idempotently, by key) and acks: durable progress.
//! broker.ack("order-service", "payments", got[0].queue, got[0].offset)?;
//! broker.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! ## The public API
//! - [`Broker`]: topics, `send` and `send_batch` (many messages, one group commit),
//!   transactions (`send_half`, `commit`, `rollback`, checkers),
//!   delayed delivery, consumer groups (`poll`, `ack`, `nack`, dead letters), retention,
//!   [`Broker::trace`] and [`Broker::stats`]. The message path has async twins that never
//!   block an executor thread while they wait: [`Broker::send_async`],
//!   [`Broker::send_batch_async`],
//!   [`Broker::send_delayed_async`], [`Broker::send_half_async`], [`Broker::commit_async`],
//!   [`Broker::rollback_async`], [`Broker::poll_wait_async`], [`Broker::ack_async`],
//!   [`Broker::nack_async`]. A twin runs the same code as its blocking method; only the
//!   waiting differs.
//! - [`Consumer`]: one consumer group on one topic, by polling or as a
//!   [`Stream`](futures_core::Stream) of [`Received`] deliveries that ack or nack themselves
//!   ([`Consumer::stream`]): the same types and methods as the network client's consumer.
//! - [`BrokerConfig`] and its parts ([`TxnConfig`], [`DeliveryConfig`], [`RetentionConfig`],
//!   [`StoreConfig`]): `#[non_exhaustive]`, with `with_*` setters. [`BrokerConfig::clock`]
//!   takes a [`ManualClock`] in tests.
//! - The types shared with the network client (`halfmq-types`, re-exported here):
//!   [`Message`], [`Delivery`], the receipts, the transaction types, [`Error`], [`Stats`], the
//!   [`trace`] document, the reserved property names ([`props`]).
//! - [`metrics`]: Prometheus metric names and recording helpers (no-ops without a
//!   recorder); [`config`]: the settings with their defaults.
//!
//! The storage engine is the `halfmq-store` crate ([`Broker::store`] hands it out, for tools);
//! everything else in this crate is private: the metadata in sled, the indexes of pending
//! halves, delayed messages and idempotency keys, the leases of consumer groups, the trace
//! event journal, and the broker's own threads (see `ARCHITECTURE.md` for the map).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

mod broker;
mod checkers;
pub mod config;
mod consumer;
mod delayed;
mod delivery;
mod idem;
mod journal;
mod meta;
pub mod metrics;
mod schedule;
mod txn;

pub use broker::{
    check_batch, dead_letter_topic, Broker, Decided, DeliveredLease, Polled, Settlement,
    StagedSend, DELAY_MAX,
};
pub use checkers::{Checkers, NO_LIVE_PRODUCER};
pub use config::{
    BrokerConfig, ClockSetting, DeliveryConfig, RetentionConfig, TxnConfig, QUEUES_MAX,
};
pub use consumer::{Consumer, Deliveries, Received, StreamOptions};
pub use halfmq_store::{FlushPolicy, RecoveryReport, StoreConfig};
pub use halfmq_types::clock::{self, Clock, ManualClock, SharedClock, SystemClock};
pub use halfmq_types::{error, filter, lease, props, stats, trace};
pub use halfmq_types::{
    CheckAnswer, DeadLetter, DelayedReceipt, Delivery, Error, GroupDeleted, GroupSettings,
    HalfMessage, HalfOptions, HalfReceipt, Message, NackOutcome, PollOptions, Properties, Receipt,
    Replayed, Result, SendReceipt, TagFilter, TopicInfo, TransactionChecker, TxnId, TxnInfo,
    TxnState, IDEMPOTENCY_KEY_BYTES_MAX, SEND_BATCH_BYTES_MAX, SEND_BATCH_MESSAGES_MAX,
};
pub use halfmq_types::{
    LogStats, MetaRecovery, OffsetReport, Pin, RetentionFloor, RetentionReport, Stats, Trace,
};
