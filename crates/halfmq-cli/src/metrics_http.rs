//! The Prometheus endpoint: `GET /metrics` over plain HTTP/1.x on its own address
//! (`halfmq broker --metrics ADDR`).
//!
//! A deliberately small server: one request per connection (`Connection: close`), a request
//! head of at most 8 KiB that must arrive within 10 s, at most 8 scrapes at once (more are
//! closed unanswered). Each scrape first refreshes the state gauges from
//! [`Broker::stats`] on the blocking pool, then renders the recorder. It serves nothing but
//! metrics, and takes no token: bind it to an address only your monitoring can reach.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use halfmq::{Broker, Result};

use crate::listener::{self, Listening};

/// Largest request head read.
const HEAD_BYTES_MAX: usize = 8 * 1024;
/// A connection must have sent its request and taken the answer within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once.
const SCRAPES_MAX: usize = 8;
/// How often the recorder's upkeep (draining histogram samples) runs.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A running metrics endpoint.
pub struct MetricsServer {
    listening: Listening,
}

impl MetricsServer {
    /// Bind `addr` and serve `handle`'s metrics, with the gauges refreshed from `broker` at
    /// every scrape. `handle` must belong to the global recorder (the one
    /// [`halfmq::metrics::install`] returns), since that is where the gauges are set. A port
    /// that cannot be bound is an [`halfmq::Error::Io`] naming the address.
    pub async fn start(
        addr: SocketAddr,
        broker: Arc<Broker>,
        handle: PrometheusHandle,
    ) -> Result<MetricsServer> {
        let listening = Listening::start(addr, "listen for metrics", |listener, stop| {
            accept_loop(listener, broker, handle, stop)
        })
        .await?;
        Ok(MetricsServer { listening })
    }
}

listener::listening_server!(
    MetricsServer,
    /// Stop serving; scrapes in progress are cut.
);

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    handle: PrometheusHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(SCRAPES_MAX));
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = upkeep.tick() => handle.run_upkeep(),
            accepted = listener.accept() => {
                let Some((stream, peer)) = listener::accepted(accepted, "metrics").await else {
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "metrics: {SCRAPES_MAX} scrapes in progress; closing");
                    continue;
                };
                let (broker, handle) = (broker.clone(), handle.clone());
                conns.spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(REQUEST_TIMEOUT, serve(stream, &broker, &handle)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: connection failed"),
                        Err(_) => tracing::debug!(%peer, "metrics: request too slow; closed"),
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (or `HEAD`: the same without the body).
    Metrics { head_only: bool },
    /// Another path.
    NotFound,
    /// Another method.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line, or a head too long.
    BadRequest,
}

/// Route a request head (everything up to the blank line).
fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Route::BadRequest;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Route::BadRequest;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    if path == "/metrics" {
        Route::Metrics { head_only }
    } else {
        Route::NotFound
    }
}

/// Read until the end of the request head; `None` if it is too long or the peer stopped
/// sending first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() >= HEAD_BYTES_MAX {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Where the head ends (after the blank line), if it is complete.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

async fn serve(
    mut stream: TcpStream,
    broker: &Arc<Broker>,
    handle: &PrometheusHandle,
) -> std::io::Result<()> {
    let route = match read_head(&mut stream).await? {
        Some(head) => route(&head),
        None => Route::BadRequest,
    };
    let (status, content_type, body, head_only) = match route {
        Route::Metrics { head_only } => match scrape(broker, handle).await {
            Some(text) => ("200 OK", CONTENT_TYPE, text, head_only),
            None => (
                "500 Internal Server Error",
                "text/plain",
                "rendering the metrics failed\n".to_owned(),
                head_only,
            ),
        },
        Route::NotFound => (
            "404 Not Found",
            "text/plain",
            "not found: the metrics are at /metrics\n".to_owned(),
            false,
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "use GET\n".to_owned(),
            false,
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "text/plain",
            "bad request\n".to_owned(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Refresh the state gauges from the broker's stats, then render. `None` if rendering
/// panicked.
pub async fn scrape(broker: &Arc<Broker>, handle: &PrometheusHandle) -> Option<String> {
    let (broker, handle) = (broker.clone(), handle.clone());
    tokio::task::spawn_blocking(move || {
        match broker.stats() {
            Ok(s) => halfmq::metrics::record_stats(&s),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot refresh the gauges from the broker's stats");
                halfmq::metrics::stats_failed();
            }
        }
        handle.render()
    })
    .await
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            r("HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(r("GET  /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(
            route(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"),
            Route::BadRequest
        );
        assert_eq!(r(""), Route::BadRequest);
    }

    #[test]
    fn head_end() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b""), None);
    }
}
