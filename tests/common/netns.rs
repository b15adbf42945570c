//! A private network of Linux network namespaces for the black-box cluster tests: a bridge
//! in the test's own namespace and one namespace per node, each joined to the bridge by a
//! veth pair, with an address on one /24 (the bridge has `.254`, so the test reaches every
//! node). A partition is a pair of blackhole routes inside the two nodes' namespaces:
//! [`Netns::cut`] drops everything between two nodes both ways, also on connections that
//! are already open, while the test still reaches both. Real kernel networking, no firewall
//! needed (`ip` from iproute2, and root). Everything is removed when dropped: the processes
//! still in the namespaces, the namespaces and the links.

use std::process::Command;

pub struct Netns {
    /// Unique per test process: names of the namespaces and links.
    tag: String,
    /// The third byte of the network's addresses, 10.77.<subnet>.0/24.
    subnet: u8,
    nodes: Vec<u64>,
}

/// Run `ip ARGS`; the reason when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A namespace for each of `nodes` on one bridge; the reason when this machine cannot
    /// make them (not root, no `ip`, no veth or bridge support in the kernel).
    pub fn new(nodes: &[u64]) -> Result<Netns, String> {
        let pid = std::process::id();
        let net = Netns {
            tag: format!("hq{pid}"),
            subnet: (pid % 250) as u8,
            nodes: nodes.to_vec(),
        };
        // Left by an earlier run of this process id that was killed before cleaning up.
        net.remove();
        ip(&["link", "add", &net.bridge(), "type", "bridge"])?;
        let own = format!("10.77.{}.254/24", net.subnet);
        ip(&["addr", "add", &own, "dev", &net.bridge()])?;
        ip(&["link", "set", &net.bridge(), "up"])?;
        for &id in nodes {
            let (ns, outer) = (net.ns(id), format!("{}-{id}o", net.tag));
            let inner = format!("{}-{id}i", net.tag);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &net.bridge()])?;
            ip(&["link", "set", &outer, "up"])?;
            let addr = format!("{}/24", net.ip(id));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.tag)
    }

    /// The namespace of node `id`.
    pub fn ns(&self, id: u64) -> String {
        format!("{}-n{id}", self.tag)
    }

    /// The address of node `id`.
    pub fn ip(&self, id: u64) -> String {
        format!("10.77.{}.{id}", self.subnet)
    }

    /// Cut nodes `a` and `b` apart, both ways.
    pub fn cut(&self, a: u64, b: u64) {
        for (from, to) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.ip(to));
            ip(&["-n", &self.ns(from), "route", "add", "blackhole", &dst])
                .unwrap_or_else(|e| panic!("cut {from} from {to}: {e}"));
        }
    }

    /// Undo [`Netns::cut`].
    pub fn heal(&self, a: u64, b: u64) {
        for (from, to) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.ip(to));
            ip(&["-n", &self.ns(from), "route", "del", "blackhole", &dst])
                .unwrap_or_else(|e| panic!("heal {from} and {to}: {e}"));
        }
    }

    /// Cut node `id` from every other node (the test still reaches it).
    pub fn isolate(&self, id: u64) {
        for &other in self.nodes.iter().filter(|o| **o != id) {
            self.cut(id, other);
        }
    }

    /// Undo [`Netns::isolate`].
    pub fn rejoin(&self, id: u64) {
        for &other in self.nodes.iter().filter(|o| **o != id) {
            self.heal(id, other);
        }
    }

    /// Kill what runs in the namespaces, delete them and the links (errors ignored: some
    /// may not exist).
    fn remove(&self) {
        for &id in &self.nodes {
            let pids = Command::new("ip")
                .args(["netns", "pids", &self.ns(id)])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            let _ = ip(&["netns", "del", &self.ns(id)]);
            let _ = ip(&["link", "del", &format!("{}-{id}o", self.tag)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}
