//! The load generator behind `halfmq bench`, and the raw-disk baseline it is compared with.
//!
//! Figures on shared machines are noisy, so the useful output is a ratio measured in one
//! run: `--baseline` first measures what the disk itself can do on the same directory
//! (`fdatasync` one small write at a time, and large writes), then the broker.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::config::{BrokerConfig, FlushPolicy, StoreConfig};
use crate::error::{Error, Result};
use crate::store::io::{FsStorage, Storage};
use crate::txn::HalfOptions;
use crate::{Broker, Message};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Directory for the data (created; removed afterwards if `cleanup`).
    pub data_dir: PathBuf,
    /// Remove `data_dir` when done.
    pub cleanup: bool,
    /// Concurrent producers.
    pub producers: usize,
    /// Sends each producer keeps in flight (async tasks only): a producer issues the next
    /// send without waiting for the previous acknowledgement, up to this many outstanding,
    /// as a pipelining client (Kafka's `max.in.flight`, RocketMQ's async send) does. 1: one
    /// send at a time.
    pub in_flight: usize,
    /// One OS thread per producer calling the blocking `send`, instead of async tasks on a
    /// tokio runtime with one worker per core.
    pub threads: bool,
    /// Body bytes per message.
    pub size: usize,
    /// Stop after this many messages...
    pub messages: Option<u64>,
    /// ...or after this long (default 10 s when neither is given).
    pub seconds: Option<f64>,
    /// Flush policy of the broker under test.
    pub flush: FlushPolicy,
    /// Measure the raw disk first.
    pub baseline: bool,
    /// Transactions instead of plain sends: each producer writes a half message and commits
    /// it (two durable records per message). Plain sends are measured first in the same run
    /// for `ratio_to_plain`.
    pub txn: bool,
    /// Plain sends each with a unique idempotency key. Plain sends without keys are measured
    /// first in the same run, for `ratio_to_without_keys`.
    pub idempotency_keys: bool,
    /// With `txn`, `idempotency_keys`, a network run compared with an embedded one, or plain
    /// sends with `baseline` (the raw disk): how many times to run the pair (baseline and
    /// measured), alternating, each on a fresh data directory. The ratio reported is the
    /// median of the rounds' ratios, so that a burst of load from another process on a
    /// shared machine skews one round, not the result. At least 1.
    pub rounds: u32,
    /// The handle of an installed metrics recorder ([`crate::metrics::install`]): during the
    /// run a thread scrapes it every second as the `/metrics` endpoint would (gauges
    /// refreshed from `Broker::stats`, then rendered), and the report says what it counted.
    /// `None`: no recorder, every metrics call is a no-op.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// What each producer does per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Plain,
    Txn,
    /// Plain sends with a unique idempotency key each.
    Keyed,
}

impl Workload {
    fn describe(self) -> &'static str {
        match self {
            Workload::Plain => "plain durable sends",
            Workload::Txn => "transactions: send_half + commit",
            Workload::Keyed => "durable sends with a unique idempotency key each",
        }
    }

    fn dir_name(self) -> &'static str {
        match self {
            Workload::Plain => "plain",
            Workload::Txn => "txn",
            Workload::Keyed => "keyed",
        }
    }
}

