//! The broker's side of "where is my confirmation?": keeping the key index
//! ([`halfmq_store::key_index`]) in step with the log on its own thread, and [`Broker::trace`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::story::{stories, story, Found};
use super::Broker;
use halfmq_store::key_index::KeyIndex;
use halfmq_store::LogReader;
use halfmq_types::error::{Error, Result};
use halfmq_types::props::has_key;
use halfmq_types::trace::{Event, Trace};

/// How often the indexer looks for newly durable records.
const INDEX_EVERY: Duration = Duration::from_millis(20);
/// How often the indexer makes the index durable (writes, fdatasync, header).
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Keeps the key index in step with the log: owned jointly by the broker and the indexer
/// thread, so the thread never keeps the broker itself alive.
pub(crate) struct Indexer {
    index: Arc<KeyIndex>,
    log: LogReader,
    /// The index was dropped and rebuilt once already in this process.
    rebuilt: AtomicBool,
}

impl Indexer {
    pub(crate) fn new(index: Arc<KeyIndex>, log: LogReader) -> Indexer {
        Indexer {
            index,
            log,
            rebuilt: AtomicBool::new(false),
        }
    }

    /// Index the log up to its durable end (the indexer thread, every trace and the close
    /// call this). An index that cannot be continued (its mark is not a record boundary of
    /// this log) is dropped and rebuilt from the log, once per process.
    pub(crate) fn catch_up(&self) -> Result<()> {
        let stats = self.log.log_stats();
        // After the durable end, so every keyed record below that end is below this.
        let keyed_end = self.log.keyed_end();
        let scan =
            |from: u64,
             to: u64,
             f: &mut dyn FnMut(&halfmq_store::record::RecordView<'_>, u32) -> Result<()>| {
                self.log.scan_records(from, to, f)
            };
        match self
            .index
            .catch_up(stats.first_offset, stats.durable_offset, keyed_end, &scan)
        {
            Err(Error::Corrupt { path, reason, .. })
                if !self.rebuilt.swap(true, Ordering::AcqRel) =>
            {
                tracing::warn!(path = %path.display(), %reason, "the key index does not continue this log; rebuilding it from the log");
                self.index.rebuild_from(0)?;
                self.index
                    .catch_up(stats.first_offset, stats.durable_offset, keyed_end, &scan)
            }
            r => r,
        }
    }
}

/// The thread that follows the durable end of the log and indexes keyed records: see
/// [`halfmq_store::key_index`]. It never runs on the group-commit thread.
pub(crate) struct IndexerThread {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl IndexerThread {
    pub(crate) fn spawn(indexer: Arc<Indexer>) -> Result<IndexerThread> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name("halfmq-key-index".into())
            .spawn(move || run(&indexer, &s))
            .map_err(|e| Error::io("halfmq-key-index", "start key index thread", e))?;
        Ok(IndexerThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Stop the thread and wait for it.
    pub(crate) fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(indexer: &Indexer, stop: &(Mutex<bool>, Condvar)) {
    let mut last_persist = Instant::now();
    let mut failing = false;
    loop {
        {
            let mut stopped = stop.0.lock();
            if !*stopped {
                stop.1.wait_for(&mut stopped, INDEX_EVERY);
            }
            if *stopped {
                return;
            }
        }
        let mut r = indexer.catch_up();
        if r.is_ok() && last_persist.elapsed() >= PERSIST_EVERY {
            last_persist = Instant::now();
            r = indexer.index.persist();
        }
        match r {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "key index cannot keep up with the log; traces wait for it (retrying)");
                }
                failing = true;
            }
        }
    }
}

impl Broker {
    /// [`Indexer::catch_up`].
    pub(crate) fn index_catch_up(&self) -> Result<()> {
        self.indexer.catch_up()
    }

    /// The key index behind [`Broker::trace`] (for retention: [`halfmq_store::key_index::KeyIndex::drop_below`]).
    pub fn key_index(&self) -> &halfmq_store::key_index::KeyIndex {
        &self.key_index
    }

