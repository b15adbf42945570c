//! The write path: a record is validated, encoded into the shared batch under the writer
//! lock ([`Store::submit`]), and acknowledged once the flusher's round has written (or
//! synced) it ([`Ticket`]). Every `append*` method is that one path plus one of the
//! ticket's two ways to wait.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::batch::{Chunk, Dispatch};
use crate::consume_queue::{self, ConsumeQueue, Entry};
use crate::hooks::{DurableHook, Hook};
use crate::prepare;
use crate::record::{self, Header, RecordKind, HEADER_BYTES};
use crate::segment::{Segment, SEGMENT_HEADER_BYTES};
use crate::state::{notified_until, Shared, Writer};
use crate::ticket::{Appended, Ticket};
use crate::Store;
use halfmq_types::error::{Error, Result};
use parking_lot::MutexGuard;

/// Bytes of the SegmentEnd record that closes every full segment; always kept free.
const SEGMENT_END_BYTES: u64 = HEADER_BYTES as u64;

/// What to append.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// Record kind.
    pub kind: RecordKind,
    /// Record flags (see [`record::FLAG_TXN_COMMIT`]).
    pub flags: u16,
    /// Topic name.
    pub topic: &'a str,
    /// Queue within the topic.
    pub queue_id: u32,
    /// Key ("" for none).
    pub key: &'a str,
    /// Encoded properties ([`record::encode_properties`]).
    pub props: &'a [u8],
    /// Payload.
    pub body: &'a [u8],
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Where to index the record for consumers; `None` keeps it out of every consume queue
    /// (half messages, transaction ends).
    pub dispatch_to: Option<&'a Arc<ConsumeQueue>>,
}

impl<'a> Append<'a> {
    /// A plain message for the consumers of `queue`: in its topic and queue, without flags
    /// or properties, and indexed there once acknowledged.
    pub fn message(
        queue: &'a Arc<ConsumeQueue>,
        key: &'a str,
        body: &'a [u8],
        timestamp_ms: u64,
    ) -> Append<'a> {
        Append {
            kind: RecordKind::Message,
            flags: 0,
            topic: queue.topic(),
            queue_id: queue.queue_id(),
            key,
            props: &[],
            body,
            timestamp_ms,
            dispatch_to: Some(queue),
        }
    }
}

