//! Prometheus metrics: every metric name, the one-line recording helpers the rest of the
//! crate calls, and the gauges refreshed from [`Broker::stats`](crate::Broker::stats).
//!
//! Recording goes through the [`metrics`] facade. With no recorder installed (an embedded
//! user who wants no metrics) every helper ends in the facade's no-op recorder: nothing is
//! stored and nothing is locked. `halfmq broker --metrics ADDR` installs the Prometheus
//! recorder (`install`, with the `prometheus` feature) before it opens the broker and serves
//! the text format (the `halfmq` binary's metrics endpoint). An embedded user can install
//! `recorder` (same feature), or any other `metrics` recorder, and render it as they like.
//!
//! Counters and histograms are recorded where things happen. Gauges that describe state
//! (backlog, lag, oldest un-acked age, transactions) are not touched on the hot path: they
//! are set from [`Broker::stats`](crate::Broker::stats) by [`record_stats`], which the
//! endpoint calls at every scrape.
//!
//! Every name starts with `halfmq_` and ends with its unit (`_seconds`, `_bytes`,
//! `_messages`, `_records`) or with `_total` for counters. The README's "Metrics" section
//! lists them with their labels.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
#[cfg(feature = "prometheus")]
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use halfmq_types::stats::Stats;
use halfmq_types::CheckAnswer;

/// Counter `{topic}`: messages stored by `send` and by committed transactions.
pub const MESSAGES_IN: &str = "halfmq_messages_in_total";
/// Counter `{topic}`: body bytes of those messages.
pub const BYTES_IN: &str = "halfmq_bytes_in_total";
/// Counter `{topic, group}`: messages handed to consumers by `poll` (a message handed out
/// again counts again).
pub const MESSAGES_OUT: &str = "halfmq_messages_out_total";
/// Counter `{topic, group}`: messages acknowledged by `ack` (an ack repeated counts again).
pub const ACKS: &str = "halfmq_acks_total";
/// Counter `{topic, group}`: messages moved to a dead-letter queue.
pub const DEAD_LETTERS: &str = "halfmq_dead_letters_total";
/// Counter `{answer}`: finished check-backs by what came back (see [`CheckOutcome`]).
pub const CHECK_BACKS: &str = "halfmq_check_backs_total";
/// Counter: network connections accepted.
pub const CONNECTIONS: &str = "halfmq_connections_total";
/// Counter: network connections refused because `connections_max` was reached.
pub const CONNECTIONS_REFUSED: &str = "halfmq_connections_refused_total";
/// Counter: network connections the broker closed itself, by `reason`: `write_timeout` (a
/// client that took no bytes for `write_timeout_ms`) or `idle` (nothing for
/// `idle_timeout_ms`).
pub const CONNECTIONS_CLOSED_BY_BROKER: &str = "halfmq_connections_closed_by_broker_total";
/// Gauge: network connections open now.
pub const CONNECTIONS_OPEN: &str = "halfmq_connections_open";
/// Histogram: time of one `fdatasync` of a log segment.
pub const FSYNC_SECONDS: &str = "halfmq_fsync_duration_seconds";
/// Histogram: records written by one group-commit round.
pub const GROUP_COMMIT_RECORDS: &str = "halfmq_group_commit_records";
/// Histogram: bytes written by one group-commit round.
pub const GROUP_COMMIT_BYTES: &str = "halfmq_group_commit_bytes";
/// Gauge `{topic, queue}`: messages stored in the queue (its end offset).
pub const QUEUE_MESSAGES: &str = "halfmq_queue_messages";
/// Gauge `{topic, queue, group}`: messages of the queue the group has not acked.
pub const BACKLOG: &str = "halfmq_group_backlog_messages";
/// Gauge `{topic, queue, group}`: messages between the group's committed offset and the
/// end of the queue (at least the backlog; more when later messages are acked before an
/// earlier one).
pub const LAG: &str = "halfmq_group_lag_messages";
/// Gauge `{topic, queue, group}`: age of the group's oldest un-acked message (now minus its
/// store timestamp); 0 when everything is acked.
pub const OLDEST_UNACKED: &str = "halfmq_group_oldest_unacked_age_seconds";
/// Gauge: transactions waiting for an outcome.
pub const TXN_PENDING: &str = "halfmq_transactions_pending";
/// Gauge (topic, queue, group): messages delivered and not acked yet (leased).
pub const IN_FLIGHT: &str = "halfmq_group_in_flight_messages";
/// Gauge (topic, queue, group): messages waiting for redelivery after a failed delivery.
pub const RETRYING: &str = "halfmq_group_retrying_messages";
/// Gauge (group): dead letters not replayed yet.
pub const DEAD_LETTERS_WAITING: &str = "halfmq_dead_letters_waiting_messages";
/// Gauge: delayed messages not delivered yet.
pub const DELAYED_PENDING: &str = "halfmq_delayed_pending_messages";
/// Gauge: transactions checked `check_max` times without an answer (need a person).
pub const TXN_UNRESOLVED: &str = "halfmq_transactions_unresolved";
/// Gauge: segment files of the commit log.
pub const LOG_SEGMENTS: &str = "halfmq_log_segments";
/// Gauge: the log offset everything before which is durable.
pub const LOG_DURABLE_BYTES: &str = "halfmq_log_durable_offset_bytes";
/// Gauge: the log start (base offset of the first segment; retention deleted what is below).
pub const LOG_START_BYTES: &str = "halfmq_log_start_offset_bytes";
/// Gauge: bytes of all segment files of the commit log.
pub const LOG_BYTES: &str = "halfmq_log_size_bytes";
/// Gauge: the retention floor (lowest log offset still needed).
pub const RETENTION_FLOOR_BYTES: &str = "halfmq_retention_floor_offset_bytes";
/// Counter: segment files deleted by retention.
pub const RETENTION_SEGMENTS_DELETED: &str = "halfmq_retention_deleted_segments_total";
/// Counter: bytes of segment files deleted by retention.
pub const RETENTION_BYTES_DELETED: &str = "halfmq_retention_deleted_bytes_total";
/// Counter `{topic, group}`: messages a poll skipped because retention had deleted them.
pub const EXPIRED_SKIPPED: &str = "halfmq_expired_skipped_messages_total";
/// Counter: scrapes whose refresh from `Broker::stats` failed (the gauges kept their last
/// values; the error is logged).
pub const STATS_ERRORS: &str = "halfmq_stats_errors_total";

