//! Membership changes of a real three-node cluster (`halfmq broker --peers` processes on
//! loopback) under load: a fourth node started with `--join true` on an empty directory is
//! added with `halfmq cluster add-node` (it catches up from the log or a snapshot and
//! becomes a voter), a follower is removed with `halfmq cluster remove-node` and stopped,
//! and then the leader is killed: the two members left, the new node one of them, elect a
//! leader and acknowledge writes, which they could not if the new node did not vote. At the
//! end every acknowledged send is on every running node exactly once.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{acked_keys, ClusterProcs};
use common::Proc;

const TOPIC: &str = "payments";
/// Bound on any one wait, so that a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(60);

/// The member ids the node at `id` reports, and their roles.
fn members(c: &ClusterProcs, id: u64) -> Vec<(u64, String)> {
    let st = c.status_via(&c.addrs[&id]);
    st["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().expect("an id"),
                n["role"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_new_node_joins_a_follower_leaves_and_the_new_members_elect_a_leader() {
    let mut c = ClusterProcs::start();
    let first = c.addr_list();
    let producers: Vec<Proc> = (0..2)
        .map(|p| c.produce(&first, TOPIC, &format!("p{p}"), 1_000_000))
        .collect();
    for p in &producers {
        assert!(
            p.wait_line(|l| l.starts_with('{'), WAIT).is_some(),
            "{} acknowledged nothing:\n{}",
            p.name,
            p.stderr()
        );
    }
    std::thread::sleep(Duration::from_millis(500));

    // A fourth node, empty, joins.
    let (leader, _) = c.leader();
    let addr4 = c.start_joining(4);
    let t = Instant::now();
    let out = c.cluster_cmd(
        &["add-node", "--id", "4", "--node-addr", &addr4],
        &[1, 2, 3],
    );
    assert!(out.contains("node 4"), "{out}");
    eprintln!("node 4 added (caught up and promoted) in {:?}", t.elapsed());
    let (leader_now, _) = c.leader();
    let seen = members(&c, leader_now);
    assert!(
        seen.iter().any(|(id, role)| *id == 4 && role == "follower"),
        "node 4 is not a voting member: {seen:?}"
    );

    // A follower leaves and is stopped.
    let gone = *c
        .addrs
        .keys()
        .find(|id| **id != leader_now && **id != 4)
        .expect("a follower");
    let out = c.cluster_cmd(&["remove-node", "--id", &gone.to_string()], &[leader]);
    assert!(out.contains(&format!("node {gone} removed")), "{out}");
    c.kill(gone);
    let (leader_now, _) = c.leader();
    let ids: BTreeSet<u64> = members(&c, leader_now)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let expected: BTreeSet<u64> = [1, 2, 3, 4].into_iter().filter(|id| *id != gone).collect();
    assert_eq!(ids, expected, "members after removing node {gone}");

    // The leader dies: node 4 and the other member must elect a new one.
    c.kill(leader_now);
    let left: Vec<u64> = expected
        .iter()
        .copied()
        .filter(|id| *id != leader_now)
        .collect();
    let (new, term) = c.leader_among(&left);
    let left_addrs: Vec<&str> = left.iter().map(|id| c.addrs[id].as_str()).collect();
    let mut probe = c.produce(&left_addrs.join(","), TOPIC, "probe", 1);
    assert!(
        probe.wait_line(|l| l.starts_with('{'), WAIT).is_some(),
        "members {left:?} (leader {new}, term {term}) acknowledged no write:\n{}",
        probe.stderr()
    );
    probe.wait_exit(WAIT);
    c.restart(leader_now);

    let mut acked: BTreeSet<String> = ["probe-0".to_owned()].into();
    for mut p in producers {
        assert!(p.is_running(), "{} stopped:\n{}", p.name, p.stderr());
        p.kill();
        acked.extend(acked_keys(&p));
    }
    c.assert_stored_once(TOPIC, &acked, &BTreeSet::new(), WAIT);
    println!(
        "membership: node 4 joined, node {gone} left, leader {leader_now} killed and node {new} \
         elected; {} acknowledged sends on every member exactly once",
        acked.len()
    );
}
