//! Following the leader of a replicated cluster (`halfmq broker --peers`): the client's
//! address ([`ClientConfig::addr`](crate::ClientConfig::addr)) may name several of its
//! nodes, comma-separated. Requests go to the node last known to lead; a node that is not
//! the leader answers [`codes::NOT_LEADER`] with the leader's address
//! ([`protocol::leader_addr`]) and the request is made again there; with no leader known (an
//! election), or a node that cannot be reached, the next address is asked. A request whose
//! fate is unknown (its connection broke, or it timed out, before the answer) is made again
//! elsewhere only when doing so twice changes nothing more than doing it once
//! ([`may_resend`]): a send with an idempotency key, a commit or rollback, a read.
//!
//! This file holds the decisions (which address, whether to go on); `connection.rs` carries
//! them out.

use std::time::Duration;

use crate::protocol::{self, codes, Request, WireMessage};
use halfmq_types::props::PROP_IDEMPOTENCY_KEY;
use halfmq_types::Error;

/// Pause before asking again when no node knows a leader (an election is under way), or
/// after a write's fate was lost with its node.
pub(crate) const ELECTION_PAUSE: Duration = Duration::from_millis(100);

/// The addresses of a client and which one is asked. Every change of the address asked
/// bumps a generation, so that of many requests failing on one address at once only the
/// first moves the client on (the others find it moved already and just ask again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Addrs {
    list: Vec<String>,
    at: usize,
    generation: u64,
}

impl Addrs {
    /// The comma-separated addresses of `addr` (blank ones dropped). Empty when it names
    /// none; [`Addrs::current`] then answers a configuration error.
    pub(crate) fn parse(addr: &str) -> Addrs {
        Addrs {
            list: addr
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
            at: 0,
            generation: 0,
        }
    }

    /// How many addresses there are.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The address asked now, and the generation that chose it.
    pub(crate) fn current(&self) -> Result<(String, u64), Error> {
        match self.list.get(self.at) {
            Some(a) => Ok((a.clone(), self.generation)),
            None => Err(Error::Config {
                setting: "addr",
                reason: "no broker address given".into(),
            }),
        }
    }

    /// The generation of the address asked now.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Carry out `step`, decided on an error of a request made under generation `seen`;
    /// nothing when the address was changed since (by another request's step). True when
    /// the address changed.
    pub(crate) fn step(&mut self, seen: u64, step: &Step) -> bool {
        if seen != self.generation || self.list.is_empty() {
            return false;
        }
        match step {
            Step::GoTo(addr) => {
                self.at = match self.list.iter().position(|a| a == addr) {
                    Some(i) => i,
                    // A leader the configuration did not name (a node added later).
                    None => {
                        self.list.push(addr.clone());
                        self.list.len() - 1
                    }
                };
            }
            Step::MoveOn { .. } => self.at = (self.at + 1) % self.list.len(),
            Step::Fail => return false,
        }
        self.generation += 1;
        true
    }
}

/// What a request does after an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Ask this node (the leader named by a `NOT_LEADER` answer) at once.
    GoTo(String),
    /// Ask the next address after `pause`.
    MoveOn {
        /// How long to wait first.
        pause: Duration,
    },
    /// Give the error to the caller.
    Fail,
}

/// What to do after `e`. `sent`: the request may have reached a broker (false when
/// connecting failed); `resend`: it may be made twice ([`may_resend`]); `several`: the
/// client was given more than one address. With one address the client talks to that
/// broker alone, as it always did: every error is the caller's ("not the leader" too).
pub(crate) fn step_after(e: &Error, sent: bool, resend: bool, several: bool) -> Step {
    if !several {
        return Step::Fail;
    }
    match protocol::leader_addr(e) {
        // Not carried out: safe to make again wherever the leader is.
        Some(Some(addr)) => Step::GoTo(addr),
        Some(None) => Step::MoveOn {
            pause: ELECTION_PAUSE,
        },
        None if !fate_unknown(e) => Step::Fail,
        None if !sent => Step::MoveOn {
            pause: Duration::ZERO,
        },
        None if resend => Step::MoveOn {
            pause: ELECTION_PAUSE,
        },
        // Carried out or not, nobody knows; made again it could be carried out twice.
        None => Step::Fail,
    }
}

