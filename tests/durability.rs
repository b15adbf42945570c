//! What `--flush async` and a full disk must not break: consumers see only durable messages
//! (embedded, long poll and over the network), dead-letter moves and replays are durable
//! before the original is acked (a power loss leaves the message in one place, never in
//! none), and the broker goes back to work after its disk was full (see also
//! `tests/disk_full.rs` for a real file system that fills up).

mod common;

use std::time::{Duration, Instant};

use halfmq::{Broker, BrokerConfig, FlushPolicy, GroupSettings, HalfOptions, Message, NackOutcome};
use halfmq_store::sim::CrashMode;

use common::*;

/// Async flush that does not sync on its own within a test: only a sync-forcing record, a
/// full batch or an explicit `Store::sync` makes anything durable.
fn async_config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.store.segment_bytes = 256 * 1024;
    c.store.record_bytes_max = 16 * 1024;
    c.store.flush = FlushPolicy::Async {
        interval: Duration::from_secs(60),
    };
    c.default_queues = 1;
    c
}

/// A group that dead-letters a message at its first failure.
fn dead_at_first_failure() -> GroupSettings {
    GroupSettings {
        visibility_timeout_ms: Some(60_000),
        max_retries: Some(0),
        retry_backoff_ms: Some(vec![1]),
        fifo: None,
    }
}

/// Longer than any wake-up takes (and shorter than the flush interval): a reader that is
/// not woken by the sync waits this long.
const WAKE_BOUND: Duration = Duration::from_secs(40);

#[test]
fn async_flush_a_consumer_never_receives_a_message_before_its_flush() {
    let (_tmp, disk, cfg, b) = fresh_sim(async_config, "t", 1);

    // Acknowledged under async flush: written, not durable. No poll may hand it out, so no
    // consumer can act on it or ack it.
    b.send("t", &Message::new("early").with_key("k1")).unwrap();
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
    assert!(b
        .poll_wait("g", "t", 10, Duration::ZERO)
        .unwrap()
        .is_empty());
    let stats = b.stats().unwrap();
    assert!(stats
        .queues
        .iter()
        .all(|q| q.topic != "t" || q.messages == 0));

    // Power loss before the flush: the message is gone, and no group ever saw it.
    let after = crash_sim(&disk, b, CrashMode::DropUnsynced, "t");
    let b = open_sim(&after, &cfg);
    assert!(visible(&b, "t").is_empty());

    // A long poll waiting for it is woken by the flush (here asked for by `Store::sync`).
    b.send("t", &Message::new("later").with_key("k2")).unwrap();
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let got = b.poll_wait("g", "t", 10, WAKE_BOUND).unwrap();
            (got, t.elapsed())
        })
    };
    b.store().sync().unwrap();
    let (got, took) = waiter.join().unwrap();
    assert!(
        took < WAKE_BOUND / 2,
        "the long poll was not woken by the flush"
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"later");
    b.ack("g", "t", got[0].queue, got[0].offset).unwrap();
    close(b);
}

#[test]
fn async_flush_an_async_consumer_is_woken_by_the_flush_that_a_transaction_forces() {
    let (_tmp, _disk, _cfg, b) = fresh_sim(async_config, "t", 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    b.send("t", &Message::new("plain")).unwrap();
    assert!(
        b.poll("other", "t", 10).unwrap().is_empty(),
        "not durable yet"
    );
    let waiter = {
        let b = b.clone();
        rt.spawn(async move {
            let t = Instant::now();
            let got = b
                .poll_wait_async("g", "t", 10, usize::MAX, WAKE_BOUND)
                .await
                .unwrap();
            (got, t.elapsed())
        })
    };
    // A half is synced whatever the policy; its round makes the plain message durable too.
    let txn = b
        .send_half("t", &Message::new("half"), "p", HalfOptions::default())
        .unwrap();
    let (got, took) = rt.block_on(waiter).unwrap();
    assert!(took < WAKE_BOUND / 2, "the async long poll was not woken");
    let bodies: Vec<&[u8]> = got.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, [&b"plain"[..]], "the half stays invisible");
    // The commit's message is synced before the commit returns, so it is visible at once.
    b.commit(txn).unwrap();
    let got = b.poll("g", "t", 10).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"half");
    drop(rt);
    close(b);
}

