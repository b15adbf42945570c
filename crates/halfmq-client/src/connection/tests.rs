//! The connection against scripted brokers: what the client does when the broker closes,
//! and how a client of several nodes follows the leader.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT};
use crate::protocol::{self, codes, Request, Response};
use crate::stream::ReadBuf;
use crate::{Client, ClientConfig, Error};

/// Read the next request frame of `stream`: its correlation id and the request.
async fn next_request(stream: &mut TcpStream, buf: &mut ReadBuf) -> Option<(u64, Request)> {
    loop {
        if let Some(len) = buf.next_frame(FRAME_BYTES_MAX_DEFAULT).unwrap() {
            let f = frame::parse_ref(&buf.pending()[..len]).unwrap();
            let req = protocol::decode(f.body).unwrap();
            let id = f.correlation;
            buf.consume(len);
            return Some((id, req));
        }
        if buf.read_from(stream).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}

/// Write answer `resp` to request `id` (0: not an answer) as a broker does (the scripted
/// brokers of this crate's tests).
pub(crate) async fn respond(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    id: u64,
    resp: &Response,
) {
    let mut bytes = Vec::new();
    frame::encode_with(
        &mut bytes,
        FrameKind::Response,
        id,
        FRAME_BYTES_MAX_DEFAULT,
        |out| protocol::encode_append(resp, out),
    )
    .unwrap();
    stream.write_all(&bytes).await.unwrap();
}

/// A broker whose first connection, after the handshake, takes one request and closes
/// instead of answering it: as idle (`idle`: error 105 with correlation 0, as a broker does
/// when a request crossed its idle close), or without a word. Later connections answer
/// every `Stats` request. Returns its address and the number of requests carried out.
async fn closes_once(idle: bool) -> (String, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let done = Arc::new(AtomicU32::new(0));
    let carried = done.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = ReadBuf::new();
            while let Some((id, req)) = next_request(&mut stream, &mut buf).await {
                let resp = match req {
                    Request::Hello { .. } => Response::Hello {
                        server: "scripted".into(),
                    },
                    _ if first => {
                        first = false;
                        if idle {
                            let why = Response::Error {
                                code: codes::IDLE,
                                message: "idle".into(),
                            };
                            respond(&mut stream, 0, &why).await;
                        }
                        break;
                    }
                    Request::Stats => {
                        carried.fetch_add(1, Ordering::SeqCst);
                        Response::Stats("{}".into())
                    }
                    other => panic!("the scripted broker does not expect {other:?}"),
                };
                respond(&mut stream, id, &resp).await;
            }
        }
    });
    (addr, done)
}

#[tokio::test]
async fn a_request_crossing_the_brokers_idle_close_is_sent_again_on_a_new_connection() {
    let (addr, carried) = closes_once(true).await;
    let client = Client::connect(ClientConfig::new(&addr)).await.unwrap();
    let answer = client.call(Request::Stats).await;
    assert!(matches!(answer, Ok(Response::Stats(_))), "{answer:?}");
    assert_eq!(carried.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_lost_to_any_other_close_is_not_sent_again() {
    // It may have been carried out, so the client must not send it again on its own: the
    // caller learns that its fate is unknown.
    let (addr, carried) = closes_once(false).await;
    let client = Client::connect(ClientConfig::new(&addr)).await.unwrap();
    let answer = client.call(Request::Stats).await;
    assert!(
        matches!(answer, Err(Error::Disconnected { .. })),
        "{answer:?}"
    );
    assert_eq!(carried.load(Ordering::SeqCst), 0);
}

/// What a scripted node does with a request.
enum Act {
    Answer(Response),
    /// Close the connection without answering (the request's fate is unknown to the client).
    Close,
}

/// A scripted node of a cluster: it answers the handshake, records every other request it
/// gets, and does with it what `script` says (each connection on its own task). Returns its
/// address and its record.
async fn node(
    script: impl Fn(&Request) -> Act + Send + Sync + 'static,
) -> (String, Arc<parking_lot::Mutex<Vec<Request>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let record = got.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (record, script) = (record.clone(), script.clone());
            tokio::spawn(async move {
                let mut buf = ReadBuf::new();
                while let Some((id, req)) = next_request(&mut stream, &mut buf).await {
                    let act = match req {
                        Request::Hello { .. } => Act::Answer(Response::Hello {
                            server: "scripted".into(),
                        }),
                        ref other => {
                            record.lock().push(other.clone());
                            script(other)
                        }
                    };
                    match act {
                        Act::Answer(resp) => respond(&mut stream, id, &resp).await,
                        Act::Close => break,
                    }
                }
            });
        }
    });
    (addr, got)
}

