//! Durable sends through the RocketMQ endpoint with the official Rust producer and with a
//! plain gRPC client of the generated code (one channel, no client-side work beyond
//! encoding), next to the same sends made with halfmq's own network client (through the
//! native server, both ends in this process; as configured by default, which joins
//! concurrent sends into batch requests, and with that automatic batching off, one request per
//! message as the official producer sends) and with the embedded broker's `send_async`, in
//! one run on one broker:
//! throughput, p50/p99 latency, their ratio, and the process's CPU time per message while
//! each phase ran (client and endpoint together for the RocketMQ phases). The official
//! producer also sends in batches of 16 (`batch_send`, one request each; its latency is a
//! batch's).
//!
//! The official producer and halfmq's own client (both ways) run in ROUNDS rounds, one after
//! the other in each round; the ratios are given per round and as their median, so that a
//! moment of load from elsewhere on the machine skews one round, not the result.
//!
//! `cargo run --release -p halfmq-rocketmq --example rocketmq_bench -- [TASKS] [PER_TASK] [BODY_BYTES] [ROUNDS]`

use std::sync::Arc;
use std::time::Instant;

use halfmq::Message;
use halfmq_rocketmq::pb;
use halfmq_rocketmq::pb::messaging_service_client::MessagingServiceClient;
use rocketmq::model::message::MessageBuilder;

mod common;

/// The allocator of the `halfmq` binary, which serves the endpoint in production
/// (`halfmq broker --rocketmq-listen`): measured as it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What one phase measured.
struct Phase {
    name: &'static str,
    secs: f64,
    /// Latency of each call (a call sends `per_call` messages).
    latencies_us: Vec<u64>,
    cpu_secs: f64,
    /// The share of `cpu_secs` spent by the serving side: the endpoint's or native server's
    /// runtime and the broker's own threads.
    server_cpu_secs: f64,
    per_call: usize,
}

impl Phase {
    fn messages(&self) -> f64 {
        (self.latencies_us.len() * self.per_call) as f64
    }
    fn rate(&self) -> f64 {
        self.messages() / self.secs
    }
    fn pct(&self, p: f64) -> u64 {
        let i = ((self.latencies_us.len() as f64 * p) as usize).min(self.latencies_us.len() - 1);
        self.latencies_us[i]
    }
    fn print(&self) {
        println!(
            "{:<30} {:>9.0} msg/s  p50 {:>6} us  p99 {:>6} us  cpu {:>6.1} us/msg (server {:>5.1})",
            self.name,
            self.rate(),
            self.pct(0.50),
            self.pct(0.99),
            self.cpu_secs * 1e6 / self.messages(),
            self.server_cpu_secs * 1e6 / self.messages()
        );
    }
}

/// User + system CPU time in a `/proc/.../stat` line, seconds.
fn stat_secs(stat: &str) -> f64 {
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// The name of the serving runtime's threads.
const SERVER_THREADS: &str = "server";

/// User + system CPU time of this process and of its serving side (the threads of the
/// serving runtime and the broker's own, `halfmq-*`), seconds. A thread that ended is
/// counted in the first figure only.
fn cpu_secs() -> (f64, f64) {
    let all = stat_secs(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default());
    let mut server = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(c, _)| c);
        if comm.is_some_and(|c| c.starts_with(SERVER_THREADS) || c.starts_with("halfmq-")) {
            server += stat_secs(&stat);
        }
    }
    (all, server)
}

