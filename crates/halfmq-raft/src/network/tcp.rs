//! Framed TCP between nodes: [`PeerServer`] answers a node's peers, [`TcpFactory`] reaches
//! them.
//!
//! A connection starts with [`PeerRequest::Hello`] carrying the cluster's token; the server
//! answers and closes unless the token matches (compared in constant time). Then each
//! request gets one answer, in order, every message one frame (`crate::frame`: length,
//! CRC-32, bincode; at most 16 MiB). Append requests whose frame would be larger are
//! refused locally as too large, and openraft sends fewer entries. A snapshot goes as
//! chunks of at most [`SNAPSHOT_CHUNK_BYTES`] into the receiver's snapshot file, then one
//! request that installs it.
//!
//! Any error on a connection drops it; the next request connects again. A peer that
//! cannot be reached is reported to openraft as unreachable, which backs off.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halfmq_types::error::{Error, Result};
use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory, Snapshot, Vote};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::frame;
use crate::gate::PeerGate;
use crate::network::SNAPSHOT_CHUNK_BYTES;
use crate::snapshot::{JournalSnapshot, Meta};
use crate::{NodeId, Raft, TypeConfig};

/// What a node asks a peer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum PeerRequest {
    /// The first frame of a connection.
    Hello {
        /// The cluster's shared token.
        token: String,
        /// The node connecting.
        from: NodeId,
    },
    /// `Raft::append_entries`.
    Append(AppendEntriesRequest<TypeConfig>),
    /// `Raft::vote`.
    Vote(VoteRequest<NodeId>),
    /// The next bytes of a snapshot.
    SnapshotChunk(Vec<u8>),
    /// Install the snapshot whose bytes were sent.
    SnapshotDone {
        /// The sender's vote.
        vote: Vote<NodeId>,
        /// The snapshot's meta.
        meta: Meta,
    },
}

