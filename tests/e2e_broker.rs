//! The network broker end to end: every test runs the real `halfmq` binary as child
//! processes (a broker on a free loopback port and a temporary data directory, and the CLI
//! commands as its clients) and checks what a user would see. It proves that produced
//! messages are consumed exactly once per group across a clean restart; that a transaction
//! whose producer crashed is committed through a `txn checker` check-back, and that one
//! nobody answers becomes unresolved, survives a restart and can be committed by hand; that
//! malformed input of every kind gets an error frame and closes only that connection while
//! the broker keeps serving; that the token is enforced (and required off loopback); that
//! settings merge as flags over environment over file; and that the JSON of `topics` and
//! `stats` is usable; and that `--rocketmq-listen` serves the same broker to RocketMQ 5
//! clients. `kill -9` of the broker under load is `tests/kill9.rs`. The process
//! helpers are in `tests/common/mod.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use halfmq::{CheckAnswer, TxnState};
use halfmq_client::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES};
use halfmq_client::protocol::{self, codes, Push, Request, Response, WireMessage};
use serde_json::Value;

mod common;

use common::*;

// ---------------------------------------------------------------------------------------
// CLI shorthands
// ---------------------------------------------------------------------------------------

fn produce(addr: &str, topic: &str, prefix: &str, count: u64) -> Vec<Value> {
    let count = count.to_string();
    let args = [
        "produce",
        "--addr",
        addr,
        "--topic",
        topic,
        "--key-prefix",
        prefix,
        "--count",
        &count,
        "--json",
    ];
    run(&args).ok().json_lines()
}

fn consume(addr: &str, topic: &str, group: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "consume", "--addr", addr, "--topic", topic, "--group", group, "--json",
    ];
    args.extend_from_slice(extra);
    run(&args).ok().json_lines()
}

fn produce_one_works(addr: &str, after: &str) {
    let r = run(&[
        "produce", "--addr", addr, "--topic", "alive", "--count", "1", "--json",
    ]);
    assert!(
        r.status.success(),
        "the broker stopped serving after {after}: {}",
        r.stderr
    );
    assert_eq!(r.json_lines().len(), 1, "after {after}");
}

fn s(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string {field} in {v}"))
        .to_owned()
}

/// (queue, offset) of a produce or consume line.
fn pos(v: &Value) -> (u64, u64) {
    (n(v, "queue"), n(v, "offset"))
}

// ---------------------------------------------------------------------------------------
// Raw protocol connections
// ---------------------------------------------------------------------------------------

/// Recompute the CRC after editing a frame's bytes, so that only the edit is wrong.
fn reseal(mut f: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&f[8..]);
    f[4..8].copy_from_slice(&crc.to_le_bytes());
    f
}

/// `f` with byte `at` set to `v`, resealed.
fn edited(f: &[u8], at: usize, v: u8) -> Vec<u8> {
    let mut f = f.to_vec();
    f[at] = v;
    reseal(f)
}

fn hello(token: Option<&str>) -> Request {
    Request::Hello {
        client: "e2e-raw".into(),
        token: token.map(str::to_owned),
    }
}

enum Got {
    Frame(frame::Frame),
    /// The broker closed the connection (EOF).
    Closed,
    /// The connection was reset.
    Reset,
    /// Nothing within the time given.
    Silent,
}

