//! Retention, broker side: the lowest log offset anything still needs (the *floor*), what
//! sets it, and the pass that deletes whole segments below it when a limit is exceeded.
//!
//! The floor is the minimum of:
//! - for every queue of every topic, the first message a consumer group has not acked
//!   (its committed offset; leases and retries are at or above it). A topic that no group
//!   has consumed yet keeps everything: its first message pins the log.
//! - dead-letter topics (`%DLQ%<group>`) are the exception: a dead letter is done once it
//!   was replayed (the internal `%replay` group acked it) *or* some group that polls the
//!   dead-letter queue acked it, so there the furthest group counts. A dead-letter queue
//!   nobody replayed or consumed pins the log: dead letters are never deleted silently.
//! - every pending (unresolved) half message: its transaction id is its log offset;
//! - every pending delayed message;
//! - the record of every remembered idempotency key (a duplicate send reads it back);
//! - the newest recovery checkpoint (enforced by the store).
//!
//! The store then deletes whole segments, oldest first, that end at or below the floor, while
//! the log is over `retention.bytes_max` or the segment is older than `retention.age_max`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::Broker;
use halfmq_store::worker::Worker;
use halfmq_store::TruncateLimits;
use halfmq_types::error::Result;
use halfmq_types::props::{DLQ_TOPIC_PREFIX, INTERNAL_TOPIC_PREFIX};
use halfmq_types::stats::{Pin, RetentionFloor, RetentionReport};

impl Broker {
    /// The lowest log offset something still needs, and what sets it. See the module docs.
    pub fn retention_floor(&self) -> Result<RetentionFloor> {
        // Read the durable end first: every half, delayed message and key below it has been
        // indexed by its hook before the end was published, so nothing below it is missed.
        let end = self.store.log_stats().durable_offset;
        let log_start = self.store.log_start();
        let mut out = RetentionFloor {
            floor: end,
            pinned_by: None,
        };
        let mut consider = |offset: u64, pin: Pin| {
            if offset < out.floor {
                out.floor = offset.max(log_start);
                out.pinned_by = Some(pin);
            }
        };
        consider(self.store.checkpoint_offset(), Pin::Checkpoint);
        if let Some(txn) = self.txns.oldest_pending() {
            consider(txn, Pin::Half { txn });
        }
        if let Some(id) = self.delayed.oldest_pending() {
            consider(id, Pin::Delayed { id });
        }
        if let Some(at) = self.dedup.oldest_log_offset(self.now()) {
            consider(at, Pin::IdempotencyKey);
        }
        // Groups by topic: those with stored acks, and those that polled since the start.
        let mut groups_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (g, t, _) in self.meta.consumer_queues()? {
            groups_of.entry(t).or_default().insert(g);
        }
        for (g, t) in self.groups.lock().keys() {
            groups_of.entry(t.clone()).or_default().insert(g.clone());
        }
        let topics: Vec<_> = self.topics.read().values().cloned().collect();
        for t in topics {
            let dlq_of = t.name.strip_prefix(DLQ_TOPIC_PREFIX);
            let groups = groups_of.get(&t.name);
            for q in &t.queues {
                let len = q.len();
                let start = q.start();
                if start >= len {
                    continue;
                }
                // (first un-acked offset, what it stands for)
                let (offset, pin) = match groups {
                    None => (start, None),
                    Some(gs) => {
                        let mut pos: Option<(u64, &String)> = None;
                        for g in gs {
                            let c = self.meta.committed(g, &t.name, q.queue_id())?;
                            let better = match pos {
                                None => true,
                                // A dead letter is done when any group is past it.
                                Some((p, _)) if dlq_of.is_some() => c > p,
                                Some((p, _)) => c < p,
                            };
                            if better {
                                pos = Some((c, g));
                            }
                        }
                        match pos {
                            Some((c, g)) => (c.max(start), Some(g.clone())),
                            None => (start, None),
                        }
                    }
                };
                if offset >= len {
                    continue;
                }
                let pin = match (dlq_of, pin) {
                    (Some(group), _) => Pin::DeadLetters {
                        group: group.to_owned(),
                        offset,
                    },
                    (None, Some(group)) if !group.starts_with(INTERNAL_TOPIC_PREFIX) => {
                        Pin::Group {
                            group,
                            topic: t.name.clone(),
                            queue: q.queue_id(),
                            offset,
                        }
                    }
                    _ => Pin::Unconsumed {
                        topic: t.name.clone(),
                        queue: q.queue_id(),
                        offset,
                    },
                };
                // Checked against its record (and rebuilt if damaged): a damaged entry
                // must not raise the floor past a message nobody acked.
                if let Some(e) = self.store.entry_checked(q, offset)? {
                    consider(e.log_offset, pin);
                }
            }
        }
        Ok(out)
    }

