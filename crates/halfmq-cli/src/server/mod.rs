//! The network broker: a tokio accept loop serving an embedded [`Broker`].
//!
//! Each connection has a reader (frames in, one task per request so many can be in flight)
//! and a writer (frames out, bounded in bytes). Limits everywhere: frame size, connections,
//! requests in flight per connection, bytes waiting to be written per connection, time to
//! finish a started frame, time a client may take no bytes, time with nothing to do. Bad
//! input of any kind gets an error frame where possible and closes that one connection.
//!
//! A connection that registers as a checker for a producer group answers that group's
//! check-backs: the broker pushes a `Check` frame and waits for the `CheckAnswer` request.
//!
//! This file has the settings and the accept loop; `connection.rs` reads, answers and closes
//! one connection; `connection/handlers.rs` carries out each request on the broker;
//! `outbox.rs` bounds what a connection has to write, in bytes and in time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use halfmq::{Broker, Error, Result};
use halfmq_client::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT};
use halfmq_client::protocol::{self, codes, Response};

use crate::listener::{self, Listening};
use connection::serve_connection;
use outbox::NetCounters;
pub use outbox::NetStats;

mod connection;
mod outbox;
mod replicated;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod with_client;

/// Network settings.
///
/// `#[non_exhaustive]`, so that settings can be added without breaking anyone: build it with
/// [`ServerConfig::new`] (or `default()`) and the `with_<field>` setters, or change its
/// public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on. Default 127.0.0.1:10911.
    pub listen: SocketAddr,
    /// Shared secret every connection must present in its `Hello`. Required for a
    /// non-loopback address.
    pub token: Option<String>,
    /// Largest frame accepted or sent. Default 4 MiB.
    pub frame_bytes_max: u32,
    /// Most connections at once. Default 1024.
    pub connections_max: usize,
    /// Most requests in flight on one connection. Default 64.
    pub in_flight_max: usize,
    /// A frame that has started must be complete within this. Default 30 s.
    pub frame_timeout: Duration,
    /// A connection must have sent its Hello within this. Default 10 s.
    pub hello_timeout: Duration,
    /// Most bytes of answers one connection may have waiting to be written, counting the
    /// room taken by requests being carried out (a poll takes `frame_bytes_max` before it
    /// hands anything out). At least `frame_bytes_max`. Default 16 MiB.
    pub out_bytes_max: usize,
    /// A connection whose client takes no bytes of its answers for this long is cut; what
    /// was delivered to it and not acked is delivered again after the visibility time-out.
    /// At shutdown, answers still queued get this long to be written. Default 30 s.
    pub write_timeout: Duration,
    /// An authenticated connection with nothing to do for this long is closed: no byte
    /// received, no request in flight (a waiting long poll is one), nothing to write, and no
    /// checker registered on it. Default 10 min.
    pub idle_timeout: Duration,
}

/// The default of [`ServerConfig::out_bytes_max`]: four frames of the default size.
pub const OUT_BYTES_MAX_DEFAULT: usize = 4 * FRAME_BYTES_MAX_DEFAULT as usize;

/// The largest [`ServerConfig::out_bytes_max`].
pub const OUT_BYTES_MAX_LIMIT: usize = 1 << 30;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 10911)),
            token: None,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            connections_max: 1024,
            in_flight_max: 64,
            frame_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            out_bytes_max: OUT_BYTES_MAX_DEFAULT,
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

halfmq_types::with_setters! {
    ServerConfig {
        /// Sets [`ServerConfig::listen`].
        with_listen => listen: SocketAddr;
        /// Sets [`ServerConfig::token`].
        with_token => token: Option<String>;
        /// Sets [`ServerConfig::frame_bytes_max`].
        with_frame_bytes_max => frame_bytes_max: u32;
        /// Sets [`ServerConfig::connections_max`].
        with_connections_max => connections_max: usize;
        /// Sets [`ServerConfig::in_flight_max`].
        with_in_flight_max => in_flight_max: usize;
        /// Sets [`ServerConfig::frame_timeout`].
        with_frame_timeout => frame_timeout: Duration;
        /// Sets [`ServerConfig::hello_timeout`].
        with_hello_timeout => hello_timeout: Duration;
        /// Sets [`ServerConfig::out_bytes_max`].
        with_out_bytes_max => out_bytes_max: usize;
        /// Sets [`ServerConfig::write_timeout`].
        with_write_timeout => write_timeout: Duration;
        /// Sets [`ServerConfig::idle_timeout`].
        with_idle_timeout => idle_timeout: Duration;
    }
}

