//! Metrics end to end: the real `halfmq broker --metrics` on free loopback ports, driven by
//! the CLI (produce, consume, a transaction committed by hand and one committed through a
//! check-back), then `/metrics` fetched over plain HTTP and checked by name, labels and
//! value; `halfmq stats` (table and JSON) shows the same state. Also: the stats figures
//! behind the gauges on an embedded broker, `bench --metrics`, and a metrics port that is
//! taken.
//!
//! The child-process helpers are in `tests/common/mod.rs`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use halfmq::{Broker, BrokerConfig, Message};
use serde_json::Value;

mod common;

use common::*;

// ---------------------------------------------------------------------------------------
// HTTP and the Prometheus text format
// ---------------------------------------------------------------------------------------

/// One HTTP/1.1 request; (status code, headers, body).
fn http(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_owned(), body.to_owned())
}

/// The samples of a scrape: (name, labels) → value.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Scrape {
    fn fetch(metrics: &str) -> Scrape {
        let (status, head, text) = http(metrics, "GET", "/metrics");
        assert_eq!(status, 200, "{head}\n{text}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").unwrap();
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            samples.insert((name, labels), value);
        }
        Scrape { text, samples }
    }

    /// The value of `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }

    /// Every sample of `name`, labels ignored, summed (0 when none).
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn metrics_endpoint_counts_what_the_broker_did() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start_with_metrics(dir.path(), &fast_check_back("1000"));
    let (a, m) = (broker.addr.clone(), broker.metrics.clone().unwrap());
    let (a, m) = (a.as_str(), m.as_str());

    // Before any traffic: the gauges set by the scrape, no per-topic series yet.
    let s0 = Scrape::fetch(m);
    assert!(s0
        .text
        .contains("# HELP halfmq_transactions_pending Transactions waiting for an outcome"));
    assert_eq!(s0.value("halfmq_transactions_pending", &[]), 0.0);
    assert_eq!(s0.value("halfmq_transactions_unresolved", &[]), 0.0);
    assert_eq!(s0.sum("halfmq_messages_in_total"), 0.0);

    // Produce 3, consume and ack them, produce 2 more that stay un-acked.
    run(&["topics", "create", "--addr", a, "orders", "--queues", "1"]).ok();
    let produce = |count: &str| {
        run(&[
            "produce", "--addr", a, "--topic", "orders", "--body", "12345678", "--count", count,
            "--json",
        ])
        .ok()
    };
    assert_eq!(produce("3").json_lines().len(), 3);
    let got = run(&[
        "consume",
        "--addr",
        a,
        "--topic",
        "orders",
        "--group",
        "shipping",
        "--idle-exit-ms",
        "300",
        "--json",
    ])
    .ok();
    assert_eq!(got.json_lines().len(), 3);
    assert_eq!(produce("2").json_lines().len(), 2);
    thread::sleep(Duration::from_millis(300));

    let s1 = Scrape::fetch(m);
    assert!(s1
        .text
        .contains("# HELP halfmq_messages_in_total Messages stored"));
    assert!(s1
        .text
        .contains("# TYPE halfmq_fsync_duration_seconds histogram"));
    let orders = [("topic", "orders")];
    let shipping = [("topic", "orders"), ("group", "shipping")];
    let q = [("topic", "orders"), ("queue", "0"), ("group", "shipping")];
    assert_eq!(s1.value("halfmq_messages_in_total", &orders), 5.0);
    assert_eq!(s1.value("halfmq_bytes_in_total", &orders), 40.0);
    assert_eq!(s1.value("halfmq_messages_out_total", &shipping), 3.0);
    assert_eq!(s1.value("halfmq_acks_total", &shipping), 3.0);
    assert_eq!(
        s1.value(
            "halfmq_queue_messages",
            &[("topic", "orders"), ("queue", "0")]
        ),
        5.0
    );
    assert_eq!(s1.value("halfmq_group_backlog_messages", &q), 2.0);
    assert_eq!(s1.value("halfmq_group_lag_messages", &q), 2.0);
    let age = s1.value("halfmq_group_oldest_unacked_age_seconds", &q);
    assert!((0.3..60.0).contains(&age), "oldest un-acked age {age}");
    // Every record so far was one durable write: 5 records, each group commit fsynced.
    assert_eq!(s1.value("halfmq_group_commit_records_sum", &[]), 5.0);
    let fsyncs = s1.value("halfmq_fsync_duration_seconds_count", &[]);
    assert!(
        (1.0..=5.0).contains(&fsyncs),
        "{fsyncs} fsyncs for 5 records"
    );
    assert_eq!(
        s1.value("halfmq_fsync_duration_seconds_bucket", &[("le", "+Inf")]),
        fsyncs
    );
    assert!(s1.value("halfmq_fsync_duration_seconds_sum", &[]) > 0.0);
    assert_eq!(s1.value("halfmq_group_commit_bytes_count", &[]), fsyncs);
    // topics create, produce, consume, produce: four CLI connections, all closed by now.
    assert_eq!(s1.value("halfmq_connections_total", &[]), 4.0);
    assert_eq!(s1.value("halfmq_connections_open", &[]), 0.0);

    // `halfmq stats` shows the same figures.
    let st: Value =
        serde_json::from_str(&run(&["stats", "--addr", a, "--json"]).ok().stdout).unwrap();
    let g = &st["queues"][0]["groups"][0];
    assert_eq!(g["group"], "shipping");
    assert_eq!(
        (g["backlog"].as_u64(), g["lag"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(g["committed"].as_u64(), Some(3));
    assert!(g["oldest_unacked_age_ms"].as_u64().unwrap() >= 300);
    let table = run(&["stats", "--addr", a]).ok().stdout;
    assert!(table.contains("oldest-un-acked"), "{table}");
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.contains("shipping"))
        .unwrap_or_else(|| panic!("no shipping row in\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..7],
        ["orders", "0", "5", "shipping", "3", "2", "2"],
        "{table}"
    );

    // A transaction committed by hand.
    let begin = |key: &str| {
        let out = run(&[
            "txn", "begin", "--addr", a, "--topic", "pay", "--key", key, "--group", "pay-svc",
            "--body", "paid", "--json",
        ])
        .ok();
        out.json_lines()[0]["txn_id"].as_u64().unwrap()
    };
    let t1 = begin("k1");
    let s2 = Scrape::fetch(m);
    assert_eq!(s2.value("halfmq_transactions_pending", &[]), 1.0);
    // The half created the topic, which registers its counters; the half is not a message.
    assert_eq!(
        s2.get("halfmq_messages_in_total", &[("topic", "pay")]),
        Some(0.0)
    );
    run(&["txn", "commit", "--addr", a, &t1.to_string()]).ok();
    let s3 = Scrape::fetch(m);
    assert_eq!(s3.value("halfmq_transactions_pending", &[]), 0.0);
    assert_eq!(
        s3.value("halfmq_messages_in_total", &[("topic", "pay")]),
        1.0
    );
    assert_eq!(s3.value("halfmq_bytes_in_total", &[("topic", "pay")]), 4.0);

    // One whose producer "crashed": checked with nobody to ask, then committed through a
    // check-back once a checker of the group is connected.
    begin("k2");
    eventually(Duration::from_secs(15), "a check with no producer", || {
        let s = Scrape::fetch(m);
        (s.get("halfmq_check_backs_total", &[("answer", "no_producer")])? >= 1.0).then_some(())
    });
    let checker = Proc::spawn(
        "txn checker",
        halfmq_cmd(&[
            "txn", "checker", "--addr", a, "--group", "pay-svc", "--answer", "commit",
        ]),
    );
    assert!(checker
        .wait_line(|l| l.contains("answering"), Duration::from_secs(30))
        .is_some());
    let s4 = eventually(Duration::from_secs(15), "the check-back commit", || {
        let s = Scrape::fetch(m);
        (s.get("halfmq_check_backs_total", &[("answer", "commit")]) == Some(1.0)
            && s.get("halfmq_transactions_pending", &[]) == Some(0.0))
        .then_some(s)
    });
    assert_eq!(
        s4.value("halfmq_messages_in_total", &[("topic", "pay")]),
        2.0
    );
    assert_eq!(
        s4.get("halfmq_check_backs_total", &[("answer", "rollback")]),
        None
    );
    assert_eq!(s4.value("halfmq_connections_open", &[]), 1.0, "the checker");
    // 5 messages, 2 halves, 2 commits.
    assert_eq!(s4.value("halfmq_group_commit_records_sum", &[]), 9.0);
    drop(checker);

    // Only /metrics is served; HEAD has no body.
    let (status, _, body) = http(m, "GET", "/");
    assert_eq!((status, body.contains("/metrics")), (404, true));
    let (status, head, body) = http(m, "HEAD", "/metrics");
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    assert_eq!(http(m, "POST", "/metrics").0, 405);

    // A second broker whose metrics port is taken fails with the address in the error.
    let dir2 = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(
        "second broker",
        halfmq_cmd(&[
            "broker",
            "--data-dir",
            dir2.path().to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics",
            m,
        ]),
    );
    let st = p.wait_exit(Duration::from_secs(60));
    let err = p.stderr();
    assert!(!st.success());
    assert!(
        err.contains(m) && err.contains("listen for metrics"),
        "{err}"
    );

    broker.terminate();
    assert!(
        TcpStream::connect(m).is_err(),
        "the metrics port is closed after the broker stopped"
    );
}

/// The dead-letter counter is registered only when something is dead-lettered, so the
/// check above must not demand it; this is what `metrics::dead_lettered` records.
#[test]
fn dead_letter_helper_records_topic_and_group() {
    let rec = halfmq::metrics::recorder();
    metrics::with_local_recorder(&rec, || {
        halfmq::metrics::dead_lettered("shipping", "orders");
        halfmq::metrics::dead_lettered("shipping", "orders");
    });
    let text = rec.handle().render();
    assert!(
        text.contains("halfmq_dead_letters_total{topic=\"orders\",group=\"shipping\"} 2"),
        "{text}"
    );
}

#[test]
fn metrics_setting_is_off_by_default_and_printed() {
    let off = run(&["broker", "--print-config"]).ok().stdout;
    assert!(off.contains("metrics = \"off\""), "{off}");
    let on = run(&["broker", "--print-config", "--metrics", "127.0.0.1:9191"])
        .ok()
        .stdout;
    assert!(on.contains("metrics = \"127.0.0.1:9191\""), "{on}");
    let p = run_env(
        &["broker", "--print-config"],
        &[("HALFMQ_METRICS", "nonsense")],
    )
    .fails();
    assert!(p.stderr.contains("`metrics`"), "{}", p.stderr);
}

/// The figures behind the backlog, lag and oldest-age gauges, on an embedded broker.
#[test]
fn stats_give_lag_and_oldest_unacked_age() {
    let dir = tempfile::tempdir().unwrap();
    // Ages are read from the broker's clock, which moves only when the test moves it.
    let clock = halfmq::ManualClock::starting_now();
    let b = Broker::open(BrokerConfig::new(dir.path()).with_clock(clock.clone())).unwrap();
    b.create_topic("t", 1).unwrap();
    for i in 0..3 {
        b.send("t", &Message::new(format!("m{i}"))).unwrap();
    }
    assert_eq!(b.poll("g", "t", 10).unwrap().len(), 3);
    clock.advance_ms(120);
    let group = |b: &Broker| b.stats().unwrap().queues[0].groups.clone();
    // Nothing acked yet: the group has a row (it polled), everything is its backlog and in
    // flight.
    let g = &group(&b)[0];
    assert_eq!((g.committed, g.backlog, g.lag, g.in_flight), (0, 3, 3, 3));
    assert!(g.oldest_unacked_age_ms.is_some());

    // Ack the middle one: offset 0 is the oldest un-acked, the lag covers all three.
    b.ack("g", "t", 0, 1).unwrap();
    let g = &group(&b)[0];
    assert_eq!((g.committed, g.backlog, g.lag), (0, 2, 3));
    assert_eq!(g.oldest_unacked_age_ms, Some(120));

    // Ack offset 0: committed moves past 1, offset 2 is the oldest.
    b.ack("g", "t", 0, 0).unwrap();
    let g = &group(&b)[0];
    assert_eq!((g.committed, g.backlog, g.lag), (2, 1, 1));
    assert!(g.oldest_unacked_age_ms.is_some());

    b.ack("g", "t", 0, 2).unwrap();
    let g = &group(&b)[0];
    assert_eq!(
        (g.committed, g.backlog, g.lag, g.oldest_unacked_age_ms),
        (3, 0, 0, None)
    );
    b.close().unwrap();
}

#[test]
fn bench_with_a_recorder_counts_every_message() {
    let (r, _) = embedded_bench("--metrics --producers 4 --messages 300");
    assert_eq!(r["metrics_recorder"], true);
    assert_eq!(r["messages"].as_u64(), Some(300));
    assert_eq!(r["metrics_messages_in"].as_u64(), Some(300), "{r}");
}
