//! The RocketMQ clients the endpoint knows: who they are (the `x-mq-client-id` header), which
//! topics a producer publishes, and the telemetry stream the endpoint can send commands on.
//! The check-back of RocketMQ transactions ([`Checker`]) asks a live producer of the topic
//! through that stream and waits for its EndTransaction.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::{CheckAnswer, HalfMessage, TransactionChecker};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::convert;
use crate::pb::{self, telemetry_command::Command, TelemetryCommand};

/// The producer group the endpoint writes RocketMQ transactions under. RocketMQ 5 producers
/// have no group; the check-back picks a live producer of the message's topic instead.
pub const PRODUCER_GROUP: &str = "rocketmq-endpoint";

/// Commands waiting to go out on one client's telemetry stream, at most.
pub(crate) const TELEMETRY_QUEUE: usize = 64;

/// What goes out on a telemetry stream.
pub(crate) type TelemetryTx = mpsc::Sender<Result<TelemetryCommand, tonic::Status>>;

/// A client not heard from for this long (no heartbeat since, nor a new telemetry stream)
/// is taken to be gone: the endpoint stops renewing its messages' leases. RocketMQ clients
/// send a heartbeat every 10 s (Java) to 30 s (Rust).
pub(crate) const HEARTBEAT_LAPSE: Duration = Duration::from_secs(90);

/// One client.
struct Client {
    /// Topics it publishes (from its settings and its transactional sends).
    topics: HashSet<String>,
    /// Its open telemetry stream: (stream id, sender).
    telemetry: Option<(u64, TelemetryTx)>,
    /// When its last heartbeat came (or its telemetry stream opened).
    seen: Instant,
}

/// Every client the endpoint knows, and the check-backs waiting for an answer.
#[derive(Default)]
pub(crate) struct Clients {
    clients: Mutex<HashMap<String, Client>>,
    streams: AtomicU64,
    turn: AtomicUsize,
    /// Check-backs waiting for their EndTransaction: transaction id → where to answer.
    waiting: Mutex<HashMap<u64, std::sync::mpsc::Sender<CheckAnswer>>>,
}

impl Clients {
    /// A telemetry stream of `client` opened: commands for it go to `tx` from now on.
    /// Returns the stream's id, for [`Clients::stream_closed`].
    pub(crate) fn stream_opened(&self, client: &str, tx: TelemetryTx) -> u64 {
        let id = self.streams.fetch_add(1, Ordering::Relaxed);
        let mut all = self.clients.lock();
        let c = all.entry(client.to_owned()).or_insert_with(|| Client {
            topics: HashSet::new(),
            telemetry: None,
            seen: Instant::now(),
        });
        c.telemetry = Some((id, tx));
        c.seen = Instant::now();
        id
    }

    /// The telemetry stream `id` of `client` ended: the client is forgotten (unless a newer
    /// stream replaced this one). A client is known only while its stream is open, so the
    /// clients kept are bounded by the streams open, and a client that vanished without a
    /// NotifyClientTermination is not asked at check-back.
    pub(crate) fn stream_closed(&self, client: &str, id: u64) {
        let mut all = self.clients.lock();
        let ours = all
            .get(client)
            .and_then(|c| c.telemetry.as_ref())
            .is_some_and(|(i, _)| *i == id);
        if ours {
            all.remove(client);
        }
    }

    /// `client` publishes `topics` (a client without an open telemetry stream is not kept).
    pub(crate) fn publishes(&self, client: &str, topics: impl IntoIterator<Item = String>) {
        if let Some(c) = self.clients.lock().get_mut(client) {
            c.topics.extend(topics);
        }
    }

    /// A heartbeat of `client` came (a client without an open telemetry stream is not kept).
    pub(crate) fn heartbeat(&self, client: &str) {
        if let Some(c) = self.clients.lock().get_mut(client) {
            c.seen = Instant::now();
        }
    }

