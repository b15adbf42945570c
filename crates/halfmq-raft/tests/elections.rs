//! Elections (`halfmq_raft::elect`): a live leader is left alone, and when the survivor
//! with the shorter log stands first after the leader's death, the one with the longer log
//! stands at once instead of waiting its turn.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{bodies, Cluster};
use halfmq_raft::NodeId;

fn term(c: &Cluster, id: NodeId) -> u64 {
    c.nodes[&id].raft().metrics().borrow().current_term
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_cluster_keeps_its_leader_and_term() {
    let c = Cluster::sim(16, |_| {}).await;
    let leader = c.leader().await;
    let before: Vec<u64> = c.nodes.keys().map(|id| term(&c, *id)).collect();
    // Three times the longest wait of a follower (600 + 50 + 300 ms) with nothing but
    // heartbeats: a follower that did not count them as the leader heard would stand.
    tokio::time::sleep(Duration::from_millis(3 * 950)).await;
    assert_eq!(c.leader().await, leader);
    let after: Vec<u64> = c.nodes.keys().map(|id| term(&c, *id)).collect();
    assert_eq!(before, after, "a term changed under a live leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_longer_log_stands_at_once_when_a_shorter_one_stood() {
    // Waits of up to an hour: within the test no node stands because its wait passed.
    let mut c = Cluster::sim(17, |cfg| cfg.election_spread = Duration::from_secs(3600)).await;
    let mut acked: BTreeSet<String> = c.send(&bodies("both", 3)).await.into_iter().collect();
    let leader = c.leader().await;
    let others: Vec<NodeId> = c.nodes.keys().copied().filter(|i| *i != leader).collect();
    // The higher id misses the last writes: its log ends before the other's, and its
    // candidacy is above the other's at the same term.
    let (long, short) = (others[0], others[1]);
    c.sim_net().partition(&[&[short], &[leader, long]]);
    acked.extend(c.send(&bodies("long", 3)).await);
    c.caught_up(long, leader).await;
    c.kill(leader).await;
    c.sim_net().heal();
    let before = term(&c, long).max(term(&c, short));
    // Once `long` has not heard the dead leader for its lease (600 ms), `short` stands.
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.nodes[&short]
        .raft()
        .trigger()
        .elect()
        .await
        .expect("elect");
    let new = c.leader_among(&[short, long]).await;
    assert_eq!(new, long, "a log lacking committed entries won");
    // `short`'s term, then `long`'s own candidacy at that term (below `short`'s vote), then
    // one above it.
    let took = term(&c, new) - before;
    assert!(took <= 2, "the longer log won {took} terms later");
    common::each_holds_exactly(&c, &[short, long], long, &acked).await;
}
