//! In-process clusters of three nodes on the simulated network: what is acknowledged is on
//! a majority and survives the leader's loss exactly once, a cut-off minority never
//! acknowledges, and a wiped node catches up from a snapshot.
//!
//! No assertion is about time: waits have a generous bound only so that a broken build
//! fails instead of hanging. Faults are drawn from the seed each test names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use halfmq::{BrokerConfig, Message};
use halfmq_raft::network::sim::SimNetwork;
use halfmq_raft::{Command, NodeId, ReplicaConfig, ReplicaError, ReplicaNode};
use openraft::{BasicNode, ServerState, SnapshotPolicy};

/// Bound on any wait for the cluster, so a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(60);
const TOPIC: &str = "payments";
/// Reads so far: each read polls as a consumer group of its own.
static READS: AtomicU64 = AtomicU64::new(0);

struct Cluster {
    net: SimNetwork,
    root: tempfile::TempDir,
    config: ReplicaConfig,
    nodes: BTreeMap<NodeId, ReplicaNode>,
}

impl Cluster {
    /// Three nodes, formed into one cluster, with `TOPIC` created.
    async fn start(seed: u64, tweak: impl FnOnce(&mut ReplicaConfig)) -> Cluster {
        let root = tempfile::tempdir().expect("a temporary directory");
        let mut config = ReplicaConfig::new(BrokerConfig::new(root.path().join("unused")));
        tweak(&mut config);
        let mut c = Cluster {
            net: SimNetwork::new(seed),
            root,
            config,
            nodes: BTreeMap::new(),
        };
        for id in 1..=3 {
            c.boot(id).await;
        }
        let members = (1..=3)
            .map(|id| (id, BasicNode::new(format!("sim-{id}"))))
            .collect();
        c.nodes[&1].initialize(members).await.expect("initialize");
        let create = Command::CreateTopic {
            topic: TOPIC.to_owned(),
            queues: 2,
        };
        c.write(vec![create]).await.expect("create the topic");
        c
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    async fn boot(&mut self, id: NodeId) {
        let node = ReplicaNode::start(id, &self.dir(id), self.config.clone(), self.net.factory(id))
            .await
            .expect("node starts");
        self.net.register(id, node.raft().clone());
        self.nodes.insert(id, node);
    }

    /// Stop node `id` as a crash would look to the others: gone from the network at once.
    async fn kill(&mut self, id: NodeId) {
        self.net.remove(id);
        let node = self.nodes.remove(&id).expect("a running node");
        node.shutdown().await.expect("shutdown");
    }

    /// The leader that the live nodes in `among` agree on, once there is one.
    async fn leader_among(&self, among: &[NodeId]) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            for id in among {
                let m = self.nodes[id].raft().metrics().borrow().clone();
                if m.state == ServerState::Leader && m.current_leader == Some(*id) {
                    let agreed = among.iter().all(|o| {
                        self.nodes[o].raft().metrics().borrow().current_leader == Some(*id)
                    });
                    if agreed {
                        return *id;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader among {among:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn leader(&self) -> NodeId {
        let live: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.leader_among(&live).await
    }

    /// Write through whoever leads, following `NotLeader` answers.
    async fn write(&self, commands: Vec<Command>) -> Result<Vec<halfmq_raft::Applied>, ReplicaError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leader = self.leader().await;
            match self.nodes[&leader].write(commands.clone()).await {
                Err(ReplicaError::NotLeader { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Send one message per body as one batch through the leader; the bodies acknowledged.
    async fn send(&self, bodies: &[String]) -> Vec<String> {
        let cmd = Command::Send {
            topic: TOPIC.to_owned(),
            messages: bodies
                .iter()
                .map(|b| (&Message::new(b.as_bytes()).with_key(b.clone())).into())
                .collect(),
        };
        let answers = self.write(vec![cmd]).await.expect("the write is committed");
        let receipts = halfmq_raft::command::receipts(answers[0].clone()).expect("a send answer");
        assert!(receipts.iter().all(|r| r.is_ok()), "{receipts:?}");
        bodies.to_vec()
    }

    /// Wait until node `id` has applied everything `leader` has.
    async fn caught_up(&self, id: NodeId, leader: NodeId) {
        let target = self.nodes[&leader].raft().metrics().borrow().last_applied;
        self.nodes[&id]
            .raft()
            .wait(Some(WAIT))
            .applied_index_at_least(target.map(|l| l.index), "caught up")
            .await
            .expect("the node catches up");
    }

    /// Every message of `TOPIC` in node `id`'s broker: (queue, offset, body), in order.
    fn messages(&self, id: NodeId) -> Vec<(u32, u64, String)> {
        let broker = self.nodes[&id].broker();
        let group = format!("verify-{}", READS.fetch_add(1, Ordering::Relaxed));
        let mut out = Vec::new();
        loop {
            let got = broker.poll(&group, TOPIC, 100).expect("poll");
            if got.is_empty() {
                break;
            }
            for d in got {
                out.push((d.queue, d.offset, String::from_utf8_lossy(&d.body).into_owned()));
            }
        }
        out.sort();
        out
    }
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Each acknowledged body exactly once, and nothing else.
fn assert_exactly(got: &[(u32, u64, String)], acked: &BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    for (_, _, b) in got {
        assert!(seen.insert(b.clone()), "{b} stored twice");
    }
    assert_eq!(&seen, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_the_leaders_death_exactly_once() {
    let mut c = Cluster::start(0x5eed_0001, |_| {}).await;
    c.net.set_drop_per_mille(20);
    c.net.set_delay_ms_max(3);
    let mut acked = BTreeSet::new();
    for round in 0..20 {
        acked.extend(c.send(&bodies(&format!("a{round}"), 1 + round % 4)).await);
    }
    let old = c.leader().await;
    c.kill(old).await;
    let survivors: Vec<NodeId> = c.nodes.keys().copied().collect();
    let new = c.leader_among(&survivors).await;
    assert_ne!(new, old);
    // Two of three are a majority: writes go on.
    for round in 0..20 {
        acked.extend(c.send(&bodies(&format!("b{round}"), 1 + round % 3)).await);
    }
    c.net.set_drop_per_mille(0);
    let mut seen = Vec::new();
    for id in &survivors {
        c.caught_up(*id, new).await;
        let got = c.messages(*id);
        assert_exactly(&got, &acked);
        seen.push(got);
    }
    // The same messages at the same queue offsets on every survivor.
    assert_eq!(seen[0], seen[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_majority_never_acknowledges() {
    let mut c = Cluster::start(0x5eed_0002, |_| {}).await;
    let mut acked = BTreeSet::new();
    acked.extend(c.send(&bodies("before", 3)).await);
    let old = c.leader().await;
    let others: Vec<NodeId> = c.nodes.keys().copied().filter(|i| *i != old).collect();
    c.net.partition(&[&[old], &others]);

    // The old leader takes a write it cannot replicate.
    let cut_off = c.nodes.remove(&old).expect("the old leader");
    let cmd = Command::Send {
        topic: TOPIC.to_owned(),
        messages: vec![(&Message::new("minority")).into()],
    };
    let pending = tokio::spawn(async move {
        let r = cut_off.write(vec![cmd]).await;
        (cut_off, r)
    });

    // The majority elects a new leader and acknowledges.
    let new = c.leader_among(&others).await;
    assert_ne!(new, old);
    acked.extend(c.send(&bodies("majority", 3)).await);

    c.net.heal();
    // Once the partition heals the old leader's write is refused or never answered; either
    // way it was not acknowledged, and it is not in any log.
    let (cut_off, r) = match tokio::time::timeout(WAIT, pending).await {
        Ok(joined) => joined.expect("the write task"),
        Err(_) => panic!("the cut-off write neither failed nor finished after the heal"),
    };
    assert!(r.is_err(), "the cut-off leader acknowledged: {r:?}");
    c.nodes.insert(old, cut_off);
    let leader = c.leader().await;
    for id in [1, 2, 3] {
        c.caught_up(id, leader).await;
        assert_exactly(&c.messages(id), &acked);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_follower_catches_up_from_a_snapshot() {
    let mut c = Cluster::start(0x5eed_0003, |cfg| {
        cfg.raft.snapshot_policy = SnapshotPolicy::LogsSinceLast(10);
        cfg.raft.max_in_snapshot_log_to_keep = 0;
        cfg.raft.purge_batch_size = 1;
        cfg.segment_bytes = 4096;
    })
    .await;
    let mut acked = BTreeSet::new();
    for round in 0..15 {
        acked.extend(c.send(&bodies(&format!("a{round}"), 2)).await);
    }
    let leader = c.leader().await;
    let follower = *c.nodes.keys().find(|i| **i != leader).expect("a follower");
    c.kill(follower).await;
    std::fs::remove_dir_all(c.dir(follower)).expect("wipe the follower");
    for round in 0..15 {
        acked.extend(c.send(&bodies(&format!("b{round}"), 2)).await);
    }
    // The leader's log no longer starts at 1: the follower cannot catch up from it.
    let leader = c.leader().await;
    c.nodes[&leader]
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some(), "the leader purged its log")
        .await
        .expect("a purge");

    c.boot(follower).await;
    c.caught_up(follower, leader).await;
    let m = c.nodes[&follower].raft().metrics().borrow().clone();
    assert!(m.snapshot.is_some(), "the follower installed a snapshot: {m:?}");
    assert_exactly(&c.messages(follower), &acked);
    assert_eq!(c.messages(follower), c.messages(leader));
}
