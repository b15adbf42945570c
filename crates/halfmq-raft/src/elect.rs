//! When a node stands for election: a loop of its own instead of openraft's timer.
//!
//! What openraft 0.9 does by itself, and what it costs a failover:
//!
//! - it draws a node's election time-out once, when the node starts (`EngineConfig::new`,
//!   from `election_timeout_min..election_timeout_max`), and keeps it for the node's life;
//!   it looks at it on a tick every 1.5 heartbeat intervals (75 ms). A follower stands one
//!   leader lease (`election_timeout_max`, 600 ms: how long the other followers refuse any
//!   candidate after they last heard the leader) plus its time-out (300 to 600 ms) after it
//!   last heard the leader, rounded up to its tick: 0.9 to 1.3 s;
//! - two candidates of the same term do not split the votes of three nodes: its votes are
//!   ordered by term and then by node id (`LeaderId` without the `single-term-leader`
//!   feature), so the lower id grants the higher its vote, unless the higher one's log is
//!   shorter;
//! - a node refuses a candidate whose log is shorter than its own without taking its term.
//!   So when the survivor with the shorter log stands first (the other one holds entries the
//!   dead leader sent it last), the other stands later at that same term, loses to the
//!   higher id if the shorter log has it, takes that vote from the answer, and stands again
//!   one whole time-out later: two terms and 1.5 to 2.5 s. This, not a repeated split, is
//!   what the extra terms of the failover drill were (its log shows the refusal by log, the
//!   same-term candidacy and the second one).
//!
//! So openraft's own elections are off (`enable_elect = false` in its config; its heartbeats,
//! vote handling and leader lease are untouched) and this loop calls
//! `Raft::trigger().elect()`:
//!
//! - after following a leader (its vote is committed), once the leader lease, one heartbeat
//!   interval (one the other followers got and this one missed) and a random part of
//!   [`ReplicaConfig::election_spread`] have passed since it last heard the leader: 0.65 to
//!   0.95 s by default, timed to the millisecond;
//! - as a candidate that has not won, or after granting a vote (an uncommitted vote),
//!   `election_timeout_min` plus a random part of the spread after that;
//! - either put back by twice the lease when a candidate with a longer log asked this node
//!   for its vote since it last stood (it would refuse this node, and would only lose its
//!   term to it: openraft's own rule, `smaller_log_timeout`, which it applies to the vote
//!   answers this loop does not see);
//! - at once when it has refused a candidate with a shorter log, has heard no leader for a
//!   lease, and its own vote is not above that candidate's (`hurry_at`): it would win the
//!   votes the other cannot; when its first candidacy is at the other's term and below it,
//!   its vote changes and it stands again, above it.
//!
//! Each random part is drawn again after every candidacy of the node. The wait runs from the
//! last time the node heard a leader (an append or a snapshot it accepted, told by its
//! [`PeerGate`]), granted a vote, changed its vote (its own candidacy, a higher term seen),
//! or led. It does not stand while it leads, while it is no voter, while it repairs from its
//! peers ([`crate::repair`]), while its gate is answering a peer's request (a vote being
//! granted is fsynced before openraft's metrics or the gate show it: standing then would
//! take the term from the candidate just voted for; the drill saw it once), or when its
//! settings say never (`enable_elect = false` in [`ReplicaConfig::raft`]).
//!
//! Safety does not depend on any of this: whether a candidate wins is decided by the votes,
//! which openraft grants as before (one per term, to a log at least as long, never while the
//! voter's leader lease runs) and the gate refuses while repairing. The loop decides only
//! when to ask.
//!
//! [`ReplicaConfig::election_spread`]: crate::ReplicaConfig::election_spread
//! [`ReplicaConfig::raft`]: crate::ReplicaConfig::raft

use std::sync::Arc;
use std::time::Duration;

use halfmq_types::error::Error;
use openraft::{ServerState, Vote};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::gate::{Heard, PeerGate};
use crate::{NodeId, Raft};

/// The lengths an election wait is made of, from the node's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// openraft's leader lease: `election_timeout_max`.
    pub lease: Duration,
    /// openraft's `heartbeat_interval`.
    pub heartbeat: Duration,
    /// openraft's `election_timeout_min`.
    pub min: Duration,
    /// The random part's range.
    pub spread: Duration,
}