fn sent(offset: u64) -> Act {
    Act::Answer(Response::Sent {
        topic: "t".into(),
        queue: 0,
        offset,
        log_offset: offset,
        duplicate: false,
    })
}

fn not_leader(leader: Option<&str>) -> Act {
    Act::Answer(Response::Error {
        code: codes::NOT_LEADER,
        message: protocol::not_leader_message(leader),
    })
}

/// The idempotency key of a recorded `Send`.
fn key_of(req: &Request) -> Option<String> {
    match req {
        Request::Send { message, .. } => message
            .properties
            .get(halfmq_types::props::PROP_IDEMPOTENCY_KEY)
            .cloned(),
        other => panic!("not a send: {other:?}"),
    }
}

/// Given a follower first, the client makes its send again on the leader the follower
/// names, and stays there; every send carries a key the client made, a different one each.
#[tokio::test]
async fn a_send_answered_not_leader_goes_to_the_named_leader() {
    let (leader, on_leader) = node(|_| sent(1)).await;
    let named = leader.clone();
    let (follower, on_follower) = node(move |_| not_leader(Some(&named))).await;
    let config = ClientConfig::new(format!("{follower},{leader}")).with_auto_batch(false);
    let client = Client::connect(config).await.unwrap();
    let msg = halfmq_types::Message::new("m");
    for _ in 0..3 {
        client.send("t", &msg).await.unwrap();
    }
    assert_eq!(on_follower.lock().len(), 1, "asked the follower once");
    let keys: Vec<Option<String>> = on_leader.lock().iter().map(key_of).collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(
        keys[0],
        key_of(&on_follower.lock()[0]),
        "made again as it was"
    );
    assert!(keys.iter().all(Option::is_some), "{keys:?}");
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[1], keys[2]);
}

/// With one address a send keeps no key it was not given, and is not made again when its
/// node goes away before answering.
#[tokio::test]
async fn one_address_adds_no_key_and_resends_nothing() {
    let (addr, got) = node(|_| Act::Close).await;
    let client = Client::connect(ClientConfig::new(&addr).with_auto_batch(false))
        .await
        .unwrap();
    let r = client.send("t", &halfmq_types::Message::new("m")).await;
    assert!(matches!(r, Err(Error::Disconnected { .. })), "{r:?}");
    assert_eq!(got.lock().len(), 1);
    assert_eq!(key_of(&got.lock()[0]), None);
}

/// A node that goes away before answering: a keyed send is made again on the next address
/// under the same key; an ack (which may have been carried out) is not, its caller gets the
/// error. An address nobody listens on is passed over.
#[tokio::test]
async fn a_lost_write_is_made_again_elsewhere_only_when_it_is_safe_twice() {
    let (dying, on_dying) = node(|_| Act::Close).await;
    let (next, on_next) = node(|req| match req {
        Request::Ack { .. } => Act::Answer(Response::Ok),
        _ => sent(7),
    })
    .await;
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let config = ClientConfig::new(format!("{nobody},{dying},{next}")).with_auto_batch(false);
    let client = Client::connect(config).await.unwrap();
    let r = client.send("t", &halfmq_types::Message::new("m")).await;
    assert_eq!(r.unwrap().offset, 7);
    let key = key_of(&on_dying.lock()[0]);
    assert!(key.is_some());
    assert_eq!(
        key_of(&on_next.lock()[0]),
        key,
        "the same key on the next node"
    );

    // Back to the dying node (the client moves on round the addresses when `next` fails).
    let client = Client::connect(ClientConfig::new(format!("{dying},{next}")))
        .await
        .unwrap();
    let r = client.ack("g", "t", 0, 1).await;
    assert!(matches!(r, Err(Error::Disconnected { .. })), "{r:?}");
    assert!(on_next
        .lock()
        .iter()
        .all(|r| !matches!(r, Request::Ack { .. })));
}

