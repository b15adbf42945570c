//! Tags and a poll's tag filter: matching messages are handed out, the others are acked for
//! the group unseen (and the trace says so); bad tags and bad expressions are typed errors;
//! a message group picks the queue; transactional messages keep their tag. Embedded and over
//! the network.

mod common;

use halfmq::trace::Event;
use halfmq::{Broker, BrokerConfig, Error, HalfOptions, Message, PollOptions, TagFilter};

fn open(dir: &std::path::Path, queues: u32) -> std::sync::Arc<Broker> {
    let mut c = BrokerConfig::new(dir);
    c.default_queues = queues;
    Broker::open(c).unwrap()
}

fn filter(expr: &str) -> PollOptions {
    PollOptions::default().with_filter(TagFilter::parse(expr).unwrap())
}

fn tagged(key: &str, tag: Option<&str>) -> Message {
    let m = Message::new(key.as_bytes().to_vec()).with_key(key);
    match tag {
        Some(t) => m.with_tag(t),
        None => m,
    }
}

fn keys(ds: &[halfmq::Delivery]) -> Vec<&str> {
    ds.iter().map(|d| d.key.as_str()).collect()
}

#[test]
fn a_filter_hands_out_matching_messages_and_acks_the_others_for_the_group() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path(), 1);
    for (k, tag) in [
        ("k1", Some("paid")),
        ("k2", Some("created")),
        ("k3", None),
        ("k4", Some("refunded")),
        ("k5", Some("paid")),
    ] {
        b.send("t", &tagged(k, tag)).unwrap();
    }
    let got = b
        .poll_with("g", "t", 10, &filter("paid || refunded"))
        .unwrap();
    assert_eq!(keys(&got), ["k1", "k4", "k5"]);
    assert_eq!(got[0].tag(), Some("paid"));
    // The skipped ones are acked for g: nothing more, even with `*`, and after a restart.
    assert!(b.poll_with("g", "t", 10, &filter("*")).unwrap().is_empty());
    let acks: Vec<(u32, u64)> = got.iter().map(|d| (d.queue, d.offset)).collect();
    b.ack_many("g", "t", &acks).unwrap();
    b.close().unwrap();
    drop(b);
    let b = open(tmp.path(), 1);
    assert!(
        b.poll("g", "t", 10).unwrap().is_empty(),
        "all acked, durably"
    );
    // Another group has its own view.
    let all = b.poll_with("h", "t", 10, &PollOptions::default()).unwrap();
    assert_eq!(all.len(), 5);
    // The trace still finds a skipped message, and says why it was not delivered to g.
    let tr = b.trace("k2").unwrap();
    assert_eq!(tr.messages.len(), 1);
    let filtered = tr.messages[0].events.iter().any(|l| {
        matches!(&l.event, Event::Filtered { group, filter } if group == "g" && filter == "paid || refunded")
    });
    assert!(filtered, "{:?}", tr.messages[0].events);
}

#[test]
fn a_filter_applies_to_redeliveries_too() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path(), 1);
    b.send("t", &tagged("k1", Some("a"))).unwrap();
    let d = b.poll("g", "t", 1).unwrap().remove(0);
    b.nack("g", "t", d.queue, d.offset, Some(std::time::Duration::ZERO))
        .unwrap();
    assert!(b.poll_with("g", "t", 1, &filter("b")).unwrap().is_empty());
    assert!(b.poll("g", "t", 1).unwrap().is_empty(), "skipped, so acked");
}

