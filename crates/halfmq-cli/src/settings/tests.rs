//! The layering, the checks and `--print-config`, without a process.

use std::time::Duration;

use clap::{FromArgMatches, Parser};

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: BrokerSettings,
}

/// Settings from flags only (the environment is left alone: tests run in parallel).
fn flags(args: &[&str]) -> Result<Resolved> {
    let m = <Cli as clap::CommandFactory>::command()
        .try_get_matches_from(std::iter::once("halfmq").chain(args.iter().copied()))
        .map_err(|e| Error::Config {
            setting: "flags",
            reason: e.to_string(),
        })?;
    let cli = Cli::from_arg_matches(&m).map_err(|e| Error::Config {
        setting: "flags",
        reason: e.to_string(),
    })?;
    cli.settings.resolve(Some(&m))
}

/// Settings from a file (and flags).
fn file(text: &str, args: &[&str]) -> Result<Resolved> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", "tempdir", e))?;
    let path = dir.path().join("halfmq.toml");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, "write", e))?;
    let path = path.to_string_lossy().into_owned();
    flags(&[&["--config", &path][..], args].concat())
}

fn setting_of(r: Result<Resolved>) -> &'static str {
    match r {
        Err(Error::Config { setting, .. }) => setting,
        Err(e) => panic!("not a config error: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn flags_win_over_the_file_and_unknown_keys_are_named() {
    let r = file(
        "listen = \"127.0.0.1:1\"\ntxn_check_max = 3\n",
        &["--listen", "127.0.0.1:2"],
    )
    .unwrap();
    assert_eq!(r.server.listen.port(), 2);
    assert_eq!(r.broker.txn.check_max, 3);
    assert_eq!(
        (
            r.source("listen"),
            r.source("txn_check_max"),
            r.source("data_dir")
        ),
        (Source::Flag, Source::File, Source::Default)
    );
    let r = file(
        "retention_bytes = 1073741824\nretention_age_ms = 3600000",
        &[],
    )
    .unwrap();
    assert_eq!(r.broker.retention.bytes_max, Some(1 << 30));
    assert_eq!(r.broker.retention.age_max, Some(Duration::from_secs(3600)));
    let r = file("dedup_keys_max = 10\ndedup_window_ms = 5000", &[]).unwrap();
    assert_eq!(
        (r.broker.dedup_keys_max, r.broker.dedup_window),
        (10, Duration::from_secs(5))
    );
    let err = file("lisen = \"x\"", &[]).unwrap_err().to_string();
    assert!(err.contains("lisen"), "{err}");
    // A value of the wrong type names its key, also when a flag overrides it.
    let err = file("txn_check_max = \"many\"", &["--txn-check-max", "4"]).unwrap_err();
    assert!(err.to_string().contains("txn_check_max"), "{err}");
}

#[test]
fn values_out_of_range_are_refused_by_the_name_of_their_setting() {
    let in_file: &[(&str, &str)] = &[
        ("retention_bytes = 1000", "retention_bytes"),
        ("retention_age_ms = 10", "retention_age_ms"),
        ("dedup_window_ms = 0", "dedup_window_ms"),
        ("flush = \"sometimes\"", "flush"),
    ];
    for (text, setting) in in_file {
        assert_eq!(setting_of(file(text, &[])), *setting, "{text}");
    }
    let as_flags: &[(&[&str], &str)] = &[
        (&["--retention-interval-ms", "1"], "retention_interval_ms"),
        (
            &["--txn-checks-in-flight-max", "0"],
            "txn_checks_in_flight_max",
        ),
        (&["--pending-bytes-max", "10"], "pending_bytes_max"),
        // A first check-back wait longer than the longest wait, both given.
        (
            &[
                "--txn-check-interval-ms",
                "600000",
                "--txn-check-backoff-max-ms",
                "1000",
            ],
            "txn_check_backoff_max_ms",
        ),
        // Room for less than one frame.
        (
            &["--frame-bytes-max", "8388608", "--out-bytes-max", "4194304"],
            "out_bytes_max",
        ),
        (&["--write-timeout-ms", "0"], "write_timeout_ms"),
        (&["--idle-timeout-ms", "0"], "idle_timeout_ms"),
    ];
    for (args, setting) in as_flags {
        assert_eq!(setting_of(flags(args)), *setting, "{args:?}");
    }
}

#[test]
fn settings_the_broker_could_not_take_before_are_set() {
    let r = flags(&[
        "--pending-bytes-max",
        "16777216",
        "--checkpoint-bytes",
        "1048576",
        "--txn-checks-in-flight-max",
        "8",
        "--txn-outcome-retention-ms",
        "60000",
        "--in-flight-max",
        "16",
        "--txn-check-answer-timeout-ms",
        "700",
        "--segment-bytes",
        "1048576",
        "--record-bytes-max",
        "65536",
        "--connections-max",
        "5",
        "--frame-bytes-max",
        "1048576",
    ])
    .unwrap();
    let (b, s) = (&r.broker, &r.server);
    assert_eq!(
        (b.store.pending_bytes_max, b.store.checkpoint_bytes),
        (16 << 20, 1 << 20)
    );
    assert_eq!(b.txn.checks_in_flight_max, 8);
    assert_eq!(b.txn.outcome_retention, Duration::from_secs(60));
    assert_eq!(b.txn.check_answer_timeout, Duration::from_millis(700));
    assert_eq!(
        (b.store.segment_bytes, b.store.record_bytes_max),
        (1 << 20, 65536)
    );
    assert_eq!(
        (s.in_flight_max, s.connections_max, s.frame_bytes_max),
        (16, 5, 1 << 20)
    );
}

#[test]
fn flush_interval_and_check_backoff_follow_the_settings_they_depend_on() {
    let r = flags(&["--flush", "async", "--flush-interval-ms", "250"]).unwrap();
    assert_eq!(
        r.broker.store.flush,
        FlushPolicy::Async {
            interval: Duration::from_millis(250)
        }
    );
    let r = file("flush_interval_ms = 250", &["--flush", "sync"]).unwrap();
    assert_eq!(r.broker.store.flush, FlushPolicy::Sync);
    assert!(r.to_toml().contains("flush_interval_ms = 250"));
    // A first check-back wait longer than the default longest wait raises the longest.
    let r = flags(&["--txn-check-interval-ms", "600000"]).unwrap();
    assert_eq!(r.broker.txn.check_backoff_max, Duration::from_secs(600));
    assert_eq!(
        r.source("txn_check_backoff_max_ms"),
        Source::Raised("txn_check_interval_ms")
    );
}

#[test]
fn print_config_shows_every_setting_and_where_it_came_from() {
    let r = file("txn_check_max = 7\n", &["--txn-timeout-ms", "1234"]).unwrap();
    let text = r.to_toml();
    let v: toml::Table = text.parse().unwrap();
    for d in SETTINGS {
        assert!(text.contains(d.key), "{} missing in\n{text}", d.key);
    }
    assert_eq!(v["txn_check_max"].as_integer(), Some(7));
    assert_eq!(v["txn_timeout_ms"].as_integer(), Some(1234));
    assert!(text.contains("# file"), "{text}");
    assert!(text.contains("# flag --txn-timeout-ms"), "{text}");
    assert!(text.contains("# retention_bytes is not set"), "{text}");
    assert!(text.contains("# token is not set"), "{text}");
    // What it prints reads back as the same settings.
    let again = file(&text, &[]).unwrap();
    assert_eq!(again.broker, r.broker);
    assert_eq!(again.to_toml().lines().count(), text.lines().count());
}

#[test]
fn optional_endpoints_are_off_by_default_and_an_address_when_set() {
    type Field = fn(&Resolved) -> Option<std::net::SocketAddr>;
    let endpoints: [(&str, Field); 2] = [
        ("metrics", |r| r.metrics),
        ("rocketmq_listen", |r| r.rocketmq),
    ];
    for (key, field) in endpoints {
        let flag = format!("--{}", key.replace('_', "-"));
        let r = flags(&[]).unwrap();
        assert_eq!(field(&r), None, "{key}");
        assert!(r.to_toml().contains(&format!("{key} = \"off\"")), "{key}");
        let set = format!("{key} = \"127.0.0.1:9100\"\n");
        let r = file(&set, &[]).unwrap();
        assert_eq!(field(&r), Some("127.0.0.1:9100".parse().unwrap()), "{key}");
        assert!(
            r.to_toml().contains(&format!("{key} = \"127.0.0.1:9100\"")),
            "{key}"
        );
        let r = file(&set, &[&flag, "off"]).unwrap();
        assert_eq!(field(&r), None, "{key}");
        assert_eq!(setting_of(flags(&[&flag, "localhost"])), key);
    }
}

#[test]
fn public_address_needs_a_token() {
    assert_eq!(setting_of(flags(&["--listen", "0.0.0.0:10911"])), "listen");
    assert_eq!(
        setting_of(flags(&["--listen", "0.0.0.0:10911", "--token", ""])),
        "listen"
    );
    let r = flags(&["--listen", "0.0.0.0:10911", "--token", "t"]).unwrap();
    assert_eq!(r.server.token.as_deref(), Some("t"));
    assert!(!r.to_toml().contains("= \"t\""));
    assert_eq!(setting_of(flags(&["--listen", "nowhere"])), "listen");
}

#[test]
fn help_shows_each_default() {
    let cmd = with_defaults_in_help(<Cli as clap::CommandFactory>::command());
    let help = cmd.clone().render_long_help().to_string();
    assert!(help.contains("[default: 6000]"), "{help}");
    assert!(help.contains("[default: 127.0.0.1:10911]"), "{help}");
    assert!(help.contains("[default: off]"), "{help}");
}

#[test]
fn network_bounds_are_settings_and_checked() {
    let r = file(
        "write_timeout_ms = 1500\n",
        &["--out-bytes-max", "8388608", "--idle-timeout-ms", "2500"],
    )
    .unwrap();
    let s = &r.server;
    assert_eq!(
        (s.out_bytes_max, s.write_timeout, s.idle_timeout),
        (
            8 << 20,
            Duration::from_millis(1500),
            Duration::from_millis(2500)
        )
    );
    assert_eq!(
        (
            r.source("out_bytes_max"),
            r.source("write_timeout_ms"),
            r.source("idle_timeout_ms")
        ),
        (Source::Flag, Source::File, Source::Flag)
    );
    let toml = r.to_toml();
    for line in [
        "out_bytes_max = 8388608",
        "write_timeout_ms = 1500",
        "idle_timeout_ms = 2500",
    ] {
        assert!(toml.contains(line), "{line} in\n{toml}");
    }
    let d = flags(&[]).unwrap();
    assert_eq!(
        (
            d.server.out_bytes_max,
            d.server.write_timeout,
            d.server.idle_timeout
        ),
        (16 << 20, Duration::from_secs(30), Duration::from_secs(600))
    );
    assert_eq!(d.source("out_bytes_max"), Source::Default);
    // Larger frames raise the default room to four of them.
    let r = flags(&["--frame-bytes-max", "8388608"]).unwrap();
    assert_eq!(r.server.out_bytes_max, 32 << 20);
    assert_eq!(r.source("out_bytes_max"), Source::Raised("frame_bytes_max"));
}

#[test]
fn peers_make_a_replicated_node_and_are_checked_against_node_id_and_listen() {
    let peers = "1=127.0.0.1:10911,2=127.0.0.1:10921,3=127.0.0.1:10931";
    let r = flags(&[]).unwrap();
    assert_eq!(r.replication, None);
    assert!(
        r.to_toml().contains("# peers is not set"),
        "{}",
        r.to_toml()
    );
    let node = [
        "--node-id",
        "1",
        "--peers",
        peers,
        "--listen",
        "127.0.0.1:10911",
    ];
    let r = flags(&node).unwrap();
    let rep = r.replication.clone().expect("replicated");
    assert_eq!(rep.node_id, 1);
    assert_eq!(rep.peers.len(), 3);
    assert_eq!(rep.peers[&3], "127.0.0.1:10931");
    let shown = r.to_toml();
    assert!(shown.contains(&format!("peers = \"{peers}\"")), "{shown}");
    assert!(shown.contains("node_id = 1"), "{shown}");
    // The same from a file.
    let text = format!("node_id = 2\npeers = \"{peers}\"\nlisten = \"127.0.0.1:10921\"\n");
    assert_eq!(file(&text, &[]).unwrap().replication.unwrap().node_id, 2);

    let bad: [&[&str]; 6] = [
        &["--node-id", "1"],
        &["--peers", peers, "--listen", "127.0.0.1:10911"],
        &[
            "--node-id",
            "4",
            "--peers",
            peers,
            "--listen",
            "127.0.0.1:10911",
        ],
        &[
            "--node-id",
            "2",
            "--peers",
            peers,
            "--listen",
            "127.0.0.1:10911",
        ],
        &[
            "--node-id",
            "1",
            "--peers",
            "1=127.0.0.1:10911,1=127.0.0.1:10921",
        ],
        &["--node-id", "1", "--peers", "1=localhost"],
    ];
    let expect = ["node_id", "node_id", "node_id", "peers", "peers", "peers"];
    for (args, setting) in bad.iter().zip(expect) {
        assert_eq!(setting_of(flags(args)), setting, "{args:?}");
    }
}