/// The result; printed as one JSON object.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BenchReport {
    /// `"embedded"` (or `"broker"`, `"txn"` for other modes).
    pub mode: String,
    /// Concurrent producers.
    pub producers: usize,
    /// Sends each producer keeps in flight.
    pub in_flight: usize,
    /// `"tasks"` (async sends on a tokio runtime) or `"threads"` (one OS thread per producer,
    /// blocking sends).
    pub producer_kind: String,
    /// Body bytes per message.
    pub msg_bytes: usize,
    /// `"sync"` or `"async"`.
    pub flush: String,
    /// Messages acknowledged.
    pub messages: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Acknowledged messages per second.
    pub msgs_per_s: f64,
    /// Body megabytes (2^20) per second.
    pub mib_per_s: f64,
    /// Send latency percentiles, microseconds.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Log fsyncs per second during the run (group commits).
    pub fsyncs_per_s: f64,
    /// Mean messages made durable by one fsync.
    pub msgs_per_fsync: f64,
    /// The raw disk's one-at-a-time 1 KiB write + fdatasync rate (with `--baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_serial_fsync_ops_per_s: Option<f64>,
    /// p99 latency of one 1 KiB write + fdatasync, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_serial_fsync_p99_us: Option<u64>,
    /// Sequential 256 KiB write + fdatasync throughput, MiB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_group_mib_per_s: Option<f64>,
    /// That throughput in messages of `msg_bytes`: the disk's limit for this message size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_group_msgs_per_s: Option<f64>,
    /// `msgs_per_s / raw_group_msgs_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_raw: Option<f64>,
    /// `p99_us / raw_serial_fsync_p99_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ratio_to_raw_fsync: Option<f64>,
    /// With `--txn`: plain durable sends per second, measured first in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_msgs_per_s: Option<f64>,
    /// With `--idempotency-keys`: sends without keys per second, measured first in the
    /// same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub without_keys_msgs_per_s: Option<f64>,
    /// With `--idempotency-keys`: keyed sends per second / sends without keys per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_without_keys: Option<f64>,
    /// With `--txn`: committed transactions per second / plain sends per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_plain: Option<f64>,
    /// With `--txn`, `--idempotency-keys` or `--compare-embedded`: each round's ratio, in
    /// the order run. The
    /// ratio above is their median, and the other figures are from the median round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_ratios: Vec<f64>,
    /// With `--addr --compare-embedded`: the same load on an embedded broker, msgs/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded_msgs_per_s: Option<f64>,
    /// `msgs_per_s / embedded_msgs_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_embedded: Option<f64>,
    /// Whether a metrics recorder was installed and scraped every second during the run.
    pub metrics_recorder: bool,
    /// With a recorder: how much `halfmq_messages_in_total` grew during the measured run
    /// (it should equal `messages` for plain sends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_messages_in: Option<u64>,
    /// With a recorder: scrapes made during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_scrapes: Option<u64>,
}

/// Scrapes a recorder every second on a thread, as the `/metrics` endpoint would.
struct Scraper {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<u64>,
}

impl Scraper {
    fn start(
        broker: Arc<Broker>,
        handle: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Result<Scraper> {
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-scraper".into())
            .spawn(move || {
                let mut scrapes = 0u64;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(Duration::from_secs(1))
                {
                    match broker.stats() {
                        Ok(s) => crate::metrics::record_stats(&s),
                        Err(_) => crate::metrics::stats_failed(),
                    }
                    std::hint::black_box(handle.render());
                    handle.run_upkeep();
                    scrapes += 1;
                }
                scrapes
            })
            .map_err(|e| Error::io("bench-scraper", "start scraper thread", e))?;
        Ok(Scraper { stop, thread })
    }

    /// Stop and return the number of scrapes.
    fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or(0)
    }
}

/// The raw disk's limits, measured on the bench directory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    /// One-at-a-time 1 KiB write + fdatasync per second.
    pub serial_fsync_ops_per_s: f64,
    /// p99 of one such write + fdatasync, microseconds.
    pub serial_fsync_p99_us: u64,
    /// 256 KiB write + fdatasync, MiB/s.
    pub group_mib_per_s: f64,
}

