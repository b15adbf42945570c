//! Three real `halfmq broker --peers` processes on loopback: producers (`halfmq produce
//! --addr A,B,C --json`) run under load while the leader is killed with SIGKILL, again and
//! again, and restarted. After each kill a probe send measures the failover: from the kill
//! to the first write the new leader acknowledges. At the end every send a producer printed
//! (acknowledged) is on every node exactly once.
//!
//! `HALFMQ_FAILOVER_ROUNDS` sets the kills (3 by default, the CI version);
//! `scripts/failover-drill N` runs N in release and prints the median and the maximum.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::cluster::{acked_keys, ClusterProcs};
use common::{env_u64, halfmq_cmd, load, Proc};
use serde_json::Value;

const TOPIC: &str = "payments";
const PRODUCERS: usize = 3;
/// Bound on any one wait, so that a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(60);

/// A write to a follower is answered `NOT_LEADER` with the leader's client address.
fn a_follower_names_the_leader(c: &ClusterProcs) {
    let (leader, _) = c.leader();
    let follower = c.follower_of(leader, &[]);
    let rt = load::runtime();
    let r = rt.block_on(async {
        let client = load::connect(&c.addrs[&follower], "follower").await;
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
    let producers = c.producing(TOPIC, PRODUCERS, WAIT);
    let mut failover_ms = Vec::new();
    let mut probes = BTreeSet::new();
    for round in 0..rounds {
        let (leader, term) = c.leader();
        // Load on this leader for a while.
        std::thread::sleep(Duration::from_millis(500));
        let logged: BTreeMap<u64, usize> = c
            .nodes
            .iter()
            .map(|(id, p)| (*id, p.stderr().len()))
            .collect();
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
        if round == 0 {
            // The dead leader does not pass for a follower in `cluster status`.
            let st = c.status();
            for n in st["nodes"].as_array().expect("nodes") {
                let dead = n["id"] == leader;
                assert_eq!(n["reachable"], !dead, "{st}");
                assert_eq!(n["error"].is_string(), dead, "{st}");
            }
        }
        probes.insert(format!("{key}-0"));
        failover_ms.push(took.as_millis());
        eprintln!(
            "round {round}: killed leader {leader} (term {term}), writes resumed after {took:?}"
        );
        // Terms the election took: 1 when the first candidate won, one more per round of
        // split votes (or of a candidate refused for a shorter log).
        let survivors: Vec<u64> = c.addrs.keys().copied().filter(|i| *i != leader).collect();
        let (new, new_term) = c.leader_among(&survivors);
        eprintln!(
            "round {round}: node {new} leads in term {new_term}, elected in {} term(s)",
            new_term.saturating_sub(term)
        );
        if new_term > term + 1 {
            for id in &survivors {
                let err = c.nodes[id].stderr();
                for l in err[logged[id]..]
                    .lines()
                    .filter(|l| l.contains("vote") || l.contains("stand") || l.contains("elect"))
                {
                    eprintln!("  node {id}: {l}");
                }
            }
        }
        c.restart(leader);
    }
    let mut acked = probes.clone();
    for mut p in producers {
        assert!(p.is_running(), "{} stopped:\n{}", p.name, p.stderr());
        p.kill();
        acked.extend(acked_keys(&p));
    }
    let rt = load::runtime();
    let addrs = c.addrs.clone();
    for (id, addr) in &addrs {
        let got = c.stored_holding(&rt, addr, TOPIC, &acked, WAIT);
        let missing: Vec<&String> = acked.iter().filter(|k| !got.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "node {id} lacks acknowledged sends {missing:?}"
        );
        let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "node {id} stores sends more than once: {twice:?}"
        );
    }
    let (median, max) = median_max(&mut failover_ms);
    println!(
        "failover: {rounds} leader kills, {} acknowledged sends, writes resumed after median \
         {median} ms, max {max} ms",
        acked.len()
    );
}

/// Halves of two producer groups to `TOPIC`, each with a check immunity of `immunity`:
/// `count` keys `c-<i>` of group `commits` and as many `r-<i>` of group `rollbacks`, sent
/// by a client given every node (it follows the leader). Their transaction ids by key.
fn pending_halves(
    rt: &tokio::runtime::Runtime,
    c: &ClusterProcs,
    count: usize,
    immunity: Duration,
) -> BTreeMap<String, u64> {
    rt.block_on(async {
        let client = load::connect(&c.addr_list(), "halves").await;
        let opts = halfmq::HalfOptions {
            check_immunity: Some(immunity),
        };
        let mut txns = BTreeMap::new();
        for i in 0..count {
            for (prefix, group) in [("c", "commits"), ("r", "rollbacks")] {
                let key = format!("{prefix}-{i}");
                let msg = halfmq::Message::new(format!("half {key}")).with_key(&key);
                let txn = client
                    .send_half(TOPIC, &msg, group, opts)
                    .await
                    .unwrap_or_else(|e| panic!("half {key}: {e}"));
                txns.insert(key, txn.0);
            }
        }
        txns
    })
}

/// `halfmq txn checker --group G --answer A --addr <every node>`, once it says it answers.
fn checker(c: &ClusterProcs, group: &str, answer: &str) -> Proc {
    let args = [
        "txn",
        "checker",
        "--group",
        group,
        "--answer",
        answer,
        "--addr",
        &c.addr_list(),
    ];
    let p = Proc::spawn(&format!("checker {group}"), halfmq_cmd(&args));
    assert!(
        p.wait_line(|l| l.starts_with("answering check-backs"), WAIT)
            .is_some(),
        "checker {group} did not register:\n{}",
        p.stderr()
    );
    p
}

/// How many times `p` (a `txn checker`) was asked about each key.
fn asked(p: &Proc) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for l in p.stderr().lines() {
        if let Some(rest) = l.split("(key ").nth(1) {
            let key = rest.split(')').next().unwrap_or_default().to_owned();
            *n.entry(key).or_insert(0) += 1;
        }
    }
    n
}

