//! The embedded broker end to end on real files: send, poll, ack, reopen, and the errors a
//! user can hit.

use halfmq::{Broker, BrokerConfig, Error, Message};

fn open(dir: &std::path::Path) -> std::sync::Arc<Broker> {
    Broker::open(BrokerConfig::new(dir)).expect("open broker")
}

#[test]
fn send_poll_ack_and_resume_after_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    let mut sent = Vec::new();
    for i in 0..100u32 {
        let key = format!("order-{}", i % 10);
        let r = b
            .send(
                "payments",
                &Message::new(format!("body-{i}")).with_key(&key),
            )
            .unwrap();
        sent.push((r.queue, r.offset, key, format!("body-{i}")));
    }
    // Keys keep their queue and their order.
    let got = b.poll("orders", "payments", 1000).unwrap();
    assert_eq!(got.len(), 100);
    for d in &got {
        let s = sent
            .iter()
            .find(|s| s.0 == d.queue && s.1 == d.offset)
            .unwrap();
        assert_eq!(
            (d.key.as_str(), d.body.as_slice()),
            (s.2.as_str(), s.3.as_bytes())
        );
    }
    for key in 0..10 {
        let k = format!("order-{key}");
        let bodies: Vec<_> = got
            .iter()
            .filter(|d| d.key == k)
            .map(|d| d.body.clone())
            .collect();
        let want: Vec<_> = sent
            .iter()
            .filter(|s| s.2 == k)
            .map(|s| s.3.as_bytes().to_vec())
            .collect();
        assert_eq!(bodies, want, "order of key {k}");
    }
    // Nothing more until new messages arrive.
    assert!(b.poll("orders", "payments", 10).unwrap().is_empty());
    // Ack half of them, out of order inside each queue.
    let acked: Vec<_> = got
        .iter()
        .filter(|d| d.offset % 2 == 1 || d.offset < 3)
        .collect();
    for d in &acked {
        b.ack("orders", "payments", d.queue, d.offset).unwrap();
    }
    // Acks are idempotent.
    b.ack("orders", "payments", acked[0].queue, acked[0].offset)
        .unwrap();
    b.close().unwrap();
    drop(b);

    let b = open(tmp.path());
    let again = b.poll("orders", "payments", 1000).unwrap();
    let mut want: Vec<_> = got
        .iter()
        .filter(|d| {
            !acked
                .iter()
                .any(|a| a.queue == d.queue && a.offset == d.offset)
        })
        .map(|d| (d.queue, d.offset))
        .collect();
    let mut have: Vec<_> = again.iter().map(|d| (d.queue, d.offset)).collect();
    want.sort();
    have.sort();
    assert_eq!(
        have, want,
        "exactly the un-acked messages come back after reopen"
    );
    // Another group sees everything.
    assert_eq!(b.poll("audit", "payments", 1000).unwrap().len(), 100);
    let stats = b.stats().unwrap();
    let backlog: u64 = stats
        .queues
        .iter()
        .flat_map(|q| {
            q.groups
                .iter()
                .filter(|g| g.group == "orders")
                .map(|g| g.backlog)
        })
        .sum();
    assert_eq!(backlog, want.len() as u64);
}

#[test]
fn second_open_of_a_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let _b = open(tmp.path());
    match Broker::open(BrokerConfig::new(tmp.path())) {
        Err(Error::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn user_errors_are_typed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = BrokerConfig::new(tmp.path());
    cfg.auto_create_topics = false;
    let b = Broker::open(cfg).unwrap();
    assert!(
        matches!(b.send("nope", &Message::new("x")), Err(Error::UnknownTopic(t)) if t == "nope")
    );
    assert!(matches!(
        b.send("../etc", &Message::new("x")),
        Err(Error::Invalid { .. })
    ));
    b.create_topic("t", 2).unwrap();
    b.create_topic("t", 2).unwrap();
    assert!(matches!(
        b.create_topic("t", 3),
        Err(Error::TopicExists { existing: 2, .. })
    ));
    assert!(matches!(b.ack("g", "t", 0, 0), Err(Error::BadAck { .. })));
    assert!(matches!(b.ack("g", "t", 9, 0), Err(Error::BadAck { .. })));
    let big = vec![0u8; 5 * 1024 * 1024];
    assert!(matches!(
        b.send("t", &Message::new(big)),
        Err(Error::Invalid { .. })
    ));

    let mut bad = BrokerConfig::new(tmp.path().join("x"));
    bad.store.segment_bytes = 10;
    match Broker::open(bad) {
        Err(Error::Config {
            setting: "segment_bytes",
            ..
        }) => {}
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn poll_wait_returns_when_a_message_arrives() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    b.create_topic("t", 4).unwrap();
    let b2 = b.clone();
    let h = std::thread::spawn(move || {
        b2.poll_wait("g", "t", 10, std::time::Duration::from_secs(20))
            .unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    b.send("t", &Message::new("late")).unwrap();
    let got = h.join().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"late");
}

#[test]
fn send_async_is_durable_and_visible_like_send() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let receipts = rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    b.send_async(
                        "t",
                        &Message::new(format!("m{i}")).with_key(format!("k{i}")),
                    )
                    .await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    });
    assert_eq!(receipts.len(), 32);
    let got = b.poll("g", "t", 100).unwrap();
    assert_eq!(got.len(), 32);
    b.close().unwrap();
    drop(b);
    let b = open(tmp.path());
    assert_eq!(
        b.poll("g", "t", 100).unwrap().len(),
        32,
        "all async sends survive a reopen"
    );
}
