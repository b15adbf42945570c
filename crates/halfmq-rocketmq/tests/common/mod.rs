//! What the endpoint's tests share: a broker in a temporary directory with the endpoint on a
//! free port of 127.0.0.1, the options of the official client pointed at it, and waiting for
//! a condition.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::{Broker, BrokerConfig};
use halfmq_rocketmq::pb::messaging_service_client::MessagingServiceClient;
use halfmq_rocketmq::pb::{self, Code};
use halfmq_rocketmq::RocketMqServer;
use rocketmq::conf::ClientOption;
use tonic::transport::Channel;

/// A broker and its RocketMQ endpoint, stopped by [`Endpoint::stop`].
pub struct Endpoint {
    pub broker: Arc<Broker>,
    pub addr: SocketAddr,
    server: Option<RocketMqServer>,
    _dir: tempfile::TempDir,
}

/// Open a broker (its configuration changed by `config`) and start the endpoint on it.
pub async fn start(config: impl FnOnce(BrokerConfig) -> BrokerConfig) -> Endpoint {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = Broker::open(config(BrokerConfig::new(dir.path()))).expect("broker opens");
    let any_port = "127.0.0.1:0".parse().expect("an address");
    let server = RocketMqServer::start(broker.clone(), any_port)
        .await
        .expect("endpoint starts");
    Endpoint {
        addr: server.local_addr(),
        broker,
        server: Some(server),
        _dir: dir,
    }
}

impl Endpoint {
    /// Stop the endpoint, then close the broker.
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(2)).await;
        }
        let b = self.broker.clone();
        tokio::task::spawn_blocking(move || b.close())
            .await
            .expect("close joins")
            .expect("broker closes");
    }

    /// The official client's options, pointed at the endpoint; receives wait `long_poll`.
    pub fn client_option(&self, long_poll: Duration) -> ClientOption {
        let mut o = ClientOption::default();
        o.set_access_url(self.addr.to_string());
        o.set_timeout(Duration::from_secs(10));
        o.set_long_polling_timeout(long_poll);
        o
    }

    /// The gRPC address for a raw client of the generated code.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Wait until `done` holds, checking every 50 ms, for at most `limit`; false if it never did.
pub async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// A raw gRPC client of the generated code, connected to the endpoint.
pub async fn client(e: &Endpoint) -> MessagingServiceClient<Channel> {
    MessagingServiceClient::connect(e.url())
        .await
        .expect("connects")
        .max_encoding_message_size(64 * 1024 * 1024)
}

/// A resource (topic or group) named `name`.
pub fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

/// A NORMAL message with this id and body.
pub fn message(topic: &str, id: &str, body: Vec<u8>) -> pb::Message {
    pb::Message {
        topic: resource(topic),
        user_properties: Default::default(),
        system_properties: Some(pb::SystemProperties {
            message_id: id.into(),
            message_type: pb::MessageType::Normal as i32,
            ..Default::default()
        }),
        body,
    }
}

/// Send one message; the response's status.
pub async fn send(c: &mut MessagingServiceClient<Channel>, m: pb::Message) -> pb::Status {
    let r = c
        .send_message(pb::SendMessageRequest { messages: vec![m] })
        .await
        .expect("a gRPC answer")
        .into_inner();
    r.status.expect("a status")
}

/// The RocketMQ code of a status.
pub fn code(s: &pb::Status) -> Code {
    Code::try_from(s.code).expect("a known code")
}
