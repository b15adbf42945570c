//! In-process clusters of three nodes on the simulated network: what is acknowledged is on
//! a majority and survives the leader's loss exactly once, a cut-off minority never
//! acknowledges, and a wiped node catches up from a snapshot.
//!
//! No assertion is about time: waits have a generous bound only so that a broken build
//! fails instead of hanging. Faults are drawn from the seed each test names.

mod common;

use std::collections::BTreeSet;

use common::{assert_exactly, bodies, Cluster, TOPIC, WAIT};
use halfmq::Message;
use halfmq_raft::{Command, NodeId};
use openraft::SnapshotPolicy;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_the_leaders_death_exactly_once() {
    let mut c = Cluster::sim(0x5eed_0001, |_| {}).await;
    c.sim_net().set_drop_per_mille(20);
    c.sim_net().set_delay_ms_max(3);
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
    c.sim_net().set_drop_per_mille(0);
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
    let mut c = Cluster::sim(0x5eed_0002, |_| {}).await;
    let mut acked = BTreeSet::new();
    acked.extend(c.send(&bodies("before", 3)).await);
    let old = c.leader().await;
    let others: Vec<NodeId> = c.nodes.keys().copied().filter(|i| *i != old).collect();
    c.sim_net().partition(&[&[old], &others]);

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

    c.sim_net().heal();
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
    let mut c = Cluster::sim(0x5eed_0003, |cfg| {
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
    assert!(
        m.snapshot.is_some(),
        "the follower installed a snapshot: {m:?}"
    );
    assert_exactly(&c.messages(follower), &acked);
    assert_eq!(c.messages(follower), c.messages(leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_stopped_whole_restarts_with_everything_it_acknowledged() {
    let mut c = Cluster::sim(0x5eed_0004, |cfg| {
        // Some of it in snapshots, some only in the log.
        cfg.raft.snapshot_policy = SnapshotPolicy::LogsSinceLast(7);
        cfg.segment_bytes = 2048;
    })
    .await;
    let mut acked = BTreeSet::new();
    for round in 0..12 {
        acked.extend(c.send(&bodies(&format!("r{round}"), 3)).await);
    }
    for id in [1, 2, 3] {
        c.kill(id).await;
    }
    for id in [1, 2, 3] {
        c.boot(id).await;
    }
    acked.extend(c.send(&bodies("after", 2)).await);
    let leader = c.leader().await;
    let mut seen = Vec::new();
    for id in [1, 2, 3] {
        c.caught_up(id, leader).await;
        let got = c.messages(id);
        assert_exactly(&got, &acked);
        seen.push(got);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
}
