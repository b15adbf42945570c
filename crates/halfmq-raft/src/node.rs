//! [`ReplicaNode`]: one member of a replicated cluster, the raft log, the state machine and
//! openraft put together, with the write path through the leader.
//!
//! A node keeps, in its directory:
//!
//! ```text
//! <dir>/raft/    the raft log and vote (crate::log_store)
//! <dir>/state/   the snapshot journal and the broker rebuilt from it (crate::state_machine)
//! ```
//!
//! A write ([`ReplicaNode::write`]) is acknowledged when the leader has applied its batch,
//! which openraft does only once a majority of the members has the entry fsynced in its
//! raft log: the acknowledgement means "durable on a majority". A node that is not the
//! leader answers [`ReplicaError::NotLeader`] with the leader it knows of.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use halfmq::{Broker, BrokerConfig, Checkers, Message, SendReceipt, TransactionChecker};
use halfmq_types::error::Error;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftNetworkFactory, ServerState, SnapshotPolicy};
use tokio::sync::watch;

use crate::checkback::CheckBack;
use crate::command::{self, Applied, Command, MessageData};
use crate::elect::{self, Timing};
use crate::gate::PeerGate;
use crate::log_store::SEGMENT_BYTES_DEFAULT;
use crate::merge::Proposer;
pub use crate::propose::ReplicaError;
use crate::propose::{client_error, entry_runs, unsent};
use crate::repair;
use crate::state_machine::BrokerCell;
use crate::status::ClusterStatus;
use crate::{NodeId, Raft, TypeConfig};

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The settings of the node's broker (its data directory, clock and check-back are
    /// the state machine's own and are replaced).
    pub broker: BrokerConfig,
    /// openraft's settings: timeouts, snapshot policy, batch sizes. Its `enable_elect` says
    /// whether the node stands for election at all; openraft's own election timer is
    /// always off, the node's election loop ([`crate::elect`]) stands instead.
    pub raft: openraft::Config,
    /// The range of the random part of each election wait, drawn afresh for every
    /// candidacy ([`crate::elect`]). Default 300 ms. Zero is refused.
    pub election_spread: Duration,
    /// Size a raft log segment grows to before the next one starts.
    pub segment_bytes: u64,
    /// After this node becomes leader, how long a due half whose producer group has no
    /// checker registered here waits for one instead of counting as "no live producer"
    /// (the checkers were connected to the old leader). Default 10 s. See
    /// [`crate::checkback`].
    pub checker_grace: Duration,
    /// The node joins a cluster that exists (`halfmq broker --join`): when its directory
    /// holds no raft state, it votes for nobody and does not stand until it has caught up
    /// with a leader, as a node repairing from its peers ([`crate::repair`]). A member
    /// restarted on an empty disk has lost what it acknowledged; with its vote, a follower
    /// that lacks those entries could be elected and lose them. Default false.
    pub join: bool,
}

impl ReplicaConfig {
    /// The defaults, with `broker` for the broker's own settings: a heartbeat every 50 ms;
    /// followers refuse votes for 600 ms after they last heard a leader (openraft's leader
    /// lease, `election_timeout_max`); a follower stands 650 to 950 ms after it last heard
    /// one (the lease, a heartbeat, and a random part of the 300 ms spread), a candidate
    /// that did not win again 300 to 600 ms after it stood, each wait drawn afresh
    /// ([`crate::elect`]). So a dead leader is replaced after 0.65 to 0.95 s plus one vote
    /// round; when the survivor with the shorter log stands first, the other stands at once
    /// and wins (a round more). Measured: `scripts/failover-drill`. A snapshot every 10,000
    /// entries, keeping the last 1,000 in the log for followers a little behind.
    pub fn new(broker: BrokerConfig) -> ReplicaConfig {
        ReplicaConfig {
            broker,
            raft: openraft::Config {
                cluster_name: "halfmq".to_owned(),
                heartbeat_interval: 50,
                election_timeout_min: 300,
                election_timeout_max: 600,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
                max_in_snapshot_log_to_keep: 1_000,
                max_payload_entries: 256,
                ..openraft::Config::default()
            },
            election_spread: Duration::from_millis(300),
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            checker_grace: Duration::from_secs(10),
            join: false,
        }
    }
}

/// One member of a cluster.
pub struct ReplicaNode {
    id: NodeId,
    raft: Raft,
    /// Proposes writes, merging concurrent ones ([`crate::merge`]).
    proposer: Proposer,
    broker: BrokerCell,
    /// Queues of a topic created on first send (the broker settings' `default_queues`),
    /// `None` when the settings do not create topics on first use.
    auto_create: Option<u32>,
    /// The transaction checkers registered here (asked while this node leads).
    checkers: Arc<Checkers>,
    /// Stops the check-back loop.
    stop: watch::Sender<bool>,
    /// Whether this node is repairing from its peers, and when it last heard a leader (its
    /// peer server answers through it).
    gate: Arc<PeerGate>,
}

