//! `MessagingService`: the calls of producers and of the client session (route, heartbeat,
//! telemetry, termination), sends and transaction ends, and the answers to what is not
//! supported. The consumer calls are in `consume`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halfmq::{Broker, CheckAnswer, HalfOptions, TxnId};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response};

use crate::clients::{Clients, PRODUCER_GROUP, TELEMETRY_QUEUE};
use crate::coalesce::{self, Coalescer};
use crate::convert::{self, Incoming, BODY_BYTES_MAX};
use crate::pb::{self, messaging_service_server::MessagingService, Code, MessageType};
use crate::pb::{telemetry_command::Command, TelemetryCommand};
use crate::renew::Renewals;
use crate::status::{is_ok, of_error, ok, status, unsupported};

/// The name of the one broker in every route.
const BROKER_NAME: &str = "halfmq";

/// The endpoint's state: the broker behind it and the clients in front of it.
#[derive(Clone)]
pub(crate) struct Service {
    pub broker: Arc<Broker>,
    pub clients: Arc<Clients>,
    /// Concurrent one-message sends, joined into broker batches.
    pub sends: Arc<Coalescer>,
    /// The leases the endpoint renews (receives with `auto_renew`).
    pub renewals: Arc<Renewals>,
    /// Where the endpoint listens (the route's address when a client does not say which
    /// address it used).
    pub local_addr: SocketAddr,
    /// Turns true when the endpoint shuts down: the telemetry streams end then, rather than
    /// when their clients close them (each holds the broker).
    pub stopping: watch::Receiver<bool>,
}

/// The client id of a request (`x-mq-client-id`), if it has a usable one.
pub(crate) fn client_id<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("x-mq-client-id")?.to_str().ok()?;
    (!v.is_empty() && v.len() <= 512).then(|| v.to_owned())
}

/// The name of a topic or group resource, or the status saying it is missing.
pub(crate) fn name_of<'a>(
    r: Option<&'a pb::Resource>,
    what: &str,
    code: Code,
) -> Result<&'a str, pb::Status> {
    match r.map(|r| r.name.as_str()) {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(status(code, format!("the request names no {what}"))),
    }
}

/// The first status that is not OK, or OK.
pub(crate) fn overall<'a>(statuses: impl IntoIterator<Item = &'a pb::Status>) -> pb::Status {
    statuses
        .into_iter()
        .find(|s| !is_ok(s))
        .cloned()
        .unwrap_or_else(ok)
}

pub(crate) fn resource(name: &str) -> pb::Resource {
    pb::Resource {
        resource_namespace: String::new(),
        name: name.to_owned(),
    }
}

impl Service {
    /// The number of queues of `topic`; with automatic topic creation on, an unknown topic is
    /// created (as a first send through halfmq's own protocol would), otherwise it is
    /// TOPIC_NOT_FOUND.
    pub(crate) async fn queues_of(&self, topic: &str) -> Result<u32, pb::Status> {
        if let Some(t) = self.broker.topics().into_iter().find(|t| t.name == topic) {
            return Ok(t.queues);
        }
        if !self.broker.config().auto_create_topics {
            return Err(status(
                Code::TopicNotFound,
                format!("topic `{topic}` does not exist on this halfmq broker (create it first: `halfmq topics create {topic}`)"),
            ));
        }
        let (broker, name) = (self.broker.clone(), topic.to_owned());
        let created = tokio::task::spawn_blocking(move || {
            broker.create_topic(&name, broker.config().default_queues)
        })
        .await
        .map_err(|e| status(Code::InternalServerError, e.to_string()))?;
        created.map(|t| t.queues).map_err(|e| of_error(&e))
    }

    /// The endpoint clients are told to use: the address the client says it reached (its
    /// access point), or the listening address.
    fn endpoints(&self, asked: Option<pb::Endpoints>) -> pb::Endpoints {
        if let Some(e) = asked.filter(|e| !e.addresses.is_empty()) {
            return e;
        }
        let scheme = if self.local_addr.is_ipv4() {
            pb::AddressScheme::IPv4
        } else {
            pb::AddressScheme::IPv6
        };
        pb::Endpoints {
            scheme: scheme as i32,
            addresses: vec![pb::Address {
                host: self.local_addr.ip().to_string(),
                port: i32::from(self.local_addr.port()),
            }],
        }
    }