/// The unfinished transactions of the node at `addr` (its own broker: one address).
fn unfinished(addr: &str) -> Vec<Value> {
    common::run(&["txn", "list", "--json", "--addr", addr])
        .ok()
        .json_lines()
}

#[test]
fn pending_halves_are_checked_back_by_the_new_leader_exactly_once() {
    // Checked often once due, and never given up on within the test.
    let mut c = ClusterProcs::start_with(&[
        "--txn-check-interval-ms",
        "100",
        "--txn-check-backoff-max-ms",
        "200",
        "--txn-check-max",
        "1000",
    ]);
    let rt = load::runtime();
    let (leader, term) = c.leader();
    // Immune long enough that the leader about to be killed checks none of them: every
    // check is the new leader's.
    let immunity = Duration::from_secs(8);
    let sent = Instant::now();
    let txns = pending_halves(&rt, &c, 10, immunity);
    let commits = checker(&c, "commits", "commit");
    let rollbacks = checker(&c, "rollbacks", "rollback");
    // Every node holds them pending (the halves went through the log).
    for addr in c.addrs.values() {
        wait_until_unfinished(addr, txns.len());
    }
    c.kill(leader);
    let before_due = sent.elapsed();
    eprintln!(
        "killed leader {leader} (term {term}) with {} halves pending, {before_due:?} after the \
         first was sent",
        txns.len()
    );
    assert!(
        before_due < immunity,
        "the set-up took longer than the halves' immunity: the old leader may have checked some"
    );
    let (new_leader, new_term) = c.leader();
    assert_ne!(new_leader, leader);
    let survivors: Vec<String> = c
        .addrs
        .iter()
        .filter(|(id, _)| **id != leader)
        .map(|(_, a)| a.clone())
        .collect();
    for addr in &survivors {
        wait_until_unfinished(addr, 0);
    }
    eprintln!("new leader {new_leader} (term {new_term}) resolved every half");
    c.restart(leader);
    let committed: BTreeSet<String> = txns
        .keys()
        .filter(|k| k.starts_with("c-"))
        .cloned()
        .collect();
    for (id, addr) in &c.addrs {
        wait_until_unfinished(addr, 0);
        let got = c.stored_holding(&rt, addr, TOPIC, &committed, WAIT);
        for key in txns.keys() {
            let want = usize::from(key.starts_with("c-"));
            assert_eq!(
                got.get(key).copied().unwrap_or(0),
                want,
                "node {id}: {key} stored {:?} times, want {want} (committed once, rolled \
                 back never)",
                got.get(key)
            );
        }
    }
    let mut commits = commits;
    let mut rollbacks = rollbacks;
    for p in [&mut commits, &mut rollbacks] {
        assert!(p.is_running(), "{} stopped:\n{}", p.name, p.stderr());
        p.kill();
    }
    // Each half was asked once, by the new leader (the old one died before any was due),
    // and of its own group's checker.
    let (c_asked, r_asked) = (asked(&commits), asked(&rollbacks));
    for key in txns.keys() {
        let (mine, other) = if key.starts_with("c-") {
            (&c_asked, &r_asked)
        } else {
            (&r_asked, &c_asked)
        };
        assert_eq!(
            mine.get(key),
            Some(&1),
            "{key} asked {:?} times",
            mine.get(key)
        );
        assert_eq!(
            other.get(key),
            None,
            "{key} asked of the other group's checker"
        );
    }
}

