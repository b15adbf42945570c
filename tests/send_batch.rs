//! Batch sends (issue #14): `Broker::send_batch` on the simulated disk, the `SendBatch`
//! request and the client's automatic batching against the real broker binary, and `kill -9`
//! under batched load.
//!
//! What these tests prove: a batch is one run of records acknowledged by one group commit,
//! each message with its own receipt in batch order; a message that fails its checks fails
//! alone; a batch that cannot be taken (unknown topic, too many messages or bytes) fails as a
//! whole; idempotency keys repeated inside a batch, or sent before, answer the original's
//! receipt and store nothing; batches claiming the same keys in opposite orders do not wait
//! for each other forever; over the network each message (sent explicitly in a batch, or
//! coalesced from concurrent sends) gets the answer the embedded broker gives; and every
//! batched message the broker acknowledged survives `kill -9` at its queue and offset.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{open_sim, small_segments, visible, BrokerProc, CHECKPOINT_BYTES_NEVER};
use halfmq::{Broker, BrokerConfig, Error, Message, SendReceipt, SEND_BATCH_MESSAGES_MAX};
use halfmq_client::{Client, ClientConfig, Producer};
use halfmq_store::sim::SimStorage;

const TOPIC: &str = "orders";

/// A broker on the simulated disk (its metadata in `dir`), without auto-created topics.
fn broker(disk: &SimStorage, dir: &tempfile::TempDir) -> Arc<Broker> {
    let mut cfg = small_segments(dir.path(), CHECKPOINT_BYTES_NEVER);
    cfg.auto_create_topics = false;
    let b = open_sim(disk, &cfg);
    b.create_topic(TOPIC, 4).expect("create topic");
    b
}

fn keyed(key: &str, body: &str) -> Message {
    Message::new(body.as_bytes().to_vec()).with_key(key.to_owned())
}

fn receipts(out: Vec<halfmq::Result<SendReceipt>>) -> Vec<SendReceipt> {
    out.into_iter()
        .map(|r| r.expect("every message of the batch is stored"))
        .collect()
}

#[test]
fn a_batch_is_one_group_commit_with_a_receipt_per_message_in_order() {
    let (disk, dir) = (SimStorage::new(), tempfile::tempdir().unwrap());
    let b = broker(&disk, &dir);
    let msgs: Vec<Message> = (0..40)
        .map(|i| keyed(&format!("k{}", i % 5), &format!("body-{i}").repeat(20)))
        .collect();
    let before = b.stats().unwrap().log;
    let got = receipts(b.send_batch(TOPIC, &msgs).unwrap());
    let after = b.stats().unwrap().log;
    assert_eq!(after.syncs - before.syncs, 1, "one group commit");
    assert_eq!(after.records - before.records, 40);
    // In the log in batch order; per queue, offsets in batch order from 0.
    assert!(got.windows(2).all(|w| w[0].log_offset < w[1].log_offset));
    let mut next: HashMap<u32, u64> = HashMap::new();
    for r in &got {
        let n = next.entry(r.queue).or_default();
        assert_eq!(
            (r.topic.as_str(), r.offset, r.duplicate),
            (TOPIC, *n, false)
        );
        *n += 1;
    }
    // Each receipt says where its own message is.
    let by_place: HashMap<(u32, u64), Vec<u8>> = visible(&b, TOPIC)
        .into_iter()
        .map(|d| ((d.queue, d.offset), d.body))
        .collect();
    assert_eq!(by_place.len(), 40);
    for (r, m) in got.iter().zip(&msgs) {
        assert_eq!(by_place[&(r.queue, r.offset)], m.body);
    }
    // The same messages sent one by one land on the same queues.
    for (r, m) in got.iter().zip(&msgs) {
        assert_eq!(b.send(TOPIC, m).unwrap().queue, r.queue);
    }
}

