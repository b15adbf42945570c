//! The state machine of a node: its own embedded [`Broker`], which committed entries are
//! applied to in log order ([`StateMachine`], openraft's `RaftStateMachine`).
//!
//! The broker is *derived* state, like the consume queues are of the commit log: on every
//! start it is rebuilt on a fresh data directory from the snapshot journal
//! ([`crate::snapshot`]), and openraft then applies the log entries after the snapshot
//! again. So applying need not be atomic with recording what was applied, and a crash
//! anywhere in an apply loses nothing that the raft log and the journal do not hold. This is
//! openraft's "persistent snapshot" way (its `apply` docs): the snapshot is durable, the
//! state machine is not relied on.
//!
//! The broker's store never fsyncs (`StoreConfig::fsync` off, [`FlushPolicy::Sync`] so
//! that a round's write is visible at once): being rebuilt on every start, it has nothing
//! to gain from its own fsyncs (the raft log's are what acknowledge).
//!
//! Every node's broker runs on a [`ManualClock`] that applying sets to each batch's leader
//! time, never backwards, and has no check-back thread and no delayed timer (an outcome
//! decided by one node's checker, or a message fired by one node's timer, would be a write
//! no other node makes at that place in its log): the leader's loop
//! ([`crate::checkback`]) asks and fires, and proposes what it did.
//!
//! The broker handle that readers use ([`BrokerCell`]) is replaced when a snapshot from the
//! leader is installed: each install opens a new data directory `broker.<n>`, and the old
//! one is closed and deleted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use halfmq::{Broker, BrokerConfig, FlushPolicy, ManualClock};
use halfmq_types::clock::SharedClock;
use halfmq_types::error::{Error, Result};
use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot,
    StorageIOError, StoredMembership,
};
use parking_lot::RwLock;

use crate::apply::{apply_entries, set_clock};
use crate::command::{apply_batch, Applied};
use crate::snapshot::{Journal, JournalSnapshot, Meta};
use crate::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// The broker a node serves reads from; replaced when a snapshot is installed.
pub type BrokerCell = Arc<RwLock<Arc<Broker>>>;

fn storage(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: &Error) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(e)).into()
}

/// A blocking task that panicked or was cancelled.
fn joined(e: tokio::task::JoinError) -> Error {
    Error::Invalid {
        what: "state machine task",
        reason: e.to_string(),
    }
}