/// Run `tasks` tasks of `per_task` sends each: `send(sender, body, i)` makes send `i` with a
/// clone of `sender` and of the body.
async fn phase<S, F, Fut>(
    name: &'static str,
    (tasks, per_task): (usize, usize),
    (sender, body): (S, &[u8]),
    send: F,
) -> Phase
where
    S: Clone + Send + Sync + 'static,
    F: Fn(S, Vec<u8>, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (cpu0, t0) = (cpu_secs(), Instant::now());
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (send, sender, body) = (send.clone(), sender.clone(), body.to_vec());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let s = Instant::now();
                send(sender.clone(), body.clone(), t * per_task + i).await;
                lat.push(s.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut latencies_us = Vec::new();
    for h in handles {
        latencies_us.extend(h.await.expect("task"));
    }
    latencies_us.sort_unstable();
    let cpu1 = cpu_secs();
    Phase {
        name,
        secs: t0.elapsed().as_secs_f64(),
        latencies_us,
        cpu_secs: cpu1.0 - cpu0.0,
        server_cpu_secs: cpu1.1 - cpu0.1,
        per_call: 1,
    }
}

/// Messages per `batch_send` in the batch phase.
const BATCH: usize = 16;

#[tokio::main]
async fn main() {
    let args = common::numbers();
    let tasks = args.first().copied().unwrap_or(16);
    let per_task = args.get(1).copied().unwrap_or(500);
    let body = vec![b'x'; args.get(2).copied().unwrap_or(256)];
    let rounds_of_three = args.get(3).copied().unwrap_or(3).max(1);
    let served = common::serve(SERVER_THREADS).await;
    let (broker, serving, server, producer) = (
        &served.broker,
        &served.serving,
        &served.server,
        &served.producer,
    );
    let any = "127.0.0.1:0".parse().expect("an address");

    println!(
        "{tasks} tasks x {per_task} sends of {} bytes, flush sync",
        body.len()
    );
    let rounds = (tasks, per_task);
    // Each phase's own idempotency keys, so that each stores its messages.
    let keyed = |phase: &str, b: Vec<u8>, i: usize| {
        Message::new(b).with_idempotency_key(format!("{phase}-{i}"))
    };
    let embedded = |name: &'static str, prefix: &'static str| {
        phase(
            name,
            rounds,
            (broker.clone(), &body),
            move |br, b, i| async move {
                br.send_async("bench", &keyed(prefix, b, i))
                    .await
                    .expect("send");
            },
        )
    };
    // Unmeasured: the broker's first-use costs (index tables growing, fresh pages of
    // memory) would otherwise be paid by whichever phase runs first.
    embedded("warm-up", "warm-up").await;
    let official = || {
        phase(
            "official rocketmq 5",
            rounds,
            (producer.clone(), &body),
            |p, b, _| async move {
                let m = MessageBuilder::builder()
                    .set_topic("bench")
                    .set_body(b)
                    .build()
                    .expect("message");
                p.send(m).await.expect("send");
            },
        )
    };
    let batches = (tasks, per_task.div_ceil(BATCH));
    let batched = phase(
        "official rocketmq 5, batch 16",
        batches,
        (producer.clone(), &body),
        |p, b, _| async move {
            let batch = (0..BATCH).map(|_| {
                MessageBuilder::builder()
                    .set_topic("bench")
                    .set_body(b.clone())
                    .build()
                    .expect("message")
            });
            p.batch_send(batch.collect()).await.expect("send");
        },
    )
    .await;
    let batched = Phase {
        per_call: BATCH,
        ..batched
    };
    let url = format!("http://{}", server.local_addr());
    let raw = MessagingServiceClient::connect(url)
        .await
        .expect("connects");
    let grpc = phase(
        "plain gRPC client",
        rounds,
        (raw, &body),
        |mut c, b, i| async move {
            let m = pb::Message {
                topic: Some(pb::Resource {
                    resource_namespace: String::new(),
                    name: "bench".into(),
                }),
                system_properties: Some(pb::SystemProperties {
                    message_id: format!("grpc-{i}"),
                    message_type: pb::MessageType::Normal as i32,
                    ..Default::default()
                }),
                body: b,
                ..Default::default()
            };
            let r = c
                .send_message(pb::SendMessageRequest { messages: vec![m] })
                .await
                .expect("send")
                .into_inner();
            assert_eq!(r.status.map(|s| s.code), Some(pb::Code::Ok as i32));
        },
    )
    .await;
    let listen = halfmq_cli::server::ServerConfig::default().with_listen(any);
    let native_server = serving
        .spawn(halfmq_cli::server::Server::start(broker.clone(), listen))
        .await
        .expect("starts")
        .expect("native server");
    // halfmq's own client as configured by default (joining concurrent sends into batch
    // requests), and, like with like, with that automatic batching off: one request per
    // message, as the official producer sends.
    let native_addr = native_server.local_addr().to_string();
    let network = |name: &'static str, prefix: String, auto_batch: bool| {
        let mut config = halfmq_client::ClientConfig::new(native_addr.clone());
        config.auto_batch = auto_batch;
        let body = &body;
        async move {
            // A few bytes per round, for the life of this run: the sends' tasks need 'static.
            let prefix: &'static str = Box::leak(prefix.into_boxed_str());
            let client = Arc::new(
                halfmq_client::Client::connect(config)
                    .await
                    .expect("client"),
            );
            let measured = phase(
                name,
                rounds,
                (client.clone(), body),
                move |nc, b, i| async move {
                    nc.send("bench", &keyed(prefix, b, i)).await.expect("send");
                },
            )
            .await;
            (measured, client)
        }
    };
    let mut clients = Vec::new();
    // Per round: the official producer, halfmq's client, halfmq's client unbatched.
    let mut each = Vec::new();
    for round in 0..rounds_of_three {
        let rocketmq = official().await;
        let (native, c) = network("halfmq network client", format!("native-{round}"), true).await;
        clients.push(c);
        let (unbatched, c) = network(
            "halfmq client, no auto batch",
            format!("unbatched-{round}"),
            false,
        )
        .await;
        clients.push(c);
        println!("round {}:", round + 1);
        for p in [&rocketmq, &native, &unbatched] {
            p.print();
        }
        each.push([rocketmq, native, unbatched]);
    }
    let embedded = embedded("embedded send_async", "embedded").await;
    for p in [&batched, &grpc, &embedded] {
        p.print();
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for base in [1, 2] {
        let throughput: Vec<f64> = each.iter().map(|r| r[0].rate() / r[base].rate()).collect();
        let p99: Vec<f64> = each
            .iter()
            .map(|r| r[0].pct(0.99) as f64 / r[base].pct(0.99) as f64)
            .collect();
        let shown: Vec<String> = throughput.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "official rocketmq / {}: throughput {:.2} (median of {}), p99 {:.2}",
            each[0][base].name,
            median(throughput.clone()),
            shown.join(" "),
            median(p99)
        );
    }
    let last = &each[each.len() - 1];
    println!(
        "official rocketmq / {}: throughput {:.2}, p99 {:.2} (last round's)",
        embedded.name,
        last[0].rate() / embedded.rate(),
        last[0].pct(0.99) as f64 / embedded.pct(0.99) as f64
    );
    println!(
        "official rocketmq, batch {BATCH} / {}: throughput {:.2} (last round's)",
        last[1].name,
        batched.rate() / last[1].rate()
    );
    // The median over the rounds of a figure per message of each round's phase `i`.
    let per_message = |i: usize, f: &dyn Fn(&Phase) -> f64| {
        median(
            each.iter()
                .map(|r| f(&r[i]) * 1e6 / r[i].messages())
                .collect(),
        )
    };
    let serving_side = |i: usize| per_message(i, &|p| p.server_cpu_secs);
    let whole = |i: usize| per_message(i, &|p| p.cpu_secs);
    let producer_own = per_message(0, &|p| p.cpu_secs - p.server_cpu_secs);
    println!(
        "cpu per message (medians): endpoint {:.1} us, official producer itself {producer_own:.1} us; native server {:.1} us, halfmq client and server {:.1} us (unbatched {:.1} us, {:.1} us)",
        serving_side(0),
        serving_side(1),
        whole(1),
        serving_side(2),
        whole(2)
    );
    // While the phases are CPU-bound, throughput follows CPU per message: the ratio an
    // endpoint costing nothing would reach is halfmq's whole path over the producer's own.
    println!(
        "official rocketmq / halfmq network client with an endpoint costing no CPU, if CPU-bound: {:.2}",
        whole(1) / producer_own
    );
    drop(clients);
    serving
        .spawn(native_server.shutdown())
        .await
        .expect("stops");
    served.stop().await;
}
