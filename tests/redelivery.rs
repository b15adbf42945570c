//! Redelivery without a restart, nack, retry with backoff, dead letters and their replay,
//! per-group settings, and all of it across restarts and crashes.

mod common;

use common::fresh_with_clock;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use halfmq::props::PROP_REPLAYED_FROM;
use halfmq::GroupSettings;
use halfmq::NackOutcome;
use halfmq::{Broker, BrokerConfig, Clock, Error, Message};
use halfmq_store::sim::{CrashMode, Faults, SimStorage};

fn config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.store.segment_bytes = 256 * 1024;
    c.store.record_bytes_max = 16 * 1024;
    c.default_queues = 2;
    c
}

fn open(dir: &std::path::Path) -> Arc<Broker> {
    Broker::open(config(dir)).unwrap()
}

fn settings(vt_ms: u64, max_retries: u32, backoff_ms: &[u64]) -> GroupSettings {
    GroupSettings {
        visibility_timeout_ms: Some(vt_ms),
        max_retries: Some(max_retries),
        retry_backoff_ms: Some(backoff_ms.to_vec()),
        fifo: None,
    }
}

/// Group `g`'s visibility time-out, retries and backoff (see [`settings`]).
fn settle_g(b: &Broker, vt_ms: u64, max_retries: u32, backoff_ms: &[u64]) {
    b.set_group_settings("g", &settings(vt_ms, max_retries, backoff_ms))
        .unwrap();
}

/// [`open`], with group `g` set up by [`settle_g`].
fn open_g(dir: &std::path::Path, vt_ms: u64, max_retries: u32, backoff_ms: &[u64]) -> Arc<Broker> {
    let b = open(dir);
    settle_g(&b, vt_ms, max_retries, backoff_ms);
    b
}

/// Poll until something comes or `timeout` passes.
fn poll_for(
    b: &Broker,
    group: &str,
    topic: &str,
    max: usize,
    timeout: Duration,
) -> Vec<halfmq::Delivery> {
    b.poll_wait(group, topic, max, timeout).unwrap()
}

#[test]
fn an_unacked_message_is_delivered_again_after_the_visibility_timeout() {
    let (_tmp, b, clock) = fresh_with_clock(config);
    settle_g(&b, 300, 16, &[1000]);
    b.send("t", &Message::new("pay-1").with_key("order-1"))
        .unwrap();
    let first = b.poll("g", "t", 10).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    // Leased: not handed to anyone else in the group meanwhile.
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
    // Another group has its own lease.
    assert_eq!(b.poll("other", "t", 10).unwrap().len(), 1);
    // Still leased one millisecond before the time-out...
    clock.advance_ms(299);
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
    // ...and delivered again at it.
    clock.advance_ms(1);
    let again = b.poll("g", "t", 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].offset, again[0].attempt), (first[0].offset, 2));
    assert_eq!(again[0].body, b"pay-1");
    let stats = b.stats().unwrap();
    let (backlog, in_flight) = stats
        .queues
        .iter()
        .filter(|q| q.topic == "t")
        .flat_map(|q| q.groups.iter())
        .filter(|g| g.group == "g")
        .fold((0, 0), |(b, f), g| (b + g.backlog, f + g.in_flight));
    assert_eq!(
        (backlog, in_flight),
        (1, 1),
        "a group that acked nothing yet is in the stats"
    );

    b.ack("g", "t", again[0].queue, again[0].offset).unwrap();
    clock.advance_ms(3_600_000);
    assert!(
        b.poll("g", "t", 10).unwrap().is_empty(),
        "acked: never delivered again"
    );
    // A late ack of an acked message is fine (idempotent); a nack of it is an error.
    b.ack("g", "t", again[0].queue, again[0].offset).unwrap();
    assert!(matches!(
        b.nack("g", "t", again[0].queue, again[0].offset, None),
        Err(Error::BadAck { .. })
    ));
}

