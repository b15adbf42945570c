//! # halfmq
//!
//! A transactional message queue with an embedded, durable commit log.
//!
//! ## Guarantees, in plain words
//! - With the default flush policy ([`FlushPolicy::Sync`]), `send` returns only after the
//!   message is on disk (`fdatasync`). It survives `kill -9` and power loss. Many concurrent
//!   senders share one fsync (group commit).
//! - A message is visible to consumers only after it is acknowledged to its producer.
//! - On open, a torn tail (the unsynced end of the log after a crash) is detected by CRC and
//!   cut off; damage anywhere else is reported as [`Error::Corrupt`] naming the file and
//!   byte offset, never skipped.
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
//! ## Map of the crate
//! - [`broker`]: the embedded [`Broker`]: topics, `send`, consumer groups (`poll`, `ack`),
//!   retention (the floor of what is still needed, and the pass that deletes below it).
//! - [`store`]: the storage engine: commit-log segments, group commit, consume-queue
//!   indexes, recovery; [`store::io`] is the file layer, with a simulated disk for tests.
//! - [`record`]: the on-disk record format, encode and decode.
//! - [`meta`]: sled-backed topic configuration, consumer offsets and transaction state.
//! - [`net`]: the network broker: frames, protocol, server, client.
//! - [`txn`]: half messages, commit / rollback, check-back.
//! - [`idem`]: idempotency keys: a retried send with the same key is stored once.
//! - [`key_index`]: the on-disk hash index of message keys behind `trace`, derived from the
//!   log and kept by its own thread.
//! - [`trace`]: "where is my confirmation?": the event journal and the [`trace::Trace`]
//!   document of [`Broker::trace`].
//! - [`metrics`]: Prometheus metric names and recording helpers (no-ops without a recorder).
//! - [`config`]: settings with their defaults.
//! - [`error`]: the one typed [`Error`].
//! - [`bench`]: the load generator behind `halfmq bench`.
//! - `codec` (private): the one place bincode is used, always with a size limit.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod bench;
pub mod broker;
mod codec;
pub mod config;
pub mod delayed;
mod delivery;
pub mod error;
pub mod idem;
pub mod key_index;
pub mod meta;
pub mod metrics;
pub mod net;
pub mod record;
pub mod settings;
pub mod store;
pub mod trace;
pub mod txn;
mod worker;

pub use broker::{Broker, Delivery, HalfReceipt, Message, SendReceipt, Stats, TopicInfo};
pub use broker::{Pin, RetentionFloor, RetentionReport};
pub use config::{
    BrokerConfig, DeliveryConfig, FlushPolicy, RetentionConfig, StoreConfig, TxnConfig,
};
pub use error::{Error, Result};
pub use txn::{
    CheckAnswer, HalfMessage, HalfOptions, TransactionChecker, TxnId, TxnInfo, TxnState,
};
