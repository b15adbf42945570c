//! [`Ticket`]: a record in the batch, and the two ways to wait for its acknowledgement.
//!
//! A thread waits on the store-wide futex epoch, which one `FUTEX_WAKE` advances for every
//! waiter at once. A task waits on the signal of the record's own group-commit round, so the
//! flusher wakes only the writers whose records it just acknowledged (see `RoundSignal`).
//! Both ask the same question of the flush progress: is the record's end written (or
//! durable), or will it never be.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::batch::RoundSignal;
use crate::state::{notified_until, Shared};
use halfmq_types::error::Result;

/// Where an appended record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Position in the log.
    pub log_offset: u64,
    /// Encoded size.
    pub size: u32,
    /// Index in the consume queue, if dispatched.
    pub queue_offset: Option<u64>,
}

/// A record that is in the batch but not yet acknowledged, from [`Store::submit`]: where it
/// is in the log, and the group-commit round that writes it.
///
/// Wait for the acknowledgement with [`Ticket::wait`] on a thread, or with
/// [`Ticket::wait_async`] in a task (no executor thread is blocked). Dropping a ticket does
/// not take the record back: it is written, and its hook runs, as if someone waited.
///
/// [`Store::submit`]: crate::Store::submit
#[must_use = "the record is not acknowledged until its ticket is waited on"]
pub struct Ticket<'a> {
    shared: &'a Shared,
    appended: Appended,
    /// Acknowledged once durable, not merely written (sync flush, or a sync-forcing hook).
    durable: bool,
    /// Fired when the round that writes the record is over.
    round: Arc<RoundSignal>,
    /// The flusher was not woken for the record's batch: the waiter writes the round itself
    /// if nobody else is writing one (`crate::flush::lead`), else wakes the flusher.
    lead: bool,
}

impl std::fmt::Debug for Ticket<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("appended", &self.appended)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl<'a> Ticket<'a> {
    pub(crate) fn new(
        shared: &'a Shared,
        appended: Appended,
        durable: bool,
        round: Arc<RoundSignal>,
    ) -> Ticket<'a> {
        Ticket {
            shared,
            appended,
            durable,
            round,
            lead: false,
        }
    }

    /// The record's writer did not wake the flusher: whoever waits leads (or wakes it).
    pub(crate) fn may_lead(&mut self) {
        self.lead = true;
    }

    /// Where the record is: known as soon as it is in the batch, before it is acknowledged.
    pub fn appended(&self) -> Appended {
        self.appended
    }

    /// Log offset just past the record: what the flush progress must reach.
    fn end(&self) -> u64 {
        self.appended.log_offset + u64::from(self.appended.size)
    }

    /// Block the calling thread until the record is acknowledged under the flush policy
    /// (durable under `Sync` or with a sync-forcing hook, else written). Fails with
    /// `Error::Poisoned` if the flusher failed first, `Error::Closed` if it stopped.
    pub fn wait(mut self) -> Result<Appended> {
        if std::mem::take(&mut self.lead) {
            crate::flush::lead(self.shared);
        }
        self.shared.wait_progress(self.end(), self.durable)?;
        Ok(self.appended)
    }

    /// [`Ticket::wait`] for async code: the task sleeps until the record's round is over,
    /// and no executor thread is blocked, unless the store lets tasks lead a lone round
    /// ([`StoreConfig::tasks_may_lead`](crate::StoreConfig::tasks_may_lead)).
    pub async fn wait_async(mut self) -> Result<Appended> {
        if std::mem::take(&mut self.lead) {
            if self.shared.config.tasks_may_lead {
                crate::flush::lead(self.shared);
            } else {
                crate::flush::pay_wake(self.shared);
            }
        }
        let (end, durable) = (self.end(), self.durable);
        let shared = self.shared;
        // The round that writes the record wakes its writers alone (`None`: the round is
        // over and the record is not settled)...
        let in_round = notified_until(&self.round.notify, || match shared.settled(end, durable) {
            Some(r) => Some(Some(r)),
            None if self.round.over.load(Ordering::Acquire) => Some(None),
            None => None,
        })
        .await;
        let settled = match in_round {
            Some(r) => r,
            // ...and should the record need a later round (not under any current policy: a
            // round acknowledges what it writes), every change of progress is watched.
            None => notified_until(&shared.async_notify, || shared.settled(end, durable)).await,
        };
        settled.map(|()| self.appended)
    }
}