#[test]
fn bad_tags_and_bad_expressions_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path(), 1);
    for bad in ["", "a|b", " padded", &"x".repeat(200)] {
        match b.send("t", &Message::new("x").with_tag(bad)) {
            Err(Error::Invalid { what, .. }) => assert_eq!(what, "tag"),
            other => panic!("tag {bad:?}: {other:?}"),
        }
        match b.send("t", &Message::new("x").with_message_group(bad)) {
            Err(Error::Invalid { what, .. }) => assert_eq!(what, "message group"),
            other => panic!("message group {bad:?}: {other:?}"),
        }
    }
    for bad in ["a ||", "a || *", "a | b"] {
        match TagFilter::parse(bad) {
            Err(Error::Invalid { what, .. }) => assert_eq!(what, "filter expression"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    // Other reserved properties stay refused.
    let m = Message::new("x").with_property("halfmq.txn", "1");
    assert!(matches!(b.send("t", &m), Err(Error::Invalid { .. })));
}

#[test]
fn a_message_group_picks_the_queue_and_a_commit_keeps_tag_and_group() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path(), 8);
    let mut queues = std::collections::BTreeSet::new();
    for i in 0..20 {
        let m = Message::new("x")
            .with_key(format!("key-{i}"))
            .with_message_group("order-7");
        queues.insert(b.send("t", &m).unwrap().queue);
    }
    assert_eq!(queues.len(), 1, "one message group, one queue");
    let m = tagged("tx", Some("paid")).with_message_group("order-7");
    let txn = b
        .send_half("t", &m, "producers", HalfOptions::default())
        .unwrap();
    b.commit(txn).unwrap();
    let got = b.poll_with("g", "t", 100, &filter("paid")).unwrap();
    assert_eq!(keys(&got), ["tx"]);
    assert_eq!(got[0].message_group(), Some("order-7"));
    assert_eq!(Some(got[0].queue), queues.first().copied());
}

#[test]
fn a_filter_over_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let b = open(tmp.path(), 2);
    common::with_served(&b, |_, c| async move {
        for (k, tag) in [("k1", "a"), ("k2", "b"), ("k3", "c")] {
            c.send("t", &tagged(k, Some(tag))).await.unwrap();
        }
        let mut got = c.poll_with("g", "t", 10, &filter("c||a")).await.unwrap();
        got.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(keys(&got), ["k1", "k3"]);
        assert!(c.poll("g", "t", 10).await.unwrap().is_empty());
        let e = c
            .send("t", &Message::new("x").with_tag("a||b"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Invalid { what: "tag", .. }), "{e}");
        let raw = halfmq_client::protocol::Request::Receive {
            group: "g".into(),
            topic: "t".into(),
            max: 1,
            wait_ms: 0,
            lease_ms: None,
            filter: "a || ".into(),
        };
        let e = c.call(raw).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Invalid {
                    what: "filter expression",
                    ..
                }
            ),
            "{e}"
        );
    });
}

/// The command line: `produce --tag`, `consume --filter`, a bad filter refused by the flag's
/// parse, and `groups set --fifo`.
#[test]
fn tags_filters_and_fifo_from_the_command_line() {
    let broker = common::BrokerProc::fresh(&[]);
    let a = broker.addr.as_str();
    for (tag, prefix) in [("paid", "p"), ("created", "c")] {
        common::run(&[
            "produce",
            "--addr",
            a,
            "--topic",
            "t",
            "--key-prefix",
            prefix,
            "--count",
            "2",
            "--tag",
            tag,
        ])
        .ok();
    }
    let got = common::run(&[
        "consume",
        "--addr",
        a,
        "--topic",
        "t",
        "--group",
        "g",
        "--json",
        "--filter",
        "paid || refunded",
        "--idle-exit-ms",
        "500",
    ])
    .ok()
    .json_lines();
    let tags: Vec<&str> = got.iter().map(|v| v["tag"].as_str().unwrap()).collect();
    assert_eq!(tags, ["paid", "paid"]);
    let bad = common::run(&[
        "consume", "--addr", a, "--topic", "t", "--group", "g", "--filter", "a ||",
    ])
    .fails();
    assert!(bad.stderr.contains("filter expression"), "{}", bad.stderr);
    let shown = common::run(&[
        "groups", "set", "--addr", a, "g", "--fifo", "true", "--json",
    ])
    .ok()
    .json_lines();
    assert_eq!(shown[0]["fifo"], true);
    assert_eq!(shown[0]["overrides"]["fifo"], true);
}
