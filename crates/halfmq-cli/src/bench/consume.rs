//! Consumers of one group polling batches from a prefilled topic and acking each batch with
//! one `ack_many`, embedded or over the network; with a baseline, alternating with the raw
//! disk's one-at-a-time fdatasync rate, for `ratio_to_raw_fsync`.
//!
//! Every ack returns after its durable write (sled's flush and an fdatasync of sled's file,
//! shared by the acks waiting at the time), so one consumer's ack calls are bounded by the
//! disk's fdatasync rate, and several consumers share each fdatasync. The topic is filled
//! once; each round is a fresh group, which reads the topic from its start.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::runtime::Runtime;

use halfmq::{Broker, BrokerConfig, Delivery, Error, Message, Result};
use halfmq_client::client::{Client, ClientConfig};

use super::baseline::measure_baseline;
use super::load::{join_tasks, monitor, produce_windowed, wait_for_tasks, Load};
use super::report::{histogram, merged, round2, round3};
use super::rounds::{median_round, RoundReport};

/// Producer tasks, and sends each keeps in flight, that fill the topic before the run (setup,
/// not measured).
const FILL_PRODUCERS: usize = 64;
const FILL_IN_FLIGHT: usize = 16;
/// Queues of the bench topic (as the producers' bench topic).
const QUEUES: u32 = 8;
/// Longest measurement of the raw disk per round (each of its two tests), seconds; shorter
/// runs measure it for as long as the consumers run.
const RAW_SECONDS_MAX: f64 = 3.0;

/// What a consumers run does.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Directory for the embedded broker's data and the raw disk's test file (created;
    /// removed afterwards if `cleanup`).
    pub data_dir: PathBuf,
    /// Remove `data_dir` when done.
    pub cleanup: bool,
    /// Consumers of the one group, each polling and acking in turn (async tasks).
    pub consumers: usize,
    /// Messages asked for by each poll; each batch polled is acked with one call.
    pub poll_max: usize,
    /// Messages written to the topic before the run.
    pub prefill: u64,
    /// Body bytes per message.
    pub size: usize,
    /// Length of each round's consuming.
    pub seconds: f64,
    /// Before each round, measure the raw disk's one-at-a-time fdatasync rate on `data_dir`.
    pub baseline: bool,
    /// Rounds (raw disk, then consumers), alternating; the median round's ratio is reported.
    /// More than 1 only with `baseline`.
    pub rounds: u32,
}

/// Where the consumers run.
#[derive(Debug, Clone)]
pub enum ConsumeTarget {
    /// A broker in this process, on `data_dir`.
    Embedded,
    /// The broker at `addr`, over `connections` connections that the consumers share.
    Network {
        /// `host:port`.
        addr: String,
        /// Shared secret.
        token: Option<String>,
        /// Connections (each consumer uses one; the fill uses all).
        connections: usize,
    },
}