/// Upper bounds of the fsync histogram's buckets, seconds (50 µs to 2 s).
pub const FSYNC_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.0,
];
/// Upper bounds of the group-commit records histogram's buckets.
pub const BATCH_RECORD_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];
/// Upper bounds of the group-commit bytes histogram's buckets (1 KiB to 16 MiB).
pub const BATCH_BYTE_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];

/// What a check-back came to, the `answer` label of [`CHECK_BACKS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The producer answered commit.
    Commit,
    /// The producer answered rollback.
    Rollback,
    /// The producer answered that it does not know (yet).
    Unknown,
    /// No answer: the checker took longer than `check_answer_timeout`, panicked, or its
    /// connection was gone.
    NoAnswer,
    /// No checker of the producer group was registered.
    NoProducer,
    /// The broker could not read the half message to ask about it.
    Error,
}

impl CheckOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckOutcome::Commit => "commit",
            CheckOutcome::Rollback => "rollback",
            CheckOutcome::Unknown => "unknown",
            CheckOutcome::NoAnswer => "no_answer",
            CheckOutcome::NoProducer => "no_producer",
            CheckOutcome::Error => "error",
        }
    }

    /// The outcome of what a check worker sent back: an answer, or why there is none.
    pub fn of<E>(answer: &std::result::Result<CheckAnswer, E>) -> CheckOutcome {
        use CheckAnswer;
        match answer {
            Ok(CheckAnswer::Commit) => CheckOutcome::Commit,
            Ok(CheckAnswer::Rollback) => CheckOutcome::Rollback,
            Ok(CheckAnswer::Unknown) => CheckOutcome::Unknown,
            Err(_) => CheckOutcome::NoAnswer,
        }
    }
}

/// The counters of a topic's incoming messages, registered once (when the broker loads or
/// creates the topic) so that a send costs two atomic adds instead of two registry
/// look-ups. They belong to the recorder installed when they were made: install it before
/// [`Broker::open`](crate::Broker::open).
#[derive(Clone)]
pub struct TopicCounters {
    messages_in: metrics::Counter,
    bytes_in: metrics::Counter,
}