/// Wait until the node at `addr` lists `n` unfinished transactions.
fn wait_until_unfinished(addr: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = unfinished(addr);
        if got.len() == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} lists {} unfinished transactions, want {n}: {got:?}",
            got.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Group settings go through the log: set through a client that follows the leader, every
/// node has them (the FIFO override too), also a new leader after the old one is killed
/// and the old one once restarted; a follower's broker is never changed alone.
#[test]
fn group_settings_are_the_same_on_every_node_and_survive_the_leader() {
    let mut c = ClusterProcs::start();
    let rt = load::runtime();
    let settings = halfmq::GroupSettings {
        visibility_timeout_ms: Some(4_321),
        max_retries: Some(7),
        retry_backoff_ms: Some(vec![10, 20, 40]),
        fifo: Some(true),
    };
    let set = rt.block_on(async {
        let client = load::connect(&c.addr_list(), "settings").await;
        client.set_group_settings("billing", &settings).await
    });
    let delivery = set.expect("settings set through the leader");
    assert_eq!(delivery.max_retries, 7);
    let on = |addr: &str| {
        rt.block_on(async {
            let client = load::connect(addr, "read-settings").await;
            client.group_settings("billing").await.expect("settings")
        })
    };
    let want = |addr: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let (d, s) = on(addr);
            if s == settings || Instant::now() > deadline {
                assert_eq!(s, settings, "{addr}");
                assert_eq!(d, delivery, "{addr}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for addr in c.addrs.values() {
        want(addr);
    }
    let (leader, _) = c.leader();
    c.kill(leader);
    let (new_leader, _) = c.leader();
    want(&c.addrs[&new_leader]);
    c.restart(leader);
    want(&c.addrs[&leader]);
}

/// Delayed messages go through the log and are fired by the leader: sent through a
/// leader-following client to fall due 3 s later, the leader is killed at once; the new
/// leader fires them, and every node (the restarted old leader too) holds each exactly once.
#[test]
fn delayed_messages_fire_once_after_the_leader_dies() {
    let mut c = ClusterProcs::start();
    let rt = load::runtime();
    let keys: BTreeSet<String> = (0..10).map(|i| format!("d-{i}")).collect();
    let at = halfmq::clock::now_ms() + 3_000;
    rt.block_on(async {
        let client = load::connect(&c.addr_list(), "delayed").await;
        for k in &keys {
            let msg = halfmq::Message::new(format!("delayed {k}")).with_key(k);
            client
                .send_delayed(TOPIC, &msg, at)
                .await
                .unwrap_or_else(|e| panic!("delayed {k}: {e}"));
        }
    });
    let (leader, _) = c.leader();
    c.kill(leader);
    assert!(
        halfmq::clock::now_ms() < at,
        "the set-up took longer than the delay: the old leader may have fired some"
    );
    let (new_leader, _) = c.leader();
    assert_ne!(new_leader, leader);
    c.restart(leader);
    for (id, addr) in &c.addrs {
        let got = c.stored_holding(&rt, addr, TOPIC, &keys, WAIT);
        for k in &keys {
            assert_eq!(
                got.get(k),
                Some(&1),
                "node {id}: {k} delivered {:?} times",
                got.get(k)
            );
        }
    }
}
