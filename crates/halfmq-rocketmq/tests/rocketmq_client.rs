//! The official Apache RocketMQ Rust client (crate `rocketmq` 5.x) against the endpoint:
//! producing, transactions with check-back, delayed messages, a simple consumer, and a
//! producer's retry that is not stored twice.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use halfmq::{TxnId, TxnState};
use rocketmq::conf::{ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::{Message, MessageBuilder, MessageView};
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use rocketmq::{Producer, SimpleConsumer};

use common::{eventually, start, Endpoint};

fn producer_option(topic: &str) -> ProducerOption {
    let mut o = ProducerOption::default();
    o.set_topics(vec![topic]);
    o
}

/// A broker with topic `topic` of `queues` queues, its endpoint, and a started producer of
/// the topic.
async fn start_producer(topic: &str, queues: u32) -> (Endpoint, Producer) {
    let e = start(topic, queues, |c| c).await;
    let p = producer(&e, topic).await;
    (e, p)
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
    let (e, p) = start_producer("orders", 2).await;
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
        (d.tag(), d.properties.get("halfmq.tag").map(String::as_str)),
        (Some("paid"), Some("paid"))
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
    stop(e, p, []).await;
}

/// Seconds since the Unix epoch now (RocketMQ's delivery timestamps are in seconds here).
fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// A message whose id the test chooses, as a producer retrying a send would resend it.
struct FixedId {
    id: String,
    topic: String,
    body: Vec<u8>,
    keys: Vec<String>,
    deliver_at_s: Option<i64>,
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
        self.keys.clone()
    }
    fn take_properties(&mut self) -> HashMap<String, String> {
        HashMap::new()
    }
    fn take_message_group(&mut self) -> Option<String> {
        None
    }
    fn take_delivery_timestamp(&mut self) -> Option<i64> {
        self.deliver_at_s
    }
    fn transaction_enabled(&mut self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_retry_with_the_same_message_id_is_stored_once() {
    let (e, p) = start_producer("payments", 1).await;
    let fixed = |body: &[u8]| FixedId {
        id: "7F0000010001000000000000000A".into(),
        topic: "payments".into(),
        body: body.to_vec(),
        keys: vec![],
        deliver_at_s: None,
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

    // A batch (one request, stored as one batch) holding a retry of the first message and
    // two new ones: the new ones are stored, in order, and the retry is not.
    let with_id = |id: &str, body: &[u8]| FixedId {
        id: id.into(),
        ..fixed(body)
    };
    let batch = vec![
        with_id("7F0000010001000000000000000C", b"third"),
        fixed(b"confirmation"),
        with_id("7F0000010001000000000000000D", b"fourth"),
    ];
    let receipts = p.batch_send(batch).await.expect("batch");
    assert_eq!(receipts.len(), 3);
    assert_eq!(receipts[1].message_id(), first.message_id());
    let got = e.broker.poll("g", "payments", 10).expect("poll");
    let bodies: Vec<&[u8]> = got.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, vec![&b"third"[..], &b"fourth"[..]]);
    stop(e, p, []).await;
}

/// A delayed message's retry (same message id) is stored once too, and a message is traced
/// by any of its keys, not only the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_retry_is_stored_once_and_every_key_finds_the_message() {
    let (e, p) = start_producer("payments", 1).await;
    let now_s = unix_seconds();
    let later = || FixedId {
        id: "7F0000010001000000000000001A".into(),
        topic: "payments".into(),
        body: b"remind".to_vec(),
        keys: vec!["order-5".into(), "pay-5".into()],
        deliver_at_s: Some(now_s + 3600),
    };
    let first = p.send(later()).await.expect("send");
    let again = p.send(later()).await.expect("retry");
    assert_eq!(first.message_id(), again.message_id());
    assert_eq!(e.broker.delayed_pending(), 1);
    let now = FixedId {
        id: "7F0000010001000000000000001B".into(),
        keys: vec!["order-6".into(), "pay-6".into(), "refund-6".into()],
        deliver_at_s: None,
        body: b"paid".to_vec(),
        ..later()
    };
    p.send(now).await.expect("send");
    for (key, n) in [
        ("order-5", 1),
        ("pay-5", 1),
        ("order-6", 1),
        ("refund-6", 1),
        ("pay", 0),
    ] {
        let t = e.broker.trace(key).expect("trace");
        assert_eq!(t.messages.len(), n, "{key}: {t}");
    }
    stop(e, p, []).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_not_delivered_before_its_time() {
    let (e, p) = start_producer("reminders", 1).await;
    let now_s = unix_seconds();
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
    stop(e, p, []).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_and_roll_back_from_the_producer() {
    let e = start("txn", 1, |c| c).await;
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
    stop(e, p, []).await;
}

fn txn_of(t: &impl Transaction) -> TxnId {
    TxnId(t.transaction_id().parse().expect("a halfmq transaction id"))
}

/// Send a half message the producer does not end itself; its transaction.
async fn unended(p: &Producer, body: &[u8]) -> TxnId {
    let t = p.send_transaction_message(half(body)).await.expect("half");
    txn_of(&t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_back_asks_the_live_producer_which_commits_or_rolls_back() {
    let e = start("txn", 1, |mut c| {
        c.txn.timeout = Duration::from_millis(300);
        c.txn.check_interval = Duration::from_millis(300);
        c
    })
    .await;
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
    let a = unended(&p, b"commit me").await;
    let b = unended(&p, b"roll me back").await;
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
    stop(e, p, []).await;
}

/// A started simple consumer of `topic` in group `group`.
async fn consumer(e: &Endpoint, group: &str, topic: &str) -> SimpleConsumer {
    let mut o = SimpleConsumerOption::default();
    o.set_consumer_group(group);
    o.set_topics(vec![topic]);
    let mut c = SimpleConsumer::new(o, e.client_option(Duration::from_secs(2))).expect("consumer");
    c.start().await.expect("consumer starts");
    c
}

/// Receive from `topic` until `n` messages came or 10 receives passed.
async fn receive_n(
    c: &SimpleConsumer,
    topic: &str,
    filter: &FilterExpression,
    lease: Duration,
    n: usize,
) -> Vec<MessageView> {
    let mut got = Vec::new();
    for _ in 0..10 {
        if got.len() >= n {
            break;
        }
        got.extend(
            c.receive_with(topic, filter, 16, lease)
                .await
                .expect("receive"),
        );
    }
    got
}

/// Send messages of `topic` with these tags and bodies; their message ids.
async fn send_tagged(p: &Producer, topic: &str, tagged: &[(&str, &str)]) -> Vec<String> {
    let mut ids = Vec::new();
    for (tag, body) in tagged {
        let m = MessageBuilder::builder()
            .set_topic(topic)
            .set_body(body.as_bytes().to_vec())
            .set_tag(*tag)
            .build()
            .expect("message");
        ids.push(p.send(m).await.expect("send").message_id().to_owned());
    }
    ids
}

fn all() -> FilterExpression {
    FilterExpression::new(FilterType::Tag, "*")
}

/// A receive of `topic` (every tag) finds nothing for the consumer's group.
async fn nothing_more(c: &SimpleConsumer, topic: &str) {
    let lease = Duration::from_secs(30);
    let got = c.receive_with(topic, &all(), 16, lease).await;
    let got = got.expect("receive");
    assert!(got.is_empty(), "{} messages came again", got.len());
}

/// Stop the clients, then the endpoint and broker.
async fn stop<const N: usize>(e: Endpoint, p: Producer, consumers: [SimpleConsumer; N]) {
    for c in consumers {
        c.shutdown().await.expect("consumer stops");
    }
    p.shutdown().await.expect("producer stops");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_consumer_receives_and_acks() {
    let (e, p) = start_producer("work", 2).await;
    let jobs = [("job", "job 0"), ("job", "job 1"), ("job", "job 2")];
    let mut sent = send_tagged(&p, "work", &jobs).await;
    let c = consumer(&e, "workers", "work").await;
    let lease = Duration::from_secs(30);
    let got = receive_n(&c, "work", &all(), lease, 3).await;
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
    nothing_more(&c, "work").await;
    stop(e, p, [c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ran_out_redelivers_and_its_handle_is_stale() {
    let (e, p) = start_producer("work", 1).await;
    send_tagged(&p, "work", &[("job", "slow job")]).await;
    let c = consumer(&e, "workers", "work").await;
    // A one-second lease of the receive's own (the group's is 30 s): not acked in time, the
    // message comes again as the second attempt.
    let first = receive_n(&c, "work", &all(), Duration::from_secs(1), 1).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].delivery_attempt(), 1);
    let second = receive_n(&c, "work", &all(), Duration::from_secs(30), 1).await;
    assert_eq!(second.len(), 1);
    assert_eq!(
        (second[0].message_id(), second[0].delivery_attempt()),
        (first[0].message_id(), 2)
    );
    // The first delivery's handle is stale: its ack is refused, saying so.
    let err = c.ack(&first[0]).await.expect_err("a stale handle");
    let shown = format!("{err:?}");
    assert!(shown.contains("stale"), "{shown}");
    // The message is still held under the second lease, whose handle acks it.
    c.ack(&second[0]).await.expect("ack");
    nothing_more(&c, "work").await;
    stop(e, p, [c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_filter_hands_out_only_its_tags() {
    let (e, p) = start_producer("orders", 1).await;
    let tagged = [
        ("paid", "p1"),
        ("refund", "r1"),
        ("shipped", "s1"),
        ("paid", "p2"),
    ];
    send_tagged(&p, "orders", &tagged).await;
    let billing = consumer(&e, "billing", "orders").await;
    let filter = FilterExpression::new(FilterType::Tag, "paid || refund");
    let lease = Duration::from_secs(30);
    let got = receive_n(&billing, "orders", &filter, lease, 3).await;
    let mut bodies: Vec<&[u8]> = got.iter().map(|m| m.body()).collect();
    bodies.sort();
    assert_eq!(bodies, vec![&b"p1"[..], &b"p2"[..], &b"r1"[..]]);
    for m in &got {
        billing.ack(m).await.expect("ack");
    }
    // The message the filter skipped is done for that group, not for another one.
    nothing_more(&billing, "orders").await;
    let shipping = consumer(&e, "shipping", "orders").await;
    let shipped = FilterExpression::new(FilterType::Tag, "shipped");
    let got = receive_n(&shipping, "orders", &shipped, lease, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].body(), got[0].tag()), (&b"s1"[..], Some("shipped")));
    // SQL92 is refused with a clear status, not answered with nothing.
    let sql = FilterExpression::new(FilterType::Sql, "a > 1");
    let err = shipping
        .receive_with("orders", &sql, 16, lease)
        .await
        .expect_err("SQL92 is not supported");
    assert!(format!("{err:?}").contains("SQL92"), "{err:?}");
    stop(e, p, [billing, shipping]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_group_gets_a_message_group_in_order_one_at_a_time() {
    let e = start("ledger", 4, |c| c).await;
    let fifo = halfmq::GroupSettings {
        fifo: Some(true),
        ..Default::default()
    };
    e.broker
        .set_group_settings("books", &fifo)
        .expect("settings");
    let p = producer(&e, "ledger").await;
    for (group, body) in [
        ("acct-1", "a0"),
        ("acct-2", "b0"),
        ("acct-1", "a1"),
        ("acct-1", "a2"),
    ] {
        let m = MessageBuilder::fifo_message_builder("ledger", body.as_bytes().to_vec(), group)
            .build()
            .expect("message");
        p.send(m).await.expect("send");
    }
    let c = consumer(&e, "books", "ledger").await;
    let lease = Duration::from_secs(30);
    // Each message group's head only: a0 and b0, not a1 behind a0.
    let heads = receive_n(&c, "ledger", &all(), lease, 2).await;
    let mut bodies: Vec<&[u8]> = heads.iter().map(|m| m.body()).collect();
    bodies.sort();
    assert_eq!(bodies, vec![&b"a0"[..], &b"b0"[..]]);
    // a1 does not come before a0 is acked.
    nothing_more(&c, "ledger").await;
    for m in &heads {
        assert!(m.message_group().is_some());
        c.ack(m).await.expect("ack");
    }
    // Then the rest of acct-1, one at a time, in order.
    for want in ["a1", "a2"] {
        let got = receive_n(&c, "ledger", &all(), lease, 1).await;
        assert_eq!(got.len(), 1, "waiting for {want}");
        assert_eq!(
            (got[0].body(), got[0].message_group()),
            (want.as_bytes(), Some("acct-1"))
        );
        c.ack(&got[0]).await.expect("ack");
    }
    stop(e, p, [c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_producer_cannot_decide_stays_unresolved_not_dropped() {
    let e = start("txn", 1, |mut c| {
        c.txn.timeout = Duration::from_millis(300);
        c.txn.check_interval = Duration::from_millis(300);
        c.txn.check_max = 2;
        c
    })
    .await;
    let checker = Box::new(|_: String, _| TransactionResolution::UNKNOWN);
    let p = txn_producer(&e, checker).await;
    let t = unended(&p, b"undecided").await;
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
    stop(e, p, []).await;
}