impl Store {
    /// Put a record into the batch and return its [`Ticket`], which knows where the record
    /// is in the log and which group-commit round writes it. The record is acknowledged once
    /// that round is over; wait for it with [`Ticket::wait`] or [`Ticket::wait_async`].
    /// While the batch is full (`pending_bytes_max`), this blocks the calling thread until
    /// the flusher takes it; async code uses [`Store::submit_async`].
    ///
    /// `hook` runs on the flusher once the record is acknowledged ([`Hook`]); it is dropped
    /// unrun when this returns an error.
    pub fn submit(&self, a: Append<'_>, hook: Hook) -> Result<Ticket<'_>> {
        let size = self.check_append(&a)?;
        let mut hook = hook;
        match self
            .shared
            .append_to_batch(&a, size, true, true, &mut hook)?
        {
            Some(ticket) => Ok(ticket),
            // With wait_for_space the writer waits for room instead of returning None.
            None => Err(Error::Closed),
        }
    }

    /// [`Store::submit`] for async code: waiting for room in the batch does not block the
    /// executor's thread. Cancelled before the record entered the batch, it drops `hook`
    /// unrun; once this returns, the record is in the batch whatever happens to the ticket.
    pub async fn submit_async(&self, a: Append<'_>, hook: Hook) -> Result<Ticket<'_>> {
        let size = self.check_append(&a)?;
        let mut hook = hook;
        let may_lead = self.shared.config.tasks_may_lead;
        notified_until(&self.shared.async_space, || {
            self.shared
                .append_to_batch(&a, size, false, may_lead, &mut hook)
                .transpose()
        })
        .await
    }

    /// Append one record. Returns when the record is acknowledged under the flush policy:
    /// durable (`Sync`) or written to the OS (`Async`). Blocks the calling thread; async code
    /// uses [`Store::append_async`]. Shorthand for [`Store::submit`] and [`Ticket::wait`].
    pub fn append(&self, a: Append<'_>) -> Result<Appended> {
        self.submit(a, Hook::None)?.wait()
    }

    /// [`Store::append`] with a hook the flusher runs once the record is durable. The record
    /// is synced in the round that writes it, whatever the flush policy ([`Hook::Durable`];
    /// `None` is [`Hook::None`]).
    pub fn append_hooked(&self, a: Append<'_>, hook: Option<DurableHook>) -> Result<Appended> {
        self.submit(a, hook.into())?.wait()
    }

    /// [`Store::append`] with a hook the flusher runs once the record is acknowledged under
    /// the flush policy (durable under `Sync`, written under `Async`), without forcing a sync
    /// ([`Hook::Observed`]).
    pub fn append_observed(&self, a: Append<'_>, hook: DurableHook) -> Result<Appended> {
        self.submit(a, Hook::Observed(hook))?.wait()
    }

    /// [`Store::append`] for async code: waiting for room in the batch and for the flush
    /// happens without blocking the executor's thread. Shorthand for [`Store::submit_async`]
    /// and [`Ticket::wait_async`].
    pub async fn append_async(&self, a: Append<'_>) -> Result<Appended> {
        self.submit_async(a, Hook::None).await?.wait_async().await
    }

    /// [`Store::append_async`] with a hook the flusher runs once the record is durable (the
    /// record is synced whatever the flush policy).
    pub async fn append_async_hooked(
        &self,
        a: Append<'_>,
        hook: Option<DurableHook>,
    ) -> Result<Appended> {
        self.submit_async(a, hook.into()).await?.wait_async().await
    }

    /// [`Store::append_observed`] for async code.
    pub async fn append_async_observed(
        &self,
        a: Append<'_>,
        hook: DurableHook,
    ) -> Result<Appended> {
        self.submit_async(a, Hook::Observed(hook))
            .await?
            .wait_async()
            .await
    }

    /// Validate an append and return the record's encoded size.
    pub(crate) fn check_append(&self, a: &Append<'_>) -> Result<u32> {
        let size = record::encoded_len(a.topic, a.key, a.props, a.body).map_err(|reason| {
            Error::Invalid {
                what: "message",
                reason,
            }
        })?;
        if size > self.shared.config.record_bytes_max {
            return Err(Error::Invalid {
                what: "message",
                reason: format!(
                    "record of {size} bytes is over record_bytes_max ({})",
                    self.shared.config.record_bytes_max
                ),
            });
        }
        if let Some(q) = a.dispatch_to {
            if q.topic() != a.topic || q.queue_id() != a.queue_id {
                return Err(Error::Invalid {
                    what: "append",
                    reason: "dispatch queue does not match topic and queue id".into(),
                });
            }
        }
        Ok(size)
    }

    /// Make everything appended so far durable (useful under async flush).
    pub fn sync(&self) -> Result<()> {
        let target = {
            let mut w = self.shared.writer.lock();
            if let Some(p) = &w.poisoned {
                return Err(Error::Poisoned(p.clone()));
            }
            w.sync_requested = true;
            self.shared.work.notify_one();
            w.batch.end
        };
        self.shared.wait_progress(target, true)
    }

    /// Stop now, as a storage failure stops the store: every waiting and later write fails
    /// with [`Error::Poisoned`] carrying `reason`, nothing more is written (no closing
    /// checkpoint), and what was acknowledged stays as it is on disk. For an embedder that
    /// learns from outside that the disk can no longer be trusted; the crash tests use it
    /// where the write that would find out (a segment roll) fails before touching the log,
    /// which by design poisons nothing (a full disk is not a broken one).
    pub fn fail_stop(&self, reason: &str) {
        crate::flush::poison(&self.shared, reason);
    }
}

impl Shared {
    /// Encode a record into the shared batch and return its ticket. When the batch is full,
    /// wait for room if `wait_for_space`, else return `None`. `hook` is taken only once the
    /// record is in the batch, so on `None` or an error the caller still holds it.
    ///
    /// A writer that `may_lead` and starts a batch while the last round held one record
    /// (a lone producer) does not wake the flusher: its ticket writes the round itself when
    /// waited on (`crate::flush::lead`), or wakes the flusher then. Any other writer of the
    /// batch, or one that waits for room, wakes the flusher as before.
    fn append_to_batch(
        &self,
        a: &Append<'_>,
        size: u32,
        wait_for_space: bool,
        may_lead: bool,
        hook: &mut Hook,
    ) -> Result<Option<Ticket<'_>>> {
        let mut w = self.writer.lock();
        if !self.room_for(&mut w, u64::from(size), wait_for_space)? {
            return Ok(None);
        }
        let before = w.batch.records;
        let mut ticket = self.put_append(&mut w, a, size, hook)?;
        let lead = may_lead
            && self.sync_policy()
            && before == 0
            && w.gather_target <= 1
            && !w.flushing
            && !w.closed;
        if lead {
            w.wake_owed = true;
            ticket.may_lead();
        } else {
            self.wake_flusher(&mut w, before);
        }
        Ok(Some(ticket))
    }

    /// Whether the batch takes `bytes` more now: waits for room while it is full if
    /// `wait_for_space`, else answers `false`. Fails once the store is poisoned or closed.
    pub(crate) fn room_for(
        &self,
        w: &mut MutexGuard<'_, Writer>,
        bytes: u64,
        wait_for_space: bool,
    ) -> Result<bool> {
        loop {
            if let Some(p) = &w.poisoned {
                return Err(Error::Poisoned(p.clone()));
            }
            if w.closed {
                return Err(Error::Closed);
            }
            // Back-pressure: wait while the batch is full (but never for an empty batch, so a
            // record up to record_bytes_max always gets in).
            if !w.batch.is_empty()
                && w.batch.bytes.len() as u64 + bytes > self.config.pending_bytes_max
            {
                // Room comes only from the flusher.
                self.pay_owed_wake(w);
                if !wait_for_space {
                    return Ok(false);
                }
                self.space.wait(w);
                continue;
            }
            return Ok(true);
        }
    }

    /// Wake the flusher for the first record of a batch (`before`: the records it held
    /// before this writer's), and when the batch is as large as it waits for; in between it
    /// is waiting on a deadline anyway.
    /// Wake the flusher if the batch's first writer deferred its wake-up
    /// (`Writer::wake_owed`) and someone now needs the flusher.
    pub(crate) fn pay_owed_wake(&self, w: &mut Writer) {
        if w.wake_owed {
            w.wake_owed = false;
            self.work.notify_one();
        }
    }

    pub(crate) fn wake_flusher(&self, w: &mut Writer, before: u64) {
        if (before == 0 && w.batch.records > 0) || w.batch.records >= w.gather_target {
            w.wake_owed = false;
            self.work.notify_one();
        }
    }

    /// Encode one checked record (`size` from `Store::check_append`) into the batch, which
    /// has room for it, and return its ticket. `hook` is taken once the record is in.
    pub(crate) fn put_append(
        &self,
        w: &mut Writer,
        a: &Append<'_>,
        size: u32,
        hook: &mut Hook,
    ) -> Result<Ticket<'_>> {
        // A hook that must see the record durable makes the writer wait for that too.
        let forces_sync = hook.forces_sync();
        let durable = forces_sync || self.sync_policy();
        // Every batch starts with a mark of the durable end (filled in by the flusher), so
        // recovery can tell damage to acknowledged records from a torn tail; unless the
        // store writes none (`StoreConfig::marks`).
        let needs_mark = self.config.marks && w.batch.mark_at.is_none();
        let mark_bytes = if needs_mark {
            record::MARK_BYTES as u64
        } else {
            0
        };
        if w.pos + mark_bytes + u64::from(size) + SEGMENT_END_BYTES > w.active.size {
            self.roll(w)?;
        }
        if needs_mark {
            self.put_mark(w, a.timestamp_ms);
        }
        if let Some(q) = a.dispatch_to {
            q.reserve(q.assigned.load(std::sync::atomic::Ordering::Relaxed) + 1)?;
        }
        let log_offset = w.active.base + w.pos;
        let queue_offset = a.dispatch_to.map(|q| {
            // Queue offsets are handed out under the writer lock, in log order.
            q.assigned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        let header = Header {
            kind: a.kind,
            flags: a.flags,
            queue_id: a.queue_id,
            log_offset,
            queue_offset: queue_offset.unwrap_or(0),
            timestamp_ms: a.timestamp_ms,
        };
        self.put(w, &header, a.topic, a.key, a.props, a.body, size)?;
        if !a.key.is_empty() {
            self.keyed_end
                .fetch_max(log_offset + u64::from(size), Ordering::AcqRel);
        }
        if let (Some(q), Some(qo)) = (a.dispatch_to, queue_offset) {
            w.batch.dispatch.push(Dispatch {
                queue: q.clone(),
                queue_offset: qo,
                entry: Entry {
                    log_offset,
                    size,
                    key_hash: consume_queue::key_hash(a.key),
                },
            });
        }
        if let Some(h) = hook.take() {
            w.batch.hooks.push((h, log_offset));
        }
        w.batch.sync_hooks |= forces_sync;
        let appended = Appended {
            log_offset,
            size,
            queue_offset,
        };
        Ok(Ticket::new(self, appended, durable, w.batch.signal.clone()))
    }

    /// Encode one record at the writer's position into the batch.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        w: &mut Writer,
        header: &Header,
        topic: &str,
        key: &str,
        props: &[u8],
        body: &[u8],
        size: u32,
    ) -> Result<()> {
        let start = w.batch.bytes.len();
        let written = record::encode_into(&mut w.batch.bytes, header, topic, key, props, body)
            .map_err(|reason| Error::Invalid {
                what: "message",
                reason,
            })?;
        debug_assert_eq!(written, size);
        self.place(w, start);
        w.batch.records += 1;
        Ok(())
    }

    /// Encode the batch's [`RecordKind::Mark`] at the writer's position (its durable end is
    /// set by the flusher when it writes the batch: `record::set_mark`).
    fn put_mark(&self, w: &mut Writer, timestamp_ms: u64) {
        let start = w.batch.bytes.len();
        record::encode_mark(&mut w.batch.bytes, w.active.base + w.pos, 0, timestamp_ms);
        w.batch.mark_at = Some(start);
        self.place(w, start);
    }

    /// Account for the record just encoded at `start` of the batch: its chunk, the
    /// writer's position and the batch's end.
    fn place(&self, w: &mut Writer, start: usize) {
        let end = w.batch.bytes.len();
        let size = (end - start) as u64;
        let same_chunk = matches!(w.batch.chunks.last(), Some(c) if !c.seal && Arc::ptr_eq(&c.segment, &w.active));
        if same_chunk {
            if let Some(c) = w.batch.chunks.last_mut() {
                c.end = end;
            }
        } else {
            let chunk = Chunk {
                segment: w.active.clone(),
                file_pos: w.pos,
                start,
                end,
                seal: false,
            };
            w.batch.chunks.push(chunk);
        }
        w.pos += size;
        if w.batch.first_at.is_none() {
            w.batch.first_at = Some(std::time::Instant::now());
        }
        w.batch.end = w.active.base + w.pos;
    }

    /// Close the active segment with a SegmentEnd record and start the next one. The new
    /// file is created first, so a failure (a full disk) changes nothing.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        let next_base = w.active.base + w.active.size;
        let size = self.config.segment_bytes;
        let prepared = self.preparer.as_ref().and_then(|p| p.take(next_base));
        let next = Arc::new(match prepared {
            Some(file) => Segment::adopt(file, next_base, size)?,
            None => Segment::create(&*self.storage, &self.log_dir, next_base, size)?,
        });
        let header = Header {
            kind: RecordKind::SegmentEnd,
            flags: 0,
            queue_id: 0,
            log_offset: w.active.base + w.pos,
            queue_offset: 0,
            timestamp_ms: 0,
        };
        self.put(w, &header, "", "", &[], &[], SEGMENT_END_BYTES as u32)?;
        if let Some(c) = w.batch.chunks.last_mut() {
            c.seal = true;
        }
        self.segments.write().insert(next_base, next.clone());
        let sealed = w.active.base;
        w.active = next;
        w.pos = SEGMENT_HEADER_BYTES;
        w.batch.end = next_base + SEGMENT_HEADER_BYTES;
        let syncs = self.progress.syncs.load(Ordering::Relaxed);
        let filled_by = syncs.saturating_sub(w.syncs_at_roll).max(1);
        w.syncs_at_roll = syncs;
        let now = std::time::Instant::now();
        let filled_in = now.saturating_duration_since(w.rolled_at);
        w.rolled_at = now;
        if let Some(p) = &self.preparer {
            if self.config.fsync
                && prepare::worth_it(size / filled_by, filled_in, p.fill_time(size))
            {
                p.prepare(next_base + size);
            }
            if let Some(keep) = self.config.page_cache_segments {
                // The segment `keep` places before the one just sealed leaves the cached
                // window (see `crate::prepare`).
                let out = self
                    .segments
                    .read()
                    .range(..=sealed)
                    .rev()
                    .nth(keep as usize)
                    .map(|(_, s)| s.clone());
                if let Some(seg) = out {
                    p.release(seg.file.clone(), seg.size);
                }
            }
        }
        Ok(())
    }
}
