//! The network broker: wire frames, the protocol, the server and the async client.

pub mod client;
pub mod frame;
pub mod protocol;
pub mod server;
