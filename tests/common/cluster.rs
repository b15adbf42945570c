//! Three `halfmq broker --node-id/--peers` processes on loopback: each node's client port
//! and the port after it (its peers') are free when it is first started; a node is killed
//! with SIGKILL and restarted on the same data directory and ports.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{halfmq_cmd, run, Proc};

/// How long a node may take to start listening.
const START: Duration = Duration::from_secs(60);

/// A client port whose next port is free too, below the range the kernel hands out for
/// outgoing connections (a node killed and restarted binds its ports again: one in that
/// range could meanwhile be the local end of some connection). Both may be taken again
/// before the broker binds them: [`ClusterProcs::start`] starts again on other ports then.
fn free_port_pair() -> u16 {
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    for _ in 0..1000 {
        let port = fastrand::u16(10_000..below.max(10_002) - 1);
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 1) {
            return port;
        }
    }
    panic!("no two free consecutive ports on 127.0.0.1");
}

pub struct ClusterProcs {
    /// Node id → its client address.
    pub addrs: BTreeMap<u64, String>,
    /// The running nodes.
    pub nodes: BTreeMap<u64, Proc>,
    root: tempfile::TempDir,
    /// Further `halfmq broker` arguments of every node.
    extra: Vec<String>,
}

impl ClusterProcs {
    /// Three nodes on new temporary directories, started together; returns once a leader
    /// is known.
    pub fn start() -> ClusterProcs {
        ClusterProcs::start_with(&[])
    }

    /// [`ClusterProcs::start`], every node with the further broker arguments `extra` (also
    /// when restarted).
    pub fn start_with(extra: &[&str]) -> ClusterProcs {
        for _attempt in 0..5 {
            let addrs: BTreeMap<u64, String> = (1..=3)
                .map(|id| (id, format!("127.0.0.1:{}", free_port_pair())))
                .collect();
            let mut c = ClusterProcs {
                addrs,
                nodes: BTreeMap::new(),
                root: tempfile::tempdir().unwrap(),
                extra: extra.iter().map(|a| a.to_string()).collect(),
            };
            for id in 1..=3 {
                c.spawn(id);
            }
            if (1..=3).all(|id| c.listening(id)) {
                c.leader();
                return c;
            }
            let errs: Vec<String> = c
                .nodes
                .values_mut()
                .map(|p| {
                    p.kill();
                    p.stderr()
                })
                .collect();
            if !errs.iter().any(|e| e.contains("in use")) {
                panic!("a node did not start:\n{}", errs.join("\n---\n"));
            }
        }
        panic!("no free ports for three nodes after 5 attempts");
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// `--addr` for every node.
    pub fn addr_list(&self) -> String {
        self.addrs.values().cloned().collect::<Vec<_>>().join(",")
    }

    fn spawn(&mut self, id: u64) {
        let peers = self
            .addrs
            .iter()
            .map(|(i, a)| format!("{i}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        let dir = self.dir(id).display().to_string();
        let mut args: Vec<String> = [
            "broker",
            "--node-id",
            &id.to_string(),
            "--peers",
            &peers,
            "--listen",
            &self.addrs[&id],
            "--data-dir",
            &dir,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        self.nodes
            .insert(id, Proc::spawn(&format!("node {id}"), halfmq_cmd(&args)));
    }

    fn listening(&self, id: u64) -> bool {
        self.nodes[&id]
            .wait_line(|l| l.contains("listening on"), START)
            .is_some()
    }

    /// Restart node `id` (killed before) on its directory and ports.
    pub fn restart(&mut self, id: u64) {
        self.spawn(id);
        if !self.listening(id) {
            let p = self.nodes.get_mut(&id).unwrap();
            p.kill();
            panic!("node {id} did not restart:\n{}", p.stderr());
        }
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        let mut p = self.nodes.remove(&id).expect("a running node");
        p.kill();
    }

    /// `halfmq cluster status --json` over every node.
    pub fn status(&self) -> Value {
        let run = run(&["cluster", "status", "--addr", &self.addr_list(), "--json"]).ok();
        let mut lines = run.json_lines();
        assert_eq!(lines.len(), 1, "status prints one line: {}", run.stdout);
        let st = lines.remove(0);
        // The contract other tools rely on.
        assert!(st["leader"].is_u64() || st["leader"].is_null(), "{st}");
        assert!(st["term"].is_u64(), "{st}");
        let nodes = st["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), self.addrs.len(), "{st}");
        for n in nodes {
            let id = n["id"].as_u64().expect("an id");
            assert_eq!(n["addr"].as_str(), Some(self.addrs[&id].as_str()), "{st}");
            let role = n["role"].as_str().unwrap_or_default();
            assert!(
                ["leader", "follower", "candidate", "learner"].contains(&role),
                "{st}"
            );
            for k in ["last_log_index", "matched"] {
                assert!(n[k].is_u64() || n[k].is_null(), "{st}");
            }
        }
        st
    }

    /// The leader once one is known and says so itself, and its term.
    pub fn leader(&self) -> (u64, u64) {
        let deadline = Instant::now() + START;
        loop {
            let st = self.status();
            let own = st["leader"].as_u64().filter(|l| {
                st["nodes"]
                    .as_array()
                    .is_some_and(|ns| ns.iter().any(|n| n["id"] == *l && n["role"] == "leader"))
            });
            if let (Some(l), Some(term)) = (own, st["term"].as_u64()) {
                if self.nodes.contains_key(&l) {
                    return (l, term);
                }
            }
            assert!(Instant::now() < deadline, "no leader: {st}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
