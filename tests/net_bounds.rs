//! The network server's bounds against clients that misbehave: one that never reads its
//! answers is handed out no more than its outgoing room (plus what the kernel's socket
//! buffers hold), is cut after `write_timeout`, and what it was handed comes again to a
//! consumer that behaves; an idle connection is closed after `idle_timeout`, while a long
//! poll or a registered checker is not idle; and a broker with a never-reading client stops
//! on SIGTERM in bounded time.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{request_frame, wait_until, BrokerProc};
use halfmq::{Broker, BrokerConfig, Message};
use halfmq_cli::server::{Server, ServerConfig};
use halfmq_client::frame::{self, FrameKind};
use halfmq_client::protocol::{self, codes, Request, Response, WireMessage};
use halfmq_client::{Client, ClientConfig};
use halfmq_types::clock::ManualClock;

/// Body of each message of the backlog.
const BODY: usize = 200 * 1024;
/// Messages of the backlog: 32 MiB, far more than the bound plus the socket buffers.
const MESSAGES: usize = 160;
/// Polls the never-reading client sends at once (the server's `in_flight_max`).
const POLLS: u64 = 64;
/// Its outgoing room in the tests.
const OUT_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Frames up to 1 MiB: a poll answer carries up to four messages of the backlog.
const FRAME_BYTES_MAX: u32 = 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn hello() -> Request {
    Request::Hello {
        client: "net-bounds".into(),
        token: None,
    }
}

fn poll(group: &str, topic: &str, max: u32, wait_ms: u64) -> Request {
    Request::Poll {
        group: group.into(),
        topic: topic.into(),
        max,
        wait_ms,
    }
}