/// One TCP connection speaking frames by hand.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    next_id: u64,
    pushes: Vec<(u64, Push)>,
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            buf: Vec::new(),
            next_id: 1000,
            pushes: Vec::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn send(&mut self, correlation: u64, req: &Request) {
        self.write(&request_frame(correlation, req));
    }

    fn next(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Some(len) = frame::check(&self.buf, FRAME_BYTES_MAX_DEFAULT)
                .expect("the broker sent a frame with a bad length")
            {
                let f = frame::parse(&self.buf[..len]).expect("the broker sent a bad frame");
                self.buf.drain(..len);
                return Got::Frame(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Silent;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            match self.s.read(&mut chunk) {
                Ok(0) => return Got::Closed,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Got::Reset,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Send `req` and return the response with its correlation id (pushes met on the way
    /// are kept in `pushes`).
    fn call(&mut self, req: &Request) -> Response {
        self.next_id += 1;
        let id = self.next_id;
        self.send(id, req);
        loop {
            match self.next(Duration::from_secs(30)) {
                Got::Frame(f) if f.kind == FrameKind::Push => {
                    self.pushes
                        .push((f.correlation, protocol::decode(&f.body).unwrap()));
                }
                Got::Frame(f) => {
                    assert_eq!(f.kind, FrameKind::Response);
                    assert_eq!(f.correlation, id, "a response to another request");
                    return protocol::decode(&f.body).unwrap();
                }
                Got::Closed | Got::Reset => panic!("connection closed while waiting for {req:?}"),
                Got::Silent => panic!("no answer to {req:?}"),
            }
        }
    }

    fn hello(&mut self, token: Option<&str>) {
        match self.call(&hello(token)) {
            Response::Hello { server } => assert!(server.starts_with("halfmq "), "{server}"),
            other => panic!("handshake answered with {other:?}"),
        }
    }

    /// Every response until the broker closes the connection; panics if it stays open.
    fn responses_until_closed(&mut self) -> Vec<(u64, Response)> {
        let mut got = Vec::new();
        loop {
            match self.next(Duration::from_secs(10)) {
                Got::Frame(f) => {
                    assert_eq!(f.kind, FrameKind::Response, "only responses expected");
                    got.push((f.correlation, protocol::decode(&f.body).unwrap()));
                }
                Got::Closed => return got,
                Got::Reset => panic!("connection reset (responses so far: {got:?})"),
                Got::Silent => panic!("the broker kept the connection open: {got:?}"),
            }
        }
    }

    /// The broker answers with exactly one error frame (correlation `correlation`, `code`,
    /// a message containing `contains`) and closes the connection.
    fn expect_error_and_close(&mut self, correlation: u64, code: u16, contains: &str, case: &str) {
        let got = self.responses_until_closed();
        match got.as_slice() {
            [(c, Response::Error { code: k, message })] => {
                assert_eq!(
                    (*c, *k),
                    (correlation, code),
                    "{case}: correlation and code ({message})"
                );
                assert!(
                    message.contains(contains),
                    "{case}: error message {message:?} should mention {contains:?}"
                );
            }
            other => panic!("{case}: expected one error frame then close, got {other:?}"),
        }
    }

    /// Nothing arrives and the connection stays open for `d`.
    fn assert_silent_for(&mut self, d: Duration, what: &str) {
        match self.next(d) {
            Got::Silent => {}
            Got::Frame(f) => panic!("{what}: unexpected frame {f:?}"),
            Got::Closed | Got::Reset => panic!("{what}: the connection was closed"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// 200 produced, 100 consumed and acked, clean restart, the other 100 come: none twice.
#[test]
fn produce_consume_ack_and_restart() {
    let mut broker = BrokerProc::fresh(&[]);
    let produced = produce(&broker.addr, "t", "p", 200);
    assert_eq!(produced.len(), 200);
    let mut at: HashMap<(u64, u64), String> = HashMap::new();
    for (i, v) in produced.iter().enumerate() {
        assert_eq!(s(v, "key"), format!("p-{i}"));
        assert_eq!(s(v, "topic"), "t");
        assert!(
            at.insert(pos(v), s(v, "key")).is_none(),
            "two messages acknowledged at {:?}",
            pos(v)
        );
    }
    let check = |lines: &[Value]| -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for v in lines {
            let key = s(v, "key");
            assert_eq!(
                at.get(&pos(v)),
                Some(&key),
                "{v} is not where it was stored"
            );
            let i: usize = key.strip_prefix("p-").unwrap().parse().unwrap();
            let body = format!("message {i}");
            assert_eq!(n(v, "body_len"), body.len() as u64, "{v}");
            assert_eq!(
                n(v, "body_crc32"),
                u64::from(crc32fast::hash(body.as_bytes()))
            );
            assert!(keys.insert(key), "{v} delivered twice");
        }
        keys
    };

    let first = consume(&broker.addr, "t", "g", &["--max", "100"]);
    assert_eq!(first.len(), 100);
    let first = check(&first);

    broker.terminate();
    let broker = broker.restart();
    let rest = consume(&broker.addr, "t", "g", &["--idle-exit-ms", "1000"]);
    assert_eq!(
        rest.len(),
        100,
        "exactly the 100 not consumed before the restart"
    );
    let rest = check(&rest);
    assert!(first.is_disjoint(&rest), "acked messages delivered again");
    assert_eq!(first.len() + rest.len(), 200);

    // The group's backlog is zero everywhere, and nothing more comes.
    let stats: Value = serde_json::from_str(
        &run(&["stats", "--addr", &broker.addr, "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    let queues = stats["queues"].as_array().unwrap();
    let mut messages = 0;
    for q in queues.iter().filter(|q| q["topic"] == "t") {
        messages += n(q, "messages");
        let g = q["groups"].as_array().unwrap();
        if n(q, "messages") > 0 {
            assert_eq!(g.len(), 1, "{q}");
            assert_eq!(
                (s(&g[0], "group"), n(&g[0], "backlog")),
                ("g".to_owned(), 0)
            );
        }
    }
    assert_eq!(messages, 200);
    assert!(consume(&broker.addr, "t", "g", &["--idle-exit-ms", "300"]).is_empty());
}

/// `halfmq ... | head -1`: a command whose standard output is a closed pipe ends as a
/// closed pipe ends any command (exit 141, as by SIGPIPE), not with a panic, and a consumer
/// acks nothing it could not print: the message it could not print is still un-acked.
#[test]
fn a_closed_standard_output_ends_a_command_quietly_and_a_consumer_acks_nothing_unprinted() {
    let broker = BrokerProc::fresh(&[]);
    let a = broker.addr.as_str();
    assert_eq!(produce(a, "piped", "p", 3).len(), 3);
    let closed = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let out = halfmq_cmd(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run halfmq");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
    };
    closed(&["trace", "--addr", a, "p-1"]);
    closed(&["stats", "--addr", a]);
    closed(&["topics", "list", "--addr", a, "--json"]);
    closed(&[
        "consume", "--addr", a, "--topic", "piped", "--group", "g", "--max", "1",
    ]);
    // The consumer was ended before its ack: the group's backlog still counts all three.
    let stats: Value = serde_json::from_str(&run(&["stats", "--addr", a, "--json"]).ok().stdout)
        .expect("stats --json is one JSON value");
    let backlog: u64 = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["topic"] == "piped")
        .flat_map(|q| q["groups"].as_array().unwrap().iter())
        .map(|g| n(g, "backlog"))
        .sum();
    assert_eq!(backlog, 3, "{stats}");
}

fn txn_begin(addr: &str, key: &str) -> u64 {
    let out = run(&[
        "txn", "begin", "--addr", addr, "--topic", "pay", "--key", key, "--group", "pay-svc",
        "--body", "paid", "--json",
    ])
    .ok()
    .json_lines();
    assert_eq!(out.len(), 1);
    assert_eq!(s(&out[0], "key"), key);
    n(&out[0], "txn_id")
}

/// A half message whose producer "crashed" is invisible, then committed by the answer of a
/// `halfmq txn checker`; afterwards commit is a no-op and rollback is refused.
#[test]
fn crashed_producer_is_resolved_by_the_checker() {
    let broker = BrokerProc::fresh(&fast_check_back("50"));
    let a = broker.addr.as_str();

    let txn = txn_begin(a, "order-1");
    assert!(
        consume(a, "pay", "orders", &["--idle-exit-ms", "500"]).is_empty(),
        "a half message must be invisible"
    );
    let listed = run(&["txn", "list", "--addr", a, "--json"])
        .ok()
        .json_lines();
    assert_eq!(listed.len(), 1);
    assert_eq!(n(&listed[0], "txn_id"), txn);
    assert_eq!(s(&listed[0], "state"), "Pending");

    let checker = Proc::spawn(
        "checker",
        halfmq_cmd(&[
            "txn", "checker", "--addr", a, "--group", "pay-svc", "--answer", "commit",
        ]),
    );
    assert!(
        checker
            .wait_line(|l| l.contains("answering"), Duration::from_secs(30))
            .is_some(),
        "the checker did not start: {}",
        checker.stderr()
    );

    let mut seen = Vec::new();
    eventually(Duration::from_secs(15), "the checker's commit", || {
        seen.extend(consume(a, "pay", "orders", &["--idle-exit-ms", "500"]));
        (!seen.is_empty()).then_some(())
    });
    seen.extend(consume(a, "pay", "orders", &["--idle-exit-ms", "500"]));
    assert_eq!(seen.len(), 1, "exactly one message: {seen:?}");
    assert_eq!(s(&seen[0], "key"), "order-1");
    assert_eq!(n(&seen[0], "body_len"), 4);
    assert!(
        checker.stderr().contains("check-back for transaction"),
        "the checker was asked: {}",
        checker.stderr()
    );

    assert!(run(&["txn", "list", "--addr", a, "--json"])
        .ok()
        .json_lines()
        .is_empty());
    let txn_s = txn.to_string();
    run(&["txn", "commit", "--addr", a, &txn_s]).ok();
    let r = run(&["txn", "rollback", "--addr", a, &txn_s]).fails();
    assert!(r.stderr.contains("committed"), "{}", r.stderr);
    // The no-op commit did not make it visible twice.
    assert!(consume(a, "pay", "orders", &["--idle-exit-ms", "300"]).is_empty());
    drop(checker);
}

/// Nobody answers: after check_max checks the transaction is unresolved, listed and counted;
/// it survives a restart and a commit by hand makes it visible once.
#[test]
fn unanswered_transaction_becomes_unresolved_and_survives_restart() {
    let mut broker = BrokerProc::fresh(&fast_check_back("2"));

    let txn = txn_begin(&broker.addr, "order-2");
    let unresolved = |addr: &str| {
        run(&[
            "txn",
            "list",
            "--addr",
            addr,
            "--state",
            "unresolved",
            "--json",
        ])
        .ok()
        .json_lines()
    };
    let info = eventually(Duration::from_secs(15), "unresolved", || {
        unresolved(&broker.addr).into_iter().next()
    });
    assert_eq!(n(&info, "txn_id"), txn);
    assert_eq!(s(&info, "state"), "Unresolved");
    assert_eq!(n(&info, "checks"), 2);
    assert_eq!(s(&info, "producer_group"), "pay-svc");
    assert!(info["last_answer"].is_string(), "{info}");
    let stats: Value = serde_json::from_str(
        &run(&["stats", "--addr", &broker.addr, "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(
        (n(&stats, "txn_pending"), n(&stats, "txn_unresolved")),
        (0, 1)
    );
    assert!(consume(&broker.addr, "pay", "orders", &["--idle-exit-ms", "300"]).is_empty());

    broker.terminate();
    let broker = broker.restart();
    let after = unresolved(&broker.addr);
    assert_eq!(after.len(), 1, "unresolved after the restart: {after:?}");
    assert_eq!(n(&after[0], "txn_id"), txn);

    run(&["txn", "commit", "--addr", &broker.addr, &txn.to_string()]).ok();
    let got = eventually(Duration::from_secs(10), "the commit by hand", || {
        let got = consume(&broker.addr, "pay", "orders", &["--idle-exit-ms", "500"]);
        (!got.is_empty()).then_some(got)
    });
    assert_eq!(got.len(), 1);
    assert_eq!(s(&got[0], "key"), "order-2");
    assert!(run(&["txn", "list", "--addr", &broker.addr, "--json"])
        .ok()
        .json_lines()
        .is_empty());
    assert!(consume(&broker.addr, "pay", "orders", &["--idle-exit-ms", "300"]).is_empty());
}

/// Bad input of every kind gets an error frame (where the broker can still answer) and
/// closes that one connection; other connections and new clients are served throughout.
#[test]
fn malformed_input_closes_only_that_connection() {
    let broker = BrokerProc::fresh(&[]);
    let a = broker.addr.as_str();
    let bystander = {
        let mut r = Raw::connect(a);
        r.hello(None);
        r
    };
    let list = request_frame(5, &Request::ListTopics);

    struct Case {
        name: String,
        bytes: Vec<u8>,
        /// Shut our sending side down after the bytes (the broker sees EOF).
        half_close: bool,
        /// Text the error message must contain.
        contains: &'static str,
    }
    let case = |name: &str, bytes: Vec<u8>, half_close: bool, contains: &'static str| Case {
        name: name.to_owned(),
        bytes,
        half_close,
        contains,
    };
    let mut cases = vec![
        case(
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: halfmq\r\n\r\n".to_vec(),
            false,
            "frame length",
        ),
        case(
            "bad CRC",
            {
                let mut f = list.clone();
                let last = f.len() - 1;
                f[last] ^= 0x01;
                f
            },
            false,
            "CRC mismatch",
        ),
        case(
            "length u32::MAX, nothing else sent",
            u32::MAX.to_le_bytes().to_vec(),
            false,
            "outside",
        ),
        case(
            "length one over the 4 MiB maximum",
            (FRAME_BYTES_MAX_DEFAULT + 1).to_le_bytes().to_vec(),
            false,
            "outside",
        ),
        case(
            "length shorter than a header",
            [
                (FRAME_HEADER_BYTES as u32 - 1).to_le_bytes().as_slice(),
                &[0u8; 19],
            ]
            .concat(),
            false,
            "outside",
        ),
        case(
            "truncated header, then close",
            list[..10].to_vec(),
            true,
            "middle of a frame",
        ),
        case(
            "truncated body, then close",
            list[..list.len() - 1].to_vec(),
            true,
            "middle of a frame",
        ),
        case(
            "unknown protocol version",
            edited(&list, 8, 2),
            false,
            "protocol version 2",
        ),
        case(
            "unknown frame kind",
            edited(&list, 9, 9),
            false,
            "unknown frame kind 9",
        ),
        case(
            "a Response frame from a client",
            frame_of(
                FrameKind::Response,
                5,
                &protocol::encode(&Response::Ok).unwrap(),
            ),
            false,
            "may not send Response",
        ),
        case(
            "a Push frame from a client",
            frame_of(FrameKind::Push, 5, &[]),
            false,
            "may not send Push",
        ),
        case(
            "a body that is not a Request",
            frame_of(FrameKind::Request, 5, &[200, 1, 2, 3]),
            false,
            "protocol message",
        ),
        case(
            "an empty body",
            frame_of(FrameKind::Request, 5, &[]),
            false,
            "protocol message",
        ),
        case(
            "a Request with trailing bytes",
            frame_of(
                FrameKind::Request,
                5,
                &[protocol::encode(&Request::ListTopics).unwrap(), vec![0]].concat(),
            ),
            false,
            "trailing bytes",
        ),
    ];
    // Random bytes: whatever the length prefix says, the broker must answer BAD_FRAME (too
    // long or short at once; a CRC mismatch; or the close in the middle of a frame).
    for seed in 1..=6u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let len = rng.usize(1..2000);
        let bytes = (0..len).map(|_| rng.u8(..)).collect();
        cases.push(case(
            &format!("random bytes (seed {seed})"),
            bytes,
            true,
            "",
        ));
    }

    for c in &cases {
        for after_hello in [false, true] {
            let name = format!(
                "{} ({} Hello)",
                c.name,
                if after_hello { "after" } else { "before" }
            );
            let mut r = Raw::connect(a);
            if after_hello {
                r.hello(None);
            }
            r.write(&c.bytes);
            if c.half_close {
                r.s.shutdown(Shutdown::Write).unwrap();
            }
            r.expect_error_and_close(0, codes::BAD_FRAME, c.contains, &name);
            produce_one_works(a, &name);
        }
    }

    // A request before Hello: UNAUTHORIZED with the request's correlation id, then close.
    let mut r = Raw::connect(a);
    r.send(77, &Request::ListTopics);
    r.expect_error_and_close(77, codes::UNAUTHORIZED, "Hello", "ListTopics before Hello");
    let mut r = Raw::connect(a);
    r.send(
        78,
        &Request::Send {
            topic: "sneaky".into(),
            message: WireMessage {
                key: "k".into(),
                body: b"x".to_vec(),
                properties: BTreeMap::new(),
            },
        },
    );
    r.expect_error_and_close(78, codes::UNAUTHORIZED, "Hello", "Send before Hello");
    produce_one_works(a, "requests before Hello");
    let topics = run(&["topics", "list", "--addr", a, "--json"])
        .ok()
        .json_lines();
    assert!(
        topics.iter().all(|t| t["name"] != "sneaky"),
        "a Send before Hello was carried out: {topics:?}"
    );

    // The connection that behaved was never disturbed.
    let mut bystander = bystander;
    assert!(matches!(
        bystander.call(&Request::ListTopics),
        Response::Topics(_)
    ));
    drop(broker);
}

/// A client that stops in the middle of a frame holds only its own connection: others are
/// served meanwhile, and the frame completes when the rest arrives. (The 30 s frame time-out
/// itself is not tested: no flag or config key sets it shorter.)
#[test]
fn a_stalled_client_does_not_block_others() {
    let broker = BrokerProc::fresh(&[]);
    let a = broker.addr.as_str();
    let mut stalled = Raw::connect(a);
    stalled.hello(None);
    let f = request_frame(5, &Request::ListTopics);
    stalled.write(&f[..10]);
    stalled.assert_silent_for(Duration::from_millis(300), "half a frame");

    produce_one_works(a, "a stalled client");
    let mut other = Raw::connect(a);
    other.hello(None);
    match other.call(&Request::ListTopics) {
        Response::Topics(t) => assert!(t.iter().any(|(name, _)| name == "alive"), "{t:?}"),
        r => panic!("{r:?}"),
    }

    stalled.write(&f[10..]);
    match stalled.next(Duration::from_secs(10)) {
        Got::Frame(fr) => {
            assert_eq!((fr.kind, fr.correlation), (FrameKind::Response, 5));
            let resp: Response = protocol::decode(&fr.body).unwrap();
            assert!(matches!(resp, Response::Topics(_)), "{resp:?}");
        }
        _ => panic!("no answer once the frame was complete"),
    }
    // Stall again and walk away: the broker must not mind.
    stalled.write(&f[..10]);
    drop(stalled);
    produce_one_works(a, "a client that left mid-frame");
}

/// Many requests in one write, answered by correlation id (in any order); request errors
/// keep the connection open; a check-back Push answered by hand with CheckAnswer commits.
#[test]
fn raw_protocol_pipelining_errors_and_check_back() {
    let broker = BrokerProc::fresh(&fast_check_back("50"));
    let a = broker.addr.as_str();

    let mut c = Raw::connect(a);
    let msg = |key: &str| WireMessage {
        key: key.into(),
        body: b"raw body".to_vec(),
        properties: BTreeMap::from([("origin".to_owned(), "e2e".to_owned())]),
    };
    let batch = [
        (1, hello(None)),
        (7, Request::ListTopics),
        (
            42,
            Request::Send {
                topic: "raw".into(),
                message: msg("a"),
            },
        ),
        (3, Request::Stats),
        (11, Request::TxnState { txn: 123_456_789 }),
    ];
    let mut bytes = Vec::new();
    for (id, req) in &batch {
        bytes.extend(request_frame(*id, req));
    }
    c.write(&bytes);
    let mut answers: BTreeMap<u64, Response> = BTreeMap::new();
    while answers.len() < batch.len() {
        match c.next(Duration::from_secs(30)) {
            Got::Frame(f) => {
                assert_eq!(f.kind, FrameKind::Response);
                let r = protocol::decode(&f.body).unwrap();
                assert!(answers.insert(f.correlation, r).is_none(), "two answers");
            }
            _ => panic!("pipelined requests not all answered: {answers:?}"),
        }
    }
    assert!(
        matches!(&answers[&1], Response::Hello { .. }),
        "{answers:?}"
    );
    assert!(matches!(&answers[&7], Response::Topics(_)), "{answers:?}");
    assert!(
        matches!(&answers[&42], Response::Sent { topic, .. } if topic == "raw"),
        "{answers:?}"
    );
    match &answers[&3] {
        Response::Stats(json) => {
            let v: Value = serde_json::from_str(json).unwrap();
            assert!(
                v["txn_pending"].is_u64() && v["txn_unresolved"].is_u64(),
                "{v}"
            );
        }
        r => panic!("{r:?}"),
    }
    assert!(
        matches!(&answers[&11], Response::Error { code: 15, .. }),
        "unknown transaction: {answers:?}"
    );

    // Request errors are answers, not reasons to close.
    let r = c.call(&Request::Ack {
        group: "g".into(),
        topic: "raw".into(),
        acks: vec![(99, 0)],
    });
    assert!(matches!(r, Response::Error { code: 12, .. }), "{r:?}");
    let r = c.call(&Request::CreateTopic {
        name: "raw".into(),
        queues: 2,
    });
    assert!(matches!(r, Response::Error { code: 9, .. }), "{r:?}");
    let r = c.call(&Request::Send {
        topic: "no spaces allowed".into(),
        message: msg("b"),
    });
    assert!(matches!(r, Response::Error { code: 11, .. }), "{r:?}");
    // A CheckAnswer for no check gets no response at all.
    c.send(
        500,
        &Request::CheckAnswer {
            check: 999,
            answer: CheckAnswer::Commit,
        },
    );
    c.assert_silent_for(Duration::from_millis(300), "CheckAnswer for no check");
    assert!(matches!(c.call(&Request::ListTopics), Response::Topics(_)));

    // Check-back by hand: register, write a half on another connection, get the Push,
    // answer it.
    let mut checker = Raw::connect(a);
    checker.hello(None);
    let r = checker.call(&Request::RegisterChecker {
        producer_group: "raw-svc".into(),
    });
    assert_eq!(r, Response::Ok);
    let txn = match c.call(&Request::SendHalf {
        topic: "rawpay".into(),
        message: msg("order-9"),
        producer_group: "raw-svc".into(),
        check_immunity_ms: 0,
    }) {
        Response::HalfSent { txn, .. } => txn,
        r => panic!("{r:?}"),
    };
    assert_eq!(
        c.call(&Request::TxnState { txn }),
        Response::TxnState(TxnState::Pending)
    );
    let (push_id, push) = match checker.next(Duration::from_secs(15)) {
        Got::Frame(f) => {
            assert_eq!(f.kind, FrameKind::Push);
            (f.correlation, protocol::decode::<Push>(&f.body).unwrap())
        }
        _ => panic!("no check-back push"),
    };
    let Push::Check {
        txn: t,
        topic,
        producer_group,
        message,
        created_ms,
        checks,
    } = push;
    assert_eq!(
        (t, topic.as_str(), producer_group.as_str(), checks),
        (txn, "rawpay", "raw-svc", 0)
    );
    assert_eq!(
        message,
        msg("order-9"),
        "the half message, user properties included"
    );
    assert!(created_ms > 0);
    checker.send(
        1,
        &Request::CheckAnswer {
            check: push_id,
            answer: CheckAnswer::Commit,
        },
    );
    let got = eventually(Duration::from_secs(10), "the answered commit", || {
        match c.call(&Request::Poll {
            group: "raw-g".into(),
            topic: "rawpay".into(),
            max: 10,
            wait_ms: 1000,
        }) {
            Response::Messages(m) if !m.is_empty() => Some(m),
            Response::Messages(_) => None,
            r => panic!("{r:?}"),
        }
    });
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.key, "order-9");
    assert_eq!(got[0].message.body, b"raw body");
    assert_eq!(
        c.call(&Request::TxnState { txn }),
        Response::TxnState(TxnState::Committed)
    );
    let acks = vec![(got[0].queue, got[0].offset)];
    let r = c.call(&Request::Ack {
        group: "raw-g".into(),
        topic: "rawpay".into(),
        acks,
    });
    assert_eq!(r, Response::Ok);
    // The CheckAnswer itself is not answered.
    checker.assert_silent_for(Duration::from_millis(300), "after CheckAnswer");
    drop(broker);
}

/// With a token, clients must present it (flag or HALFMQ_TOKEN); off loopback a broker
/// without a token refuses to start.
#[test]
fn token_is_required_when_set_and_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProc::start(dir.path(), &["--token", "s3cret"]);
    let a = broker.addr.as_str();
    let base = [
        "produce", "--addr", a, "--topic", "sec", "--count", "1", "--json",
    ];

    let r = run(&base).fails();
    assert!(r.stderr.contains("broker error 100"), "{}", r.stderr);
    let r = run(&[&base[..], &["--token", "wrong!"]].concat()).fails();
    assert!(r.stderr.contains("broker error 100"), "{}", r.stderr);
    let r = run(&[&base[..], &["--token", "s3cre"]].concat()).fails();
    assert!(r.stderr.contains("broker error 100"), "{}", r.stderr);
    assert_eq!(
        run(&[&base[..], &["--token", "s3cret"]].concat())
            .ok()
            .json_lines()
            .len(),
        1
    );
    assert_eq!(
        run_env(&base, &[("HALFMQ_TOKEN", "s3cret")])
            .ok()
            .json_lines()
            .len(),
        1
    );

    // By hand: a Hello with a wrong token or none is refused and the connection closed.
    for token in [None, Some("s3cre"), Some("s3creT")] {
        let mut r = Raw::connect(a);
        r.send(9, &hello(token));
        r.expect_error_and_close(9, codes::UNAUTHORIZED, "token", "a wrong token");
    }
    let mut r = Raw::connect(a);
    r.hello(Some("s3cret"));
    assert!(matches!(r.call(&Request::ListTopics), Response::Topics(_)));
    drop(broker);

    // Off loopback without a token (or with an empty one): refused at once.
    let port = free_port().to_string();
    let public = format!("0.0.0.0:{port}");
    let data = dir.path().join("public");
    let data = data.to_str().unwrap();
    for extra in [&[][..], &["--token", ""][..]] {
        let started = Instant::now();
        let r = run(&[
            &["broker", "--data-dir", data, "--listen", &public][..],
            extra,
        ]
        .concat())
        .fails();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "it should refuse at once"
        );
        assert!(r.stderr.contains("token"), "{}", r.stderr);
        assert!(!r.stdout.contains("listening on"), "{}", r.stdout);
    }
}

/// `--print-config`: flags over environment over file, the token is not printed; an unknown
/// key in the file is named.
#[test]
fn print_config_merges_flags_env_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("halfmq.toml");
    std::fs::write(
        &file,
        "txn_check_max = 7\ntxn_timeout_ms = 1111\ntxn_check_interval_ms = 2222\n\
         connections_max = 33\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let r = run_env(
        &[
            "broker",
            "--print-config",
            "--config",
            f,
            "--txn-check-interval-ms",
            "4444",
        ],
        &[
            ("HALFMQ_TXN_TIMEOUT_MS", "1234"),
            ("HALFMQ_TXN_CHECK_INTERVAL_MS", "3333"),
            ("HALFMQ_TOKEN", "do-not-print-me"),
        ],
    )
    .ok();
    let v: toml::Value = toml::from_str(&r.stdout).expect("--print-config prints TOML");
    let int = |k: &str| {
        v.get(k)
            .and_then(toml::Value::as_integer)
            .unwrap_or_else(|| panic!("no {k} in\n{}", r.stdout))
    };
    assert_eq!(int("txn_check_max"), 7, "from the file");
    assert_eq!(int("connections_max"), 33, "from the file");
    assert_eq!(int("txn_timeout_ms"), 1234, "the environment over the file");
    assert_eq!(int("txn_check_interval_ms"), 4444, "the flag over both");
    assert_eq!(
        int("frame_bytes_max"),
        i64::from(FRAME_BYTES_MAX_DEFAULT),
        "default"
    );
    assert_eq!(v["listen"].as_str(), Some("127.0.0.1:10911"), "default");
    assert!(!r.stdout.contains("do-not-print-me"), "{}", r.stdout);
    assert_eq!(v["token"].as_str(), Some("(set)"));
    // Each line says where its value came from; settings that had no flag or variable
    // before have both now.
    let line = |k: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{k} = ")))
            .unwrap_or_else(|| panic!("no {k} in\n{}", r.stdout))
    };
    assert!(line("txn_check_max").ends_with("# file"), "{}", r.stdout);
    assert!(
        line("txn_timeout_ms").ends_with("# env HALFMQ_TXN_TIMEOUT_MS"),
        "{}",
        r.stdout
    );
    assert!(
        line("txn_check_interval_ms").ends_with("# flag --txn-check-interval-ms"),
        "{}",
        r.stdout
    );
    assert!(
        line("frame_bytes_max").ends_with("# default"),
        "{}",
        r.stdout
    );
    let r = run_env(
        &["broker", "--print-config", "--checkpoint-bytes", "1048576"],
        &[
            ("HALFMQ_IN_FLIGHT_MAX", "7"),
            ("HALFMQ_TXN_OUTCOME_RETENTION_MS", "60000"),
        ],
    )
    .ok();
    for expected in [
        "checkpoint_bytes = 1048576",
        "in_flight_max = 7",
        "txn_outcome_retention_ms = 60000",
        "pending_bytes_max = 8388608",
        "txn_checks_in_flight_max = 64",
    ] {
        assert!(r.stdout.contains(expected), "{expected} in\n{}", r.stdout);
    }

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "txn_check_max = 7\ntxn_check_maxx = 3\n").unwrap();
    let r = run(&[
        "broker",
        "--print-config",
        "--config",
        bad.to_str().unwrap(),
    ])
    .fails();
    assert!(r.stderr.contains("txn_check_maxx"), "{}", r.stderr);
}

/// `connections_max` (a config-file setting): one connection too many gets a
/// TOO_MANY_CONNECTIONS error frame and is closed; a slot that frees up is used again.
#[test]
fn connections_over_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("halfmq.toml");
    std::fs::write(&file, "connections_max = 2\n").unwrap();
    let broker = BrokerProc::start(
        &dir.path().join("data"),
        &["--config", file.to_str().unwrap()],
    );
    let a = broker.addr.as_str();
    let mut one = Raw::connect(a);
    one.hello(None);
    let mut two = Raw::connect(a);
    two.hello(None);
    let mut three = Raw::connect(a);
    three.expect_error_and_close(
        0,
        codes::TOO_MANY_CONNECTIONS,
        "too many connections",
        "a third connection",
    );
    run(&["topics", "list", "--addr", a]).fails();
    drop(one);
    eventually(Duration::from_secs(10), "a freed connection slot", || {
        run(&["topics", "list", "--addr", a])
            .status
            .success()
            .then_some(())
    });
    assert!(matches!(
        two.call(&Request::ListTopics),
        Response::Topics(_)
    ));
}

/// `topics create/list --json` and `stats --json`.
#[test]
fn topics_and_stats_as_json() {
    let broker = BrokerProc::fresh(&[]);
    let a = broker.addr.as_str();
    run(&["topics", "create", "--addr", a, "orders", "--queues", "3"]).ok();
    run(&["topics", "create", "--addr", a, "orders", "--queues", "3"]).ok();
    let r = run(&["topics", "create", "--addr", a, "orders", "--queues", "5"]).fails();
    // A broker error is its own variant on the client: printed as the broker prints it.
    assert!(
        r.stderr
            .contains("topic `orders` exists with 3 queues, not 5"),
        "{}",
        r.stderr
    );
    let topics = run(&["topics", "list", "--addr", a, "--json"])
        .ok()
        .json_lines();
    assert_eq!(
        topics,
        vec![serde_json::json!({"name": "orders", "queues": 3})]
    );

    assert_eq!(produce(a, "orders", "o", 5).len(), 5);
    txn_begin(a, "order-3");
    let stats = run(&["stats", "--addr", a, "--json"]).ok();
    let v: Value = serde_json::from_str(&stats.stdout).expect("stats --json is one JSON value");
    assert_eq!((n(&v, "txn_pending"), n(&v, "txn_unresolved")), (1, 0));
    assert!(n(&v["log"], "durable_offset") > 0, "{v}");
    let orders: Vec<&Value> = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["topic"] == "orders")
        .collect();
    assert_eq!(orders.len(), 3, "{v}");
    assert_eq!(orders.iter().map(|q| n(q, "messages")).sum::<u64>(), 5);
    // Retention: off by default; a pass deletes nothing and says what pins the log (here
    // the checkpoint written at open, the oldest of the pending half, the un-consumed topic
    // and itself).
    let r: Value = serde_json::from_str(&run(&["retention", "--addr", a, "--json"]).ok().stdout)
        .expect("retention --json is one JSON value");
    assert_eq!(r["disabled"], true, "{r}");
    assert_eq!(n(&r, "segments_deleted"), 0, "{r}");
    assert!(!r["floor"]["pinned_by"].is_null(), "{r}");
    let text = run(&["retention", "--addr", a]).ok().stdout;
    assert!(text.contains("no limit configured"), "{text}");
    assert!(text.contains("pinned by"), "{text}");
    let table = run(&["stats", "--addr", a]).ok().stdout;
    assert!(table.contains("retention floor"), "{table}");
    drop(broker);
}

#[test]
fn retention_flags_are_checked_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let r = run(&[
        "broker",
        "--data-dir",
        d,
        "--retention-bytes",
        "1000",
        "--print-config",
    ])
    .fails();
    assert!(r.stderr.contains("retention_bytes"), "{}", r.stderr);
    let ok = run(&[
        "broker",
        "--data-dir",
        d,
        "--retention-bytes",
        "1073741824",
        "--retention-age-ms",
        "86400000",
        "--print-config",
    ])
    .ok()
    .stdout;
    assert!(ok.contains("retention_bytes = 1073741824"), "{ok}");
    assert!(ok.contains("retention_age_ms = 86400000"), "{ok}");
}

