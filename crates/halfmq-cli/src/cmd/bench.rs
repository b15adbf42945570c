//! `halfmq bench`: measure durable throughput and latency (the load generator itself is the
//! library's [`halfmq_cli::bench`]); this module turns flags into its options and prints its
//! reports, as text and, with `--json`, as one JSON object on the last line.

use std::path::PathBuf;

use clap::Args;
use halfmq::Result;
use halfmq_cli::bench::{self, BenchOptions, BenchReport};
use halfmq_cli::settings::{Flush, FLUSH_INTERVAL_DEFAULT};

use super::print_json;

/// `halfmq bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Against an embedded broker in this process.
    #[arg(long, conflicts_with = "addr", required_unless_present_any = ["addr", "trace"])]
    embedded: bool,
    /// Against the broker at this address (mode "broker").
    #[arg(long)]
    addr: Option<String>,
    /// Shared secret for --addr.
    #[arg(long, env = "HALFMQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connections for --addr; producers share them, many requests in flight on each.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// With --addr: the client does not coalesce concurrent sends into batch requests
    /// (its automatic batching is on by default), to compare the two in one run.
    #[arg(long, requires = "addr")]
    no_auto_batch: bool,
    /// With --addr: how long a queued send may wait for an answer before its batch leaves
    /// (the client's batch_linger; 0: one pass of the executor).
    #[arg(long, requires = "addr", default_value_t = 0)]
    batch_linger_us: u64,
    /// With --addr: each request an explicit batch of this many messages (send_batch);
    /// --in-flight then counts batches and the latency is a batch's.
    #[arg(long, requires = "addr", default_value_t = 1)]
    batch: usize,
    /// With --addr: afterwards, the same load on an embedded broker in this process, for
    /// ratio_to_embedded.
    #[arg(long, requires = "addr")]
    compare_embedded: bool,
    /// Data directory for embedded runs (default: a fresh directory here, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Concurrent producers.
    #[arg(long, default_value_t = 64)]
    producers: usize,
    /// Sends each producer keeps in flight: it issues the next without waiting for the
    /// previous acknowledgement, up to this many outstanding (async producers only).
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Body bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Stop after this many messages.
    #[arg(long)]
    messages: Option<u64>,
    /// Stop after this many seconds (default 10 when --messages is not given).
    #[arg(long)]
    seconds: Option<f64>,
    /// When a send is acknowledged (embedded).
    #[arg(long, value_enum, default_value = "sync")]
    flush: Flush,
    /// First measure the raw disk (write + fdatasync) on the same directory (with --addr:
    /// on the bench's directory, alternating with the network runs, `--rounds` times).
    #[arg(long, conflicts_with = "compare_embedded")]
    baseline: bool,
    /// One OS thread per producer calling the blocking send (default: async tasks).
    #[arg(long)]
    threads: bool,
    /// Worker threads of the runtime the async producers run on (default: with --addr one,
    /// embedded one per core but no more than --producers: one producer on two workers pays
    /// a hand-off between them on every answer, which is the load generator's cost, not the
    /// broker's).
    #[arg(long, conflicts_with = "threads")]
    runtime_threads: Option<usize>,
    /// Transactions: each message is a half message plus a commit; plain sends are measured
    /// first in the same run, for ratio_to_plain.
    #[arg(long)]
    txn: bool,
    /// Instead: the cost of one check-back tick with --pending unfinished transactions of
    /// which --due are due.
    #[arg(long, conflicts_with = "txn")]
    txn_tick: bool,
    /// Every message with a unique idempotency key; sends without keys are measured first
    /// in the same run, for ratio_to_without_keys.
    #[arg(long, conflicts_with_all = ["txn", "txn_tick", "addr"])]
    idempotency_keys: bool,
    /// With --txn, --idempotency-keys, --compare-embedded or --consume --baseline (default
    /// 3), or --baseline with plain sends (default 1): run the pair (without, with; or raw
    /// disk, store or consumers) this many times, alternating; the ratio is the median of the
    /// rounds' ratios (robust to a burst of load from other processes on a shared machine,
    /// and to the disk's own rate moving).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
    /// Instead: fill a store with --messages keyed messages (default 10 000 000), time
    /// `trace` of --samples random keys, reopen it and time them again; a keyless fill of up
    /// to 2 000 000 messages first gives the fill's ratio_to_unindexed.
    #[arg(long, conflicts_with_all = ["txn", "txn_tick", "addr", "idempotency_keys"])]
    trace: bool,
    /// Traces to time for --trace.
    #[arg(long, default_value_t = 1000)]
    samples: u64,
    /// Unfinished transactions for --txn-tick.
    #[arg(long, default_value_t = 1_000_000)]
    pending: u64,
    /// Due transactions for --txn-tick.
    #[arg(long, default_value_t = 100)]
    due: u64,
    /// Instead: --consumers consumers of one group poll batches of up to --poll-max from a
    /// topic filled with --prefill messages first, and ack each batch with one call, for
    /// --seconds; with --baseline, alternating with the raw disk's fdatasync rate (--rounds,
    /// default 3), for ratio_to_raw_fsync.
    #[arg(long, conflicts_with_all = [
        "txn", "txn_tick", "idempotency_keys", "trace", "compare_embedded", "messages",
        "producers", "in_flight", "threads", "flush", "metrics",
    ])]
    consume: bool,
    /// Consumers in the one group of --consume.
    #[arg(long, requires = "consume", default_value_t = 8)]
    consumers: usize,
    /// Messages each poll of --consume asks for; each batch is acked with one call.
    #[arg(long, requires = "consume", default_value_t = 32)]
    poll_max: usize,
    /// Messages written to the topic before --consume measures (default: 400 000 per second
    /// of --seconds, so that the consumers do not run dry).
    #[arg(long, requires = "consume")]
    prefill: Option<u64>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Install the Prometheus recorder (as `broker --metrics` does) and scrape it every
    /// second during the run, to measure what metrics cost (embedded runs).
    #[arg(long, conflicts_with = "addr")]
    metrics: bool,
}

