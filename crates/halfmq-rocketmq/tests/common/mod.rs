//! What the endpoint's tests share: a broker in a temporary directory with the endpoint on a
//! free port of 127.0.0.1, the options of the official client pointed at it, waiting for a
//! condition, and the raw gRPC calls of the generated client the tests make.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::{Broker, BrokerConfig};
use halfmq_rocketmq::pb::messaging_service_client::MessagingServiceClient;
use halfmq_rocketmq::pb::{self, receive_message_response::Content, Code};
use halfmq_rocketmq::RocketMqServer;
use rocketmq::conf::ClientOption;
use tonic::transport::Channel;

/// A raw gRPC client of the generated code.
pub type Client = MessagingServiceClient<Channel>;

/// A broker and its RocketMQ endpoint, stopped by [`Endpoint::stop`].
pub struct Endpoint {
    pub broker: Arc<Broker>,
    pub addr: SocketAddr,
    server: Option<RocketMqServer>,
    _dir: tempfile::TempDir,
}

/// Open a broker (its configuration changed by `config`) with a topic of `queues` queues,
/// and start the endpoint on it.
pub async fn start(
    topic: &str,
    queues: u32,
    config: impl FnOnce(BrokerConfig) -> BrokerConfig,
) -> Endpoint {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = Broker::open(config(BrokerConfig::new(dir.path()))).expect("broker opens");
    broker.create_topic(topic, queues).expect("topic");
    serve(broker, dir).await
}

/// Start the endpoint on `broker`, whose data is in `dir`.
async fn serve(broker: Arc<Broker>, dir: tempfile::TempDir) -> Endpoint {
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
    /// Messages whose lease the endpoint renews now.
    pub fn renewed(&self) -> usize {
        self.server.as_ref().map_or(0, RocketMqServer::renewed)
    }

    /// Stop the endpoint, then close the broker.
    pub async fn stop(self) {
        self.close().await;
    }

    /// Stop the endpoint and close the broker; the data directory is returned.
    async fn close(mut self) -> tempfile::TempDir {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(2)).await;
        }
        let Endpoint { broker, _dir, .. } = self;
        tokio::task::spawn_blocking(move || broker.close())
            .await
            .expect("close joins")
            .expect("broker closes");
        _dir
    }

    /// Stop the endpoint, close the broker, and open both again on the same directory.
    pub async fn restart(self) -> Endpoint {
        let dir = self.close().await;
        // The broker is let go once the last of the endpoint's tasks holding it ends.
        let mut reopened = Broker::open(BrokerConfig::new(dir.path()));
        for _ in 0..100 {
            if !matches!(reopened, Err(halfmq::Error::Locked { .. })) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            reopened = Broker::open(BrokerConfig::new(dir.path()));
        }
        serve(reopened.expect("broker reopens"), dir).await
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
pub async fn client(e: &Endpoint) -> Client {
    MessagingServiceClient::connect(e.url())
        .await
        .expect("connects")
        .max_encoding_message_size(64 * 1024 * 1024)
}

/// [`start`], and a raw gRPC client of the endpoint.
pub async fn start_client(
    topic: &str,
    queues: u32,
    config: impl FnOnce(BrokerConfig) -> BrokerConfig,
) -> (Endpoint, Client) {
    let e = start(topic, queues, config).await;
    let c = client(&e).await;
    (e, c)
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
pub async fn send(c: &mut Client, m: pb::Message) -> pb::Status {
    let r = c
        .send_message(pb::SendMessageRequest { messages: vec![m] })
        .await
        .expect("a gRPC answer")
        .into_inner();
    r.status.expect("a status")
}

/// QueryRoute of `topic`: the response.
pub async fn query_route(c: &mut Client, topic: &str) -> pb::QueryRouteResponse {
    c.query_route(pb::QueryRouteRequest {
        topic: resource(topic),
        endpoints: None,
    })
    .await
    .expect("a gRPC answer")
    .into_inner()
}

/// QueryAssignment of `topic` for group `group`: the response.
pub async fn query_assignment(
    c: &mut Client,
    group: &str,
    topic: &str,
) -> pb::QueryAssignmentResponse {
    c.query_assignment(pb::QueryAssignmentRequest {
        topic: resource(topic),
        group: resource(group),
        endpoints: None,
    })
    .await
    .expect("a gRPC answer")
    .into_inner()
}

/// The RocketMQ code of a status.
pub fn code(s: &pb::Status) -> Code {
    Code::try_from(s.code).expect("a known code")
}

/// A protobuf duration.
pub fn duration(d: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration::try_from(d).expect("a duration protobuf can hold"))
}

/// What a raw ReceiveMessage asks for beyond its group and topic.
pub struct Receive<'a> {
    pub max: i32,
    /// The invisible duration (the lease); `None`: the group's.
    pub lease: Option<Duration>,
    pub filter: (pb::FilterType, &'a str),
    pub long_poll: Duration,
    /// `auto_renew`, and the client id the receive is made as (`x-mq-client-id`).
    pub auto_renew: bool,
    pub client_id: Option<&'a str>,
}

impl Default for Receive<'_> {
    fn default() -> Self {
        Receive {
            max: 8,
            lease: Some(Duration::from_secs(30)),
            filter: (pb::FilterType::Tag, "*"),
            long_poll: Duration::from_secs(2),
            auto_renew: false,
            client_id: None,
        }
    }
}