// ---------------------------------------------------------------------------------------
// Bugs found by these tests (ignored until fixed in src/)
// ---------------------------------------------------------------------------------------

/// Writes `reqs` pipelined (at most 60 in flight) and returns the responses in order of
/// correlation id.
fn pipelined(c: &mut Raw, reqs: Vec<Request>) -> Vec<Response> {
    let total = reqs.len();
    let mut answers: BTreeMap<u64, Response> = BTreeMap::new();
    let mut next = 0usize;
    while answers.len() < total {
        let mut bytes = Vec::new();
        while next < total && next - answers.len() < 60 {
            bytes.extend(request_frame(next as u64 + 1, &reqs[next]));
            next += 1;
        }
        if !bytes.is_empty() {
            c.write(&bytes);
        }
        match c.next(Duration::from_secs(30)) {
            Got::Frame(f) => {
                answers.insert(f.correlation, protocol::decode(&f.body).unwrap());
            }
            _ => panic!("pipelined requests not answered"),
        }
    }
    answers.into_values().collect()
}

/// Regression (fixed): `poll_limited` sized a batch by key + body + properties + 64 bytes per message but
/// the Messages response also repeats the topic name (up to 127 bytes) and the offsets and
/// timestamp in every delivery. 30,000 empty messages on a 127-character topic are
/// estimated at ~1.9 MB, well under the `frame_bytes_max - 64 KiB` budget, but encode to
/// ~4.5 MB, over the 4 MiB frame limit. The broker then answers with error 11 ("invalid
/// frame: ... more than the maximum frame size") — after the messages were handed out to
/// the group, so the next poll returns nothing: they are stuck until a broker restart.
#[test]
fn poll_answer_fits_the_frame_limit_and_strands_nothing() {
    let broker = BrokerProc::fresh(&[]);
    let topic = "t".repeat(127);
    let total = 30_000usize;
    let mut c = Raw::connect(&broker.addr);
    c.hello(None);
    let sends = (0..total)
        .map(|_| Request::Send {
            topic: topic.clone(),
            message: WireMessage {
                key: String::new(),
                body: Vec::new(),
                properties: BTreeMap::new(),
            },
        })
        .collect();
    for r in pipelined(&mut c, sends) {
        assert!(matches!(r, Response::Sent { .. }), "{r:?}");
    }
    let mut delivered = 0;
    for _ in 0..10 {
        match c.call(&Request::Poll {
            group: "g".into(),
            topic: topic.clone(),
            max: 100_000,
            wait_ms: 0,
        }) {
            Response::Messages(m) if m.is_empty() => break,
            Response::Messages(m) => delivered += m.len(),
            r => panic!("a poll must answer with messages that fit a frame, got {r:?}"),
        }
    }
    assert_eq!(delivered, total);
}

