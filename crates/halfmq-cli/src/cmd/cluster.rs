//! `halfmq cluster`: a replicated cluster's state, and `halfmq broker --peers`, a broker
//! that is one node of one.

use std::sync::Arc;

use clap::{Args, Subcommand};
use halfmq::{Error, Result};
use halfmq_cli::server::{Server, ServerConfig};
use halfmq_cli::settings::{Replication, Resolved, PEER_PORT_OFFSET};
use halfmq_client::protocol::{Request, Response};
use halfmq_raft::network::tcp::{offset_port, PeerServer, TcpFactory};
use halfmq_raft::{ClusterStatus, ReplicaConfig, ReplicaNode, Role};

use super::{print_json, println_flush, ConnArgs};

/// `halfmq cluster ...`.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// The members, their roles and how far each has the log, as the leader sees it (or,
    /// while there is none, a node that answers), and whether each address asked answered.
    /// With --json one line: {"leader": 1, "term": 7, "nodes": [{"id": 1, "addr": "...",
    /// "role": "leader", "last_log_index": 1234, "matched": 1234, "reachable": true}, ...]};
    /// "leader" is null while there is none; "reachable" is null for a member whose address
    /// was not in --addr, and false with an "error" for one that did not answer.
    Status(StatusCmd),
    /// Add a node to the members: start it first with `halfmq broker --node-id ID --peers
    /// ... --join` on an empty data directory; the leader sends it the log (or a
    /// snapshot), then makes it a voter. Returns once the change is committed.
    AddNode(AddNodeCmd),
    /// Remove a node from the members (it stops receiving the log; stop its process
    /// afterwards). Returns once the change is committed.
    RemoveNode(RemoveNodeCmd),
}

/// `halfmq cluster add-node`.
#[derive(Args)]
pub struct AddNodeCmd {
    #[command(flatten)]
    conn: ConnArgs,
    /// The new node's id (its --node-id).
    #[arg(long)]
    id: u64,
    /// The new node's client address (its --listen); peers use the port after it.
    #[arg(long)]
    node_addr: String,
}

/// `halfmq cluster remove-node`.
#[derive(Args)]
pub struct RemoveNodeCmd {
    #[command(flatten)]
    conn: ConnArgs,
    /// The node's id.
    #[arg(long)]
    id: u64,
}

/// `halfmq cluster status`.
#[derive(Args)]
pub struct StatusCmd {
    #[command(flatten)]
    conn: ConnArgs,
    /// One JSON line.
    #[arg(long)]
    json: bool,
}

/// Run a `cluster` command.
pub async fn run(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Status(c) => status(c).await,
        ClusterCommand::AddNode(c) => {
            let req = Request::ClusterAddNode {
                id: c.id,
                addr: c.node_addr.clone(),
            };
            change(
                &c.conn,
                req,
                &format!("node {} at {} added", c.id, c.node_addr),
            )
            .await
        }
        ClusterCommand::RemoveNode(c) => {
            let req = Request::ClusterRemoveNode { id: c.id };
            change(&c.conn, req, &format!("node {} removed", c.id)).await
        }
    }
}

/// Make a membership change on the leader (the client follows it among `--addr`'s
/// nodes); print `done` once it is committed.
async fn change(conn: &ConnArgs, req: Request, done: &str) -> Result<()> {
    let client = conn.connect().await?;
    match client.call(req).await? {
        Response::Ok => {
            println_flush(done);
            Ok(())
        }
        other => Err(Error::Decode {
            what: "membership change",
            reason: format!("answered {other:?}"),
        }),
    }
}

