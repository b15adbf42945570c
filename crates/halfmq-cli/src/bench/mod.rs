//! The load generator behind `halfmq bench`, and the raw-disk baseline it is compared with.
//!
//! Figures on shared machines are noisy, so the useful output is a ratio measured in one
//! run: `--baseline` first measures what the disk itself can do on the same directory
//! (`fdatasync` one small write at a time, and large writes), then the broker.

use std::path::PathBuf;

use halfmq::FlushPolicy;

mod baseline;
mod consume;
mod embedded;
mod load;
mod network;
mod report;
mod rounds;
mod trace;
mod txn_tick;

pub use baseline::{measure_baseline, Baseline};
pub use consume::{run_consume, ConsumeOptions, ConsumeReport, ConsumeTarget};
pub use embedded::run_embedded;
pub use network::{run_network, NetBatching};
pub use report::BenchReport;
pub use trace::{run_trace, TraceBenchReport};
pub use txn_tick::{run_check_tick, TickReport};

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
    /// Worker threads of the async producers' runtime; `None`: over the network one,
    /// embedded one per core but no more than `producers`.
    pub runtime_threads: Option<usize>,
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
    /// The handle of an installed metrics recorder ([`halfmq::metrics::install`]): during the
    /// run a thread scrapes it every second as the `/metrics` endpoint would (gauges
    /// refreshed from `Broker::stats`, then rendered), and the report says what it counted.
    /// `None`: no recorder, every metrics call is a no-op.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// What each producer does per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Workload {
    Plain,
    Txn,
    /// Plain sends with a unique idempotency key each.
    Keyed,
}

impl Workload {
    pub(super) fn describe(self) -> &'static str {
        match self {
            Workload::Plain => "plain durable sends",
            Workload::Txn => "transactions: send_half + commit",
            Workload::Keyed => "durable sends with a unique idempotency key each",
        }
    }

    pub(super) fn dir_name(self) -> &'static str {
        match self {
            Workload::Plain => "plain",
            Workload::Txn => "txn",
            Workload::Keyed => "keyed",
        }
    }
}
