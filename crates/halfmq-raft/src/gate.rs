//! [`PeerGate`]: the door a node's peers come in by. Both networks (`network::tcp`'s peer
//! server and `network::sim`) hand every vote request, append and snapshot of a peer to
//! openraft through it, and it does two things on the way:
//!
//! - while the node repairs from its peers ([`crate::repair`]) it refuses every vote, and
//!   notes the leader's commit index that the repair waits for;
//! - it tells the node's election loop ([`crate::elect`]) when a leader was last heard (an
//!   append or a snapshot openraft accepted, a vote it granted) and when a candidate with a
//!   longer log than this node's asked for a vote, because openraft does not show either
//!   and the loop, not openraft, decides when this node stands.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use halfmq_types::counted::Counted;
use openraft::error::Fatal;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{NodeId, Raft, TypeConfig};

type RaftError = openraft::error::RaftError<NodeId>;

/// Whether a node is repairing, what it has seen of the leader's commit index, and when it
/// last heard a leader.
#[derive(Debug, Default)]
pub struct PeerGate {
    repairing: AtomicBool,
    /// 1 + the greatest commit index of the leader's own term carried by an append this node
    /// accepted while repairing; 0: none yet.
    target: AtomicU64,
    /// What the election loop needs to know of the peers' requests.
    clock: ElectionClock,
    /// Peers' requests being answered now (each counted until answered or given up): the
    /// election loop does not stand meanwhile.
    busy: AtomicUsize,
}

impl PeerGate {
    /// A gate of a node that is not repairing: it lets everything through.
    pub fn open() -> Arc<PeerGate> {
        Arc::new(PeerGate::default())
    }

    /// The gate of a node that starts repairing.
    pub(crate) fn repairing_now() -> Arc<PeerGate> {
        let g = PeerGate::default();
        g.repairing.store(true, Ordering::SeqCst);
        Arc::new(g)
    }

    /// Whether the node is repairing (refusing votes, not standing for election).
    pub fn repairing(&self) -> bool {
        self.repairing.load(Ordering::SeqCst)
    }

    /// The repair is done: votes are answered, and the node may stand again.
    pub(crate) fn repaired(&self) {
        self.repairing.store(false, Ordering::SeqCst);
    }

    /// The greatest commit index of a leader's own term accepted while repairing.
    pub(crate) fn target(&self) -> Option<u64> {
        self.target.load(Ordering::SeqCst).checked_sub(1)
    }

    /// When a leader was last heard, as the election loop reads it.
    pub(crate) fn clock(&self) -> &ElectionClock {
        &self.clock
    }

