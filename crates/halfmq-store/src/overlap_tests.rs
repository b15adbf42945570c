//! Two group-commit rounds syncing at once (`StoreConfig::sync_rounds_max` 2, see
//! `crate::flush::round`): their `fdatasync`s overlap, yet rounds complete in log order, a
//! failed sync fails the round behind it too, and a power loss keeps every acknowledged
//! record. The simulated disk's `sync_delay_ms` makes each sync last long enough for the
//! next round to start its own, and `syncs_at_once_max` shows whether one did.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sim::{open_store, CrashMode, Faults, SimStorage};
use crate::{Append, Store, StoreConfig};
use halfmq_types::Error;

const WRITERS: usize = 6;
const EACH: usize = 8;

/// `WRITERS` threads each append `EACH` records with a durable hook that notes its log
/// offset, on a disk whose syncs take 20 ms. Each writer pauses 0-5 ms before a send, so
/// that sends arrive while a round syncs (writers that all wait for the same round and come
/// back together would fill one round each time, never two). Returns the acknowledged
/// offsets (or the errors) and the offsets in the order their hooks ran.
fn write_concurrently(store: &Arc<Store>) -> (Vec<Result<u64, Error>>, Vec<u64>) {
    let hooked = Arc::new(Mutex::new(Vec::new()));
    let q = store.queue("t", 0).unwrap();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, q, hooked) = (store.clone(), q.clone(), hooked.clone());
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|n| {
                        std::thread::sleep(Duration::from_millis(((w + n) % 6) as u64));
                        let hooked = hooked.clone();
                        let hook: crate::DurableHook = Box::new(move |offset| {
                            hooked.lock().unwrap().push(offset);
                        });
                        let body = [(w * EACH + n) as u8; 200];
                        store
                            .append_hooked(Append::message(&q, "", &body, 1), Some(hook))
                            .map(|a| a.log_offset)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let acked = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let order = hooked.lock().unwrap().clone();
    (acked, order)
}

fn slow_disk() -> SimStorage {
    let disk = SimStorage::new();
    disk.set_faults(Faults {
        sync_delay_ms: 20,
        ..Faults::default()
    });
    disk
}

#[test]
fn two_rounds_sync_at_once_complete_in_log_order_and_survive_a_power_loss() {
    // Until two rounds did sync at once (the first try, unless the machine is so loaded
    // that no send arrived during a 20 ms sync); every try checks the order and the crash.
    for attempt in 1..=10 {
        if write_crash_and_check() {
            return;
        }
        assert!(
            attempt < 10,
            "in 10 tries no two rounds ever synced at once"
        );
    }
}

/// One try of the test above: whether two rounds synced at once.
fn write_crash_and_check() -> bool {
    let disk = slow_disk();
    let store = Arc::new(open_store(&disk, StoreConfig::default()));
    let (acked, hooked) = write_concurrently(&store);
    let mut acked: Vec<u64> = acked.into_iter().map(|r| r.unwrap()).collect();
    let overlapped = disk.syncs_at_once_max() >= 2;
    // Durable hooks run as rounds complete: in log order, although their syncs overlapped.
    let mut sorted = hooked.clone();
    sorted.sort_unstable();
    assert_eq!(hooked, sorted, "rounds completed out of log order");
    acked.sort_unstable();
    assert_eq!(hooked, acked, "every acknowledged record's hook ran once");
    // The consume queue lists them in log order too, each once.
    let q = store.queue("t", 0).unwrap();
    let entries: Vec<u64> = q
        .read(0, 1000)
        .unwrap()
        .iter()
        .map(|e| e.log_offset)
        .collect();
    assert_eq!(entries, acked);

    assert_eq!(
        kept_by_power_loss(&disk, store),
        acked,
        "an acknowledged record was lost"
    );
    overlapped
}

/// Power loss: the log offsets of topic `t`'s messages that the disk kept, once reopened.
fn kept_by_power_loss(disk: &SimStorage, store: Arc<Store>) -> Vec<u64> {
    let lost = disk.crash(CrashMode::DropUnsynced);
    drop(store);
    let again = open_store(&lost, StoreConfig::default());
    let q = again.queue("t", 0).unwrap();
    again
        .read_messages(&q, 0, 1000)
        .unwrap()
        .iter()
        .map(|(_, r)| r.header.log_offset)
        .collect()
}

#[test]
fn one_round_at_a_time_when_configured_so() {
    let disk = slow_disk();
    let config = StoreConfig::default().with_sync_rounds_max(1);
    let store = Arc::new(open_store(&disk, config));
    let (acked, hooked) = write_concurrently(&store);
    assert!(acked.iter().all(Result::is_ok));
    assert_eq!(hooked.len(), WRITERS * EACH);
    assert_eq!(disk.syncs_at_once_max(), 1);
}

#[test]
fn a_failed_sync_fails_the_round_syncing_beside_it_and_acknowledges_nothing_after() {
    // Until the failure did hit a sync that overlapped another (almost always the first
    // try). The failure is reported to the later sync first, while the earlier one still
    // runs: the earlier round's writes are among those dropped, so it must fail too.
    for attempt in 1..=10 {
        let disk = slow_disk();
        let store = Arc::new(open_store(&disk, StoreConfig::default()));
        disk.set_faults(Faults {
            sync_delay_ms: 20,
            fail_overlapping_sync: true,
            ..Faults::default()
        });
        let (acked, hooked) = write_concurrently(&store);
        let failed = !disk.faults().fail_overlapping_sync;
        let ok: Vec<u64> = acked
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        // What was acknowledged is exactly what hooks ran for, and a power loss keeps it.
        assert_eq!(hooked, ok);
        let kept = kept_by_power_loss(&disk, store);
        for offset in &ok {
            assert!(
                kept.contains(offset),
                "the record at {offset} was acknowledged and lost (kept: {kept:?})"
            );
        }
        if failed {
            // And nothing after the failure was acknowledged: the store stopped.
            let errors = acked.iter().filter(|r| r.is_err()).count();
            assert!(errors > 0);
            for r in acked.iter().filter(|r| r.is_err()) {
                assert!(matches!(r, Err(Error::Poisoned(_))), "{r:?}");
            }
            return;
        }
        assert!(attempt < 10, "in 10 tries no sync failed beside another");
    }
}