#[test]
fn a_consumer_that_dies_mid_batch_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open_g(tmp.path(), 200, 16, &[1000]);
    for i in 0..10 {
        b.send("t", &Message::new(format!("m{i}"))).unwrap();
    }
    let batch = b.poll("g", "t", 10).unwrap();
    assert_eq!(batch.len(), 10);
    // It processed and acked half, then died.
    for d in &batch[..5] {
        b.ack("g", "t", d.queue, d.offset).unwrap();
    }
    let mut want: Vec<_> = batch[5..].iter().map(|d| d.body.clone()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < 5 && Instant::now() < deadline {
        for d in poll_for(&b, "g", "t", 10, Duration::from_millis(500)) {
            assert_eq!(d.attempt, 2);
            got.push(d.body);
        }
    }
    got.sort();
    assert_eq!(got, want, "exactly the un-acked half comes back");
}

#[test]
fn nack_redelivers_at_once_or_after_the_backoff() {
    let (_tmp, b, clock) = fresh_with_clock(config);
    settle_g(&b, 60_000, 16, &[400, 800]);
    b.send("t", &Message::new("x")).unwrap();
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    // Delay 0: at once.
    match b
        .nack("g", "t", d.queue, d.offset, Some(Duration::ZERO))
        .unwrap()
    {
        NackOutcome::Redeliver { attempt, .. } => assert_eq!(attempt, 2),
        other => panic!("{other:?}"),
    }
    let d2 = b.poll("g", "t", 1).unwrap().remove(0);
    assert_eq!((d2.offset, d2.attempt), (d.offset, 2));
    // Nacking it again while it waits is refused: it is not with a consumer.
    let nacked_at = clock.now_ms();
    let at = match b.nack("g", "t", d.queue, d.offset, None).unwrap() {
        NackOutcome::Redeliver { attempt, at_ms } => {
            assert_eq!(attempt, 3);
            at_ms
        }
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        b.nack("g", "t", d.queue, d.offset, None),
        Err(Error::BadAck { .. })
    ));
    // Second failure: the second backoff level (800 ms).
    assert_eq!(at, nacked_at + 800, "backoff level 2 applies");
    clock.advance_ms(799);
    assert!(b.poll("g", "t", 1).unwrap().is_empty());
    clock.advance_ms(1);
    let d3 = b.poll("g", "t", 1).unwrap().remove(0);
    assert_eq!(d3.attempt, 3);
    // Never delivered: nack is refused.
    b.send("t", &Message::new("y")).unwrap();
    assert!(matches!(
        b.nack("g", "t", 0, 1_000, None),
        Err(Error::BadAck { .. })
    ));
}

/// Nack `offset` of group `g` until it is dead-lettered; returns the deliveries seen.
fn fail_until_dead(b: &Broker, max_retries: u32) -> Vec<u32> {
    let mut attempts = Vec::new();
    loop {
        let d = poll_for(b, "g", "t", 1, Duration::from_secs(5));
        assert_eq!(d.len(), 1, "delivered again until dead-lettered");
        attempts.push(d[0].attempt);
        match b
            .nack("g", "t", d[0].queue, d[0].offset, Some(Duration::ZERO))
            .unwrap()
        {
            NackOutcome::Redeliver { attempt, .. } => {
                assert!(attempt <= max_retries + 1);
            }
            NackOutcome::DeadLettered { dead_letter } => {
                assert_eq!(dead_letter.topic, "%DLQ%g");
                return attempts;
            }
        }
    }
}