#[test]
fn a_bad_message_fails_alone_and_a_bad_batch_as_a_whole() {
    let (disk, dir) = (SimStorage::new(), tempfile::tempdir().unwrap());
    let b = broker(&disk, &dir);
    let too_large = Message::new(vec![0u8; 64 * 1024]);
    let reserved = Message::new("x").with_property("halfmq.mine", "1");
    let msgs = [
        Message::new("first"),
        too_large,
        Message::new("third"),
        reserved,
        Message::new("fifth"),
    ];
    let out = b.send_batch(TOPIC, &msgs).unwrap();
    assert!(matches!(out[1], Err(Error::Invalid { .. })), "{:?}", out[1]);
    assert!(matches!(out[3], Err(Error::Invalid { .. })), "{:?}", out[3]);
    let stored: Vec<_> = [0, 2, 4]
        .iter()
        .map(|&i| out[i].as_ref().unwrap())
        .collect();
    let bodies: Vec<Vec<u8>> = visible(&b, TOPIC).into_iter().map(|d| d.body).collect();
    assert_eq!(bodies.len(), 3, "{stored:?}");
    for want in ["first", "third", "fifth"] {
        assert!(bodies.contains(&want.as_bytes().to_vec()), "{want}");
    }

    let e = b.send_batch("nope", &msgs[..1]).unwrap_err();
    assert!(
        matches!(e, Error::UnknownTopic(ref t) if t == "nope"),
        "{e:?}"
    );
    let many = vec![Message::new("m"); SEND_BATCH_MESSAGES_MAX + 1];
    assert!(matches!(
        b.send_batch(TOPIC, &many),
        Err(Error::Invalid { what: "batch", .. })
    ));
    let heavy = vec![Message::new(vec![1u8; 1024 * 1024]); 5];
    assert!(matches!(
        b.send_batch(TOPIC, &heavy),
        Err(Error::Invalid { what: "batch", .. })
    ));
    assert!(b.send_batch(TOPIC, &[]).unwrap().is_empty());
    assert_eq!(
        visible(&b, TOPIC).len(),
        3,
        "the refused batches stored nothing"
    );
}

#[test]
fn idempotency_keys_inside_a_batch_and_across_answer_the_original() {
    let (disk, dir) = (SimStorage::new(), tempfile::tempdir().unwrap());
    let b = broker(&disk, &dir);
    let m = |key: &str, body: &str| Message::new(body).with_idempotency_key(key);
    let before = b.send(TOPIC, &m("k3", "sent-before")).unwrap();
    let out = receipts(
        b.send_batch(
            TOPIC,
            &[
                m("k1", "a"),
                m("k2", "b"),
                m("k1", "again"),
                Message::new("no-key"),
                m("k3", "late"),
                m("k2", "again"),
            ],
        )
        .unwrap(),
    );
    assert!(!out[0].duplicate && !out[1].duplicate && !out[3].duplicate);
    let place = |r: &SendReceipt| (r.queue, r.offset, r.log_offset);
    assert!(out[2].duplicate && place(&out[2]) == place(&out[0]));
    assert!(out[5].duplicate && place(&out[5]) == place(&out[1]));
    assert!(out[4].duplicate && place(&out[4]) == place(&before));
    // A later batch, and a plain send, repeat keys of this one.
    let again = receipts(b.send_batch(TOPIC, &[m("k2", "x"), m("k1", "y")]).unwrap());
    assert_eq!(place(&again[0]), place(&out[1]));
    assert_eq!(place(&again[1]), place(&out[0]));
    assert_eq!(
        place(&b.send(TOPIC, &m("k1", "z")).unwrap()),
        place(&out[0])
    );
    let mut bodies: Vec<String> = visible(&b, TOPIC)
        .into_iter()
        .map(|d| String::from_utf8(d.body).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["a", "b", "no-key", "sent-before"]);
}

