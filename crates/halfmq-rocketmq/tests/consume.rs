//! Consuming through the endpoint with a raw gRPC client of the generated code (for the calls
//! the official Rust client does not make): messages sent through halfmq's own API are
//! received, their leases renewed and shortened with ChangeInvisibleDuration without counting
//! a failure (a shortened one waking a waiting long poll), stale and forged receipt handles
//! refused, messages forwarded to the dead letters and acked through RocketMQ;
//! QueryAssignment hands out the topic; `auto_renew` leases renewed while their client lives.

mod common;

use std::time::Duration;

use halfmq::Message;
use halfmq_rocketmq::pb::{self, Code};

use common::{
    ack, change_invisible, client, code, handle, query_assignment, receive, resource, session,
    start, start_client, sys, terminate, Client, Endpoint, Receive, Session,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_and_shortened_without_counting_a_failure() {
    let e = start("t", 1, |c| c).await;
    // One retry only: under a nack each change below would count, and the second would
    // dead-letter the message.
    let one_retry = halfmq::GroupSettings {
        max_retries: Some(1),
        ..Default::default()
    };
    e.broker
        .set_group_settings("g", &one_retry)
        .expect("settings");
    let sent = e
        .broker
        .send(
            "t",
            &Message::new("from the native door").with_key("order-1"),
        )
        .expect("send");
    let mut c = client(&e).await;
    let lease = Duration::from_secs(5);
    let how = || Receive {
        lease: Some(lease),
        ..Receive::default()
    };
    let received = tokio::time::Instant::now();
    let (s, got) = receive(&mut c, "g", "t", how()).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    assert_eq!(got.len(), 1);
    let first = sys(&got[0]).clone();
    assert_eq!(got[0].body, b"from the native door");
    assert_eq!(first.keys, vec!["order-1"]);
    assert_eq!(first.message_id, format!("HALFMQ{:026X}", sent.log_offset));
    assert_eq!(first.delivery_attempt, Some(1));
    assert_eq!(first.queue_offset, Some(sent.offset as i64));
    // The receive's invisible duration is the lease.
    assert_eq!(first.invisible_duration, common::duration(lease));

    // Renewed twice: each change gives a new handle, and the one before is stale.
    let mut held = handle(&got[0]);
    for _ in 0..2 {
        let (s, renewed) = change_invisible(&mut c, &held, Duration::from_secs(60)).await;
        assert_eq!(code(&s), Code::Ok, "{}", s.message);
        assert_ne!(renewed, held);
        let s = ack(&mut c, &held).await;
        assert_eq!(code(&s), Code::InvalidReceiptHandle, "{}", s.message);
        assert!(s.message.contains("stale"), "{}", s.message);
        held = renewed;
    }
    // Past the 5 s lease of the receive, the message is still held (renewed to 60 s).
    tokio::time::sleep_until(received + lease + Duration::from_millis(500)).await;
    let (s, none) = receive(&mut c, "g", "t", how()).await;
    assert_eq!((code(&s), none.len()), (Code::MessageNotFound, 0));

    // Shortened to nothing: it comes again at once, as the second attempt (one lease ran
    // out, one failure), and the handle of the lease that ran out is stale.
    let (s, shortened) = change_invisible(&mut c, &held, Duration::ZERO).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    let (_, again) = receive(&mut c, "g", "t", how()).await;
    assert_eq!(again.len(), 1);
    assert_eq!(sys(&again[0]).delivery_attempt, Some(2));
    let s = ack(&mut c, &shortened).await;
    assert_eq!(code(&s), Code::InvalidReceiptHandle, "{}", s.message);
    assert!(e.broker.dead_letters("g", 0, 10).expect("list").is_empty());

    let s = ack(&mut c, &handle(&again[0])).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    // Acked through RocketMQ: done for the group through either door.
    let (s, none) = receive(&mut c, "g", "t", how()).await;
    assert_eq!((code(&s), none.len()), (Code::MessageNotFound, 0));
    assert!(e.broker.poll("g", "t", 8).expect("poll").is_empty());
    e.stop().await;
}

/// An endpoint whose topic `t` had one message with this body, a client, and the message
/// as group `g` received it (leased for 30 s).
async fn one_received(body: &str) -> (Endpoint, Client, Vec<pb::Message>) {
    let e = start("t", 1, |c| c).await;
    e.broker.send("t", &Message::new(body)).expect("send");
    let mut c = client(&e).await;
    let (s, got) = receive(&mut c, "g", "t", Receive::default()).await;
    assert_eq!((code(&s), got.len()), (Code::Ok, 1), "{}", s.message);
    (e, c, got)
}

/// A long poll waiting for the group is woken when a held message's lease is shortened (a
/// push consumer's nack is such a change): the message comes as soon as it falls due, not
/// when the poll's own wait ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortened_lease_wakes_a_waiting_long_poll() {
    let (e, mut c, got) = one_received("nacked").await;
    let mut waiter = client(&e).await;
    let long_poll = Duration::from_secs(30);
    let waiting = tokio::spawn(async move {
        let how = Receive {
            long_poll,
            ..Receive::default()
        };
        let started = std::time::Instant::now();
        let got = receive(&mut waiter, "g", "t", how).await;
        (got, started.elapsed())
    });
    // The long poll is waiting (had it not started yet, it would plan for the shorter lease).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, _) = change_invisible(&mut c, &handle(&got[0]), Duration::from_secs(1)).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    let ((s, again), waited) = waiting.await.expect("the long poll joins");
    assert_eq!((code(&s), again.len()), (Code::Ok, 1), "{}", s.message);
    assert_eq!(sys(&again[0]).delivery_attempt, Some(2));
    assert!(waited < long_poll / 2, "woken only after {waited:?}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_handle_is_refused_and_the_true_one_still_acks() {
    let (e, mut c, got) = one_received("x").await;
    let real = handle(&got[0]);
    // The same handle with another lease number, or another checksum.
    let parts: Vec<&str> = real.split('.').collect();
    assert_eq!(parts.len(), 4, "{real}");
    let forged = [
        format!("{}.{}.{}.{}", parts[0], parts[1], "ffff", parts[3]),
        format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], "1234"),
    ];
    for f in &forged {
        let s = ack(&mut c, f).await;
        assert_eq!(code(&s), Code::InvalidReceiptHandle, "{f}: {}", s.message);
        assert!(s.message.contains("not issued"), "{}", s.message);
        let (s, _) = change_invisible(&mut c, f, Duration::from_secs(1)).await;
        assert_eq!(code(&s), Code::InvalidReceiptHandle, "{f}: {}", s.message);
    }
    let s = ack(&mut c, &real).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_hands_out_the_topic_and_an_empty_topic_says_so() {
    let (e, mut c) = start_client("t", 4, |c| c.with_auto_create_topics(false)).await;
    let r = query_assignment(&mut c, "g", "t").await;
    assert_eq!(code(&r.status.expect("a status")), Code::Ok);
    assert_eq!(r.assignments.len(), 1);
    let q = r.assignments[0].message_queue.as_ref().expect("a queue");
    assert_eq!(q.topic.as_ref().map(|t| t.name.as_str()), Some("t"));
    let r = query_assignment(&mut c, "g", "nope").await;
    assert_eq!(code(&r.status.expect("a status")), Code::TopicNotFound);
    // A receive of an empty topic waits, then says there is nothing.
    let (s, got) = receive(&mut c, "g", "t", Receive::default()).await;
    assert_eq!((code(&s), got.len()), (Code::MessageNotFound, 0));
    e.stop().await;
}

