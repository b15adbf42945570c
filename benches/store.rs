//! Criterion benchmarks of the storage path. `record`: encoding a 1 KiB-body record (with
//! topic and key, no properties) into a reused buffer, and decoding it again, in bytes per
//! second of encoded record. `append`: durable sends (`FlushPolicy::Sync`, so each send
//! waits for `fdatasync`, shared by concurrent senders through group commit) of 1 KiB
//! bodies to an embedded broker, from 1 and from 64 threads, as time per message. `read`:
//! reading back, in order, a queue of 20,000 1 KiB messages that was filled once, through
//! `Store::read_messages` (256 at a time) and through `Broker::poll` with a fresh consumer
//! group per iteration; the data was just written, so this is a warm page-cache read.
//! `metrics`: what recording costs a send (`TopicCounters::message_in`, the one call on the
//! send path; `metrics::message_in`, the look-up by name commits use) with no recorder
//! installed and with the Prometheus recorder, per call.
//! Data directories are created under Cargo's target tmp dir (on the project's disk, not a
//! tmpfs) and removed afterwards. The machine these run on is shared and its disk is a
//! virtual one: figures are only comparable with each other within one run, never across
//! runs or machines.

use std::cell::OnceCell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use halfmq::{Broker, BrokerConfig, FlushPolicy, Message, StoreConfig};
use halfmq_store::record::{self, Header, RecordKind};
use tempfile::TempDir;

/// Body bytes of every message and record.
const BODY_BYTES: usize = 1024;
/// Messages in the queue the read benchmarks read back.
const READ_MESSAGES: u64 = 20_000;
/// Messages per `read_messages` call and per `poll`.
const READ_BATCH: usize = 256;
/// Concurrent senders in the group-commit benchmark.
const SENDERS: u64 = 64;

/// A body that is not all one byte.
fn body() -> Vec<u8> {
    (0..BODY_BYTES).map(|i| (i * 31 % 251) as u8).collect()
}

/// An embedded broker in its own data directory, closed and removed on drop.
struct Fixture {
    broker: std::sync::Arc<Broker>,
    name: &'static str,
    // Declared after `broker`, so dropped after it.
    _dir: TempDir,
}

impl Fixture {
    fn open(name: &'static str, flush: FlushPolicy) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("halfmq-bench-store-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("create a data directory under the target dir");
        let mut config = BrokerConfig::new(dir.path().join("broker"));
        config.store = StoreConfig::default().with_flush(flush);
        let broker = Broker::open(config).expect("open the broker");
        Fixture {
            broker,
            name,
            _dir: dir,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let log = self.broker.store().log_stats();
        if log.records > 0 {
            eprintln!(
                "{}: {} records appended in {} log fsyncs ({:.1} records per fsync)",
                self.name,
                log.records,
                log.syncs,
                log.records as f64 / log.syncs.max(1) as f64
            );
        }
        if let Err(e) = self.broker.close() {
            eprintln!("{}: closing the broker failed: {e}", self.name);
        }
    }
}

fn bench_record(c: &mut Criterion) {
    let header = Header {
        kind: RecordKind::Message,
        flags: 0,
        queue_id: 3,
        log_offset: 1 << 30,
        queue_offset: 123_456,
        timestamp_ms: 1_700_000_000_000,
    };
    let topic = "payments";
    let key = "order-000001";
    let body = body();
    let mut encoded = Vec::new();
    let len = record::encode_into(&mut encoded, &header, topic, key, &[], &body)
        .expect("encode the sample record");

    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Bytes(u64::from(len)));

    let mut buf = Vec::with_capacity(encoded.len());
    group.bench_function("encode_1KiB", |b| {
        b.iter(|| {
            buf.clear();
            record::encode_into(
                &mut buf,
                black_box(&header),
                black_box(topic),
                black_box(key),
                black_box(&[]),
                black_box(&body),
            )
            .expect("encode")
        })
    });
    // Empty when a filter skipped the benchmark (`cargo bench --bench store -- read`).
    assert!(
        buf.is_empty() || buf == encoded,
        "the benchmark encoded something else"
    );

    group.bench_function("decode_1KiB", |b| {
        b.iter(|| {
            let (view, n) = record::decode(black_box(&encoded)).expect("decode");
            black_box(view);
            n
        })
    });
    group.finish();
}

/// A benchmark group of few, short samples (for what syncs or fills a store), counting
/// `throughput` per iteration.
fn short_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    throughput: Throughput,
) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(throughput);
    group
}