fn sm_err(e: &Error) -> StorageError {
    storage(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

/// The state machine of one node.
pub struct StateMachine {
    dir: PathBuf,
    template: BrokerConfig,
    clock: ManualClock,
    broker: BrokerCell,
    generation: u64,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    /// Every applied batch is appended to it (`Journal::append`); a snapshot syncs them.
    journal: Arc<tokio::sync::Mutex<Journal>>,
}

/// Builds a snapshot from what was applied when openraft asked for the builder.
pub struct Builder {
    journal: Arc<tokio::sync::Mutex<Journal>>,
    /// The journal's end when everything up to `last_applied` was appended (`Journal::end`).
    upto: (u64, u64),
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// Open a fresh broker in `dir/broker.<generation>` (deleting every older one) and apply
/// the journal to it.
fn rebuild(
    dir: &Path,
    template: &BrokerConfig,
    clock: &ManualClock,
    generation: u64,
    journal: &Journal,
) -> Result<Arc<Broker>> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list", e))? {
        let e = e.map_err(|e| Error::io(dir, "list", e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("broker.") {
            let p = e.path();
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(p, "remove", e))?;
        }
    }
    let mut cfg = template.clone();
    cfg.data_dir = dir.join(format!("broker.{generation}"));
    let shared: SharedClock = Arc::new(clock.clone());
    cfg.clock = shared.into();
    // Leases are this node's own (only the leader delivers) and run on real time; the
    // clock above moves only as batches are applied.
    cfg.lease_clock = Some(halfmq::ClockSetting::system());
    cfg.txn.check_back = false;
    // Its timer would fire delayed messages on its own clock, between applies: the leader
    // fires them through the log instead (`Command::Fire`).
    cfg.delayed_timer = false;
    // A read (poll) must not create a topic on this node alone: a later replicated
    // `CreateTopic` would then fail here and succeed elsewhere. Topics are created through
    // the log (`ReplicaNode::send` proposes the creation when the broker would have).
    cfg.auto_create_topics = false;
    // Its own fsyncs would buy nothing: it is rebuilt from the journal and the raft log on
    // every start. So its store never fsyncs (`StoreConfig::fsync`), and a round's write
    // counts as durable at once: what is applied is visible when its round is written
    // (under `FlushPolicy::Async` it waited for the next 10 ms sync). (sled still flushes
    // where the broker asks it to, such as acks; that is the broker's choice.)
    cfg.store.flush = FlushPolicy::Sync;
    cfg.store.fsync = false;
    // No group-commit marks, so log offsets do not depend on how applying grouped records
    // into rounds (`crate::apply`); marks serve recovery, which this log never needs.
    cfg.store.marks = false;
    let broker = Broker::open(cfg)?;
    journal.for_each(|_, batch| {
        set_clock(clock, batch.time_ms);
        apply_batch(&broker, &batch).map(|_| ())
    })?;
    Ok(broker)
}

impl StateMachine {
    /// Open the state machine in `dir`: the snapshot journal, and the broker rebuilt from it
    /// with `template`'s settings (its data directory, clock and check-back are the state
    /// machine's own).
    pub async fn open(dir: &Path, template: BrokerConfig) -> Result<StateMachine> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))?;
        let d = dir.to_path_buf();
        let t = template.clone();
        let (journal, clock, broker) = tokio::task::spawn_blocking(move || {
            let journal = Journal::open(&d)?;
            let clock = ManualClock::new(0);
            let broker = rebuild(&d, &t, &clock, 0, &journal)?;
            Ok::<_, Error>((journal, clock, broker))
        })
        .await
        .map_err(joined)??;
        let (last_applied, membership) = match journal.meta() {
            Some(m) => (m.last_log_id, m.last_membership.clone()),
            None => (None, StoredMembership::default()),
        };
        Ok(StateMachine {
            dir: dir.to_path_buf(),
            template,
            clock,
            broker: Arc::new(RwLock::new(broker)),
            generation: 0,
            last_applied,
            membership,
            journal: Arc::new(tokio::sync::Mutex::new(journal)),
        })
    }

    /// The broker handle readers share.
    pub fn broker_cell(&self) -> BrokerCell {
        self.broker.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> std::result::Result<Snapshot<TypeConfig>, StorageError> {
        let snap_err = |e: &Error| storage(ErrorSubject::Snapshot(None), ErrorVerb::Write, e);
        // The bulk of the sync without the lock, which `apply` takes to append: what is
        // appended since the last snapshot (up to 10,000 entries) may be much unsynced, and
        // applying must not wait for it. `Journal::build` syncs again, under the lock,
        // only what was written since (and nothing at all if a snapshot was installed
        // meanwhile: it then finds `installs` changed or a newer snapshot).
        let unsynced = self.journal.lock().await.unsynced();
        tokio::task::spawn_blocking(move || unsynced.sync())
            .await
            .map_err(|e| snap_err(&joined(e)))?
            .map_err(|e| snap_err(&e))?;
        let mut journal = self.journal.clone().lock_owned().await;
        let have = journal.meta().and_then(|m| m.last_log_id);
        if have >= self.last_applied {
            // A snapshot installed meanwhile already covers what this one would.
            if let Some((meta, snapshot)) = journal.current() {
                return Ok(Snapshot {
                    meta,
                    snapshot: Box::new(snapshot),
                });
            }
        }
        let upto = self.upto;
        let last = self.last_applied;
        let membership = self.membership.clone();
        let (meta, snapshot) =
            tokio::task::spawn_blocking(move || journal.build(upto, last, membership))
                .await
                .map_err(|e| snap_err(&joined(e)))?
                .map_err(|e| snap_err(&e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(snapshot),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> std::result::Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError>
    {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> std::result::Result<Vec<Vec<Applied>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.last().map(|e| e.log_id);
        for e in &entries {
            if let EntryPayload::Membership(m) = &e.payload {
                self.membership = StoredMembership::new(Some(e.log_id), m.clone());
            }
        }
        let broker = self.broker.read().clone();
        let journal = self.journal.clone();
        // `blocking_lock`: on the blocking thread `apply_entries` runs this on. The lock is
        // held elsewhere only by a snapshot being built or installed.
        let answers = apply_entries(broker, &self.clock, entries, move |batches| {
            journal.blocking_lock().append(batches)
        })
        .await
        .map_err(|e| sm_err(&e))?;
        if last.is_some() {
            self.last_applied = last;
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Everything applied is in the journal: `apply` appends before it returns.
        let upto = self.journal.lock().await.end();
        Builder {
            journal: self.journal.clone(),
            upto,
            last_applied: self.last_applied,
            membership: self.membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> std::result::Result<Box<JournalSnapshot>, StorageError> {
        let journal = self.journal.lock().await;
        journal
            .receiving()
            .map(Box::new)
            .map_err(|e| storage(ErrorSubject::Snapshot(None), ErrorVerb::Write, &e))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<JournalSnapshot>,
    ) -> std::result::Result<(), StorageError> {
        let snap_err = |e: &Error| {
            storage(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        };
        let mut journal = self.journal.clone().lock_owned().await;
        self.generation += 1;
        let (dir, template, clock, generation) = (
            self.dir.clone(),
            self.template.clone(),
            self.clock.clone(),
            self.generation,
        );
        let old = self.broker.read().clone();
        let m = meta.clone();
        let broker = tokio::task::spawn_blocking(move || {
            journal.install(&m, &snapshot)?;
            old.close()?;
            rebuild(&dir, &template, &clock, generation, &journal)
        })
        .await
        .map_err(|e| snap_err(&joined(e)))?
        .map_err(|e| snap_err(&e))?;
        *self.broker.write() = broker;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> std::result::Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let journal = self.journal.lock().await;
        Ok(journal.current().map(|(meta, snapshot)| Snapshot {
            meta,
            snapshot: Box::new(snapshot),
        }))
    }
}