impl ServerConfig {
    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            ..ServerConfig::default()
        }
    }

    /// Check the settings; a non-loopback address without a token is refused.
    pub fn validate(&self) -> Result<()> {
        if !self.listen.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Config {
                setting: "listen",
                reason: format!(
                    "{} is not a loopback address: set a token (--token or HALFMQ_TOKEN) so that \
                     only clients that know it can connect",
                    self.listen
                ),
            });
        }
        if self.frame_bytes_max < 64 * 1024 || self.frame_bytes_max > 64 * 1024 * 1024 {
            return Err(Error::Config {
                setting: "frame_bytes_max",
                reason: format!("{} is outside 64 KiB ..= 64 MiB", self.frame_bytes_max),
            });
        }
        if self.out_bytes_max < self.frame_bytes_max as usize
            || self.out_bytes_max > OUT_BYTES_MAX_LIMIT
        {
            return Err(Error::Config {
                setting: "out_bytes_max",
                reason: format!(
                    "{} is outside frame_bytes_max ({}) ..= 1 GiB",
                    self.out_bytes_max, self.frame_bytes_max
                ),
            });
        }
        for (setting, d) in [
            ("frame_timeout", self.frame_timeout),
            ("hello_timeout", self.hello_timeout),
            ("write_timeout", self.write_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config {
                    setting,
                    reason: "must be > 0".into(),
                });
            }
        }
        if self.connections_max == 0 || self.in_flight_max == 0 {
            return Err(Error::Config {
                setting: "connections_max",
                reason: "connections_max and in_flight_max must be > 0".into(),
            });
        }
        Ok(())
    }
}

/// A running server.
pub struct Server {
    listening: Listening,
    counters: Arc<NetCounters>,
}

impl Server {
    /// Bind and start serving `broker`.
    pub async fn start(broker: Arc<Broker>, config: ServerConfig) -> Result<Server> {
        Server::serve(broker, None, config).await
    }

    /// Bind and start serving `node`, one node of a replicated cluster: writes go through
    /// the cluster's log (a node that is not the leader answers with the leader's address),
    /// reads to the node's broker.
    pub async fn start_replicated(
        node: Arc<halfmq_raft::ReplicaNode>,
        config: ServerConfig,
    ) -> Result<Server> {
        Server::serve(node.broker(), Some(node), config).await
    }

    async fn serve(
        broker: Arc<Broker>,
        replica: Option<Arc<halfmq_raft::ReplicaNode>>,
        config: ServerConfig,
    ) -> Result<Server> {
        config.validate()?;
        let config = Arc::new(config);
        let counters = Arc::new(NetCounters::default());
        let serving = counters.clone();
        let listening = Listening::start(config.listen, "listen", |listener, stop| {
            accept_loop(listener, (broker, replica), config, serving, stop)
        })
        .await?;
        Ok(Server {
            listening,
            counters,
        })
    }

    /// The server's counters: bytes queued to be written, the most queued for one
    /// connection, connections cut by the write time-out or closed when idle.
    pub fn net_stats(&self) -> NetStats {
        self.counters.stats()
    }
}

listener::listening_server!(
    Server,
    /// Stop accepting, let every connection finish its in-flight requests (long polls end at
    /// once, empty) and write their answers, and wait. A connection whose client does not
    /// take its answers is cut `write_timeout` after the stop, so this returns in bounded
    /// time.
);

async fn accept_loop(
    listener: TcpListener,
    (broker, replica): (Arc<Broker>, Option<Arc<halfmq_raft::ReplicaNode>>),
    config: Arc<ServerConfig>,
    counters: Arc<NetCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Some((stream, peer)) = listener::accepted(accepted, "broker").await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let open = &counters.open;
                if open.load(Ordering::Acquire) >= config.connections_max {
                    tracing::warn!(%peer, "refusing a connection: connections_max reached");
                    halfmq::metrics::connection_refused();
                    let refused = refuse(stream, config.frame_bytes_max);
                    let limit = config.write_timeout;
                    conns.spawn(async move {
                        let _ = tokio::time::timeout(limit, refused).await;
                    });
                    continue;
                }
                open.fetch_add(1, Ordering::AcqRel);
                halfmq::metrics::connection_opened();
                let (node, config, counters, shutdown) =
                    ((broker.clone(), replica.clone()), config.clone(), counters.clone(), shutdown.clone());
                conns.spawn(async move {
                    let served =
                        serve_connection(stream, peer, node, config, counters.clone(), shutdown);
                    if let Err(e) = served.await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    counters.open.fetch_sub(1, Ordering::AcqRel);
                    halfmq::metrics::connection_closed();
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

async fn refuse(mut stream: TcpStream, frame_bytes_max: u32) {
    let resp = Response::Error {
        code: codes::TOO_MANY_CONNECTIONS,
        message: "too many connections".into(),
    };
    if let Ok(bytes) = encode_frame(FrameKind::Response, 0, &resp, frame_bytes_max) {
        let _ = stream.write_all(&bytes).await;
    }
}

fn encode_frame<T: serde::Serialize>(kind: FrameKind, id: u64, v: &T, max: u32) -> Result<Vec<u8>> {
    // Most answers are small (a `Sent` is about 40 bytes): one allocation, body in place.
    let mut out = Vec::with_capacity(128);
    frame::encode_with(&mut out, kind, id, max, |out| {
        protocol::encode_append(v, out)
    })?;
    Ok(out)
}

/// Run blocking broker work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> halfmq::Result<T> + Send + 'static,
) -> halfmq::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(halfmq::Error::Poisoned("a request handler panicked".into())))
}