/// The result; printed as one JSON object.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConsumeReport {
    /// `"consume"` (embedded) or `"consume_broker"` (over the network).
    pub mode: String,
    /// Consumers in the group.
    pub consumers: usize,
    /// `"tasks"` (embedded: each ack is the blocking `ack_many` on a blocking thread, as the
    /// network server makes it) or `"tasks over N connections"`.
    pub consumer_kind: String,
    /// Messages asked for per poll.
    pub poll_max: usize,
    /// Body bytes per message.
    pub msg_bytes: usize,
    /// Messages in the topic before the run.
    pub prefilled: u64,
    /// Time to write them (durable sends, many in flight): setup, not measured.
    pub prefill_seconds: f64,
    /// Messages handed out by polls during the run.
    pub polled: u64,
    /// Messages acknowledged (each consumer acks every batch it polled, so this equals
    /// `polled`).
    pub acked: u64,
    /// `ack_many` calls made.
    pub ack_calls: u64,
    /// Wall time of the run, to the last consumer's last ack (to the microsecond).
    pub seconds: f64,
    /// Messages acked per second.
    pub acks_per_s: f64,
    /// Ack calls per second.
    pub ack_calls_per_s: f64,
    /// `acked / ack_calls`.
    pub msgs_per_ack_call: f64,
    /// Latency of one `ack_many` call, microseconds.
    pub ack_p50_us: u64,
    /// 99th percentile.
    pub ack_p99_us: u64,
    /// 99.9th percentile.
    pub ack_p999_us: u64,
    /// Largest.
    pub ack_max_us: u64,
    /// Whether a consumer found the topic empty before the time was up (then the run ended
    /// there, and `prefill` was too small for the rate).
    pub ran_dry: bool,
    /// With `--baseline`: the raw disk's one-at-a-time 1 KiB write + fdatasync rate, in the
    /// median round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_serial_fsync_ops_per_s: Option<f64>,
    /// p99 latency of one such write + fdatasync, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_serial_fsync_p99_us: Option<u64>,
    /// `ack_calls_per_s / raw_serial_fsync_ops_per_s`: above 1 when consumers share an
    /// fsync, or when an ack costs less than a raw fdatasync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_raw_fsync: Option<f64>,
    /// `ack_p99_us / raw_serial_fsync_p99_us`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_p99_ratio_to_raw_fsync: Option<f64>,
    /// With `--baseline`: each round's ratio in the order run; the ratio above is their
    /// median, and the other figures are from the median round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub round_ratios: Vec<f64>,
}

impl RoundReport for ConsumeReport {
    fn rate(&self) -> f64 {
        self.ack_calls_per_s
    }

    fn set_round_ratios(&mut self, ratios: Vec<f64>) {
        self.round_ratios = ratios;
    }
}

impl std::fmt::Display for ConsumeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} consumers acked {} msgs in {:.2} s: {:.0} acks/s in {:.0} ack calls/s, \
             {:.1} msgs per call; ack call latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            self.consumers,
            self.acked,
            self.seconds,
            self.acks_per_s,
            self.ack_calls_per_s,
            self.msgs_per_ack_call,
            self.ack_p50_us,
            self.ack_p99_us,
            self.ack_p999_us,
            self.ack_max_us
        )?;
        if let (Some(raw), Some(p99), Some(ratio)) = (
            self.raw_serial_fsync_ops_per_s,
            self.raw_serial_fsync_p99_us,
            self.ratio_to_raw_fsync,
        ) {
            write!(
                f,
                "\nraw disk: {raw:.0} 1 KiB write+fdatasync/s (p99 {p99} µs); \
                 ack calls/s / raw fdatasyncs/s: {ratio:.3}"
            )?;
        }
        if !self.round_ratios.is_empty() {
            write!(
                f,
                "\nratios of the {} rounds: {:?} (the median is reported)",
                self.round_ratios.len(),
                self.round_ratios
            )?;
        }
        if self.ran_dry {
            write!(
                f,
                "\nthe topic ran dry before the time was up: give a larger --prefill"
            )?;
        }
        Ok(())
    }
}

/// The broker the consumers talk to, embedded or over one connection.
#[derive(Clone)]
enum Endpoint {
    Embedded(Arc<Broker>),
    Remote(Client),
}

impl Endpoint {
    async fn send(&self, topic: &str, msg: &Message) -> Result<()> {
        match self {
            Endpoint::Embedded(b) => b.send_async(topic, msg).await.map(drop),
            Endpoint::Remote(c) => c.send(topic, msg).await.map(drop),
        }
    }

    async fn poll(&self, group: &str, topic: &str, max: usize) -> Result<Vec<Delivery>> {
        match self {
            Endpoint::Embedded(b) => b.poll(group, topic, max),
            Endpoint::Remote(c) => c.poll(group, topic, max).await,
        }
    }

