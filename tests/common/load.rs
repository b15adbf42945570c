//! A mixed load through the network client until the broker dies under it, and the reading
//! back after the restart: shared by the crash tests that run the real broker
//! (`tests/kill9.rs`, `tests/powerloss.rs`). Each load task runs until its first error (the
//! broker died) and records what the broker acknowledged before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halfmq::{HalfOptions, Message};
use halfmq_client::{Client, ClientConfig, Consumer, Delivery, SendReceipt};

/// The producer group of the transactional producers (and of the checker after a restart).
pub const PRODUCER_GROUP: &str = "pay-svc";
/// The consumer group of the load's consumers.
pub const WORKERS: &str = "workers";
/// Longest wait for check-back to resolve every pending transaction after a restart.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A struct of `u64` counters, declared with its fields' docs, that adds up field by field
/// (`totals += round`): each crash test's tally of one round, summed over the run. (Only the
/// crash tests sum counts; the other binaries that include this module do not.)
#[allow(unused_macros)]
macro_rules! counts {
    ($(#[$attr:meta])* struct $name:ident { $($(#[$doc:meta])* $field:ident,)* }) => {
        $(#[$attr])*
        #[derive(Default, Debug, Clone, Copy)]
        struct $name {
            $($(#[$doc])* $field: u64,)*
        }

        impl std::ops::AddAssign for $name {
            fn add_assign(&mut self, o: $name) {
                $(self.$field += o.$field;)*
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use counts;

/// The body of the message with `key`: derived from the key, so a served message can be
/// checked byte for byte; 1 to 40 repetitions, so lengths vary.
pub fn body_of(key: &str) -> Vec<u8> {
    let reps = 1 + (crc32fast::hash(key.as_bytes()) % 40) as usize;
    format!("{key};").repeat(reps).into_bytes()
}

/// A runtime for the clients of one phase: dropping it at the end of the phase closes
/// every connection of the phase. (The checker of one round's verification must not answer
/// during the next round's load, where abandoned halves must stay pending.)
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The seed of a run: `var` if set (a replay), else one from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    super::env_u64(var).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    })
}

/// A client of the broker at `addr`, named `name`.
pub async fn connect(addr: &str, name: &str) -> Client {
    let config = ClientConfig::new(addr)
        .with_name(name.to_owned())
        .with_request_timeout(Duration::from_secs(30));
    Client::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect {name} to {addr}: {e}"))
}

/// How a load task ended: its first error, and when.
pub struct Ended {
    pub error: String,
    pub at: Instant,
}

impl Ended {
    /// Ended now, by `e`.
    fn by(e: halfmq::Error) -> Ended {
        Ended {
            error: e.to_string(),
            at: Instant::now(),
        }
    }
}

/// What a producer of plain messages had acknowledged.
#[derive(Default)]
pub struct Sends {
    /// key → receipt, for every acknowledged send.
    pub acked: Vec<(String, SendReceipt)>,
    /// The send without an answer when the broker died.
    pub in_flight: Option<String>,
}

/// Plain sends of `prefix.0`, `prefix.1`, ... (`keyed`: with an idempotency key equal to
/// the message key) until the first error; `acked` counts the acknowledged ones.
pub async fn producer(
    client: Client,
    topic: String,
    prefix: String,
    keyed: bool,
    acked: Arc<AtomicU64>,
) -> (Sends, Ended) {
    let mut log = Sends::default();
    for i in 0u64.. {
        let key = format!("{prefix}.{i}");
        let mut msg = Message::new(body_of(&key)).with_key(key.clone());
        if keyed {
            msg = msg.with_idempotency_key(key.clone());
        }
        log.in_flight = Some(key.clone());
        match client.send(&topic, &msg).await {
            Ok(r) => {
                assert_eq!(r.topic, topic);
                assert!(
                    !r.duplicate,
                    "{key} was sent once but is a duplicate: {r:?}"
                );
                log.acked.push((key, r));
                log.in_flight = None;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return (log, Ended::by(e)),
        }
    }
    unreachable!("the loop ends only by returning")
}

/// The keys `logs` had acknowledged, and those in flight when the broker died.
pub fn sent_keys(logs: &[(Sends, Ended)]) -> (HashSet<&str>, HashSet<&str>) {
    let acked = logs
        .iter()
        .flat_map(|(l, _)| l.acked.iter().map(|(k, _)| k.as_str()))
        .collect();
    let in_flight = logs
        .iter()
        .filter_map(|(l, _)| l.in_flight.as_deref())
        .collect();
    (acked, in_flight)
}

/// What a transactional producer means to do with a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Commit,
    Rollback,
    /// Send the half, then nothing: check-back must settle it. `true`: the producer's local
    /// transaction succeeded (check-back answers commit).
    Abandon(bool),
}

impl Plan {
    /// 45 % commits, 35 % rollbacks, the rest abandoned.
    fn pick(rng: &mut fastrand::Rng) -> Plan {
        match rng.u32(0..100) {
            0..45 => Plan::Commit,
            45..80 => Plan::Rollback,
            _ => Plan::Abandon(rng.bool()),
        }
    }

    pub fn commits(self) -> bool {
        matches!(self, Plan::Commit | Plan::Abandon(true))
    }
}

/// One transaction of a transactional producer.
pub struct Txn {
    pub key: String,
    pub plan: Plan,
    /// The half was acknowledged with this id.
    pub id: Option<u64>,
    /// The commit or rollback was acknowledged.
    pub outcome_acked: bool,
}

/// Transactions of `prefix.0`, `prefix.1`, ... with plans drawn from `seed`, until the
/// first error. Each intent (commits or not) goes into `intents` before its half is sent,
/// as a payment service knows whether it charged the card before it could be asked;
/// `acked` counts the acknowledged commits and rollbacks.
pub async fn txn_producer(
    client: Client,
    topic: String,
    prefix: String,
    seed: u64,
    intents: Arc<Mutex<HashMap<String, bool>>>,
    acked: Arc<AtomicU64>,
) -> (Vec<Txn>, Ended) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut log = Vec::new();
    for i in 0u64.. {
        let key = format!("{prefix}.{i}");
        let plan = Plan::pick(&mut rng);
        intents.lock().unwrap().insert(key.clone(), plan.commits());
        log.push(Txn {
            key: key.clone(),
            plan,
            id: None,
            outcome_acked: false,
        });
        let msg = Message::new(body_of(&key)).with_key(key.clone());
        let txn = match client
            .send_half(&topic, &msg, PRODUCER_GROUP, HalfOptions::default())
            .await
        {
            Ok(t) => t,
            Err(e) => return (log, Ended::by(e)),
        };
        let rec = log.last_mut().expect("pushed above");
        rec.id = Some(txn.0);
        let outcome = match plan {
            Plan::Commit => client.commit(txn).await,
            Plan::Rollback => client.rollback(txn).await,
            Plan::Abandon(_) => continue,
        };
        if let Err(e) = outcome {
            return (log, Ended::by(e));
        }
        rec.outcome_acked = true;
        acked.fetch_add(1, Ordering::Relaxed);
    }
    unreachable!("the loop ends only by returning")
}

/// What a consumer of [`WORKERS`] saw.
#[derive(Default)]
pub struct Consumed {
    /// Every delivery, in order.
    pub seen: Vec<Delivery>,
    /// (topic, queue, offset) whose ack the broker acknowledged.
    pub acked: Vec<(String, u32, u64)>,
}

/// Poll `topic` as [`WORKERS`] and ack everything until the first error.
pub async fn consumer(client: Client, topic: String) -> (Consumed, Ended) {
    let c = Consumer::new(client, WORKERS, &topic);
    let mut log = Consumed::default();
    loop {
        let got = match c.poll(32, Duration::from_millis(200)).await {
            Ok(g) => g,
            Err(e) => return (log, Ended::by(e)),
        };
        log.seen.extend(got.iter().cloned());
        if got.is_empty() {
            continue;
        }
        if let Err(e) = c.ack_many(&got).await {
            return (log, Ended::by(e));
        }
        log.acked
            .extend(got.iter().map(|d| (d.topic.clone(), d.queue, d.offset)));
    }
}

/// The topics of one round.
pub struct Topics {
    pub plain: String,
    pub keyed: String,
    pub pay: String,
}

impl Topics {
    pub fn of_round(round: u64) -> Topics {
        Topics {
            plain: format!("plain-{round}"),
            keyed: format!("keyed-{round}"),
            pay: format!("pay-{round}"),
        }
    }
}

/// How many of each load task run: producers of plain messages (in `Topics::plain`), of
/// messages with idempotency keys (in `Topics::keyed`) and of transactions (in
/// `Topics::pay`), and consumers on each topic that has producers. A topic without
/// producers is not created.
pub struct Shape {
    pub queues: u32,
    pub plain: usize,
    pub keyed: usize,
    pub txn: usize,
    pub consumers: usize,
}

/// What the load's tasks recorded, each with how it ended.
pub struct Load {
    pub plain: Vec<(Sends, Ended)>,
    pub keyed: Vec<(Sends, Ended)>,
    pub txns: Vec<(Vec<Txn>, Ended)>,
    pub consumed: Vec<(Consumed, Ended)>,
}

/// Run a load of `shape` on the broker at `addr` (transaction plans drawn from `seed`),
/// call `kill` `kill_after` once plain sends and transactions are acknowledged, and
/// return what every task recorded until the broker was gone, and when `kill` was called.
pub fn run_load(
    addr: &str,
    round: u64,
    (topics, shape): (&Topics, &Shape),
    (seed, intents): (u64, &Arc<Mutex<HashMap<String, bool>>>),
    kill_after: Duration,
    kill: impl FnOnce(),
) -> (Load, Instant) {
    let used: Vec<&String> = [
        (&topics.plain, shape.plain),
        (&topics.keyed, shape.keyed),
        (&topics.pay, shape.txn),
    ]
    .into_iter()
    .filter_map(|(t, n)| (n > 0).then_some(t))
    .collect();
    runtime().block_on(async {
        let admin = connect(addr, "admin").await;
        for t in &used {
            admin.create_topic(t, shape.queues).await.unwrap();
        }
        let (sends, txns) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        // The plain producers, then the keyed ones.
        let mut plain = Vec::new();
        for (topic, prefix, keyed, n) in [
            (&topics.plain, "p", false, shape.plain),
            (&topics.keyed, "k", true, shape.keyed),
        ] {
            for p in 0..n {
                plain.push(tokio::spawn(producer(
                    connect(addr, topic).await,
                    topic.clone(),
                    format!("{prefix}{round}.{p}"),
                    keyed,
                    sends.clone(),
                )));
            }
        }
        let keyed = plain.split_off(shape.plain);
        let mut txn = Vec::new();
        for p in 0..shape.txn {
            txn.push(tokio::spawn(txn_producer(
                connect(addr, &topics.pay).await,
                topics.pay.clone(),
                format!("t{round}.{p}"),
                seed ^ p as u64,
                intents.clone(),
                txns.clone(),
            )));
        }
        let mut consumers = Vec::new();
        for t in &used {
            for _ in 0..shape.consumers {
                let c = connect(addr, "consumer").await;
                consumers.push(tokio::spawn(consumer(c, t.to_string())));
            }
        }
        // The kill timer starts once plain sends and transactions are acknowledged.
        let flowing = Instant::now();
        while sends.load(Ordering::Relaxed) == 0 || txns.load(Ordering::Relaxed) == 0 {
            assert!(
                flowing.elapsed() < Duration::from_secs(60),
                "round {round}: no acknowledgement within 60 s of the load's start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(kill_after).await;
        let killed_at = Instant::now();
        kill();
        let join = async {
            let mut load = Load {
                plain: vec![],
                keyed: vec![],
                txns: vec![],
                consumed: vec![],
            };
            for h in plain {
                load.plain.push(h.await.expect("plain producer"));
            }
            for h in keyed {
                load.keyed.push(h.await.expect("keyed producer"));
            }
            for h in txn {
                load.txns.push(h.await.expect("transactional producer"));
            }
            for h in consumers {
                load.consumed.push(h.await.expect("consumer"));
            }
            load
        };
        let load = tokio::time::timeout(Duration::from_secs(60), join)
            .await
            .expect("the load did not stop within 60 s of the kill");
        (load, killed_at)
    })
}

/// Everything `group` gets from `topic` until a poll waits in vain, acked.
pub async fn drain(client: &Client, group: &str, topic: &str) -> Vec<Delivery> {
    let c = Consumer::new(client.clone(), group, topic);
    let mut all = Vec::new();
    loop {
        let got = c
            .poll(512, Duration::from_millis(300))
            .await
            .unwrap_or_else(|e| panic!("poll {group}/{topic} after the restart: {e}"));
        if got.is_empty() {
            return all;
        }
        c.ack_many(&got)
            .await
            .unwrap_or_else(|e| panic!("ack {group}/{topic} after the restart: {e}"));
        all.extend(got);
    }
}

/// Messages per topic, from `stats`.
pub async fn message_counts(client: &Client) -> BTreeMap<String, u64> {
    let stats = client.stats().await.expect("stats");
    let mut out = BTreeMap::new();
    for q in stats.queues {
        *out.entry(q.topic).or_default() += q.messages;
    }
    out
}