/// Regression (fixed): `ListTxns` answered with every unfinished transaction in one frame, with no limit
/// or paging. Once their `TxnInfo`s pass 4 MiB the answer is error 11 and `halfmq txn
/// list` shows nothing at all — just when an operator needs it. 70 halves with 65,000-byte
/// keys are enough here; with 20-byte keys it takes about 50,000 pending or unresolved
/// transactions (an outage of a busy producer group).
#[test]
fn txn_list_pages_past_one_frame() {
    let broker = BrokerProc::fresh(&[]);
    let mut c = Raw::connect(&broker.addr);
    c.hello(None);
    let halves = (0..70)
        .map(|i| Request::SendHalf {
            topic: "pay".into(),
            message: WireMessage {
                key: format!("{i:05}{}", "k".repeat(65_000)),
                body: b"x".to_vec(),
                properties: BTreeMap::new(),
            },
            producer_group: "pay-svc".into(),
            check_immunity_ms: 0,
        })
        .collect();
    for r in pipelined(&mut c, halves) {
        assert!(matches!(r, Response::HalfSent { .. }), "{r:?}");
    }
    let r = run(&["txn", "list", "--addr", &broker.addr, "--json"]);
    assert!(r.status.success(), "txn list failed: {}", r.stderr);
    assert_eq!(r.json_lines().len(), 70);
}

