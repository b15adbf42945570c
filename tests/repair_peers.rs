//! Repair from peers (issue 15, item 7) with real processes: a follower of a three-node
//! cluster (`halfmq broker --peers` on loopback) under load is killed with SIGKILL, its files
//! are damaged with real byte flips, and it is started again. It must start, keep the
//! damaged files (moved aside, byte for byte as damaged), take the cluster's copy through
//! raft, and then vote again: the leader is killed, and the repaired node and the other
//! one must elect a leader and acknowledge a write, which they cannot without its vote. Two
//! rounds: the raft log (a frame in the middle of its newest segment, with one copy of the
//! vote and the broker's own log damaged too), then the snapshot journal. At the end every
//! acknowledged send is on every node exactly once, and the three brokers' logs are the
//! same bytes.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{acked_keys, damage_frame, ClusterProcs};

const TOPIC: &str = "payments";
/// Bound on any one wait, so that a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// A frame in the middle of the newest raft log segment, the `vote` file (its copy is
    /// whole) and the middle of the broker's first log segment.
    RaftLog,
    /// The first frame of the snapshot journal.
    Journal,
}

/// The files in `dir` whose names start with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.expect("an entry").path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn size_of_tree(p: &Path) -> u64 {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .map(|rd| rd.map(|e| size_of_tree(&e.expect("an entry").path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// Flip 16 bytes in the middle of what `path` holds before its trailing zeros.
fn damage_middle(path: &Path) {
    let mut bytes = std::fs::read(path).expect("a file to damage");
    let end = bytes.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    assert!(end > 64, "{} holds {end} bytes", path.display());
    for b in &mut bytes[end / 2..end / 2 + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(path, &bytes).expect("write the damage");
}

/// One round: a follower killed, damaged as `what` says, restarted; it must repair itself
/// and then vote (the leader is killed and the two others elect one and acknowledge a
/// write). The probe's key, acknowledged.
fn round(c: &mut ClusterProcs, what: Damage, n: usize) -> String {
    let (leader, _) = c.leader();
    let f = c.follower_of(leader, &[]);
    let dir = c.dir(f);
    let journal = dir.join("state/snapshot/journal");
    if let Damage::Journal = what {
        // A snapshot is built every 10,000 entries: wait for the follower's first (its
        // meta; the journal itself holds every batch as soon as it is applied, and what
        // no snapshot covers yet is cut at the restart, not repaired).
        let deadline = Instant::now() + WAIT * 3;
        while !dir.join("state/snapshot/meta").exists() {
            assert!(Instant::now() < deadline, "node {f} built no snapshot");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    c.kill(f);
    std::thread::sleep(Duration::from_millis(300));

    // (file relative to the node's directory, its bytes as damaged)
    let mut damaged: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    match what {
        Damage::RaftLog => {
            let seg = named(&dir.join("raft/log"), "0")
                .pop()
                .expect("a raft segment");
            damaged.push((
                seg.strip_prefix(&dir).unwrap().into(),
                damage_frame(&seg, None),
            ));
            let vote = dir.join("raft/vote");
            let mut v = std::fs::read(&vote).expect("the vote");
            let last = v.len() - 1;
            v[last] ^= 0x5a;
            std::fs::write(&vote, &v).expect("damage the vote");
            let broker = named(&dir.join("state"), "broker.")
                .pop()
                .expect("a broker");
            let first = named(&broker.join("log"), "0").remove(0);
            damage_middle(&first);
        }
        Damage::Journal => {
            let bytes = damage_frame(&journal, Some(0));
            damaged.push((journal.strip_prefix(&dir).unwrap().into(), bytes));
        }
    }
    let before = named(&dir, "damaged.").len();
    let t = Instant::now();
    c.restart(f);

    // It moved the damaged files aside, every byte kept, and marked itself repairing.
    let aside = named(&dir, "damaged.");
    assert_eq!(
        aside.len(),
        before + 1,
        "node {f} moved nothing aside ({what:?})"
    );
    let aside = aside.last().unwrap().clone();
    for (rel, bytes) in &damaged {
        let kept = std::fs::read(aside.join(rel)).expect("the damaged file kept");
        assert!(kept == *bytes, "{} was changed", rel.display());
    }
    if let Damage::RaftLog = what {
        assert!(
            aside.join("raft/vote.damaged").exists(),
            "the damaged vote copy"
        );
    }
    // What it took from its peers again: the raft log and the snapshot journal.
    let raft_state =
        size_of_tree(&aside.join("raft")) + size_of_tree(&aside.join("state/snapshot"));
    let mib = raft_state as f64 / (1 << 20) as f64;
    let marker = dir.join("repairing");
    let deadline = Instant::now() + WAIT;
    while marker.exists() {
        assert!(
            Instant::now() < deadline,
            "node {f} did not finish its repair"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "round {n} ({what:?}): node {f} repaired in {:.2} s from its start ({mib:.1} MiB of raft log and journal moved aside)",
        t.elapsed().as_secs_f64()
    );

    // It votes again: without it the two others are no majority.
    let (old, _) = c.leader();
    c.kill(old);
    let left: Vec<u64> = c.addrs.keys().copied().filter(|id| *id != old).collect();
    assert!(left.contains(&f));
    let (new, term) = c.leader_among(&left);
    let addrs: Vec<&str> = left.iter().map(|id| c.addrs[id].as_str()).collect();
    let prefix = format!("probe{n}");
    let mut probe = c.produce(&addrs.join(","), TOPIC, &prefix, 1);
    assert!(
        probe.wait_line(|l| l.starts_with('{'), WAIT).is_some(),
        "nodes {left:?} (leader {new}, term {term}) acknowledged no write after node {f}'s \
         repair:\n{}",
        probe.stderr()
    );
    probe.wait_exit(WAIT);
    c.restart(old);
    format!("{prefix}-0")
}

#[test]
fn a_follower_with_a_damaged_log_rebuilds_it_from_its_peers_and_votes_again() {
    let mut c = ClusterProcs::start();
    let producers = c.producing(TOPIC, 2, WAIT);
    std::thread::sleep(Duration::from_millis(1500));
    let mut acked: BTreeSet<String> = BTreeSet::new();
    acked.insert(round(&mut c, Damage::RaftLog, 1));
    acked.insert(round(&mut c, Damage::Journal, 2));

    for mut p in producers {
        assert!(p.is_running(), "{} stopped:\n{}", p.name, p.stderr());
        p.kill();
        acked.extend(acked_keys(&p));
    }
    c.assert_stored_once(TOPIC, &acked, &BTreeSet::new(), WAIT);
    // Every node has applied the leader's log: then the same bytes everywhere.
    let (leader, _) = c.leader();
    for id in [1, 2, 3].into_iter().filter(|id| *id != leader) {
        c.wait_caught_up(id, WAIT);
    }
    std::thread::sleep(Duration::from_millis(500));
    for id in [1, 2, 3] {
        c.stop(id);
    }
    let logs: Vec<Vec<Vec<u8>>> = [1, 2, 3].iter().map(|id| c.broker_log_bytes(*id)).collect();
    for (i, log) in logs.iter().enumerate().skip(1) {
        assert!(
            *log == logs[0],
            "node {}'s broker log differs from node 1's ({} and {} segments, {} and {} bytes)",
            i + 1,
            log.len(),
            logs[0].len(),
            log.iter().map(Vec::len).sum::<usize>(),
            logs[0].iter().map(Vec::len).sum::<usize>()
        );
    }
    println!(
        "repair: {} acknowledged sends on every node exactly once, the three broker logs \
         the same {} bytes",
        acked.len(),
        logs[0].iter().map(Vec::len).sum::<usize>()
    );
}
