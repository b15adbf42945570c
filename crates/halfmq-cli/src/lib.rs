//! # halfmq-cli
//!
//! The `halfmq` binary's library half, so that tests drive the same code the binary runs:
//! - [`server`]: the network broker: accept loop, one task per request, check-back pushes,
//!   graceful shutdown;
//! - [`logs`]: the binary's log output and its default filter;
//! - [`metrics_http`]: the Prometheus endpoint;
//! - [`settings`]: every broker setting, defined once, read from its default, the TOML file,
//!   its `HALFMQ_*` environment variable and its flag, resolved into the broker's and the
//!   server's configuration;
//! - [`bench`](mod@bench): the load generator behind `halfmq bench`.
//!
//! `main.rs` parses the command line and hands each command to its module in `cmd/`, which
//! calls into these.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bench;
mod listener;
pub mod logs;
pub mod metrics_http;
pub mod server;
pub mod settings;
