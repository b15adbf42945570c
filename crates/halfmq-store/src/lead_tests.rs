//! A writer leading its own group-commit round (`crate::flush::lead`): who writes which
//! round, and that no way of holding, dropping or outrunning a ticket leaves a record
//! unwritten or a writer waiting for good.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::sim::{open_store, CrashMode, SimStorage};
use crate::{Append, Hook, Store, StoreConfig};

/// Run `f` on a thread and fail the test if it has not returned within a minute (a writer
/// waiting for good), instead of hanging the test run.
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("a writer waited for good")
}

fn send(store: &Store, q: &Arc<crate::consume_queue::ConsumeQueue>, n: u8) {
    store.append(Append::message(q, "", &[n; 100], 1)).unwrap();
}

#[test]
fn a_lone_thread_writes_its_own_rounds_and_a_crash_keeps_every_one() {
    let disk = SimStorage::new();
    let store = open_store(&disk, StoreConfig::default());
    let q = store.queue("t", 0).unwrap();
    for n in 0..20 {
        send(&store, &q, n);
    }
    let stats = store.log_stats();
    // All but perhaps the first, which a flusher thread still starting may find first.
    assert!(stats.rounds_led >= 19, "{stats:?}");
    assert_eq!(stats.syncs, 20, "one fsync per lone send: {stats:?}");
    // Every acknowledged record survives a power loss.
    let lost = disk.crash(CrashMode::DropUnsynced);
    drop(store);
    let again = open_store(&lost, StoreConfig::default());
    let q = again.queue("t", 0).unwrap();
    let read = again.read_messages(&q, 0, 100).unwrap();
    assert_eq!(read.len(), 20);
}

#[test]
fn async_tasks_lead_only_when_the_store_lets_them() {
    let rt = crate::sim::test_runtime();
    for may in [false, true] {
        let disk = SimStorage::new();
        let store = open_store(&disk, StoreConfig::default().with_tasks_may_lead(may));
        let q = store.queue("t", 0).unwrap();
        rt.block_on(async {
            for n in 0..10u8 {
                store
                    .append_async(Append::message(&q, "", &[n; 10], 1))
                    .await
                    .unwrap();
            }
        });
        let led = store.log_stats().rounds_led;
        // Perhaps not the first: a flusher thread still starting may find it first.
        let expected = if may { 9..=10 } else { 0..=0 };
        assert!(
            expected.contains(&led),
            "tasks_may_lead {may}: {led} rounds led"
        );
        assert_eq!(store.read_messages(&q, 0, 100).unwrap().len(), 10);
    }
}

#[test]
fn a_dropped_ticket_still_gets_its_record_written() {
    let disk = SimStorage::new();
    let store = Arc::new(open_store(&disk, StoreConfig::default()));
    let q = store.queue("t", 0).unwrap();
    let end = {
        let t = store
            .submit(Append::message(&q, "", b"dropped", 1), Hook::None)
            .unwrap();
        let a = t.appended();
        a.log_offset + u64::from(a.size)
    };
    // Nobody waits: the flusher must have been told.
    let s = store.clone();
    within_a_minute(move || {
        while s.log_stats().durable_offset < end {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    assert_eq!(store.log_stats().rounds_led, 0);
}

#[test]
fn a_writer_holding_an_unwaited_ticket_can_still_wait_for_room_and_for_others() {
    let disk = SimStorage::new();
    // Room for one 4 KiB record: the second waits for the flusher to take the first.
    let config = StoreConfig::default()
        .with_record_bytes_max(4096)
        .with_pending_bytes_max(4096);
    let store = Arc::new(open_store(&disk, config));
    let q = store.queue("t", 0).unwrap();
    let (s, q2) = (store.clone(), q.clone());
    within_a_minute(move || {
        let first = s
            .submit(Append::message(&q2, "", &[1; 3000], 1), Hook::None)
            .unwrap();
        // Same thread, first ticket not yet waited on: waits for room, then for the round.
        let second = s
            .submit(Append::message(&q2, "", &[2; 3000], 1), Hook::None)
            .unwrap();
        second.wait().unwrap();
        first.wait().unwrap();
        // (Two small ones waited on in the other order: ticket.rs's first test.)
    });
    assert_eq!(store.read_messages(&q, 0, 10).unwrap().len(), 2);
}

#[test]
fn many_writers_leading_and_gathering_lose_nothing_and_keep_log_order() {
    let disk = SimStorage::new();
    let store = Arc::new(open_store(
        &disk,
        StoreConfig::default().with_tasks_may_lead(true),
    ));
    let q = store.queue("t", 0).unwrap();
    let rt = crate::sim::test_runtime();
    let tasks: Vec<_> = (0..4u8)
        .map(|t| {
            let (s, q) = (store.clone(), q.clone());
            rt.spawn(async move {
                for n in 0..50u8 {
                    s.append_async(Append::message(&q, "", &[t, n], 1))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let s = store.clone();
    let q2 = q.clone();
    let threads: Vec<_> = (4..8u8)
        .map(|t| {
            let (s, q) = (s.clone(), q2.clone());
            std::thread::spawn(move || {
                for n in 0..50u8 {
                    s.append(Append::message(&q, "", &[t, n], 1)).unwrap();
                    if n % 7 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    for t in threads {
        t.join().unwrap();
    }
    // Every writer's records, each once, in its own order; and all of it survives a crash.
    let check = |store: &Store| {
        let q = store.queue("t", 0).unwrap();
        let read = store.read_messages(&q, 0, 1000).unwrap();
        assert_eq!(read.len(), 400);
        let mut next = [0u8; 8];
        for (_, m) in &read {
            let (t, n) = (m.body[0] as usize, m.body[1]);
            assert_eq!(n, next[t], "writer {t} out of order");
            next[t] += 1;
        }
    };
    check(&store);
    let lost = disk.crash(CrashMode::DropUnsynced);
    drop(rt);
    drop(store);
    check(&open_store(&lost, StoreConfig::default()));
}

#[test]
fn async_flush_never_leads() {
    let disk = SimStorage::new();
    let store = crate::sim::open_async_flush(&disk, Duration::from_millis(5));
    let q = store.queue("t", 0).unwrap();
    for n in 0..5 {
        send(&store, &q, n);
    }
    store.sync().unwrap();
    assert_eq!(store.log_stats().rounds_led, 0);
    assert_eq!(store.read_messages(&q, 0, 10).unwrap().len(), 5);
}

#[test]
fn checkpoints_due_after_led_rounds_are_written_by_the_flusher() {
    let disk = SimStorage::new();
    let store = open_store(&disk, StoreConfig::default().with_checkpoint_bytes(4096));
    let q = store.queue("t", 0).unwrap();
    for n in 0..20 {
        store
            .append(Append::message(&q, "", &[n; 1024], 1))
            .unwrap();
    }
    assert!(store.log_stats().rounds_led >= 19);
    // 20 KiB past a 4 KiB interval: the flusher, woken by the leaders, writes them.
    let d = disk.clone();
    let seq = within_a_minute(move || loop {
        let cp = crate::checkpoint::load(&d, std::path::Path::new("/s")).unwrap();
        if let Some(cp) = cp.filter(|c| c.log_offset > 16 * 1024) {
            return cp.seq;
        }
        std::thread::sleep(Duration::from_millis(1));
    });
    assert!(seq >= 2, "checkpoint {seq}");
}
