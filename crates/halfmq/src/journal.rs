//! The trace event journal: what happened to a keyed message that is not itself a log
//! record, for [`crate::Broker::trace`].
//!
//! A sled tree (`trace_events`) keyed by the record's log offset and a sequence number holds
//! check-backs and their answers, "unresolved", deliveries (with the attempt), acks, nacks and
//! time-outs (with the next attempt time), dead-lettering, replays, and refused
//! idempotency-key duplicates. The records themselves (half, commit, rollback, stored
//! message, delayed message and its fire, dead-letter and replayed copies) come from the log;
//! the broker joins both into one story per message (`broker::story`).
//!
//! Journal writes are sled inserts without a flush of their own. An ack's event is inserted
//! just before the ack's own flushed sled write, and sled's log is written in order, so an ack
//! that survives a crash always keeps its event. Delivery, nack, check-back and duplicate
//! events become durable with the next sled flush (the next ack, checkpoint, or sled's own
//! flush timer, about half a second): a crash can lose the last of those. The "now" line of a
//! trace is computed from the live state (consumer offsets, leases, the transaction index),
//! never from the journal, so a lost event can make the history shorter but never makes "now"
//! wrong.
//!
//! Events are only recorded for records with a key (nothing could look the others up).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::meta::{sled_err, Meta};
use halfmq_types::clock::SharedClock;
use halfmq_types::error::{Error, Result};
use halfmq_types::trace::Event;

/// An event as stored in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What.
    pub event: Event,
}

/// The event journal: see the module docs.
pub struct Journal {
    events: crate::meta::LiveTree,
    /// The time events are recorded at (the broker's clock).
    clock: SharedClock,
    /// Orders the events of one record: see [`Journal::open`].
    seq: std::sync::atomic::AtomicU64,
    /// Encoded events handed over by [`Journal::record_later`], not yet in sled.
    later: parking_lot::Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    /// The thread that writes `later` (see [`Journal::start_writer`]).
    writer: parking_lot::Mutex<Option<halfmq_store::worker::Worker<bool>>>,
}