impl Timing {
    /// The timing of openraft's settings `raft` with `spread` for the random part: a
    /// configuration error for a spread of zero (every candidacy of two nodes that stood
    /// together once would be together again).
    pub fn new(raft: &openraft::Config, spread: Duration) -> Result<Timing, Error> {
        if spread.is_zero() {
            return Err(Error::Config {
                setting: "election_spread",
                reason: "must be more than zero".to_owned(),
            });
        }
        Ok(Timing {
            lease: Duration::from_millis(raft.election_timeout_max),
            heartbeat: Duration::from_millis(raft.heartbeat_interval),
            min: Duration::from_millis(raft.election_timeout_min),
            spread,
        })
    }

    /// How long after it last heard a leader a node stands: `followed` when its vote is a
    /// leader's (committed), `longer_log` when a candidate with a longer log asked it since
    /// it last stood, `draw` the random part in [0, 1) (drawn again after every candidacy).
    pub fn wait(&self, followed: bool, longer_log: bool, draw: f64) -> Duration {
        let base = if followed {
            self.lease + self.heartbeat
        } else {
            self.min
        };
        let put_back = if longer_log {
            self.lease * 2
        } else {
            Duration::ZERO
        };
        base + self.spread.mul_f64(draw.clamp(0.0, 1.0)) + put_back
    }
}

/// How soon the loop looks again when it is due but a peer's request is being answered.
const BUSY_LOOK_AGAIN: Duration = Duration::from_millis(2);

/// What the loop reads of openraft's metrics.
struct Seen {
    state: ServerState,
    vote: Vote<NodeId>,
    voter: bool,
}

fn seen(metrics: &mut watch::Receiver<openraft::RaftMetrics<NodeId, openraft::BasicNode>>) -> Seen {
    let m = metrics.borrow_and_update();
    Seen {
        state: m.state,
        vote: m.vote,
        voter: m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == m.id),
    }
}

/// When this node should stand at once, before its wait has passed: a candidate whose log
/// is shorter than this node's stands (`heard.shorter_log`, the highest such) and this
/// node's own vote is not above that candidate's; it stands once it has heard no leader for
/// a lease (so that the refusal was for the log, and the leader is gone for it too). It
/// would win the votes the other cannot, so waiting its turn only costs time. (openraft
/// leaves the vote as it was when it refuses a candidate for its log, so the first such
/// candidacy may come at the other's term and lose to its vote, same term and a higher id;
/// the vote has then changed, and the node stands again, above it.)
fn hurry_at(heard: &Heard, vote: &Vote<NodeId>, lease: Duration) -> Option<Instant> {
    let other = heard.shorter_log?;
    (vote.leader_id() <= other.leader_id()).then_some(heard.leader_at + lease)
}

