//! An in-process network for cluster tests ([`SimNetwork`]): every node's `Raft` and its
//! [`PeerGate`] (which every request goes through, as over TCP) in one table, and faults
//! decided by one seeded random generator, so a failing run can be replayed with its seed
//! (the interleaving of tasks still varies between runs; the faults each message meets are
//! drawn in the order messages are sent).
//!
//! Faults: a link cut in both directions (partitions, [`SimNetwork::partition`]); a node
//! gone ([`SimNetwork::remove`]); a request dropped before delivery, or its reply dropped
//! after it was delivered (`drop_per_mille` each); a delay of up to `delay_ms_max` before
//! delivery. A dropped message is seen by the sender as an unreachable peer, as TCP would
//! show a lost connection.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory, Snapshot, Vote};
use parking_lot::Mutex;

use crate::gate::PeerGate;
use crate::network::SNAPSHOT_CHUNK_BYTES;
use crate::{NodeId, Raft, TypeConfig};

/// The simulated network. Clones share it.
#[derive(Clone)]
pub struct SimNetwork {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Mutex<HashMap<NodeId, Peer>>,
    faults: Mutex<Faults>,
}

/// A node as its peers reach it.
#[derive(Clone)]
struct Peer {
    raft: Raft,
    gate: Arc<PeerGate>,
}

struct Faults {
    rng: fastrand::Rng,
    drop_per_mille: u32,
    delay_ms_max: u64,
    cut: HashSet<(NodeId, NodeId)>,
}

/// Why a message did not arrive.
#[derive(Debug, thiserror::Error)]
#[error("simulated network: {0}")]
struct Lost(&'static str);

impl SimNetwork {
    /// A network with no nodes and no faults; `seed` decides every drop and delay.
    pub fn new(seed: u64) -> SimNetwork {
        SimNetwork {
            inner: Arc::new(Inner {
                nodes: Mutex::new(HashMap::new()),
                faults: Mutex::new(Faults {
                    rng: fastrand::Rng::with_seed(seed),
                    drop_per_mille: 0,
                    delay_ms_max: 0,
                    cut: HashSet::new(),
                }),
            }),
        }
    }

    /// The network as node `from` sees it (openraft's network factory of that node).
    pub fn factory(&self, from: NodeId) -> SimFactory {
        SimFactory {
            net: self.clone(),
            from,
        }
    }

    /// Make `raft` reachable as node `id`, its peers' requests answered through `gate`
    /// (the node's own, `ReplicaNode::peer_gate`).
    pub fn register(&self, id: NodeId, raft: Raft, gate: Arc<PeerGate>) {
        self.inner.nodes.lock().insert(id, Peer { raft, gate });
    }

    /// Node `id` is gone: every message to it or from it is lost.
    pub fn remove(&self, id: NodeId) {
        self.inner.nodes.lock().remove(&id);
    }

    /// Drop this many requests and this many replies per thousand.
    pub fn set_drop_per_mille(&self, per_mille: u32) {
        self.inner.faults.lock().drop_per_mille = per_mille.min(1000);
    }

    /// Delay each delivery by up to this many milliseconds.
    pub fn set_delay_ms_max(&self, ms: u64) {
        self.inner.faults.lock().delay_ms_max = ms;
    }

    /// Cut every link between nodes of different groups (a node in no group keeps its
    /// links to everyone).
    pub fn partition(&self, groups: &[&[NodeId]]) {
        let mut f = self.inner.faults.lock();
        for (i, a) in groups.iter().enumerate() {
            for b in groups.iter().skip(i + 1) {
                for x in a.iter() {
                    for y in b.iter() {
                        f.cut.insert((*x, *y));
                        f.cut.insert((*y, *x));
                    }
                }
            }
        }
    }

    /// Restore every cut link.
    pub fn heal(&self) {
        self.inner.faults.lock().cut.clear();
    }

    /// Whether a message from `from` to `to` gets through, and after what delay.
    fn route(&self, from: NodeId, to: NodeId) -> Result<Duration, Lost> {
        let mut f = self.inner.faults.lock();
        if f.cut.contains(&(from, to)) {
            return Err(Lost("link cut"));
        }
        if f.drop_per_mille > 0 && f.rng.u32(0..1000) < f.drop_per_mille {
            return Err(Lost("request dropped"));
        }
        let ms = if f.delay_ms_max > 0 {
            let max = f.delay_ms_max;
            f.rng.u64(0..=max)
        } else {
            0
        };
        Ok(Duration::from_millis(ms))
    }

    /// Whether the reply of a delivered message gets back.
    fn reply(&self, from: NodeId, to: NodeId) -> Result<(), Lost> {
        let mut f = self.inner.faults.lock();
        if f.cut.contains(&(to, from)) {
            return Err(Lost("link cut"));
        }
        if f.drop_per_mille > 0 && f.rng.u32(0..1000) < f.drop_per_mille {
            return Err(Lost("reply dropped"));
        }
        Ok(())
    }

    async fn deliver(&self, from: NodeId, to: NodeId) -> Result<Peer, Lost> {
        let delay = self.route(from, to)?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let nodes = self.inner.nodes.lock();
        if !nodes.contains_key(&from) {
            // A node that is gone sends nothing either, even if its tasks still run.
            return Err(Lost("sender down"));
        }
        nodes.get(&to).cloned().ok_or(Lost("node down"))
    }
}

/// The network as one node sees it.
pub struct SimFactory {
    net: SimNetwork,
    from: NodeId,
}

/// One node's link to another.
pub struct SimLink {
    net: SimNetwork,
    from: NodeId,
    to: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for SimFactory {
    type Network = SimLink;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> SimLink {
        SimLink {
            net: self.net.clone(),
            from: self.from,
            to: target,
        }
    }
}

type RpcResult<T> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId>>>;

impl SimLink {
    /// Deliver one request to the peer, run `call` on it, and bring the answer back, each
    /// way through the network's faults.
    async fn rpc<T, Fut>(&self, call: impl FnOnce(Peer) -> Fut) -> RpcResult<T>
    where
        Fut: Future<Output = Result<T, RaftError<NodeId>>>,
    {
        let peer = self
            .net
            .deliver(self.from, self.to)
            .await
            .map_err(|e| Unreachable::new(&e))?;
        let resp = call(peer).await.map_err(|e| RemoteError::new(self.to, e))?;
        self.net
            .reply(self.from, self.to)
            .map_err(|e| Unreachable::new(&e))?;
        Ok(resp)
    }
}

impl RaftNetwork<TypeConfig> for SimLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.rpc(|p| async move { p.gate.append(&p.raft, rpc).await })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.rpc(|p| async move { p.gate.vote(&p.raft, rpc).await })
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let peer = self
            .net
            .deliver(self.from, self.to)
            .await
            .map_err(|e| Unreachable::new(&e))?;
        let mut recv = peer
            .raft
            .begin_receiving_snapshot()
            .await
            .map_err(|e| NetworkError::new(&e))?;
        for chunk in snapshot.snapshot.chunks(SNAPSHOT_CHUNK_BYTES) {
            let chunk = chunk.map_err(|e| NetworkError::new(&e))?;
            recv.push_chunk(&chunk).map_err(|e| NetworkError::new(&e))?;
        }
        let got = Snapshot {
            meta: snapshot.meta,
            snapshot: recv,
        };
        let resp = peer
            .gate
            .install_snapshot(&peer.raft, vote, got)
            .await
            .map_err(|e| RemoteError::new(self.to, e))?;
        self.net
            .reply(self.from, self.to)
            .map_err(|e| Unreachable::new(&e))?;
        Ok(resp)
    }
}
