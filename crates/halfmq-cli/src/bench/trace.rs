//! `trace` of one key among millions: fill a store with keyed messages, time traces, reopen,
//! time them again.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use halfmq::{Broker, BrokerConfig, Error, Message, Result};

use super::load::wait_for_tasks;
use super::report::{histogram, round2};

/// Result of [`run_trace`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TraceBenchReport {
    /// `"trace"`.
    pub mode: String,
    /// Keyed messages stored (one key each, `order-<n>`).
    pub messages: u64,
    /// Time to write them (durable: synchronous flush, many sends in flight), seconds.
    pub fill_seconds: f64,
    /// Messages per second while filling.
    pub fill_msgs_per_s: f64,
    /// Messages per second of the same fill without keys (nothing to index), over
    /// `baseline_messages` messages.
    pub unindexed_msgs_per_s: f64,
    /// Messages in the unindexed fill.
    pub baseline_messages: u64,
    /// `fill_msgs_per_s / unindexed_msgs_per_s`.
    pub ratio_to_unindexed: f64,
    /// After the last send: time until the index had caught up with the log, seconds.
    pub index_catch_up_seconds: f64,
    /// Key index files and their total size.
    pub index_files: usize,
    /// Bytes of the key index files.
    pub index_bytes: u64,
    /// Traces measured per run (random existing keys).
    pub samples: u64,
    /// Latency of one `Broker::trace` right after the fill, µs: p50, p99, max.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Time to close and reopen the broker, seconds.
    pub reopen_seconds: f64,
    /// The same after the reopen.
    pub reopened_p50_us: u64,
    /// 99th percentile after the reopen.
    pub reopened_p99_us: u64,
    /// Largest after the reopen.
    pub reopened_max_us: u64,
    /// Latency of tracing a key that does not exist, µs (p50).
    pub unknown_key_p50_us: u64,
}

impl std::fmt::Display for TraceBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trace of one key among {} messages: p50 {} µs, p99 {} µs, max {} µs ({} samples); \
             after reopen ({:.1} s): p50 {} µs, p99 {} µs, max {} µs; unknown key p50 {} µs; \
             fill {:.1} s ({:.0} msg/s, {:.2} of the unindexed {:.0} msg/s over {} messages); \
             index caught up {:.2} s after the last send; {} index files, {} MiB",
            self.messages,
            self.p50_us,
            self.p99_us,
            self.max_us,
            self.samples,
            self.reopen_seconds,
            self.reopened_p50_us,
            self.reopened_p99_us,
            self.reopened_max_us,
            self.unknown_key_p50_us,
            self.fill_seconds,
            self.fill_msgs_per_s,
            self.ratio_to_unindexed,
            self.unindexed_msgs_per_s,
            self.baseline_messages,
            self.index_catch_up_seconds,
            self.index_files,
            self.index_bytes / (1024 * 1024)
        )
    }
}

