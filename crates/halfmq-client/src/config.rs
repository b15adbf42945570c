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
    /// Broker address. Default `127.0.0.1:10911`. Several, comma-separated (`A,B,C`, the
    /// nodes of a replicated cluster): the client connects to the first that answers and
    /// follows the leader (a request refused with `NOT_LEADER` is made again on the leader
    /// it names; checkers register again on the new leader after a failover).
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
    /// Coalesce concurrent [`crate::Client::send`]s to one topic into `SendBatch` requests
    /// while a send of that topic is on the wire (each caller still gets its own receipt or
    /// error). A send with nothing on the wire before it leaves at once. Default on; needs a
    /// broker that knows `SendBatch`.
    pub auto_batch: bool,
    /// With [`ClientConfig::auto_batch`]: how long a queued send may wait for a send of its
    /// topic on the wire to be answered before its batch leaves anyway. Zero (the default):
    /// a batch leaves once the tasks ready to send at the same moment have queued theirs
    /// (one pass of the executor), never waiting for an answer.
    pub batch_linger: Duration,
    /// With [`ClientConfig::auto_batch`]: a batch leaves at once when it holds this many
    /// messages. Default 256 (at most `SEND_BATCH_MESSAGES_MAX`).
    pub batch_messages_max: usize,
    /// With [`ClientConfig::auto_batch`]: a batch leaves at once when its messages carry
    /// this many bytes ([`halfmq_types::Message::payload_bytes`]). Default 1 MiB (at most
    /// `SEND_BATCH_BYTES_MAX`, and a quarter of [`ClientConfig::frame_bytes_max`]).
    pub batch_bytes_max: usize,
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
            auto_batch: true,
            batch_linger: Duration::ZERO,
            batch_messages_max: 256,
            batch_bytes_max: 1024 * 1024,
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
        /// Sets [`ClientConfig::auto_batch`].
        with_auto_batch => auto_batch: bool;
        /// Sets [`ClientConfig::batch_linger`].
        with_batch_linger => batch_linger: Duration;
        /// Sets [`ClientConfig::batch_messages_max`].
        with_batch_messages_max => batch_messages_max: usize;
        /// Sets [`ClientConfig::batch_bytes_max`].
        with_batch_bytes_max => batch_bytes_max: usize;
    }
}
