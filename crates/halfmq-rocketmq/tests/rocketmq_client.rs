//! The official Apache RocketMQ Rust client (crate `rocketmq` 5.x) against the endpoint:
//! producing, transactions with check-back, delayed messages, a simple consumer, and a
//! producer's retry that is not stored twice.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use halfmq::{TxnId, TxnState};
use rocketmq::conf::{ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::{Message, MessageBuilder};
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use rocketmq::{Producer, SimpleConsumer};

use common::{eventually, start, Endpoint};

fn producer_option(topic: &str) -> ProducerOption {
    let mut o = ProducerOption::default();
    o.set_topics(vec![topic]);
    o
}

async fn producer(e: &Endpoint, topic: &str) -> Producer {
    let mut p = Producer::new(
        producer_option(topic),
        e.client_option(Duration::from_secs(2)),
    )
    .expect("producer");
    p.start().await.expect("producer starts");
    p
}

/// A started transactional producer of topic `txn` whose checker is `checker`.
async fn txn_producer(
    e: &Endpoint,
    checker: Box<rocketmq::model::transaction::TransactionChecker>,
) -> Producer {
    let mut p = Producer::new_transaction_producer(
        producer_option("txn"),
        e.client_option(Duration::from_secs(2)),
        checker,
    )
    .expect("producer");
    p.start().await.expect("starts");
    p
}

/// A transactional message of topic `txn`.
fn half(body: &[u8]) -> impl Message {
    MessageBuilder::transaction_message_builder("txn", body.to_vec())
        .build()
        .expect("message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_producer_stores_tags_keys_and_properties() {
    let e = start(|c| c).await;
    e.broker.create_topic("orders", 2).expect("topic");
    let p = producer(&e, "orders").await;
    let msg = MessageBuilder::builder()
        .set_topic("orders")
        .set_body(b"paid 12.50".to_vec())
        .set_tag("paid")
        .set_keys(vec!["order-42", "user-7"])
        .set_properties(HashMap::from([("region", "eu")]))
        .build()
        .expect("message");
    let receipt = p.send(msg).await.expect("send");
    assert!(!receipt.message_id().is_empty());

    // Durable and visible to halfmq's own consumers, keyed by its first key.
    let got = e.broker.poll("native", "orders", 10).expect("poll");
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(
        (d.body.as_slice(), d.key.as_str()),
        (&b"paid 12.50"[..], "order-42")
    );
    assert_eq!(
        d.properties.get("rocketmq.tag").map(String::as_str),
        Some("paid")
    );
    assert_eq!(
        d.properties.get("rocketmq.keys").map(String::as_str),
        Some("order-42 user-7")
    );
    assert_eq!(d.properties.get("region").map(String::as_str), Some("eu"));
    assert_eq!(
        d.properties.get("rocketmq.message_id").map(String::as_str),
        Some(receipt.message_id())
    );
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}

/// A message whose id the test chooses, as a producer retrying a send would resend it.
struct FixedId {
    id: String,
    topic: String,
    body: Vec<u8>,
}

impl Message for FixedId {
    fn take_message_id(&mut self) -> String {
        self.id.clone()
    }
    fn take_topic(&mut self) -> String {
        self.topic.clone()
    }
    fn take_body(&mut self) -> Vec<u8> {
        self.body.clone()
    }
    fn take_tag(&mut self) -> Option<String> {
        None
    }
    fn take_keys(&mut self) -> Vec<String> {
        vec![]
    }
    fn take_properties(&mut self) -> HashMap<String, String> {
        HashMap::new()
    }
    fn take_message_group(&mut self) -> Option<String> {
        None
    }
    fn take_delivery_timestamp(&mut self) -> Option<i64> {
        None
    }
    fn transaction_enabled(&mut self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_retry_with_the_same_message_id_is_stored_once() {
    let e = start(|c| c).await;
    e.broker.create_topic("payments", 1).expect("topic");
    let p = producer(&e, "payments").await;
    let fixed = |body: &[u8]| FixedId {
        id: "7F0000010001000000000000000A".into(),
        topic: "payments".into(),
        body: body.to_vec(),
    };
    let first = p.send(fixed(b"confirmation")).await.expect("send");
    let again = p.send(fixed(b"confirmation")).await.expect("retry");
    assert_eq!(first.message_id(), again.message_id());
    let other = FixedId {
        id: "7F0000010001000000000000000B".into(),
        ..fixed(b"another")
    };
    p.send(other).await.expect("another message");
    let got = e.broker.poll("g", "payments", 10).expect("poll");
    let bodies: Vec<&[u8]> = got.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, vec![&b"confirmation"[..], &b"another"[..]]);
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_not_delivered_before_its_time() {
    let e = start(|c| c).await;
    e.broker.create_topic("reminders", 1).expect("topic");
    let p = producer(&e, "reminders").await;
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let at = now_s + 3;
    let msg = MessageBuilder::delay_message_builder("reminders", b"later".to_vec(), at)
        .build()
        .expect("message");
    p.send(msg).await.expect("send");
    assert_eq!(e.broker.delayed_pending(), 1);
    assert!(e
        .broker
        .poll("g", "reminders", 10)
        .expect("poll")
        .is_empty());
    let got = e
        .broker
        .poll_wait("g", "reminders", 10, Duration::from_secs(15))
        .expect("poll");
    assert_eq!(got.len(), 1);
    assert!(
        got[0].timestamp_ms >= (at as u64) * 1000,
        "delivered before its time"
    );
    assert_eq!(got[0].body, b"later");
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_and_roll_back_from_the_producer() {
    let e = start(|c| c).await;
    e.broker.create_topic("txn", 1).expect("topic");
    let checker = Box::new(|_: String, _| TransactionResolution::UNKNOWN);
    let p = txn_producer(&e, checker).await;
    let kept = p
        .send_transaction_message(half(b"kept"))
        .await
        .expect("half");
    let dropped = p
        .send_transaction_message(half(b"dropped"))
        .await
        .expect("half");
    let (kept_id, dropped_id) = (txn_of(&kept), txn_of(&dropped));
    // Stored, invisible until the producer says.
    assert!(e.broker.poll("g", "txn", 10).expect("poll").is_empty());
    assert_eq!(
        e.broker.transaction_state(kept_id).expect("state"),
        TxnState::Pending
    );
    kept.commit().await.expect("commit");
    dropped.rollback().await.expect("rollback");
    assert_eq!(
        e.broker.transaction_state(kept_id).expect("state"),
        TxnState::Committed
    );
    assert_eq!(
        e.broker.transaction_state(dropped_id).expect("state"),
        TxnState::RolledBack
    );
    let got = e.broker.poll("g", "txn", 10).expect("poll");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"kept");
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}

fn txn_of(t: &impl Transaction) -> TxnId {
    TxnId(t.transaction_id().parse().expect("a halfmq transaction id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_back_asks_the_live_producer_which_commits_or_rolls_back() {
    let e = start(|mut c| {
        c.txn.timeout = Duration::from_millis(300);
        c.txn.check_interval = Duration::from_millis(300);
        c
    })
    .await;
    e.broker.create_topic("txn", 1).expect("topic");
    // The checker commits what it was asked about when its body says so.
    let checker = Box::new(|_: String, m: rocketmq::model::message::MessageView| {
        if m.body() == b"commit me" {
            TransactionResolution::COMMIT
        } else {
            TransactionResolution::ROLLBACK
        }
    });
    let p = txn_producer(&e, checker).await;
    // Neither is ended by the producer: the broker asks.
    let a = txn_of(
        &p.send_transaction_message(half(b"commit me"))
            .await
            .expect("half"),
    );
    let b = txn_of(
        &p.send_transaction_message(half(b"roll me back"))
            .await
            .expect("half"),
    );
    let broker = e.broker.clone();
    let settled = eventually(Duration::from_secs(30), || {
        broker.transaction_state(a).ok() == Some(TxnState::Committed)
            && broker.transaction_state(b).ok() == Some(TxnState::RolledBack)
    })
    .await;
    assert!(
        settled,
        "check-back did not settle: {:?} {:?}",
        broker.transaction_state(a),
        broker.transaction_state(b)
    );
    let got = e.broker.poll("g", "txn", 10).expect("poll");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"commit me");
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_consumer_receives_and_acks() {
    let e = start(|c| c).await;
    e.broker.create_topic("work", 2).expect("topic");
    let p = producer(&e, "work").await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let m = MessageBuilder::builder()
            .set_topic("work")
            .set_body(format!("job {i}").into_bytes())
            .set_tag("job")
            .build()
            .expect("message");
        sent.push(p.send(m).await.expect("send").message_id().to_owned());
    }
    let mut o = SimpleConsumerOption::default();
    o.set_consumer_group("workers");
    o.set_topics(vec!["work"]);
    let mut c = SimpleConsumer::new(o, e.client_option(Duration::from_secs(2))).expect("consumer");
    c.start().await.expect("consumer starts");
    let all = FilterExpression::new(FilterType::Tag, "*");
    // The group's visibility timeout is the broker's default, 30 s.
    let lease = Duration::from_secs(30);
    let mut got = Vec::new();
    for _ in 0..10 {
        if got.len() == 3 {
            break;
        }
        got.extend(
            c.receive_with("work", &all, 16, lease)
                .await
                .expect("receive"),
        );
    }
    assert_eq!(got.len(), 3);
    let mut ids: Vec<String> = got.iter().map(|m| m.message_id().to_owned()).collect();
    ids.sort();
    sent.sort();
    assert_eq!(ids, sent);
    for m in &got {
        assert_eq!((m.tag(), m.delivery_attempt()), (Some("job"), 1));
        c.ack(m).await.expect("ack");
    }
    // Acked: nothing comes again for the group.
    let again = c
        .receive_with("work", &all, 16, lease)
        .await
        .expect("receive");
    assert!(
        again.is_empty(),
        "acked messages came again: {}",
        again.len()
    );
    // A lease other than the group's is refused, saying why.
    let err = c
        .receive_with("work", &all, 16, Duration::from_secs(15))
        .await
        .expect_err("a 15 s lease is not the group's");
    assert!(format!("{err:?}").contains("invisible"), "{err:?}");
    c.shutdown().await.expect("consumer stops");
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_producer_cannot_decide_stays_unresolved_not_dropped() {
    let e = start(|mut c| {
        c.txn.timeout = Duration::from_millis(300);
        c.txn.check_interval = Duration::from_millis(300);
        c.txn.check_max = 2;
        c
    })
    .await;
    e.broker.create_topic("txn", 1).expect("topic");
    let checker = Box::new(|_: String, _| TransactionResolution::UNKNOWN);
    let p = txn_producer(&e, checker).await;
    let t = txn_of(
        &p.send_transaction_message(half(b"undecided"))
            .await
            .expect("half"),
    );
    let broker = e.broker.clone();
    let unresolved = eventually(Duration::from_secs(30), || {
        broker.transaction_state(t).ok() == Some(TxnState::Unresolved)
    })
    .await;
    assert!(unresolved, "{:?}", broker.transaction_state(t));
    let info = &broker.unresolved_transactions()[0];
    assert_eq!((info.txn_id, info.checks), (t.0, 2));
    // Still there to be decided: the producer commits it now.
    assert!(e.broker.poll("g", "txn", 10).expect("poll").is_empty());
    e.broker.commit(t).expect("commit");
    assert_eq!(e.broker.poll("g", "txn", 10).expect("poll").len(), 1);
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}