#[test]
fn dead_letter_after_exactly_the_maximum_then_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open_g(tmp.path(), 60_000, 3, &[1]);
    b.send(
        "t",
        &Message::new("poison")
            .with_key("order-7")
            .with_property("trace", "abc"),
    )
    .unwrap();
    b.send("t", &Message::new("fine").with_key("order-8"))
        .unwrap();
    // Let the good one through first (keys may share a queue; take both, ack the good one).
    let both = b.poll("g", "t", 10).unwrap();
    assert_eq!(both.len(), 2);
    for d in &both {
        if d.body == b"fine" {
            b.ack("g", "t", d.queue, d.offset).unwrap();
        } else {
            b.nack("g", "t", d.queue, d.offset, Some(Duration::ZERO))
                .unwrap();
        }
    }
    let attempts = fail_until_dead(&b, 3);
    assert_eq!(attempts, vec![2, 3, 4], "1 + max_retries deliveries in all");
    assert!(
        b.poll("g", "t", 10).unwrap().is_empty(),
        "a dead letter is not delivered again"
    );
    let dl = b.dead_letters("g", 0, 100).unwrap();
    assert_eq!(dl.len(), 1);
    let d = &dl[0];
    assert_eq!(
        (d.topic.as_str(), d.key.as_str(), d.failures, d.replayed),
        ("t", "order-7", 4, false)
    );
    assert!(d.reason.contains("nack"), "{}", d.reason);
    let stats = b.stats().unwrap();
    assert_eq!(stats.dead_letters.len(), 1);
    assert_eq!(
        (
            stats.dead_letters[0].messages,
            stats.dead_letters[0].replayed
        ),
        (1, 0)
    );
    // The group's backlog is empty: the dead letter is acked in the topic.
    for q in stats.queues.iter().filter(|q| q.topic == "t") {
        for g in q.groups.iter().filter(|g| g.group == "g") {
            assert_eq!(g.backlog, 0);
        }
    }
    // Other groups are not affected.
    assert_eq!(b.poll("other", "t", 10).unwrap().len(), 2);
    // The dead-letter queue itself can be consumed like a topic, but not written to.
    let raw = b.poll("inspect", "%DLQ%g", 10).unwrap();
    assert_eq!(raw.len(), 1);
    assert_eq!(
        raw[0].properties.get("trace").map(String::as_str),
        Some("abc")
    );
    assert!(matches!(
        b.send("%DLQ%g", &Message::new("forged")),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        b.create_topic("%mine", 1),
        Err(Error::Invalid { .. })
    ));

    // Replay: back in the topic as a new message, delivered afresh.
    let replayed = b.replay_dead_letters("g", 100).unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].receipt.topic, "t");
    assert!(b.replay_dead_letters("g", 100).unwrap().is_empty(), "once");
    assert!(b.dead_letters("g", 0, 100).unwrap()[0].replayed);
    let again = b.poll("g", "t", 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].body.as_slice(), again[0].attempt),
        (&b"poison"[..], 1)
    );
    assert_eq!(again[0].key, "order-7");
    assert_eq!(
        again[0]
            .properties
            .get(PROP_REPLAYED_FROM)
            .map(String::as_str),
        Some("g/0")
    );
    assert_eq!(
        again[0].properties.get("trace").map(String::as_str),
        Some("abc")
    );
    assert_eq!(b.stats().unwrap().dead_letters[0].replayed, 1);
}

#[test]
fn timed_out_deliveries_count_and_dead_letter_too() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open_g(tmp.path(), 100, 1, &[1]);
    b.send("t", &Message::new("slow")).unwrap();
    assert_eq!(b.poll("g", "t", 1).unwrap()[0].attempt, 1);
    let d = poll_for(&b, "g", "t", 1, Duration::from_secs(5));
    assert_eq!(d[0].attempt, 2);
    // The second time-out is failure 2 > max_retries 1: dead-lettered by the next poll.
    thread::sleep(Duration::from_millis(150));
    assert!(b.poll("g", "t", 1).unwrap().is_empty());
    let dl = b.dead_letters("g", 0, 10).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].failures, 2);
    assert!(
        dl[0].reason.contains("visibility time-out"),
        "{}",
        dl[0].reason
    );
}

