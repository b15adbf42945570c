//! Three `halfmq broker --node-id/--peers` processes on loopback (each node's client port
//! and the port after it, its peers', are free when it is first started), or each in its
//! own network namespace ([`super::netns::Netns`], on port 10911); a node is killed with
//! SIGKILL and restarted on the same data directory and ports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::load;
use super::netns::Netns;
use super::{halfmq_cmd, run, Proc, BIN};

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
    /// Node id → the network namespace it runs in (none: the test's own).
    namespaces: BTreeMap<u64, String>,
    /// The cluster's shared secret (`--token`): required off loopback; clients and peers
    /// present it.
    token: Option<String>,
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
                namespaces: BTreeMap::new(),
                token: None,
                root: tempfile::tempdir().unwrap(),
                extra: extra.iter().map(|a| a.to_string()).collect(),
            };
            for id in 1..=3 {
                c.spawn(id, &[]);
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

    /// Three nodes, each in its namespace of `net`, started together; returns once a
    /// leader is known.
    pub fn start_in(net: &Netns) -> ClusterProcs {
        let mut c = ClusterProcs {
            addrs: (1..=3)
                .map(|id| (id, format!("{}:10911", net.ip(id))))
                .collect(),
            nodes: BTreeMap::new(),
            namespaces: (1..=3).map(|id| (id, net.ns(id))).collect(),
            extra: Vec::new(),
            token: Some(format!("t{:016x}", fastrand::u64(..))),
            root: tempfile::tempdir().unwrap(),
        };
        for id in 1..=3 {
            c.spawn(id, &[]);
        }
        for id in 1..=3 {
            if !c.listening(id) {
                let p = c.nodes.get_mut(&id).unwrap();
                p.kill();
                panic!("node {id} did not start:\n{}", p.stderr());
            }
        }
        c.leader();
        c
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// `--addr` for every node.
    pub fn addr_list(&self) -> String {
        self.addrs.values().cloned().collect::<Vec<_>>().join(",")
    }

    fn spawn(&mut self, id: u64, extra: &[&str]) {
        let peers = self
            .addrs
            .iter()
            .map(|(i, a)| format!("{i}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        let dir = self.dir(id).display().to_string();
        let node_id = id.to_string();
        let args = [
            "broker",
            "--node-id",
            &node_id,
            "--peers",
            &peers,
            "--listen",
            &self.addrs[&id],
            "--data-dir",
            &dir,
        ];
        let mut args = self.with_token(&args);
        args.extend(extra);
        args.extend(self.extra.iter().map(String::as_str));
        let mut cmd = halfmq_cmd(&args);
        if let Some(ns) = self.namespaces.get(&id) {
            // `ip netns exec` enters the namespace and then runs the broker in its own place
            // (same process), so killing the child kills the broker.
            let mut inner = std::process::Command::new("ip");
            inner.args(["netns", "exec", ns, BIN]).args(&args);
            for (k, _) in cmd.get_envs() {
                inner.env_remove(k);
            }
            cmd = inner;
        }
        self.nodes
            .insert(id, Proc::spawn(&format!("node {id}"), cmd));
    }

    fn listening(&self, id: u64) -> bool {
        self.nodes[&id]
            .wait_line(|l| l.contains("listening on"), START)
            .is_some()
    }

    /// Restart node `id` (killed before) on its directory and ports.
    pub fn restart(&mut self, id: u64) {
        self.restart_with(id, &[]);
    }

    /// Start node `id` on its directory and ports with `extra` arguments.
    fn restart_with(&mut self, id: u64, extra: &[&str]) {
        self.spawn(id, extra);
        if !self.listening(id) {
            let p = self.nodes.get_mut(&id).unwrap();
            p.kill();
            panic!("node {id} did not start:\n{}", p.stderr());
        }
    }

    /// Start node `id` on a new, empty directory and free loopback ports with `--join
    /// true`: it waits to be added (`halfmq cluster add-node`). Its client address.
    pub fn start_joining(&mut self, id: u64) -> String {
        let addr = format!("127.0.0.1:{}", free_port_pair());
        self.addrs.insert(id, addr.clone());
        self.restart_with(id, &["--join", "true"]);
        addr
    }

    /// Restart member `id` (killed before) on an emptied directory, with `--join true`
    /// (an empty node that is already a member waits for the leader, never forms a
    /// cluster of its own): a replaced disk.
    pub fn restart_wiped(&mut self, id: u64) {
        std::fs::remove_dir_all(self.dir(id)).expect("wipe the node's directory");
        self.restart_with(id, &["--join", "true"]);
    }

    /// Until node `id` holds the leader's log up to where it was when this started, by its
    /// own account and by the leader's (or `id` leads itself). Not by the leader's alone:
    /// right after a follower is restarted on an empty disk the leader still counts what
    /// it had matched before.
    pub fn wait_caught_up(&self, id: u64, wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut target = None;
        let index_of = |st: &Value, n: u64, k: &str| {
            st["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|x| x["id"] == n))
                .and_then(|x| x[k].as_u64())
        };
        loop {
            let (leader, _) = self.leader();
            if leader == id {
                return;
            }
            let st = self.status_via(&self.addrs[&leader]);
            let target =
                *target.get_or_insert(index_of(&st, leader, "last_log_index").unwrap_or(u64::MAX));
            // The node's own view; a node that has not yet been sent the membership lists
            // no members (which `status_via` would refuse).
            let own =
                run(&self.with_token(&["cluster", "status", "--addr", &self.addrs[&id], "--json"]));
            let own_index = own
                .json_lines()
                .first()
                .and_then(|v| index_of(v, id, "last_log_index"));
            let matched = index_of(&st, id, "matched");
            if matched.is_some_and(|m| m >= target) && own_index.is_some_and(|m| m >= target) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not catch up to {target}: its own last index {own_index:?}; \
                 the leader's view: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `halfmq cluster ARGS --addr <the nodes in ids>`, which must succeed: its output.
    pub fn cluster_cmd(&self, args: &[&str], ids: &[u64]) -> String {
        let addrs: Vec<&str> = ids.iter().map(|id| self.addrs[id].as_str()).collect();
        let addrs = addrs.join(",");
        let mut all = vec!["cluster"];
        all.extend(args);
        all.extend(["--addr", addrs.as_str()]);
        run(&self.with_token(&all)).ok().stdout
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        let mut p = self.nodes.remove(&id).expect("a running node");
        p.kill();
    }

    /// Stop node `id` with SIGTERM: it must exit 0 (its broker closed, everything flushed).
    pub fn stop(&mut self, id: u64) {
        let mut p = self.nodes.remove(&id).expect("a running node");
        p.sigterm();
        let st = p.wait_exit(START);
        assert!(st.success(), "node {id} exited {st}:\n{}", p.stderr());
    }

    /// Node `id`'s broker log (`state/broker.<n>/log`), byte for byte: each segment's bytes
    /// up to its last non-zero one (the rest is preallocated), in order. Equal on two
    /// stopped nodes that applied the same entries: every node writes the same records at
    /// the same offsets.
    pub fn broker_log_bytes(&self, id: u64) -> Vec<Vec<u8>> {
        let state = self.dir(id).join("state");
        let broker = std::fs::read_dir(&state)
            .expect("the state directory")
            .map(|e| e.expect("an entry").path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("broker."))
            })
            .expect("a broker directory");
        super::segments::log_segments(&broker.join("log"))
    }

    /// `halfmq cluster status --json` over every node.
    pub fn status(&self) -> Value {
        self.status_via(&self.addr_list())
    }

    /// `halfmq cluster status --json` from the first of `addrs` that answers: the cluster as
    /// that node sees it.
    pub fn status_via(&self, addrs: &str) -> Value {
        let run = run(&self.with_token(&["cluster", "status", "--addr", addrs, "--json"])).ok();
        let mut lines = run.json_lines();
        assert_eq!(lines.len(), 1, "status prints one line: {}", run.stdout);
        let st = lines.remove(0);
        // The contract other tools rely on.
        assert!(st["leader"].is_u64() || st["leader"].is_null(), "{st}");
        assert!(st["term"].is_u64(), "{st}");
        let nodes = st["nodes"].as_array().expect("nodes");
        // The members: every node started, less those removed since.
        assert!(!nodes.is_empty() && nodes.len() <= self.addrs.len(), "{st}");
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
        self.leader_among(&self.addrs.keys().copied().collect::<Vec<_>>())
    }

    /// The leader as nodes `ids` see it, once it is one of them and says so itself, and
    /// its term.
    pub fn leader_among(&self, ids: &[u64]) -> (u64, u64) {
        let addrs: Vec<&str> = ids.iter().map(|id| self.addrs[id].as_str()).collect();
        let deadline = Instant::now() + START;
        loop {
            let st = self.status_via(&addrs.join(","));
            let own = st["leader"].as_u64().filter(|l| {
                st["nodes"]
                    .as_array()
                    .is_some_and(|ns| ns.iter().any(|n| n["id"] == *l && n["role"] == "leader"))
            });
            if let (Some(l), Some(term)) = (own, st["term"].as_u64()) {
                if self.nodes.contains_key(&l) && ids.contains(&l) {
                    return (l, term);
                }
            }
            assert!(Instant::now() < deadline, "no leader: {st}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The keys of the sends `p` printed as acknowledged (a line cut short by a kill is not
/// one).
pub fn acked_keys(p: &Proc) -> Vec<String> {
    p.stdout_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["key"].as_str().expect("a key").to_owned())
        .collect()
}

impl ClusterProcs {
    /// `args` with `--token` when the cluster has one.
    fn with_token<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        if let Some(t) = &self.token {
            all.extend(["--token", t.as_str()]);
        }
        all
    }

    /// A client of the node at `addr` (with the cluster's token).
    pub async fn connect(&self, addr: &str, name: &str) -> halfmq_client::Client {
        let config = halfmq_client::ClientConfig::new(addr)
            .with_name(name.to_owned())
            .with_token(self.token.clone())
            .with_request_timeout(Duration::from_secs(30));
        halfmq_client::Client::connect(config)
            .await
            .unwrap_or_else(|e| panic!("connect {name} to {addr}: {e}"))
    }

    /// `halfmq produce --addr ADDRS --json` of `count` messages to `topic`, keys
    /// `prefix-<i>`.
    pub fn produce(&self, addrs: &str, topic: &str, prefix: &str, count: u64) -> Proc {
        let count = count.to_string();
        let args = [
            "produce",
            "--addr",
            addrs,
            "--topic",
            topic,
            "--json",
            "--key-prefix",
            prefix,
            "--count",
            &count,
            "--size",
            "200",
        ];
        Proc::spawn(
            &format!("producer {prefix}"),
            halfmq_cmd(&self.with_token(&args)),
        )
    }

    /// `n` producers (`p0`, `p1`, ...) of a million messages each to `topic` through every
    /// node, each once it has had a send acknowledged.
    pub fn producing(&self, topic: &str, n: usize, wait: Duration) -> Vec<Proc> {
        let producers: Vec<Proc> = (0..n)
            .map(|p| self.produce(&self.addr_list(), topic, &format!("p{p}"), 1_000_000))
            .collect();
        for p in &producers {
            assert!(
                p.wait_line(|l| l.starts_with('{'), wait).is_some(),
                "{} acknowledged nothing:\n{}",
                p.name,
                p.stderr()
            );
        }
        producers
    }

    /// Every message of `topic` on the node at `addr`, by key: how many times each is
    /// stored (none while the node does not know the topic yet). Read with `Browse`, which
    /// any node answers from what it has applied (polls are the leader's).
    pub fn stored(
        &self,
        rt: &tokio::runtime::Runtime,
        addr: &str,
        topic: &str,
    ) -> BTreeMap<String, usize> {
        rt.block_on(async {
            let client = self.connect(addr, "verify").await;
            let mut seen = BTreeMap::new();
            let topics = client.topics().await.expect("list topics");
            // A node restarted last may not have applied the topic's creation yet.
            let Some(t) = topics.iter().find(|t| t.name == topic) else {
                return seen;
            };
            for queue in 0..t.queues {
                let mut from = 0;
                loop {
                    let got = match client.browse(topic, queue, from, 500).await {
                        Ok(got) => got,
                        Err(e) => panic!("browse {addr}: {e}"),
                    };
                    let Some(last) = got.last() else { break };
                    from = last.offset + 1;
                    for d in got {
                        *seen.entry(d.key).or_insert(0) += 1;
                    }
                }
            }
            seen
        })
    }

    /// [`ClusterProcs::stored`] on the node at `addr` once it holds every key of `want`, or
    /// after `wait`: a node applies what the leader acknowledged a little later.
    pub fn stored_holding(
        &self,
        rt: &tokio::runtime::Runtime,
        addr: &str,
        topic: &str,
        want: &BTreeSet<String>,
        wait: Duration,
    ) -> BTreeMap<String, usize> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self.stored(rt, addr, topic);
            if want.iter().all(|k| got.contains_key(k)) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A member other than `leader` (and than `not`).
    pub fn follower_of(&self, leader: u64, not: &[u64]) -> u64 {
        *self
            .addrs
            .keys()
            .find(|id| **id != leader && !not.contains(id))
            .expect("a follower")
    }

    /// Every key of `acked` is stored exactly once on every running node of `topic` (each
    /// node is given up to `wait` to catch up), and none of `absent` is on any.
    pub fn assert_stored_once(
        &self,
        topic: &str,
        acked: &BTreeSet<String>,
        absent: &BTreeSet<String>,
        wait: Duration,
    ) {
        let rt = load::runtime();
        for (id, addr) in self
            .addrs
            .iter()
            .filter(|(id, _)| self.nodes.contains_key(id))
        {
            let got = self.stored_holding(&rt, addr, topic, acked, wait);
            let missing: Vec<&String> = acked.iter().filter(|k| !got.contains_key(*k)).collect();
            if !missing.is_empty() {
                // What it takes to explain a failure seen once in CI: who leads, what each
                // node has matched, and what the node itself logged.
                let status = self.status_via(&self.addr_list());
                let log = self.nodes[id].stderr();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                panic!(
                    "node {id} lacks {} of {} acknowledged sends (it has {} keys): {:?}\n\
                     status: {status}\nnode {id}'s last log lines:\n{}",
                    missing.len(),
                    acked.len(),
                    got.len(),
                    missing.iter().take(20).collect::<Vec<_>>(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
            assert!(
                twice.is_empty(),
                "node {id} stores sends more than once: {twice:?}"
            );
            let there: Vec<&String> = absent.iter().filter(|k| got.contains_key(*k)).collect();
            assert!(there.is_empty(), "node {id} stores {there:?}");
        }
    }
}

/// Damage the file at `path`, a sequence of raft frames (`len u32 | crc u32 | body`: a raft
/// log segment, a snapshot journal): 16 bytes in the middle of the body of frame `nth`
/// (the middle frame when `None`), inverted. Its damaged bytes.
pub fn damage_frame(path: &std::path::Path, nth: Option<usize>) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("the file to damage");
    let mut frames = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= bytes.len() {
        let body = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if body == 0 || pos + 8 + body > bytes.len() {
            break;
        }
        frames.push((pos, body));
        pos += 8 + body;
    }
    let (at, body) = frames[nth.unwrap_or(frames.len() / 2)];
    assert!(body >= 16, "a frame of {body} bytes in {}", path.display());
    let from = at + 8 + body / 2 - 8;
    for b in &mut bytes[from..from + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(path, &bytes).expect("write the damage");
    bytes
}