/// A connection whose receive buffer is small, so that what the kernel holds for a client
/// that does not read is small too (left alone, Linux grows it to `tcp_rmem`'s maximum).
fn small_buffered_connection(rt: &tokio::runtime::Runtime, addr: &str) -> TcpStream {
    let addr = addr.parse().unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(32 * 1024).unwrap();
        socket.connect(addr).await.unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Send `Hello` and `POLLS` polls of `topic` for `group`, and read nothing.
fn never_read(s: &mut TcpStream, group: &str, topic: &str) {
    let mut bytes = request_frame(1, &hello());
    for id in 0..POLLS {
        bytes.extend(request_frame(2 + id, &poll(group, topic, 100, 0)));
    }
    s.write_all(&bytes).unwrap();
}

/// The most the kernel may hold of what the broker wrote: its send buffer can grow to
/// `tcp_wmem`'s maximum, the client's receive buffer is small, and one frame more is on the
/// way between them.
fn kernel_allowance() -> usize {
    let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap_or_default();
    let wmem_max: usize = wmem
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or(4 << 20);
    wmem_max + 2 * FRAME_BYTES_MAX as usize
}

/// Messages of `group` handed out and not acked, over every queue.
fn in_flight(stats: &halfmq::Stats, group: &str) -> u64 {
    stats
        .queues
        .iter()
        .flat_map(|q| &q.groups)
        .filter(|g| g.group == group)
        .map(|g| g.in_flight)
        .sum()
}

/// The next frame on `s` within `limit`: `None` when the connection closes (or is reset).
fn next_response(s: &mut TcpStream, buf: &mut Vec<u8>, limit: Duration) -> Option<(u64, Response)> {
    let deadline = Instant::now() + limit;
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(len) = frame::check(buf, FRAME_BYTES_MAX).unwrap() {
            let f = frame::parse(&buf[..len]).unwrap();
            buf.drain(..len);
            assert_eq!(f.kind, FrameKind::Response);
            return Some((f.correlation, protocol::decode(&f.body).unwrap()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "nothing from the broker within {limit:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// `req` on `s`, and its answer.
fn call(s: &mut TcpStream, buf: &mut Vec<u8>, id: u64, req: &Request) -> Response {
    s.write_all(&request_frame(id, req)).unwrap();
    let (got, resp) = next_response(s, buf, Duration::from_secs(30)).expect("an answer");
    assert_eq!(got, id);
    resp
}

/// A client that never reads gets no more than its room, is cut after the write time-out,
/// and what it was handed is delivered again to a consumer that reads.
#[test]
fn a_client_that_never_reads_is_bounded_then_cut_and_its_deliveries_come_again() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let clock = ManualClock::starting_now();
    let broker = Broker::open(BrokerConfig::new(dir.path()).with_clock(clock.clone())).unwrap();
    broker.create_topic("big", 4).unwrap();
    rt.block_on(async {
        let sends = (0..MESSAGES).map(|i| {
            let broker = broker.clone();
            async move {
                let msg = Message::new(vec![i as u8; BODY]).with_key(format!("k{i}"));
                broker.send_async("big", &msg).await.unwrap();
            }
        });
        futures_util::future::join_all(sends).await;
    });
    let config = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .with_frame_bytes_max(FRAME_BYTES_MAX)
        .with_out_bytes_max(OUT_BYTES_MAX)
        .with_write_timeout(Duration::from_millis(500));
    let server = rt.block_on(Server::start(broker.clone(), config)).unwrap();
    let addr = server.local_addr().to_string();

    let mut slow = small_buffered_connection(&rt, &addr);
    never_read(&mut slow, "g", "big");
    wait_until(
        "the never-reading client is cut",
        Duration::from_secs(60),
        || server.net_stats().write_timeouts == 1,
    );
    wait_until("its connection is closed", Duration::from_secs(60), || {
        server.net_stats().open == 0
    });
    let stats = server.net_stats();
    assert!(
        stats.out_bytes_peak <= OUT_BYTES_MAX as u64,
        "{} bytes queued for one connection, the bound is {OUT_BYTES_MAX}",
        stats.out_bytes_peak
    );
    assert!(
        stats.out_bytes_peak >= BODY as u64,
        "answers were queued: {stats:?}"
    );
    assert_eq!(stats.out_bytes, 0, "nothing stays queued: {stats:?}");
    // What was handed out is what the queue and the kernel could hold, not the backlog.
    let leased = in_flight(&broker.stats().unwrap(), "g") as usize;
    assert!(leased > 0);
    assert!(
        leased * BODY <= OUT_BYTES_MAX + kernel_allowance(),
        "{leased} messages of {BODY} bytes handed to a client that reads nothing"
    );
    assert!(leased < MESSAGES, "the whole backlog was handed out");

    // Past the visibility time-out, a consumer that reads gets every message, the ones
    // the cut client held as a second attempt.
    clock.advance_ms(31_000);
    let attempts: BTreeMap<String, u32> = rt.block_on(async {
        let client = Client::connect(ClientConfig::new(addr.clone()))
            .await
            .unwrap();
        let mut attempts = BTreeMap::new();
        while attempts.len() < MESSAGES {
            let got = client
                .poll_wait("g", "big", 16, Duration::from_secs(10))
                .await
                .unwrap();
            assert!(!got.is_empty(), "{} of {MESSAGES} came", attempts.len());
            for d in got {
                assert_eq!(d.body.len(), BODY);
                client.ack("g", "big", d.queue, d.offset).await.unwrap();
                assert!(attempts.insert(d.key.clone(), d.attempt).is_none());
            }
        }
        attempts
    });
    let again = attempts.values().filter(|a| **a == 2).count();
    assert_eq!(again, leased, "{attempts:?}");
    assert!(attempts.values().all(|a| *a <= 2));
    assert_eq!(in_flight(&broker.stats().unwrap(), "g"), 0);
    rt.block_on(server.shutdown());
    broker.close().unwrap();
}

/// An authenticated connection with nothing to do is closed after the idle time-out, with
/// an error frame saying so; one waiting in a long poll, or registered as a checker, is not.
#[test]
fn idle_connections_are_closed_but_long_polls_and_checkers_are_not_idle() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let idle = Duration::from_millis(300);
    let config = ServerConfig::new("127.0.0.1:0".parse().unwrap()).with_idle_timeout(idle);
    let server = rt.block_on(Server::start(broker.clone(), config)).unwrap();
    let addr = server.local_addr();
    let connect = || {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            call(&mut s, &mut buf, 1, &hello()),
            Response::Hello { .. }
        ));
        (s, buf)
    };
    let closed_for_idleness = |s: &mut TcpStream, buf: &mut Vec<u8>| {
        match next_response(s, buf, Duration::from_secs(30)) {
            Some((0, Response::Error { code, message })) => {
                assert_eq!(code, codes::IDLE, "{message}");
            }
            other => panic!("expected the idle error frame, got {other:?}"),
        }
        assert!(next_response(s, buf, Duration::from_secs(30)).is_none());
    };

    // A checker: it waits for the broker's check-backs, so it is never idle.
    let (mut checker, mut checker_buf) = connect();
    let registered = call(
        &mut checker,
        &mut checker_buf,
        2,
        &Request::RegisterChecker {
            producer_group: "pg".into(),
        },
    );
    assert_eq!(registered, Response::Ok);

    // A long poll five times the idle time-out is answered (empty) on an open connection;
    // then, with nothing to do, the connection is closed.
    let (mut a, mut a_buf) = connect();
    let started = Instant::now();
    let answer = call(&mut a, &mut a_buf, 2, &poll("g", "empty", 10, 1_500));
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    assert_eq!(answer, Response::Messages(Vec::new()));
    closed_for_idleness(&mut a, &mut a_buf);
    assert_eq!(server.net_stats().idle_closed, 1);

    // Another connection opened after that one closed is closed for idleness too: the
    // checker has by then had nothing to do for two idle time-outs, and is still served.
    let (mut c, mut c_buf) = connect();
    closed_for_idleness(&mut c, &mut c_buf);
    assert_eq!(server.net_stats().idle_closed, 2);
    let topics = call(&mut checker, &mut checker_buf, 3, &Request::ListTopics);
    assert!(matches!(topics, Response::Topics(_)), "{topics:?}");

    drop(checker);
    rt.block_on(server.shutdown());
    broker.close().unwrap();
}

/// SIGTERM stops a broker whose client never reads within a bound: its answers get the
/// write time-out to go out, then the connection is cut.
#[test]
fn sigterm_with_a_client_that_never_reads_stops_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    // Longer than it takes to see the client's holdings stop growing, so that the stop
    // finds its writer stuck rather than the connection already cut.
    let write_timeout = Duration::from_secs(3);
    let mut broker = BrokerProc::start(
        dir.path(),
        &[
            "--record-bytes-max",
            "262144",
            "--frame-bytes-max",
            &FRAME_BYTES_MAX.to_string(),
            "--out-bytes-max",
            &OUT_BYTES_MAX.to_string(),
            "--write-timeout-ms",
            &write_timeout.as_millis().to_string(),
        ],
    );
    let rt = runtime();

    // The backlog, sent by a client that reads its answers.
    let mut producer = TcpStream::connect(&broker.addr).unwrap();
    let mut buf = Vec::new();
    call(&mut producer, &mut buf, 1, &hello());
    let mut sends = Vec::new();
    for i in 0..MESSAGES {
        let message = WireMessage {
            key: format!("k{i}"),
            body: vec![i as u8; BODY],
            properties: Default::default(),
        };
        let req = Request::Send {
            topic: "big".into(),
            message,
        };
        sends.extend(request_frame(2 + i as u64, &req));
    }
    producer.write_all(&sends).unwrap();
    for _ in 0..MESSAGES {
        let (_, resp) = next_response(&mut producer, &mut buf, Duration::from_secs(60)).unwrap();
        assert!(matches!(resp, Response::Sent { .. }), "{resp:?}");
    }

    // The client that never reads, until what it holds stops growing: its answers fill
    // the kernel's buffers and the broker's queue.
    let mut slow = small_buffered_connection(&rt, &broker.addr);
    never_read(&mut slow, "g", "big");
    let mut id = 1_000;
    let mut held = |producer: &mut TcpStream, buf: &mut Vec<u8>| {
        id += 1;
        match call(producer, buf, id, &Request::Stats) {
            Response::Stats(json) => in_flight(&serde_json::from_str(&json).unwrap(), "g"),
            other => panic!("{other:?}"),
        }
    };
    let mut last = 0;
    let mut steady = 0;
    while steady < 3 {
        std::thread::sleep(Duration::from_millis(200));
        let now = held(&mut producer, &mut buf);
        steady = if now > 0 && now == last {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    drop(producer);

    let started = Instant::now();
    broker.send_sigterm();
    let status = broker
        .proc
        .try_wait_exit(10 * write_timeout)
        .unwrap_or_else(|| {
            broker.kill9();
            panic!(
                "the broker did not stop within {:?} of SIGTERM; stderr:\n{}",
                10 * write_timeout,
                broker.stderr()
            )
        });
    let took = started.elapsed();
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        broker.stderr()
    );
    assert!(
        broker.stderr().contains("stopped cleanly"),
        "{}",
        broker.stderr()
    );
    eprintln!("stopped {took:?} after SIGTERM (write timeout {write_timeout:?})");
    drop(slow);
}

/// A client dropped by its last owner closes its connection: the server counts it gone.
/// Its reader task used to hold the client, so a dropped client's socket stayed open until
/// the broker closed it as idle (connections leaked by an application that makes clients).
/// A client with a registered checker (whose reader answers check-backs) too.
#[test]
fn a_dropped_client_closes_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    let server = rt.block_on(Server::start(broker.clone(), config)).unwrap();
    let addr = server.local_addr().to_string();
    let open = || server.net_stats().open;
    rt.block_on(async {
        let plain = Client::connect(ClientConfig::new(addr.clone()))
            .await
            .unwrap();
        plain.topics().await.unwrap();
        let checking = Client::connect(ClientConfig::new(addr.clone()))
            .await
            .unwrap();
        checking
            .register_checker(
                "pg",
                std::sync::Arc::new(|_: &halfmq::HalfMessage| halfmq::CheckAnswer::Unknown),
            )
            .await
            .unwrap();
        let clone = plain.clone();
        wait_until("both connections counted", Duration::from_secs(10), || {
            open() == 2
        });
        drop(plain);
        // A clone still holds the client: its connection stays.
        clone.topics().await.unwrap();
        assert_eq!(open(), 2);
        drop(clone);
        drop(checking);
        wait_until(
            "the dropped clients' connections closed",
            Duration::from_secs(10),
            || open() == 0,
        );
    });
}