/// Node `raft`'s election loop (the module's rules), until `stopped` says so or openraft
/// stops. `stands` false: it never stands (openraft's `enable_elect` as set by the user).
pub(crate) async fn run(
    raft: Raft,
    gate: Arc<PeerGate>,
    timing: Timing,
    stands: bool,
    mut stopped: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    let mut rng = fastrand::Rng::new();
    let mut draw = rng.f64();
    let mut vote = metrics.borrow().vote;
    // The vote this node held when it last stood at once (it does so once per vote).
    let mut hurried: Option<Vote<NodeId>> = None;
    loop {
        let s = seen(&mut metrics);
        // openraft restarts its own view of the lease on every change of the vote: so does
        // this loop (a new leader's first append, a higher term seen, its own candidacy).
        if s.vote != vote || s.state == ServerState::Leader {
            vote = s.vote;
            gate.clock().restart();
        }
        let heard = gate.clock().read();
        let at = heard.at + timing.wait(s.vote.is_committed(), heard.longer_log, draw);
        let now = Instant::now();
        let may = stands
            && s.voter
            && s.state != ServerState::Leader
            && !gate.repairing()
            && !gate.busy();
        let hurry = (hurried != Some(s.vote))
            .then(|| hurry_at(&heard, &s.vote, timing.lease))
            .flatten();
        let at_once = hurry.is_some_and(|h| h <= now);
        if may && (at <= now || at_once) {
            if raft.trigger().elect().await.is_err() {
                return; // openraft has stopped
            }
            let term = vote.leader_id().term + 1;
            tracing::info!(term, at_once, "standing for election");
            if at_once {
                hurried = Some(s.vote);
            }
            gate.clock().stood();
            draw = rng.f64();
            continue;
        }
        // Due but may not stand now: look again soon (a peer's request being answered
        // takes an fsync) or a heartbeat later (or on a change); or when it should stand
        // at once.
        let again = if gate.busy() {
            BUSY_LOOK_AGAIN
        } else {
            timing.heartbeat
        };
        let mut next = if at > now { at } else { now + again };
        if let Some(h) = hurry.filter(|h| *h > now) {
            next = next.min(h);
        }
        tokio::select! {
            _ = stopped.changed() => return,
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::ElectionClock;

    fn timing() -> Timing {
        let raft = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 300,
            election_timeout_max: 600,
            ..openraft::Config::default()
        };
        Timing::new(&raft, Duration::from_millis(300)).unwrap()
    }

    #[test]
    fn a_follower_waits_out_the_lease_and_a_heartbeat_before_the_random_part() {
        let t = timing();
        assert_eq!(t.wait(true, false, 0.0), Duration::from_millis(650));
        assert_eq!(t.wait(true, false, 0.5), Duration::from_millis(800));
        assert!(t.wait(true, false, 0.999_999) < Duration::from_millis(950));
    }

    #[test]
    fn a_candidate_waits_the_minimum_time_out_and_the_random_part() {
        let t = timing();
        assert_eq!(t.wait(false, false, 0.0), Duration::from_millis(300));
        assert_eq!(t.wait(false, false, 0.25), Duration::from_millis(375));
    }

    #[test]
    fn a_longer_log_seen_puts_the_next_candidacy_back_by_two_leases() {
        let t = timing();
        assert_eq!(t.wait(false, true, 0.0), Duration::from_millis(1500));
        assert_eq!(t.wait(true, true, 0.0), Duration::from_millis(1850));
    }

    #[test]
    fn a_draw_out_of_range_is_held_to_the_spread() {
        let t = timing();
        assert_eq!(t.wait(false, false, 7.0), Duration::from_millis(600));
        assert_eq!(t.wait(false, false, -1.0), Duration::from_millis(300));
    }

    fn heard(shorter_log: Option<Vote<NodeId>>) -> Heard {
        let now = Instant::now();
        Heard {
            at: now,
            leader_at: now,
            longer_log: false,
            shorter_log,
        }
    }

    #[test]
    fn a_shorter_log_standing_hurries_a_node_whose_vote_is_not_above_it() {
        let lease = Duration::from_millis(600);
        let h = heard(Some(Vote::new(8, 3)));
        let due = Some(h.leader_at + lease);
        // Following the dead leader of term 7; then its own candidacy at the other's term
        // with a lower id: both below the other's vote.
        assert_eq!(hurry_at(&h, &Vote::new_committed(7, 1), lease), due);
        assert_eq!(hurry_at(&h, &Vote::new(8, 2), lease), due);
        // Above it: its candidacy may win, it waits its turn.
        assert_eq!(hurry_at(&h, &Vote::new(9, 2), lease), None);
        assert_eq!(hurry_at(&h, &Vote::new(8, 4), lease), None);
        assert_eq!(hurry_at(&heard(None), &Vote::new(1, 1), lease), None);
    }

    #[test]
    fn the_clock_keeps_the_highest_shorter_log_refused() {
        let c = ElectionClock::default();
        c.shorter_log(Vote::new(8, 3));
        c.shorter_log(Vote::new(7, 3));
        assert_eq!(c.read().shorter_log, Some(Vote::new(8, 3)));
        c.shorter_log(Vote::new(8, 4));
        assert_eq!(c.read().shorter_log, Some(Vote::new(8, 4)));
    }

    #[test]
    fn a_spread_of_zero_is_refused() {
        let e = Timing::new(&openraft::Config::default(), Duration::ZERO).unwrap_err();
        assert!(matches!(
            e,
            Error::Config {
                setting: "election_spread",
                ..
            }
        ));
    }

    #[test]
    fn the_clock_notes_a_longer_log_until_the_node_stands() {
        let c = ElectionClock::default();
        c.longer_log();
        assert!(c.read().longer_log);
        c.leader();
        assert!(c.read().longer_log, "hearing a leader does not clear it");
        c.stood();
        assert!(!c.read().longer_log);
    }
}
