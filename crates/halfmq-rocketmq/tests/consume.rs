//! Consuming through the endpoint with a raw gRPC client of the generated code: messages sent
//! through halfmq's own API are received, given back with ChangeInvisibleDuration (as the next
//! attempt) and acked through RocketMQ; QueryAssignment hands out the topic.

mod common;

use halfmq::Message;
use halfmq_rocketmq::pb::messaging_service_client::MessagingServiceClient;
use halfmq_rocketmq::pb::{self, receive_message_response::Content, Code};
use tonic::transport::Channel;

use common::{client, code, resource, start};

/// Receive up to `max` messages of `topic` for `group` with the group's 30 s lease; the
/// stream's status and messages.
async fn receive(
    c: &mut MessagingServiceClient<Channel>,
    group: &str,
    topic: &str,
    max: i32,
) -> (pb::Status, Vec<pb::Message>) {
    let req = pb::ReceiveMessageRequest {
        group: resource(group),
        message_queue: Some(pb::MessageQueue {
            topic: resource(topic),
            ..Default::default()
        }),
        filter_expression: Some(pb::FilterExpression {
            r#type: pb::FilterType::Tag as i32,
            expression: "*".into(),
        }),
        batch_size: max,
        invisible_duration: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        attempt_id: None,
    };
    let mut stream = c
        .receive_message(req)
        .await
        .expect("a gRPC answer")
        .into_inner();
    let (mut status, mut messages) = (None, Vec::new());
    while let Some(item) = stream.message().await.expect("no gRPC error") {
        match item.content {
            Some(Content::Status(s)) => status = Some(s),
            Some(Content::Message(m)) => messages.push(m),
            _ => {}
        }
    }
    (status.expect("a status"), messages)
}

fn sys(m: &pb::Message) -> &pb::SystemProperties {
    m.system_properties.as_ref().expect("system properties")
}

async fn ack(c: &mut MessagingServiceClient<Channel>, handle: &str) -> pb::Status {
    let r = c
        .ack_message(pb::AckMessageRequest {
            group: resource("g"),
            topic: resource("t"),
            entries: vec![pb::AckMessageEntry {
                message_id: String::new(),
                receipt_handle: handle.into(),
                lite_topic: None,
            }],
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    r.status.expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_message_is_received_given_back_and_acked_through_rocketmq() {
    let e = start(|c| c).await;
    e.broker.create_topic("t", 1).expect("topic");
    let sent = e
        .broker
        .send(
            "t",
            &Message::new("from the native door").with_key("order-1"),
        )
        .expect("send");
    let mut c = client(&e).await;
    let (s, got) = receive(&mut c, "g", "t", 8).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    assert_eq!(got.len(), 1);
    let first = sys(&got[0]).clone();
    assert_eq!(got[0].body, b"from the native door");
    assert_eq!(first.keys, vec!["order-1"]);
    assert_eq!(first.message_id, format!("HALFMQ{:026X}", sent.log_offset));
    assert_eq!(first.delivery_attempt, Some(1));
    assert_eq!(first.queue_offset, Some(sent.offset as i64));

    // Given back for no time: it comes again at once, as the second attempt.
    let r = c
        .change_invisible_duration(pb::ChangeInvisibleDurationRequest {
            group: resource("g"),
            topic: resource("t"),
            receipt_handle: first.receipt_handle.clone().expect("a handle"),
            invisible_duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
            message_id: first.message_id.clone(),
            lite_topic: None,
            suspend: None,
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    assert_eq!(code(&r.status.expect("a status")), Code::Ok);
    let (_, again) = receive(&mut c, "g", "t", 8).await;
    assert_eq!(again.len(), 1);
    let second = sys(&again[0]).clone();
    assert_eq!(second.delivery_attempt, Some(2));
    assert_eq!(
        second.receipt_handle.as_deref(),
        Some(r.receipt_handle.as_str())
    );

    let s = ack(&mut c, &r.receipt_handle).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    // Acked through RocketMQ: done for the group through either door.
    let (s, none) = receive(&mut c, "g", "t", 8).await;
    assert_eq!((code(&s), none.len()), (Code::MessageNotFound, 0));
    assert!(e.broker.poll("g", "t", 8).expect("poll").is_empty());
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_hands_out_the_topic_and_an_empty_topic_says_so() {
    let e = start(|c| c.with_auto_create_topics(false)).await;
    e.broker.create_topic("t", 4).expect("topic");
    let mut c = client(&e).await;
    let r = c
        .query_assignment(pb::QueryAssignmentRequest {
            topic: resource("t"),
            group: resource("g"),
            endpoints: None,
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    assert_eq!(code(&r.status.expect("a status")), Code::Ok);
    assert_eq!(r.assignments.len(), 1);
    let q = r.assignments[0].message_queue.as_ref().expect("a queue");
    assert_eq!(q.topic.as_ref().map(|t| t.name.as_str()), Some("t"));
    let r = c
        .query_assignment(pb::QueryAssignmentRequest {
            topic: resource("nope"),
            group: resource("g"),
            endpoints: None,
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    assert_eq!(code(&r.status.expect("a status")), Code::TopicNotFound);
    // A receive of an empty topic waits, then says there is nothing.
    let (s, got) = receive(&mut c, "g", "t", 8).await;
    assert_eq!((code(&s), got.len()), (Code::MessageNotFound, 0));
    e.stop().await;
}

async fn forward(c: &mut MessagingServiceClient<Channel>, m: &pb::Message) -> pb::Status {
    let r = c
        .forward_message_to_dead_letter_queue(pb::ForwardMessageToDeadLetterQueueRequest {
            group: resource("g"),
            topic: resource("t"),
            receipt_handle: sys(m).receipt_handle.clone().expect("a handle"),
            message_id: sys(m).message_id.clone(),
            delivery_attempt: sys(m).delivery_attempt.unwrap_or(0),
            max_delivery_attempts: 1,
            lite_topic: None,
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    r.status.expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_attempt_is_forwarded_to_the_dead_letters_and_an_earlier_one_is_not() {
    let e = start(|c| c).await;
    e.broker.create_topic("t", 1).expect("topic");
    for body in ["first", "second"] {
        e.broker.send("t", &Message::new(body)).expect("send");
    }
    let mut c = client(&e).await;
    let (_, got) = receive(&mut c, "g", "t", 1).await;
    assert_eq!(got.len(), 1);
    // Delivery 1 of 17 (max_retries 16): not the last; nothing is done, and it says so.
    let s = forward(&mut c, &got[0]).await;
    assert_eq!(code(&s), Code::Unsupported, "{}", s.message);
    assert!(s.message.contains("16"), "{}", s.message);
    assert!(e.broker.dead_letters("g", 0, 10).expect("list").is_empty());
    let handle = sys(&got[0]).receipt_handle.clone().expect("a handle");
    assert_eq!(
        code(&ack(&mut c, &handle).await),
        Code::Ok,
        "still held, so it acks"
    );

    // With max_retries 0 the first delivery is the last: forwarded, it is a dead letter.
    let none_left = halfmq::GroupSettings {
        max_retries: Some(0),
        ..Default::default()
    };
    e.broker
        .set_group_settings("g", &none_left)
        .expect("settings");
    let (_, got) = receive(&mut c, "g", "t", 1).await;
    assert_eq!(got.len(), 1);
    let s = forward(&mut c, &got[0]).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    let dead = e.broker.dead_letters("g", 0, 10).expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body_len, "second".len());
    e.stop().await;
}
