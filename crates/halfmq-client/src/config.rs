//! [`ClientConfig`]: where the broker is and how long to wait for it.
//!
//! It is `#[non_exhaustive]`, so that settings can be added without breaking anyone: build
//! it with [`ClientConfig::new`] (or `default()`) and the `with_<field>` setters, or change
//! its public fields.

use std::time::Duration;

use crate::frame::FRAME_BYTES_MAX_DEFAULT;

/// Client settings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Broker address. Default `127.0.0.1:10911`.
    pub addr: String,
    /// Shared secret, if the broker requires one.
    pub token: Option<String>,
    /// Name sent in the handshake, for the broker's logs. Default `halfmq-client`.
    pub name: String,
    /// Time-out of each request. Default 30 s. A long poll ([`crate::Client::poll_wait`])
    /// may take its wait longer.
    pub request_timeout: Duration,
    /// Time-out of connecting (and the handshake). Default 5 s.
    pub connect_timeout: Duration,
    /// Largest frame. Default 4 MiB.
    pub frame_bytes_max: u32,
    /// Longest wait between reconnect attempts. Default 5 s.
    pub reconnect_backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addr: "127.0.0.1:10911".into(),
            token: None,
            name: "halfmq-client".into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            reconnect_backoff_max: Duration::from_secs(5),
        }
    }
}

impl ClientConfig {
    /// The defaults, for the broker at `addr`.
    pub fn new(addr: impl Into<String>) -> ClientConfig {
        ClientConfig {
            addr: addr.into(),
            ..ClientConfig::default()
        }
    }
}

halfmq_types::with_setters! {
    ClientConfig {
        /// Sets [`ClientConfig::addr`].
        with_addr => addr: String;
        /// Sets [`ClientConfig::token`].
        with_token => token: Option<String>;
        /// Sets [`ClientConfig::name`].
        with_name => name: String;
        /// Sets [`ClientConfig::request_timeout`].
        with_request_timeout => request_timeout: Duration;
        /// Sets [`ClientConfig::connect_timeout`].
        with_connect_timeout => connect_timeout: Duration;
        /// Sets [`ClientConfig::frame_bytes_max`].
        with_frame_bytes_max => frame_bytes_max: u32;
        /// Sets [`ClientConfig::reconnect_backoff_max`].
        with_reconnect_backoff_max => reconnect_backoff_max: Duration;
    }
}
