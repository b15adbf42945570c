//! # halfmq-client
//!
//! The network side of halfmq that a client needs, with no storage engine and no sled:
//! - [`Client`]: one async, pipelined connection to a broker, with every operation of the
//!   embedded `Broker` under the same name and with the same types, and its role views
//!   ([`Producer`], [`TransactionalProducer`], [`Consumer`], [`Admin`]); concurrent sends
//!   to one topic are coalesced into batch requests under load (`batcher`);
//!   with several addresses it follows the leader of a replicated cluster (`follow`);
//! - [`Deliveries`]: a consumer as a [`Stream`](futures_core::Stream) of deliveries that ack
//!   or nack themselves ([`Consumer::stream`]);
//! - [`frame`]: the wire frame (length, CRC32, version, kind, correlation id) and its
//!   two-phase parse;
//! - [`protocol`]: requests, responses and pushes, one definition shared with the server.
//!
//! Messages, deliveries, receipts, statistics, transaction types and the one [`Error`] are
//! `halfmq-types`, the very types the embedded broker uses; they are re-exported here. A
//! broker's error comes back as the same [`Error`] variant it was on the broker
//! ([`Error::from_wire`]); [`Error::Timeout`] and [`Error::Disconnected`] are the client's
//! own.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod batcher;
pub mod client;
mod config;
mod connection;
mod follow;
pub mod frame;
pub mod protocol;
mod roles;
#[doc(hidden)]
pub mod stream;

pub use client::{Client, ClientConfig};
pub use halfmq_types::*;
pub use roles::deliveries::{Deliveries, Received, StreamOptions};
pub use roles::{Admin, Consumer, Producer, TransactionalProducer};
