//! A run of records appended together: every record of the run enters the batch under one
//! hold of the writer lock, so they sit next to each other in the log (a segment roll aside)
//! and one group-commit round writes (and syncs) them all. A producer's batch of messages
//! is one run.
//!
//! Each record is still its own: it is checked on its own (a record too large fails alone),
//! gets its own ticket and hook, and its own queue offset. What the run shares is the lock
//! hold, the wait for room in the batch (for the whole run at once) and the round.

use crate::append::Append;
use crate::hooks::Hook;
use crate::state::{notified_until, Shared};
use crate::ticket::Ticket;
use crate::Store;
use halfmq_types::error::{Error, Result};

/// One record of a run on its way into the batch.
struct Pending<'a, 's> {
    append: Append<'a>,
    hook: Hook,
    size: u32,
    /// Its outcome, once known (a failed check, or its place in the batch).
    out: Option<Result<Ticket<'s>>>,
}

impl Store {
    /// Put a run of records into the batch under one hold of the writer lock and return
    /// each one's ticket (or error), in order. The records that pass their checks enter the
    /// batch together, in the order given, and are acknowledged by the same group-commit
    /// round. A record that fails its check (too large, ...) gets its error and takes no
    /// place; the others go in. If the store fails while the run goes in (poisoned, closed,
    /// a segment that cannot be created), that record and every later one get the error.
    ///
    /// While the batch has no room for the whole run, this blocks the calling thread (an
    /// empty batch takes any run); async code uses [`Store::submit_many_async`]. A hook is
    /// dropped unrun when its record gets an error.
    pub fn submit_many<'s>(&'s self, run: Vec<(Append<'_>, Hook)>) -> Vec<Result<Ticket<'s>>> {
        let mut run = self.check_run(run);
        self.shared.append_run(&mut run, true);
        outcomes(run)
    }

    /// [`Store::submit_many`] for async code: waiting for room in the batch does not block
    /// the executor's thread. Cancelled before the run entered the batch, it drops the hooks
    /// unrun; once this returns, the run is in the batch whatever happens to the tickets.
    pub async fn submit_many_async<'s>(
        &'s self,
        run: Vec<(Append<'_>, Hook)>,
    ) -> Vec<Result<Ticket<'s>>> {
        let mut run = self.check_run(run);
        notified_until(&self.shared.async_space, || {
            self.shared.append_run(&mut run, false).then_some(())
        })
        .await;
        outcomes(run)
    }

    /// Each record checked: the ones that fail carry their error already.
    fn check_run<'a, 's>(&self, run: Vec<(Append<'a>, Hook)>) -> Vec<Pending<'a, 's>> {
        run.into_iter()
            .map(|(append, hook)| {
                let (size, out) = match self.check_append(&append) {
                    Ok(size) => (size, None),
                    Err(e) => (0, Some(Err(e))),
                };
                Pending {
                    append,
                    hook,
                    size,
                    out,
                }
            })
            .collect()
    }
}

/// The outcome of each record of a run that has been through [`Shared::append_run`].
fn outcomes<'s>(run: Vec<Pending<'_, 's>>) -> Vec<Result<Ticket<'s>>> {
    run.into_iter()
        .map(|p| p.out.unwrap_or(Err(Error::Closed)))
        .collect()
}

/// The same error again, for the later records of a run that one failure stops.
fn again(e: &Error) -> Error {
    match e {
        Error::Poisoned(p) => Error::Poisoned(p.clone()),
        Error::Closed => Error::Closed,
        other => Error::from_wire(other.code(), other.to_string()),
    }
}

impl Shared {
    /// Put every record of `run` without an outcome yet into the batch, under one hold of
    /// the writer lock, and set each one's outcome. Returns `false` (and changes nothing)
    /// when the batch is full and `wait_for_space` is not set.
    fn append_run<'s>(&'s self, run: &mut [Pending<'_, 's>], wait_for_space: bool) -> bool {
        let bytes: u64 = run
            .iter()
            .filter(|p| p.out.is_none())
            .map(|p| u64::from(p.size))
            .sum();
        if bytes == 0 && run.iter().all(|p| p.out.is_some()) {
            return true;
        }
        let mut w = self.writer.lock();
        match self.room_for(&mut w, bytes, wait_for_space) {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                fail_rest(run, &e);
                return true;
            }
        }
        let before = w.batch.records;
        for i in 0..run.len() {
            let p = &mut run[i];
            if p.out.is_some() {
                continue;
            }
            match self.put_append(&mut w, &p.append, p.size, &mut p.hook) {
                Ok(ticket) => p.out = Some(Ok(ticket)),
                Err(e) => {
                    fail_rest(&mut run[i..], &e);
                    break;
                }
            }
        }
        self.wake_flusher(&mut w, before);
        true
    }
}

