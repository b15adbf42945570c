//! Three nodes on loopback TCP, as three broker processes would be: they form a cluster,
//! replicate, fail over, and catch a wiped node up from a snapshot sent in chunks; a peer
//! without the cluster's token is refused; a node whose raft log is damaged repairs itself
//! from the others and refuses votes until it has.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    bodies, each_holds_exactly, kill_the_leader, snapshot_often, wiped_follower_catches_up,
    Cluster, Net,
};
use halfmq_raft::frame::{self, Scan};
use halfmq_raft::network::tcp::TcpFactory;
use openraft::error::RPCError;
use openraft::network::RPCOption;
use openraft::raft::VoteRequest;
use openraft::{BasicNode, CommittedLeaderId, LogId, RaftNetwork, RaftNetworkFactory, Vote};

/// Ten sends of two messages each, tagged `tag`, through `c`; what was acknowledged goes to
/// `acked`.
async fn send_rounds(c: &Cluster, tag: &str, acked: &mut BTreeSet<String>) {
    for round in 0..10 {
        acked.extend(c.send(&bodies(&format!("{tag}{round}"), 2)).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_on_tcp_replicate_and_fail_over() {
    let mut c = Cluster::tcp("cluster-token").await;
    let mut acked = BTreeSet::new();
    send_rounds(&c, "a", &mut acked).await;
    let (new, survivors) = kill_the_leader(&mut c).await;
    send_rounds(&c, "b", &mut acked).await;
    each_holds_exactly(&c, &survivors, new, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_without_the_token_is_refused() {
    let c = Cluster::tcp("right-token").await;
    let addr = match &c.net {
        Net::Tcp { addrs, .. } => addrs[&1].clone(),
        Net::Sim(_) => unreachable!("a TCP cluster"),
    };
    let term_before = c.nodes[&1].raft().metrics().borrow().current_term;
    let mut factory = TcpFactory::new(9, "wrong-token".to_owned());
    let mut link = factory.new_client(1, &BasicNode::new(addr)).await;
    let vote = VoteRequest::new(Vote::new(term_before + 100, 9), None);
    let r = link
        .vote(vote, RPCOption::new(Duration::from_secs(10)))
        .await;
    assert!(matches!(r, Err(RPCError::Unreachable(_))), "{r:?}");
    // The vote never reached raft: the node's term did not jump.
    assert!(c.nodes[&1].raft().metrics().borrow().current_term < term_before + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_catches_up_over_tcp_from_a_snapshot() {
    let mut c = Cluster::tcp_with("cluster-token", snapshot_often).await;
    wiped_follower_catches_up(&mut c, 12).await;
}

/// Flip a byte in the body of the middle frame of node `dir`'s newest raft log segment.
fn damage_the_raft_log(dir: &std::path::Path) {
    let mut segs: Vec<_> = std::fs::read_dir(dir.join("raft/log"))
        .expect("the raft log")
        .map(|e| e.expect("a segment").path())
        .collect();
    segs.sort();
    let seg = segs.pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).expect("read the segment");
    let mut frames = Vec::new();
    let mut pos = 0;
    while let Scan::Frame { len } = frame::scan(&bytes[pos..]) {
        frames.push((pos, len));
        pos += len;
    }
    assert!(frames.len() > 2, "{} frames", frames.len());
    let (at, len) = frames[frames.len() / 2];
    bytes[at + frame::HEADER_BYTES + (len - frame::HEADER_BYTES) / 2] ^= 0x5a;
    std::fs::write(&seg, &bytes).expect("write the damage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_damaged_log_refuses_votes_until_it_holds_what_was_committed() {
    let mut c = Cluster::tcp("cluster-token").await;
    let mut acked = BTreeSet::new();
    send_rounds(&c, "a", &mut acked).await;
    let leader = c.leader().await;
    let f = *c.nodes.keys().find(|i| **i != leader).expect("a follower");
    c.kill(f).await;
    damage_the_raft_log(&c.dir(f));
    // Alone, it repairs and waits: no leader to catch up from.
    let others: Vec<u64> = c.nodes.keys().copied().collect();
    for id in &others {
        c.kill(*id).await;
    }
    c.boot(f).await;
    let gate = c.nodes[&f].peer_gate();
    assert!(gate.repairing(), "node {f} did not see the damage");
    assert!(c.dir(f).join("repairing").exists());
    let kept: Vec<_> = std::fs::read_dir(c.dir(f))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("damaged."))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged files moved aside");
    // Alone for two maximum election time-outs and more, it stood for no election: it is
    // no candidate, and its term is the one its kept vote holds.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let m = c.nodes[&f].raft().metrics().borrow().clone();
    let term = m.vote.leader_id().term;
    assert_eq!(m.current_term, term, "{m:?}");
    assert!(
        !matches!(
            m.state,
            openraft::ServerState::Candidate | openraft::ServerState::Leader
        ),
        "it stood for election alone: {m:?}"
    );
    // A candidate far ahead in term and log: refused, and its term not taken.
    let ahead = LogId::new(CommittedLeaderId::new(term + 100, 9), 1_000_000);
    let req = VoteRequest::new(Vote::new(term + 100, 9), Some(ahead));
    let r = gate.vote(c.nodes[&f].raft(), req).await.expect("an answer");
    assert!(!r.vote_granted, "a repairing node voted: {r:?}");
    assert!(c.nodes[&f].raft().metrics().borrow().current_term < term + 100);

    // The others come back and elect a leader without it; it catches up and is repaired.
    for id in &others {
        c.boot(*id).await;
    }
    for round in 0..5 {
        acked.extend(c.send(&bodies(&format!("b{round}"), 2)).await);
    }
    let leader = c.leader().await;
    c.caught_up(f, leader).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while gate.repairing() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {f} stays repairing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!c.dir(f).join("repairing").exists(), "the marker stays");
    assert_eq!(c.log_bytes(f), c.log_bytes(leader));

    // It votes again: with the leader gone, it and the other elect one and take writes.
    let (new, survivors) = kill_the_leader(&mut c).await;
    assert!(survivors.contains(&f));
    for round in 0..3 {
        acked.extend(c.send(&bodies(&format!("c{round}"), 2)).await);
    }
    each_holds_exactly(&c, &survivors, new, &acked).await;
}
