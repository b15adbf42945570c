//! Library clients given every node's address of three real `halfmq broker --peers`
//! processes follow the leader: producers (and a transactional producer committing) keep
//! sending while the leader is killed with SIGKILL, and every send they had acknowledged is
//! on every node exactly once; a consumer consumes and acks across a leader change, and
//! afterwards no node has anything left to deliver to its group.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::ClusterProcs;
use common::load;
use halfmq::{HalfOptions, Message};
use halfmq_client::{Consumer, Producer};
use parking_lot::Mutex;

const TOPIC: &str = "orders";
const PRODUCERS: usize = 2;
/// Bound on any one wait, so that a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(90);

type Acked = Arc<Mutex<BTreeSet<String>>>;

/// Wait until `acked` holds `more` keys more than it does now.
fn wait_for_more(acked: &Acked, more: usize, what: &str) {
    let want = acked.lock().len() + more;
    let deadline = Instant::now() + WAIT;
    while acked.lock().len() < want {
        assert!(
            Instant::now() < deadline,
            "{what}: no {more} more acknowledged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Send messages keyed `prefix-<i>` one after the other until `stop`, recording each the
/// cluster acknowledged; the first error ends it (and the test).
async fn produce(producer: Producer, prefix: String, acked: Acked, stop: Arc<AtomicBool>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}-{i}");
        let msg = Message::new(format!("body {i}")).with_key(&key);
        match producer.send(TOPIC, &msg).await {
            Ok(_) => acked.lock().insert(key),
            Err(e) => panic!("{prefix}: send {i} failed while following the leader: {e}"),
        };
        i += 1;
    }
}

/// Half messages keyed `txn-<i>`, each committed, until `stop`; a key is acknowledged
/// once its commit was.
async fn transact(client: halfmq_client::Client, acked: Acked, stop: Arc<AtomicBool>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("txn-{i}");
        let msg = Message::new("half").with_key(&key);
        let opts = HalfOptions::default();
        let txn = match client.send_half(TOPIC, &msg, "payers", opts).await {
            Ok(t) => t,
            Err(e) => panic!("half {i} failed while following the leader: {e}"),
        };
        if let Err(e) = client.commit(txn).await {
            panic!("commit of {txn} failed while following the leader: {e}");
        }
        acked.lock().insert(key);
        i += 1;
    }
}

#[test]
fn library_producers_follow_the_leader_through_kills_exactly_once() {
    let mut c = ClusterProcs::start();
    let rt = load::runtime();
    let addrs = c.addr_list();
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let client = rt.block_on(c.connect(&addrs, &format!("producer {p}")));
        let task = produce(
            Producer::new(client),
            format!("p{p}"),
            acked.clone(),
            stop.clone(),
        );
        tasks.push(rt.spawn(task));
    }
    let client = rt.block_on(c.connect(&addrs, "transactions"));
    tasks.push(rt.spawn(transact(client, acked.clone(), stop.clone())));
    for round in 0..2 {
        wait_for_more(&acked, 50, "before the kill");
        let (leader, term) = c.leader();
        c.kill(leader);
        let killed = Instant::now();
        wait_for_more(
            &acked,
            50,
            &format!("round {round}, after killing node {leader}"),
        );
        eprintln!(
            "round {round}: killed leader {leader} (term {term}); sends went on after {:?}",
            killed.elapsed()
        );
        c.restart(leader);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        rt.block_on(t).expect("a sender ended with an error");
    }
    let acked = acked.lock().clone();
    assert!(acked.iter().any(|k| k.starts_with("txn-")), "no commit");
    c.assert_stored_once(TOPIC, &acked, &BTreeSet::new(), WAIT);
}

#[test]
fn a_consumer_follows_the_leader_and_its_acks_reach_every_node() {
    const MESSAGES: usize = 300;
    const GROUP: &str = "workers";
    let mut c = ClusterProcs::start();
    let rt = load::runtime();
    let addrs = c.addr_list();
    let sent: BTreeSet<String> = rt.block_on(async {
        let producer = Producer::new(c.connect(&addrs, "producer").await);
        let mut sent = BTreeSet::new();
        for i in 0..MESSAGES {
            let key = format!("m-{i}");
            let msg = Message::new("work").with_key(&key);
            producer.send(TOPIC, &msg).await.expect("a send");
            sent.insert(key);
        }
        sent
    });
    let consumer = Consumer::new(rt.block_on(c.connect(&addrs, "consumer")), GROUP, TOPIC);
    let mut acked = BTreeSet::new();
    let mut killed = false;
    let deadline = Instant::now() + WAIT;
    while acked.len() < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "acked {} of {MESSAGES} across the leader change",
            acked.len()
        );
        if !killed && acked.len() >= MESSAGES / 3 {
            let (leader, _) = c.leader();
            c.kill(leader);
            killed = true;
        }
        let got = rt
            .block_on(consumer.poll(20, Duration::from_millis(500)))
            .expect("a poll following the leader");
        // An ack whose fate was lost with its node is not made again by the client; the
        // message is delivered again (the new leader holds no lease on it) and acked then.
        match rt.block_on(consumer.ack_many(&got)) {
            Ok(()) => acked.extend(got.into_iter().map(|d| d.key)),
            Err(e) => eprintln!("an ack of {} messages failed: {e}", got.len()),
        }
    }
    assert!(killed);
    assert_eq!(acked, sent);
    // Every surviving node has the acks: the group has nothing left there (its backlog
    // counts leased messages too).
    for (id, addr) in c.addrs.iter().filter(|(id, _)| c.nodes.contains_key(id)) {
        let client = rt.block_on(c.connect(addr, "check"));
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = rt.block_on(client.stats()).expect("stats");
            let queues: Vec<_> = stats.queues.iter().filter(|q| q.topic == TOPIC).collect();
            let stored: u64 = queues.iter().map(|q| q.messages).sum();
            let backlog: Option<u64> = queues
                .iter()
                .filter(|q| q.messages > 0)
                .map(|q| Some(q.groups.iter().find(|g| g.group == GROUP)?.backlog))
                .sum();
            if stored == MESSAGES as u64 && backlog == Some(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id}: {stored} messages stored, the group's backlog {backlog:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