impl TopicCounters {
    /// Register the counters of `topic`.
    pub fn new(topic: &str) -> TopicCounters {
        let labels = [("topic", topic.to_owned())];
        TopicCounters {
            messages_in: counter!(MESSAGES_IN, &labels),
            bytes_in: counter!(BYTES_IN, &labels),
        }
    }

    /// A message with a body of `body_bytes` was stored.
    pub fn message_in(&self, body_bytes: usize) {
        self.messages_in.increment(1);
        self.bytes_in.increment(body_bytes as u64);
    }
}

impl std::fmt::Debug for TopicCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopicCounters")
    }
}

/// A message of `topic` with a body of `body_bytes` was stored (a commit; sends use the
/// topic's [`TopicCounters`]).
pub fn message_in(topic: &str, body_bytes: usize) {
    let labels = [("topic", topic.to_owned())];
    counter!(MESSAGES_IN, &labels).increment(1);
    counter!(BYTES_IN, &labels).increment(body_bytes as u64);
}

/// `n` messages of `topic` were handed to a consumer of `group`.
pub fn delivered(group: &str, topic: &str, n: usize) {
    if n > 0 {
        counter!(MESSAGES_OUT, "topic" => topic.to_owned(), "group" => group.to_owned())
            .increment(n as u64);
    }
}

/// `n` messages of `topic` were acknowledged by `group`.
pub fn acked(group: &str, topic: &str, n: usize) {
    if n > 0 {
        counter!(ACKS, "topic" => topic.to_owned(), "group" => group.to_owned())
            .increment(n as u64);
    }
}

/// A message of `topic` was moved to the dead-letter queue of `group`. To be called by the
/// dead-letter code once the move is durable.
pub fn dead_lettered(group: &str, topic: &str) {
    counter!(DEAD_LETTERS, "topic" => topic.to_owned(), "group" => group.to_owned()).increment(1);
}

/// A check-back finished with `outcome`.
pub fn check_back(outcome: CheckOutcome) {
    counter!(CHECK_BACKS, "answer" => outcome.as_str()).increment(1);
}

/// A log segment was synced in `took`.
pub fn fsync(took: Duration) {
    histogram!(FSYNC_SECONDS).record(took.as_secs_f64());
}

/// A group-commit round wrote `records` records in `bytes` bytes.
pub fn group_commit(records: u64, bytes: u64) {
    histogram!(GROUP_COMMIT_RECORDS).record(records as f64);
    histogram!(GROUP_COMMIT_BYTES).record(bytes as f64);
}

/// A retention pass finished.
pub fn retention_pass(r: &halfmq_types::stats::RetentionReport) {
    counter!(RETENTION_SEGMENTS_DELETED).increment(r.segments_deleted);
    counter!(RETENTION_BYTES_DELETED).increment(r.bytes_deleted);
}

/// A poll of `group` skipped `n` messages of `topic` that retention had deleted.
pub fn expired_skipped(group: &str, topic: &str, n: u64) {
    counter!(EXPIRED_SKIPPED, "topic" => topic.to_owned(), "group" => group.to_owned())
        .increment(n);
}

/// A network connection was accepted.
pub fn connection_opened() {
    counter!(CONNECTIONS).increment(1);
    gauge!(CONNECTIONS_OPEN).increment(1.0);
}

/// A network connection accepted by [`connection_opened`] ended.
pub fn connection_closed() {
    gauge!(CONNECTIONS_OPEN).decrement(1.0);
}

/// A network connection was refused (`connections_max`).
pub fn connection_refused() {
    counter!(CONNECTIONS_REFUSED).increment(1);
}

/// The network server closed a connection itself: `reason` is `write_timeout` or `idle`.
pub fn connection_closed_by_broker(reason: &'static str) {
    counter!(CONNECTIONS_CLOSED_BY_BROKER, "reason" => reason).increment(1);
}

/// Refreshing the gauges from [`Broker::stats`](crate::Broker::stats) failed.
pub fn stats_failed() {
    counter!(STATS_ERRORS).increment(1);
}