/// A peer's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum PeerResponse {
    /// To `Hello`: `Err` with why the connection is refused.
    Hello(std::result::Result<(), String>),
    /// To `Append`.
    Append(std::result::Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To `Vote`.
    Vote(std::result::Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To `SnapshotChunk`: stored.
    Chunk,
    /// To `SnapshotDone`.
    Snapshot(std::result::Result<SnapshotResponse<NodeId>, Fatal<NodeId>>),
    /// The request could not be carried out (the text says why); the connection closes.
    Failed(String),
}

/// Largest first frame of a connection (the hello: a token and a node id).
const HELLO_BYTES_MAX: usize = 4096;

fn token_matches(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The server side: answers peers on one listener until stopped or dropped.
pub struct PeerServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl PeerServer {
    /// Serve `raft` to peers presenting `token` on `listener`, every vote, append and
    /// snapshot answered through `gate`, the node's own (`ReplicaNode::peer_gate`): a node
    /// repairing from its peers refuses votes ([`crate::repair`]), and the node's election
    /// loop learns there when it last heard a leader ([`crate::elect`]).
    pub fn start_gated(
        listener: TcpListener,
        raft: Raft,
        gate: Arc<PeerGate>,
        token: String,
    ) -> Result<PeerServer> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("peer listener", "local address", e))?;
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let raft = raft.clone();
                        let gate = gate.clone();
                        let token = token.clone();
                        let stopped = stopped.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve(stream, raft, gate, token, stopped).await {
                                tracing::debug!(error = %e, "peer connection closed");
                            }
                        });
                    }
                }
            }
        });
        Ok(PeerServer { addr, stop })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve(
    mut stream: TcpStream,
    raft: Raft,
    gate: Arc<PeerGate>,
    token: String,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    stream.set_nodelay(true).ok();
    // Nothing large is read from a peer before it shows the token.
    let hello: Option<PeerRequest> =
        frame::read_at_most(&mut stream, HELLO_BYTES_MAX, "peer hello").await?;
    match hello {
        Some(PeerRequest::Hello { token: t, .. }) if token_matches(&t, &token) => {
            frame::write(&mut stream, &PeerResponse::Hello(Ok(())), "peer response").await?;
        }
        _ => {
            let no = PeerResponse::Hello(Err("wrong cluster token".to_owned()));
            return frame::write(&mut stream, &no, "peer response").await;
        }
    }
    let mut receiving: Option<JournalSnapshot> = None;
    // Each request's body is read into this one buffer (a fresh one per request was new
    // memory, zeroed by the kernel as it was touched).
    let mut body = Vec::new();
    loop {
        if body.capacity() > frame::BUF_BYTES_KEEP {
            body = Vec::new();
        }
        let req: PeerRequest = tokio::select! {
            _ = stopped.changed() => return Ok(()),
            r = frame::read_with(&mut stream, &mut body, "peer request") => match r? {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        let resp = match req {
            PeerRequest::Hello { .. } => PeerResponse::Failed("hello twice".to_owned()),
            PeerRequest::Append(rpc) => PeerResponse::Append(gate.append(&raft, rpc).await),
            PeerRequest::Vote(rpc) => PeerResponse::Vote(gate.vote(&raft, rpc).await),
            PeerRequest::SnapshotChunk(bytes) => {
                if receiving.is_none() {
                    match raft.begin_receiving_snapshot().await {
                        Ok(s) => receiving = Some(*s),
                        Err(e) => {
                            let f = PeerResponse::Failed(e.to_string());
                            return frame::write(&mut stream, &f, "peer response").await;
                        }
                    }
                }
                match receiving.as_mut().map(|r| r.push_chunk(&bytes)) {
                    Some(Ok(())) => PeerResponse::Chunk,
                    Some(Err(e)) => PeerResponse::Failed(e.to_string()),
                    None => PeerResponse::Failed("no snapshot file".to_owned()),
                }
            }
            PeerRequest::SnapshotDone { vote, meta } => {
                let snapshot = match receiving.take() {
                    Some(s) => s,
                    // A snapshot of nothing: no chunk came.
                    None => match raft.begin_receiving_snapshot().await {
                        Ok(s) => *s,
                        Err(e) => {
                            PeerResponse::Failed(e.to_string())
                                .fail(&mut stream)
                                .await?
                        }
                    },
                };
                let s = Snapshot {
                    meta,
                    snapshot: Box::new(snapshot),
                };
                PeerResponse::Snapshot(gate.install_snapshot(&raft, vote, s).await)
            }
        };
        let failed = matches!(resp, PeerResponse::Failed(_));
        frame::write(&mut stream, &resp, "peer response").await?;
        if failed {
            return Ok(());
        }
    }
}

impl PeerResponse {
    /// Write this failure and end the connection.
    async fn fail<T>(self, stream: &mut TcpStream) -> Result<T> {
        frame::write(stream, &self, "peer response").await?;
        Err(Error::Invalid {
            what: "peer request",
            reason: format!("{self:?}"),
        })
    }
}

/// The client side as one node sees it: links to peers at the addresses in the
/// membership (`BasicNode::addr`), presenting the cluster's token.
pub struct TcpFactory {
    from: NodeId,
    token: String,
    port_offset: u16,
    failing: Failing,
}

impl TcpFactory {
    /// Links from node `from`, presenting `token`, to the addresses in the membership.
    pub fn new(from: NodeId, token: String) -> TcpFactory {
        TcpFactory {
            from,
            token,
            port_offset: 0,
            failing: Failing::default(),
        }
    }

    /// Links to the port `offset` above each member's address instead: the membership holds
    /// the brokers' client addresses, and each node's peers listen on the next port
    /// (`halfmq broker --peers`).
    pub fn with_port_offset(mut self, offset: u16) -> TcpFactory {
        self.port_offset = offset;
        self
    }
}

/// `addr` (`host:port`) with its port `offset` higher; `None` when it has no port or the
/// port would pass 65535.
pub fn offset_port(addr: &str, offset: u16) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?.checked_add(offset)?;
    Some(format!("{host}:{port}"))
}

/// One node's connection to a peer, made when first needed and again after an error.
pub struct TcpLink {
    from: NodeId,
    to: NodeId,
    addr: String,
    token: String,
    stream: Option<TcpStream>,
    /// Which peers are failing, shared with the node's other links (see [`TcpLink::note`]).
    failing: Failing,
    /// The buffer the last append was encoded into, kept for the next one (see
    /// `frame::encode_into`), up to [`frame::BUF_BYTES_KEEP`].
    buf: Vec<u8>,
}

/// Per peer, since when calls to it fail and how many have: openraft makes several links
/// to one peer (replication, votes, leadership checks), and the peer going down or coming
/// back is logged once, not once per link.
type Failing = Arc<parking_lot::Mutex<HashMap<NodeId, (std::time::Instant, u64)>>>;

impl RaftNetworkFactory<TypeConfig> for TcpFactory {
    type Network = TcpLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> TcpLink {
        // An address without a port stays as it is: connecting to it fails, and the peer is
        // reported unreachable.
        let addr = match self.port_offset {
            0 => node.addr.clone(),
            n => offset_port(&node.addr, n).unwrap_or_else(|| node.addr.clone()),
        };
        TcpLink {
            from: self.from,
            to: target,
            addr,
            token: self.token.clone(),
            stream: None,
            failing: self.failing.clone(),
            buf: Vec::new(),
        }
    }
}

/// Why a link failed: it could not connect (the peer is unreachable) or it broke after.
enum LinkError {
    Connect(Error),
    Broken(Error),
}

impl TcpLink {
    async fn connect(&mut self) -> std::result::Result<&mut TcpStream, LinkError> {
        if self.stream.is_none() {
            let mut s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| LinkError::Connect(Error::io(&self.addr, "connect", e)))?;
            s.set_nodelay(true).ok();
            let hello = PeerRequest::Hello {
                token: self.token.clone(),
                from: self.from,
            };
            frame::write(&mut s, &hello, "peer request")
                .await
                .map_err(LinkError::Connect)?;
            match frame::read(&mut s, "peer response").await {
                Ok(Some(PeerResponse::Hello(Ok(())))) => {}
                Ok(other) => {
                    return Err(LinkError::Connect(Error::Invalid {
                        what: "peer hello",
                        reason: format!("{other:?}"),
                    }))
                }
                Err(e) => return Err(LinkError::Connect(e)),
            }
            self.stream = Some(s);
        }
        match self.stream.as_mut() {
            Some(s) => Ok(s),
            None => Err(LinkError::Connect(Error::Closed)),
        }
    }

    /// Send one request and read its answer, within `ttl`.
    async fn call(
        &mut self,
        req: &PeerRequest,
        ttl: Duration,
    ) -> std::result::Result<PeerResponse, LinkError> {
        let bytes = frame::encode(req, "peer request").map_err(LinkError::Broken)?;
        self.call_encoded(&bytes, ttl).await
    }

    /// [`TcpLink::call`] with the request already encoded as a frame.
    async fn call_encoded(
        &mut self,
        bytes: &[u8],
        ttl: Duration,
    ) -> std::result::Result<PeerResponse, LinkError> {
        let attempt = async {
            self.connect().await?;
            // The connection is taken out for the exchange and put back only once it is
            // complete. openraft drops a call at its own time-out (the heartbeat interval
            // for appends); the connection then goes with it, so that no later call reads
            // this request's answer as its own.
            let mut s = self
                .stream
                .take()
                .ok_or(LinkError::Connect(Error::Closed))?;
            s.write_all(bytes)
                .await
                .map_err(|e| LinkError::Broken(Error::io(&self.addr, "write a request", e)))?;
            let r = match frame::read(&mut s, "peer response").await {
                Ok(Some(PeerResponse::Failed(why))) => Err(LinkError::Broken(Error::Invalid {
                    what: "peer request",
                    reason: why,
                })),
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err(LinkError::Broken(Error::Closed)),
                Err(e) => Err(LinkError::Broken(e)),
            };
            if r.is_ok() {
                self.stream = Some(s);
            }
            r
        };
        let r = match tokio::time::timeout(ttl, attempt).await {
            Ok(r) => r,
            Err(_) => Err(LinkError::Broken(Error::Timeout {
                what: "peer request".to_owned(),
                after_ms: ttl.as_millis() as u64,
            })),
        };
        if r.is_err() {
            self.stream = None;
        }
        self.note(&r);
        r
    }

    /// Log the link going down and coming back, once each: openraft retries a failing
    /// peer every half second and logs every attempt at warning and error level, which the
    /// broker's default log filter leaves out (`halfmq` `main.rs`) so that a dead peer does
    /// not bury everything else.
    fn note<T>(&mut self, r: &std::result::Result<T, LinkError>) {
        let mut failing = self.failing.lock();
        match (r, failing.get_mut(&self.to)) {
            (Ok(_), None) => {}
            (Ok(_), Some((since, calls))) => {
                tracing::info!(
                    peer = self.to,
                    addr = %self.addr,
                    down_ms = since.elapsed().as_millis() as u64,
                    failed_calls = *calls,
                    "peer reachable again"
                );
                failing.remove(&self.to);
            }
            (Err(_), Some((_, calls))) => *calls += 1,
            (Err(e), None) => {
                let (how, e) = match e {
                    LinkError::Connect(e) => ("unreachable", e),
                    LinkError::Broken(e) => ("failing", e),
                };
                tracing::warn!(
                    peer = self.to,
                    addr = %self.addr,
                    error = %e,
                    "peer {how}: raft retries it in the background (`halfmq cluster status` \
                     shows each peer's state); logged again when it answers"
                );
                failing.insert(self.to, (std::time::Instant::now(), 1));
            }
        }
    }
}