impl ReplicaNode {
    /// Start node `id` on `dir`, reaching its peers through `network`. The node is not
    /// yet a member of anything: [`ReplicaNode::initialize`] forms a new cluster (on one
    /// node), or the node restarts into the cluster its log records.
    pub async fn start<N>(
        id: NodeId,
        dir: &Path,
        config: ReplicaConfig,
        network: N,
    ) -> Result<ReplicaNode, ReplicaError>
    where
        N: RaftNetworkFactory<TypeConfig>,
    {
        let (log, sm, gate) =
            repair::open(dir, config.segment_bytes, &config.broker, config.join).await?;
        let broker = sm.broker_cell();
        let mut raft_config = config.raft.clone();
        // The node's election loop stands, with a fresh time-out each time (crate::elect);
        // it asks the gate first (a repairing node does not stand until it has caught up).
        let stands = raft_config.enable_elect;
        raft_config.enable_elect = false;
        let raft_config = raft_config.validate().map_err(|e| Error::Config {
            setting: "raft",
            reason: e.to_string(),
        })?;
        let timing = Timing::new(&raft_config, config.election_spread)?;
        let raft = Raft::new(id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))?;
        let b = &config.broker;
        let auto_create = b.auto_create_topics.then_some(b.default_queues);
        let checkers = Arc::new(Checkers::default());
        let (stop, stopped) = watch::channel(false);
        // Always: it fires delayed messages too (it checks back only with
        // `txn.check_back`).
        let check_back = CheckBack {
            id,
            raft: raft.clone(),
            broker: broker.clone(),
            checkers: checkers.clone(),
            txn: b.txn.clone(),
            grace: config.checker_grace,
        };
        if gate.repairing() {
            let finish = repair::finish_when_caught_up(
                raft.clone(),
                gate.clone(),
                dir.to_path_buf(),
                stopped.clone(),
            );
            tokio::spawn(finish);
        }
        tokio::spawn(elect::run(
            raft.clone(),
            gate.clone(),
            timing,
            stands,
            stopped.clone(),
        ));
        tokio::spawn(check_back.run(stopped));
        Ok(ReplicaNode {
            id,
            proposer: Proposer::new(raft.clone()),
            raft,
            broker,
            auto_create,
            checkers,
            stop,
            gate,
        })
    }

    /// Form a new cluster of `members` (id → address). Call it on one node of a cluster
    /// that has never started; it is refused once the node has a log.
    pub async fn initialize(
        &self,
        members: BTreeMap<NodeId, BasicNode>,
    ) -> Result<(), ReplicaError> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))
    }

    /// Form the cluster of `members` (id → client address) unless this node already has a
    /// log (it restarts into the cluster its log records). Every node of a new cluster may
    /// call it with the same members: openraft allows that, and they agree on the first
    /// entry. Returns true when it formed the cluster.
    pub async fn form(&self, members: &BTreeMap<NodeId, String>) -> Result<bool, ReplicaError> {
        if self.gate.repairing() {
            // Its log was moved aside, not never written: it waits for the leader.
            return Ok(false);
        }
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))?;
        if initialized {
            return Ok(false);
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(true),
            // Another node formed it first and this one has heard from it (a vote request
            // or the log): the cluster exists, which is what was asked.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(ReplicaError::Raft(e.to_string())),
        }
    }

    /// The gate its peer server answers votes, appends and snapshots through: shut to
    /// votes while the node repairs a damaged log from its peers ([`crate::repair`]), and
    /// where its election loop learns when a leader was last heard ([`crate::elect`]).
    pub fn peer_gate(&self) -> Arc<PeerGate> {
        self.gate.clone()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// openraft's handle (metrics, membership changes).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The broker this node has applied the log to, for reads. Writes go through
    /// [`ReplicaNode::write`]: a write made on it directly is on this node only.
    pub fn broker(&self) -> Arc<Broker> {
        self.broker.read().clone()
    }

    /// Propose `commands` as one batch, or as part of one with other writes made while
    /// [`crate::merge::IN_FLIGHT_MAX`] proposals are in flight, and wait until it is
    /// committed (fsynced on a majority) and applied here: one answer per command.
    pub async fn write(&self, commands: Vec<Command>) -> Result<Vec<Applied>, ReplicaError> {
        self.proposer.write(commands).await
    }

    /// Whether this node leads now, or else [`ReplicaError::NotLeader`] with the leader
    /// it knows of.
    pub fn check_leader(&self) -> Result<(), ReplicaError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader && m.current_leader == Some(self.id) {
            return Ok(());
        }
        let addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        Err(ReplicaError::NotLeader {
            leader: m.current_leader,
            addr,
        })
    }

    /// Register `checker` for `producer_group`'s check-backs, on the leader only (only the
    /// leader checks back): its id for [`ReplicaNode::unregister_checker`], or
    /// [`ReplicaError::NotLeader`]. A leader that steps down keeps its registrations but
    /// asks nothing; [`ReplicaNode::lost_leadership`] tells the connection holding them.
    pub fn register_checker(
        &self,
        producer_group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<u64, ReplicaError> {
        self.check_leader()?;
        Ok(self.checkers.register(producer_group, checker))
    }

    /// Remove a checker registered with [`ReplicaNode::register_checker`].
    pub fn unregister_checker(&self, producer_group: &str, id: u64) {
        self.checkers.unregister(producer_group, id);
    }

    /// Returns once this node does not lead (at once if it does not now): a checker
    /// registered here is then asked nothing more, and its producer should find the new
    /// leader.
    pub async fn lost_leadership(&self) {
        let mut m = self.raft.metrics();
        while self.check_leader().is_ok() {
            if m.changed().await.is_err() {
                return;
            }
        }
    }

    /// Add node `id` at `addr` as a voter: first as a learner, until it has caught up with
    /// the log (or a snapshot), then promoted by a joint membership change. On the leader.
    pub async fn add_node(&self, id: NodeId, addr: String) -> Result<(), ReplicaError> {
        self.raft
            .add_learner(id, BasicNode::new(addr), true)
            .await
            .map_err(client_error)?;
        self.change_membership(ChangeMembers::AddVoterIds([id].into()))
            .await
    }

    /// Remove node `id` from the members (it stops receiving the log). On the leader.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ReplicaError> {
        self.change_membership(ChangeMembers::RemoveVoters([id].into()))
            .await
    }

    /// Make `change` with openraft's joint membership change, waiting until it is committed.
    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, BasicNode>,
    ) -> Result<(), ReplicaError> {
        self.raft
            .change_membership(change, false)
            .await
            .map_err(client_error)?;
        Ok(())
    }

    /// The cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus::from_metrics(&self.raft.metrics().borrow())
    }

    /// Send `messages` to `topic`, replicated: one batch, one raft entry, or one entry per
    /// [`ENTRY_BYTES_MAX`](crate::propose::ENTRY_BYTES_MAX) of messages, proposed one after
    /// another. If a later entry fails, the messages of the earlier ones are stored and
    /// answered with their receipts, the rest each with why (or that its fate is unknown);
    /// if the first fails, so does the call. A topic that does not exist is created first,
    /// through the log, when the broker settings create topics on first use (the nodes'
    /// brokers never create one by themselves).
    pub async fn send(
        &self,
        topic: &str,
        messages: &[Message],
    ) -> Result<Vec<halfmq::Result<SendReceipt>>, ReplicaError> {
        // A batch the broker refuses whole is refused before it is cut up.
        halfmq::check_batch(messages)?;
        let mut out = Vec::with_capacity(messages.len());
        for run in entry_runs(messages) {
            let cmd = Command::Send {
                topic: topic.to_owned(),
                messages: run.iter().map(MessageData::from).collect(),
            };
            let stored = match self.write_to_topic(topic, cmd).await {
                Ok(applied) => command::receipts(applied).map_err(ReplicaError::from),
                Err(e) => Err(e),
            };
            match stored {
                Ok(receipts) => out.extend(receipts),
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    let left = messages.len() - out.len();
                    out.extend((0..left).map(|_| Err(unsent(&e))));
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Write `cmd`, a write to `topic` (a send or a half), as its own batch. When the topic
    /// does not exist and the broker settings create topics on first use, it is created
    /// through the log first and `cmd` written again.
    pub async fn write_to_topic(&self, topic: &str, cmd: Command) -> Result<Applied, ReplicaError> {
        let first = self.write_one(cmd.clone()).await?;
        let unknown =
            matches!(&first, Err(e) if e.code == Error::UnknownTopic(String::new()).code());
        let (true, Some(queues)) = (unknown, self.auto_create) else {
            return Ok(first);
        };
        let create = Command::CreateTopic {
            topic: topic.to_owned(),
            queues,
        };
        // Another writer may have created it meanwhile: with these queues that is no error;
        // with others, the write below goes to the queues it has.
        let created = self.write_one(create).await?;
        if let Err(e) = created {
            let e = Error::from(e);
            if !matches!(e, Error::TopicExists { .. }) {
                return Err(e.into());
            }
        }
        self.write_one(cmd).await
    }

    /// Write one command as its own batch: its answer.
    async fn write_one(&self, cmd: Command) -> Result<Applied, ReplicaError> {
        self.write(vec![cmd])
            .await?
            .pop()
            .ok_or_else(|| ReplicaError::Raft("a batch of one was answered with none".to_owned()))
    }

    /// Stop openraft, then close the broker.
    pub async fn shutdown(&self) -> Result<(), ReplicaError> {
        self.stop.send_replace(true);
        self.raft
            .shutdown()
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))?;
        let broker = self.broker();
        tokio::task::spawn_blocking(move || broker.close())
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))??;
        Ok(())
    }
}
