//! `halfmq bench --consume`: consumers of one group polling and acking batches of a
//! prefilled topic, embedded and over the network, with the raw disk alternating; and every
//! flag combination it refuses, each with a clear error. No figure here is timed: the checks
//! are that the counts agree with each other.

use serde_json::Value;

mod common;

use common::*;

/// The figures of one consume report agree with each other: every message polled was
/// acked, in calls of at most `poll_max`, no more than the topic held, and all of it when a
/// consumer found the topic empty.
fn check_consistent(r: &Value, consumers: u64, poll_max: u64, prefill: u64) {
    assert_eq!(n(r, "consumers"), consumers, "{r}");
    assert_eq!(n(r, "poll_max"), poll_max, "{r}");
    assert_eq!(n(r, "prefilled"), prefill, "{r}");
    let (polled, acked, calls) = (n(r, "polled"), n(r, "acked"), n(r, "ack_calls"));
    assert!(acked > 0 && calls > 0, "{r}");
    assert_eq!(acked, polled, "every polled message is acked: {r}");
    assert!(acked <= prefill, "{r}");
    assert!(calls <= acked && acked <= calls * poll_max, "{r}");
    if r["ran_dry"] == Value::Bool(true) {
        assert_eq!(
            acked, prefill,
            "a group that ran dry acked the whole topic: {r}"
        );
    }
    let per_call = f(r, "msgs_per_ack_call");
    assert!((per_call - acked as f64 / calls as f64).abs() < 0.01, "{r}");
    let secs = f(r, "seconds");
    assert!(secs > 0.0, "{r}");
    let rate = f(r, "acks_per_s");
    assert!(
        (rate - acked as f64 / secs).abs() <= 0.01 * rate + 1.0,
        "{r}"
    );
    let lat: Vec<u64> = ["ack_p50_us", "ack_p99_us", "ack_p999_us", "ack_max_us"]
        .iter()
        .map(|k| n(r, k))
        .collect();
    assert!(lat.windows(2).all(|w| w[0] <= w[1]), "{r}");
}

/// Embedded: a short run of 3 consumers is consistent; a topic smaller than the run is
/// consumed whole and the run says it ran dry.
#[test]
fn bench_consume_embedded_acks_what_it_polls() {
    let (r, out) =
        embedded_bench("--consume --consumers 3 --poll-max 16 --prefill 5000 --seconds 0.3");
    assert_eq!(r["mode"], "consume", "{r}");
    check_consistent(&r, 3, 16, 5000);
    assert!(out.stdout.contains("acks/s"), "{}", out.stdout);

    let (r, out) = embedded_bench("--consume --consumers 2 --prefill 100 --seconds 60");
    check_consistent(&r, 2, 32, 100);
    assert_eq!(r["ran_dry"], true, "{r}");
    assert!(out.stdout.contains("ran dry"), "{}", out.stdout);
}

/// With --baseline each round measures the raw disk, then the consumers; the ratio reported
/// is the median round's ack calls per second over its raw fdatasyncs per second.
#[test]
fn bench_consume_baseline_alternates_raw_disk_and_consumers() {
    let (r, out) = embedded_bench(
        "--consume --baseline --rounds 3 --consumers 1 --prefill 2000 --seconds 0.2",
    );
    check_consistent(&r, 1, 32, 2000);
    let rounds = round_ratios(&r);
    assert_eq!(rounds.len(), 3, "{r}");
    let mut sorted = rounds.clone();
    sorted.sort_by(f64::total_cmp);
    let ratio = f(&r, "ratio_to_raw_fsync");
    assert_eq!(ratio, sorted[1], "the median of {rounds:?}");
    let own = f(&r, "ack_calls_per_s") / f(&r, "raw_serial_fsync_ops_per_s");
    assert!(
        (own - ratio).abs() < 0.002 + ratio * 0.01,
        "{own} vs {ratio} in {r}"
    );
    assert!(n(&r, "raw_serial_fsync_p99_us") > 0, "{r}");
    assert_eq!(
        out.stderr.matches("measuring the raw disk").count(),
        3,
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("filling"), "{}", out.stderr);
    // The topic is filled once, and each round's fresh group reads it from the start.
    assert_eq!(out.stderr.matches("filling").count(), 1, "{}", out.stderr);
}

