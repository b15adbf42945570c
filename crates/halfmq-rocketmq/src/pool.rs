//! The threads serving the endpoint's connections: one single-threaded tokio runtime per
//! core, each accepted connection handed to one of them and served there to its end (its
//! HTTP/2 connection task, its streams' tasks and the endpoint's work for them). On one
//! thread a connection's answers ready together are written together, and no other thread
//! is woken to run a stream's task (measured in README.md, "Coming from RocketMQ").

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

use crate::pb::messaging_service_server::MessagingServiceServer;
use crate::service::Service;

/// One serving thread, as the endpoint sees it.
struct Worker {
    /// Sent (or dropped): stop accepting, end the connections gracefully.
    stop: Option<oneshot::Sender<()>>,
    /// Answered once its server has stopped (all its connections closed).
    served: Option<oneshot::Receiver<()>>,
    /// Dropped: end the thread, dropping whatever task it still runs.
    release: Option<oneshot::Sender<()>>,
    /// Answered once the thread's runtime is shut down, its tasks dropped.
    gone: Option<oneshot::Receiver<()>>,
}

/// The serving threads.
pub(crate) struct Pool {
    workers: Vec<Worker>,
}

/// Where accepted connections go: each serving thread's queue of connections to serve,
/// and its count of open connections (accepted, not yet closed).
#[derive(Clone)]
pub(crate) struct Spread {
    threads: Vec<(mpsc::UnboundedSender<TcpStream>, Arc<AtomicUsize>)>,
}

/// A connection counted as open by its worker until dropped (the count is raised when the
/// connection is handed over, so that one queued for the thread counts too).
struct Counted {
    open: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// Start `threads` (at least one) serving threads, each serving `grpc` on the
    /// connections it is handed.
    pub(crate) fn start(
        threads: usize,
        grpc: &MessagingServiceServer<Service>,
    ) -> io::Result<(Pool, Spread)> {
        let mut workers = Vec::new();
        let mut spread = Vec::new();
        for index in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (conns, conns_rx) = mpsc::unbounded_channel();
            let (stop, stop_rx) = oneshot::channel();
            let (served_tx, served) = oneshot::channel();
            let (release, release_rx) = oneshot::channel::<()>();
            let (gone_tx, gone) = oneshot::channel();
            let open = Arc::new(AtomicUsize::new(0));
            let grpc = grpc.clone();
            let counter = open.clone();
            std::thread::Builder::new()
                .name(format!("halfmq-rq-{index}"))
                .spawn(move || {
                    run(
                        runtime,
                        (grpc, conns_rx, counter),
                        stop_rx,
                        served_tx,
                        release_rx,
                    );
                    let _ = gone_tx.send(());
                })?;
            spread.push((conns, open));
            workers.push(Worker {
                stop: Some(stop),
                served: Some(served),
                release: Some(release),
                gone: Some(gone),
            });
        }
        Ok((Pool { workers }, Spread { threads: spread }))
    }

    /// Stop accepting and end every connection gracefully; wait until `until` at most.
    pub(crate) async fn stop(&mut self, until: tokio::time::Instant) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(served) = w.served.take() {
                let _ = tokio::time::timeout_at(until, served).await;
            }
        }
    }

    /// End the threads, dropping whatever task they still run, and wait until they have.
    pub(crate) async fn release(&mut self) {
        for w in &mut self.workers {
            w.release.take();
        }
        for w in &mut self.workers {
            if let Some(gone) = w.gone.take() {
                // Dropping a runtime's tasks takes no time to speak of; bounded anyway.
                let _ = tokio::time::timeout(Duration::from_secs(5), gone).await;
            }
        }
    }
}

impl Spread {
    /// Hand an accepted connection to the thread with the fewest open connections.
    pub(crate) fn serve(&self, conn: TcpStream) {
        let least = self
            .threads
            .iter()
            .min_by_key(|(_, open)| open.load(Ordering::Relaxed));
        if let Some((conns, open)) = least {
            open.fetch_add(1, Ordering::Relaxed);
            if conns.send(conn).is_err() {
                // The thread has stopped: the connection is dropped (closed).
                open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// A serving thread's life: serve the connections handed to it until told to stop, then
/// keep running the tasks left (telemetry streams ending, stores under way) until released,
/// and drop those still there.
fn run(
    runtime: Runtime,
    (grpc, conns, open): (
        MessagingServiceServer<Service>,
        mpsc::UnboundedReceiver<TcpStream>,
        Arc<AtomicUsize>,
    ),
    stop: oneshot::Receiver<()>,
    served: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
) {
    runtime.block_on(async move {
        tokio::spawn(async move {
            serve(grpc, conns, open, stop).await;
            let _ = served.send(());
        });
        let _ = release.await;
    });
    runtime.shutdown_background();
}

/// Serve the connections handed over until told to stop, then end them gracefully (GOAWAY,
/// the calls under way answered) and return once all are closed.
///
/// hyper's HTTP/2 server runs the gRPC service directly, without tonic's transport around
/// it: no timer per call for the client's `grpc-timeout` (a call whose client gave up is
/// reset by the client, which drops it here), no `date` header on every answer. The
/// settings are those tonic gave: 1 MiB windows, no limit of streams per connection, an
/// HTTP/2 PING after 30 s without traffic.
async fn serve(
    grpc: MessagingServiceServer<Service>,
    mut conns: mpsc::UnboundedReceiver<TcpStream>,
    open: Arc<AtomicUsize>,
    stop: oneshot::Receiver<()>,
) {
    use tonic::codegen::Service as _;
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let mut http2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    http2
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .max_concurrent_streams(None)
        .auto_date_header(false);
    let mut stop = std::pin::pin!(stop);
    loop {
        let conn = tokio::select! {
            _ = &mut stop => break,
            c = conns.recv() => c,
        };
        let Some(stream) = conn else { break };
        // Counted open (by `Spread::serve`) until its task ends with the connection.
        let counted = Counted { open: open.clone() };
        let grpc = grpc.clone();
        let svc = hyper::service::service_fn(move |req| {
            let mut g = grpc.clone();
            g.call(req)
        });
        let served = http2.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let mut served = std::pin::pin!(served);
            tokio::select! {
                r = served.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "a RocketMQ connection failed");
                    }
                    return;
                }
                _ = closing.wait_for(|c| *c) => {}
            }
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        });
    }
    drop(closing_rx);
    closing.send_replace(true);
    closing.closed().await;
}