/// Run the bench the flags ask for (on the calling thread: it blocks) and print its report.
pub fn run(a: BenchArgs) -> Result<()> {
    let (data_dir, cleanup) = match &a.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            PathBuf::from(format!("halfmq-bench-{}", std::process::id())),
            true,
        ),
    };
    let progress = &mut |line: &str| eprintln!("{line}");
    if a.trace {
        let messages = a.messages.unwrap_or(10_000_000);
        eprintln!(
            "halfmq bench: mode=trace messages={messages} samples={} dir={}",
            a.samples,
            data_dir.display()
        );
        let r = bench::run_trace(&data_dir, messages, a.samples, progress);
        return report(r, &data_dir, cleanup, a.json, |r| r.to_string());
    }
    if a.txn_tick {
        eprintln!(
            "halfmq bench: mode=txn_tick pending={} due={} dir={}",
            a.pending,
            a.due,
            data_dir.display()
        );
        let r = bench::run_check_tick(&data_dir, a.pending, a.due, progress);
        return report(r, &data_dir, cleanup, a.json, |r| {
            format!(
                "one check-back tick with {} pending, {} due: {} µs (start checks {} µs + apply answers {} µs); setup wrote the halves in {:.1} s",
                r.pending, r.due, r.tick_us, r.dispatch_us, r.apply_us, r.fill_seconds
            )
        });
    }
    if a.consume {
        return consume(&a, data_dir, cleanup, progress);
    }
    let opts = a.options(data_dir, cleanup)?;
    eprintln!(
        "halfmq bench: mode={} producers={} in_flight={} size={} flush={} metrics={} messages={:?} seconds={:?} dir={} cores={}",
        if a.addr.is_some() {
            "broker"
        } else if a.txn {
            "txn"
        } else if a.idempotency_keys {
            "idempotency_keys"
        } else {
            "embedded"
        },
        a.producers,
        a.in_flight,
        a.size,
        a.flush.name(),
        if a.metrics { "recorder" } else { "none" },
        a.messages,
        a.seconds,
        opts.data_dir.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    let r = match &a.addr {
        Some(addr) => bench::run_network(
            &opts,
            addr,
            a.token.clone(),
            a.connections,
            a.compare_embedded,
            bench::NetBatching {
                auto: !a.no_auto_batch,
                linger: std::time::Duration::from_micros(a.batch_linger_us),
                explicit: a.batch,
            },
            progress,
        )?,
        None => bench::run_embedded(&opts, progress)?,
    };
    super::println_flush(&summary(&r));
    if a.json {
        print_json(&r);
    }
    Ok(())
}

impl BenchArgs {
    /// The load generator's options for a producers run (not `--trace` or `--txn-tick`).
    fn options(&self, data_dir: PathBuf, cleanup: bool) -> Result<BenchOptions> {
        let flush = self.flush.policy(FLUSH_INTERVAL_DEFAULT);
        Ok(BenchOptions {
            data_dir,
            cleanup,
            producers: self.producers,
            in_flight: self.in_flight,
            threads: self.threads,
            runtime_threads: self.runtime_threads,
            size: self.size,
            messages: self.messages,
            seconds: self.seconds,
            flush,
            baseline: self.baseline,
            txn: self.txn,
            idempotency_keys: self.idempotency_keys,
            // Raw disk and store alternate in one process; at high rates, on this project's
            // virtual machine, later rounds ran up to 2x slower than the first (the flusher's
            // copy into the page cache), which separate runs did not: one round unless asked.
            rounds: self.rounds.unwrap_or(
                if self.txn || self.idempotency_keys || self.addr.is_some() {
                    3
                } else {
                    1
                },
            ),
            metrics: if self.metrics {
                Some(halfmq::metrics::install()?)
            } else {
                None
            },
        })
    }
}

