//! The network broker: wire frames, the protocol, the server and the async client; the
//! Prometheus endpoint.

pub mod client;
pub mod frame;
pub mod metrics_http;
pub mod protocol;
pub mod server;
mod stream;
