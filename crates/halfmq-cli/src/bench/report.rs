//! The report of a producers run, and the figures every bench computes the same way.

use hdrhistogram::Histogram;

use halfmq::{Error, Result};

use super::BenchOptions;

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
    /// Median latency of one 1 KiB write + fdatasync, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_serial_fsync_p50_us: Option<u64>,
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

/// What one run of producers measured.
pub(super) struct Measured {
    pub(super) messages: u64,
    pub(super) seconds: f64,
    pub(super) hist: Histogram<u64>,
    /// Log fsyncs and records appended during the run.
    pub(super) syncs: u64,
    pub(super) records: u64,
}

impl Measured {
    /// The report's figures of this run (mode, producer kind and flush left to the caller).
    pub(super) fn report(self, opts: &BenchOptions) -> BenchReport {
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

pub(super) fn histogram() -> Histogram<u64> {
    // Three significant figures from 1 µs to 1 hour: the constructor only fails for
    // bounds outside what hdrhistogram supports, and these are inside.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// The producers' latency histograms as one.
pub(super) fn merged(hists: Vec<Histogram<u64>>) -> Result<Histogram<u64>> {
    let mut all = histogram();
    for h in hists {
        all.add(&h).map_err(|e| Error::Invalid {
            what: "histogram",
            reason: e.to_string(),
        })?;
    }
    Ok(all)
}

pub(super) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
