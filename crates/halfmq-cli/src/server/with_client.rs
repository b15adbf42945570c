//! The Rust client against a real broker on 127.0.0.1, started in each test: it returns the
//! embedded broker's types and errors, and its consumer stream settles deliveries and keeps
//! its bound on deliveries out.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use halfmq::{Broker, BrokerConfig, Error, GroupSettings, Message, NackOutcome, TxnId};
use halfmq_client::{Client, ClientConfig, Consumer, StreamOptions};

use super::{Server, ServerConfig};

/// A broker in a fresh directory, served on a free port, and a client connected to it.
struct Running {
    broker: Arc<Broker>,
    server: Server,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn running() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    let server = Server::start(broker.clone(), config).await.unwrap();
    let addr = server.local_addr().to_string();
    let client = Client::connect(ClientConfig::new(addr).with_name("test".into()))
        .await
        .unwrap();
    Running {
        broker,
        server,
        client,
        _dir: dir,
    }
}

impl Running {
    async fn stop(self) {
        drop(self.client);
        self.server.shutdown().await;
        self.broker.close().unwrap();
    }
}

/// The error of the same operation, embedded and over the network: same variant, same text.
#[track_caller]
fn same_error<T: std::fmt::Debug, U: std::fmt::Debug>(
    embedded: halfmq::Result<T>,
    network: halfmq::Result<U>,
) -> Error {
    let (Err(a), Err(b)) = (embedded, network) else {
        panic!("both fail");
    };
    assert_eq!((a.code(), a.to_string()), (b.code(), b.to_string()));
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_come_back_as_their_variants() {
    let r = running().await;
    let (b, c) = (&r.broker, &r.client);
    c.create_topic("orders", 3).await.unwrap();
    let e = same_error(
        b.create_topic("orders", 5),
        c.create_topic("orders", 5).await,
    );
    assert!(matches!(
        e,
        Error::TopicExists {
            existing: 3,
            requested: 5,
            ..
        }
    ));
    let e = same_error(b.delete_group("nobody"), c.delete_group("nobody").await);
    assert!(matches!(e, Error::UnknownGroup(g) if g == "nobody"));
    let e = same_error(b.commit(TxnId(4711)), c.commit(TxnId(4711)).await);
    assert!(matches!(e, Error::UnknownTxn(4711)));
    let e = same_error(
        b.ack("g", "orders", 1, 99),
        c.ack("g", "orders", 1, 99).await,
    );
    assert!(matches!(
        e,
        Error::BadAck {
            queue: 1,
            offset: 99,
            ..
        }
    ));
    let e = same_error(
        b.create_topic(".hidden", 1),
        c.create_topic(".hidden", 1).await,
    );
    assert!(matches!(e, Error::Invalid { .. }));
    let e = same_error(
        b.set_group_settings(
            "g",
            &GroupSettings {
                max_retries: Some(5000),
                ..GroupSettings::default()
            },
        ),
        c.set_group_settings(
            "g",
            &GroupSettings {
                max_retries: Some(5000),
                ..GroupSettings::default()
            },
        )
        .await,
    );
    assert!(matches!(
        e,
        Error::Config {
            setting: "max_retries",
            ..
        }
    ));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_returns_the_embedded_types() {
    let r = running().await;
    let (b, c) = (&r.broker, &r.client);
    assert_eq!(
        c.create_topic("t", 2).await.unwrap(),
        b.create_topic("t", 2).unwrap()
    );
    assert_eq!(c.topics().await.unwrap(), b.topics());
    let sent = c
        .send(
            "t",
            &Message::new("hello").with_key("k").with_property("p", "q"),
        )
        .await
        .unwrap();
    let got = c
        .poll_wait("g", "t", 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(
        (d.queue, d.offset, d.log_offset),
        (sent.queue, sent.offset, sent.log_offset)
    );
    assert_eq!(
        (d.key.as_str(), d.body.as_slice(), d.attempt),
        ("k", &b"hello"[..], 1)
    );
    assert_eq!(d.properties.get("p").map(String::as_str), Some("q"));
    c.ack("g", "t", d.queue, d.offset).await.unwrap();
    assert!(c.poll("g", "t", 10).await.unwrap().is_empty());

    let overrides = GroupSettings {
        visibility_timeout_ms: Some(2_000),
        ..GroupSettings::default()
    };
    let in_force = c.set_group_settings("g", &overrides).await.unwrap();
    assert_eq!(in_force.visibility_timeout, Duration::from_secs(2));
    assert_eq!(
        c.group_settings("g").await.unwrap(),
        b.group_settings("g").unwrap()
    );
    assert_eq!(c.stats().await.unwrap(), b.stats().unwrap());
    assert_eq!(c.transactions(None).await.unwrap(), b.transactions(None));
    // A trace's "now" is computed at each call; its events are the same.
    let (ct, bt) = (c.trace("k").await.unwrap(), b.trace("k").unwrap());
    assert_eq!(ct.messages.len(), 1);
    assert_eq!(ct.messages[0].events, bt.messages[0].events);
    r.stop().await;
}

/// The next delivery of `stream`, within a few seconds.
async fn next(stream: &mut halfmq_client::Deliveries) -> halfmq_client::Received {
    // Through the `Stream` trait, as a user with `StreamExt` would.
    tokio::time::timeout(Duration::from_secs(10), StreamExt::next(stream))
        .await
        .expect("a delivery in time")
        .expect("the stream does not end")
        .expect("no error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stream_settles_deliveries_and_bounds_those_out() {
    let r = running().await;
    let c = &r.client;
    c.create_topic("s", 2).await.unwrap();
    for i in 0..10 {
        let msg = Message::new(format!("m{i}")).with_key(format!("k{i}"));
        c.send("s", &msg).await.unwrap();
    }
    let consumer = Consumer::new(c.clone(), "g", "s");
    let options = StreamOptions::default()
        .with_in_flight_max(4)
        .with_batch_max(3)
        .with_wait(Duration::from_millis(200));
    let mut stream = consumer.stream(options);

    // Four out and none settled: the stream waits (and leases nothing more meanwhile).
    let mut out = Vec::new();
    for _ in 0..4 {
        out.push(next(&mut stream).await);
    }
    let more = tokio::time::timeout(Duration::from_millis(500), StreamExt::next(&mut stream)).await;
    assert!(more.is_err(), "a fifth delivery while four are out");

    // Settling one makes room for one more.
    let first = out.remove(0);
    let nacked_key = first.key.clone();
    match first.nack(Some(Duration::ZERO)).await.unwrap() {
        NackOutcome::Redeliver { attempt, .. } => assert_eq!(attempt, 2),
        other => panic!("{other:?}"),
    }
    // The nacked one comes again as attempt 2 (redeliveries due come first); every one of
    // the ten is acked in the end.
    let mut acked = std::collections::BTreeSet::new();
    let mut redelivered = None;
    for d in out.drain(..) {
        acked.insert(d.key.clone());
        d.ack().await.unwrap();
    }
    while acked.len() < 10 {
        let d = next(&mut stream).await;
        if d.key == nacked_key {
            redelivered = Some(d.attempt);
        }
        acked.insert(d.key.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(redelivered, Some(2));
    let stats = c.stats().await.unwrap();
    let backlog: u64 = stats
        .queues
        .iter()
        .flat_map(|q| &q.groups)
        .map(|g| g.backlog)
        .sum();
    assert_eq!(backlog, 0);
    drop(stream);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_frees_its_place() {
    let r = running().await;
    let c = &r.client;
    for i in 0..3 {
        c.send("d", &Message::new(vec![i])).await.unwrap();
    }
    let consumer = Consumer::new(c.clone(), "g", "d");
    let options = StreamOptions::default()
        .with_in_flight_max(1)
        .with_wait(Duration::from_millis(200));
    let mut stream = consumer.stream(options);
    let one = next(&mut stream).await;
    drop(one);
    let two = next(&mut stream).await.into_delivery();
    consumer.ack(&two).await.unwrap();
    let three = next(&mut stream).await;
    three.ack().await.unwrap();
    drop(stream);
    r.stop().await;
}