impl Drop for Ticket<'_> {
    /// A ticket dropped unwaited-for (or whose async wait was cancelled before it began)
    /// still gets its record written: the flusher is woken if nobody told it yet.
    fn drop(&mut self) {
        if self.lead {
            crate::flush::pay_wake(self.shared);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::time::Duration;

    use crate::sim::{open_store, Faults, SimStorage};
    use crate::{Append, DurableHook, Hook, Store, StoreConfig};
    use halfmq_types::Error;

    use super::*;

    /// A store whose batch has room for one 4 KiB record (writers wait for space), its
    /// queue `t`/0, and a runtime for async writers.
    pub(crate) fn cramped(
        disk: &SimStorage,
    ) -> (
        Arc<Store>,
        Arc<crate::consume_queue::ConsumeQueue>,
        tokio::runtime::Runtime,
    ) {
        let config = StoreConfig::default()
            .with_record_bytes_max(4096)
            .with_pending_bytes_max(4096);
        let store = Arc::new(open_store(disk, config));
        let q = store.queue("t", 0).unwrap();
        let rt = crate::sim::test_runtime();
        (store, q, rt)
    }

    /// Sets its flag when dropped: whether a hook was dropped, run or not.
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    /// A hook that records the offset it ran with (`u64::MAX`: not run) and, through its
    /// flag, that it is gone.
    fn hook() -> (DurableHook, Arc<AtomicU64>, Arc<AtomicBool>) {
        let ran = Arc::new(AtomicU64::new(u64::MAX));
        let gone = Arc::new(AtomicBool::new(false));
        let (r, flag) = (ran.clone(), DropFlag(gone.clone()));
        let h: DurableHook = Box::new(move |offset| {
            let _flag = flag;
            r.store(offset, Ordering::Release);
        });
        (h, ran, gone)
    }

    /// Submit `append` with a [`hook`] of the kind `kind` makes, and wait for it: where it
    /// went, and the offset the hook saw (`u64::MAX` until it ran).
    fn appended_with(
        store: &Store,
        append: Append<'_>,
        kind: fn(DurableHook) -> Hook,
    ) -> (crate::Appended, Arc<AtomicU64>) {
        let (h, ran, _) = hook();
        let appended = store.submit(append, kind(h)).unwrap().wait().unwrap();
        (appended, ran)
    }

    #[test]
    fn a_ticket_knows_its_place_before_the_wait_and_the_wait_returns_it() {
        let disk = SimStorage::new();
        let store = open_store(&disk, StoreConfig::default());
        let q = store.queue("t", 0).unwrap();
        let first = store
            .submit(Append::message(&q, "", b"one", 1), Hook::None)
            .unwrap();
        let second = store
            .submit(Append::message(&q, "", b"two", 1), Hook::None)
            .unwrap();
        let (a, b) = (first.appended(), second.appended());
        assert_eq!((a.queue_offset, b.queue_offset), (Some(0), Some(1)));
        // Right after the first, or after the mark that starts the next batch.
        let a_end = a.log_offset + u64::from(a.size);
        assert!(
            [a_end, a_end + crate::record::MARK_BYTES as u64].contains(&b.log_offset),
            "{a:?} {b:?}"
        );
        assert_eq!(second.wait().unwrap(), b);
        assert_eq!(first.wait().unwrap(), a);
        assert!(store.log_stats().durable_offset >= b.log_offset + u64::from(b.size));
        let read = store.read_messages(&q, 0, 10).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].1.body, b"two");
    }

    #[test]
    fn durable_hooks_force_a_sync_and_observed_hooks_follow_the_policy() {
        let disk = SimStorage::new();
        let store = crate::sim::open_async_flush(&disk, Duration::from_secs(60));
        let q = store.queue("t", 0).unwrap();

        // Observed: acknowledged once written; the hook has run by then, unsynced.
        let (a, ran) = appended_with(
            &store,
            Append::message(&q, "", b"observed", 1),
            Hook::Observed,
        );
        assert_eq!(ran.load(Ordering::Acquire), a.log_offset);
        let stats = store.log_stats();
        assert!(stats.written_offset >= a.log_offset + u64::from(a.size));
        assert!(
            stats.durable_offset <= a.log_offset,
            "nothing forced a sync"
        );

        // Durable: the round syncs whatever the policy, before the hook runs.
        let (b, ran) = appended_with(
            &store,
            Append::message(&q, "", b"durable", 1),
            Hook::Durable,
        );
        assert_eq!(ran.load(Ordering::Acquire), b.log_offset);
        assert!(store.log_stats().durable_offset >= b.log_offset + u64::from(b.size));
    }

    #[test]
    fn a_failed_fsync_fails_every_ticket_and_drops_the_hooks_unrun() {
        let disk = SimStorage::new();
        let store = open_store(&disk, StoreConfig::default());
        let q = store.queue("t", 0).unwrap();
        disk.set_faults(Faults {
            fail_syncs: 1,
            ..Faults::default()
        });
        let (h, ran, gone) = hook();
        let ticket = store
            .submit(Append::message(&q, "", b"lost", 1), Hook::Durable(h))
            .unwrap();
        assert!(matches!(ticket.wait(), Err(Error::Poisoned(_))));
        // The flusher drops the failed round's hooks on its own thread, possibly just after it
        // released the waiters: wait (boundedly) for the drop, then check it never ran.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !gone.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(gone.load(Ordering::Acquire), "the hook is dropped");
        assert_eq!(ran.load(Ordering::Acquire), u64::MAX, "the hook never ran");
        let (h, ran, gone) = hook();
        assert!(matches!(
            store.submit(Append::message(&q, "", b"later", 1), Hook::Observed(h)),
            Err(Error::Poisoned(_))
        ));
        assert_eq!(ran.load(Ordering::Acquire), u64::MAX);
        assert!(gone.load(Ordering::Acquire));
        assert!(store.read_message(&q, 0).unwrap().is_none());
    }

    #[test]
    fn async_writers_wait_out_back_pressure_and_all_get_in() {
        let disk = SimStorage::new();
        // Room for one record in the batch: most writers wait for space.
        let (store, q, rt) = cramped(&disk);
        let mut offsets: Vec<u64> = rt.block_on(async {
            let tasks: Vec<_> = (0..32)
                .map(|i| {
                    let (store, q) = (store.clone(), q.clone());
                    tokio::spawn(async move {
                        let body = vec![i as u8; 3000];
                        let ticket = store
                            .submit_async(Append::message(&q, "", &body, 1), Hook::None)
                            .await
                            .unwrap();
                        ticket.wait_async().await.unwrap().log_offset
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), 32);
        assert_eq!(q.len(), 32);
    }
}