    /// The message queues of a topic, all on this endpoint.
    pub(crate) fn message_queues(
        &self,
        topic: &str,
        queues: u32,
        asked: Option<pb::Endpoints>,
    ) -> Vec<pb::MessageQueue> {
        let broker = pb::Broker {
            name: BROKER_NAME.into(),
            id: 0,
            endpoints: Some(self.endpoints(asked)),
        };
        let types = [
            MessageType::Normal,
            MessageType::Fifo,
            MessageType::Delay,
            MessageType::Transaction,
        ];
        (0..queues)
            .map(|q| pb::MessageQueue {
                topic: Some(resource(topic)),
                id: q as i32,
                permission: pb::Permission::ReadWrite as i32,
                broker: Some(broker.clone()),
                accept_message_types: types.iter().map(|t| *t as i32).collect(),
            })
            .collect()
    }

    /// Store the messages of a SendMessage request; answers once they are durable. Several
    /// plain messages (normal or FIFO) of one topic are stored as one batch, in order, with
    /// one durable write; otherwise each message is stored on its own, in order.
    async fn send_all(
        &self,
        messages: Vec<pb::Message>,
        client: Option<&str>,
    ) -> Vec<pb::SendResultEntry> {
        let mut entries: Vec<_> = messages.iter().map(result_entry).collect();
        let incoming: Vec<_> = messages.into_iter().map(convert::incoming).collect();
        let topic = match incoming.first() {
            Some(Ok(first)) => first.topic.clone(),
            _ => String::new(),
        };
        let one_batch = incoming.len() > 1
            && incoming
                .iter()
                .all(|i| matches!(i, Ok(i) if i.is_plain() && i.topic == topic));
        if one_batch {
            let msgs: Vec<_> = incoming
                .into_iter()
                .flatten()
                .map(Incoming::keyed)
                .collect();
            match self.broker.send_batch_async(&topic, &msgs).await {
                Ok(stored) => {
                    for (e, r) in entries.iter_mut().zip(stored) {
                        e.status = Some(match r {
                            Ok(r) => {
                                e.offset = i64::try_from(r.offset).unwrap_or(i64::MAX);
                                ok()
                            }
                            Err(err) => of_error(&err),
                        });
                    }
                }
                Err(err) => {
                    for e in &mut entries {
                        e.status = Some(of_error(&err));
                    }
                }
            }
            return entries;
        }
        for (e, inc) in entries.iter_mut().zip(incoming) {
            let stored = match inc {
                Ok(inc) => self.store(inc, client, e).await,
                Err(s) => Err(s),
            };
            e.status = Some(stored.err().unwrap_or_else(ok));
        }
        entries
    }

    async fn store(
        &self,
        inc: Incoming,
        client: Option<&str>,
        entry: &mut pb::SendResultEntry,
    ) -> Result<(), pb::Status> {
        let Incoming {
            topic,
            message_id,
            kind,
            msg,
            deliver_at_ms,
            check_immunity,
        } = inc;
        let b = &self.broker;
        match (kind, deliver_at_ms) {
            (MessageType::Transaction, _) => {
                if let Some(c) = client {
                    self.clients.publishes(c, [topic.clone()]);
                }
                let msg = msg.with_idempotency_key(message_id);
                let opts = HalfOptions { check_immunity };
                let r = b
                    .send_half_receipt_async(&topic, &msg, PRODUCER_GROUP, opts)
                    .await
                    .map_err(|e| of_error(&e))?;
                entry.transaction_id = r.txn.0.to_string();
            }
            (_, Some(at)) => {
                let msg = msg.with_idempotency_key(message_id);
                b.send_delayed_async(&topic, &msg, at)
                    .await
                    .map_err(|e| of_error(&e))?;
            }
            _ => {
                let msg = msg.with_idempotency_key(message_id);
                let r = coalesce::send(&self.sends, b, &topic, msg).await?;
                entry.offset = i64::try_from(r.offset).unwrap_or(i64::MAX);
            }
        }
        Ok(())
    }

