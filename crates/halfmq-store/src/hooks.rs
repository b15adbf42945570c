//! The callbacks between the engine and the layer above it: hooks run when a record is
//! acknowledged, the observer of the engine's own work, and the log-start listeners.

use halfmq_types::error::Result;

/// Run by the flusher once the record is durable (acknowledged), in log order, before any
/// writer is released; gets the record's log offset. Higher layers use it to keep derived
/// state (the pending-transaction index) exactly in step with the log. A hook whose record
/// never becomes acknowledged (the store is poisoned or closed first, or an async append is
/// cancelled before its record entered the batch) is dropped without being called.
///
/// Given as [`Hook::Durable`] (as [`Store::append_hooked`] does), a hook forces a sync
/// under any flush policy; given as [`Hook::Observed`] ([`Store::append_observed`]), it runs
/// when the record is acknowledged under the policy (after the write under
/// [`FlushPolicy::Async`]).
///
/// [`Store::append_hooked`]: crate::Store::append_hooked
/// [`Store::append_observed`]: crate::Store::append_observed
/// [`FlushPolicy::Async`]: crate::FlushPolicy::Async
pub type DurableHook = Box<dyn FnOnce(u64) + Send>;

/// What the flusher runs for a record once it is acknowledged, and whether that forces a
/// sync ([`Store::submit`]).
///
/// [`Store::submit`]: crate::Store::submit
pub enum Hook {
    /// No hook: the record is acknowledged under the flush policy.
    None,
    /// Run once the record is durable. The round that writes the record syncs it whatever
    /// the flush policy, so derived state never learns of a record that a power loss could
    /// still take back (transaction records).
    Durable(DurableHook),
    /// Run once the record is acknowledged under the flush policy (durable under `Sync`,
    /// written under `Async`), without forcing a sync.
    Observed(DurableHook),
    /// No hook, but the record is synced in the round that writes it, and acknowledged only
    /// then, whatever the flush policy: for a record that must be durable before something
    /// outside the log (an ack in sled) may depend on it, such as a dead letter's copy.
    Sync,
}

impl Hook {
    /// Whether the record must be durable before it is acknowledged, whatever the policy.
    pub(crate) fn forces_sync(&self) -> bool {
        matches!(self, Hook::Durable(_) | Hook::Sync)
    }

    /// Take the hook to run out (leaving [`Hook::None`]).
    pub(crate) fn take(&mut self) -> Option<DurableHook> {
        match std::mem::replace(self, Hook::None) {
            Hook::None | Hook::Sync => None,
            Hook::Durable(h) | Hook::Observed(h) => Some(h),
        }
    }
}

impl From<Option<DurableHook>> for Hook {
    /// `Some` is a [`Hook::Durable`], as [`Store::append_hooked`] takes it.
    ///
    /// [`Store::append_hooked`]: crate::Store::append_hooked
    fn from(hook: Option<DurableHook>) -> Hook {
        hook.map_or(Hook::None, Hook::Durable)
    }
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::None => "Hook::None",
            Hook::Durable(_) => "Hook::Durable(..)",
            Hook::Observed(_) => "Hook::Observed(..)",
            Hook::Sync => "Hook::Sync",
        })
    }
}

/// What the storage engine reports about its own work, for metrics. The engine never calls
/// into the broker for this: the layer above implements the trait and records what it likes.
/// Called on the flusher thread, so an implementation must be quick and must not block.
pub trait StoreObserver: Send + Sync {
    /// An `fdatasync` of a log segment finished after `took`.
    fn fsync_done(&self, took: std::time::Duration) {
        let _ = took;
    }

    /// A group-commit round wrote `records` records in `bytes` bytes.
    fn group_committed(&self, records: u64, bytes: u64) {
        let _ = (records, bytes);
    }
}

/// Callbacks from the storage engine to the layer above it.
pub trait StoreHooks: StoreObserver {
    /// Called before every checkpoint (on the flusher thread, and at the end of recovery):
    /// persist any state derived from the log up to the current durable end, because
    /// recovery will only replay the log after the checkpoint. `log_offset` is where the
    /// checkpoint about to be written will say the log was read up to (every record before
    /// it has been acknowledged and its hooks have run), so the layer above can record which
    /// checkpoint its state is as new as.
    fn before_checkpoint(&self, log_offset: u64) -> Result<()>;
}

/// Called with the new log start (see [`Store::log_start`]) after retention deleted the
/// segments below it, on the thread that ran retention. Must not call back into retention.
///
/// [`Store::log_start`]: crate::Store::log_start
pub type LogStartListener = Box<dyn Fn(u64) + Send + Sync>;
