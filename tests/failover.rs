//! Three real `halfmq broker --peers` processes on loopback: producers (`halfmq produce
//! --addr A,B,C --json`) run under load while the leader is killed with SIGKILL, again and
//! again, and restarted. After each kill a probe send measures the failover: from the kill
//! to the first write the new leader acknowledges. At the end every send a producer printed
//! (acknowledged) is on every node exactly once.
//!
//! `HALFMQ_FAILOVER_ROUNDS` sets the kills (3 by default, the CI version);
//! `scripts/failover-drill N` runs N in release and prints the median and the maximum.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{acked_keys, ClusterProcs};
use common::{env_u64, load, Proc};

const TOPIC: &str = "payments";
const PRODUCERS: usize = 3;
/// Bound on any one wait, so that a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(60);

/// A write to a follower is answered `NOT_LEADER` with the leader's client address.
fn a_follower_names_the_leader(c: &ClusterProcs) {
    let (leader, _) = c.leader();
    let follower = c
        .addrs
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    let rt = load::runtime();
    let r = rt.block_on(async {
        let client = load::connect(&c.addrs[follower], "follower").await;
        client
            .send(TOPIC, &halfmq::Message::new("to a follower"))
            .await
    });
    let e = r.expect_err("a follower stored a write");
    assert_eq!(
        halfmq_client::protocol::leader_addr(&e),
        Some(Some(c.addrs[&leader].clone())),
        "{e}"
    );
}

fn median_max(ms: &mut [u128]) -> (u128, u128) {
    ms.sort_unstable();
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

#[test]
fn acknowledged_sends_survive_repeated_leader_kills_exactly_once() {
    let rounds = env_u64("HALFMQ_FAILOVER_ROUNDS").unwrap_or(3);
    let mut c = ClusterProcs::start();
    a_follower_names_the_leader(&c);
    let producers: Vec<Proc> = (0..PRODUCERS)
        .map(|p| c.produce(&c.addr_list(), TOPIC, &format!("p{p}"), 1_000_000))
        .collect();
    for p in &producers {
        assert!(
            p.wait_line(|l| l.starts_with('{'), WAIT).is_some(),
            "{} acknowledged nothing:\n{}",
            p.name,
            p.stderr()
        );
    }
    let mut failover_ms = Vec::new();
    let mut probes = BTreeSet::new();
    for round in 0..rounds {
        let (leader, term) = c.leader();
        // Load on this leader for a while.
        std::thread::sleep(Duration::from_millis(500));
        c.kill(leader);
        let killed = Instant::now();
        let key = format!("probe-{round}");
        let mut probe = c.produce(&c.addr_list(), TOPIC, &key, 1);
        let acked = probe.wait_line(|l| l.starts_with('{'), WAIT);
        let took = killed.elapsed();
        assert!(
            acked.is_some(),
            "round {round}: no write acknowledged after node {leader} (term {term}) was \
             killed:\n{}",
            probe.stderr()
        );
        probe.wait_exit(WAIT);
        probes.insert(format!("{key}-0"));
        failover_ms.push(took.as_millis());
        eprintln!(
            "round {round}: killed leader {leader} (term {term}), writes resumed after {took:?}"
        );
        c.restart(leader);
    }
    let mut acked = probes.clone();
    for mut p in producers {
        assert!(p.is_running(), "{} stopped:\n{}", p.name, p.stderr());
        p.kill();
        acked.extend(acked_keys(&p));
    }
    c.assert_stored_once(TOPIC, &acked, &BTreeSet::new(), WAIT);
    let (median, max) = median_max(&mut failover_ms);
    println!(
        "failover: {rounds} leader kills, {} acknowledged sends, writes resumed after median \
         {median} ms, max {max} ms",
        acked.len()
    );
}