/// The last connection failure at each address asked while following, so that giving up
/// names every address and what each said, not only the last one asked.
#[derive(Debug, Default)]
pub(crate) struct Tried(Vec<(String, String)>);

impl Tried {
    /// Note that connecting to `addr` failed with `e`.
    pub(crate) fn note(&mut self, addr: &str, e: &Error) {
        let why = match e {
            Error::Disconnected { reason, .. } => reason.clone(),
            e => e.to_string(),
        };
        match self.0.iter_mut().find(|(a, _)| a == addr) {
            Some(seen) => seen.1 = why,
            None => self.0.push((addr.to_owned(), why)),
        }
    }

    /// The error to give up with after `waited`: `e` itself, unless it is a failure to
    /// connect and more than one address failed; then one [`Error::Disconnected`] naming
    /// each address with its last failure.
    pub(crate) fn give_up(&self, e: Error, waited: Duration) -> Error {
        if !matches!(e, Error::Disconnected { .. }) || self.0.len() < 2 {
            return e;
        }
        let addr = self
            .0
            .iter()
            .map(|(a, _)| a.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let each = self
            .0
            .iter()
            .map(|(a, why)| format!("{a}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        Error::Disconnected {
            addr,
            reason: format!(
                "none of them answered within {:.1} s ({each})",
                waited.as_secs_f64()
            ),
        }
    }
}

/// True for an error after which a request may or may not have been carried out, or never
/// reached a broker: the broker went away, did not answer (or could not get the write
/// confirmed by a majority), or was shutting down.
pub(crate) fn fate_unknown(e: &Error) -> bool {
    matches!(
        e,
        Error::Disconnected { .. } | Error::Timeout { .. } | Error::Io { .. }
    ) || matches!(e, Error::Remote { code, .. } if *code == codes::SHUTTING_DOWN)
}

/// Whether `req` may be made again after its fate was lost: doing it twice changes nothing
/// more than doing it once. A send with an idempotency key is stored once; a commit or
/// rollback made again finds its outcome recorded; a read changes nothing; a poll made
/// again leaves what the lost one handed out leased until its visibility time-out, then
/// delivers it again (delivery is at least once in any case).
pub(crate) fn may_resend(req: &Request) -> bool {
    let keyed = |m: &WireMessage| m.properties.contains_key(PROP_IDEMPOTENCY_KEY);
    match req {
        Request::Send { message, .. }
        | Request::SendHalf { message, .. }
        | Request::SendDelayed { message, .. } => keyed(message),
        Request::SendBatch { messages, .. } => messages.iter().all(keyed),
        Request::Commit { .. }
        | Request::Rollback { .. }
        | Request::Poll { .. }
        | Request::Receive { .. }
        | Request::ListTopics
        | Request::Stats
        | Request::ListTxns { .. }
        | Request::TxnState { .. }
        | Request::DeadLetters { .. }
        | Request::GetGroup { .. }
        | Request::GetGroupSettings { .. }
        | Request::Trace { .. }
        | Request::Browse { .. }
        | Request::ClusterStatus => true,
        _ => false,
    }
}

/// Makes the idempotency keys a client with several addresses puts on the sends that carry
/// none: `hmq-<this client's random id>-<counter>`, unique to the client, so that a send
/// made again on a new leader is stored once.
#[derive(Debug)]
pub(crate) struct KeyMaker {
    id: u64,
    next: std::sync::atomic::AtomicU64,
}

impl KeyMaker {
    /// Keys under a new random id (from the standard library's randomly seeded hasher and
    /// the clock, so two clients of one process differ too).
    pub(crate) fn new() -> KeyMaker {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.write_u128(now.as_nanos());
        h.write_u32(std::process::id());
        KeyMaker {
            id: h.finish(),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A key not made before by this maker.
    pub(crate) fn key(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("hmq-{:016x}-{n}", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_leader(addr: Option<&str>) -> Error {
        Error::from_wire(codes::NOT_LEADER, protocol::not_leader_message(addr))
    }

    fn lost() -> Error {
        Error::Disconnected {
            addr: "a:1".into(),
            reason: "connection lost before the answer".into(),
        }
    }

    /// The addresses rotate in order, a named leader is asked next (and added when the
    /// configuration did not name it), and a step decided under an old generation does
    /// nothing.
    #[test]
    fn addresses_rotate_and_follow_the_named_leader() {
        let mut a = Addrs::parse(" a:1, b:2 ,,c:3");
        assert_eq!(a.len(), 3);
        assert_eq!(a.current().unwrap(), ("a:1".into(), 0));
        let on = Step::MoveOn {
            pause: Duration::ZERO,
        };
        assert!(a.step(0, &on));
        assert_eq!(a.current().unwrap(), ("b:2".into(), 1));
        // A second request that failed on a:1 finds the client moved on already.
        assert!(!a.step(0, &on));
        assert_eq!(a.current().unwrap().0, "b:2");
        assert!(a.step(1, &Step::GoTo("a:1".into())));
        assert_eq!(a.current().unwrap(), ("a:1".into(), 2));
        assert!(a.step(2, &Step::GoTo("d:4".into())));
        assert_eq!((a.current().unwrap().0, a.len()), ("d:4".into(), 4));
        assert!(a.step(3, &on));
        assert_eq!(a.current().unwrap().0, "a:1", "wraps around");
        assert!(!a.step(4, &Step::Fail));
        assert_eq!(a.generation(), 4);
    }

    #[test]
    fn no_address_is_a_config_error() {
        let mut a = Addrs::parse(" , ");
        assert!(matches!(a.current(), Err(Error::Config { .. })));
        assert!(!a.step(0, &Step::GoTo("x:1".into())));
    }

    /// NOT_LEADER is followed (the request was not carried out); a lost request is made
    /// again elsewhere only when it may be made twice, and a failed connect moves on at
    /// once; one address keeps the behaviour of a client of one broker.
    #[test]
    fn the_step_after_an_error() {
        assert_eq!(
            step_after(&not_leader(Some("b:2")), true, false, true),
            Step::GoTo("b:2".into())
        );
        assert_eq!(
            step_after(&not_leader(Some("b:2")), true, false, false),
            Step::Fail
        );
        assert_eq!(
            step_after(&not_leader(None), true, false, true),
            Step::MoveOn {
                pause: ELECTION_PAUSE
            }
        );
        assert_eq!(
            step_after(&lost(), false, false, true),
            Step::MoveOn {
                pause: Duration::ZERO
            }
        );
        assert_eq!(
            step_after(&lost(), true, true, true),
            Step::MoveOn {
                pause: ELECTION_PAUSE
            }
        );
        assert_eq!(step_after(&lost(), true, false, true), Step::Fail);
        assert_eq!(step_after(&lost(), true, true, false), Step::Fail);
        let refused = Error::from_wire(codes::BAD_REQUEST, "no".into());
        assert_eq!(step_after(&refused, true, true, true), Step::Fail);
        let fate = Error::Timeout {
            what: "a majority".into(),
            after_ms: 1200,
        };
        assert_eq!(
            step_after(&fate, true, true, true),
            Step::MoveOn {
                pause: ELECTION_PAUSE
            }
        );
    }

    #[test]
    fn only_requests_safe_twice_are_resent() {
        let msg = |key: Option<&str>| {
            let mut m = halfmq_types::Message::new("b");
            if let Some(k) = key {
                m = m.with_idempotency_key(k);
            }
            WireMessage::from(m)
        };
        let send = |key| Request::Send {
            topic: "t".into(),
            message: msg(key),
        };
        assert!(may_resend(&send(Some("k"))));
        assert!(!may_resend(&send(None)));
        let batch = |keys: &[Option<&str>]| Request::SendBatch {
            topic: "t".into(),
            messages: keys.iter().map(|k| msg(*k)).collect(),
        };
        assert!(may_resend(&batch(&[Some("a"), Some("b")])));
        assert!(!may_resend(&batch(&[Some("a"), None])));
        assert!(may_resend(&Request::Commit { txn: 7 }));
        assert!(may_resend(&Request::Stats));
        assert!(!may_resend(&Request::Ack {
            group: "g".into(),
            topic: "t".into(),
            acks: vec![(0, 1)],
        }));
    }

    #[test]
    fn keys_are_unique_per_client() {
        let (a, b) = (KeyMaker::new(), KeyMaker::new());
        let (a0, a1, b0) = (a.key(), a.key(), b.key());
        assert_ne!(a0, a1);
        assert_ne!(a0, b0);
        assert!(a0.len() <= halfmq_types::IDEMPOTENCY_KEY_BYTES_MAX);
    }
}
