//! # halfmq-rocketmq
//!
//! The RocketMQ 5 gRPC endpoint: `apache.rocketmq.v2.MessagingService` served in front of
//! the embedded halfmq [`Broker`](halfmq::Broker), so that applications written with the
//! official RocketMQ 5 clients (Java, Go, Python, Rust, Node, C#) work with halfmq by
//! pointing them at this endpoint. `halfmq broker --rocketmq-listen ADDR` starts it beside the
//! native listener, on the same broker: both see the same topics, groups and transactions.
//!
//! ```no_run
//! # async fn run(broker: std::sync::Arc<halfmq::Broker>) -> halfmq::Result<()> {
//! let endpoint = halfmq_rocketmq::RocketMqServer::start(broker, "127.0.0.1:8081".parse().unwrap()).await?;
//! // ... RocketMQ clients connect to endpoint.local_addr() ...
//! endpoint.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Modules
//! - `pb`: the protocol, generated at build time from `proto/` (written in this repository)
//!   without a system `protoc`;
//! - `server`: starting and stopping the endpoint ([`RocketMqServer`]);
//! - `pool`: the serving threads, a single-threaded runtime per core, each connection served
//!   on one of them by hyper's HTTP/2 server;
//! - `service`: the calls of producers and sessions (route, heartbeat, telemetry, sends,
//!   transaction ends) and the answers to what is not supported;
//! - `consume`: the consumer calls (receive, ack, change invisible duration, dead letters,
//!   assignment), on the broker's leases, receipts, tag filters and FIFO groups;
//! - `coalesce`: concurrent one-message sends of a topic joined into one broker batch;
//! - `clients`: the clients known, their telemetry streams, and the transaction check-back
//!   through them;
//! - `renew`: the lease renewal of messages received with `auto_renew`, while their client
//!   is alive;
//! - `convert`: RocketMQ messages to halfmq messages and back;
//! - `digest`: the MD5 body digest of the messages handed to clients;
//! - `status`: RocketMQ status codes, and halfmq errors as status codes.
//!
//! PROTOCOL.md ("RocketMQ 5 endpoint") documents the mapping call by call.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod pb {
    //! The protocol's types, client and server, generated from `proto/` at build time.
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("apache.rocketmq.v2");
}

mod clients;
mod coalesce;
mod consume;
pub mod convert;
mod digest;
mod pool;
mod renew;
mod server;
mod service;
mod status;

pub use clients::PRODUCER_GROUP;
pub use server::{RocketMqServer, REQUEST_BYTES_MAX};
