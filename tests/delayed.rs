//! Delayed delivery: durable at once, invisible until its time, delivered within about a
//! second of it, exactly once, also across restarts, crashes and checkpoints.

mod common;

use common::{advance, fresh_with_clock};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::clock::now_ms;
use halfmq::props::PROP_DELAYED;
use halfmq::{Broker, BrokerConfig, Clock, Error, ManualClock, Message};
use halfmq_store::sim::{CrashMode, SimStorage};

fn config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.store.segment_bytes = 256 * 1024;
    c.store.record_bytes_max = 16 * 1024;
    c.store.checkpoint_bytes = 16 * 1024;
    c.default_queues = 2;
    c
}

/// Every body `group` gets from `topic` within `timeout` (acked), with when it came.
fn drain(b: &Broker, group: &str, timeout: Duration) -> Vec<(Vec<u8>, Instant)> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        for d in b
            .poll_wait(group, "t", 100, Duration::from_millis(100))
            .unwrap()
        {
            b.ack(group, "t", d.queue, d.offset).unwrap();
            out.push((d.body, Instant::now()));
        }
    }
    out
}

#[test]
fn a_delayed_message_is_invisible_until_its_time_then_delivered_once() {
    // The broker's clock moves only when the test moves it, so "not yet" and "now" are exact.
    let (_tmp, b, clock) = fresh_with_clock(config);
    let at = clock.now_ms() + 700;
    let r = b
        .send_delayed("t", &Message::new("later").with_key("order-1"), at)
        .unwrap();
    b.send("t", &Message::new("now")).unwrap();
    assert_eq!(b.stats().unwrap().delayed_pending, 1);
    let first = b.poll("g", "t", 10).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].body, b"now");
    b.ack("g", "t", first[0].queue, first[0].offset).unwrap();
    // One millisecond before its time: not delivered.
    advance(&b, &clock, 699);
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
    assert_eq!(b.stats().unwrap().delayed_pending, 1);
    // At its time: delivered, exactly once.
    advance(&b, &clock, 1);
    let got = drain(&b, "g", Duration::from_millis(500));
    assert_eq!(got.len(), 1, "delivered exactly once");
    assert_eq!(got[0].0, b"later");
    assert_eq!(b.stats().unwrap().delayed_pending, 0);
    let again = b.poll("other", "t", 10).unwrap();
    let later = again.iter().find(|d| d.body == b"later").unwrap();
    assert_eq!(later.key, "order-1");
    assert_eq!(later.properties.get(PROP_DELAYED), Some(&r.id.to_string()));
}

#[test]
fn past_times_go_at_once_and_far_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let b = Broker::open(config(tmp.path())).unwrap();
    b.send_delayed("t", &Message::new("overdue"), 1).unwrap();
    assert_eq!(drain(&b, "g", Duration::from_millis(800)).len(), 1);
    let e = b
        .send_delayed("t", &Message::new("x"), now_ms() + 100 * 86_400_000)
        .unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    assert!(matches!(
        b.send_delayed("%DLQ%g", &Message::new("x"), 0),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn delayed_messages_are_delivered_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let cfg = config(tmp.path()).with_clock(clock.clone());
    {
        let b = Broker::open(cfg.clone()).unwrap();
        let at = clock.now_ms() + 600;
        b.send_delayed("t", &Message::new("after-restart"), at)
            .unwrap();
        b.close().unwrap();
    }
    // Its time passes while the broker is down.
    clock.advance_ms(600);
    let b = Broker::open(cfg).unwrap();
    assert_eq!(b.stats().unwrap().delayed_pending, 1);
    b.run_due_now();
    let got = drain(&b, "g", Duration::from_millis(500));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, b"after-restart");
}

/// Many delayed and plain messages with checkpoints in between, a power loss at a random
/// moment, then everything acknowledged is delivered exactly once.
#[test]
fn crashes_lose_no_delayed_message_and_deliver_none_twice() {
    for round in 0..4u64 {
        let tmp = tempfile::tempdir().unwrap();
        let disk = SimStorage::new();
        let b = Broker::open_with(Arc::new(disk.clone()), config(tmp.path())).unwrap();
        let mut acked = BTreeMap::new();
        let base = now_ms();
        for i in 0..120u64 {
            let body = format!("d{round}-{i}");
            // Some due before the crash, some after; bodies big enough to force checkpoints.
            let at = base + (i % 6) * 150;
            b.send_delayed("t", &Message::new(body.clone() + &"x".repeat(300)), at)
                .unwrap();
            acked.insert(body, ());
            if i % 10 == 0 {
                b.send("filler", &Message::new(vec![0u8; 2000])).unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(100 + round * 150));
        let mode = if round % 2 == 0 {
            CrashMode::DropUnsynced
        } else {
            CrashMode::KeepRandomPrefix { seed: round }
        };
        let disk2 = disk.crash(mode);
        drop(b);
        let b = Broker::open_with(Arc::new(disk2), config(tmp.path())).unwrap();
        let got = drain(&b, "g", Duration::from_millis(2500));
        let mut seen = BTreeMap::new();
        for (body, _) in got {
            let body = String::from_utf8(body).unwrap();
            let name = body.trim_end_matches('x').to_owned();
            *seen.entry(name).or_insert(0) += 1;
        }
        for name in acked.keys() {
            assert_eq!(
                seen.get(name),
                Some(&1),
                "round {round}: {name} must be delivered exactly once"
            );
        }
        assert_eq!(seen.len(), acked.len(), "round {round}: nothing extra");
        assert_eq!(b.stats().unwrap().delayed_pending, 0);
    }
}