/// Every record of `run` without an outcome yet fails with `e`.
fn fail_rest(run: &mut [Pending<'_, '_>], e: &Error) {
    for p in run.iter_mut().filter(|p| p.out.is_none()) {
        p.out = Some(Err(again(e)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use crate::sim::open_store as open;
    use crate::sim::SimStorage;
    use crate::ticket::tests::cramped;
    use crate::Append;
    use crate::{Hook, StoreConfig};
    use halfmq_types::Error;

    #[test]
    fn a_run_is_one_group_commit_with_a_ticket_per_record_in_order() {
        let disk = SimStorage::new();
        let store = open(&disk, StoreConfig::default());
        let q = store.queue("t", 0).unwrap();
        let bodies: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let ran = Arc::new(AtomicU64::new(0));
        let run = bodies
            .iter()
            .map(|b| {
                let ran = ran.clone();
                let hook: crate::DurableHook = Box::new(move |_| {
                    ran.fetch_add(1, Ordering::Relaxed);
                });
                (Append::message(&q, "", b, 1), Hook::Observed(hook))
            })
            .collect();
        let before = store.log_stats();
        let tickets = store.submit_many(run);
        let appended: Vec<_> = tickets
            .into_iter()
            .map(|t| t.unwrap().wait().unwrap())
            .collect();
        let after = store.log_stats();
        assert_eq!(
            after.syncs - before.syncs,
            1,
            "one group commit for the run"
        );
        assert_eq!(after.records - before.records, 50);
        assert_eq!(ran.load(Ordering::Relaxed), 50, "every hook ran");
        for (i, a) in appended.iter().enumerate() {
            assert_eq!(a.queue_offset, Some(i as u64));
            if i > 0 {
                let prev = appended[i - 1];
                assert_eq!(
                    a.log_offset,
                    prev.log_offset + u64::from(prev.size),
                    "contiguous"
                );
            }
        }
        let read = store.read_messages(&q, 0, 100).unwrap();
        let got: Vec<_> = read.into_iter().map(|(_, r)| r.body).collect();
        assert_eq!(got, bodies);
    }

    #[test]
    fn a_record_that_fails_its_check_fails_alone() {
        let disk = SimStorage::new();
        let store = open(&disk, StoreConfig::default().with_record_bytes_max(4096));
        let q = store.queue("t", 0).unwrap();
        let (small, big) = (vec![1u8; 10], vec![2u8; 8192]);
        let run = vec![
            (Append::message(&q, "", &small, 1), Hook::None),
            (Append::message(&q, "", &big, 1), Hook::None),
            (Append::message(&q, "", &small, 1), Hook::None),
        ];
        let out = store.submit_many(run);
        assert!(
            matches!(&out[1], Err(Error::Invalid { .. })),
            "{:?}",
            out[1]
        );
        let offsets: Vec<_> = out
            .into_iter()
            .filter_map(|t| t.ok())
            .map(|t| t.wait().unwrap().queue_offset)
            .collect();
        assert_eq!(offsets, [Some(0), Some(1)]);
    }

    #[test]
    fn an_async_run_waits_out_a_full_batch_and_a_closed_store_fails_every_record() {
        let disk = SimStorage::new();
        let (store, q, rt) = cramped(&disk);
        let n = rt.block_on(async {
            let tasks: Vec<_> = (0..8u8)
                .map(|i| {
                    let (store, q) = (store.clone(), q.clone());
                    tokio::spawn(async move {
                        let body = vec![i; 1500];
                        let run = (0..3)
                            .map(|_| (Append::message(&q, "", &body, 1), Hook::None))
                            .collect();
                        let mut n = 0;
                        for t in store.submit_many_async(run).await {
                            t.unwrap().wait_async().await.unwrap();
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let mut n = 0;
            for t in tasks {
                n += t.await.unwrap();
            }
            n
        });
        assert_eq!((n, q.len()), (24, 24));
        store.close().unwrap();
        let run = (0..2)
            .map(|_| (Append::message(&q, "", b"x", 1), Hook::None))
            .collect();
        let out = store.submit_many(run);
        assert!(
            out.iter().all(|r| matches!(r, Err(Error::Closed))),
            "{out:?}"
        );
    }

    /// The log's files as `(name, bytes up to the last non-zero one)`, in order.
    fn logs(disk: &SimStorage) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        disk.files()
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .map(|p| {
                let mut b = disk.durable_bytes(&p).unwrap_or_default();
                let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
                b.truncate(end);
                (p, b)
            })
            .collect()
    }

    /// The same records into a store of `config`, once as one run (one round) and once one
    /// record per round: their log offsets, and each log's files.
    #[allow(clippy::type_complexity)]
    fn grouped_both_ways(
        config: &StoreConfig,
    ) -> [(Vec<u64>, Vec<(std::path::PathBuf, Vec<u8>)>); 2] {
        let bodies: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; 700 + usize::from(i)]).collect();
        // The records submitted in runs of `per_run`, each run waited for before the next.
        let grouped = |per_run: usize| {
            let disk = SimStorage::new();
            let store = open(&disk, config.clone());
            let q = store.queue("t", 0).unwrap();
            let mut offsets = Vec::new();
            for chunk in bodies.chunks(per_run) {
                let run = chunk
                    .iter()
                    .map(|b| (Append::message(&q, "k", b, 7), Hook::None))
                    .collect();
                let tickets = store.submit_many(run);
                offsets.extend(
                    tickets
                        .into_iter()
                        .map(|t| t.unwrap().wait().unwrap().log_offset),
                );
            }
            (offsets, logs(&disk))
        };
        let (one_run, one_by_one) = (grouped(bodies.len()), grouped(1));
        [one_run, one_by_one]
    }

    #[test]
    fn without_marks_the_log_is_the_same_bytes_however_records_were_grouped() {
        // Small segments, so that the records roll over several.
        let config = StoreConfig::default()
            .with_segment_bytes(64 * 1024)
            .with_record_bytes_max(4096)
            .with_pending_bytes_max(1 << 20);
        let [(run, run_logs), (single, single_logs)] =
            grouped_both_ways(&config.clone().with_marks(false));
        assert_eq!(run, single, "the same log offsets");
        assert!(run_logs.len() > 2, "the records rolled: {}", run_logs.len());
        assert_eq!(run_logs, single_logs, "the same segments, byte for byte");
        // With marks the grouping shows in the offsets (why a replicated node's broker has
        // none).
        let [(run, _), (single, _)] = grouped_both_ways(&config);
        assert_ne!(run, single);
    }
}