#[test]
fn batches_claiming_the_same_keys_in_opposite_orders_all_finish() {
    let (disk, dir) = (SimStorage::new(), tempfile::tempdir().unwrap());
    let b = broker(&disk, &dir);
    const THREADS: usize = 4;
    const ROUNDS: usize = 50;
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (b, start) = (b.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for round in 0..ROUNDS {
                    let mut keys: Vec<String> = (0..6).map(|k| format!("r{round}-k{k}")).collect();
                    if t % 2 == 1 {
                        keys.reverse();
                    }
                    let msgs: Vec<Message> = keys
                        .iter()
                        .map(|k| Message::new(format!("{k} by {t}")).with_idempotency_key(k))
                        .collect();
                    receipts(b.send_batch(TOPIC, &msgs).unwrap());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(visible(&b, TOPIC).len(), ROUNDS * 6, "each key stored once");
}

// ---------------------------------------------------------------------------------------
// Over the network
// ---------------------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn client_config(addr: &str) -> ClientConfig {
    ClientConfig::new(addr).with_request_timeout(Duration::from_secs(20))
}

#[test]
fn over_the_network_each_message_gets_its_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), &[]);
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(client_config(&broker.addr)).await.unwrap();
        client.create_topic(TOPIC, 4).await.unwrap();
        let producer = Producer::new(client.clone());
        let msgs = [
            keyed("a", "one").with_idempotency_key("i1"),
            Message::new("bad").with_property("halfmq.mine", "1"),
            keyed("b", "two").with_idempotency_key("i1"),
            Message::new("three"),
        ];
        let out = producer.send_batch(TOPIC, &msgs).await.unwrap();
        let first = out[0].as_ref().unwrap();
        assert!(
            matches!(&out[1], Err(Error::Invalid { .. })),
            "{:?}",
            out[1]
        );
        let dup = out[2].as_ref().unwrap();
        assert!(dup.duplicate && (dup.queue, dup.offset) == (first.queue, first.offset));
        assert!(out[3].is_ok());
        // A topic no one may send to refuses the batch as a whole.
        let e = producer
            .send_batch("no/such", &msgs[..1])
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
        assert!(producer.send_batch(TOPIC, &[]).await.unwrap().is_empty());

        // Concurrent sends on one connection: coalesced or not, each its own receipt.
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let msg = keyed(&format!("c{i}"), &format!("concurrent-{i}"));
                    (i, client.send(TOPIC, &msg).await.unwrap())
                })
            })
            .collect();
        let mut places = std::collections::HashSet::new();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert!(!r.duplicate, "{i}");
            assert!(
                places.insert((r.queue, r.offset)),
                "{i}: a place of its own"
            );
        }
    });
    drop(rt);
    broker.terminate();
    // Each receipt named its own message: read back embedded.
    let b = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let all = visible(&b, TOPIC);
    assert_eq!(all.len(), 2 + 200);
    for d in all.iter().filter(|d| d.key.starts_with('c')) {
        assert_eq!(d.body, format!("concurrent-{}", &d.key[1..]).into_bytes());
    }
}

/// What one producer of the kill test saw acknowledged: key → (queue, offset).
type Acked = Arc<Mutex<HashMap<String, (u32, u64)>>>;

#[test]
fn every_acknowledged_batched_message_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProc::start(dir.path(), &[]);
    let acked: Acked = Arc::default();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(client_config(&broker.addr)).await.unwrap();
        client.create_topic(TOPIC, 4).await.unwrap();
        // Explicit batches on their own connections, and many concurrent single sends on
        // one connection (coalesced by the client).
        for p in 0..3 {
            let client = Client::connect(client_config(&broker.addr)).await.unwrap();
            let acked = acked.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let msgs: Vec<Message> = (0..16)
                        .map(|j| {
                            let key = format!("b{p}.{i}.{j}");
                            keyed(&key, &format!("{key};").repeat(10))
                        })
                        .collect();
                    let Ok(out) = client.send_batch(TOPIC, &msgs).await else {
                        return;
                    };
                    let mut acked = acked.lock().unwrap();
                    for (m, r) in msgs.iter().zip(out) {
                        let r = r.expect("a good message is stored");
                        acked.insert(m.key.clone(), (r.queue, r.offset));
                    }
                }
            });
        }
        for p in 0..32 {
            let (client, acked) = (client.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0u64.. {
                    let key = format!("s{p}.{i}");
                    let msg = keyed(&key, &format!("{key};").repeat(10));
                    let Ok(r) = client.send(TOPIC, &msg).await else {
                        return;
                    };
                    acked.lock().unwrap().insert(key, (r.queue, r.offset));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < 3000 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker.kill9();
    });
    drop(rt);
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 3000, "only {} acknowledged", acked.len());
    // Recovery after the kill, embedded on the same directory.
    let b = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let mut stored: HashMap<String, (u32, u64)> = HashMap::new();
    for d in visible(&b, TOPIC) {
        assert_eq!(
            d.body,
            format!("{};", d.key).repeat(10).into_bytes(),
            "{}",
            d.key
        );
        assert!(
            stored.insert(d.key.clone(), (d.queue, d.offset)).is_none(),
            "{} twice",
            d.key
        );
    }
    for (key, place) in &acked {
        assert_eq!(
            stored.get(key),
            Some(place),
            "{key} acknowledged at {place:?}"
        );
    }
    let batched = acked.keys().filter(|k| k.starts_with('b')).count();
    assert!(batched > 0, "explicit batches were acknowledged");
}