#[test]
fn failure_counts_and_waits_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let b = open_g(tmp.path(), 60_000, 3, &[1]);
        b.send("t", &Message::new("poison")).unwrap();
        for want in 1..=2 {
            let d = poll_for(&b, "g", "t", 1, Duration::from_secs(5));
            assert_eq!(d[0].attempt, want);
            b.nack("g", "t", d[0].queue, d[0].offset, Some(Duration::ZERO))
                .unwrap();
        }
        // Delivered a third time, then the process stops: that delivery does not count.
        assert_eq!(b.poll("g", "t", 1).unwrap()[0].attempt, 3);
        b.close().unwrap();
    }
    let b = open(tmp.path());
    // The settings are durable too.
    assert_eq!(b.group_settings("g").unwrap().0.max_retries, 3);
    let attempts = fail_until_dead(&b, 3);
    assert_eq!(attempts, vec![3, 4], "two failures were remembered");
    assert_eq!(b.dead_letters("g", 0, 10).unwrap()[0].failures, 4);
    b.close().unwrap();
    drop(b);
    // And a nack delay outlives a restart.
    let b = open(tmp.path());
    b.send("t", &Message::new("later")).unwrap();
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    b.nack(
        "g",
        "t",
        d.queue,
        d.offset,
        Some(Duration::from_millis(600)),
    )
    .unwrap();
    let nacked = Instant::now();
    b.close().unwrap();
    drop(b);
    let b = open(tmp.path());
    let d = poll_for(&b, "g", "t", 1, Duration::from_secs(5));
    assert!(nacked.elapsed() >= Duration::from_millis(550));
    assert_eq!((d[0].body.as_slice(), d[0].attempt), (&b"later"[..], 2));
}

#[test]
fn a_dead_letter_move_that_fails_is_finished_later_never_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SimStorage::new();
    let b = Broker::open_with(Arc::new(disk.clone()), config(tmp.path())).unwrap();
    settle_g(&b, 60_000, 0, &[1]);
    b.send("t", &Message::new("poison").with_key("k")).unwrap();
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    // The disk is full when the dead letter is written.
    disk.set_faults(Faults {
        disk_full: true,
        ..Faults::default()
    });
    let e = b
        .nack("g", "t", d.queue, d.offset, None)
        .expect_err("the dead letter cannot be written");
    assert!(
        matches!(e, Error::DiskFull { .. } | Error::Io { .. }),
        "{e:?}"
    );
    // Power loss now; the disk has room again after the restart.
    let disk2 = disk.crash(CrashMode::DropUnsynced);
    drop(b);
    let b = Broker::open_with(Arc::new(disk2), config(tmp.path())).unwrap();
    // The message was marked dead before the write: the next poll finishes the move instead
    // of delivering it again.
    let got = b.poll("g", "t", 10).unwrap();
    assert!(got.is_empty(), "{got:?} {:?}", b.dead_letters("g", 0, 10));
    let dl = b.dead_letters("g", 0, 10).unwrap();
    assert_eq!(dl.len(), 1, "moved, exactly once");
    assert_eq!((dl[0].key.as_str(), dl[0].failures), ("k", 1));
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
}

#[test]
fn bad_group_settings_and_names_are_refused_with_the_setting_named() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    let e = b
        .set_group_settings(
            "g",
            &GroupSettings {
                visibility_timeout_ms: Some(0),
                ..GroupSettings::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("visibility_timeout_ms"), "{e}");
    let e = b
        .set_group_settings(
            "g",
            &GroupSettings {
                retry_backoff_ms: Some(vec![]),
                ..GroupSettings::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("retry_backoff_ms"), "{e}");
    assert!(b.poll("%replay", "t", 1).is_err(), "internal group names");
    assert!(
        b.poll(&"g".repeat(125), "t", 1).is_err(),
        "too long for a DLQ name"
    );
    // Nothing changed.
    assert_eq!(b.group_settings("g").unwrap().1, GroupSettings::default());
}
