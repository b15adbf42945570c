//! Starting and stopping the endpoint: a tonic server on its own listener, serving
//! [`Service`] beside whatever else uses the same [`Broker`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halfmq::{Broker, Error, Result};
use tokio::net::TcpListener;
#[cfg(test)]
use tokio::sync::mpsc;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;

use crate::clients::{Checker, Clients, PRODUCER_GROUP};
use crate::convert::BODY_BYTES_MAX;
use crate::pb::messaging_service_server::MessagingServiceServer;
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
        // The builder's `tcp_nodelay` covers only sockets tonic accepts itself: these are
        // ours. Without it a small answer can wait for the client's delayed ack (~40 ms).
        let incoming = TcpListenerStream::new(listener).map(|accepted| {
            let stream = accepted?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        });
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(grpc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the RocketMQ endpoint stopped");
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
        // Every holder of the service (the server's connections, the telemetry tasks) has a
        // receiver of `stopping`: all gone means none holds the broker.
        let _ = tokio::time::timeout_at(until, self.stopping.closed()).await;
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
