//! Hostile and unsupported input through a raw gRPC client of the generated code: each gets a
//! clear status (a RocketMQ code with a message, or a gRPC status), and the endpoint keeps
//! serving the next request.

mod common;

use std::time::Duration;

use halfmq_rocketmq::pb::{self, Code};

use common::{
    ack, change_invisible, code, message, query_route, receive, resource, send, start_client,
    Client, Endpoint, Receive,
};

/// The endpoint still serves: a normal message is stored.
async fn still_serves(c: &mut Client, e: &Endpoint, id: &str) {
    let s = send(c, message("t", id, b"fine".to_vec())).await;
    assert_eq!(code(&s), Code::Ok, "{}", s.message);
    assert!(e.broker.idempotency_key_stored("t", id).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_receipt_handles_are_refused() {
    let (e, mut c) = start_client("t", 1, |c| c).await;
    still_serves(&mut c, &e, "m1").await;
    for handle in [
        "",
        "garbage",
        "v1.0.0.1",
        "0.0.1",
        "0.0.1.1.1",
        &"f".repeat(200),
    ] {
        let s = ack(&mut c, handle).await;
        assert_eq!(
            code(&s),
            Code::InvalidReceiptHandle,
            "{handle:?}: {}",
            s.message
        );
        assert!(!s.message.is_empty());
        let (s, _) = change_invisible(&mut c, handle, Duration::from_secs(1)).await;
        assert_eq!(
            code(&s),
            Code::InvalidReceiptHandle,
            "{handle:?}: {}",
            s.message
        );
    }
    // A true receipt of another group is not this group's.
    let other = e.broker.poll("other", "t", 1).expect("poll");
    let receipt = other[0].receipt.expect("a receipt").handle();
    let s = ack(&mut c, &receipt).await;
    assert_eq!(code(&s), Code::InvalidReceiptHandle, "{}", s.message);
    still_serves(&mut c, &e, "m2").await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_are_not_found() {
    let (e, mut c) = start_client("t", 1, |c| c.with_auto_create_topics(false)).await;
    let r = query_route(&mut c, "nope").await;
    let s = r.status.expect("a status");
    assert_eq!(code(&s), Code::TopicNotFound);
    assert!(s.message.contains("nope"), "{}", s.message);
    assert!(r.message_queues.is_empty());
    let s = send(&mut c, message("nope", "x1", b"b".to_vec())).await;
    assert_eq!(code(&s), Code::TopicNotFound, "{}", s.message);
    // A known topic's route: one queue per halfmq queue, on this endpoint.
    let r = query_route(&mut c, "t").await;
    assert_eq!(code(&r.status.expect("a status")), Code::Ok);
    assert_eq!(r.message_queues.len(), 1);
    let addr = &r.message_queues[0]
        .broker
        .as_ref()
        .expect("broker")
        .endpoints
        .as_ref()
        .expect("endpoints")
        .addresses[0];
    assert_eq!(addr.port, i32::from(e.addr.port()));
    still_serves(&mut c, &e, "m1").await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_messages_are_refused_before_they_are_stored() {
    let (e, mut c) = start_client("t", 1, |c| c).await;
    // Over the body limit: a RocketMQ code.
    let big = vec![7u8; halfmq_rocketmq::convert::BODY_BYTES_MAX + 1];
    let s = send(&mut c, message("t", "big", big)).await;
    assert_eq!(code(&s), Code::MessageBodyTooLarge, "{}", s.message);
    assert!(e.broker.idempotency_key_stored("t", "big").is_none());
    // Over the request limit: refused by gRPC itself.
    let huge = vec![7u8; halfmq_rocketmq::REQUEST_BYTES_MAX + 1];
    let err = c
        .send_message(pb::SendMessageRequest {
            messages: vec![message("t", "huge", huge)],
        })
        .await
        .expect_err("too large for the endpoint");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    still_serves(&mut c, &e, "m1").await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_requests_say_so() {
    let (e, mut c) = start_client("t", 1, |c| c).await;
    for (kind, expr, wanted, what) in [
        (pb::FilterType::Sql, "a > 1", Code::Unsupported, "SQL92"),
        (
            pb::FilterType::Tag,
            "a ||",
            Code::IllegalFilterExpression,
            "empty tag",
        ),
        (
            pb::FilterType::Unspecified,
            "a",
            Code::IllegalFilterExpression,
            "type",
        ),
    ] {
        let how = Receive {
            lease: None,
            filter: (kind, expr),
            long_poll: Duration::ZERO,
            ..Receive::default()
        };
        let (s, got) = receive(&mut c, "g", "t", how).await;
        assert_eq!((code(&s), got.len()), (wanted, 0), "{}", s.message);
        assert!(s.message.contains(what), "{}", s.message);
    }
    // Leases (invisible durations) outside the broker's bounds.
    for lease in [Duration::ZERO, Duration::from_secs(3 * 24 * 3600)] {
        let how = Receive {
            lease: Some(lease),
            long_poll: Duration::ZERO,
            ..Receive::default()
        };
        let (s, _) = receive(&mut c, "g", "t", how).await;
        assert_eq!(code(&s), Code::IllegalInvisibleTime, "{}", s.message);
    }
    let r = c
        .get_offset(pb::GetOffsetRequest::default())
        .await
        .expect("a gRPC answer")
        .into_inner();
    assert_eq!(code(&r.status.expect("a status")), Code::Unsupported);
    // A FIFO message without its message group, and a message group on a normal message.
    for (kind, group, wanted) in [
        (pb::MessageType::Fifo, None, Code::IllegalMessageGroup),
        (
            pb::MessageType::Fifo,
            Some("a|b"),
            Code::IllegalMessageGroup,
        ),
        (
            pb::MessageType::Normal,
            Some("g1"),
            Code::MessagePropertyConflictWithType,
        ),
    ] {
        let mut m = message("t", "f1", b"b".to_vec());
        if let Some(s) = m.system_properties.as_mut() {
            s.message_type = kind as i32;
            s.message_group = group.map(str::to_owned);
        }
        let s = send(&mut c, m).await;
        assert_eq!(code(&s), wanted, "{}", s.message);
    }
    assert!(e.broker.idempotency_key_stored("t", "f1").is_none());
    // Priorities and lite topics (newer clients' message kinds) are refused, not stored as
    // plain messages.
    let edits: [fn(&mut pb::SystemProperties); 3] = [
        |s| s.priority = Some(1),
        |s| s.message_type = pb::MessageType::Priority as i32,
        |s| s.lite_topic = Some("lt".into()),
    ];
    for edit in edits {
        let mut m = message("t", "p1", b"b".to_vec());
        if let Some(s) = m.system_properties.as_mut() {
            edit(s);
        }
        let s = send(&mut c, m).await;
        assert_eq!(code(&s), Code::Unsupported, "{}", s.message);
        assert!(s.message.contains("not supported"), "{}", s.message);
    }
    assert!(e.broker.idempotency_key_stored("t", "p1").is_none());
    let r = c
        .sync_lite_subscription(pb::SyncLiteSubscriptionRequest {
            topic: resource("t"),
            group: resource("g"),
            lite_topic_set: vec!["lt".into()],
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    let s = r.status.expect("a status");
    assert_eq!(code(&s), Code::Unsupported, "{}", s.message);
    assert!(s.message.contains("lite topics"), "{}", s.message);
    // A transaction id the endpoint never made.
    let r = c
        .end_transaction(pb::EndTransactionRequest {
            topic: resource("t"),
            message_id: "x".into(),
            transaction_id: "not-a-number".into(),
            resolution: pb::TransactionResolution::Commit as i32,
            source: pb::TransactionSource::SourceClient as i32,
            trace_context: String::new(),
        })
        .await
        .expect("a gRPC answer")
        .into_inner();
    assert_eq!(
        code(&r.status.expect("a status")),
        Code::InvalidTransactionId
    );
    still_serves(&mut c, &e, "m1").await;
    e.stop().await;
}

/// The next command on a telemetry stream, within 10 s.
async fn next_answer(answers: &mut tonic::Streaming<pb::TelemetryCommand>) -> pb::TelemetryCommand {
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer in time")
        .expect("no gRPC error")
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_answers_settings_and_refuses_invalid_ones() {
    let (e, mut c) = start_client("t", 1, |c| c).await;
    // Without a client id: refused by gRPC status.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let err = c
        .telemetry(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("no client id");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    drop(tx);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("x-mq-client-id", "test-client".parse().expect("ascii"));
    let settings = |kind: Option<pb::ClientType>, pub_sub| pb::TelemetryCommand {
        status: None,
        command: Some(pb::telemetry_command::Command::Settings(pb::Settings {
            client_type: kind.map(|k| k as i32),
            pub_sub,
            ..Default::default()
        })),
    };
    tx.send(settings(None, None)).await.expect("sent");
    let mut answers = c.telemetry(req).await.expect("a stream").into_inner();
    let a = next_answer(&mut answers).await;
    assert_eq!(
        code(&a.status.expect("a status")),
        Code::UnrecognizedClientType
    );
    // A lite consumer is refused, saying so.
    let lite = pb::settings::PubSub::Subscription(pb::Subscription {
        group: resource("g"),
        ..Default::default()
    });
    tx.send(settings(
        Some(pb::ClientType::LiteSimpleConsumer),
        Some(lite),
    ))
    .await
    .expect("sent");
    let a = next_answer(&mut answers).await;
    let s = a.status.expect("a status");
    assert_eq!(code(&s), Code::Unsupported, "{}", s.message);
    assert!(s.message.contains("lite topics"), "{}", s.message);
    // The stream goes on: a producer's settings are answered with the server's.
    let publishing = pb::settings::PubSub::Publishing(pb::Publishing {
        topics: vec![pb::Resource {
            resource_namespace: String::new(),
            name: "t".into(),
        }],
        ..Default::default()
    });
    tx.send(settings(Some(pb::ClientType::Producer), Some(publishing)))
        .await
        .expect("sent");
    let a = next_answer(&mut answers).await;
    assert_eq!(code(&a.status.expect("a status")), Code::Ok);
    let Some(pb::telemetry_command::Command::Settings(s)) = a.command else {
        panic!("settings expected");
    };
    assert!(s.backoff_policy.is_some());
    let Some(pb::settings::PubSub::Publishing(p)) = s.pub_sub else {
        panic!("publishing expected");
    };
    assert_eq!(
        p.max_body_size as usize,
        halfmq_rocketmq::convert::BODY_BYTES_MAX
    );
    e.stop().await;
}