/// Set every state gauge from `stats`.
pub fn record_stats(stats: &Stats) {
    gauge!(TXN_PENDING).set(stats.txn_pending as f64);
    gauge!(TXN_UNRESOLVED).set(stats.txn_unresolved as f64);
    gauge!(LOG_SEGMENTS).set(stats.log.segments as f64);
    gauge!(LOG_DURABLE_BYTES).set(stats.log.durable_offset as f64);
    gauge!(LOG_START_BYTES).set(stats.log.log_start as f64);
    gauge!(LOG_BYTES).set(stats.log.log_bytes as f64);
    if let Some(r) = &stats.retention {
        gauge!(RETENTION_FLOOR_BYTES).set(r.floor.floor as f64);
    }
    for q in &stats.queues {
        let queue = q.queue.to_string();
        gauge!(QUEUE_MESSAGES, "topic" => q.topic.clone(), "queue" => queue.clone())
            .set(q.messages as f64);
        for g in &q.groups {
            let labels = [
                ("topic", q.topic.clone()),
                ("queue", queue.clone()),
                ("group", g.group.clone()),
            ];
            gauge!(BACKLOG, &labels).set(g.backlog as f64);
            gauge!(LAG, &labels).set(g.lag as f64);
            let age = g.oldest_unacked_age_ms.unwrap_or(0) as f64 / 1000.0;
            gauge!(OLDEST_UNACKED, &labels).set(age);
            gauge!(IN_FLIGHT, &labels).set(g.in_flight as f64);
            gauge!(RETRYING, &labels).set(g.retrying as f64);
        }
    }
    for d in &stats.dead_letters {
        gauge!(DEAD_LETTERS_WAITING, "group" => d.group.clone())
            .set(d.messages.saturating_sub(d.replayed) as f64);
    }
    gauge!(DELAYED_PENDING).set(stats.delayed_pending as f64);
}

/// A Prometheus recorder with this crate's histogram buckets and every metric described
/// (the `# HELP` lines). Render it with [`PrometheusRecorder::handle`]; run
/// [`PrometheusHandle::run_upkeep`] every few seconds.
#[cfg(feature = "prometheus")]
pub fn recorder() -> PrometheusRecorder {
    let builder = with_buckets(PrometheusBuilder::new()).unwrap_or_else(|e| {
        // Only an empty bucket list is refused, and the lists above are not empty.
        tracing::warn!(error = %e, "metrics: histograms fall back to summaries");
        PrometheusBuilder::new()
    });
    let rec = builder.build_recorder();
    metrics::with_local_recorder(&rec, describe);
    rec
}

#[cfg(feature = "prometheus")]
fn with_buckets(
    b: PrometheusBuilder,
) -> std::result::Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    b.set_buckets_for_metric(Matcher::Full(FSYNC_SECONDS.into()), FSYNC_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(GROUP_COMMIT_RECORDS.into()),
            BATCH_RECORD_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(GROUP_COMMIT_BYTES.into()), BATCH_BYTE_BUCKETS)
}

/// Install [`recorder`] as this process's global recorder and return its handle. Only one
/// global recorder can ever be installed in a process: a second call is an error.
#[cfg(feature = "prometheus")]
pub fn install() -> halfmq_types::Result<PrometheusHandle> {
    let rec = recorder();
    let handle = rec.handle();
    metrics::set_global_recorder(rec).map_err(|_| halfmq_types::Error::Config {
        setting: "metrics",
        reason: "a metrics recorder is already installed in this process".into(),
    })?;
    Ok(handle)
}