/// With no leader known anywhere, a request is asked again round the addresses until the
/// failover time-out, then fails with "not the leader"; a commit follows a leader named
/// later.
#[tokio::test]
async fn without_a_leader_the_request_waits_within_the_failover_timeout() {
    let (a, on_a) = node(|_| not_leader(None)).await;
    let (b, _) = node(|_| not_leader(None)).await;
    let config = ClientConfig::new(format!("{a},{b}"))
        .with_failover_timeout(std::time::Duration::from_millis(500));
    let client = Client::connect(config).await.unwrap();
    let r = client.commit(halfmq_types::TxnId(3)).await;
    assert_eq!(protocol::leader_addr(&r.unwrap_err()), Some(None));
    assert!(on_a.lock().len() >= 2, "asked round the addresses");

    let (leader, on_leader) = node(|_| Act::Answer(Response::Ok)).await;
    let named = leader.clone();
    let (c, _) = node(move |_| not_leader(Some(&named))).await;
    let client = Client::connect(ClientConfig::new(format!("{a},{c}")))
        .await
        .unwrap();
    client.commit(halfmq_types::TxnId(3)).await.unwrap();
    assert!(matches!(on_leader.lock()[..], [Request::Commit { txn: 3 }]));
}

/// Giving up on several addresses that all refused, the error names each one and what it
/// said, not only the last one asked; with one address the error is that address's own.
#[tokio::test]
async fn a_client_that_reaches_no_address_names_every_one_it_tried() {
    // Ports that were free a moment ago: connecting is refused.
    let mut closed = Vec::new();
    for _ in 0..3 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        closed.push(l.local_addr().unwrap().to_string());
    }
    let config = ClientConfig::new(closed.join(","))
        .with_failover_timeout(std::time::Duration::from_millis(300));
    let Err(err) = Client::connect(config).await else {
        panic!("nothing listens");
    };
    let Error::Disconnected { addr, reason } = &err else {
        panic!("not a disconnection: {err}");
    };
    assert_eq!(addr, &closed.join(","), "every address, in the order asked");
    for a in &closed {
        assert!(
            reason.contains(&format!("{a}: ")),
            "{a} and its failure: {reason}"
        );
    }

    let config = ClientConfig::new(closed[0].clone());
    let Err(err) = Client::connect(config).await else {
        panic!("nothing listens");
    };
    assert!(
        matches!(&err, Error::Disconnected { addr, .. } if addr == &closed[0]),
        "{err}"
    );
}

/// A scripted leader ([`node`]): it takes `RegisterChecker` and `Stats`.
async fn scripted_leader() -> (String, Arc<parking_lot::Mutex<Vec<Request>>>) {
    node(|req| match req {
        Request::RegisterChecker { .. } => Act::Answer(Response::Ok),
        Request::Stats => Act::Answer(Response::Stats("{}".into())),
        other => panic!("the scripted leader does not expect {other:?}"),
    })
    .await
}

/// A scripted follower of `leader` ([`node`]): every request is answered `NOT_LEADER`
/// naming it.
async fn scripted_follower(leader: &str) -> (String, Arc<parking_lot::Mutex<Vec<Request>>>) {
    let leader = leader.to_owned();
    node(move |_| not_leader(Some(&leader))).await
}

#[tokio::test]
async fn with_several_addresses_the_client_follows_the_leader_and_registers_its_checker_there() {
    let (leader, on_leader) = scripted_leader().await;
    let (follower, on_follower) = scripted_follower(&leader).await;
    // An address nothing listens on: the client moves past it.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let config = ClientConfig::new(format!("{dead}, {follower},{leader}"));
    let client = Client::connect(config).await.unwrap();
    let checker = Arc::new(|_: &halfmq_types::HalfMessage| halfmq_types::CheckAnswer::Commit);
    client.register_checker("payments", checker).await.unwrap();
    let stats = client.call(Request::Stats).await;
    assert!(matches!(stats, Ok(Response::Stats(_))), "{stats:?}");
    let carried = on_leader.lock().clone();
    assert!(
        carried.iter().any(|r| matches!(
            r,
            Request::RegisterChecker { producer_group } if producer_group == "payments"
        )),
        "{carried:?}"
    );
    assert!(
        matches!(carried.last(), Some(Request::Stats)),
        "{carried:?}"
    );
    // The follower refused what it was asked (the registration) and was asked nothing after.
    let refused = on_follower.lock().clone();
    assert!(
        refused
            .iter()
            .all(|r| matches!(r, Request::RegisterChecker { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn with_one_address_not_leader_is_the_callers_to_follow() {
    let (leader, on_leader) = scripted_leader().await;
    let (follower, _) = scripted_follower(&leader).await;
    let client = Client::connect(ClientConfig::new(&follower)).await.unwrap();
    let e = client
        .call(Request::Stats)
        .await
        .expect_err("a follower refuses");
    assert_eq!(protocol::leader_addr(&e), Some(Some(leader)), "{e}");
    assert!(on_leader.lock().is_empty());
}