fn histogram() -> Histogram<u64> {
    // Three significant figures from 1 µs to 1 hour: the constructor only fails for
    // bounds outside what hdrhistogram supports, and these are inside.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Measure the raw disk in `dir` for about `seconds` per test, through the same file layer
/// and preallocation the store uses.
pub fn measure_baseline(dir: &Path, seconds: f64) -> Result<Baseline> {
    let storage = FsStorage;
    storage.create_dir_all(dir)?;
    let path = dir.join("baseline.raw");
    let file = storage.open(&path, true)?;
    let file_bytes: u64 = 256 * 1024 * 1024;
    file.allocate(file_bytes)?;
    file.sync_data()?;
    let limit = Duration::from_secs_f64(seconds);

    let mut hist = histogram();
    let small = vec![0xA5u8; 1024];
    let start = Instant::now();
    let mut pos = 0u64;
    let mut ops = 0u64;
    while start.elapsed() < limit && pos + 1024 <= file_bytes {
        let t = Instant::now();
        file.write_all_at(&small, pos)?;
        file.sync_data()?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        pos += 1024;
        ops += 1;
    }
    let serial_secs = start.elapsed().as_secs_f64();

    let big = vec![0x5Au8; 256 * 1024];
    let start = Instant::now();
    let mut pos = 0u64;
    let mut bytes = 0u64;
    while start.elapsed() < limit {
        if pos + big.len() as u64 > file_bytes {
            pos = 0;
        }
        file.write_all_at(&big, pos)?;
        file.sync_data()?;
        pos += big.len() as u64;
        bytes += big.len() as u64;
    }
    let group_secs = start.elapsed().as_secs_f64();
    drop(file);
    storage.remove_file(&path)?;
    settle_deletes(dir);
    Ok(Baseline {
        serial_fsync_ops_per_s: ops as f64 / serial_secs,
        serial_fsync_p99_us: hist.value_at_quantile(0.99),
        group_mib_per_s: bytes as f64 / (1024.0 * 1024.0) / group_secs,
    })
}

/// Run producers against an embedded broker. `progress` receives a line about once a second.
pub fn run_embedded(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    if opts.producers == 0 || opts.producers > 4096 {
        return Err(Error::Config {
            setting: "producers",
            reason: format!("{} is outside 1 ..= 4096", opts.producers),
        });
    }
    check_in_flight(opts)?;
    let plain_with_baseline = opts.baseline && !opts.txn && !opts.idempotency_keys;
    let baseline = if opts.baseline && !plain_with_baseline {
        progress("measuring the raw disk (write + fdatasync) ...");
        Some(measure_baseline(&opts.data_dir, 3.0)?)
    } else {
        None
    };
    let result = if opts.txn {
        compare_rounds(opts, Workload::Txn, progress).map(|(mut r, plain, ratio)| {
            r.plain_msgs_per_s = Some(plain);
            r.ratio_to_plain = Some(ratio);
            r
        })
    } else if opts.idempotency_keys {
        compare_rounds(opts, Workload::Keyed, progress).map(|(mut r, plain, ratio)| {
            r.without_keys_msgs_per_s = Some(plain);
            r.ratio_to_without_keys = Some(ratio);
            r
        })
    } else if plain_with_baseline {
        // The raw disk and the store, alternating `rounds` times: the disk's own rate moves
        // by 2x and more within minutes on a shared virtual disk, so each round's ratio
        // compares figures taken seconds apart, and the median round is reported.
        alternate_rounds(opts, progress, |round, tag, progress| {
            progress(&format!(
                "measuring the raw disk (write + fdatasync){tag} ..."
            ));
            let raw = measure_baseline(&opts.data_dir, 3.0)?;
            progress(&format!("plain durable sends{tag} ..."));
            let dir = format!("plain-{round}");
            let mut r = run_producers(opts, Workload::Plain, &dir, progress)?;
            if opts.cleanup {
                remove_between_runs(&opts.data_dir, &dir);
            }
            Ok((with_baseline(&mut r, &raw, opts.size), r))
        })
        .map(|(_, _, r)| r)
    } else {
        run_producers(opts, Workload::Plain, "plain", progress)
    };
    if opts.cleanup {
        let _ = std::fs::remove_dir_all(&opts.data_dir);
    }
    let mut report = result?;
    if let Some(b) = baseline {
        with_baseline(&mut report, &b, opts.size);
    }
    Ok(report)
}

/// Add the raw disk's figures and the ratios to them to `report`; returns the raw disk's
/// rate in messages of `msg_bytes`.
fn with_baseline(report: &mut BenchReport, b: &Baseline, msg_bytes: usize) -> f64 {
    let raw_msgs = b.group_mib_per_s * 1024.0 * 1024.0 / msg_bytes.max(1) as f64;
    report.raw_serial_fsync_ops_per_s = Some(round2(b.serial_fsync_ops_per_s));
    report.raw_serial_fsync_p99_us = Some(b.serial_fsync_p99_us);
    report.raw_group_mib_per_s = Some(round2(b.group_mib_per_s));
    report.raw_group_msgs_per_s = Some(round2(raw_msgs));
    report.ratio_to_raw = Some(round3(report.msgs_per_s / raw_msgs));
    report.p99_ratio_to_raw_fsync = Some(round3(
        report.p99_us as f64 / b.serial_fsync_p99_us.max(1) as f64,
    ));
    raw_msgs
}

/// Run plain sends, then `variant`, `opts.rounds` times. Returns the variant's report from
/// the median round, that round's plain msgs/s, and the median ratio; the report lists every
/// round's ratio.
fn compare_rounds(
    opts: &BenchOptions,
    variant: Workload,
    progress: &mut dyn FnMut(&str),
) -> Result<(BenchReport, f64, f64)> {
    let (ratio, plain, r) = alternate_rounds(opts, progress, |round, tag, progress| {
        progress(&format!("plain durable sends{tag} ..."));
        let plain_dir = format!("plain-{round}");
        let plain = run_producers(opts, Workload::Plain, &plain_dir, progress)?;
        progress(&format!("{}{tag} ...", variant.describe()));
        let variant_dir = format!("{}-{round}", variant.dir_name());
        let r = run_producers(opts, variant, &variant_dir, progress)?;
        if opts.cleanup {
            // Rounds write gigabytes on fast disks: keep only what is being measured.
            remove_between_runs(&opts.data_dir, &plain_dir);
            remove_between_runs(&opts.data_dir, &variant_dir);
        }
        Ok((plain.msgs_per_s, r))
    })?;
    Ok((r, plain, ratio))
}

/// Run `one_round` (which measures a baseline, then the thing measured, and returns the
/// baseline's msgs/s and the measured report) `opts.rounds` times. Returns the median
/// round's ratio (the lower one for an even count), its baseline msgs/s and its report,
/// which lists every round's ratio in the order run. `one_round` gets the round number and
/// a tag for progress lines.
fn alternate_rounds(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
    mut one_round: impl FnMut(u32, &str, &mut dyn FnMut(&str)) -> Result<(f64, BenchReport)>,
) -> Result<(f64, f64, BenchReport)> {
    let rounds = opts.rounds.max(1);
    let mut done: Vec<(f64, f64, BenchReport)> = Vec::new();
    for round in 1..=rounds {
        let tag = if rounds > 1 {
            format!(" (round {round} of {rounds})")
        } else {
            String::new()
        };
        let (base, r) = one_round(round, &tag, progress)?;
        let ratio = round3(r.msgs_per_s / base.max(f64::MIN_POSITIVE));
        progress(&format!("round {round}: ratio {ratio:.3}"));
        done.push((ratio, base, r));
    }
    let ratios: Vec<f64> = done.iter().map(|(ratio, _, _)| *ratio).collect();
    done.sort_by(|a, b| a.0.total_cmp(&b.0));
    // `rounds >= 1`, so `done` has at least one round.
    let (ratio, base, mut r) = done.swap_remove((done.len() - 1) / 2);
    r.round_ratios = ratios;
    Ok((ratio, base, r))
}

/// Remove `data_dir/name` (a finished run's data) and wait until the deletion reached the
/// disk, so that it is not paid for during the next run: on a file system mounted with
/// `discard` (this project's machine), freeing gigabytes sends discards to the disk at the
/// next journal commit, and back-to-back rounds ran up to 2x slower behind them.
fn remove_between_runs(data_dir: &Path, name: &str) {
    let _ = std::fs::remove_dir_all(data_dir.join(name));
    settle_deletes(data_dir);
}

/// `syncfs` of the file system holding `dir`: commits (and discards) what deletes freed.
/// Only a measurement aid; failing it changes nothing but the next run's noise.
fn settle_deletes(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = rustix::fs::syncfs(&d);
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn run_producers(
    opts: &BenchOptions,
    work: Workload,
    name: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let mut config = BrokerConfig::new(opts.data_dir.join(name));
    config.store = StoreConfig {
        flush: opts.flush,
        ..StoreConfig::default()
    };
    let broker = Arc::new(Broker::open(config)?);
    broker.create_topic("bench", 8)?;
    let messages_in = |h: &metrics_exporter_prometheus::PrometheusHandle| {
        crate::metrics::sample_sum(&h.render(), crate::metrics::MESSAGES_IN) as u64
    };
    let in_before = opts.metrics.as_ref().map(messages_in);
    let scraper = match &opts.metrics {
        Some(h) => Some(Scraper::start(Arc::clone(&*broker), h.clone())?),
        None => None,
    };
    let limit_msgs = opts.messages.unwrap_or(u64::MAX);
    let limit_time = limit_time(opts);
    let load = Arc::new(Load {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        limit: limit_msgs,
    });
    let start = Instant::now();
    let producers = if opts.threads {
        let mut handles = Vec::new();
        for p in 0..opts.producers {
            let (broker, load) = (broker.clone(), load.clone());
            let mut msg = Message::new(vec![b'x'; opts.size]);
            let mut sent = 0u64;
            let handle = std::thread::Builder::new()
                .name(format!("bench-producer-{p}"))
                .spawn(move || -> Result<Histogram<u64>> {
                    let mut hist = histogram();
                    while load.next() {
                        let t = Instant::now();
                        match work {
                            Workload::Plain => drop(broker.send("bench", &msg)?),
                            Workload::Keyed => {
                                msg = msg.with_idempotency_key(format!("{p}-{sent}"));
                                sent += 1;
                                drop(broker.send("bench", &msg)?);
                            }
                            Workload::Txn => {
                                let txn = broker.send_half(
                                    "bench",
                                    &msg,
                                    "bench",
                                    HalfOptions::default(),
                                )?;
                                broker.commit(txn)?;
                            }
                        }
                        load.record(&mut hist, t);
                    }
                    Ok(hist)
                })
                .map_err(|e| Error::io(&opts.data_dir, "start producer thread", e))?;
            handles.push(handle);
        }
        Producers::Threads(handles)
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io(&opts.data_dir, "start runtime", e))?;
        let handles = (0..opts.producers)
            .map(|p| {
                let (broker, load) = (broker.clone(), load.clone());
                let msg = Arc::new(Message::new(vec![b'x'; opts.size]));
                let in_flight = opts.in_flight;
                rt.spawn(async move {
                    produce_windowed(&load, in_flight, |n| {
                        let (broker, msg) = (broker.clone(), msg.clone());
                        async move {
                            match work {
                                Workload::Plain => drop(broker.send_async("bench", &msg).await?),
                                Workload::Keyed => {
                                    let keyed = Message::clone(&msg)
                                        .with_idempotency_key(format!("{p}-{n}"));
                                    drop(broker.send_async("bench", &keyed).await?);
                                }
                                Workload::Txn => {
                                    let txn = broker
                                        .send_half_async(
                                            "bench",
                                            &msg,
                                            "bench",
                                            HalfOptions::default(),
                                        )
                                        .await?;
                                    broker.commit_async(txn).await?;
                                }
                            }
                            Ok(())
                        }
                    })
                    .await
                })
            })
            .collect();
        Producers::Tasks(rt, handles)
    };
    monitor(&load, start, limit_time, || producers.finished(), progress);
    let seconds = start.elapsed().as_secs_f64();
    let hist = merged(producers.join()?)?;
    let log = broker.store().log_stats();
    let scrapes = scraper.map(Scraper::stop);
    let in_after = opts.metrics.as_ref().map(messages_in);
    broker.close()?;
    let run = Measured {
        messages: load.done.load(Ordering::Relaxed),
        seconds,
        hist,
        syncs: log.syncs,
        records: log.records,
    };
    Ok(BenchReport {
        mode: match work {
            Workload::Plain => "embedded".into(),
            Workload::Txn => "txn".into(),
            Workload::Keyed => "idempotency_keys".into(),
        },
        producer_kind: if opts.threads { "threads" } else { "tasks" }.into(),
        flush: match opts.flush {
            FlushPolicy::Sync => "sync".into(),
            FlushPolicy::Async { .. } => "async".into(),
        },
        metrics_recorder: opts.metrics.is_some(),
        metrics_messages_in: in_after.zip(in_before).map(|(a, b)| a.saturating_sub(b)),
        metrics_scrapes: scrapes,
        ..run.report(opts)
    })
}

/// What one run of producers measured.
struct Measured {
    messages: u64,
    seconds: f64,
    hist: Histogram<u64>,
    /// Log fsyncs and records appended during the run.
    syncs: u64,
    records: u64,
}

impl Measured {
    /// The report's figures of this run (mode, producer kind and flush left to the caller).
    fn report(self, opts: &BenchOptions) -> BenchReport {
        let Measured {
            messages,
            seconds,
            hist,
            syncs,
            records,
        } = self;
        BenchReport {
            producers: opts.producers,
            in_flight: opts.in_flight,
            msg_bytes: opts.size,
            messages,
            seconds: round3(seconds),
            msgs_per_s: round2(messages as f64 / seconds),
            mib_per_s: round2(messages as f64 * opts.size as f64 / (1024.0 * 1024.0) / seconds),
            p50_us: hist.value_at_quantile(0.50),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            fsyncs_per_s: round2(syncs as f64 / seconds),
            msgs_per_fsync: round2(records as f64 / syncs.max(1) as f64),
            ..BenchReport::default()
        }
    }
}

/// The producers' latency histograms as one.
fn merged(hists: Vec<Histogram<u64>>) -> Result<Histogram<u64>> {
    let mut all = histogram();
    for h in hists {
        all.add(&h).map_err(|e| Error::Invalid {
            what: "histogram",
            reason: e.to_string(),
        })?;
    }
    Ok(all)
}

/// `--in-flight` is 1 ..= 1024, and more than 1 only for async producers (a thread calling
/// the blocking `send` has one send at a time).
fn check_in_flight(opts: &BenchOptions) -> Result<()> {
    let reason = if opts.in_flight == 0 || opts.in_flight > 1024 {
        format!("{} is outside 1 ..= 1024", opts.in_flight)
    } else if opts.threads && opts.in_flight > 1 {
        "a producer thread makes one blocking send at a time: use tasks (no --threads) for \
         more than 1 in flight"
            .into()
    } else {
        return Ok(());
    };
    Err(Error::Config {
        setting: "in-flight",
        reason,
    })
}

/// One producer: keeps up to `in_flight` sends outstanding (issuing the next as soon as one
/// is acknowledged) until the load is over; `send(n)` makes this producer's n-th send.
/// Returns the producer's latency histogram (from issuing a send to its acknowledgement).
async fn produce_windowed<F, Fut>(load: &Load, in_flight: usize, mut send: F) -> ProducerResult
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut hist = histogram();
    let mut window = FuturesUnordered::new();
    let mut n = 0u64;
    loop {
        while window.len() < in_flight.max(1) && load.next() {
            let started = Instant::now();
            let sent = send(n);
            n += 1;
            window.push(async move { sent.await.map(|()| started) });
        }
        match window.next().await {
            Some(done) => load.record(&mut hist, done?),
            None => return Ok(hist),
        }
    }
}