    /// The server's answer to a client's settings: what it may send and how it retries.
    fn settings_answer(&self, s: pb::Settings, client: &str) -> TelemetryCommand {
        let kind = s.client_type.and_then(|t| pb::ClientType::try_from(t).ok());
        let pub_sub = match (kind, s.pub_sub) {
            (Some(pb::ClientType::Producer), Some(pb::settings::PubSub::Publishing(p))) => {
                self.clients
                    .publishes(client, p.topics.iter().map(|t| t.name.clone()));
                pb::settings::PubSub::Publishing(pb::Publishing {
                    topics: p.topics,
                    max_body_size: BODY_BYTES_MAX as i32,
                    validate_message_type: true,
                })
            }
            (
                Some(pb::ClientType::SimpleConsumer | pb::ClientType::PushConsumer),
                Some(pb::settings::PubSub::Subscription(sub)),
            ) => match self.subscription_answer(sub) {
                Ok(sub) => sub,
                Err(st) => return telemetry_status(st),
            },
            (
                Some(pb::ClientType::LitePushConsumer | pb::ClientType::LiteSimpleConsumer),
                _,
            ) => return telemetry_status(unsupported(LITE_TOPICS)),
            (Some(pb::ClientType::PullConsumer), _) => {
                return telemetry_status(unsupported(
                    "pull consumers (the offset APIs) are not supported; use a SimpleConsumer or PushConsumer",
                ))
            }
            _ => {
                return telemetry_status(status(
                    Code::UnrecognizedClientType,
                    "settings need a client type (PRODUCER, SIMPLE_CONSUMER or PUSH_CONSUMER) with its publishing or subscription",
                ))
            }
        };
        let backoff = match &pub_sub {
            pb::settings::PubSub::Publishing(_) => producer_retry_policy(),
            pb::settings::PubSub::Subscription(sub) => {
                let group = sub.group.as_ref().map(|g| g.name.as_str()).unwrap_or("");
                self.consumer_retry_policy(group)
            }
        };
        TelemetryCommand {
            status: Some(ok()),
            command: Some(Command::Settings(pb::Settings {
                client_type: s.client_type,
                access_point: s.access_point,
                backoff_policy: Some(backoff),
                request_timeout: s.request_timeout,
                pub_sub: Some(pub_sub),
                user_agent: None,
                metric: Some(pb::Metric {
                    on: false,
                    endpoints: None,
                }),
            })),
        }
    }

    /// A consumer's subscription as the server answers it: FIFO when the group is (the
    /// group's `fifo` setting decides, as a RocketMQ consumer group's does).
    fn subscription_answer(
        &self,
        sub: pb::Subscription,
    ) -> Result<pb::settings::PubSub, pb::Status> {
        let group = name_of(
            sub.group.as_ref(),
            "consumer group",
            Code::IllegalConsumerGroup,
        )?;
        let (delivery, _) = self
            .broker
            .group_settings(group)
            .map_err(|e| of_error(&e))?;
        Ok(pb::settings::PubSub::Subscription(pb::Subscription {
            group: sub.group,
            subscriptions: sub.subscriptions,
            fifo: Some(delivery.fifo),
            receive_batch_size: Some(32),
            long_polling_timeout: Some(convert::duration(Duration::from_secs(20))),
        }))
    }

    /// A consumer group's retry policy: its `max_retries + 1` attempts and its retry backoff.
    fn consumer_retry_policy(&self, group: &str) -> pb::RetryPolicy {
        let d = match self.broker.group_settings(group) {
            Ok((d, _)) => d,
            Err(_) => self.broker.config().delivery.clone(),
        };
        pb::RetryPolicy {
            max_attempts: i32::try_from(d.max_retries.saturating_add(1)).unwrap_or(i32::MAX),
            strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(
                pb::CustomizedBackoff {
                    next: d
                        .retry_backoff
                        .iter()
                        .map(|w| convert::duration(*w))
                        .collect(),
                },
            )),
        }
    }

    /// One command a client sent on its telemetry stream, and what to answer (if anything).
    fn on_telemetry(&self, cmd: TelemetryCommand, client: &str) -> Option<TelemetryCommand> {
        match cmd.command {
            Some(Command::Settings(s)) => Some(self.settings_answer(s, client)),
            // Answers to commands the endpoint never sends: nothing to do.
            Some(Command::ThreadStackTrace(_) | Command::VerifyMessageResult(_)) => None,
            Some(_) => Some(telemetry_status(status(
                Code::BadRequest,
                "that telemetry command is the server's to send, not the client's",
            ))),
            None => Some(telemetry_status(status(
                Code::BadRequest,
                "empty telemetry command",
            ))),
        }
    }
}

/// The answer to one message of a SendMessage, before it is stored.
fn result_entry(m: &pb::Message) -> pb::SendResultEntry {
    let message_id = m.system_properties.as_ref().map(|s| s.message_id.clone());
    pb::SendResultEntry {
        status: None,
        message_id: message_id.unwrap_or_default(),
        transaction_id: String::new(),
        offset: 0,
        recall_handle: String::new(),
    }
}

fn telemetry_status(s: pb::Status) -> TelemetryCommand {
    TelemetryCommand {
        status: Some(s),
        command: None,
    }
}