    /// Embedded, `ack_many_async`, as an embedded application acks. (Until 2026-12-06 it
    /// awaited sled 0.34's `flush_async`, which hung for good with 8 consumers acking at
    /// once, spacejam/sled#1308; the flush now runs on the metadata fsync thread.)
    async fn ack_many(&self, group: &str, topic: &str, acks: &[(u32, u64)]) -> Result<()> {
        match self {
            Endpoint::Embedded(b) => b.ack_many_async(group, topic, acks).await,
            Endpoint::Remote(c) => c.ack_many(group, topic, acks).await,
        }
    }
}

/// Fill a topic, then run the consumers (after the raw disk, with a baseline) `rounds`
/// times. `progress` receives a line about once a second.
pub fn run_consume(
    opts: &ConsumeOptions,
    target: &ConsumeTarget,
    progress: &mut dyn FnMut(&str),
) -> Result<ConsumeReport> {
    check(opts, target)?;
    let result = consume_rounds(opts, target, progress);
    if opts.cleanup {
        let _ = std::fs::remove_dir_all(&opts.data_dir);
    }
    result
}

fn check(opts: &ConsumeOptions, target: &ConsumeTarget) -> Result<()> {
    let bad = |setting: &'static str, reason: String| Err(Error::Config { setting, reason });
    if opts.consumers == 0 || opts.consumers > 4096 {
        return bad(
            "consumers",
            format!("{} is outside 1 ..= 4096", opts.consumers),
        );
    }
    if opts.poll_max == 0 || opts.poll_max > 10_000 {
        return bad(
            "poll-max",
            format!("{} is outside 1 ..= 10000", opts.poll_max),
        );
    }
    if opts.prefill == 0 {
        return bad("prefill", "the topic needs at least one message".into());
    }
    if !(opts.seconds > 0.0 && opts.seconds.is_finite()) {
        return bad(
            "seconds",
            format!("{} is not a positive duration", opts.seconds),
        );
    }
    if opts.rounds > 1 && !opts.baseline {
        return bad(
            "rounds",
            "the consumers' rounds alternate with the raw disk: give --baseline too".into(),
        );
    }
    if let ConsumeTarget::Network { connections, .. } = target {
        if *connections == 0 || *connections > 1024 {
            return bad(
                "connections",
                format!("{connections} is outside 1 ..= 1024"),
            );
        }
    }
    Ok(())
}

fn consume_rounds(
    opts: &ConsumeOptions,
    target: &ConsumeTarget,
    progress: &mut dyn FnMut(&str),
) -> Result<ConsumeReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(&opts.data_dir, "start runtime", e))?;
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| Error::io(&opts.data_dir, "create the bench directory", e))?;
    // A name of this run's own, so that a broker that served an earlier run has nothing
    // else in this topic, and no group of that run is reused.
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );
    let topic = format!("bench-consume-{run_id}");
    let (endpoints, broker) = connect(opts, target, &rt, &topic)?;
    let fill = fill(opts, &rt, &endpoints, &topic, progress);
    let result = fill.and_then(|prefill_seconds| {
        let one_round = |round: u32, tag: &str, progress: &mut dyn FnMut(&str)| {
            let raw = if opts.baseline {
                progress(&format!(
                    "measuring the raw disk (write + fdatasync){tag} ..."
                ));
                Some(measure_baseline(
                    &opts.data_dir,
                    opts.seconds.min(RAW_SECONDS_MAX),
                )?)
            } else {
                None
            };
            progress(&format!(
                "{} consumers polling {} and acking each batch{tag} ...",
                opts.consumers, opts.poll_max
            ));
            let group = format!("bench-{run_id}-{round}");
            let mut r = consume_once(opts, &rt, &endpoints, &topic, &group, progress)?;
            if let Endpoint::Remote(c) = &endpoints[0] {
                // Every message the group polled is acked, so nothing is held: a deleted
                // group pins nothing in the broker's log afterwards.
                rt.block_on(c.delete_group(&group))?;
            }
            r.prefill_seconds = round2(prefill_seconds);
            if let Some(raw) = &raw {
                r.raw_serial_fsync_ops_per_s = Some(round2(raw.serial_fsync_ops_per_s));
                r.raw_serial_fsync_p99_us = Some(raw.serial_fsync_p99_us);
                r.ack_p99_ratio_to_raw_fsync = Some(round3(
                    r.ack_p99_us as f64 / raw.serial_fsync_p99_us.max(1) as f64,
                ));
            }
            Ok((raw.map(|b| b.serial_fsync_ops_per_s), r))
        };
        if !opts.baseline {
            return one_round(1, "", progress).map(|(_, r)| r);
        }
        let (ratio, _, mut r) = median_round(opts.rounds, progress, |round, tag, progress| {
            let (raw, r) = one_round(round, tag, progress)?;
            // With a baseline every round measured the raw disk.
            Ok((raw.unwrap_or_default(), r))
        })?;
        r.ratio_to_raw_fsync = Some(ratio);
        Ok(r)
    });
    drop(endpoints);
    let closed = broker.map_or(Ok(()), |b| b.close());
    let r = result?;
    closed?;
    Ok(r)
}

