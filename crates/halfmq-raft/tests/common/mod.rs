//! What the cluster tests share: a cluster of three in-process nodes on the simulated
//! network or on loopback TCP, the leader they agree on, writes that follow the leader, and
//! reading back every message a node's broker holds.

#![allow(dead_code)]

#[path = "../../../../tests/common/segments.rs"]
mod segments;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use halfmq::{BrokerConfig, Message};
use halfmq_raft::network::sim::SimNetwork;
use halfmq_raft::network::tcp::{PeerServer, TcpFactory};
use halfmq_raft::{Command, NodeId, ReplicaConfig, ReplicaError, ReplicaNode};
use openraft::{BasicNode, ServerState};

/// Bound on any wait for the cluster, so a broken build fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(60);
pub const TOPIC: &str = "payments";
/// Reads so far: each read polls as a consumer group of its own.
static READS: AtomicU64 = AtomicU64::new(0);

/// Which network the nodes talk over.
pub enum Net {
    /// The simulated network.
    Sim(SimNetwork),
    /// Loopback TCP: each node's peer server, by node, and the cluster's token.
    Tcp {
        token: String,
        addrs: BTreeMap<NodeId, String>,
        listeners: BTreeMap<NodeId, tokio::net::TcpListener>,
        servers: BTreeMap<NodeId, PeerServer>,
    },
}

pub struct Cluster {
    pub net: Net,
    root: tempfile::TempDir,
    config: ReplicaConfig,
    pub nodes: BTreeMap<NodeId, ReplicaNode>,
}

impl Cluster {
    /// Three nodes on the simulated network drawing its faults from `seed`, formed into
    /// one cluster, with `TOPIC` created.
    pub async fn sim(seed: u64, tweak: impl FnOnce(&mut ReplicaConfig)) -> Cluster {
        let addrs = (1..=3).map(|id| (id, format!("sim-{id}"))).collect();
        Cluster::start(Net::Sim(SimNetwork::new(seed)), addrs, tweak).await
    }

    /// Three nodes on loopback TCP presenting `token`, formed into one cluster, with
    /// `TOPIC` created.
    pub async fn tcp(token: &str) -> Cluster {
        Cluster::tcp_with(token, |_| {}).await
    }

