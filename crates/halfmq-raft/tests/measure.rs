//! Figures, not checks (ignored by default; each prints its result):
//!
//! ```text
//! cargo test -p halfmq-raft --release --test measure -- --ignored --nocapture --test-threads 1
//! ```
//!
//! - `failover`: kill the leader of an in-process three-node cluster (simulated network,
//!   no faults), time from the kill to the first write the new leader acknowledges; the
//!   killed node restarts before the next round;
//! - `throughput`: 64 writers × 16 messages of 1 KiB per write, three replicated nodes
//!   against one embedded broker with the default flush policy, alternating in the same
//!   run, the median round of each reported with their ratio.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{bodies, Cluster, TOPIC};
use halfmq::{Broker, BrokerConfig, Message};
use halfmq_raft::{Batch, Command, MessageData, NodeId, ReplicaError};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn failover() {
    let rounds = 10;
    let mut c = Cluster::sim(0x5eed_f00d, |_| {}).await;
    let mut times = Vec::new();
    for round in 0..rounds {
        c.send(&bodies(&format!("before{round}"), 1)).await;
        let old = c.leader().await;
        let survivors: Vec<NodeId> = c.nodes.keys().copied().filter(|i| *i != old).collect();
        // The leader's death, as its peers see it: gone from the network.
        c.sim_net().remove(old);
        let killed = Instant::now();
        loop {
            let new = c.leader_among(&survivors).await;
            let cmd = Command::Send {
                topic: TOPIC.to_owned(),
                messages: vec![(&Message::new(format!("after{round}"))).into()],
            };
            match c.nodes[&new].write(vec![cmd]).await {
                Ok(_) => break,
                Err(ReplicaError::NotLeader { .. }) => continue,
                Err(e) => panic!("write after failover: {e}"),
            }
        }
        times.push(killed.elapsed());
        c.kill(old).await;
        c.boot(old).await;
        let leader = c.leader().await;
        c.caught_up(old, leader).await;
    }
    times.sort();
    println!(
        "failover, {rounds} leader kills: median {:?}, max {:?} (election time-out 500..1000 ms, lease 1000 ms)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

const WRITERS: usize = 64;
const PER_WRITE: usize = 16;
const WRITES_EACH: usize = 20;

fn batch_of(writer: usize, n: usize) -> Vec<Message> {
    (0..PER_WRITE)
        .map(|i| Message::new(vec![b'x'; 1024]).with_key(format!("w{writer}-{n}-{i}")))
        .collect()
}

/// What one round of writes measured.
struct Round {
    /// Messages per second.
    rate: f64,
    /// Latency of one write (a batch of `PER_WRITE`), 99th percentile.
    p99: std::time::Duration,
    /// CPU time of this whole process (every node of it) per message.
    cpu_per_msg: std::time::Duration,
}

/// CPU time (user + system) of this process so far, from /proc/self/stat (clock ticks of
/// 10 ms, the kernel's USER_HZ on Linux).
fn cpu_time() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) and its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3 (state, not a number).
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    std::time::Duration::from_millis(ticks * 10)
}

/// `WRITERS` tasks each making `WRITES_EACH` writes.
async fn rate<F, Fut>(writers: usize, write: F) -> Round
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let write = Arc::new(write);
    let (start, cpu) = (Instant::now(), cpu_time());
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let write = write.clone();
        tasks.spawn(async move {
            let mut took = Vec::with_capacity(WRITES_EACH);
            for n in 0..WRITES_EACH {
                let t = Instant::now();
                write(w, n).await;
                took.push(t.elapsed());
            }
            took
        });
    }
    let mut took = Vec::new();
    while let Some(r) = tasks.join_next().await {
        took.extend(r.expect("a writer"));
    }
    let msgs = (writers * WRITES_EACH * PER_WRITE) as u32;
    let (elapsed, cpu) = (start.elapsed(), cpu_time() - cpu);
    took.sort();
    Round {
        rate: f64::from(msgs) / elapsed.as_secs_f64(),
        p99: took[took.len() * 99 / 100],
        cpu_per_msg: cpu / msgs,
    }
}

/// The median of `rounds` by rate.
fn median(mut rounds: Vec<Round>) -> Round {
    rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    rounds.swap_remove(rounds.len() / 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn throughput() {
    let c = Cluster::sim(0x5eed_beef, |_| {}).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let single = Broker::open(BrokerConfig::new(dir.path())).expect("a broker");
    single.create_topic(TOPIC, 2).expect("the topic");
    let leader = c.leader().await;
    let raft = c.nodes[&leader].raft().clone();
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let b = single.clone();
        one.push(
            rate(WRITERS, move |w, n| {
                let b = b.clone();
                async move {
                    let got = b.send_batch_async(TOPIC, &batch_of(w, n)).await;
                    assert!(got.expect("sent").iter().all(|r| r.is_ok()));
                }
            })
            .await,
        );
        let r = raft.clone();
        three.push(
            rate(WRITERS, move |w, n| {
                let r = r.clone();
                async move {
                    let messages = batch_of(w, n).iter().map(MessageData::from).collect();
                    let batch = Batch::new(
                        halfmq::clock::now_ms(),
                        vec![Command::Send {
                            topic: TOPIC.to_owned(),
                            messages,
                        }],
                    );
                    r.client_write(batch).await.expect("committed");
                }
            })
            .await,
        );
    }
    // What applying costs a node: one batch at a time into a broker flushing as the state
    // machine's does (asynchronously), each waiting for its store round.
    let dir2 = tempfile::tempdir().expect("a temporary directory");
    let cfg = BrokerConfig::new(dir2.path()).with_store({
        let mut s = halfmq::StoreConfig::default();
        s.flush = halfmq::FlushPolicy::Async {
            interval: std::time::Duration::from_millis(10),
        };
        s
    });
    let serial_broker = Broker::open(cfg).expect("a broker");
    serial_broker.create_topic(TOPIC, 2).expect("the topic");
    let serial = rate(1, move |w, n| {
        let b = serial_broker.clone();
        async move {
            let got = b.send_batch(TOPIC, &batch_of(w, n));
            assert!(got.expect("sent").iter().all(|r| r.is_ok()));
        }
    })
    .await;
    let ratios: Vec<f64> = one
        .iter()
        .zip(&three)
        .map(|(a, b)| b.rate / a.rate)
        .collect();
    let (one, three) = (median(one), median(three));
    println!(
        "throughput, {WRITERS} writers x {PER_WRITE} x 1 KiB per write, median of 3 alternating rounds: \
         one embedded broker {:.0} msg/s (p99 of a write {:?}, CPU {:?}/msg), \
         three replicated nodes {:.0} msg/s (p99 {:?}, CPU {:?}/msg for all three), \
         ratio {:.2} (each round's: {ratios:.2?})",
        one.rate,
        one.p99,
        one.cpu_per_msg,
        three.rate,
        three.p99,
        three.cpu_per_msg,
        three.rate / one.rate
    );
    println!(
        "one writer, one batch at a time, asynchronous flush (the apply path): {:.0} msg/s",
        serial.rate
    );
}