/// Ask every address; print the answer of the node that leads (in the highest term), or,
/// while none does, the answer in the highest term. Each member whose address was asked
/// also shows whether it answered (`reachable`, and `error` when it did not), so that a dead
/// node does not pass for a follower; members not asked show `reachable: null`.
async fn status(cmd: StatusCmd) -> Result<()> {
    let mut best: Option<(bool, u64, ClusterStatus)> = None;
    let mut last_err = None;
    let mut asked: Vec<(String, Option<String>)> = Vec::new();
    for addr in cmd.conn.addrs() {
        let st = match ask_status(&cmd.conn, &addr).await {
            Ok(st) => st,
            Err(e) => {
                asked.push((addr, Some(e.to_string())));
                last_err = Some(e);
                continue;
            }
        };
        asked.push((addr.clone(), None));
        let leads = st
            .nodes
            .iter()
            .any(|n| n.addr == addr && n.role == Role::Leader && st.leader == Some(n.id));
        let rank = (leads, st.term);
        if best.as_ref().is_none_or(|(l, t, _)| rank > (*l, *t)) {
            best = Some((leads, st.term, st));
        }
    }
    let Some((_, _, st)) = best else {
        return Err(last_err.unwrap_or_else(|| Error::Config {
            setting: "addr",
            reason: "no address given".into(),
        }));
    };
    // Whether the member at `addr` answered: `None` when its address was not asked.
    let answered = |addr: &str| {
        asked
            .iter()
            .find(|(a, _)| a == addr)
            .map(|(_, err)| err.as_deref())
    };
    if cmd.json {
        let nodes = st
            .nodes
            .iter()
            .map(|node| {
                let answer = answered(&node.addr);
                NodeLine {
                    node,
                    reachable: answer.map(|e| e.is_none()),
                    error: answer.flatten(),
                }
            })
            .collect();
        print_json(&StatusLine {
            leader: st.leader,
            term: st.term,
            nodes,
        });
        return Ok(());
    }
    match st.leader {
        Some(l) => println_flush(&format!("leader: node {l}, term {}", st.term)),
        None => println_flush(&format!("leader: none (term {})", st.term)),
    }
    println_flush(&format!(
        "{:>4}  {:<22} {:<10} {:>15} {:>15}  {}",
        "id", "addr", "role", "last_log_index", "matched", "reachable"
    ));
    let shown = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for n in &st.nodes {
        let role = serde_json::to_value(n.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let reachable = match answered(&n.addr) {
            Some(None) => "yes".to_owned(),
            Some(Some(err)) => format!("NO: {err}"),
            None => "-".to_owned(),
        };
        println_flush(&format!(
            "{:>4}  {:<22} {:<10} {:>15} {:>15}  {}",
            n.id,
            n.addr,
            role,
            shown(n.last_log_index),
            shown(n.matched),
            reachable
        ));
    }
    Ok(())
}

/// `cluster status --json`'s line: the leader's [`ClusterStatus`], each member with whether
/// it answered.
#[derive(serde::Serialize)]
struct StatusLine<'a> {
    leader: Option<u64>,
    term: u64,
    nodes: Vec<NodeLine<'a>>,
}

/// A member of [`StatusLine`].
#[derive(serde::Serialize)]
struct NodeLine<'a> {
    #[serde(flatten)]
    node: &'a halfmq_raft::NodeStatus,
    /// Whether its address answered; null when it was not asked.
    reachable: Option<bool>,
    /// What asking it came to, when it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// The cluster as the node at `addr` sees it.
async fn ask_status(conn: &ConnArgs, addr: &str) -> Result<ClusterStatus> {
    let client = conn.connect_to(addr).await?;
    match client.call(Request::ClusterStatus).await? {
        Response::ClusterStatus(json) => serde_json::from_str(&json).map_err(|e| Error::Decode {
            what: "cluster status",
            reason: e.to_string(),
        }),
        other => Err(Error::Decode {
            what: "cluster status",
            reason: format!("answered {other:?}"),
        }),
    }
}

/// A replicated broker: its cluster node, the peers' listener and the clients' server.
pub struct Node {
    /// The node.
    pub node: Arc<ReplicaNode>,
    peers: PeerServer,
    /// The clients' server.
    pub server: Server,
}

impl Node {
    /// Start node `cluster.node_id` on the data directory of `resolved`: its raft log and
    /// broker, the peer listener on the port after the client port, the clients' server;
    /// form the cluster of `--peers` if this node's log is empty (every node of a new
    /// cluster does so with the same members, which openraft allows), unless it is to join
    /// an existing one (`--join`: a member adds it).
    pub async fn start(resolved: &Resolved, cluster: &Replication) -> Result<Node> {
        let server_config: ServerConfig = resolved.server.clone();
        let token = server_config.token.clone().unwrap_or_default();
        let id = cluster.node_id;
        let dir = resolved.broker.data_dir.clone();
        let mut config = ReplicaConfig::new(resolved.broker.clone());
        config.checker_grace = resolved.checker_grace;
        config.join = cluster.join;
        let factory = TcpFactory::new(id, token.clone()).with_port_offset(PEER_PORT_OFFSET);
        let node = ReplicaNode::start(id, &dir, config, factory)
            .await
            .map_err(replica)?;
        let node = Arc::new(node);
        let listen = server_config.listen.to_string();
        let peer_addr = offset_port(&listen, PEER_PORT_OFFSET).ok_or_else(|| Error::Config {
            setting: "listen",
            reason: format!("{listen}: no port above it for peers"),
        })?;
        let listener = tokio::net::TcpListener::bind(&peer_addr)
            .await
            .map_err(|e| Error::io(&peer_addr, "listen for peers", e))?;
        let peers =
            PeerServer::start_gated(listener, node.raft().clone(), node.peer_gate(), token)?;
        if !cluster.join {
            node.form(&cluster.peers).await.map_err(replica)?;
        }
        let server = Server::start_replicated(node.clone(), server_config).await?;
        Ok(Node {
            node,
            peers,
            server,
        })
    }

    /// The peers' address.
    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.peers.local_addr()
    }

    /// Stop serving clients, then peers, then the node.
    pub async fn shutdown(self) -> Result<()> {
        self.server.shutdown().await;
        drop(self.peers);
        self.node.shutdown().await.map_err(replica)
    }
}

/// A node's error as the command line reports it.
fn replica(e: halfmq_raft::ReplicaError) -> Error {
    match e {
        halfmq_raft::ReplicaError::Broker(e) => e,
        e => Error::Invalid {
            what: "raft",
            reason: e.to_string(),
        },
    }
}