/// How often the writer thread moves handed-over events to sled.
const WRITE_LATER_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// Open the journal's tree in `meta`.
    ///
    /// Events of one record are ordered by a sequence number in their key. It starts at the
    /// opening time in µs, so events recorded after a restart sort after earlier ones (unless
    /// the clock went back), and counts up in memory. (sled's `generate_id` did this durably,
    /// but a call could stall for milliseconds behind sled's own work.)
    pub fn open(meta: Arc<Meta>, clock: SharedClock) -> Result<Journal> {
        let events = meta.tree("trace_events")?;
        // The sequence orders events across restarts, it is no deadline: it counts from the
        // machine's clock even when the broker's clock is a test's.
        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        Ok(Journal {
            events,
            clock,
            seq: std::sync::atomic::AtomicU64::new(start_us),
            later: parking_lot::Mutex::new(Vec::new()),
            writer: parking_lot::Mutex::new(None),
        })
    }

    /// Start the thread that writes events handed over by [`Journal::record_later`] (every
    /// 100 ms). It stops when the journal is dropped.
    pub(crate) fn start_writer(self: &Arc<Self>) -> Result<()> {
        let me = Arc::downgrade(self);
        let w = halfmq_store::worker::Worker::spawn(
            "halfmq-journal",
            || false,
            move |rx, _| loop {
                match rx.recv_timeout(WRITE_LATER_EVERY) {
                    Ok(true) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let Some(j) = me.upgrade() else { return };
                if let Err(e) = j.write_later() {
                    tracing::warn!(error = %e, "cannot record trace events");
                }
            },
        )?;
        *self.writer.lock() = Some(w);
        Ok(())
    }

    /// Hand events over to the writer thread: for callers whose latency matters more than
    /// the event being in sled at once (the check-back loop). Readers see them at once
    /// ([`Journal::events`] writes them first); a crash can lose them, like any event not
    /// flushed yet.
    pub(crate) fn record_later(&self, events: Vec<(u64, Event)>) {
        if events.is_empty() {
            return;
        }
        let at = self.clock.now_ms();
        let mut encoded = Vec::with_capacity(events.len());
        for (log_offset, event) in events {
            match self.encode(log_offset, at, event) {
                Ok(kv) => encoded.push(kv),
                Err(e) => tracing::warn!(error = %e, "cannot record a trace event"),
            }
        }
        self.later.lock().extend(encoded);
    }

    /// Move the handed-over events to sled (in the order they were handed over).
    pub(crate) fn write_later(&self) -> Result<()> {
        let batch = std::mem::take(&mut *self.later.lock());
        for (k, v) in batch {
            self.events.insert(k, v).map_err(sled_err)?;
        }
        Ok(())
    }

    fn encode(&self, log_offset: u64, at_ms: u64, event: Event) -> Result<(Vec<u8>, Vec<u8>)> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut k = Vec::with_capacity(16);
        k.extend_from_slice(&log_offset.to_be_bytes());
        k.extend_from_slice(&seq.to_be_bytes());
        // JSON, not bincode: `Event` is an internally tagged enum, which bincode cannot read.
        let v = serde_json::to_vec(&Recorded { at_ms, event }).map_err(|e| Error::Decode {
            what: "trace event",
            reason: format!("encode: {e}"),
        })?;
        Ok((k, v))
    }

    /// Record several events, now (not flushed).
    pub fn record_many(&self, events: Vec<(u64, Event)>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let at = self.clock.now_ms();
        // Plain inserts, not one atomic `apply_batch`: events need no atomicity, and a sled
        // batch takes sled's global write lock, which waits for sled's own flushes.
        for (log_offset, event) in events {
            let (k, v) = self.encode(log_offset, at, event)?;
            self.events.insert(k, v).map_err(sled_err)?;
        }
        Ok(())
    }

    /// [`Journal::record_many`] for callers where a failure must not fail the operation: it
    /// only loses history, so it is logged.
    pub(crate) fn record_or_log(&self, events: Vec<(u64, Event)>) {
        if let Err(e) = self.record_many(events) {
            tracing::warn!(error = %e, "cannot record trace events");
        }
    }

    /// Every event of the record at `log_offset`, in the order they were recorded.
    pub fn events(&self, log_offset: u64) -> Result<Vec<Recorded>> {
        self.write_later()?;
        let mut out = Vec::new();
        for kv in self.events.scan_prefix(log_offset.to_be_bytes()) {
            let (k, v) = kv.map_err(sled_err)?;
            if k.len() != 16 {
                continue;
            }
            match serde_json::from_slice(&v) {
                Ok(r) => out.push(r),
                // One unreadable event (written by a newer version, say) hides only itself.
                Err(e) => tracing::warn!(log_offset, error = %e, "unreadable trace event skipped"),
            }
        }
        Ok(out)
    }

    /// Forget the events of records below `log_offset` (for retention). Returns how many.
    pub fn drop_below(&self, log_offset: u64) -> Result<u64> {
        let mut n = 0;
        for kv in self.events.range(..log_offset.to_be_bytes().to_vec()) {
            let (k, _) = kv.map_err(sled_err)?;
            self.events.remove(k).map_err(sled_err)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_keeps_order_and_fields_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(Meta::open(&dir.path().join("meta")).unwrap());
        let j = Journal::open(meta, Arc::new(halfmq_types::clock::SystemClock)).unwrap();
        let delivered = Event::Delivered {
            group: "g".into(),
            attempt: 1,
        };
        j.record_many(vec![(7, delivered.clone())]).unwrap();
        j.record_many(vec![
            (8, Event::Acked { group: "g".into() }),
            (7, Event::Acked { group: "g".into() }),
        ])
        .unwrap();
        let ev: Vec<Event> = j.events(7).unwrap().into_iter().map(|r| r.event).collect();
        assert_eq!(ev, vec![delivered, Event::Acked { group: "g".into() }]);
        assert_eq!(j.events(8).unwrap().len(), 1);
        assert!(j.events(9).unwrap().is_empty());
        assert_eq!(j.drop_below(8).unwrap(), 2);
        assert!(j.events(7).unwrap().is_empty());
        assert_eq!(j.events(8).unwrap().len(), 1);
    }
}