/// Bytes an append request carries besides its entries' frames (vote, log ids, lengths),
/// with room to spare.
const APPEND_OVERHEAD_BYTES: usize = 4 << 10;

type RpcResult<T> = std::result::Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId>>>;

/// A failed call as openraft takes it (`RPCError`, `StreamingError`): a peer that cannot be
/// reached is unreachable (openraft backs off), any other failure a network error.
fn link_err<E: From<Unreachable> + From<NetworkError>>(e: LinkError) -> E {
    match e {
        LinkError::Connect(e) => Unreachable::new(&e).into(),
        LinkError::Broken(e) => NetworkError::new(&e).into(),
    }
}

/// What a call of `$link` returns, of what came of it (`$called`, the peer's answer or the
/// link's failure) when it expects an answer of kind `$kind`: the result in that answer (the
/// peer's refusal as its remote error); an answer of another kind is a network error.
macro_rules! answer_of {
    ($link:expr, $called:expr, $kind:path) => {
        match $called {
            Ok($kind(r)) => r.map_err(|e| RemoteError::new($link.to, e).into()),
            Ok(other) => Err(NetworkError::new(&unexpected(other)).into()),
            Err(e) => Err(link_err(e)),
        }
    };
}

fn unexpected(r: PeerResponse) -> Error {
    Error::Invalid {
        what: "peer response",
        reason: format!("unexpected {r:?}"),
    }
}