/// Forward a received message of topic `t` held by group `g` to the dead letters, as a
/// client that gave up on it at its first delivery; the status.
async fn forward(c: &mut Client, m: &pb::Message) -> pb::Status {
    let r = c
        .forward_message_to_dead_letter_queue(pb::ForwardMessageToDeadLetterQueueRequest {
            group: resource("g"),
            topic: resource("t"),
            receipt_handle: handle(m),
            message_id: sys(m).message_id.clone(),
            delivery_attempt: 1,
            max_delivery_attempts: 1,
            lite_topic: None,
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    r.status.expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_forwarded_to_the_dead_letters_at_any_attempt() {
    let (e, mut c, got) = one_received("given up").await;
    // Delivery 1 of 17 (max_retries 16): the client gave up, so it is a dead letter now.
    let s = forward(&mut c, &got[0]).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    let dead = e.broker.dead_letters("g", 0, 10).expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body_len, "given up".len());
    assert!(dead[0].reason.contains("RocketMQ"), "{}", dead[0].reason);
    // The handle is spent: forwarding it again is refused; an ack is answered as the ack of
    // a message done for the group (acks are idempotent), and changes nothing.
    let s = forward(&mut c, &got[0]).await;
    assert_eq!(code(&s), Code::InvalidReceiptHandle, "{}", s.message);
    assert!(s.message.contains("acked"), "{}", s.message);
    let s = ack(&mut c, &handle(&got[0])).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    assert_eq!(e.broker.dead_letters("g", 0, 10).expect("list").len(), 1);
    e.stop().await;
}

/// A receive of `client` with `auto_renew` and a 1 s lease, waiting at most `long_poll`.
fn renewed_by(client: &str, long_poll: Duration) -> Receive<'_> {
    Receive {
        lease: Some(Duration::from_secs(1)),
        long_poll,
        auto_renew: true,
        client_id: Some(client),
        ..Receive::default()
    }
}

/// An endpoint holding one message `body`, received with `auto_renew` by client `push-1`
/// (whose session is open while the returned one is kept).
async fn one_renewed(body: &str) -> (Endpoint, Client, Session, pb::Message) {
    let (e, mut c) = start_client("t", 1, |c| c).await;
    e.broker.send("t", &Message::new(body)).expect("send");
    let session = session(&mut c, "push-1").await;
    let m = one_renewed_receive(&mut c, Duration::from_secs(2)).await;
    (e, c, session, m)
}

/// A receive of `push-1` with `auto_renew`, waiting `wait`, is handed one message.
async fn one_renewed_receive(c: &mut Client, wait: Duration) -> pb::Message {
    let (s, got) = receive(c, "g", "t", renewed_by("push-1", wait)).await;
    assert_eq!((code(&s), got.len()), (Code::Ok, 1), "{}", s.message);
    got.into_iter().next().expect("one message")
}

/// A receive of `push-1` waiting `wait` is handed nothing.
async fn nothing_within(c: &mut Client, wait: Duration) {
    let (s, got) = receive(c, "g", "t", renewed_by("push-1", wait)).await;
    assert_eq!(code(&s), Code::MessageNotFound, "{} {got:?}", s.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_renew_keeps_the_lease_while_the_client_lives_and_the_first_handle_acks() {
    let (e, mut c, _session, got) = one_renewed("slow work").await;
    assert_eq!(e.renewed(), 1);
    // Three leases long: without renewal the message would be handed out again.
    nothing_within(&mut c, Duration::from_secs(4)).await;
    // The handle the client was given acks the renewed lease, and renewal stops.
    let s = ack(&mut c, &handle(&got)).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    assert_eq!(e.renewed(), 0);
    nothing_within(&mut c, Duration::from_millis(1500)).await;
    e.stop().await;
}

/// A client that reconnects under the same id (its new telemetry stream opened while the old
/// one lingers) is a new session, which may never have seen the old session's receive (its
/// answer lost with the old connection): renewal stops and the message goes out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_renew_stops_when_the_client_reconnects_under_the_same_id() {
    let (e, mut c, old, _got) = one_renewed("answer lost").await;
    assert_eq!(e.renewed(), 1);
    let _new = session(&mut c, "push-1").await;
    drop(old);
    let again = one_renewed_receive(&mut c, Duration::from_secs(4)).await;
    assert_eq!(sys(&again).delivery_attempt, Some(2));
    assert_eq!(again.body, b"answer lost".to_vec());
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_renew_stops_when_the_client_terminates_or_its_session_ends() {
    let (e, mut c) = start_client("t", 1, |c| c).await;
    e.broker.send("t", &Message::new("one")).expect("send");
    e.broker.send("t", &Message::new("two")).expect("send");
    let first = session(&mut c, "push-1").await;
    let how = Receive {
        max: 1,
        ..renewed_by("push-1", Duration::from_secs(2))
    };
    let (_, one) = receive(&mut c, "g", "t", how).await;
    let second = session(&mut c, "push-2").await;
    let how = Receive {
        max: 1,
        ..renewed_by("push-2", Duration::from_secs(2))
    };
    let (_, two) = receive(&mut c, "g", "t", how).await;
    assert_eq!((one.len(), two.len(), e.renewed()), (1, 1, 2));
    // push-1 says goodbye; push-2's telemetry stream closes without a word.
    terminate(&mut c, "push-1").await;
    drop(second);
    drop(first);
    let mut again = Vec::new();
    for _ in 0..4 {
        let (_, got) = receive(&mut c, "g", "t", Receive::default()).await;
        again.extend(got);
        if again.len() == 2 {
            break;
        }
    }
    let mut bodies: Vec<_> = again.iter().map(|m| m.body.clone()).collect();
    bodies.sort();
    assert_eq!(bodies, vec![b"one".to_vec(), b"two".to_vec()]);
    assert!(again.iter().all(|m| sys(m).delivery_attempt == Some(2)));
    assert_eq!(e.renewed(), 0);
    // The handles the gone clients held are stale.
    let s = ack(&mut c, &handle(&one[0])).await;
    assert_eq!(code(&s), Code::InvalidReceiptHandle, "{}", s.message);
    e.stop().await;
}

#[tokio::test]
async fn auto_renew_needs_a_client_id() {
    let (e, mut c) = start_client("t", 1, |c| c).await;
    let how = Receive {
        auto_renew: true,
        ..Receive::default()
    };
    let (s, got) = receive(&mut c, "g", "t", how).await;
    assert_eq!(code(&s), Code::ClientIdRequired, "{}", s.message);
    assert!(s.message.contains("x-mq-client-id"), "{}", s.message);
    assert!(got.is_empty());
    e.stop().await;
}

/// Leases live in memory: after a restart the handles handed out before are refused (also
/// those the endpoint renewed), and the messages they held are delivered again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_old_handles_are_refused_and_their_messages_come_again() {
    let (e, c, session, got) = one_renewed("held").await;
    let held = handle(&got);
    // The client's connection ends with the broker.
    drop((session, c));
    let e = e.restart().await;
    assert_eq!(e.renewed(), 0);
    let mut c = client(&e).await;
    let s = ack(&mut c, &held).await;
    assert_eq!(code(&s), Code::InvalidReceiptHandle, "{}", s.message);
    assert!(
        s.message.contains("before the broker last opened"),
        "{}",
        s.message
    );
    // At once, not after the old lease: the lease ended with the broker. The delivery the
    // restart interrupted is not a failure, so the attempt number stays 1.
    let how = Receive {
        long_poll: Duration::from_millis(500),
        ..Receive::default()
    };
    let (s, again) = receive(&mut c, "g", "t", how).await;
    assert_eq!((code(&s), again.len()), (Code::Ok, 1), "{}", s.message);
    assert_eq!(again[0].body, b"held");
    assert_eq!(sys(&again[0]).delivery_attempt, Some(1));
    let s = ack(&mut c, &handle(&again[0])).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    e.stop().await;
}
