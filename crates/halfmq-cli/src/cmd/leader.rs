//! Following a replicated cluster's leader from the command line: `--addr A,B,C` names
//! some of its nodes. A request goes to the node last known to lead; a node that is not the
//! leader answers with the leader's address ([`protocol::leader_addr`]) and the request is
//! made again there; a node that cannot be reached, or whose connection breaks with the
//! request's fate unknown, is left for the next address. A write made again carries the
//! same idempotency key, so it is stored once whichever attempt the cluster acknowledged.

use std::time::Duration;

use halfmq::{Error, Result};
use halfmq_client::protocol;
use halfmq_client::Client;
use tokio::time::Instant;

use super::ConnArgs;

/// Pause before asking again when no node knows a leader (an election is under way).
const ELECTION_PAUSE: Duration = Duration::from_millis(100);

/// A client that follows the leader among `--addr`'s nodes.
pub struct Leader {
    args: ConnArgs,
    addrs: Vec<String>,
    /// The address asked next.
    next: usize,
    client: Option<Client>,
}

impl Leader {
    /// Follow the leader among the nodes `args` names; nothing is connected yet.
    pub fn new(args: ConnArgs) -> Leader {
        let addrs = args.addrs();
        Leader {
            args,
            addrs,
            next: 0,
            client: None,
        }
    }

    /// Run `op` on the leader, following it until `op` answers something other than "not
    /// the leader" or a lost connection, or `--timeout-ms` has passed (then the last error).
    pub async fn call<T, F, Fut>(&mut self, mut op: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + Duration::from_millis(self.args.timeout_ms);
        loop {
            let r = match self.client().await {
                Ok(c) => op(c).await,
                Err(e) => Err(e),
            };
            let e = match r {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let pause = match protocol::leader_addr(&e) {
                Some(Some(addr)) => {
                    self.go_to(&addr);
                    Duration::ZERO
                }
                Some(None) => {
                    self.move_on();
                    ELECTION_PAUSE
                }
                // With one address there is nowhere else to go, and a request made again
                // without an idempotency key could be stored twice.
                None if self.addrs.len() > 1 && fate_unknown(&e) => {
                    self.move_on();
                    ELECTION_PAUSE
                }
                None => return Err(e),
            };
            if Instant::now() + pause >= deadline {
                return Err(e);
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// The client of the node asked next, connected if need be.
    async fn client(&mut self) -> Result<Client> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        if self.addrs.is_empty() {
            return Err(Error::Config {
                setting: "addr",
                reason: "no address given".into(),
            });
        }
        let addr = self.addrs[self.next % self.addrs.len()].clone();
        let c = self.args.connect_to(&addr).await?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Ask `addr` next (added to the addresses if `--addr` did not name it).
    fn go_to(&mut self, addr: &str) {
        self.client = None;
        self.next = match self.addrs.iter().position(|a| a == addr) {
            Some(i) => i,
            None => {
                self.addrs.push(addr.to_owned());
                self.addrs.len() - 1
            }
        };
    }

    /// Ask the next address.
    fn move_on(&mut self) {
        self.client = None;
        self.next = (self.next + 1) % self.addrs.len().max(1);
    }
}

/// True for an error after which a request may or may not have been carried out, or never
/// reached a broker: the broker went away, did not answer, or was shutting down.
fn fate_unknown(e: &Error) -> bool {
    matches!(
        e,
        Error::Disconnected { .. } | Error::Timeout { .. } | Error::Io { .. }
    ) || matches!(e, Error::Remote { code, .. } if *code == protocol::codes::SHUTTING_DOWN)
}
