//! The HTTP/2 frames exchanged per message when the official Rust producer sends through
//! the endpoint, counted from h2's own `send` events (both ends run in this process), by
//! side and frame type.
//!
//! `cargo run --release -p halfmq-rocketmq --example h2_frames -- [TASKS] [PER_TASK]`

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rocketmq::model::message::MessageBuilder;

mod common;
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
    let args = common::numbers();
    let tasks = args.first().copied().unwrap_or(16);
    let per_task = args.get(1).copied().unwrap_or(200);
    let counts: Counts = Arc::default();
    let subscriber = tracing_subscriber::registry().with(Counter(counts.clone()).with_filter(
        tracing_subscriber::filter::Targets::new().with_target("h2::codec", tracing::Level::DEBUG),
    ));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let served = common::serve("server").await;
    let producer = &served.producer;
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
    served.stop().await;
}
