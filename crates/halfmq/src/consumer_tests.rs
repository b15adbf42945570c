//! The embedded consumer stream: what it hands out, how a delivery settles itself, the bound
//! on deliveries out, and that a failed poll is an item the stream goes on after.

use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_core::Stream;
use halfmq_types::clock::ManualClock;
use halfmq_types::{Delivery, Error, GroupSettings, Message, NackOutcome};

use super::{Consumer, Deliveries, Received, StreamOptions};
use crate::{Broker, BrokerConfig};

/// A broker whose clock moves only when the test moves it, with `count` messages in topic
/// `t` (keys `k0`, `k1`, ...) and a visibility time-out of 1 s for group `g`.
fn broker_with(dir: &std::path::Path, count: usize) -> (Arc<Broker>, ManualClock) {
    let clock = ManualClock::starting_now();
    let b = Broker::open(BrokerConfig::new(dir).with_clock(clock.clone())).unwrap();
    b.create_topic("t", 2).unwrap();
    let settings = GroupSettings {
        visibility_timeout_ms: Some(1000),
        ..GroupSettings::default()
    };
    b.set_group_settings("g", &settings).unwrap();
    for i in 0..count {
        let msg = Message::new(format!("body-{i}")).with_key(format!("k{i}"));
        b.send("t", &msg).unwrap();
    }
    (b, clock)
}

/// A temporary directory, [`broker_with`] `count` messages on it, and a [`stream`] of group
/// `g` with `in_flight_max`.
fn setup(
    count: usize,
    in_flight_max: usize,
) -> (tempfile::TempDir, Arc<Broker>, ManualClock, Deliveries) {
    let tmp = tempfile::tempdir().unwrap();
    let (b, clock) = broker_with(tmp.path(), count);
    let s = stream(&b, in_flight_max);
    (tmp, b, clock, s)
}

/// `again` is the message `first` was (queue and offset), delivered a second time.
fn is_second_delivery(again: &Received, first: &Delivery) {
    assert_eq!(
        (again.queue, again.offset, again.attempt),
        (first.queue, first.offset, 2)
    );
}

/// A stream that re-polls every 20 ms when there is nothing (so that a move of the manual
/// clock is seen soon), with `in_flight_max` deliveries out at most.
fn stream(b: &Arc<Broker>, in_flight_max: usize) -> Deliveries {
    let options = StreamOptions::default()
        .with_in_flight_max(in_flight_max)
        .with_wait(Duration::from_millis(20));
    Consumer::new(b.clone(), "g", "t").stream(options)
}

async fn next(s: &mut Deliveries) -> Received {
    s.next().await.expect("the stream never ends").unwrap()
}

fn keys(got: &[Received]) -> Vec<String> {
    let mut k: Vec<String> = got.iter().map(|d| d.key.clone()).collect();
    k.sort();
    k
}

/// Whether the stream has an item ready right now, polled once.
fn ready_now(s: &mut Deliveries) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(pin!(s).poll_next(&mut cx), Poll::Ready(_))
}

#[tokio::test]
async fn the_stream_hands_out_every_message_and_an_ack_settles_it_for_good() {
    let (_tmp, b, clock, mut s) = setup(3, 8);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut s).await);
    }
    assert_eq!(keys(&got), ["k0", "k1", "k2"]);
    assert!(got.iter().all(|d| d.attempt == 1 && d.topic == "t"));
    for d in got {
        d.ack().await.unwrap();
    }
    drop(s);
    // Acked: not delivered again, not even after the visibility time-out.
    clock.advance_ms(5_000);
    assert!(b.poll("g", "t", 10).unwrap().is_empty());
    b.close().unwrap();
}

#[tokio::test]
async fn a_nack_gives_the_message_back_and_the_stream_delivers_it_again() {
    let (_tmp, b, _clock, mut s) = setup(1, 8);
    let first = next(&mut s).await;
    let place = first.clone();
    let outcome = first.nack(Some(Duration::ZERO)).await.unwrap();
    assert!(
        matches!(outcome, NackOutcome::Redeliver { attempt: 2, .. }),
        "{outcome:?}"
    );
    let again = next(&mut s).await;
    is_second_delivery(&again, &place);
    again.ack().await.unwrap();
    drop(s);
    b.close().unwrap();
}

#[tokio::test]
async fn a_delivery_dropped_unsettled_comes_again_after_the_visibility_timeout() {
    let (_tmp, b, clock, mut s) = setup(1, 8);
    let first = next(&mut s).await;
    let place = (*first).clone();
    drop(first);
    // Leased to the stream until the time-out, then handed out again.
    clock.advance_ms(1_000);
    let again = next(&mut s).await;
    is_second_delivery(&again, &place);
    // `into_delivery` gives up the stream's hold; the consumer still settles it.
    let consumer = Consumer::new(b.clone(), "g", "t");
    consumer.ack(&again.into_delivery()).await.unwrap();
    drop(s);
    drop(consumer);
    b.close().unwrap();
}

#[tokio::test]
async fn at_most_in_flight_max_deliveries_are_out_and_settling_one_lets_the_next_come() {
    let (_tmp, b, _clock, mut s) = setup(5, 2);
    let mut out = vec![next(&mut s).await, next(&mut s).await];
    // Two out: the stream waits for room and leases nothing more from the broker.
    assert!(!ready_now(&mut s), "a third delivery while two are out");
    assert!(!ready_now(&mut s));
    let others = Consumer::new(b.clone(), "g", "t");
    let rest = others.poll(10, Duration::ZERO).await.unwrap();
    assert_eq!(rest.len(), 3, "the stream leased more than two");
    for d in &rest {
        others.nack(d, Some(Duration::ZERO)).await.unwrap();
    }
    // Settling one makes room for one more.
    out.pop().unwrap().ack().await.unwrap();
    out.push(next(&mut s).await);
    assert!(!ready_now(&mut s));
    // A delivery dropped unsettled gives its room back too.
    out.pop();
    out.push(next(&mut s).await);
    assert_eq!(out.len(), 2);
    drop((out, s, others));
    b.close().unwrap();
}

#[tokio::test]
async fn a_failed_poll_is_an_error_item_and_the_stream_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, _clock) = broker_with(tmp.path(), 1);
    let mut s = Consumer::new(b.clone(), "no spaces allowed", "t").stream(StreamOptions::default());
    for _ in 0..2 {
        match s.next().await {
            Some(Err(Error::Invalid { .. })) => {}
            other => panic!("expected an invalid-group error item, got {other:?}"),
        }
    }
    drop(s);
    b.close().unwrap();
}
