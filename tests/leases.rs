//! Leases of the embedded broker: a poll's own lease duration, changing a lease without
//! counting a failure, receipts bound to one lease (stale and forged ones refused), and the
//! attempt number. Time moves by a manual clock, never by sleeping.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fresh_with_clock;
use halfmq::{
    Broker, BrokerConfig, Error, GroupSettings, ManualClock, Message, NackOutcome, PollOptions,
    Receipt,
};
use tempfile::TempDir;

fn config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.default_queues = 1;
    c
}

fn vt(ms: u64) -> GroupSettings {
    GroupSettings {
        visibility_timeout_ms: Some(ms),
        ..GroupSettings::default()
    }
}

fn lease(ms: u64) -> PollOptions {
    PollOptions::default().with_lease(Some(Duration::from_millis(ms)))
}

fn receipt(d: &halfmq::Delivery) -> Receipt {
    d.receipt.expect("the embedded broker hands out receipts")
}

/// A broker (its directory and manual clock too) whose group `g` has a visibility time-out of
/// `vt_ms`.
fn open_g(vt_ms: u64) -> (TempDir, Arc<Broker>, ManualClock) {
    let (tmp, b, clock) = fresh_with_clock(config);
    b.set_group_settings("g", &vt(vt_ms)).unwrap();
    (tmp, b, clock)
}

/// Send `a` to topic `t` and poll it for group `g`: the receipt of its delivery.
fn leased_a(b: &Broker) -> Receipt {
    b.send("t", &Message::new("a")).unwrap();
    receipt(&b.poll("g", "t", 1).unwrap().remove(0))
}

#[test]
fn a_poll_leases_for_its_own_duration_and_bad_durations_are_refused() {
    let (_tmp, b, clock) = open_g(10_000);
    b.send("t", &Message::new("a")).unwrap();
    let got = b.poll_with("g", "t", 10, &lease(500)).unwrap();
    assert_eq!(got.len(), 1);
    clock.advance_ms(499);
    assert!(
        b.poll("g", "t", 10).unwrap().is_empty(),
        "leased for 500 ms"
    );
    clock.advance_ms(1);
    let again = b.poll("g", "t", 10).unwrap();
    assert_eq!(
        (again.len(), again[0].attempt),
        (1, 2),
        "not the group's 10 s"
    );
    // Without options it is the group's visibility time-out again.
    clock.advance_ms(9_999);
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
    clock.advance_ms(1);
    assert_eq!(b.poll("g", "t", 10).unwrap()[0].attempt, 3);
    for bad in [0, 9, 24 * 3600 * 1000 + 1] {
        match b.poll_with("g", "t", 10, &lease(bad)) {
            Err(Error::Invalid { what, .. }) => assert_eq!(what, "lease duration"),
            other => panic!("lease of {bad} ms: {other:?}"),
        }
    }
}

#[test]
fn changing_a_lease_counts_no_failure_and_makes_the_old_receipt_stale() {
    let (_tmp, b, clock) = open_g(1_000);
    let first = leased_a(&b);
    // Renewed before it runs out: not delivered again at the old time.
    clock.advance_ms(900);
    let renewed = b
        .change_lease("g", "t", &first, Duration::from_millis(5_000))
        .unwrap();
    assert_ne!(renewed, first);
    clock.advance_ms(4_000);
    assert!(b.poll("g", "t", 10).unwrap().is_empty(), "renewed");
    // The old receipt is stale for every use; the new one works.
    for r in [
        b.ack_receipt("g", "t", &first),
        b.nack_receipt("g", "t", &first, None).map(|_| ()),
        b.change_lease("g", "t", &first, Duration::from_secs(1))
            .map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::StaleReceipt { .. })), "{r:?}");
    }
    // Shortened: it runs out sooner, and then it is a failure like any time-out.
    let short = b
        .change_lease("g", "t", &renewed, Duration::from_millis(10))
        .unwrap();
    clock.advance_ms(10);
    let again = b.poll("g", "t", 10).unwrap();
    assert_eq!(again[0].attempt, 2, "the change itself counted nothing");
    assert!(matches!(
        b.change_lease("g", "t", &short, Duration::from_secs(1)),
        Err(Error::StaleReceipt { .. })
    ));
    // Bad durations are refused before anything changes.
    let live = receipt(&again[0]);
    assert!(matches!(
        b.change_lease("g", "t", &live, Duration::ZERO),
        Err(Error::Invalid {
            what: "lease duration",
            ..
        })
    ));
    b.ack_receipt("g", "t", &live).unwrap();
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
}