/// Regression: the frame time-out was applied to each read, not to the frame, so a client
/// sending a length prefix and then one byte now and then kept a started frame open for
/// ever (1024 such clients would hold every connection slot and up to 4 MiB of buffer
/// each). Now the frame must be complete within `frame_timeout` of its first byte.
#[test]
fn trickled_frame_is_cut_at_the_frame_timeout() {
    let broker = BrokerProc::fresh(&["--frame-timeout-ms", "2000"]);
    let mut c = Raw::connect(&broker.addr);
    c.hello(None);
    let started = Instant::now();
    c.write(&1000u32.to_le_bytes());
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "a frame started 6 s ago is still open (frame timeout 2 s)"
        );
        match c.next(Duration::from_millis(500)) {
            Got::Silent => c.write(&[0]),
            Got::Frame(f) => {
                let r: Response = protocol::decode(&f.body).unwrap();
                assert!(
                    matches!(&r, Response::Error { code, message }
                        if *code == codes::BAD_FRAME && message.contains("not completed")),
                    "{r:?}"
                );
            }
            Got::Closed | Got::Reset => break,
        }
    }
}

/// Regression (fixed): SIGTERM waited for every request in flight, and a long poll is one: a consumer
/// waiting with `wait_ms` up to 60 s (the broker's cap) delays a "clean" stop by up to a
/// minute, past the grace period of most supervisors (Docker: 10 s, Kubernetes: 30 s), which
/// then SIGKILL the broker. Long polls should end (empty) at shutdown.
#[test]
fn sigterm_ends_a_long_poll() {
    let mut broker = BrokerProc::fresh(&[]);
    let mut c = Raw::connect(&broker.addr);
    c.hello(None);
    c.send(
        5,
        &Request::Poll {
            group: "g".into(),
            topic: "t".into(),
            max: 10,
            wait_ms: 60_000,
        },
    );
    thread::sleep(Duration::from_millis(300));
    broker.send_sigterm();
    let st = broker.proc.try_wait_exit(Duration::from_secs(5));
    assert!(
        st.is_some(),
        "the broker was still stopping 5 s after SIGTERM: {}",
        broker.stderr()
    );
    assert!(st.unwrap().success());
}

