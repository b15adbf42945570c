//! Three nodes on loopback TCP, as three broker processes would be: they form a cluster,
//! replicate, fail over, and catch a wiped node up from a snapshot sent in chunks; a peer
//! without the cluster's token is refused.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    bodies, each_holds_exactly, kill_the_leader, snapshot_often, wiped_follower_catches_up,
    Cluster, Net,
};
use halfmq_raft::network::tcp::TcpFactory;
use openraft::error::RPCError;
use openraft::network::RPCOption;
use openraft::raft::VoteRequest;
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory, Vote};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_on_tcp_replicate_and_fail_over() {
    let mut c = Cluster::tcp("cluster-token").await;
    let mut acked = BTreeSet::new();
    for round in 0..10 {
        acked.extend(c.send(&bodies(&format!("a{round}"), 2)).await);
    }
    let (new, survivors) = kill_the_leader(&mut c).await;
    for round in 0..10 {
        acked.extend(c.send(&bodies(&format!("b{round}"), 2)).await);
    }
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
