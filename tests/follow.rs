//! Library clients given every node's address of three real `halfmq broker --peers`
//! processes follow the leader: producers (and a transactional producer committing) keep
//! sending while the leader is killed with SIGKILL, and every send they had acknowledged is
//! on every node exactly once; a consumer consumes and acks across a leader change, and
//! afterwards no node has anything left to deliver to its group.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::ClusterProcs;
use common::load;
use halfmq::{Delivery, GroupSettings, HalfOptions, Message, NackOutcome, PollOptions};
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

/// Poll `group` through `client` (following the leader, with `opts`) until `n` messages came:
/// them, in the order received.
fn poll_n(
    rt: &tokio::runtime::Runtime,
    client: &halfmq_client::Client,
    group: &str,
    n: usize,
    opts: &PollOptions,
) -> Vec<Delivery> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} delivered", got.len());
        let wait = Duration::from_millis(500);
        let more = rt
            .block_on(client.poll_wait_with(group, TOPIC, n - got.len(), wait, opts))
            .expect("a poll following the leader");
        got.extend(more);
    }
    got
}

/// Send messages keyed `keys` through `client`.
fn send_keys(rt: &tokio::runtime::Runtime, client: &halfmq_client::Client, keys: &[String]) {
    for key in keys {
        let msg = Message::new("work").with_key(key);
        rt.block_on(client.send(TOPIC, &msg)).expect("a send");
    }
}

/// A consumer acks some messages, nacks others (they wait 15 s, longer than the steps up
/// to the kill take), moves some to the dead-letter queue by receipt and nacks others past
/// the group's max_retries, and leaves the last ten leased (3 s); then the leader is killed
/// with SIGKILL. The new leader
/// redelivers the nacked ones as their second attempts, and the unsettled ones once their
/// lease has run out, as their second attempts too (the delivery on the old leader
/// counted); nothing acked or dead-lettered is delivered again; every survivor, and the
/// old leader restarted, lists every dead letter exactly once with its failure count.
#[test]
fn nacks_and_dead_letters_survive_the_leaders_death_with_their_counts() {
    const GROUP: &str = "retrying";
    let mut c = ClusterProcs::start();
    let rt = load::runtime();
    let addrs = c.addr_list();
    let client = rt.block_on(c.connect(&addrs, "consumer"));
    let settings = GroupSettings {
        max_retries: Some(2),
        ..GroupSettings::default()
    };
    rt.block_on(client.set_group_settings(GROUP, &settings))
        .expect("group settings");
    let keys =
        |r: std::ops::Range<usize>| -> Vec<String> { r.map(|i| format!("m-{i:02}")).collect() };
    send_keys(&rt, &client, &keys(0..30));
    let first = poll_n(&rt, &client, GROUP, 30, &PollOptions::default());
    let by_key: BTreeMap<String, Delivery> =
        first.into_iter().map(|d| (d.key.clone(), d)).collect();
    assert_eq!(by_key.keys().cloned().collect::<Vec<_>>(), keys(0..30));
    let at = |k: &String| (by_key[k].queue, by_key[k].offset);
    let acks: Vec<(u32, u64)> = keys(0..10).iter().map(at).collect();
    rt.block_on(client.ack_many(GROUP, TOPIC, &acks))
        .expect("acks");
    for k in keys(10..20) {
        let (q, o) = at(&k);
        let r = rt.block_on(client.nack(GROUP, TOPIC, q, o, Some(Duration::from_secs(15))));
        assert!(
            matches!(r, Ok(NackOutcome::Redeliver { attempt: 2, .. })),
            "{k}: {r:?}"
        );
    }
    for k in keys(20..25) {
        let receipt = by_key[&k].receipt.expect("a receipt");
        rt.block_on(client.dead_letter_receipt(GROUP, TOPIC, &receipt, "poison"))
            .expect("moved to the dead-letter queue");
    }
    // Nacked three times (at once): past max_retries 2, the third moves them.
    for attempt in 1..=3u32 {
        let got = if attempt == 1 {
            keys(25..30).iter().map(|k| by_key[k].clone()).collect()
        } else {
            poll_n(&rt, &client, GROUP, 5, &PollOptions::default())
        };
        for d in got {
            assert_eq!(d.attempt, attempt, "{}", d.key);
            let r = rt.block_on(client.nack(GROUP, TOPIC, d.queue, d.offset, Some(Duration::ZERO)));
            match (attempt, r) {
                (3, Ok(NackOutcome::DeadLettered { .. })) => {}
                (1 | 2, Ok(NackOutcome::Redeliver { .. })) => {}
                (_, r) => panic!("{} nacked as attempt {attempt}: {r:?}", d.key),
            }
        }
    }
    // Ten more, leased for 3 s and never settled.
    send_keys(&rt, &client, &keys(30..40));
    let short = PollOptions::default().with_lease(Some(Duration::from_secs(3)));
    let leased = poll_n(&rt, &client, GROUP, 10, &short);
    assert!(
        leased
            .iter()
            .all(|d| d.attempt == 1 && d.key.as_str() >= "m-30"),
        "{leased:?}"
    );

    let (leader, _) = c.leader();
    c.kill(leader);
    // The new leader: the nacked ones and the unsettled ones, each as its second attempt.
    let mut want: BTreeSet<String> = keys(10..20).into_iter().collect();
    want.extend(keys(30..40));
    let again = poll_n(&rt, &client, GROUP, want.len(), &PollOptions::default());
    let attempts: BTreeMap<String, u32> =
        again.iter().map(|d| (d.key.clone(), d.attempt)).collect();
    assert_eq!(attempts.len(), again.len(), "delivered twice: {again:?}");
    assert_eq!(attempts.keys().cloned().collect::<BTreeSet<_>>(), want);
    assert!(attempts.values().all(|a| *a == 2), "{attempts:?}");
    let acks: Vec<(u32, u64)> = again.iter().map(|d| (d.queue, d.offset)).collect();
    rt.block_on(client.ack_many(GROUP, TOPIC, &acks))
        .expect("acks");
    let more = rt
        .block_on(client.poll_wait(GROUP, TOPIC, 100, Duration::from_secs(2)))
        .expect("a poll");
    assert!(more.is_empty(), "delivered again: {more:?}");

    // Every dead letter exactly once, with its count, on every node.
    c.restart(leader);
    let mut want: BTreeMap<String, u32> = keys(20..25).into_iter().map(|k| (k, 1)).collect();
    want.extend(keys(25..30).into_iter().map(|k| (k, 3)));
    for (id, addr) in &c.addrs {
        let node = rt.block_on(c.connect(addr, "check"));
        let deadline = Instant::now() + WAIT;
        loop {
            let listed = match rt.block_on(node.dead_letters(GROUP, 0, 100)) {
                Ok(l) => l,
                Err(e) if Instant::now() > deadline => panic!("node {id}: {e}"),
                Err(_) => Vec::new(),
            };
            let got: BTreeMap<String, u32> =
                listed.iter().map(|d| (d.key.clone(), d.failures)).collect();
            if listed.len() >= want.len() || Instant::now() > deadline {
                assert_eq!(
                    listed.len(),
                    got.len(),
                    "node {id}: a dead letter twice: {listed:?}"
                );
                let log = c.nodes.get(id).map(|p| p.stderr()).unwrap_or_default();
                assert_eq!(got, want, "node {id}; its log:\n{log}");
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