/// The failing consumer of the outage, through the real binary: a message nacked until the
/// group's maximum lands in the dead-letter queue (never dropped), is listed with its reason
/// and counted in stats, and one command replays it.
#[test]
fn failing_consumer_dead_letters_and_replay_through_the_cli() {
    let mut broker = BrokerProc::fresh(&["--max-retries", "2", "--retry-backoff-ms", "10,20"]);
    let a = broker.addr.clone();
    let a = a.as_str();
    assert_eq!(produce(a, "pay", "confirm", 1).len(), 1);
    // Three deliveries (1 + max_retries), each nacked; the third nack moves it.
    let lines = consume(
        a,
        "pay",
        "orders",
        &["--nack", "--nack-delay-ms", "0", "--max", "3"],
    );
    let attempts: Vec<u64> = lines.iter().map(|v| n(v, "attempt")).collect();
    assert_eq!(attempts, vec![1, 2, 3], "{lines:?}");
    assert!(
        lines[2]["nacked"]["dead_letter"]["topic"] == "%DLQ%orders",
        "{}",
        lines[2]
    );
    assert!(
        consume(a, "pay", "orders", &["--idle-exit-ms", "300"]).is_empty(),
        "a dead letter is not delivered again"
    );
    let dl = run(&["dlq", "list", "--addr", a, "--group", "orders", "--json"])
        .ok()
        .json_lines();
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(
        (
            s(&dl[0], "key"),
            n(&dl[0], "failures"),
            dl[0]["replayed"].clone()
        ),
        ("confirm-0".to_owned(), 3, Value::Bool(false))
    );
    assert!(s(&dl[0], "reason").contains("nack"), "{}", dl[0]);
    let human = run(&["dlq", "list", "--addr", a, "--group", "orders"]).ok();
    assert!(
        human.stdout.contains("key=confirm-0") && human.stdout.contains("after 3 failed"),
        "{}",
        human.stdout
    );
    // Counted in stats, and it survives a restart.
    broker.terminate();
    let broker = broker.restart();
    let a = broker.addr.as_str();
    let stats: Value =
        serde_json::from_str(&run(&["stats", "--addr", a, "--json"]).ok().stdout).unwrap();
    assert_eq!(
        stats["dead_letters"],
        serde_json::json!([{"group": "orders", "messages": 1, "replayed": 0}]),
        "{stats}"
    );
    let replayed = run(&["dlq", "replay", "--addr", a, "--group", "orders", "--json"])
        .ok()
        .json_lines();
    assert_eq!(replayed.len(), 1);
    let again = consume(a, "pay", "orders", &["--max", "1"]);
    assert_eq!(
        (s(&again[0], "key"), n(&again[0], "attempt")),
        ("confirm-0".to_owned(), 1)
    );
    // Group settings: set, shown, and bad ones refused with the setting named.
    let g = run(&[
        "groups",
        "set",
        "--addr",
        a,
        "orders",
        "--visibility-timeout-ms",
        "5000",
    ])
    .ok();
    assert!(g.stdout.contains("5000 ms (set)"), "{}", g.stdout);
    let shown = run(&["groups", "show", "--addr", a, "orders", "--json"])
        .ok()
        .json_lines();
    assert_eq!(n(&shown[0], "visibility_timeout_ms"), 5000);
    assert_eq!(n(&shown[0], "max_retries"), 2);
    let bad = run(&[
        "groups",
        "set",
        "--addr",
        a,
        "orders",
        "--max-retries",
        "5000",
    ])
    .fails();
    assert!(bad.stderr.contains("max_retries"), "{}", bad.stderr);
    // Deleting the group forgets it (its dead-letter queue stays); a second delete and a
    // group that never existed are clear errors.
    let del = run(&["groups", "delete", "--addr", a, "orders"]).ok();
    assert!(
        del.stdout.contains("group orders deleted") && del.stdout.contains("%DLQ%orders"),
        "{}",
        del.stdout
    );
    let shown = run(&["groups", "show", "--addr", a, "orders", "--json"])
        .ok()
        .json_lines();
    assert_eq!(
        n(&shown[0], "visibility_timeout_ms"),
        30_000,
        "settings gone"
    );
    for g in ["orders", "nobody"] {
        let e = run(&["groups", "delete", "--addr", a, g]).fails();
        assert!(
            e.stderr.contains(&format!("unknown consumer group `{g}`")),
            "{}",
            e.stderr
        );
    }
    drop(broker);
}