    /// The id of `client`'s telemetry stream open now, if any: its session.
    pub(crate) fn session(&self, client: &str) -> Option<u64> {
        let all = self.clients.lock();
        all.get(client)?.telemetry.as_ref().map(|(id, _)| *id)
    }

    /// Whether `client` is alive in the session `stream` (a [`Clients::session`]): that
    /// telemetry stream is still its open one, and it was heard from within
    /// [`HEARTBEAT_LAPSE`]. A client that reconnected under the same id is in a new session.
    pub(crate) fn alive_in(&self, client: &str, stream: u64) -> bool {
        self.clients.lock().get(client).is_some_and(|c| {
            c.seen.elapsed() < HEARTBEAT_LAPSE
                && c.telemetry
                    .as_ref()
                    .is_some_and(|(id, tx)| *id == stream && !tx.is_closed())
        })
    }

    /// `client` said it is going away.
    pub(crate) fn terminated(&self, client: &str) {
        self.clients.lock().remove(client);
    }

    /// Clients known now.
    pub(crate) fn len(&self) -> usize {
        self.clients.lock().len()
    }

    /// The telemetry stream of a live producer of `topic`, taking them in turn.
    fn producer_of(&self, topic: &str) -> Option<TelemetryTx> {
        let all = self.clients.lock();
        let live: Vec<&TelemetryTx> = all
            .values()
            .filter(|c| c.topics.contains(topic))
            .filter_map(|c| c.telemetry.as_ref().map(|(_, tx)| tx))
            .filter(|tx| !tx.is_closed())
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % live.len();
        Some(live[i].clone())
    }

    /// A producer answered the check-back of `txn` (an EndTransaction from the check).
    pub(crate) fn answered(&self, txn: u64, answer: CheckAnswer) {
        if let Some(tx) = self.waiting.lock().remove(&txn) {
            let _ = tx.send(answer);
        }
    }
}

/// The check-back of RocketMQ transactions, registered with the broker for
/// [`PRODUCER_GROUP`]: sends a RecoverOrphanedTransactionCommand to a live producer of the
/// half's topic and waits for its EndTransaction (which the endpoint applies itself, durably,
/// before this answers the same).
pub(crate) struct Checker {
    pub clients: Arc<Clients>,
    /// How long to wait for the producer's answer (the broker's check answer time-out).
    pub wait: Duration,
}

impl TransactionChecker for Checker {
    fn check(&self, half: &HalfMessage) -> CheckAnswer {
        let Some(tx) = self.clients.producer_of(&half.topic) else {
            tracing::info!(txn = half.txn_id.0, topic = %half.topic, "check-back: no live RocketMQ producer of the topic");
            return CheckAnswer::Unknown;
        };
        let mut message = convert::outgoing(
            &half.topic,
            (&half.key, half.body.clone(), &half.properties),
            half.txn_id.0,
            pb::SystemProperties::default(),
        );
        if let Some(sys) = message.system_properties.as_mut() {
            sys.message_type = pb::MessageType::Transaction as i32;
        }
        let command = TelemetryCommand {
            status: None,
            command: Some(Command::RecoverOrphanedTransactionCommand(
                pb::RecoverOrphanedTransactionCommand {
                    message: Some(message),
                    transaction_id: half.txn_id.0.to_string(),
                },
            )),
        };
        let (answer_tx, answer_rx) = std::sync::mpsc::channel();
        self.clients.waiting.lock().insert(half.txn_id.0, answer_tx);
        let answer = match tx.try_send(Ok(command)) {
            Ok(()) => answer_rx.recv_timeout(self.wait).ok(),
            Err(e) => {
                tracing::warn!(txn = half.txn_id.0, error = %e, "check-back: the producer's telemetry stream is full or closed");
                None
            }
        };
        self.clients.waiting.lock().remove(&half.txn_id.0);
        answer.unwrap_or(CheckAnswer::Unknown)
    }
}