/// How a producer retries a failed send: 3 attempts, 10 ms doubling up to 1 s.
fn producer_retry_policy() -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: 3,
        strategy: Some(pb::retry_policy::Strategy::ExponentialBackoff(
            pb::ExponentialBackoff {
                initial: Some(convert::duration(Duration::from_millis(10))),
                max: Some(convert::duration(Duration::from_secs(1))),
                multiplier: 2.0,
            },
        )),
    }
}

type Answer<T> = Result<Response<T>, tonic::Status>;

fn answer<T>(t: T) -> Answer<T> {
    Ok(Response::new(t))
}

#[tonic::async_trait]
impl MessagingService for Service {
    async fn query_route(
        &self,
        req: Request<pb::QueryRouteRequest>,
    ) -> Answer<pb::QueryRouteResponse> {
        let req = req.into_inner();
        let topic = match name_of(req.topic.as_ref(), "topic", Code::IllegalTopic) {
            Ok(t) => t.to_owned(),
            Err(s) => {
                return answer(pb::QueryRouteResponse {
                    status: Some(s),
                    message_queues: vec![],
                })
            }
        };
        let (status, message_queues) = match self.queues_of(&topic).await {
            Ok(n) => (ok(), self.message_queues(&topic, n, req.endpoints)),
            Err(s) => (s, Vec::new()),
        };
        answer(pb::QueryRouteResponse {
            status: Some(status),
            message_queues,
        })
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Answer<pb::HeartbeatResponse> {
        if let Some(c) = client_id(&req) {
            self.clients.heartbeat(&c);
        }
        let req = req.into_inner();
        let kind = pb::ClientType::try_from(req.client_type).unwrap_or(pb::ClientType::Unspecified);
        let status = match kind {
            pb::ClientType::Unspecified => status(
                Code::UnrecognizedClientType,
                "heartbeat without a client type",
            ),
            _ => ok(),
        };
        answer(pb::HeartbeatResponse {
            status: Some(status),
        })
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Answer<pb::SendMessageResponse> {
        let client = client_id(&req);
        let messages = req.into_inner().messages;
        if messages.is_empty() {
            let s = status(Code::BadRequest, "SendMessage with no messages");
            return answer(pb::SendMessageResponse {
                status: Some(s),
                entries: vec![],
            });
        }
        let entries = self.send_all(messages, client.as_deref()).await;
        let status = overall(entries.iter().filter_map(|e| e.status.as_ref()));
        answer(pb::SendMessageResponse {
            status: Some(status),
            entries,
        })
    }

    async fn query_assignment(
        &self,
        req: Request<pb::QueryAssignmentRequest>,
    ) -> Answer<pb::QueryAssignmentResponse> {
        answer(self.assignment(req.into_inner()).await)
    }

    type ReceiveMessageStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ReceiveMessageResponse, tonic::Status>>>;

    async fn receive_message(
        &self,
        req: Request<pb::ReceiveMessageRequest>,
    ) -> Answer<Self::ReceiveMessageStream> {
        let client = client_id(&req);
        let items = self.receive(client.as_deref(), req.into_inner()).await;
        answer(tokio_stream::iter(
            items.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    async fn ack_message(
        &self,
        req: Request<pb::AckMessageRequest>,
    ) -> Answer<pb::AckMessageResponse> {
        answer(self.ack(req.into_inner()).await)
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Answer<pb::ForwardMessageToDeadLetterQueueResponse> {
        let status = match self.forward_to_dead_letters(req.into_inner()).await {
            Ok(()) => ok(),
            Err(s) => s,
        };
        answer(pb::ForwardMessageToDeadLetterQueueResponse {
            status: Some(status),
        })
    }

    type PullMessageStream = tokio_stream::Once<Result<pb::PullMessageResponse, tonic::Status>>;

    async fn pull_message(
        &self,
        _req: Request<pb::PullMessageRequest>,
    ) -> Answer<Self::PullMessageStream> {
        let content = pb::pull_message_response::Content::Status(unsupported(OFFSET_APIS));
        answer(tokio_stream::once(Ok(pb::PullMessageResponse {
            content: Some(content),
        })))
    }

    async fn update_offset(
        &self,
        _req: Request<pb::UpdateOffsetRequest>,
    ) -> Answer<pb::UpdateOffsetResponse> {
        offsets_refused(|status| pb::UpdateOffsetResponse { status })
    }

    async fn get_offset(
        &self,
        _req: Request<pb::GetOffsetRequest>,
    ) -> Answer<pb::GetOffsetResponse> {
        offsets_refused(|status| pb::GetOffsetResponse { status, offset: 0 })
    }

    async fn query_offset(
        &self,
        _req: Request<pb::QueryOffsetRequest>,
    ) -> Answer<pb::QueryOffsetResponse> {
        offsets_refused(|status| pb::QueryOffsetResponse { status, offset: 0 })
    }

    async fn end_transaction(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> Answer<pb::EndTransactionResponse> {
        let req = req.into_inner();
        let Ok(txn) = req.transaction_id.parse::<u64>() else {
            let s = status(
                Code::InvalidTransactionId,
                format!(
                    "transaction id {:?} was not made by this endpoint",
                    req.transaction_id.chars().take(64).collect::<String>()
                ),
            );
            return answer(pb::EndTransactionResponse { status: Some(s) });
        };
        let resolution = pb::TransactionResolution::try_from(req.resolution)
            .unwrap_or(pb::TransactionResolution::Unspecified);
        let result = match resolution {
            pb::TransactionResolution::Commit => self
                .broker
                .commit_async(TxnId(txn))
                .await
                .map(|()| CheckAnswer::Commit),
            pb::TransactionResolution::Rollback => self
                .broker
                .rollback_async(TxnId(txn))
                .await
                .map(|()| CheckAnswer::Rollback),
            // "Not known yet": the transaction stays pending and is checked again later.
            pb::TransactionResolution::Unspecified => Ok(CheckAnswer::Unknown),
        };
        let status = match result {
            Ok(a) => {
                self.clients.answered(txn, a);
                ok()
            }
            Err(e) => of_error(&e),
        };
        answer(pb::EndTransactionResponse {
            status: Some(status),
        })
    }

    type TelemetryStream = ReceiverStream<Result<TelemetryCommand, tonic::Status>>;

    async fn telemetry(
        &self,
        req: Request<tonic::Streaming<TelemetryCommand>>,
    ) -> Answer<Self::TelemetryStream> {
        let Some(client) = client_id(&req) else {
            return Err(tonic::Status::invalid_argument(
                "RocketMQ telemetry needs the x-mq-client-id header (CLIENT_ID_REQUIRED)",
            ));
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(TELEMETRY_QUEUE);
        let stream = self.clients.stream_opened(&client, tx.clone());
        let me = self.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                let cmd = tokio::select! {
                    m = inbound.message() => m,
                    _ = stopping.wait_for(|s| *s) => break,
                };
                let Ok(Some(cmd)) = cmd else { break };
                if let Some(reply) = me.on_telemetry(cmd, &client) {
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                }
            }
            // The stream's answers end once its senders (this one and the one in `clients`)
            // are gone.
            me.clients.stream_closed(&client, stream);
        });
        answer(ReceiverStream::new(rx))
    }

    async fn notify_client_termination(
        &self,
        req: Request<pb::NotifyClientTerminationRequest>,
    ) -> Answer<pb::NotifyClientTerminationResponse> {
        if let Some(c) = client_id(&req) {
            self.clients.terminated(&c);
        }
        answer(pb::NotifyClientTerminationResponse { status: Some(ok()) })
    }

    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Answer<pb::ChangeInvisibleDurationResponse> {
        answer(self.change_invisible(req.into_inner()).await)
    }

    async fn sync_lite_subscription(
        &self,
        _req: Request<pb::SyncLiteSubscriptionRequest>,
    ) -> Answer<pb::SyncLiteSubscriptionResponse> {
        answer(pb::SyncLiteSubscriptionResponse {
            status: Some(unsupported(LITE_TOPICS)),
        })
    }

    async fn recall_message(
        &self,
        _req: Request<pb::RecallMessageRequest>,
    ) -> Answer<pb::RecallMessageResponse> {
        let s = unsupported(
            "recalling a message is not supported; a delayed message is delivered at its time",
        );
        answer(pb::RecallMessageResponse {
            status: Some(s),
            message_id: String::new(),
        })
    }
}

/// What lite consumers are answered.
const LITE_TOPICS: &str = "lite topics (lite push and lite simple consumers) are not supported; \
     consume a topic with a SimpleConsumer or PushConsumer";

/// The answer of a pull-offset call, made by `with_status` from the status refusing it.
fn offsets_refused<T>(with_status: impl FnOnce(Option<pb::Status>) -> T) -> Answer<T> {
    answer(with_status(Some(unsupported(OFFSET_APIS))))
}

/// What the pull-offset calls answer.
const OFFSET_APIS: &str =
    "the pull-offset APIs (PullMessage, UpdateOffset, GetOffset, QueryOffset) \
     are not supported; consume with a SimpleConsumer or PushConsumer (ReceiveMessage)";