/// The sum of every sample of the metric `name` (all label sets) in Prometheus text
/// `text`; 0 when there is none. For counters and gauges (a histogram's samples are
/// `name_bucket`, `name_sum`, `name_count`).
pub fn sample_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                '{' => &rest[rest.rfind('}')? + 1..],
                ' ' => rest,
                _ => return None,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Describe every metric (the `# HELP` lines) to the current recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        MESSAGES_IN,
        Unit::Count,
        "Messages stored by send and by committed transactions"
    );
    describe_counter!(BYTES_IN, Unit::Bytes, "Body bytes of the messages stored");
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Messages delivered to the group and not acked yet"
    );
    describe_gauge!(
        RETRYING,
        Unit::Count,
        "Messages waiting for redelivery after a failed delivery"
    );
    describe_gauge!(
        DEAD_LETTERS_WAITING,
        Unit::Count,
        "Dead letters of the group not replayed yet"
    );
    describe_gauge!(
        DELAYED_PENDING,
        Unit::Count,
        "Delayed messages not delivered yet"
    );
    describe_counter!(
        MESSAGES_OUT,
        Unit::Count,
        "Messages handed to consumers (a redelivery counts again)"
    );
    describe_counter!(ACKS, Unit::Count, "Messages acknowledged by consumers");
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Messages moved to a dead-letter queue"
    );
    describe_counter!(
        CHECK_BACKS,
        Unit::Count,
        "Finished transaction check-backs by answer"
    );
    describe_counter!(CONNECTIONS, Unit::Count, "Network connections accepted");
    describe_counter!(
        CONNECTIONS_REFUSED,
        Unit::Count,
        "Network connections refused at connections_max"
    );
    describe_counter!(
        CONNECTIONS_CLOSED_BY_BROKER,
        Unit::Count,
        "Network connections the broker closed: a client that took no bytes for write_timeout_ms, or was idle for idle_timeout_ms"
    );
    describe_gauge!(CONNECTIONS_OPEN, Unit::Count, "Network connections open");
    describe_histogram!(
        FSYNC_SECONDS,
        Unit::Seconds,
        "Time of one fdatasync of a log segment"
    );
    describe_histogram!(
        GROUP_COMMIT_RECORDS,
        Unit::Count,
        "Records written by one group-commit round"
    );
    describe_histogram!(
        GROUP_COMMIT_BYTES,
        Unit::Bytes,
        "Bytes written by one group-commit round"
    );
    describe_gauge!(QUEUE_MESSAGES, Unit::Count, "Messages stored in the queue");
    describe_gauge!(
        BACKLOG,
        Unit::Count,
        "Messages of the queue the consumer group has not acked"
    );
    describe_gauge!(
        LAG,
        Unit::Count,
        "Messages between the group's committed offset and the end of the queue"
    );
    describe_gauge!(
        OLDEST_UNACKED,
        Unit::Seconds,
        "Age of the group's oldest un-acked message in the queue (0: none)"
    );
    describe_gauge!(
        TXN_PENDING,
        Unit::Count,
        "Transactions waiting for an outcome"
    );
    describe_gauge!(
        TXN_UNRESOLVED,
        Unit::Count,
        "Transactions checked check_max times without an answer"
    );
    describe_gauge!(LOG_SEGMENTS, Unit::Count, "Segment files of the commit log");
    describe_gauge!(
        LOG_DURABLE_BYTES,
        Unit::Bytes,
        "Log offset up to which everything is durable"
    );
    describe_gauge!(
        LOG_START_BYTES,
        Unit::Bytes,
        "Log start: retention deleted everything below this log offset"
    );
    describe_gauge!(LOG_BYTES, Unit::Bytes, "Bytes of all segment files");
    describe_gauge!(
        RETENTION_FLOOR_BYTES,
        Unit::Bytes,
        "Lowest log offset still needed (retention deletes nothing at or above it)"
    );
    describe_counter!(
        RETENTION_SEGMENTS_DELETED,
        Unit::Count,
        "Segment files deleted by retention"
    );
    describe_counter!(
        RETENTION_BYTES_DELETED,
        Unit::Bytes,
        "Bytes of segment files deleted by retention"
    );
    describe_counter!(
        EXPIRED_SKIPPED,
        Unit::Count,
        "Messages polls skipped because retention had deleted them"
    );
    describe_counter!(
        STATS_ERRORS,
        Unit::Count,
        "Scrapes whose refresh from the broker's stats failed"
    );
}

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use super::*;
    use halfmq_types::stats::{GroupLag, QueueStats};

    /// Run `f` with a fresh Prometheus recorder on this thread; the rendered text.
    fn rendered(f: impl FnOnce()) -> String {
        let rec = recorder();
        metrics::with_local_recorder(&rec, f);
        rec.handle().render()
    }

    /// Every one of `lines` is a line of `text`.
    fn has(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn helpers_record_names_labels_and_values() {
        let t = rendered(|| {
            message_in("orders", 10);
            message_in("orders", 5);
            message_in("pay", 1);
            let c = TopicCounters::new("pay");
            c.message_in(7);
            c.message_in(3);
            delivered("shipping", "orders", 3);
            delivered("shipping", "orders", 0);
            acked("shipping", "orders", 2);
            check_back(CheckOutcome::Commit);
            check_back(CheckOutcome::NoProducer);
            check_back(CheckOutcome::NoProducer);
            fsync(Duration::from_micros(700));
            fsync(Duration::from_millis(30));
            group_commit(40, 45_000);
            connection_opened();
            connection_opened();
            connection_closed();
            connection_refused();
        });
        has(
            &t,
            &[
                "halfmq_messages_in_total{topic=\"orders\"} 2",
                "halfmq_bytes_in_total{topic=\"orders\"} 15",
                "halfmq_messages_in_total{topic=\"pay\"} 3",
                "halfmq_bytes_in_total{topic=\"pay\"} 11",
                "halfmq_messages_out_total{topic=\"orders\",group=\"shipping\"} 3",
                "halfmq_acks_total{topic=\"orders\",group=\"shipping\"} 2",
                "halfmq_check_backs_total{answer=\"commit\"} 1",
                "halfmq_check_backs_total{answer=\"no_producer\"} 2",
                "halfmq_connections_total 2",
                "halfmq_connections_open 1",
                "halfmq_connections_refused_total 1",
                // Real histograms with this module's buckets, not summaries.
                "# TYPE halfmq_fsync_duration_seconds histogram",
                "halfmq_fsync_duration_seconds_bucket{le=\"0.0005\"} 0",
                "halfmq_fsync_duration_seconds_bucket{le=\"0.001\"} 1",
                "halfmq_fsync_duration_seconds_bucket{le=\"0.025\"} 1",
                "halfmq_fsync_duration_seconds_bucket{le=\"0.05\"} 2",
                "halfmq_fsync_duration_seconds_count 2",
                "halfmq_group_commit_records_bucket{le=\"32\"} 0",
                "halfmq_group_commit_records_bucket{le=\"64\"} 1",
                "halfmq_group_commit_records_sum 40",
                "halfmq_group_commit_bytes_bucket{le=\"65536\"} 1",
                "halfmq_group_commit_bytes_sum 45000",
            ],
        );
        // Nothing recorded, nothing rendered: no empty series for delivered(.., 0).
        assert!(!t.contains("halfmq_dead_letters_total{"), "{t}");
        // Described.
        has(
            &t,
            &["# HELP halfmq_acks_total Messages acknowledged by consumers"],
        );
    }

    #[test]
    fn every_name_has_the_prefix_and_a_unit() {
        let names = [
            MESSAGES_IN,
            BYTES_IN,
            IN_FLIGHT,
            RETRYING,
            DEAD_LETTERS_WAITING,
            DELAYED_PENDING,
            MESSAGES_OUT,
            ACKS,
            DEAD_LETTERS,
            CHECK_BACKS,
            CONNECTIONS,
            CONNECTIONS_REFUSED,
            CONNECTIONS_CLOSED_BY_BROKER,
            CONNECTIONS_OPEN,
            FSYNC_SECONDS,
            GROUP_COMMIT_RECORDS,
            GROUP_COMMIT_BYTES,
            QUEUE_MESSAGES,
            BACKLOG,
            LAG,
            OLDEST_UNACKED,
            TXN_PENDING,
            TXN_UNRESOLVED,
            LOG_SEGMENTS,
            LOG_DURABLE_BYTES,
            LOG_START_BYTES,
            LOG_BYTES,
            RETENTION_FLOOR_BYTES,
            RETENTION_SEGMENTS_DELETED,
            RETENTION_BYTES_DELETED,
            EXPIRED_SKIPPED,
            STATS_ERRORS,
        ];
        let units = [
            "_total",
            "_seconds",
            "_bytes",
            "_messages",
            "_records",
            "_open",
            "_pending",
            "_unresolved",
            "_segments",
        ];
        for n in names {
            assert!(n.starts_with("halfmq_"), "{n}");
            assert!(units.iter().any(|u| n.ends_with(u)), "{n}");
        }
        let mut sorted = names.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "a name is used twice");
    }

    #[test]
    fn gauges_come_from_stats() {
        let stats = Stats {
            log: halfmq_types::LogStats {
                segments: 2,
                durable_offset: 4096,
                ..Default::default()
            },
            queues: vec![
                QueueStats {
                    topic: "orders".into(),
                    queue: 3,
                    messages: 10,
                    groups: vec![GroupLag {
                        group: "shipping".into(),
                        committed: 4,
                        backlog: 5,
                        in_flight: 2,
                        retrying: 1,
                        lag: 6,
                        oldest_unacked_age_ms: Some(2_500),
                    }],
                },
                QueueStats {
                    topic: "orders".into(),
                    queue: 4,
                    messages: 7,
                    groups: vec![GroupLag {
                        group: "shipping".into(),
                        committed: 7,
                        backlog: 0,
                        in_flight: 0,
                        retrying: 0,
                        lag: 0,
                        oldest_unacked_age_ms: None,
                    }],
                },
            ],
            txn_pending: 3,
            txn_unresolved: 1,
            dead_letters: vec![halfmq_types::stats::DeadLetterStats {
                group: "shipping".into(),
                messages: 4,
                replayed: 1,
            }],
            delayed_pending: 9,
            retention: None,
            meta: Default::default(),
        };
        let t = rendered(|| record_stats(&stats));
        has(
            &t,
            &[
                "halfmq_transactions_pending 3",
                "halfmq_transactions_unresolved 1",
                "halfmq_dead_letters_waiting_messages{group=\"shipping\"} 3",
                "halfmq_delayed_pending_messages 9",
                "halfmq_log_segments 2",
                "halfmq_log_durable_offset_bytes 4096",
                "halfmq_queue_messages{topic=\"orders\",queue=\"3\"} 10",
                "halfmq_queue_messages{topic=\"orders\",queue=\"4\"} 7",
            ],
        );
        let l = "{topic=\"orders\",queue=\"3\",group=\"shipping\"}";
        has(
            &t,
            &[
                &format!("halfmq_group_backlog_messages{l} 5"),
                &format!("halfmq_group_lag_messages{l} 6"),
                &format!("halfmq_group_oldest_unacked_age_seconds{l} 2.5"),
            ],
        );
        let l = "{topic=\"orders\",queue=\"4\",group=\"shipping\"}";
        has(
            &t,
            &[&format!("halfmq_group_oldest_unacked_age_seconds{l} 0")],
        );
        assert_eq!(sample_sum(&t, BACKLOG), 5.0);
        assert_eq!(sample_sum(&t, QUEUE_MESSAGES), 17.0);
    }

    #[test]
    fn check_outcomes_of_answers() {
        let of = |a: std::result::Result<CheckAnswer, &str>| CheckOutcome::of(&a).as_str();
        assert_eq!(of(Ok(CheckAnswer::Commit)), "commit");
        assert_eq!(of(Ok(CheckAnswer::Rollback)), "rollback");
        assert_eq!(of(Ok(CheckAnswer::Unknown)), "unknown");
        assert_eq!(of(Err("the checker panicked")), "no_answer");
        assert_eq!(CheckOutcome::NoProducer.as_str(), "no_producer");
        assert_eq!(CheckOutcome::Error.as_str(), "error");
    }

    #[test]
    fn sample_sums() {
        let text = "# HELP x_total X\n# TYPE x_total counter\nx_total{a=\"1\"} 2\n\
                    x_total{a=\"}\"} 3.5\nx_total 1\nx_total_other 100\nxx_total 7\n\
                    x_total{a=\"2\"} nonsense\n";
        assert_eq!(sample_sum(text, "x_total"), 6.5);
        assert_eq!(sample_sum(text, "y_total"), 0.0);
        assert_eq!(sample_sum("", "x_total"), 0.0);
    }

    #[test]
    fn helpers_work_without_a_recorder() {
        // No global recorder is installed in unit tests: every helper ends in the no-op
        // recorder (an embedded broker without metrics) and must simply return.
        message_in("t", 1);
        TopicCounters::new("t").message_in(1);
        delivered("g", "t", 1);
        acked("g", "t", 1);
        dead_lettered("g", "t");
        check_back(CheckOutcome::Unknown);
        fsync(Duration::from_millis(1));
        group_commit(1, 100);
        connection_opened();
        connection_closed();
        connection_refused();
        stats_failed();
        record_stats(&Stats {
            log: halfmq_types::LogStats::default(),
            queues: Vec::new(),
            txn_pending: 0,
            txn_unresolved: 0,
            dead_letters: Vec::new(),
            delayed_pending: 0,
            retention: None,
            meta: Default::default(),
        });
    }
}