/// Over the network: consumers share the connections; the topic is consumed whole, and the
/// group of each round is deleted afterwards (it held nothing).
#[test]
fn bench_consume_over_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(&dir.path().join("broker"), &[]);
    let data = dir.path().join("bench-net");
    let (r, _) = bench_json(&[
        "--addr",
        &broker.addr,
        "--consume",
        "--connections",
        "2",
        "--consumers",
        "4",
        "--poll-max",
        "8",
        "--prefill",
        "300",
        "--seconds",
        "60",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(r["mode"], "consume_broker", "{r}");
    assert_eq!(r["consumer_kind"], "tasks over 2 connections", "{r}");
    check_consistent(&r, 4, 8, 300);
    assert_eq!(r["ran_dry"], true, "{r}");
    // The topic holds what was filled, and the round's group is gone.
    let stats = run(&["stats", "--addr", &broker.addr, "--json"])
        .ok()
        .json_lines();
    let queues: Vec<&Value> = stats[0]["queues"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["topic"].as_str().unwrap().starts_with("bench-consume-"))
        .collect();
    assert_eq!(queues.iter().map(|q| n(q, "messages")).sum::<u64>(), 300);
    assert!(
        queues
            .iter()
            .all(|q| q["groups"].as_array().unwrap().is_empty()),
        "{queues:?}"
    );
    broker.terminate();
}

/// Every flag that means nothing for --consume is refused by name, the consume flags are
/// refused without --consume, and bad values are typed errors naming the setting.
#[test]
fn bench_consume_refuses_flags_it_cannot_honour() {
    let conflicting: &[&[&str]] = &[
        &["--txn"],
        &["--txn-tick"],
        &["--idempotency-keys"],
        &["--trace"],
        &["--messages", "10"],
        &["--producers", "2"],
        &["--in-flight", "2"],
        &["--threads"],
        &["--flush", "async"],
        &["--metrics"],
    ];
    for extra in conflicting {
        let mut args = vec!["bench", "--embedded", "--consume"];
        args.extend_from_slice(extra);
        let err = run(&args).fails();
        assert!(
            err.stderr.contains("cannot be used with") && err.stderr.contains(extra[0]),
            "{extra:?}: {}",
            err.stderr
        );
    }
    let addr = [
        "bench",
        "--addr",
        "127.0.0.1:1",
        "--consume",
        "--compare-embedded",
    ];
    let err = run(&addr).fails();
    assert!(
        err.stderr.contains("cannot be used with") && err.stderr.contains("--compare-embedded"),
        "{}",
        err.stderr
    );
    for flag in ["--consumers", "--poll-max", "--prefill"] {
        let err = run(&["bench", "--embedded", flag, "4"]).fails();
        assert!(err.stderr.contains("--consume"), "{flag}: {}", err.stderr);
    }
    let bad_values: &[(&[&str], &str)] = &[
        (&["--consumers", "0"], "consumers"),
        (&["--poll-max", "0"], "poll-max"),
        (&["--prefill", "0"], "prefill"),
        (&["--seconds", "0"], "seconds"),
        (&["--rounds", "2"], "rounds"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bench");
    for (extra, setting) in bad_values {
        let mut args = vec![
            "bench",
            "--embedded",
            "--consume",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let err = run(&args).fails();
        assert!(
            err.stderr
                .contains(&format!("invalid configuration `{setting}`")),
            "{extra:?}: {}",
            err.stderr
        );
        assert!(!data.exists(), "{extra:?} was refused before any work");
    }
}
