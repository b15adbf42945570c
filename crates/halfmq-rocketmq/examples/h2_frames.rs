//! The HTTP/2 frames exchanged per message when the official Rust producer sends through
//! the endpoint, counted from h2's own `send` events (both ends run in this process), by
//! side and frame type.
//!
//! `cargo run --release -p halfmq-rocketmq --example h2_frames -- [TASKS] [PER_TASK]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use halfmq::{Broker, BrokerConfig};
use halfmq_rocketmq::RocketMqServer;
use parking_lot::Mutex;
use rocketmq::conf::{ClientOption, ProducerOption};
use rocketmq::model::message::MessageBuilder;
use rocketmq::Producer;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::Layer;

/// Frames sent, by (side, frame type and END_STREAM).
type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

struct Counter(Counts);

#[derive(Default)]
struct Fields {
    frame: String,
    message: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "frame" => self.frame = format!("{value:?}"),
            "message" => self.message = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Counter {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if !event.metadata().target().starts_with("h2::codec") {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message != "send" {
            return;
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("");
        let side = if name.starts_with("server") || name.starts_with("halfmq-rq") {
            "endpoint"
        } else {
            "client"
        };
        let kind = f.frame.split([' ', '{']).next().unwrap_or("?").to_owned();
        let eos = if f.frame.contains("END_STREAM") {
            " END_STREAM"
        } else {
            ""
        };
        *self
            .0
            .lock()
            .entry(format!("{side} {kind}{eos}"))
            .or_default() += 1;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tasks = args.first().copied().unwrap_or(16);
    let per_task = args.get(1).copied().unwrap_or(200);
    let counts: Counts = Arc::default();
    let subscriber = tracing_subscriber::registry().with(Counter(counts.clone()).with_filter(
        tracing_subscriber::filter::Targets::new().with_target("h2::codec", tracing::Level::DEBUG),
    ));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = Broker::open(BrokerConfig::new(dir.path())).expect("broker");
    broker.create_topic("bench", 4).expect("topic");
    let serving = tokio::runtime::Builder::new_multi_thread()
        .thread_name("server")
        .enable_all()
        .build()
        .expect("the serving runtime");
    let any = "127.0.0.1:0".parse().expect("an address");
    let server = serving
        .spawn(RocketMqServer::start(broker.clone(), any))
        .await
        .expect("starts")
        .expect("endpoint");
    let mut popt = ProducerOption::default();
    popt.set_topics(vec!["bench"]);
    let mut copt = ClientOption::default();
    copt.set_access_url(server.local_addr().to_string());
    copt.set_timeout(Duration::from_secs(30));
    let mut producer = Producer::new(popt, copt).expect("producer");
    producer.start().await.expect("producer starts");
    let producer = Arc::new(producer);
    let send_all = |n: usize| {
        let producer = producer.clone();
        async move {
            let mut handles = Vec::new();
            for _ in 0..tasks {
                let p = producer.clone();
                handles.push(tokio::spawn(async move {
                    for _ in 0..n {
                        let m = MessageBuilder::builder()
                            .set_topic("bench")
                            .set_body(vec![b'x'; 256])
                            .build()
                            .expect("message");
                        p.send(m).await.expect("send");
                    }
                }));
            }
            for h in handles {
                h.await.expect("task");
            }
        }
    };
    send_all(10).await;
    counts.lock().clear();
    send_all(per_task).await;
    let messages = (tasks * per_task) as f64;
    println!("{tasks} tasks x {per_task} sends; frames sent per message:");
    for (k, v) in counts.lock().iter() {
        println!("{k:<40} {:>8.3}  ({v})", *v as f64 / messages);
    }
    if let Ok(p) = Arc::try_unwrap(producer) {
        let _ = p.shutdown().await;
    }
    serving
        .spawn(server.shutdown(Duration::from_secs(2)))
        .await
        .expect("stops");
    serving.shutdown_background();
    broker.close().expect("close");
}
