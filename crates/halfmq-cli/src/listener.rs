//! What the broker's two TCP servers (the protocol in [`crate::server`], the metrics in
//! [`crate::metrics_http`]) do alike: bind an address, serve it from a background task until
//! told to stop, and keep accepting when one accept fails.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use halfmq::{Error, Result};

/// A listener served by a background task until [`Listening::shutdown`].
pub(crate) struct Listening {
    local: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// Bind `addr` and spawn `serve` with the listener and a receiver that changes when it
    /// is time to stop. A port that cannot be bound is an [`Error::Io`] naming the address
    /// and `op` (what the listener is for).
    pub(crate) async fn start<F, Fut>(addr: SocketAddr, op: &'static str, serve: F) -> Result<Self>
    where
        F: FnOnce(TcpListener, watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(addr.to_string(), op, e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io(addr.to_string(), op, e))?;
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, rx));
        Ok(Listening {
            local,
            shutdown,
            task,
        })
    }

    /// The address it listens on (useful with port 0).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Tell the task to stop, and wait until it has.
    pub(crate) async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// The public `local_addr` and `shutdown` of a server type whose field `listening` is its
/// [`Listening`], with the shutdown documented by the caller (what stopping means for it).
macro_rules! listening_server {
    ($server:ty, $(#[$shutdown_doc:meta])*) => {
        impl $server {
            /// The address it listens on (useful with port 0).
            pub fn local_addr(&self) -> std::net::SocketAddr {
                self.listening.local_addr()
            }

            $(#[$shutdown_doc])*
            pub async fn shutdown(self) {
                self.listening.shutdown().await;
            }
        }
    };
}
pub(crate) use listening_server;

/// The next connection, or `None` when accepting failed (out of file descriptors, a
/// connection reset before it was accepted): the failure is logged and the caller goes on
/// after a short pause, so that a persistent failure does not spin.
pub(crate) async fn accepted(
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    match accepted {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(error = %e, "{what}: accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}