/// A raw ReceiveMessage of `topic` for `group`: the stream's status and messages.
pub async fn receive(
    c: &mut Client,
    group: &str,
    topic: &str,
    how: Receive<'_>,
) -> (pb::Status, Vec<pb::Message>) {
    let req = pb::ReceiveMessageRequest {
        group: resource(group),
        message_queue: Some(pb::MessageQueue {
            topic: resource(topic),
            ..Default::default()
        }),
        filter_expression: Some(pb::FilterExpression {
            r#type: how.filter.0 as i32,
            expression: how.filter.1.into(),
        }),
        batch_size: how.max,
        invisible_duration: how.lease.and_then(duration),
        auto_renew: how.auto_renew,
        long_polling_timeout: duration(how.long_poll),
        attempt_id: None,
    };
    let mut req = tonic::Request::new(req);
    if let Some(id) = how.client_id {
        req.metadata_mut()
            .insert("x-mq-client-id", id.parse().expect("an ASCII client id"));
    }
    let mut stream = c
        .receive_message(req)
        .await
        .expect("a gRPC answer")
        .into_inner();
    let (mut status, mut messages) = (None, Vec::new());
    while let Some(item) = stream.message().await.expect("no gRPC error") {
        match item.content {
            Some(Content::Status(s)) => status = Some(s),
            Some(Content::Message(m)) => messages.push(m),
            _ => {}
        }
    }
    (status.expect("a status"), messages)
}

/// The system properties of a received message.
pub fn sys(m: &pb::Message) -> &pb::SystemProperties {
    m.system_properties.as_ref().expect("system properties")
}

/// The receipt handle of a received message.
pub fn handle(m: &pb::Message) -> String {
    sys(m).receipt_handle.clone().expect("a receipt handle")
}

/// Ack one message of topic `t` for group `g` by its handle; the response's status.
pub async fn ack(c: &mut Client, handle: &str) -> pb::Status {
    let r = c
        .ack_message(pb::AckMessageRequest {
            group: resource("g"),
            topic: resource("t"),
            entries: vec![pb::AckMessageEntry {
                message_id: String::new(),
                receipt_handle: handle.into(),
                lite_topic: None,
            }],
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    r.status.expect("a status")
}

/// ChangeInvisibleDuration of a message of topic `t` held by group `g`: the status and the
/// new handle.
pub async fn change_invisible(c: &mut Client, handle: &str, d: Duration) -> (pb::Status, String) {
    let r = c
        .change_invisible_duration(pb::ChangeInvisibleDurationRequest {
            group: resource("g"),
            topic: resource("t"),
            receipt_handle: handle.into(),
            invisible_duration: duration(d),
            message_id: String::new(),
            lite_topic: None,
            suspend: None,
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    (r.status.expect("a status"), r.receipt_handle)
}

/// A client session as the endpoint knows one: an open telemetry stream under a client id.
/// The session ends when this is dropped.
pub struct Session {
    _commands: tokio::sync::mpsc::Sender<pb::TelemetryCommand>,
    _answers: tonic::Streaming<pb::TelemetryCommand>,
}

/// Open the telemetry stream of client `id` (the endpoint then counts it alive).
pub async fn session(c: &mut Client, id: &str) -> Session {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("x-mq-client-id", id.parse().expect("an ASCII client id"));
    let answers = c
        .telemetry(req)
        .await
        .expect("telemetry opens")
        .into_inner();
    Session {
        _commands: tx,
        _answers: answers,
    }
}

/// NotifyClientTermination of client `id`.
pub async fn terminate(c: &mut Client, id: &str) {
    let mut req = tonic::Request::new(pb::NotifyClientTerminationRequest { group: None });
    req.metadata_mut()
        .insert("x-mq-client-id", id.parse().expect("an ASCII client id"));
    c.notify_client_termination(req)
        .await
        .expect("a gRPC answer");
}
