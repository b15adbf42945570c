//! Automatic batching against a scripted broker on a loopback socket, which records every
//! request frame and holds its answers until it has seen a given number of messages: what
//! leaves in which frame is then decided by the batcher's logic alone, not by timing.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::frame::{self, FRAME_BYTES_MAX_DEFAULT};
use crate::protocol::{self, Request, Response, SendResult, WireMessage};
use crate::stream::ReadBuf;
use crate::{Client, ClientConfig, Message};

/// What the scripted broker saw: the messages of each request frame, in arrival order.
type Seen = Arc<Mutex<Vec<Vec<WireMessage>>>>;

/// A broker that answers `Hello`, and `Send` / `SendBatch` with receipts whose offset is
/// the number in the message's body; it holds every answer to a send until `hold_until`
/// messages have arrived.
async fn scripted_broker(hold_until: usize) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Seen = Arc::default();
    let frames = seen.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = ReadBuf::new();
        let mut held = Vec::new();
        let mut messages = 0;
        loop {
            while let Some(len) = buf.next_frame(FRAME_BYTES_MAX_DEFAULT).unwrap() {
                let f = frame::parse_ref(&buf.pending()[..len]).unwrap();
                let req: Request = protocol::decode(f.body).unwrap();
                let (id, answer) = (f.correlation, answer(req, &frames, &mut messages));
                buf.consume(len);
                held.push((id, answer));
                // The handshake is answered at once.
                if messages >= hold_until || held.len() == 1 && messages == 0 {
                    for (id, resp) in held.drain(..) {
                        crate::connection::tests::respond(&mut wr, id, &resp).await;
                    }
                }
            }
            if buf.read_from(&mut rd).await.unwrap_or(0) == 0 {
                return;
            }
        }
    });
    (addr, seen)
}

/// The scripted answer to `req`, recording the messages it carries.
fn answer(req: Request, frames: &Seen, messages: &mut usize) -> Response {
    let receipt = |m: &WireMessage| SendResult::Sent {
        queue: 0,
        offset: String::from_utf8_lossy(&m.body).parse().unwrap(),
        log_offset: 0,
        duplicate: false,
    };
    match req {
        Request::Hello { .. } => Response::Hello {
            server: "scripted".into(),
        },
        Request::Send { topic, message } => {
            *messages += 1;
            let SendResult::Sent { offset, .. } = receipt(&message) else {
                unreachable!()
            };
            frames.lock().push(vec![message]);
            Response::Sent {
                topic,
                queue: 0,
                offset,
                log_offset: 0,
                duplicate: false,
            }
        }
        Request::SendBatch { topic, messages: m } => {
            *messages += m.len();
            let results = m.iter().map(receipt).collect();
            frames.lock().push(m);
            Response::SentBatch { topic, results }
        }
        other => panic!("the scripted broker does not expect {other:?}"),
    }
}

fn config(addr: &str) -> ClientConfig {
    ClientConfig::new(addr)
        // Longer than any test: a send that waited for it would hang the test.
        .with_batch_linger(Duration::from_secs(3600))
        .with_batch_messages_max(7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_share_frames_and_each_caller_gets_its_own_receipt() {
    const SENDS: u64 = 50;
    // Nothing is answered until every message has arrived: the first send stays on the
    // wire, so all the others queue and leave in batches of 7 (49 = 7 x 7).
    let (addr, seen) = scripted_broker(SENDS as usize).await;
    let client = Client::connect(config(&addr)).await.unwrap();
    let tasks: Vec<_> = (0..SENDS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let r = client.send("t", &Message::new(i.to_string())).await;
                (i, r.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (i, receipt) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("every send is answered")
            .unwrap();
        assert_eq!((receipt.topic.as_str(), receipt.offset), ("t", i));
    }
    let frames = seen.lock().clone();
    let mut sizes: Vec<usize> = frames.iter().map(Vec::len).collect();
    sizes.sort_unstable();
    assert_eq!(
        sizes,
        [1, 7, 7, 7, 7, 7, 7, 7],
        "one alone, then full batches"
    );
    let mut bodies: Vec<u64> = frames
        .iter()
        .flatten()
        .map(|m| String::from_utf8_lossy(&m.body).parse().unwrap())
        .collect();
    bodies.sort_unstable();
    assert_eq!(bodies, (0..SENDS).collect::<Vec<_>>(), "each message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_send_leaves_at_once_and_alone() {
    // Answers at once; the linger is an hour, so a send that waited for it would hang.
    let (addr, seen) = scripted_broker(0).await;
    let client = Client::connect(config(&addr)).await.unwrap();
    for i in 0..5u64 {
        let msg = Message::new(i.to_string());
        let send = client.send("t", &msg);
        let receipt = tokio::time::timeout(Duration::from_secs(60), send)
            .await
            .expect("a lone send does not wait for the linger")
            .unwrap();
        assert_eq!(receipt.offset, i);
    }
    let sizes: Vec<usize> = seen.lock().iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 1, 1, 1, 1], "each send in a frame of its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_batch_every_send_is_its_own_frame() {
    const SENDS: u64 = 20;
    let (addr, seen) = scripted_broker(SENDS as usize).await;
    let client = Client::connect(config(&addr).with_auto_batch(false))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..SENDS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.send("t", &Message::new(i.to_string())).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(seen.lock().len(), SENDS as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_to_ever_new_topics_keeps_lanes_only_for_those_in_use() {
    const TOPICS: usize = 1000;
    let (addr, seen) = scripted_broker(0).await;
    let client = Client::connect(config(&addr)).await.unwrap();
    // A lane somebody holds (as a sender, a request on the wire or a flusher would) is in
    // use: never forgotten.
    let held = client.batcher().lane("held");
    for i in 0..TOPICS {
        let receipt = client
            .send(&format!("t{i}"), &Message::new(i.to_string()))
            .await
            .unwrap();
        assert_eq!(receipt.offset, i as u64);
    }
    assert_eq!(seen.lock().len(), TOPICS, "every send went out");
    let kept = client.batcher().lanes_kept();
    assert!(kept <= 2 * 64, "{kept} lanes kept after {TOPICS} topics");
    assert!(Arc::ptr_eq(&held, &client.batcher().lane("held")));
}

/// The lane remembered as the last one asked for is the topic's own: asking again, after
/// another topic's, or after a sweep, gives the same lane as the first time.
#[test]
fn the_last_lane_asked_for_is_the_topics_own() {
    let b = super::lanes::Batcher::default();
    let a = b.lane("a");
    assert!(Arc::ptr_eq(&a, &b.lane("a")));
    let other = b.lane("b");
    assert!(!Arc::ptr_eq(&a, &other));
    assert!(Arc::ptr_eq(&a, &b.lane("a")));
    assert!(Arc::ptr_eq(&other, &b.lane("b")));
    assert!(Arc::ptr_eq(&other, &b.lane("b")));
    // Many topics: sweeps run, and the lanes still held are found again, last or not.
    for i in 0..300 {
        let _ = b.lane(&format!("t{i}"));
    }
    assert!(Arc::ptr_eq(&a, &b.lane("a")));
    assert!(Arc::ptr_eq(&other, &b.lane("b")));
    assert!(b.lanes_kept() <= 2 * 64, "{} lanes kept", b.lanes_kept());
}