/// `--baseline` alternates the raw disk and the store `--rounds` times and reports the
/// median round, with that round's raw figures and every round's ratio.
#[test]
fn bench_baseline_alternates_raw_disk_and_store() {
    let (r, out) = embedded_bench("--baseline --rounds 2 --producers 2 --messages 200");
    assert_eq!(r["messages"].as_u64(), Some(200), "{r}");
    let rounds = round_ratios(&r);
    assert_eq!(rounds.len(), 2, "{r}");
    let ratio = r["ratio_to_raw"].as_f64().unwrap();
    assert_eq!(
        ratio,
        rounds.iter().copied().fold(f64::MAX, f64::min),
        "{r}"
    );
    // The reported ratio is that round's own msgs/s over its own raw figure.
    let own = r["msgs_per_s"].as_f64().unwrap() / r["raw_group_msgs_per_s"].as_f64().unwrap();
    assert!((own - ratio).abs() < 0.002, "{own} vs {ratio} in {r}");
    let (p50, p99) = (
        r["raw_serial_fsync_p50_us"].as_u64().unwrap(),
        r["raw_serial_fsync_p99_us"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99, "{r}");
    assert!(
        out.stderr.contains("measuring the raw disk"),
        "{}",
        out.stderr
    );
}

/// `--in-flight N`: each producer keeps N sends outstanding (embedded and over the
/// network); every issued send is counted once, and blocking producer threads refuse it.
#[test]
fn bench_producers_can_keep_several_sends_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let small = [
        "--producers",
        "3",
        "--in-flight",
        "8",
        "--messages",
        "500",
        "--size",
        "64",
    ];
    let data = dir.path().join("bench");
    let mut args = vec!["--embedded"];
    args.extend(small);
    args.extend(["--data-dir", data.to_str().unwrap()]);
    let (r, _) = bench_json(&args);
    assert_eq!(r["messages"].as_u64(), Some(500), "{r}");
    assert_eq!(r["in_flight"].as_u64(), Some(8), "{r}");
    // 24 sends outstanding against one flusher: group commits carry more than one each.
    assert!(r["msgs_per_fsync"].as_f64().unwrap() > 1.0, "{r}");

    for bad in [
        &["--threads", "--in-flight", "2"][..],
        &["--in-flight", "0"],
    ] {
        let mut args = vec!["bench", "--embedded", "--messages", "10"];
        args.extend(bad);
        let err = run(&args).fails();
        assert!(err.stderr.contains("in-flight"), "{}", err.stderr);
    }

    let mut broker = BrokerProc::start(&dir.path().join("broker"), &[]);
    let mut args = vec!["--addr", &broker.addr, "--connections", "2"];
    args.extend(small);
    let (r, _) = bench_json(&args);
    assert_eq!(r["messages"].as_u64(), Some(500), "{r}");
    assert_eq!(r["in_flight"].as_u64(), Some(8), "{r}");
    assert_eq!(r["mode"], "broker");
    // One worker per producer at most, unless told.
    let lone = ["--producers", "1", "--messages", "50", "--size", "64"];
    for (extra, workers) in [(&[][..], 1), (&["--runtime-threads", "2"][..], 2)] {
        let mut args = vec!["--addr", &broker.addr];
        args.extend(lone);
        args.extend(extra);
        let (r, _) = bench_json(&args);
        let kind = r["producer_kind"].as_str().unwrap();
        assert!(
            kind.starts_with(&format!("tasks on {workers} runtime workers")),
            "{r}"
        );
    }
    broker.terminate();
    let err = run(&[
        "bench",
        "--embedded",
        "--messages",
        "10",
        "--runtime-threads",
        "0",
    ])
    .fails();
    assert!(err.stderr.contains("runtime-threads"), "{}", err.stderr);
}

