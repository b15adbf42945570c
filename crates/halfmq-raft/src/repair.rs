//! Repair from peers: a node whose raft log or snapshot journal is damaged moves them aside
//! and takes the cluster's copy through raft, instead of stopping for a person.
//!
//! ```text
//! <dir>/repairing            present while a repair is under way: the vote kept, the cause
//! <dir>/damaged.<unix ms>/   raft/ and state/ as they were found (never deleted)
//! ```
//!
//! On start (`open`), a `Damaged` or `Corrupt` error under `<dir>/raft` or
//! `<dir>/state/snapshot` (a frame failing its CRC in an older raft segment, or followed by a
//! whole frame in the newest one; a journal frame; the snapshot meta; the purged log id) is
//! repaired:
//!
//! 1. the vote is read from the damaged log (either of its two copies,
//!    [`log_store::read_vote`]); if both are damaged the node does not know what it voted and
//!    stops with that error (the README's remove / wipe / `--join` / add procedure);
//! 2. `<dir>/repairing` is written (durably) with that vote;
//! 3. `raft/` and `state/` are renamed into `damaged.<unix ms>/`;
//! 4. a new, empty `raft/` gets the vote back, and the node opens empty.
//!
//! A crash after any step starts again where it was: the damage is found again (1–2), or the
//! marker is there and the vote is put back from it (3–4).
//!
//! While the marker is there the node is *repairing* ([`PeerGate`]): it does not stand
//! for election (its election loop, [`crate::elect`], asks the gate first), its gate refuses
//! every vote request, and it never forms a cluster of its own. Its log may lack entries it
//! acknowledged before the damage, some of which may have been committed by its
//! acknowledgement: with its vote, a candidate lacking them could win and lose them. The leader sends it the log (or a snapshot, if the
//! log was purged) as to a wiped follower. It is repaired once it has *applied* the leader's
//! commit index as carried by an append it accepted from a leader whose commit index is of
//! the leader's own term: such a commit index is at or past every entry committed before the
//! damage (a leader that has committed an entry of its term has every entry committed in an
//! earlier term before it; one that committed them in its own term knows it did), and the
//! accepted append's term is at least the vote kept, so it is not a deposed leader's. Then
//! the marker is removed and it votes and stands for election again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use halfmq_types::error::{Error, Result};
use openraft::Vote;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::frame;
use crate::gate::PeerGate;
use crate::log_store::{self, LogStore};
use crate::state_machine::StateMachine;
use crate::{NodeId, Raft};

/// The marker file's name in the node's directory.
pub const MARKER: &str = "repairing";

/// What the marker holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    /// The vote the damaged log held, put back into the new log.
    vote: Option<Vote<NodeId>>,
    /// Where the damaged files went.
    aside: String,
    /// What was found.
    cause: String,
}

/// The raft log and state machine of the node in `dir`, repaired first if they are damaged,
/// and its gate (repairing or not). A node that `joins` a cluster on a directory without
/// raft state starts repairing too (a marker without a vote): it may be a member restarted
/// on an empty disk, which must not vote before it holds again what the cluster committed.
pub(crate) async fn open(
    dir: &Path,
    segment_bytes: u64,
    broker: &halfmq::BrokerConfig,
    joins: bool,
) -> Result<(LogStore, StateMachine, Arc<PeerGate>)> {
    let mut marker = read_marker(dir)?;
    if joins && marker.is_none() && !dir.join("raft").exists() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))?;
        let m = Marker {
            vote: None,
            aside: String::new(),
            cause: "joined on an empty directory".to_owned(),
        };
        frame::write_atomic(dir, MARKER, &m, "repair marker")?;
        frame::sync_dir(dir)?;
        tracing::info!("joining on an empty directory: no vote until caught up with a leader");
        marker = Some(m);
    }
    if let Some(m) = &marker {
        restore_vote(dir, m)?;
    }
    let cause = match open_both(dir, segment_bytes, broker).await {
        Ok((log, sm)) => {
            let gate = match &marker {
                Some(m) => {
                    tracing::warn!(aside = %m.aside, cause = %m.cause, "repair from peers continues");
                    PeerGate::repairing_now()
                }
                None => PeerGate::open(),
            };
            return Ok((log, sm, gate));
        }
        Err(e) if is_damage(dir, &e) => e,
        Err(e) => return Err(e),
    };
    let m = move_aside(dir, &cause, marker.and_then(|m| m.vote))?;
    restore_vote(dir, &m)?;
    let (log, sm) = open_both(dir, segment_bytes, broker).await?;
    Ok((log, sm, PeerGate::repairing_now()))
}