    /// Whether a peer's vote request, append or snapshot is being answered now. The
    /// election loop waits for it to be answered before it stands: a vote being granted
    /// (openraft fsyncs it first) or a leader's append would restart its wait, and a
    /// candidacy in between would take the term from the candidate just voted for.
    pub(crate) fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }

    /// A peer's vote request: refused while repairing (the node's log may lack entries its
    /// acknowledgement committed), else openraft's answer. A vote granted restarts the
    /// election clock (the candidate may win); a vote refused to a candidate whose log is
    /// longer than this node's puts this node's next candidacy back (it cannot win while
    /// that one stands, and would only take the term from it).
    pub async fn vote(
        &self,
        raft: &Raft,
        rpc: VoteRequest<NodeId>,
    ) -> Result<VoteResponse<NodeId>, RaftError> {
        if self.repairing() {
            tracing::info!(candidate = %rpc.vote, "repairing: vote refused");
            let vote = raft.metrics().borrow().vote;
            return Ok(VoteResponse {
                vote,
                vote_granted: false,
                last_log_id: None,
            });
        }
        let (candidate, theirs) = (rpc.vote, rpc.last_log_id);
        let _answering = Counted::new(&self.busy);
        let resp = raft.vote(rpc).await;
        if let Ok(r) = &resp {
            if r.vote_granted {
                self.clock.restart();
            } else if theirs > r.last_log_id {
                tracing::info!(%candidate, "vote refused to a longer log: standing back");
                self.clock.longer_log();
            } else if theirs < r.last_log_id {
                tracing::info!(%candidate, "vote refused to a shorter log");
                self.clock.shorter_log(candidate);
            }
        }
        resp
    }

    /// A leader's append, through openraft; while repairing, an accepted one's commit index
    /// is noted when it is of the leader's own term. One whose leader openraft accepted
    /// (every answer but `HigherVote`) restarts the election clock.
    pub async fn append(
        &self,
        raft: &Raft,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError> {
        let own_term = rpc
            .leader_commit
            .filter(|c| c.leader_id.term == rpc.vote.leader_id().term)
            .map(|c| c.index);
        let _answering = Counted::new(&self.busy);
        let resp = raft.append_entries(rpc).await;
        match &resp {
            Ok(AppendEntriesResponse::HigherVote(_)) | Err(_) => {}
            Ok(accepted) => {
                self.clock.leader();
                if let (Some(c), AppendEntriesResponse::Success) = (own_term, accepted) {
                    if self.repairing() {
                        self.target.fetch_max(c + 1, Ordering::SeqCst);
                    }
                }
            }
        }
        resp
    }

    /// A leader's snapshot, received whole, installed by openraft. Accepted (this node's
    /// vote is then the leader's), it restarts the election clock.
    pub async fn install_snapshot(
        &self,
        raft: &Raft,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
    ) -> Result<SnapshotResponse<NodeId>, Fatal<NodeId>> {
        let _answering = Counted::new(&self.busy);
        let resp = raft.install_full_snapshot(vote, snapshot).await;
        if matches!(&resp, Ok(r) if r.vote == vote) {
            self.clock.leader();
        }
        resp
    }
}

/// What the peers' requests told of the leader, for the election loop ([`crate::elect`]).
#[derive(Debug)]
pub(crate) struct ElectionClock {
    inner: Mutex<Heard>,
}

/// The election clock's reading.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heard {
    /// When the wait last started again: a leader heard, a vote granted, this node's vote
    /// changed or it stood.
    pub at: Instant,
    /// When this node last accepted a leader's append or snapshot.
    pub leader_at: Instant,
    /// Whether a candidate with a longer log asked for this node's vote since it last
    /// stood.
    pub longer_log: bool,
    /// The highest vote of a candidate this node refused whose log is shorter than its own.
    pub shorter_log: Option<Vote<NodeId>>,
}

impl Default for ElectionClock {
    fn default() -> Self {
        let now = Instant::now();
        ElectionClock {
            inner: Mutex::new(Heard {
                at: now,
                leader_at: now,
                longer_log: false,
                shorter_log: None,
            }),
        }
    }
}

impl ElectionClock {
    /// A leader's append or snapshot was accepted now.
    pub(crate) fn leader(&self) {
        let mut h = self.inner.lock();
        h.at = Instant::now();
        h.leader_at = h.at;
    }

    /// The wait starts again now: a vote granted, this node's vote changed, or it leads.
    pub(crate) fn restart(&self) {
        self.inner.lock().at = Instant::now();
    }

    /// A candidate with a longer log than this node's asked for its vote.
    pub(crate) fn longer_log(&self) {
        self.inner.lock().longer_log = true;
    }

    /// This node refused its vote to `candidate`, whose log is shorter than its own.
    pub(crate) fn shorter_log(&self, candidate: Vote<NodeId>) {
        let mut h = self.inner.lock();
        if h.shorter_log
            .is_none_or(|v| candidate.leader_id() > v.leader_id())
        {
            h.shorter_log = Some(candidate);
        }
    }

    /// This node stood for election now.
    pub(crate) fn stood(&self) {
        let mut h = self.inner.lock();
        h.at = Instant::now();
        h.longer_log = false;
    }

    /// The clock's reading.
    pub(crate) fn read(&self) -> Heard {
        *self.inner.lock()
    }
}