#[test]
fn a_redelivered_messages_old_receipt_is_stale_and_a_forged_one_is_bad() {
    let (_tmp, b, clock) = open_g(100);
    for body in ["a", "b"] {
        b.send("t", &Message::new(body)).unwrap();
    }
    let got = b.poll("g", "t", 2).unwrap();
    let (ra, rb) = (receipt(&got[0]), receipt(&got[1]));
    // A lease that ran out but whose message was not handed out again is still its lease.
    clock.advance_ms(150);
    b.ack_receipt("g", "t", &ra).unwrap();
    b.ack_receipt("g", "t", &ra).unwrap(); // idempotent
    let again = b.poll("g", "t", 10).unwrap();
    assert_eq!((again.len(), again[0].offset), (1, got[1].offset));
    let stale = b.ack_receipt("g", "t", &rb).unwrap_err();
    assert!(matches!(stale, Error::StaleReceipt { .. }), "{stale}");
    // Modified in any field, for another group or topic, or not a receipt at all.
    let live = receipt(&again[0]);
    let forged = [
        Receipt {
            lease: live.lease + 1,
            ..live
        },
        Receipt {
            offset: live.offset - 1,
            ..live
        },
        Receipt {
            mac: live.mac ^ 1,
            ..live
        },
    ];
    for r in &forged {
        let e = b.ack_receipt("g", "t", r).unwrap_err();
        assert!(matches!(e, Error::BadReceipt { .. }), "{e}");
    }
    b.send("u", &Message::new("x")).unwrap();
    for (g, t) in [("other", "t"), ("g", "u")] {
        let e = b.ack_receipt(g, t, &live).unwrap_err();
        assert!(matches!(e, Error::BadReceipt { .. }), "{g} {t}: {e}");
    }
    assert!(matches!(
        Receipt::parse("not-a-receipt"),
        Err(Error::BadReceipt { .. })
    ));
    // All or nothing: one bad receipt among good ones acks none of them.
    assert!(b.ack_receipts("g", "t", &[live, forged[0]]).is_err());
    let stats = b.stats().unwrap();
    let q = stats.queues.iter().find(|q| q.topic == "t").unwrap();
    let g = q.groups.iter().find(|l| l.group == "g").unwrap();
    assert_eq!(g.in_flight, 1, "nothing was acked");
    // The text form is what travels; it comes back as the same receipt.
    let back = Receipt::parse(&live.handle()).unwrap();
    b.ack_receipts("g", "t", &[back]).unwrap();
}

#[test]
fn a_nack_by_receipt_counts_and_ends_the_lease() {
    let (_tmp, b, clock) = open_g(1_000);
    let r = leased_a(&b);
    let out = b
        .nack_receipt("g", "t", &r, Some(Duration::from_millis(50)))
        .unwrap();
    assert!(matches!(out, NackOutcome::Redeliver { attempt: 2, .. }));
    // Nacked: the receipt is spent.
    assert!(matches!(
        b.ack_receipt("g", "t", &r),
        Err(Error::StaleReceipt { .. })
    ));
    clock.advance_ms(50);
    let again = b.poll("g", "t", 1).unwrap().remove(0);
    assert_eq!(again.attempt, 2);
    b.ack_receipt("g", "t", &receipt(&again)).unwrap();
}

/// `attempt` is the real attempt number: failures (time-outs and nacks) counted, lease
/// changes not, across a restart (the failure counts are durable; leases are not).
#[test]
fn the_attempt_is_the_real_attempt_number_across_a_restart() {
    let (tmp, b, clock) = open_g(100);
    b.send("t", &Message::new("a")).unwrap();
    let mut attempts = Vec::new();
    // Time-out, nack, change, time-out.
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    attempts.push(d.attempt);
    clock.advance_ms(100);
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    attempts.push(d.attempt);
    b.nack_receipt("g", "t", &receipt(&d), Some(Duration::ZERO))
        .unwrap();
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    attempts.push(d.attempt);
    b.change_lease("g", "t", &receipt(&d), Duration::from_millis(300))
        .unwrap();
    clock.advance_ms(300);
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    attempts.push(d.attempt);
    assert_eq!(attempts, [1, 2, 3, 4]);
    let old = receipt(&d);
    b.close().unwrap();
    drop(b);
    let b = halfmq::Broker::open(config(tmp.path()).with_clock(clock.clone())).unwrap();
    // The delivery in flight at the stop does not count; the three failures before it do.
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    assert_eq!(d.attempt, 4);
    // A receipt from before the restart is not one of this broker's.
    assert!(matches!(
        b.ack_receipt("g", "t", &old),
        Err(Error::BadReceipt { .. })
    ));
    b.ack_receipt("g", "t", &receipt(&d)).unwrap();
}