    /// Run one retention pass now: compute the floor and delete the segments the limits
    /// allow (see [`crate::config::RetentionConfig`]). With no limit configured it deletes
    /// nothing and says so (`disabled`), but still reports the floor.
    pub fn enforce_retention(&self) -> Result<RetentionReport> {
        let _one = self.retention_pass.lock();
        let t0 = Instant::now();
        let floor = self.retention_floor()?;
        let floor_us = t0.elapsed().as_micros() as u64;
        let cfg = self.config.retention;
        let log_start_before = self.store.log_start();
        let truncated = if cfg.enabled() {
            self.store.truncate_front(
                floor.floor,
                TruncateLimits {
                    bytes_max: cfg.bytes_max,
                    age_max_ms: cfg.age_max.map(|a| a.as_millis() as u64),
                    now_ms: self.now(),
                },
            )?
        } else {
            halfmq_store::Truncated {
                log_start: log_start_before,
                log_bytes: self.store.log_bytes(),
                ..Default::default()
            }
        };
        let report = RetentionReport {
            floor,
            log_start_before,
            log_start: truncated.log_start,
            segments_deleted: truncated.segments_deleted,
            bytes_deleted: truncated.bytes_deleted,
            log_bytes: truncated.log_bytes,
            held_by_floor: truncated.held_by_floor,
            disabled: !cfg.enabled(),
            floor_us,
            pass_us: t0.elapsed().as_micros() as u64,
        };
        crate::metrics::retention_pass(&report);
        if report.segments_deleted > 0 {
            tracing::info!(
                segments = report.segments_deleted,
                bytes = report.bytes_deleted,
                log_start = report.log_start,
                "retention deleted old log segments"
            );
        } else if report.held_by_floor {
            if let Some(p) = &report.floor.pinned_by {
                tracing::info!(pinned_by = %p, "retention limit exceeded but the oldest segment is still needed");
            }
        }
        *self.last_retention.lock() = Some(report.clone());
        Ok(report)
    }

    /// The report of the last retention pass since the broker started.
    pub fn last_retention(&self) -> Option<RetentionReport> {
        self.last_retention.lock().clone()
    }

    /// Messages polls skipped because retention had deleted them (since the start).
    pub fn expired_skipped(&self) -> u64 {
        self.expired_skipped
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Start the thread that runs a retention pass every `interval` (stopped by a message).
pub(crate) fn spawn(broker: Weak<Broker>, interval: Duration) -> Result<Worker<()>> {
    Worker::spawn(
        "halfmq-retention",
        || (),
        move |rx, _own| run(broker, rx, interval),
    )
}

fn run(broker: Weak<Broker>, rx: Receiver<()>, interval: Duration) {
    loop {
        match rx.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(b) = broker.upgrade() else {
            return;
        };
        if let Err(e) = b.enforce_retention() {
            // The next pass tries again; nothing is deleted by a failed pass that was not
            // first recorded in the log-start file.
            tracing::warn!(error = %e, "retention pass failed");
        }
    }
}