/// Print progress about once a second until `finished`, stopping the load at `limit_time`.
fn monitor(
    load: &Load,
    start: Instant,
    limit_time: Option<Duration>,
    finished: impl Fn() -> bool,
    progress: &mut dyn FnMut(&str),
) {
    let mut last = (Instant::now(), 0u64);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let done = finished();
        if limit_time.is_some_and(|l| start.elapsed() >= l) {
            load.stop.store(true, Ordering::Relaxed);
        }
        if last.0.elapsed() >= Duration::from_secs(1) || done {
            let n = load.done.load(Ordering::Relaxed);
            let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
            progress(&format!(
                "{:>6.1} s  {n:>10} msgs  {rate:>10.0} msg/s",
                start.elapsed().as_secs_f64()
            ));
            last = (Instant::now(), n);
        }
        if done {
            return;
        }
    }
}

fn limit_time(opts: &BenchOptions) -> Option<Duration> {
    match (opts.messages, opts.seconds) {
        (_, Some(s)) => Some(Duration::from_secs_f64(s)),
        (None, None) => Some(Duration::from_secs(10)),
        (Some(_), None) => None,
    }
}

/// Run producers (async tasks) against the broker at `addr` over `connections` connections,
/// and, with `compare_embedded`, the same load on an embedded broker afterwards.
pub fn run_network(
    opts: &BenchOptions,
    addr: &str,
    token: Option<String>,
    connections: usize,
    compare_embedded: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    if !compare_embedded {
        return run_network_once(opts, addr, token, connections, progress);
    }
    // Alternate network and embedded runs `opts.rounds` times; report the median round.
    let (ratio, emb, mut report) = alternate_rounds(opts, progress, |round, tag, progress| {
        progress(&format!("over the network{tag} ..."));
        let net = run_network_once(opts, addr, token.clone(), connections, progress)?;
        progress(&format!(
            "the same load on an embedded broker, for ratio_to_embedded{tag} ..."
        ));
        let dir = format!("embedded-compare-{round}");
        let emb = run_producers(opts, Workload::Plain, &dir, progress);
        if opts.cleanup {
            remove_between_runs(&opts.data_dir, &dir);
        }
        Ok((emb?.msgs_per_s, net))
    })?;
    report.embedded_msgs_per_s = Some(emb);
    report.ratio_to_embedded = Some(ratio);
    Ok(report)
}