/// The same over the network: receipts travel as their text, errors come back as the same
/// variants, and the lease and attempt rules are the broker's.
#[test]
fn leases_and_receipts_over_the_network() {
    let (_tmp, b, clock) = fresh_with_clock(config);
    common::with_served(&b, |b, c| async move {
        c.set_group_settings("g", &vt(10_000)).await.unwrap();
        c.send("t", &Message::new("a")).await.unwrap();
        let got = c.poll_with("g", "t", 10, &lease(200)).await.unwrap();
        assert_eq!((got.len(), got[0].attempt), (1, 1));
        let first = receipt(&got[0]);
        let renewed = c
            .change_lease("g", "t", &first, Duration::from_millis(1_000))
            .await
            .unwrap();
        clock.advance_ms(999);
        assert!(c.poll("g", "t", 10).await.unwrap().is_empty(), "renewed");
        let e = c.ack_receipt("g", "t", &first).await.unwrap_err();
        assert!(matches!(e, Error::StaleReceipt { .. }), "{e}");
        let forged = Receipt {
            mac: renewed.mac.wrapping_add(1),
            ..renewed
        };
        let net = c.ack_receipt("g", "t", &forged).await;
        let emb = b.ack_receipt("g", "t", &forged);
        let (net, emb) = (net.unwrap_err(), emb.unwrap_err());
        assert!(matches!(net, Error::BadReceipt { .. }), "{net}");
        assert_eq!(net.to_string(), emb.to_string());
        let e = c.poll_with("g", "t", 1, &lease(5)).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Invalid {
                    what: "lease duration",
                    ..
                }
            ),
            "{e}"
        );
        // Ran out: delivered again as attempt 2, with a receipt the old ones are not.
        clock.advance_ms(1);
        let again = c
            .poll_wait("g", "t", 1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(again[0].attempt, 2);
        let e = c.ack_receipt("g", "t", &renewed).await.unwrap_err();
        assert!(matches!(e, Error::StaleReceipt { .. }), "{e}");
        let out = c
            .nack_receipt("g", "t", &receipt(&again[0]), Some(Duration::ZERO))
            .await
            .unwrap();
        assert!(
            matches!(out, NackOutcome::Redeliver { attempt: 3, .. }),
            "{out:?}"
        );
        let third = c.poll("g", "t", 1).await.unwrap();
        assert_eq!(third[0].attempt, 3);
        c.ack_receipts("g", "t", &[receipt(&third[0])])
            .await
            .unwrap();
        assert!(c.poll("g", "t", 1).await.unwrap().is_empty());
    });
}

/// Dead-lettering by receipt (RocketMQ's ForwardMessageToDeadLetterQueue): at once, whatever
/// the failure count, with the consumer's reason; a stale receipt moves nothing.
#[test]
fn a_receipt_sends_its_message_to_the_dead_letter_queue_at_once() {
    let (_tmp, b, clock) = open_g(100);
    for body in ["a", "b"] {
        b.send("t", &Message::new(body).with_key(body)).unwrap();
    }
    let got = b.poll("g", "t", 2).unwrap();
    let dl = b
        .dead_letter_receipt("g", "t", &receipt(&got[0]), "cannot parse")
        .unwrap();
    assert_eq!(dl.topic, "%DLQ%g");
    let letters = b.dead_letters("g", 0, 10).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].offset, letters[0].failures), (got[0].offset, 1));
    assert!(
        letters[0].reason.contains("cannot parse"),
        "{}",
        letters[0].reason
    );
    // A stale receipt (handed out again since) moves nothing.
    clock.advance_ms(100);
    let again = b.poll("g", "t", 2).unwrap();
    assert_eq!(again.len(), 1, "the dead letter is not delivered again");
    let e = b
        .dead_letter_receipt("g", "t", &receipt(&got[1]), "late")
        .unwrap_err();
    assert!(matches!(e, Error::StaleReceipt { .. }), "{e}");
    common::with_served(&b, |_, c| async move {
        let dl = c
            .dead_letter_receipt("g", "t", &receipt(&again[0]), "over the network")
            .await
            .unwrap();
        assert_eq!((dl.topic.as_str(), dl.offset), ("%DLQ%g", 1));
        assert!(c.poll("g", "t", 10).await.unwrap().is_empty());
    });
}