/// Send `messages` messages (keyed `order-<n>` when `keys`) to topic `orders` with many sends
/// in flight, so that every group commit carries a large batch. Returns seconds taken.
fn fill(
    broker: &Arc<Broker>,
    messages: u64,
    keys: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<f64> {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(broker.data_dir(), "start runtime", e))?;
    let tasks: Vec<_> = (0..512)
        .map(|_| {
            let (broker, next) = (broker.clone(), next.clone());
            rt.spawn(async move {
                let mut msg = Message::new(&b"confirmation"[..]);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= messages {
                        return Ok::<(), Error>(());
                    }
                    if keys {
                        msg.key = format!("order-{i}");
                    }
                    broker.send_async("orders", &msg).await?;
                }
            })
        })
        .collect();
    wait_for_tasks(&rt, tasks, Duration::from_secs(10), || {
        progress(&format!(
            "filling: {} of {messages} ({:.0} s)",
            next.load(Ordering::Relaxed).min(messages),
            start.elapsed().as_secs_f64()
        ))
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// Time `samples` traces of random keys `order-<n>`, n < `messages`; each must find exactly
/// one message. Returns the latency histogram (µs).
fn time_traces(broker: &Broker, messages: u64, samples: u64, seed: u64) -> Result<Histogram<u64>> {
    let mut hist = histogram();
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..samples {
        let key = format!("order-{}", rng.u64(0..messages));
        let t = Instant::now();
        let tr = broker.trace(&key)?;
        let us = t.elapsed().as_micros() as u64;
        if tr.messages.len() != 1 {
            return Err(Error::Invalid {
                what: "trace bench",
                reason: format!("{key}: {} messages traced, expected 1", tr.messages.len()),
            });
        }
        let _ = hist.record(us.max(1));
    }
    Ok(hist)
}

/// Fill a store with `messages` keyed messages (durably, many in flight), wait for the key
/// index, time `Broker::trace` of `samples` random keys, close and reopen, and time them
/// again. A keyless fill of up to 2 M messages first gives the throughput without indexing.
pub fn run_trace(
    data_dir: &Path,
    messages: u64,
    samples: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<TraceBenchReport> {
    if messages == 0 || samples == 0 {
        return Err(Error::Config {
            setting: "messages",
            reason: "--messages and --samples must be at least 1".into(),
        });
    }
    let config = |name: &str| {
        let mut c = BrokerConfig::new(data_dir.join(name));
        c.txn.check_back = false;
        c.store.segment_bytes = 1024 * 1024 * 1024;
        c
    };
    // 1. Without keys: nothing for the indexer to do.
    let baseline_messages = messages.min(2_000_000);
    let unindexed_msgs_per_s = {
        let broker = Broker::open(config("unindexed"))?;
        broker.create_topic("orders", 8)?;
        let s = fill(&broker, baseline_messages, false, progress)?;
        broker.close()?;
        drop(broker);
        let _ = std::fs::remove_dir_all(data_dir.join("unindexed"));
        baseline_messages as f64 / s
    };
    progress(&format!(
        "unindexed fill: {unindexed_msgs_per_s:.0} msg/s over {baseline_messages} messages"
    ));
    // 2. Keyed.
    let broker = Broker::open(config("trace"))?;
    broker.create_topic("orders", 8)?;
    let fill_seconds = fill(&broker, messages, true, progress)?;
    let caught = Instant::now();
    loop {
        let durable = broker.store().log_stats().durable_offset;
        if broker.key_index().indexed_upto() >= durable {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let index_catch_up_seconds = caught.elapsed().as_secs_f64();
    progress(&format!(
        "filled in {fill_seconds:.1} s, index caught up {index_catch_up_seconds:.2} s later; tracing {samples} random keys ..."
    ));
    let hist = time_traces(&broker, messages, samples, 7)?;
    let reopen_start = Instant::now();
    broker.close()?;
    drop(broker);
    let broker = Broker::open(config("trace"))?;
    let reopen_seconds = reopen_start.elapsed().as_secs_f64();
    progress(&format!(
        "closed and reopened in {reopen_seconds:.1} s; tracing {samples} random keys ..."
    ));
    let reopened = time_traces(&broker, messages, samples, 8)?;
    let mut unknown = histogram();
    for i in 0..samples.min(1000) {
        let t = Instant::now();
        let tr = broker.trace(&format!("no-such-order-{i}"))?;
        let _ = unknown.record((t.elapsed().as_micros() as u64).max(1));
        if !tr.messages.is_empty() {
            return Err(Error::Invalid {
                what: "trace bench",
                reason: "an unknown key was traced to a message".into(),
            });
        }
    }
    let index_dir = broker.key_index().dir().to_path_buf();
    let index_files = broker.key_index().files();
    broker.close()?;
    let index_bytes = std::fs::read_dir(&index_dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let fill_msgs_per_s = messages as f64 / fill_seconds;
    Ok(TraceBenchReport {
        mode: "trace".into(),
        messages,
        fill_seconds: round2(fill_seconds),
        fill_msgs_per_s: round2(fill_msgs_per_s),
        unindexed_msgs_per_s: round2(unindexed_msgs_per_s),
        baseline_messages,
        ratio_to_unindexed: round2(fill_msgs_per_s / unindexed_msgs_per_s),
        index_catch_up_seconds: round2(index_catch_up_seconds),
        index_files,
        index_bytes,
        samples,
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        reopen_seconds: round2(reopen_seconds),
        reopened_p50_us: reopened.value_at_quantile(0.50),
        reopened_p99_us: reopened.value_at_quantile(0.99),
        reopened_max_us: reopened.value_at_quantile(1.0),
        unknown_key_p50_us: unknown.value_at_quantile(0.50),
    })
}