/// One run against the broker at `addr`.
fn run_network_once(
    opts: &BenchOptions,
    addr: &str,
    token: Option<String>,
    connections: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    use crate::net::client::{Client, ClientConfig};
    if connections == 0 || connections > 1024 || opts.producers == 0 {
        return Err(Error::Config {
            setting: "connections",
            reason: "connections and producers must be 1 ..= 1024".into(),
        });
    }
    check_in_flight(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(addr, "start runtime", e))?;
    let config = ClientConfig {
        addr: addr.to_owned(),
        token,
        name: "halfmq-bench".into(),
        ..ClientConfig::default()
    };
    let clients = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..connections {
            out.push(Client::connect(config.clone()).await?);
        }
        match out[0].create_topic("bench", 8).await {
            Ok(()) | Err(Error::Remote { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok::<_, Error>(out)
    })?;
    let syncs_before = rt.block_on(remote_log_counters(&clients[0]));
    let load = Arc::new(Load {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        limit: opts.messages.unwrap_or(u64::MAX),
    });
    let start = Instant::now();
    let handles: Vec<_> = (0..opts.producers)
        .map(|p| {
            let (client, load) = (clients[p % connections].clone(), load.clone());
            let msg = Arc::new(Message::new(vec![b'x'; opts.size]));
            let in_flight = opts.in_flight;
            rt.spawn(async move {
                produce_windowed(&load, in_flight, |_| {
                    let (client, msg) = (client.clone(), msg.clone());
                    async move { client.send("bench", &msg).await.map(drop) }
                })
                .await
            })
        })
        .collect();
    let producers = Producers::Tasks(rt, handles);
    monitor(
        &load,
        start,
        limit_time(opts),
        || producers.finished(),
        progress,
    );
    let seconds = start.elapsed().as_secs_f64();
    let hists = producers.join_keep()?;
    let (rt, hists) = hists;
    let syncs_after = rt.block_on(remote_log_counters(&clients[0]));
    drop(clients);
    drop(rt);
    let (syncs, records) = match (syncs_before, syncs_after) {
        (Some(a), Some(b)) => (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)),
        _ => (0, 0),
    };
    let run = Measured {
        messages: load.done.load(Ordering::Relaxed),
        seconds,
        hist: merged(hists)?,
        syncs,
        records,
    };
    Ok(BenchReport {
        mode: "broker".into(),
        producer_kind: format!("tasks over {connections} connections"),
        flush: "broker's".into(),
        ..run.report(opts)
    })
}

