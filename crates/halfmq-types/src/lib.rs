//! # halfmq-types
//!
//! The vocabulary every halfmq crate speaks, so that the embedded broker (`halfmq`) and the
//! network client (`halfmq-client`) hand their users the very same types:
//!
//! - [`error`]: the one typed [`Error`], with a stable numeric [`Error::code`] per variant
//!   that crosses the wire; [`error::wire`] turns a code and text back into the same variant;
//! - [`message`]: [`Message`], [`Delivery`] and the receipts of sends;
//! - [`txn`]: transaction ids, states, check-back questions ([`HalfMessage`]) and answers;
//! - [`group`]: consumer-group settings, nack outcomes, dead letters;
//! - [`lease`]: what a poll asks for ([`PollOptions`]) and the [`Receipt`] of a lease;
//! - [`filter`]: tags, message groups and the [`TagFilter`] of a poll;
//! - [`stats`]: the figures of `Broker::stats` and the retention reports;
//! - [`trace`]: the trace document ("where is my confirmation?");
//! - [`props`]: every reserved property name and internal topic prefix;
//! - [`clock`]: wall-clock time behind a trait, so tests can move time by hand;
//! - [`codec`]: the one place bincode is used, always with a size limit;
//! - [`coalesce`]: the queue of one topic's concurrent sends that leave together (the
//!   client's automatic batching and the RocketMQ endpoint's coalescing), and with feature
//!   `lane` the lane its tasks share and its flusher's wait;
//! - [`counted`]: a guard that is one more in a shared count while it lives;
//! - `deliveries` (feature `stream`): a consumer as a `Stream` of deliveries that ack or nack
//!   themselves, over any `deliveries::Source` of deliveries: the embedded broker's
//!   consumer and the network client's share it.
//!
//! It depends on serde, thiserror and bincode only (and, with `stream`, on futures-core and
//! tokio's `sync` and `time`; with `lane`, on parking_lot and tokio's `sync` and `time`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

/// One `with_<field>` setter per setting of a configuration struct, so that a
/// `#[non_exhaustive]` config can still be built in one expression: each setter takes the
/// config, sets the field and returns it.
///
/// ```
/// #[derive(Default)]
/// #[non_exhaustive]
/// pub struct Config {
///     /// How many.
///     pub count: u32,
/// }
///
/// halfmq_types::with_setters! {
///     Config {
///         /// Sets [`Config::count`].
///         with_count => count: u32;
///     }
/// }
///
/// assert_eq!(Config::default().with_count(3).count, 3);
/// ```
#[macro_export]
macro_rules! with_setters {
    ($config:ty { $($(#[$doc:meta])* $with:ident => $field:ident: $ty:ty;)* }) => {
        impl $config {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $with(mut self, $field: $ty) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

pub mod clock;
pub mod coalesce;
pub mod codec;
pub mod counted;
#[cfg(feature = "stream")]
pub mod deliveries;
pub mod error;
pub mod filter;
pub mod group;
pub mod lease;
pub mod message;
pub mod props;
pub mod stats;
pub mod trace;
pub mod txn;

pub use error::{Error, Result};
pub use filter::TagFilter;
pub use group::{DeadLetter, DeliveryConfig, GroupDeleted, GroupSettings, NackOutcome, Replayed};
pub use lease::{PollOptions, Receipt};
pub use message::{
    validate_more_keys, DelayedReceipt, Delivery, Message, Properties, SendReceipt, TopicInfo,
    IDEMPOTENCY_KEY_BYTES_MAX, SEND_BATCH_BYTES_MAX, SEND_BATCH_MESSAGES_MAX,
};
pub use stats::{
    LogStats, MetaRecovery, OffsetReport, Pin, RetentionFloor, RetentionReport, Stats,
};
pub use trace::Trace;
pub use txn::{
    CheckAnswer, HalfMessage, HalfOptions, HalfReceipt, Outcome, TransactionChecker, TxnId,
    TxnInfo, TxnState,
};