impl RaftNetwork<TypeConfig> for TcpLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let n = rpc.entries.len() as u64;
        let req = PeerRequest::Append(rpc);
        // openraft gives an append one heartbeat interval (50 ms) to be sent, written and
        // fsynced by the follower, and answered; one that takes longer is sent again, the
        // same size, for ever (a node catching up never would). So an append of more than
        // one entry is kept to `log_store::APPEND_BYTES_MAX` (the log reader already gives
        // openraft no more than that), and openraft sends fewer entries.
        let most = crate::log_store::APPEND_BYTES_MAX as usize + APPEND_OVERHEAD_BYTES;
        let mut bytes = std::mem::take(&mut self.buf);
        bytes.clear();
        let fits = match frame::encode_into(&req, &mut bytes, "peer request") {
            Ok(len) => n <= 1 || len <= most,
            Err(_) if n > 1 => false,
            Err(e) => return Err(NetworkError::new(&e).into()),
        };
        if !fits {
            return Err(PayloadTooLarge::new_entries_hint(n / 2).into());
        }
        let called = self.call_encoded(&bytes, option.hard_ttl()).await;
        if bytes.capacity() <= frame::BUF_BYTES_KEEP {
            self.buf = bytes;
        }
        answer_of!(self, called, PeerResponse::Append)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let called = self.call(&PeerRequest::Vote(rpc), option.hard_ttl()).await;
        answer_of!(self, called, PeerResponse::Vote)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> std::result::Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>>
    {
        let ttl = option.hard_ttl();
        for chunk in snapshot.snapshot.chunks(SNAPSHOT_CHUNK_BYTES) {
            let chunk = chunk.map_err(|e| NetworkError::new(&e))?;
            match self.call(&PeerRequest::SnapshotChunk(chunk), ttl).await {
                Ok(PeerResponse::Chunk) => {}
                Ok(other) => return Err(NetworkError::new(&unexpected(other)).into()),
                Err(e) => return Err(link_err(e)),
            }
        }
        let done = PeerRequest::SnapshotDone {
            vote,
            meta: snapshot.meta,
        };
        let called = self.call(&done, ttl).await;
        answer_of!(self, called, PeerResponse::Snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The links of one node share what they know of a peer: the first failure of any of
    /// them marks the peer failing, later ones only count, and the first success of any
    /// clears it (each change logged once).
    #[test]
    fn a_peer_goes_down_and_comes_back_once_for_all_the_links_to_it() {
        let failing = Failing::default();
        let link = |to: NodeId| TcpLink {
            from: 1,
            to,
            addr: format!("127.0.0.1:{to}"),
            token: String::new(),
            stream: None,
            failing: failing.clone(),
            buf: Vec::new(),
        };
        let (mut votes, mut appends, mut other) = (link(2), link(2), link(3));
        let down: std::result::Result<(), LinkError> = Err(LinkError::Connect(Error::Closed));
        votes.note(&down);
        appends.note(&down);
        appends.note(&Err::<(), _>(LinkError::Broken(Error::Closed)));
        other.note(&Ok(()));
        let calls = |to| failing.lock().get(&to).map(|(_, n)| *n);
        assert_eq!(
            calls(2),
            Some(3),
            "three failed calls to peer 2, from two links"
        );
        assert_eq!(calls(3), None, "peer 3 answered");
        votes.note(&Ok(()));
        assert_eq!(calls(2), None, "one answer clears it for every link");
    }
}