async fn open_both(
    dir: &Path,
    segment_bytes: u64,
    broker: &halfmq::BrokerConfig,
) -> Result<(LogStore, StateMachine)> {
    let log = LogStore::open(&dir.join("raft"), segment_bytes)?;
    let sm = StateMachine::open(&dir.join("state"), broker.clone()).await?;
    Ok((log, sm))
}

/// Damage that repair from peers mends: a `Damaged` or `Corrupt` file of the raft log or of
/// the snapshot journal. (The broker's own directory is rebuilt on every start anyway.)
fn is_damage(dir: &Path, e: &Error) -> bool {
    let (Error::Damaged { path, .. } | Error::Corrupt { path, .. }) = e else {
        return false;
    };
    path.starts_with(dir.join("raft")) || path.starts_with(dir.join("state").join("snapshot"))
}

fn read_marker(dir: &Path) -> Result<Option<Marker>> {
    frame::read_file(&dir.join(MARKER), "repair marker")
}

/// Steps 1 to 3 of the module's list: the marker, to be followed by [`restore_vote`].
fn move_aside(dir: &Path, cause: &Error, kept: Option<Vote<NodeId>>) -> Result<Marker> {
    let raft_dir = dir.join("raft");
    let vote = match log_store::read_vote(&raft_dir) {
        Ok(v) if kept > v => kept,
        Ok(v) => v,
        Err(e) if kept.is_some() => {
            tracing::warn!(error = %e, "the vote is damaged; the repair marker's is kept");
            kept
        }
        Err(e) => {
            return Err(Error::Damaged {
                path: raft_dir.join("vote"),
                offset: 0,
                reason: format!(
                    "{cause}; and the raft vote is lost ({e}), so this node cannot repair \
                     itself from its peers: remove it from the cluster, empty its data \
                     directory and add it again (README, \"Repair from peers\")"
                ),
            })
        }
    };
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let aside = dir.join(format!("damaged.{ms}"));
    std::fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, "create directory", e))?;
    let marker = Marker {
        vote,
        aside: aside.display().to_string(),
        cause: cause.to_string(),
    };
    frame::write_atomic(dir, MARKER, &marker, "repair marker")?;
    for name in ["raft", "state"] {
        let from = dir.join(name);
        if from.exists() {
            let to = aside.join(name);
            std::fs::rename(&from, &to).map_err(|e| Error::io(&from, "rename", e))?;
        }
    }
    frame::sync_dir(&aside)?;
    frame::sync_dir(dir)?;
    tracing::warn!(
        aside = %aside.display(),
        %cause,
        "damaged raft state moved aside; repairing from peers (no vote until caught up)"
    );
    Ok(marker)
}

/// Put the marker's vote into `dir/raft` when it holds none (step 4, and after a crash).
fn restore_vote(dir: &Path, m: &Marker) -> Result<()> {
    let raft_dir = dir.join("raft");
    std::fs::create_dir_all(&raft_dir).map_err(|e| Error::io(&raft_dir, "create directory", e))?;
    let have = log_store::read_vote(&raft_dir)?;
    if let (None, Some(v)) = (have, &m.vote) {
        log_store::write_vote(&raft_dir, v)?;
    }
    Ok(())
}

/// Until the repairing node in `dir` has applied the leader's commit index its gate noted
/// (checked every 100 ms): then the marker is removed, votes are answered and elections
/// are on again. Ends early when `stopped` says so.
pub(crate) async fn finish_when_caught_up(
    raft: Raft,
    gate: Arc<PeerGate>,
    dir: PathBuf,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
        }
        let Some(target) = gate.target() else {
            continue;
        };
        let applied = raft.metrics().borrow().last_applied.map(|l| l.index);
        if applied.is_none_or(|a| a < target) {
            continue;
        }
        let path = dir.join(MARKER);
        let removed = std::fs::remove_file(&path)
            .map_err(|e| Error::io(&path, "remove", e))
            .and_then(|()| frame::sync_dir(&dir));
        if let Err(e) = removed {
            tracing::error!(error = %e, "repair done but its marker stays; trying again");
            continue;
        }
        gate.repaired();
        tracing::warn!(applied = target, "repaired from peers: voting again");
        return;
    }
}