    /// The event journal, shared (for threads that record events themselves).
    pub(crate) fn journal_handle(&self) -> Arc<crate::journal::Journal> {
        self.journal.clone()
    }

    /// Record trace events from the check-back loop: handed to the journal's writer thread,
    /// so that sled never adds to a check-back round's latency.
    pub(crate) fn trace_events_later(&self, events: Vec<(u64, Event)>) {
        self.journal.record_later(events);
    }

    /// Record trace events; a failure only loses history, so it is logged, not returned.
    pub(crate) fn trace_events(&self, events: Vec<(u64, Event)>) {
        self.journal.record_or_log(events);
    }

    /// Every message with this key (exact match): the half, check-backs and answers, commit
    /// or rollback, delayed storage and delivery, where it was stored, deliveries and acks per
    /// consumer group, retries, dead letters and replays, with times, and one line per
    /// message saying where it is now. An unknown key gives an empty trace (its `Display`
    /// says "no message with key ..."). Costs a few index reads and one log read per record
    /// with the key, whatever the number of messages stored; records written but not yet
    /// indexed are found too (the index catches up first, and the few records written but not
    /// yet durable are scanned).
    pub fn trace(&self, key: &str) -> Result<Trace> {
        let mut trace = Trace {
            key: key.to_owned(),
            messages: Vec::new(),
            expired: 0,
        };
        if key.is_empty() {
            return Ok(trace);
        }
        self.index_catch_up()?;
        let upto = self.key_index.indexed_upto();
        let entries = match self.key_index.lookup(key.as_bytes())? {
            Ok(e) => e,
            Err(d) => {
                tracing::warn!(reason = %d.reason, "damaged key index file; re-indexing the log from there");
                self.key_index.rebuild_from(d.first)?;
                self.index_catch_up()?;
                match self.key_index.lookup(key.as_bytes())? {
                    Ok(e) => e,
                    Err(d) => {
                        return Err(Error::Corrupt {
                            path: self.key_index.dir().to_path_buf(),
                            offset: d.first,
                            reason: format!(
                                "key index still damaged after a rebuild: {}",
                                d.reason
                            ),
                        })
                    }
                }
            }
        };
        let start = self.store.log_stats().first_offset;
        let mut found: Vec<Found> = Vec::new();
        for e in entries {
            if e.log_offset < start {
                trace.expired += 1;
                continue;
            }
            match self.store.read_at(e.log_offset, e.size) {
                Ok(r) if has_key(&r.key, &r.properties, key) => found.extend(Found::of(&r)),
                Ok(_) => {} // another key with the same hash
                Err(err) if e.log_offset < self.store.log_stats().first_offset => {
                    // Retention deleted it between the two looks.
                    let _ = err;
                    trace.expired += 1;
                }
                Err(err) => {
                    tracing::warn!(log_offset = e.log_offset, error = %err, "key index entry does not match the log; skipped");
                }
            }
        }
        // Written but not yet indexed (not yet durable, or past the indexer).
        let written = self.store.log_stats().written_offset;
        let mut tail_error = None;
        self.store.scan_records(upto, written, &mut |view, _| {
            if view.key.is_empty() || (view.key != key && view.props.is_empty()) {
                return Ok(());
            }
            match view.to_record() {
                Ok(r) if has_key(&r.key, &r.properties, key) => found.extend(Found::of(&r)),
                Ok(_) => {}
                Err(e) => {
                    tail_error.get_or_insert(e);
                }
            }
            Ok(())
        })?;
        if let Some(e) = tail_error {
            return Err(e);
        }
        found.sort_by_key(|f| f.log_offset);
        found.dedup_by_key(|f| f.log_offset);
        for (root, records) in stories(found) {
            trace
                .messages
                .push(story(self, &self.journal, root, records)?);
        }
        Ok(trace)
    }

    /// Consumer groups this process has seen poll `topic`.
    pub(crate) fn polling_groups(&self, topic: &str) -> Vec<String> {
        self.groups
            .lock()
            .keys()
            .filter(|(_, t)| t == topic)
            .map(|(g, _)| g.clone())
            .collect()
    }
}
