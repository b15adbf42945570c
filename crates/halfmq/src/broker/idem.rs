//! Idempotency keys on the send path (claiming a key, answering a duplicate with the
//! original record) and the thread, owned by the broker, that writes the keys of durable
//! records to sled between checkpoints. The index itself is `crate::idem`.

use std::sync::Arc;

use super::wait::Wait;
use super::Broker;
use crate::idem::{index_key, key_of, Claim, Reservation, Space, Stored};
use halfmq_store::record::{self, Properties, Record, RecordKind, FLAG_TXN_COMMIT};
use halfmq_store::worker::Worker;
use halfmq_store::{Append, DurableHook};
use halfmq_types::error::Result;
use halfmq_types::props::PROP_IDEMPOTENCY_KEY;
use halfmq_types::trace::Event;

/// How often the background thread writes the keys of durable records to sled.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Start the thread that writes remembered keys to sled between checkpoints, so that a
/// checkpoint (on the flusher, which every writer waits for) has little left to write.
pub(crate) fn spawn_persister(broker: std::sync::Weak<Broker>) -> Result<Worker<()>> {
    Worker::spawn(
        "halfmq-idem",
        || (),
        move |rx, _| loop {
            match rx.recv_timeout(PERSIST_EVERY) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                // Stopped, or the broker is gone.
                Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let Some(b) = broker.upgrade() else { return };
            b.persist_idempotency_keys();
        },
    )
}

/// What claiming the idempotency key of a message found.
pub(super) enum Claimed {
    /// The message has no key.
    NoKey,
    /// The key is remembered: this is the record stored for it (nothing is stored again).
    Original(Record),
    /// The caller stores the record; the reservation ends with the record's fate.
    Owner(Reservation),
}

impl Broker {
    /// [`Broker::claim_key`] for a record about to be stored: `Ok(reservation)` (none
    /// without a key) to store it with, or `Err(answer)`, the answer `original` makes of the
    /// record stored for the key already (nothing is stored again).
    pub(super) async fn claim_or_original<W: Wait, R>(
        &self,
        w: &W,
        kind: RecordKind,
        (topic, props): (&str, &Properties),
        original: fn(Record) -> R,
    ) -> Result<std::result::Result<Option<Reservation>, R>> {
        Ok(match self.claim_key(w, kind, topic, props).await? {
            Claimed::NoKey => Ok(None),
            Claimed::Owner(r) => Ok(Some(r)),
            Claimed::Original(rec) => Err(original(rec)),
        })
    }

    /// Claim the idempotency key in `props` (if any) for a record of `kind` in `topic`.
    /// Waits, the way `w` waits, while another sender holds the same key.
    pub(super) async fn claim_key<W: Wait>(
        &self,
        w: &W,
        kind: RecordKind,
        topic: &str,
        props: &Properties,
    ) -> Result<Claimed> {
        let Some(key) = key_of(props)? else {
            return Ok(Claimed::NoKey);
        };
        let space = match kind {
            RecordKind::Half => Space::Half,
            RecordKind::Delayed => Space::Delayed,
            _ => Space::Message,
        };
        let ikey = index_key(space, topic, key);
        loop {
            match w.claim(&self.dedup, &ikey).await {
                Claim::Owner(r) => return Ok(Claimed::Owner(r)),
                Claim::Duplicate(at) => {
                    if let Some(rec) = self.original_record(kind, topic, key, &ikey, at)? {
                        return Ok(Claimed::Original(rec));
                    }
                    // Not the key's record after all (and forgotten): claim again.
                }
            }
        }
    }

    /// The encoded size of an append (0 if it cannot be encoded: then the append itself
    /// fails and a hook built with this size is dropped unrun).
    pub(super) fn size_of(a: &Append<'_>) -> u32 {
        record::encoded_len(a.topic, a.key, a.props, a.body).unwrap_or_default()
    }

    /// `hook`, also completing `reservation` (if any) when the record is durable.
    pub(super) fn with_reservation(
        a: &Append<'_>,
        hook: DurableHook,
        reservation: Option<Reservation>,
    ) -> DurableHook {
        match reservation {
            None => hook,
            Some(r) => {
                let done = r.into_hook(Self::size_of(a), a.timestamp_ms);
                Box::new(move |log_offset| {
                    hook(log_offset);
                    done(log_offset);
                })
            }
        }
    }

    /// Read the record remembered for an idempotency key back from the log, and check that
    /// it is the key's: `None` (and the entry is forgotten) if it is not.
    fn original_record(
        &self,
        kind: RecordKind,
        topic: &str,
        key: &str,
        ikey: &Arc<str>,
        at: Stored,
    ) -> Result<Option<Record>> {
        let rec = self.store.read_at(at.log_offset, at.size)?;
        let ok = rec.header.kind == kind
            && rec.header.flags & FLAG_TXN_COMMIT == 0
            && rec.topic == topic
            && rec.properties.get(PROP_IDEMPOTENCY_KEY).map(String::as_str) == Some(key);
        if ok {
            if !rec.key.is_empty() {
                let event = Event::Duplicate {
                    idempotency_key: key.to_owned(),
                };
                self.trace_events(vec![(at.log_offset, event)]);
            }
            return Ok(Some(rec));
        }
        tracing::warn!(
            topic,
            key,
            log_offset = at.log_offset,
            "the record remembered for an idempotency key is not that key's; forgotten"
        );
        self.dedup.forget(ikey, at.log_offset);
        Ok(None)
    }

    /// Idempotency keys remembered now.
    pub fn idempotency_keys(&self) -> u64 {
        self.dedup.len()
    }

    /// Whether an idempotency key of a plain send to `topic` is remembered (within the
    /// window or not yet pruned), and at which log offset.
    pub fn idempotency_key_stored(&self, topic: &str, key: &str) -> Option<u64> {
        self.dedup
            .lookup(&index_key(Space::Message, topic, key))
            .map(|s| s.log_offset)
    }

    /// Write the idempotency keys of durable records to sled (the background persister's
    /// round). A failure is only logged: the next round, or the next checkpoint, writes them.
    pub(crate) fn persist_idempotency_keys(&self) {
        let durable = self.store.log_stats().durable_offset;
        if let Err(e) = self.dedup.persist_below(&self.meta, self.now(), durable) {
            tracing::warn!(error = %e, "could not write idempotency keys to sled; will retry");
        }
    }
}