/// `--addr --baseline`: the raw disk (one 1 KiB write + fdatasync at a time) measured in the
/// same run as the network sends, and what a send costs on top of it at the median.
#[test]
fn bench_over_the_network_reports_the_p50_over_the_raw_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(&dir.path().join("broker"), &[]);
    let addr = broker.addr.clone();
    let data = dir.path().join("bench");
    let args = [
        "--addr",
        &addr,
        "--baseline",
        "--rounds",
        "1",
        "--producers",
        "1",
        "--connections",
        "1",
        "--messages",
        "50",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let (r, out) = bench_json(&args);
    broker.terminate();
    assert_eq!(r["mode"], "broker", "{r}");
    assert_eq!(r["messages"].as_u64(), Some(50), "{r}");
    assert_eq!(round_ratios(&r).len(), 1, "{r}");
    let raw_p50 = r["raw_serial_fsync_p50_us"].as_i64().unwrap();
    assert!(raw_p50 > 0, "{r}");
    assert!(
        r["raw_serial_fsync_p99_us"].as_i64().unwrap() >= raw_p50,
        "{r}"
    );
    assert_eq!(
        r["p50_over_raw_fsync_us"].as_i64(),
        Some(r["p50_us"].as_i64().unwrap() - raw_p50),
        "{r}"
    );
    assert!(out.stdout.contains("send p50 minus that"), "{}", out.stdout);
    // A comparison with the embedded broker is a different baseline: not both at once.
    let mut both = args.to_vec();
    both.push("--compare-embedded");
    let mut cmd = vec!["bench"];
    cmd.extend(both);
    let err = run(&cmd).fails();
    assert!(err.stderr.contains("--compare-embedded"), "{}", err.stderr);
}

/// The comparing benches run their pair `--rounds` times, alternating, and report the median
/// round: every round's ratio is listed, and the reported ratio is one of them.
#[test]
fn comparing_benches_report_the_median_of_their_rounds() {
    fn check(r: &Value, ratio_field: &str) {
        let rounds = round_ratios(r);
        assert_eq!(rounds.len(), 3, "{r}");
        let ratio = r[ratio_field].as_f64().unwrap();
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(
            ratio, sorted[1],
            "{ratio_field} is the median of {rounds:?}"
        );
        assert_eq!(r["messages"].as_u64(), Some(150), "{r}");
    }
    let dir = tempfile::tempdir().unwrap();
    let small = ["--producers", "4", "--messages", "150", "--size", "64"];
    let data = dir.path().join("bench");
    let mut args = vec!["--embedded", "--idempotency-keys", "--rounds", "3"];
    args.extend(small);
    args.extend(["--data-dir", data.to_str().unwrap()]);
    let (r, _) = bench_json(&args);
    check(&r, "ratio_to_without_keys");

    let mut broker = BrokerProc::start(&dir.path().join("broker"), &[]);
    let data = dir.path().join("bench-net");
    let mut args = vec![
        "--addr",
        &broker.addr,
        "--compare-embedded",
        "--rounds",
        "3",
    ];
    args.extend(small);
    args.extend(["--data-dir", data.to_str().unwrap()]);
    let (r, _) = bench_json(&args);
    check(&r, "ratio_to_embedded");
    assert_eq!(r["mode"], "broker");
    broker.terminate();
}

#[test]
fn rocketmq_endpoint_serves_the_same_broker() {
    use halfmq_rocketmq::pb::{self, messaging_service_client::MessagingServiceClient};
    let broker = BrokerProc::fresh(&["--rocketmq-listen", "127.0.0.1:0"]);
    let announced = "RocketMQ 5 endpoint at ";
    let line = broker
        .proc
        .stdout_lines()
        .into_iter()
        .find(|l| l.starts_with(announced))
        .expect("the endpoint is announced before the broker listens");
    let url = format!("http://{}", &line[announced.len()..]);
    // A message through the native door ...
    assert_eq!(produce(&broker.addr, "t", "p", 1).len(), 1);
    let topic = || {
        Some(pb::Resource {
            resource_namespace: String::new(),
            name: "t".into(),
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = MessagingServiceClient::connect(url).await.unwrap();
        let route = c
            .query_route(pb::QueryRouteRequest {
                topic: topic(),
                endpoints: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(route.status.unwrap().code, pb::Code::Ok as i32);
        assert!(!route.message_queues.is_empty());
        // ... is received through the RocketMQ door, with its key.
        let mut answer = c
            .receive_message(pb::ReceiveMessageRequest {
                group: Some(pb::Resource {
                    resource_namespace: String::new(),
                    name: "g".into(),
                }),
                message_queue: Some(pb::MessageQueue {
                    topic: topic(),
                    ..Default::default()
                }),
                batch_size: 8,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut keys = Vec::new();
        while let Some(item) = answer.message().await.unwrap() {
            if let Some(pb::receive_message_response::Content::Message(m)) = item.content {
                keys.extend(m.system_properties.unwrap().keys);
            }
        }
        assert_eq!(keys, vec!["p-0"]);
    });
}