fn bench_append(c: &mut Criterion) {
    let mut group = short_group(c, "append", Throughput::Elements(1));
    // Each send waits for an fdatasync: keep the warm-up short too.
    group.warm_up_time(Duration::from_secs(1));
    let msg = Message::new(body());

    // Brokers are opened on first use, so a filter that skips a benchmark skips its setup.
    let single = OnceCell::new();
    group.bench_function("sync_1KiB_1_thread", |b| {
        let fx = single.get_or_init(|| {
            let fx = Fixture::open("append/sync_1KiB_1_thread", FlushPolicy::Sync);
            fx.broker.create_topic("append", 8).expect("create topic");
            fx
        });
        b.iter(|| fx.broker.send("append", &msg).expect("send"))
    });
    drop(single);

    let many = OnceCell::new();
    group.bench_function("sync_1KiB_64_threads", |b| {
        let fx = many.get_or_init(|| {
            let fx = Fixture::open("append/sync_1KiB_64_threads", FlushPolicy::Sync);
            fx.broker.create_topic("append", 8).expect("create topic");
            fx
        });
        let broker = &fx.broker;
        let msg = &msg;
        b.iter_custom(|iters| {
            // Every thread is started and waiting before the clock starts; the clock stops
            // when the last one has finished its share.
            let start_line = Barrier::new(SENDERS as usize + 1);
            let start_line = &start_line;
            std::thread::scope(|s| {
                for t in 0..SENDERS {
                    let share = iters / SENDERS + u64::from(t < iters % SENDERS);
                    s.spawn(move || {
                        start_line.wait();
                        for _ in 0..share {
                            broker.send("append", msg).expect("send");
                        }
                    });
                }
                start_line.wait();
                Instant::now()
            })
            .elapsed()
        })
    });
    drop(many);
    group.finish();
}

fn bench_read(c: &mut Criterion) {
    let mut group = short_group(c, "read", Throughput::Elements(READ_MESSAGES));

    // Filled once, on first use, by a broker with async flush (one sync at the end): the
    // fill is setup, not what is measured.
    let filled = OnceCell::new();
    let fixture = || {
        filled.get_or_init(|| {
            let fx = Fixture::open(
                "read",
                FlushPolicy::Async {
                    interval: Duration::from_millis(10),
                },
            );
            fx.broker.create_topic("read", 1).expect("create topic");
            let msg = Message::new(body()).with_key("reader");
            for _ in 0..READ_MESSAGES {
                fx.broker.send("read", &msg).expect("send");
            }
            fx.broker.store().sync().expect("sync");
            let queue = fx.broker.store().queue("read", 0).expect("queue");
            assert_eq!(queue.len(), READ_MESSAGES);
            fx
        })
    };

    group.bench_function("read_messages_20k_1KiB", |b| {
        let fx = fixture();
        let store = fx.broker.store();
        let queue = store.queue("read", 0).expect("queue");
        b.iter(|| {
            let mut from = 0;
            let mut bytes = 0;
            loop {
                let batch = store
                    .read_messages(&queue, from, READ_BATCH)
                    .expect("read messages");
                let Some((last, _)) = batch.last() else { break };
                from = last + 1;
                bytes += batch.iter().map(|(_, r)| r.body.len()).sum::<usize>();
            }
            assert_eq!(from, READ_MESSAGES);
            bytes
        })
    });

    let groups = AtomicU64::new(0);
    group.bench_function("poll_20k_1KiB_fresh_group", |b| {
        let fx = fixture();
        b.iter(|| {
            let group = format!("g{}", groups.fetch_add(1, Ordering::Relaxed));
            let mut got = 0;
            loop {
                let batch = fx.broker.poll(&group, "read", READ_BATCH).expect("poll");
                if batch.is_empty() {
                    break;
                }
                got += batch.len() as u64;
                black_box(batch);
            }
            assert_eq!(got, READ_MESSAGES);
            got
        })
    });
    drop(filled);
    group.finish();
}

fn bench_metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics");
    group.bench_function("message_in_no_recorder", |b| {
        b.iter(|| halfmq::metrics::message_in(black_box("payments"), black_box(BODY_BYTES)))
    });
    let counters = halfmq::metrics::TopicCounters::new("payments");
    group.bench_function("topic_counters_no_recorder", |b| {
        b.iter(|| counters.message_in(black_box(BODY_BYTES)))
    });
    let rec = halfmq::metrics::recorder();
    metrics::with_local_recorder(&rec, || {
        group.bench_function("message_in_prometheus", |b| {
            b.iter(|| halfmq::metrics::message_in(black_box("payments"), black_box(BODY_BYTES)))
        });
        let counters = halfmq::metrics::TopicCounters::new("payments");
        group.bench_function("topic_counters_prometheus", |b| {
            b.iter(|| counters.message_in(black_box(BODY_BYTES)))
        });
    });
    group.finish();
    let text = rec.handle().render();
    assert!(
        halfmq::metrics::sample_sum(&text, halfmq::metrics::MESSAGES_IN) > 0.0,
        "the recorder counted nothing: {text}"
    );
}

criterion_group!(
    benches,
    bench_record,
    bench_append,
    bench_read,
    bench_metrics
);
criterion_main!(benches);