/// `--consume`: consumers polling and acking batches of a prefilled topic.
fn consume(
    a: &BenchArgs,
    data_dir: PathBuf,
    cleanup: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let seconds = a.seconds.unwrap_or(10.0);
    let opts = bench::ConsumeOptions {
        data_dir,
        cleanup,
        consumers: a.consumers,
        poll_max: a.poll_max,
        prefill: a
            .prefill
            .unwrap_or(((seconds * 400_000.0).ceil() as u64).max(10_000)),
        size: a.size,
        seconds,
        baseline: a.baseline,
        rounds: a.rounds.unwrap_or(if a.baseline { 3 } else { 1 }),
    };
    let target = match &a.addr {
        Some(addr) => bench::ConsumeTarget::Network {
            addr: addr.clone(),
            token: a.token.clone(),
            connections: a.connections,
        },
        None => bench::ConsumeTarget::Embedded,
    };
    eprintln!(
        "halfmq bench: mode=consume consumers={} poll_max={} prefill={} size={} seconds={} baseline={} rounds={} target={} dir={} cores={}",
        opts.consumers,
        opts.poll_max,
        opts.prefill,
        opts.size,
        opts.seconds,
        opts.baseline,
        opts.rounds,
        a.addr.as_deref().unwrap_or("embedded"),
        opts.data_dir.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    let r = bench::run_consume(&opts, &target, progress)?;
    super::println_flush(&r.to_string());
    if a.json {
        print_json(&r);
    }
    Ok(())
}

/// Remove the bench's own directory, then print a finished report as text (and as JSON).
/// The directory goes first, also when the run failed, so that a failed bench leaves
/// nothing behind.
fn report<R: serde::Serialize>(
    r: Result<R>,
    data_dir: &std::path::Path,
    cleanup: bool,
    json: bool,
    text: impl Fn(&R) -> String,
) -> Result<()> {
    if cleanup {
        let _ = std::fs::remove_dir_all(data_dir);
    }
    let r = r?;
    super::println_flush(&text(&r));
    if json {
        print_json(&r);
    }
    Ok(())
}

/// A producers run for people: throughput and latency, then what it was compared with.
fn summary(r: &BenchReport) -> String {
    let mut out = format!(
        "{} msgs in {:.2} s: {:.0} msg/s, {:.1} MiB/s; latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        r.messages, r.seconds, r.msgs_per_s, r.mib_per_s, r.p50_us, r.p99_us, r.p999_us, r.max_us
    );
    let mut line = |l: String| {
        out.push('\n');
        out.push_str(&l);
    };
    if r.fsyncs_per_s > 0.0 {
        line(format!(
            "group commit: {:.0} fsyncs/s, {:.1} messages per fsync",
            r.fsyncs_per_s, r.msgs_per_fsync
        ));
    }
    if let (Some(raw), Some(ratio), Some(p99), Some(pr)) = (
        r.raw_group_msgs_per_s,
        r.ratio_to_raw,
        r.raw_serial_fsync_p99_us,
        r.p99_ratio_to_raw_fsync,
    ) {
        line(format!(
            "raw disk: {raw:.0} msg/s of this size in 256 KiB fsynced writes ({:.1} MiB/s); one 1 KiB write+fdatasync p50 {} µs, p99 {p99} µs",
            r.raw_group_mib_per_s.unwrap_or_default(),
            r.raw_serial_fsync_p50_us.unwrap_or_default()
        ));
        line(format!(
            "ratio to raw throughput: {ratio:.3}; p99 / raw fsync p99: {pr:.2}"
        ));
        if let (Some(p50), Some(over)) = (r.raw_serial_fsync_p50_us, r.p50_over_raw_fsync_us) {
            line(format!(
                "one 1 KiB write+fdatasync p50 {p50} µs; send p50 minus that: {over} µs"
            ));
        }
    }
    if !r.round_ratios.is_empty() {
        line(format!(
            "ratios of the {} rounds: {:?} (the median is reported)",
            r.round_ratios.len(),
            r.round_ratios
        ));
    }
    if let (Some(plain), Some(ratio)) = (r.plain_msgs_per_s, r.ratio_to_plain) {
        line(format!("plain durable sends in the same run: {plain:.0} msg/s; transactions / plain: {ratio:.3}"));
    }
    if let (Some(plain), Some(ratio)) = (r.without_keys_msgs_per_s, r.ratio_to_without_keys) {
        line(format!("sends without idempotency keys in the same run: {plain:.0} msg/s; with keys / without: {ratio:.3}"));
    }
    if let (Some(emb), Some(ratio)) = (r.embedded_msgs_per_s, r.ratio_to_embedded) {
        line(format!(
            "embedded broker in the same run: {emb:.0} msg/s; network / embedded: {ratio:.3}"
        ));
    }
    if r.metrics_recorder {
        line(format!(
            "metrics recorder: {} scrapes; halfmq_messages_in_total grew by {}",
            r.metrics_scrapes.unwrap_or_default(),
            r.metrics_messages_in.unwrap_or_default()
        ));
    }
    out
}
