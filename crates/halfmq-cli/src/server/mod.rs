//! The network broker: a tokio accept loop serving an embedded [`Broker`].
//!
//! Each connection has a reader (frames in, one task per request so many can be in flight)
//! and a writer (frames out, from a bounded channel). Limits everywhere: frame size,
//! connections, requests in flight per connection, time to finish a started frame. Bad input
//! of any kind gets an error frame where possible and closes that one connection.
//!
//! A connection that registers as a checker for a producer group answers that group's
//! check-backs: the broker pushes a `Check` frame and waits for the `CheckAnswer` request.
//!
//! This file has the settings and the accept loop; `connection.rs` reads, answers and closes
//! one connection; `connection/handlers.rs` carries out each request on the broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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

mod connection;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod with_client;

/// Network settings.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

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
        }
    }
}

impl ServerConfig {
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
        if self.frame_timeout.is_zero() || self.hello_timeout.is_zero() {
            return Err(Error::Config {
                setting: "frame_timeout_ms",
                reason: "frame_timeout_ms and hello_timeout_ms must be > 0".into(),
            });
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
}

impl Server {
    /// Bind and start serving `broker`.
    pub async fn start(broker: Arc<Broker>, config: ServerConfig) -> Result<Server> {
        config.validate()?;
        let config = Arc::new(config);
        let listening = Listening::start(config.listen, "listen", |listener, stop| {
            accept_loop(listener, broker, config, stop)
        })
        .await?;
        Ok(Server { listening })
    }
}

listener::listening_server!(
    Server,
    /// Stop accepting, let every connection finish its in-flight requests, and wait.
);

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Some((stream, peer)) = listener::accepted(accepted, "broker").await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                if open.load(Ordering::Acquire) >= config.connections_max {
                    tracing::warn!(%peer, "refusing a connection: connections_max reached");
                    halfmq::metrics::connection_refused();
                    conns.spawn(refuse(stream, config.frame_bytes_max));
                    continue;
                }
                open.fetch_add(1, Ordering::AcqRel);
                halfmq::metrics::connection_opened();
                let (broker, config, open, shutdown) =
                    (broker.clone(), config.clone(), open.clone(), shutdown.clone());
                conns.spawn(async move {
                    if let Err(e) = serve_connection(stream, peer, broker, config, shutdown).await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    open.fetch_sub(1, Ordering::AcqRel);
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