/// The endpoints (one per connection, or the embedded broker once) with the topic created,
/// and the embedded broker to close afterwards.
fn connect(
    opts: &ConsumeOptions,
    target: &ConsumeTarget,
    rt: &Runtime,
    topic: &str,
) -> Result<(Vec<Endpoint>, Option<Arc<Broker>>)> {
    match target {
        ConsumeTarget::Embedded => {
            let broker = Broker::open(BrokerConfig::new(opts.data_dir.join("consume")))?;
            broker.create_topic(topic, QUEUES)?;
            Ok((vec![Endpoint::Embedded(broker.clone())], Some(broker)))
        }
        ConsumeTarget::Network {
            addr,
            token,
            connections,
        } => {
            let config = ClientConfig::new(addr.as_str())
                .with_token(token.clone())
                .with_name("halfmq-bench".into());
            let clients = rt.block_on(async {
                let mut out = Vec::new();
                for _ in 0..*connections {
                    out.push(Endpoint::Remote(Client::connect(config.clone()).await?));
                }
                Ok::<_, Error>(out)
            })?;
            if let Endpoint::Remote(c) = &clients[0] {
                rt.block_on(c.create_topic(topic, QUEUES))?;
            }
            Ok((clients, None))
        }
    }
}

/// Write `opts.prefill` messages to `topic` (durable sends, many in flight); returns the
/// seconds it took.
fn fill(
    opts: &ConsumeOptions,
    rt: &Runtime,
    endpoints: &[Endpoint],
    topic: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<f64> {
    progress(&format!(
        "filling {topic} with {} messages of {} bytes ...",
        opts.prefill, opts.size
    ));
    let start = Instant::now();
    let load = Arc::new(Load {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        limit: opts.prefill,
    });
    let tasks: Vec<_> = (0..FILL_PRODUCERS)
        .map(|p| {
            let (ep, load) = (endpoints[p % endpoints.len()].clone(), load.clone());
            let msg = Arc::new(Message::new(vec![b'x'; opts.size]));
            let topic = topic.to_owned();
            rt.spawn(async move {
                produce_windowed(&load, FILL_IN_FLIGHT, |_| {
                    let (ep, msg, topic) = (ep.clone(), msg.clone(), topic.clone());
                    async move { ep.send(&topic, &msg).await }
                })
                .await
            })
        })
        .collect();
    wait_for_tasks(rt, tasks, Duration::from_secs(2), || {
        progress(&format!(
            "filled {} of {}",
            load.done.load(Ordering::Relaxed),
            opts.prefill
        ))
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// What one consumer did.
struct Consumed {
    ack_latency: Histogram<u64>,
    polled: u64,
    acked: u64,
    calls: u64,
    ran_dry: bool,
    ended: Instant,
}

/// One round: `opts.consumers` consumers of `group` poll and ack until the time is up or
/// the topic has nothing left for the group.
fn consume_once(
    opts: &ConsumeOptions,
    rt: &Runtime,
    endpoints: &[Endpoint],
    topic: &str,
    group: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<ConsumeReport> {
    // `done` counts acked messages (for the progress lines); `stop` ends every consumer.
    let load = Arc::new(Load {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        limit: u64::MAX,
    });
    let start = Instant::now();
    let tasks: Vec<_> = (0..opts.consumers)
        .map(|c| {
            let ep = endpoints[c % endpoints.len()].clone();
            let load = load.clone();
            let (topic, group, max) = (topic.to_owned(), group.to_owned(), opts.poll_max);
            rt.spawn(async move {
                let mut me = Consumed {
                    ack_latency: histogram(),
                    polled: 0,
                    acked: 0,
                    calls: 0,
                    ran_dry: false,
                    ended: Instant::now(),
                };
                while !load.stop.load(Ordering::Relaxed) {
                    let batch = ep.poll(&group, &topic, max).await?;
                    if batch.is_empty() {
                        // Nothing left that is not already with a consumer of the group:
                        // the run ends here for every consumer.
                        me.ran_dry = true;
                        load.stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    me.polled += batch.len() as u64;
                    let acks: Vec<(u32, u64)> = batch.iter().map(|d| (d.queue, d.offset)).collect();
                    let t = Instant::now();
                    ep.ack_many(&group, &topic, &acks).await?;
                    me.ack_latency
                        .saturating_record(t.elapsed().as_micros() as u64);
                    me.calls += 1;
                    me.acked += acks.len() as u64;
                    load.done.fetch_add(acks.len() as u64, Ordering::Relaxed);
                }
                me.ended = Instant::now();
                Ok::<_, Error>(me)
            })
        })
        .collect();
    let limit = Some(Duration::from_secs_f64(opts.seconds));
    monitor(
        &load,
        start,
        limit,
        || tasks.iter().all(|t| t.is_finished()),
        progress,
    );
    let done = join_tasks(rt, tasks)?;
    let seconds = done
        .iter()
        .map(|c| c.ended.duration_since(start))
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        .max(f64::MIN_POSITIVE);
    let (polled, acked, calls) = done.iter().fold((0, 0, 0), |(p, a, n), c| {
        (p + c.polled, a + c.acked, n + c.calls)
    });
    let ran_dry = done.iter().any(|c| c.ran_dry);
    let hist = merged(done.into_iter().map(|c| c.ack_latency).collect())?;
    let mode = match &endpoints[0] {
        Endpoint::Embedded(_) => "consume",
        Endpoint::Remote(_) => "consume_broker",
    };
    let consumer_kind = match &endpoints[0] {
        Endpoint::Embedded(_) => "tasks".to_owned(),
        Endpoint::Remote(_) => match endpoints.len().min(opts.consumers) {
            1 => "tasks over 1 connection".to_owned(),
            n => format!("tasks over {n} connections"),
        },
    };
    Ok(ConsumeReport {
        mode: mode.into(),
        consumers: opts.consumers,
        consumer_kind,
        poll_max: opts.poll_max,
        msg_bytes: opts.size,
        prefilled: opts.prefill,
        polled,
        acked,
        ack_calls: calls,
        // To the microsecond: a run that ran dry early can be a few milliseconds long.
        seconds: (seconds * 1e6).round() / 1e6,
        acks_per_s: round2(acked as f64 / seconds),
        ack_calls_per_s: round2(calls as f64 / seconds),
        msgs_per_ack_call: round2(acked as f64 / calls.max(1) as f64),
        ack_p50_us: hist.value_at_quantile(0.50),
        ack_p99_us: hist.value_at_quantile(0.99),
        ack_p999_us: hist.value_at_quantile(0.999),
        ack_max_us: hist.max(),
        ran_dry,
        ..ConsumeReport::default()
    })
}