/// (log fsyncs, records) of a remote broker, from its stats.
async fn remote_log_counters(client: &crate::net::client::Client) -> Option<(u64, u64)> {
    let text = client.stats_json().await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((v["log"]["syncs"].as_u64()?, v["log"]["records"].as_u64()?))
}

/// Shared counters of one run.
struct Load {
    issued: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    limit: u64,
}

impl Load {
    /// Claim the next message to send, if the run is not over.
    fn next(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self.issued.fetch_add(1, Ordering::Relaxed) < self.limit
    }

    fn record(&self, hist: &mut Histogram<u64>, started: Instant) {
        hist.saturating_record(started.elapsed().as_micros() as u64);
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

type ProducerResult = Result<Histogram<u64>>;

enum Producers {
    Threads(Vec<std::thread::JoinHandle<ProducerResult>>),
    Tasks(
        tokio::runtime::Runtime,
        Vec<tokio::task::JoinHandle<ProducerResult>>,
    ),
}

impl Producers {
    fn finished(&self) -> bool {
        match self {
            Producers::Threads(h) => h.iter().all(|h| h.is_finished()),
            Producers::Tasks(_, h) => h.iter().all(|h| h.is_finished()),
        }
    }

    /// Join tasks but keep their runtime alive (for requests after the run).
    fn join_keep(self) -> Result<(tokio::runtime::Runtime, Vec<Histogram<u64>>)> {
        match self {
            Producers::Tasks(rt, hs) => {
                let out =
                    rt.block_on(async {
                        let mut out = Vec::new();
                        for h in hs {
                            out.push(h.await.map_err(|_| {
                                Error::Poisoned("a bench producer panicked".into())
                            })??);
                        }
                        Ok::<_, Error>(out)
                    })?;
                Ok((rt, out))
            }
            Producers::Threads(_) => Err(Error::Invalid {
                what: "bench",
                reason: "join_keep needs tasks".into(),
            }),
        }
    }

    fn join(self) -> Result<Vec<Histogram<u64>>> {
        let panicked = || Error::Poisoned("a bench producer panicked".into());
        match self {
            Producers::Threads(hs) => hs
                .into_iter()
                .map(|h| h.join().map_err(|_| panicked())?)
                .collect(),
            Producers::Tasks(rt, hs) => rt.block_on(async {
                let mut out = Vec::new();
                for h in hs {
                    out.push(h.await.map_err(|_| panicked())??);
                }
                Ok(out)
            }),
        }
    }
}

/// Result of [`run_check_tick`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TickReport {
    /// `"txn_tick"`.
    pub mode: String,
    /// Unfinished transactions in the index.
    pub pending: u64,
    /// How many of them were due in the measured round.
    pub due: u64,
    /// Time to write the pending halves (setup, not the measurement).
    pub fill_seconds: f64,
    /// The round that found the due halves and started their checks, µs.
    pub dispatch_us: u64,
    /// The round that applied their answers (counted, rescheduled, persisted to sled), µs.
    pub apply_us: u64,
    /// `dispatch_us + apply_us`: one check-back tick's own cost.
    pub tick_us: u64,
}

/// Measure one check-back tick with `pending` unfinished transactions of which `due` are
/// due: the cost must follow `due`, not `pending`.
pub fn run_check_tick(
    data_dir: &Path,
    pending: u64,
    due: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<TickReport> {
    use crate::txn::checker::Msg;
    use crate::txn::{CheckAnswer, TxnId};

    if due > pending || due == 0 {
        return Err(Error::Config {
            setting: "due",
            reason: format!("{due} must be in 1 ..= pending ({pending})"),
        });
    }
    let mut config = BrokerConfig::new(data_dir.join("tick"));
    // The measured rounds are driven here, not by the broker's own check-back thread, and
    // nothing becomes due by itself during the run.
    config.txn.check_back = false;
    config.txn.timeout = Duration::from_secs(3600);
    config.txn.checks_in_flight_max = due.min(4096) as u32;
    let broker = Broker::open(config)?;
    broker.create_topic("tick", 8)?;
    let fill_start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(data_dir, "start runtime", e))?;
    let next = Arc::new(AtomicU64::new(0));
    let mut first: Vec<TxnId> = Vec::new();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (broker, next) = (broker.clone(), next.clone());
            rt.spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= pending {
                        return Ok::<_, Error>(mine);
                    }
                    let msg = Message::new(format!("half {i}")).with_key(format!("k{i}"));
                    let txn = broker
                        .send_half_async("tick", &msg, "tick", HalfOptions::default())
                        .await?;
                    if i < due {
                        mine.push(txn);
                    }
                }
            })
        })
        .collect();
    let mut last = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if last.elapsed() >= Duration::from_secs(2) {
            progress(&format!(
                "writing halves: {} of {pending}",
                next.load(Ordering::Relaxed).min(pending)
            ));
            last = Instant::now();
        }
    }
    for t in tasks {
        let mine = rt
            .block_on(t)
            .map_err(|_| Error::Poisoned("a bench task panicked".into()))??;
        first.extend(mine);
    }
    let fill_seconds = fill_start.elapsed().as_secs_f64();
    let counts = broker.stats()?;
    if counts.txn_pending != pending {
        return Err(Error::Invalid {
            what: "bench",
            reason: format!("{} pending, {pending} written", counts.txn_pending),
        });
    }
    for &txn in &first {
        broker.rearm(txn)?;
    }
    broker.register_checker(
        "tick",
        Arc::new(|_: &crate::txn::HalfMessage| CheckAnswer::Unknown),
    )?;
    progress(&format!("{pending} pending, {due} due: measuring one tick"));

    let (tx, rx) = std::sync::mpsc::channel();
    let mut in_flight = std::collections::HashMap::new();
    let t = Instant::now();
    broker.check_round(&mut in_flight, Vec::new(), &tx);
    let dispatch_us = t.elapsed().as_micros() as u64;
    if in_flight.len() as u64 != due {
        return Err(Error::Invalid {
            what: "bench",
            reason: format!("{} checks started, {due} due", in_flight.len()),
        });
    }
    let mut answers = Vec::new();
    while (answers.len() as u64) < due {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Msg::Answer { txn, answer }) => answers.push((txn, answer)),
            Ok(_) => {}
            Err(_) => {
                return Err(Error::Invalid {
                    what: "bench",
                    reason: "checks did not answer".into(),
                })
            }
        }
    }
    let t = Instant::now();
    broker.check_round(&mut in_flight, answers, &tx);
    let apply_us = t.elapsed().as_micros() as u64;
    let checked = broker
        .transactions(None)
        .iter()
        .filter(|i| i.checks == 1)
        .count() as u64;
    if checked != due {
        return Err(Error::Invalid {
            what: "bench",
            reason: format!("{checked} transactions checked, {due} due"),
        });
    }
    broker.close()?;
    Ok(TickReport {
        mode: "txn_tick".into(),
        pending,
        due,
        fill_seconds: round2(fill_seconds),
        dispatch_us,
        apply_us,
        tick_us: dispatch_us + apply_us,
    })
}

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
    let mut last = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() >= Duration::from_secs(10) {
            progress(&format!(
                "filling: {} of {messages} ({:.0} s)",
                next.load(Ordering::Relaxed).min(messages),
                start.elapsed().as_secs_f64()
            ));
            last = Instant::now();
        }
    }
    rt.block_on(async {
        for t in tasks {
            t.await
                .map_err(|_| Error::Poisoned("a bench producer panicked".into()))??;
        }
        Ok::<(), Error>(())
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
        c.store = StoreConfig {
            segment_bytes: 1024 * 1024 * 1024,
            ..StoreConfig::default()
        };
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