    /// [`Cluster::tcp`] with settings changed by `tweak`.
    pub async fn tcp_with(token: &str, tweak: impl FnOnce(&mut ReplicaConfig)) -> Cluster {
        let mut listeners = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=3 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a loopback port");
            addrs.insert(id, l.local_addr().expect("its address").to_string());
            listeners.insert(id, l);
        }
        let net = Net::Tcp {
            token: token.to_owned(),
            addrs: addrs.clone(),
            listeners,
            servers: BTreeMap::new(),
        };
        Cluster::start(net, addrs, tweak).await
    }

    async fn start(
        net: Net,
        addrs: BTreeMap<NodeId, String>,
        tweak: impl FnOnce(&mut ReplicaConfig),
    ) -> Cluster {
        let root = tempfile::tempdir().expect("a temporary directory");
        let mut config = ReplicaConfig::new(BrokerConfig::new(root.path().join("unused")));
        tweak(&mut config);
        let mut c = Cluster {
            net,
            root,
            config,
            nodes: BTreeMap::new(),
        };
        for id in 1..=3 {
            c.boot(id).await;
        }
        let members = addrs
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr)))
            .collect();
        c.nodes[&1].initialize(members).await.expect("initialize");
        let create = Command::CreateTopic {
            topic: TOPIC.to_owned(),
            queues: 2,
        };
        c.write(vec![create]).await.expect("create the topic");
        c
    }

    pub fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// The simulated network (a test on TCP has none).
    pub fn sim_net(&self) -> &SimNetwork {
        match &self.net {
            Net::Sim(net) => net,
            Net::Tcp { .. } => panic!("this cluster runs on TCP"),
        }
    }

    /// Start node `id` on its directory (what is there, or nothing).
    /// [`Cluster::boot`] as `halfmq broker --join` would (`ReplicaConfig::join`).
    pub async fn boot_joining(&mut self, id: NodeId) {
        let before = self.config.join;
        self.config.join = true;
        self.boot(id).await;
        self.config.join = before;
    }

    pub async fn boot(&mut self, id: NodeId) {
        let (dir, config) = (self.dir(id), self.config.clone());
        let node = match &mut self.net {
            Net::Sim(net) => {
                let node = ReplicaNode::start(id, &dir, config, net.factory(id)).await;
                let node = node.expect("node starts");
                net.register(id, node.raft().clone(), node.peer_gate());
                node
            }
            Net::Tcp {
                token,
                addrs,
                listeners,
                servers,
            } => {
                let factory = TcpFactory::new(id, token.clone());
                let node = ReplicaNode::start(id, &dir, config, factory).await;
                let node = node.expect("node starts");
                let listener = match listeners.remove(&id) {
                    Some(l) => l,
                    None => rebind(&addrs[&id]).await,
                };
                let (raft, gate) = (node.raft().clone(), node.peer_gate());
                let server = PeerServer::start_gated(listener, raft, gate, token.clone());
                servers.insert(id, server.expect("the peer server starts"));
                node
            }
        };
        self.nodes.insert(id, node);
    }

    /// Stop node `id` as a crash would look to the others: gone from the network at once.
    pub async fn kill(&mut self, id: NodeId) {
        match &mut self.net {
            Net::Sim(net) => net.remove(id),
            Net::Tcp { servers, .. } => drop(servers.remove(&id)),
        }
        let node = self.nodes.remove(&id).expect("a running node");
        node.shutdown().await.expect("shutdown");
    }

    /// The leader that the live nodes in `among` agree on, once there is one.
    pub async fn leader_among(&self, among: &[NodeId]) -> NodeId {
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
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader among {among:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn leader(&self) -> NodeId {
        let live: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.leader_among(&live).await
    }

    /// Write through whoever leads, following `NotLeader` answers (also the answer of a
    /// leader that lost its place while the write was in flight: its fate is unknown).
    pub async fn write(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<halfmq_raft::Applied>, ReplicaError> {
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
    /// Each carries its body as idempotency key, so a write retried after a leader change
    /// (its fate unknown) is not stored twice.
    pub async fn send(&self, bodies: &[String]) -> Vec<String> {
        let cmd = Command::Send {
            topic: TOPIC.to_owned(),
            messages: bodies
                .iter()
                .map(|b| {
                    let m = Message::new(b.as_bytes()).with_key(b.clone());
                    (&m.with_idempotency_key(b.clone())).into()
                })
                .collect(),
        };
        let answers = self.write(vec![cmd]).await.expect("the write is committed");
        let receipts = halfmq_raft::command::receipts(answers[0].clone()).expect("a send answer");
        assert!(receipts.iter().all(|r| r.is_ok()), "{receipts:?}");
        bodies.to_vec()
    }

    /// Wait until node `id` has applied everything in `leader`'s log (so every write
    /// acknowledged so far), once the leader has applied it too (its metrics may trail
    /// its answers).
    pub async fn caught_up(&self, id: NodeId, leader: NodeId) {
        let last = self.nodes[&leader].raft().metrics().borrow().last_log_index;
        for n in [leader, id] {
            self.nodes[&n]
                .raft()
                .wait(Some(WAIT))
                .applied_index_at_least(last, "caught up")
                .await
                .expect("the node catches up");
        }
    }

    /// Node `id`'s broker log: (bytes written, records). Equal on two nodes when they hold
    /// the same records at the same log offsets (transaction ids are log offsets).
    pub fn log_end(&self, id: NodeId) -> (u64, u64) {
        let broker = self.nodes[&id].broker();
        broker.store().sync().expect("sync");
        let log = broker.store().log_stats();
        (log.written_offset, log.records)
    }

    /// Node `id`'s broker log, byte for byte: each segment file's bytes up to its last
    /// non-zero one (the rest is preallocated), in order. Equal on two nodes when they
    /// wrote the same records at the same offsets.
    pub fn log_bytes(&self, id: NodeId) -> Vec<Vec<u8>> {
        let broker = self.nodes[&id].broker();
        broker.store().sync().expect("sync");
        segments::log_segments(&broker.store().dir().join("log"))
    }

    /// Every message of `TOPIC` in node `id`'s broker: (queue, offset, body), in order.
    pub fn messages(&self, id: NodeId) -> Vec<(u32, u64, String)> {
        let broker = self.nodes[&id].broker();
        // The brokers of a cluster flush asynchronously: make all they applied visible.
        broker.store().sync().expect("sync");
        let group = format!("verify-{}", READS.fetch_add(1, Ordering::Relaxed));
        let mut out = Vec::new();
        loop {
            let got = broker.poll(&group, TOPIC, 100).expect("poll");
            if got.is_empty() {
                break;
            }
            for d in got {
                out.push((
                    d.queue,
                    d.offset,
                    String::from_utf8_lossy(&d.body).into_owned(),
                ));
            }
        }
        out.sort();
        out
    }
}

/// Bind `addr` again once the stopped server that had it has let go of it.
async fn rebind(addr: &str) -> tokio::net::TcpListener {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}

/// Settings under which a snapshot is taken every 10 entries and the log purged up to it.
pub fn snapshot_often(cfg: &mut ReplicaConfig) {
    cfg.raft.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(10);
    cfg.raft.max_in_snapshot_log_to_keep = 0;
    cfg.raft.purge_batch_size = 1;
}

/// Write, wipe a follower, write on until the leader has purged its log (so the follower
/// cannot catch up from it), bring the follower back empty: it must install a snapshot
/// and end with every acknowledged message and the leader's very log.
pub async fn wiped_follower_catches_up(c: &mut Cluster, rounds: usize) {
    let mut acked = BTreeSet::new();
    for round in 0..rounds {
        acked.extend(c.send(&bodies(&format!("a{round}"), 2)).await);
    }
    let leader = c.leader().await;
    let follower = *c.nodes.keys().find(|i| **i != leader).expect("a follower");
    c.kill(follower).await;
    std::fs::remove_dir_all(c.dir(follower)).expect("wipe the follower");
    for round in 0..rounds {
        acked.extend(c.send(&bodies(&format!("b{round}"), 2)).await);
    }
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
    assert!(
        m.snapshot.is_some(),
        "the follower installed a snapshot: {m:?}"
    );
    assert_exactly(&c.messages(follower), &acked);
    assert_eq!(c.messages(follower), c.messages(leader));
    assert_eq!(c.log_end(follower), c.log_end(leader));
}

/// Take `node` out of the cluster's table and start a one-message write on it.
pub fn spawn_write(
    node: ReplicaNode,
    body: &str,
) -> tokio::task::JoinHandle<(ReplicaNode, Result<Vec<halfmq_raft::Applied>, ReplicaError>)> {
    let cmd = Command::Send {
        topic: TOPIC.to_owned(),
        messages: vec![(&Message::new(body.to_owned())).into()],
    };
    tokio::spawn(async move {
        let r = node.write(vec![cmd]).await;
        (node, r)
    })
}

/// Kill the leader and wait for the survivors to agree on a new one: (the new leader, the
/// survivors).
pub async fn kill_the_leader(c: &mut Cluster) -> (NodeId, Vec<NodeId>) {
    let old = c.leader().await;
    c.kill(old).await;
    let survivors: Vec<NodeId> = c.nodes.keys().copied().collect();
    let new = c.leader_among(&survivors).await;
    assert_ne!(new, old);
    (new, survivors)
}

/// Wait until each of `ids` has applied `leader`'s log, check that it holds every body of
/// `acked` exactly once: what each holds.
pub async fn each_holds_exactly(
    c: &Cluster,
    ids: &[NodeId],
    leader: NodeId,
    acked: &BTreeSet<String>,
) -> Vec<Vec<(u32, u64, String)>> {
    let mut seen = Vec::new();
    for id in ids {
        c.caught_up(*id, leader).await;
        let got = c.messages(*id);
        assert_exactly(&got, acked);
        seen.push(got);
    }
    seen
}

/// A simulated cluster from `seed` with three messages sent: the cluster, what was
/// acknowledged, the leader and the other nodes.
pub async fn sim_with_three_sent(seed: u64) -> (Cluster, BTreeSet<String>, NodeId, Vec<NodeId>) {
    let c = Cluster::sim(seed, |_| {}).await;
    let acked: BTreeSet<String> = c.send(&bodies("before", 3)).await.into_iter().collect();
    let leader = c.leader().await;
    let others: Vec<NodeId> = c.nodes.keys().copied().filter(|i| *i != leader).collect();
    (c, acked, leader, others)
}

pub fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Each acknowledged body exactly once, and nothing else.
pub fn assert_exactly(got: &[(u32, u64, String)], acked: &BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    for (_, _, b) in got {
        assert!(seen.insert(b.clone()), "{b} stored twice");
    }
    assert_eq!(&seen, acked);
}