/// The message is in the dead-letter queue or still in its topic for the group, never in
/// neither: what a power loss right after a move (or replay) must leave.
fn dead_lettered_or_still_there(b: &Broker, group: &str, topic: &str) -> (usize, usize) {
    let dead = b.dead_letters(group, 0, 100).unwrap().len();
    let live = b.poll(group, topic, 100).unwrap().len();
    (dead, live)
}

#[test]
fn a_dead_letter_move_is_durable_before_the_ack_under_async_flush() {
    let (_tmp, disk, cfg, b) = fresh_sim(async_config, "t", 1);
    b.set_group_settings("g", &dead_at_first_failure()).unwrap();
    b.send("t", &Message::new("poison").with_key("k")).unwrap();
    b.store().sync().unwrap();
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    let out = b.nack("g", "t", d.queue, d.offset, None).unwrap();
    assert!(matches!(out, NackOutcome::DeadLettered { .. }), "{out:?}");

    // Power loss right after the move returned: the original is acked in sled, so its copy
    // must be in the log.
    let after = crash_sim(&disk, b, CrashMode::DropUnsynced, "t");
    let b = open_sim(&after, &cfg);
    let (dead, live) = dead_lettered_or_still_there(&b, "g", "t");
    assert!(
        dead + live >= 1,
        "the message is neither in the dead-letter queue nor in its topic"
    );
    assert_eq!((dead, live), (1, 0), "the move returned, so it is done");

    // Replay, then power loss: the message is back in its topic, or still waiting in the
    // dead-letter queue to be replayed, never in neither.
    let replayed = b.replay_dead_letters("g", 10).unwrap();
    assert_eq!(replayed.len(), 1);
    let after2 = crash_sim(&after, b, CrashMode::DropUnsynced, "t");
    let b = open_sim(&after2, &cfg);
    let in_topic = visible(&b, "t")
        .iter()
        .filter(|d| d.body == b"poison" && d.properties.contains_key("halfmq.replayed_from"))
        .count();
    let waiting = b
        .dead_letters("g", 0, 10)
        .unwrap()
        .iter()
        .filter(|dl| !dl.replayed)
        .count();
    assert!(
        in_topic + waiting >= 1,
        "the replayed message is neither in its topic nor waiting in the dead-letter queue"
    );
    assert_eq!(
        (in_topic, waiting),
        (1, 0),
        "the replay returned, so it is done"
    );
    close(b);
}

#[test]
fn async_flush_over_the_network_a_consumer_sees_only_durable_messages() {
    let mut broker = BrokerProc::fresh(&["--flush", "async", "--flush-interval-ms", "60000"]);
    let a = broker.addr.clone();
    let sent = run(&[
        "produce", "--addr", &a, "--topic", "t", "--count", "3", "--json",
    ])
    .ok()
    .json_lines();
    assert_eq!(
        sent.len(),
        3,
        "three sends acknowledged (written, not yet durable)"
    );
    let consume = |idle_ms: &str| {
        run(&[
            "consume",
            "--addr",
            &a,
            "--topic",
            "t",
            "--group",
            "g",
            "--json",
            "--idle-exit-ms",
            idle_ms,
        ])
        .ok()
        .json_lines()
    };
    assert!(
        consume("300").is_empty(),
        "a consumer received messages that are not durable"
    );
    // A half message is synced under any policy, and its round makes the three durable.
    run(&[
        "txn", "begin", "--addr", &a, "--topic", "other", "--key", "h", "--group", "p", "--body",
        "x", "--json",
    ])
    .ok();
    assert_eq!(consume("2000").len(), 3);
    broker.terminate();
}
