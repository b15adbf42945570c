//! Partitions of a real three-node cluster: each `halfmq broker --peers` process runs in its
//! own Linux network namespace on one bridge, and a partition is a pair of blackhole routes
//! between two namespaces (`common::netns`), so the kernel drops the packets of connections
//! already open as well as new ones. Producers (`halfmq produce --addr A,B,C --json`) run
//! throughout; the test reaches every node from outside.
//!
//! - A leader cut off from both followers acknowledges no write (a write sent to it
//!   directly is not acknowledged), while the two others elect a leader and acknowledge.
//! - A follower cut off while writes go on catches up when the partition heals.
//! - At the end every acknowledged send is on every node exactly once, and the write sent
//!   to the cut-off leader is on none.
//!
//! Needs root and iproute2 (network namespaces, veth, a bridge); fails with the reason
//! where the machine cannot make them.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{acked_keys, ClusterProcs};
use common::netns::Netns;
use common::{load, Proc};

const TOPIC: &str = "payments";
/// Bound on any one wait, so that a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(60);
/// How long a write sent to a cut-off leader is given to be answered (never acknowledged:
/// a leader that lost the majority gives up on it after about 1.2 s).
const MINORITY_WAIT: Duration = Duration::from_secs(5);
/// How long a producer may take to acknowledge again after its leader was cut off. A
/// liveness bound, not a speed target (about 1.4 s is usual): a client stuck on the cut-off
/// leader would wait for its request time-out, 30 s.
const FOLLOW_WAIT: Duration = Duration::from_secs(10);

/// Send one message with `key` to the node at `addr` only, waiting at most `wait`: whether
/// it was acknowledged, and what came back.
fn send_to_one(c: &ClusterProcs, addr: &str, key: &str, wait: Duration) -> (bool, String) {
    let rt = load::runtime();
    rt.block_on(async {
        let client = c.connect(addr, "direct").await;
        let msg = halfmq::Message::new("to one node").with_key(key);
        match tokio::time::timeout(wait, client.send(TOPIC, &msg)).await {
            Ok(Ok(r)) => (true, format!("{r:?}")),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (false, format!("no answer within {wait:?}")),
        }
    })
}

/// One write acknowledged through `addrs`, and how long it took.
fn probe(c: &ClusterProcs, addrs: &str, key: &str) -> Duration {
    let t = Instant::now();
    let mut p = c.produce(addrs, TOPIC, key, 1);
    let acked = p.wait_line(|l| l.starts_with('{'), WAIT);
    assert!(
        acked.is_some(),
        "no write acknowledged through {addrs}:\n{}",
        p.stderr()
    );
    p.wait_exit(WAIT);
    t.elapsed()
}

/// How long until producer `p` acknowledges a send it made after now (its sends are
/// numbered: the one in flight now may still have been committed before; the one after
/// it was made now or later).
fn acks_again(p: &Proc, since: Instant) -> Duration {
    let number = |l: &str| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        v["key"].as_str()?.rsplit('-').next()?.parse::<u64>().ok()
    };
    let last = p.stdout_lines().iter().filter_map(|l| number(l)).max();
    let past = last.map_or(0, |n| n + 2);
    let again = p.wait_line(|l| number(l).is_some_and(|n| n >= past), FOLLOW_WAIT);
    assert!(
        again.is_some(),
        "{} acknowledged nothing new within {FOLLOW_WAIT:?}:\n{}",
        p.name,
        p.stderr()
    );
    since.elapsed()
}

#[test]
fn a_cut_off_leader_acknowledges_nothing_and_every_node_catches_up_after_the_heal() {
    let net = Netns::new(&[1, 2, 3])
        .unwrap_or_else(|e| panic!("this test needs network namespaces (root and iproute2): {e}"));
    let c = ClusterProcs::start_in(&net);
    let producers = c.producing(TOPIC, 2, WAIT);
    let mut probes = BTreeSet::new();
    let mut absent = BTreeSet::new();

    // 1. The leader is cut off from both followers.
    let (old, term) = c.leader();
    std::thread::sleep(Duration::from_millis(300));
    net.isolate(old);
    let cut = Instant::now();
    let (acked, what) = send_to_one(&c, &c.addrs[&old], "minority-0", MINORITY_WAIT);
    assert!(
        !acked,
        "node {old}, cut off from the majority, acknowledged a write: {what}"
    );
    assert!(
        what.contains("fate is unknown") || what.contains("not the leader"),
        "node {old}, cut off from the majority, did not give up on a write: {what}"
    );
    eprintln!("the write sent to cut-off node {old}: {what}");
    absent.insert("minority-0".to_owned());
    let majority: Vec<u64> = c.addrs.keys().copied().filter(|id| *id != old).collect();
    let (new, new_term) = c.leader_among(&majority);
    assert!(new_term > term, "term {term} → {new_term}");
    let majority_addrs: Vec<&str> = majority.iter().map(|id| c.addrs[id].as_str()).collect();
    probe(&c, &majority_addrs.join(","), "probe-majority");
    probes.insert("probe-majority-0".to_owned());
    eprintln!(
        "leader {old} (term {term}) cut off: node {new} leads term {new_term}, a write \
         acknowledged {:?} after the cut",
        cut.elapsed()
    );
    for p in &producers {
        let took = acks_again(p, cut);
        eprintln!("{} acknowledged again {took:?} after the cut", p.name);
    }

    // 2. Healed: the old leader follows and catches up.
    net.rejoin(old);
    probe(&c, &c.addr_list(), "probe-healed");
    probes.insert("probe-healed-0".to_owned());
    c.wait_caught_up(old, WAIT);

    // 3. A follower is cut off while writes go on, then rejoins and catches up.
    let (leader, _) = c.leader();
    let follower = c.follower_of(leader, &[]);
    net.isolate(follower);
    std::thread::sleep(Duration::from_millis(1500));
    probe(&c, &c.addr_list(), "probe-follower-cut");
    probes.insert("probe-follower-cut-0".to_owned());
    net.rejoin(follower);
    c.wait_caught_up(follower, WAIT);

    let mut acked = probes;
    for mut p in producers {
        assert!(p.is_running(), "{} stopped:\n{}", p.name, p.stderr());
        p.kill();
        let keys = acked_keys(&p);
        eprintln!("{}: {} sends acknowledged", p.name, keys.len());
        acked.extend(keys);
    }
    c.assert_stored_once(TOPIC, &acked, &absent, WAIT);
    println!(
        "partitions: leader {old} cut off and healed, follower {follower} cut off and healed; \
         {} acknowledged sends on every node exactly once",
        acked.len()
    );
}
