//! Starting and stopping the endpoint: its own listener, whose connections the serving
//! threads (`pool`) serve with [`Service`], beside whatever else uses the same [`Broker`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halfmq::{Broker, Error, Result};
use tokio::net::TcpListener;
#[cfg(test)]
use tokio::sync::mpsc;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::clients::{Checker, Clients, PRODUCER_GROUP};
use crate::convert::BODY_BYTES_MAX;
use crate::pb::messaging_service_server::MessagingServiceServer;
use crate::pool::Pool;
use crate::renew::Renewals;
use crate::service::Service;

/// Largest gRPC request accepted: a batch of a few largest messages. Larger ones are refused
/// by gRPC itself (RESOURCE_EXHAUSTED) before they are read whole.
pub const REQUEST_BYTES_MAX: usize = 4 * BODY_BYTES_MAX;

/// The running endpoint.
pub struct RocketMqServer {
    local_addr: SocketAddr,
    broker: Arc<Broker>,
    clients: Arc<Clients>,
    renewals: Arc<Renewals>,
    checker: u64,
    /// Set when shutting down; the telemetry streams' tasks watch it.
    stopping: watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The threads serving the connections.
    pool: Pool,
}

impl RocketMqServer {
    /// Listen on `addr` (port 0 picks a free port) and serve RocketMQ 5 clients with
    /// `broker`, until [`RocketMqServer::shutdown`]. Registers the check-back of RocketMQ
    /// transactions (producer group [`PRODUCER_GROUP`]). Call from a tokio runtime.
    pub async fn start(broker: Arc<Broker>, addr: SocketAddr) -> Result<RocketMqServer> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(addr.to_string(), "bind the RocketMQ listener", e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io(addr.to_string(), "read the RocketMQ listener's address", e))?;
        let clients = Arc::new(Clients::default());
        let wait = broker.config().txn.check_answer_timeout;
        let checker = Checker {
            clients: clients.clone(),
            wait,
        };
        let checker = broker.register_checker(PRODUCER_GROUP, Arc::new(checker))?;
        let renewals = Arc::new(Renewals::default());
        let (stopping, stopping_rx) = watch::channel(false);
        let service = Service {
            broker: broker.clone(),
            clients: clients.clone(),
            sends: Arc::default(),
            renewals: renewals.clone(),
            local_addr,
            stopping: stopping_rx,
        };
        let grpc = MessagingServiceServer::new(service)
            .max_decoding_message_size(REQUEST_BYTES_MAX)
            .max_encoding_message_size(REQUEST_BYTES_MAX);
        let (stop, stopped) = oneshot::channel::<()>();
        // A serving thread per core; at least one.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (pool, accepting) = Pool::start(threads, &grpc)
            .map_err(|e| Error::io(addr.to_string(), "start the RocketMQ endpoint's threads", e))?;
        // Accepting runs on the caller's runtime; the connections are served on the pool's.
        let task = tokio::spawn(async move {
            let accept = async {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            // Without it a small answer can wait for the client's delayed
                            // ack (~40 ms).
                            if stream.set_nodelay(true).is_ok() {
                                accepting.serve(stream);
                            }
                        }
                        Err(e) => {
                            // Out of file descriptors, mostly: try again a little later.
                            tracing::warn!(error = %e, "accepting a RocketMQ connection");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = accept => {}
                _ = stopped => {}
            }
        });
        tracing::info!(addr = %local_addr, "RocketMQ 5 endpoint listening");
        Ok(RocketMqServer {
            local_addr,
            broker,
            clients,
            renewals,
            checker,
            stopping,
            stop: Some(stop),
            task: Some(task),
            pool,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// RocketMQ clients known now: those with an open telemetry stream.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Messages whose lease the endpoint renews now (received with `auto_renew`).
    pub fn renewed(&self) -> usize {
        self.renewals.len()
    }

    /// Stop listening, end the open calls (telemetry streams close), stop renewing leases
    /// and unregister the check-back. Waits at most `grace` for calls in flight to finish.
    /// When it returns, none of the endpoint's tasks holds the broker any more (even if a
    /// client keeps its connection open), unless a call in flight outlived `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        let until = tokio::time::Instant::now() + grace;
        self.broker.unregister_checker(PRODUCER_GROUP, self.checker);
        self.renewals.stop();
        self.stopping.send_replace(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(until, task).await.is_err() {
                abort.abort();
            }
        }
        self.pool.stop(until).await;
        // Every holder of the service (the server's connections, the telemetry tasks) has a
        // receiver of `stopping`: all gone means none holds the broker.
        let _ = tokio::time::timeout_at(until, self.stopping.closed()).await;
        self.pool.release().await;
    }
}

impl Drop for RocketMqServer {
    fn drop(&mut self) {
        self.broker.unregister_checker(PRODUCER_GROUP, self.checker);
        self.renewals.stop();
        self.stopping.send_replace(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::messaging_service_client::MessagingServiceClient;
    use crate::pb::TelemetryCommand;
    use halfmq::BrokerConfig;

    /// A client that keeps its telemetry stream (and connection) open does not keep the
    /// broker alive past the endpoint's shutdown: once `shutdown` returns, the broker's only
    /// holder is its owner.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_lets_go_of_the_broker_while_a_telemetry_stream_is_open() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let broker = Broker::open(BrokerConfig::new(dir.path())).expect("broker");
        let any = "127.0.0.1:0".parse().expect("an address");
        let server = RocketMqServer::start(broker.clone(), any)
            .await
            .expect("endpoint starts");
        let mut client = MessagingServiceClient::connect(format!("http://{}", server.local_addr()))
            .await
            .expect("connects");
        let (commands, rx) = mpsc::channel::<TelemetryCommand>(4);
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("x-mq-client-id", "c-1".parse().expect("ASCII"));
        let mut answers = client
            .telemetry(req)
            .await
            .expect("telemetry opens")
            .into_inner();
        assert_eq!(server.clients(), 1);
        server.shutdown(Duration::from_secs(5)).await;
        assert_eq!(
            Arc::strong_count(&broker),
            1,
            "only the test holds the broker"
        );
        // The stream was ended by the endpoint, not by the client.
        assert!(matches!(answers.message().await, Ok(None) | Err(_)));
        drop(commands);
        broker.close().expect("close");
    }
}
