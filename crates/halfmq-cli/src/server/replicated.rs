//! The requests of a broker that is one node of a replicated cluster (`halfmq broker
//! --peers`): writes go through the cluster's raft log ([`ReplicaNode`]) and are answered
//! once a majority has them fsynced; a node that is not the leader answers
//! [`codes::NOT_LEADER`] with the leader's client address. Reads are answered by the node's
//! own broker.
//!
//! Replicated today: `Send`, `SendBatch`, `SendHalf`, `SendDelayed` (fired by the leader
//! through the log), `Commit`, `Rollback`, `Rearm`, `Ack`, `AckReceipts`, `Nack`,
//! `NackReceipt`, `DeadLetterReceipt`, `ReplayDeadLetters`, `SetGroup`, `SetGroupSettings`,
//! `CreateTopic`, and check-back: `RegisterChecker` is taken by the leader only (it alone
//! asks checkers, and proposes what each check found through the log, see
//! `halfmq_raft::checkback`). Deliveries are the leader's too: `Poll`, `Receive` and
//! `ChangeLease` are answered by the leader's broker (leases are its own), and what a nack
//! or a visibility time-out comes to goes through the log (`halfmq_raft::consume`).
//! `DeleteGroup` is checked against the leader's leases and made through the log.
//! Retention would change one node's broker alone (its floor depends on the node's
//! checkpoints), so a replicated node refuses it with [`codes::BAD_REQUEST`].

use std::sync::Arc;

use std::time::Duration;

use halfmq::{
    Broker, Decided, Delivery, DeliveryConfig, Error, GroupSettings, HalfOptions, Message,
    NackOutcome, PollOptions, Receipt, Settlement, TransactionChecker, TxnId,
};
use halfmq_client::protocol::{self, codes, Request, Response, SendResult, WireGroup};
use halfmq_raft::{Applied, Command, MessageData, Outcome, ReplicaError, ReplicaNode};

use super::blocking;

/// Where a request goes on a replicated node.
pub(super) enum Routed {
    /// Answered through the cluster (or refused).
    Answered(Response),
    /// A read: the node's broker answers it.
    Local(Request),
}

/// Carry out `req` on `node`'s cluster, or hand it back for the broker to answer.
pub(super) async fn route(node: &ReplicaNode, req: Request) -> Routed {
    Routed::Answered(match req {
        Request::ClusterStatus => match serde_json::to_string(&node.status()) {
            Ok(json) => Response::ClusterStatus(json),
            Err(e) => Response::from_error(&Error::Invalid {
                what: "cluster status",
                reason: e.to_string(),
            }),
        },
        Request::ClusterAddNode { id, addr } => {
            // Peers dial the port after the client address's: both must be ports.
            let valid = addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .filter(|a| a.port().checked_add(1).is_some());
            match valid {
                None => Response::from_error(&Error::Invalid {
                    what: "node address",
                    reason: format!("`{addr}` is not HOST:PORT with a port below 65535"),
                }),
                Some(a) => match node.add_node(id, a.to_string()).await {
                    Ok(()) => Response::Ok,
                    Err(e) => replica_error(e),
                },
            }
        }
        Request::ClusterRemoveNode { id } => match node.remove_node(id).await {
            Ok(()) => Response::Ok,
            Err(e) => replica_error(e),
        },
        Request::Send { topic, message } => {
            match node.send(&topic, &[Message::from(message)]).await {
                Ok(mut each) => match each.pop() {
                    Some(Ok(s)) => Response::from(s),
                    Some(Err(e)) => Response::from_error(&e),
                    None => replica_error(ReplicaError::Raft("a send answered nothing".into())),
                },
                Err(e) => replica_error(e),
            }
        }
        Request::SendBatch { topic, messages } => {
            let msgs: Vec<Message> = messages.into_iter().map(Message::from).collect();
            match node.send(&topic, &msgs).await {
                Ok(each) => Response::SentBatch {
                    topic,
                    results: each.iter().map(SendResult::from_outcome).collect(),
                },
                Err(e) => replica_error(e),
            }
        }
        Request::SendHalf {
            topic,
            message,
            producer_group,
            check_immunity_ms,
        } => {
            let opts = HalfOptions::from_check_immunity_ms(check_immunity_ms);
            let cmd = Command::send_half(&topic, &Message::from(message), producer_group, opts);
            answered(node.write_to_topic(&topic, cmd).await, |o| match o {
                Outcome::Half { txn, duplicate } => Some(Response::HalfSent {
                    txn: txn.0,
                    duplicate,
                }),
                _ => None,
            })
        }
        Request::SendDelayed {
            topic,
            message,
            deliver_at_ms,
        } => {
            let cmd = Command::SendDelayed {
                topic: topic.clone(),
                message: MessageData::from(&Message::from(message)),
                deliver_at_ms,
            };
            answered(node.write_to_topic(&topic, cmd).await, |o| match o {
                Outcome::Delayed(r) => Some(Response::Delayed(r)),
                _ => None,
            })
        }
        Request::Commit { txn } => done(node, Command::Commit(TxnId(txn))).await,
        Request::Rollback { txn } => done(node, Command::Rollback(TxnId(txn))).await,
        Request::Rearm { txn } => done(node, Command::Rearm(TxnId(txn))).await,
        Request::Ack { group, topic, acks } => {
            done(node, Command::Ack { group, topic, acks }).await
        }
        Request::SetGroup { group, settings } => {
            // This request cannot carry the FIFO override: it keeps the one in force.
            let fifo = match node.broker().group_settings(&group) {
                Ok((_, s)) => s.fifo,
                Err(e) => return Routed::Answered(Response::from_error(&e)),
            };
            set_group(node, group, settings, fifo, |d, s| {
                Response::Group(WireGroup::new(d, s))
            })
            .await
        }
        Request::SetGroupSettings {
            group,
            settings,
            fifo,
        } => set_group(node, group, settings, fifo, Response::group_settings).await,
        Request::CreateTopic { name, queues } => {
            let cmd = Command::CreateTopic {
                topic: name,
                queues,
            };
            answer(node, cmd, |o| {
                matches!(o, Outcome::TopicCreated { .. }).then_some(Response::Ok)
            })
            .await
        }
        // Deliveries are the leader's (leases are its own): polls and lease changes are
        // answered by its broker (`handlers::poll` settles what a poll finds through the
        // log, see `poll`), once it has applied the log of the terms before its own.
        req @ (Request::Poll { .. } | Request::Receive { .. } | Request::ChangeLease { .. }) => {
            match node.ready_to_deliver().await {
                Ok(()) => return Routed::Local(req),
                Err(e) => replica_error(e),
            }
        }
        Request::Nack {
            group,
            topic,
            queue,
            offset,
            delay_ms,
        } => {
            let delay = delay_ms.map(Duration::from_millis);
            nack(node, move |b| {
                b.decide_nack(&group, &topic, (queue, offset), delay, None)
            })
            .await
        }
        Request::NackReceipt {
            group,
            topic,
            receipt,
            delay_ms,
        } => {
            let delay = delay_ms.map(Duration::from_millis);
            nack(node, move |b| {
                let r = Receipt::parse(&receipt)?;
                b.decide_nack(&group, &topic, (r.queue, r.offset), delay, Some(&r))
            })
            .await
        }
        Request::DeadLetterReceipt {
            group,
            topic,
            receipt,
            reason,
        } => {
            nack(node, move |b| {
                let r = Receipt::parse(&receipt)?;
                b.decide_dead_letter(&group, &topic, &r, &reason)
            })
            .await
        }
        Request::AckReceipts {
            group,
            topic,
            receipts,
        } => {
            // Checked against the leases of the leader, which made them; the ack itself is
            // an ack by offsets, through the log.
            if let Err(e) = node.check_leader() {
                return Routed::Answered(replica_error(e));
            }
            let b = node.broker();
            let acks = blocking(move || {
                let rs = receipts
                    .iter()
                    .map(|r| Receipt::parse(r))
                    .collect::<halfmq::Result<Vec<_>>>()?;
                let acks = b.receipt_acks(&group, &topic, &rs)?;
                Ok(Command::Ack { group, topic, acks })
            })
            .await;
            match acks {
                Ok(cmd) => done(node, cmd).await,
                Err(e) => Response::from_error(&e),
            }
        }
        Request::ReplayDeadLetters { group, max } => {
            answer(node, Command::Replay { group, max }, |o| match o {
                Outcome::Replayed(r) => Some(Response::Replayed(r)),
                _ => None,
            })
            .await
        }
        Request::DeleteGroup { group } => {
            // Checked against the leader's leases (only it delivers), then made on every
            // node through the log.
            if let Err(e) = node.check_leader() {
                return Routed::Answered(replica_error(e));
            }
            let b = node.broker();
            let g = group.clone();
            if let Err(e) = blocking(move || b.check_group_deletion(&g)).await {
                return Routed::Answered(Response::from_error(&e));
            }
            answer(node, Command::DeleteGroup(group), |o| match o {
                Outcome::GroupDeleted(d) => Some(Response::GroupDeleted(d)),
                _ => None,
            })
            .await
        }
        Request::Retention => Response::Error {
            code: codes::BAD_REQUEST,
            message: "a replicated broker does not carry this request yet (retention does \
                      not go through its log: its floor depends on each node's checkpoints)"
                .into(),
        },
        other => return Routed::Local(other),
    })
}

/// A nack on the leader: `decide` checks the lease on its broker and holds it; what it
/// decided (a retry, or a move to the dead-letter queue) goes through the log, and every
/// node records it.
async fn nack(
    node: &ReplicaNode,
    decide: impl FnOnce(&Broker) -> halfmq::Result<Decided> + Send + 'static,
) -> Response {
    if let Err(e) = node.check_leader() {
        return replica_error(e);
    }
    let b = node.broker();
    let decided = match blocking(move || decide(&b)).await {
        Ok(d) => d,
        Err(e) => return Response::from_error(&e),
    };
    let acked = || {
        Response::from_error(&Error::BadAck {
            group: decided.group.clone(),
            topic: decided.topic.clone(),
            queue: decided.queue,
            offset: decided.offset,
            reason: "it was acked while the nack was recorded".into(),
        })
    };
    answered(node.settle_one(&decided).await, |o| {
        match (o, &decided.settlement) {
            (
                Outcome::Retried(true),
                Settlement::Retry {
                    failures, due_ms, ..
                },
            ) => Some(Response::Nacked(NackOutcome::Redeliver {
                attempt: failures.saturating_add(1),
                at_ms: *due_ms,
            })),
            (Outcome::DeadLettered(Some(dead_letter)), _) => {
                Some(Response::Nacked(NackOutcome::DeadLettered { dead_letter }))
            }
            (Outcome::Retried(false) | Outcome::DeadLettered(None), _) => Some(acked()),
            _ => None,
        }
    })
}

/// One poll on the leader's broker `b`, deciding: the time-outs and dead-letter moves it
/// finds, the acks its tag filter made and the deliveries it made are recorded through the
/// log before its answer (so a new leader counts the attempt of a delivery never settled). `None` when it settled some and handed
/// nothing out: a retry is due at once, so poll again. An answer when it failed.
pub(super) async fn poll(
    node: &ReplicaNode,
    b: &Broker,
    (group, topic, opts): (&str, &str, &PollOptions),
    limits: (usize, usize),
) -> Result<Option<Vec<Delivery>>, Response> {
    node.ready_to_deliver().await.map_err(replica_error)?;
    let p = b
        .poll_deciding(group, topic, limits, opts)
        .map_err(|e| Response::from_error(&e))?;
    let settled = !p.decided.is_empty();
    if let Err(e) = node.settle_poll(group, topic, &p).await {
        if p.deliveries.is_empty() {
            return Err(replica_error(e));
        }
        // The failures are given back (the next poll finds them again); the deliveries
        // are handed out, leased here (a new leader delivers them again at once).
        tracing::warn!(group, topic, error = %e, "a poll's deliveries and failures not recorded");
    }
    Ok((!settled || !p.deliveries.is_empty()).then_some(p.deliveries))
}

/// Register `checker` for `producer_group` on `node`: its id, or the answer refusing it
/// (`NOT_LEADER` with the leader's address on a node that does not lead).
pub(super) fn register_checker(
    node: &ReplicaNode,
    producer_group: &str,
    checker: Arc<dyn TransactionChecker>,
) -> Result<u64, Response> {
    node.register_checker(producer_group, checker)
        .map_err(replica_error)
}

/// Set `group`'s overrides through the log, then answer with what is in force on this node
/// (the leader, which has applied them) as `answer` makes it.
async fn set_group(
    node: &ReplicaNode,
    group: String,
    settings: GroupSettings,
    fifo: Option<bool>,
    answer: impl FnOnce(&DeliveryConfig, GroupSettings) -> Response,
) -> Response {
    let cmd = Command::SetGroup {
        group: group.clone(),
        settings,
        fifo,
    };
    match done(node, cmd).await {
        Response::Ok => match node.broker().group_settings(&group) {
            Ok((d, s)) => answer(&d, s),
            Err(e) => Response::from_error(&e),
        },
        refused => refused,
    }
}

/// Write `cmd` and answer `Ok` once it took effect.
async fn done(node: &ReplicaNode, cmd: Command) -> Response {
    answer(node, cmd, |o| {
        matches!(o, Outcome::Done).then_some(Response::Ok)
    })
    .await
}

/// Write `cmd` through the log: the answer `ok` makes of its outcome, or its error.
async fn answer(
    node: &ReplicaNode,
    cmd: Command,
    ok: impl FnOnce(Outcome) -> Option<Response>,
) -> Response {
    let applied = node.write(vec![cmd]).await.map(|mut each| each.pop());
    match applied {
        Ok(Some(a)) => answered(Ok(a), ok),
        Ok(None) => replica_error(ReplicaError::Raft("a write answered nothing".into())),
        Err(e) => replica_error(e),
    }
}

/// The answer `ok` makes of a write's outcome, or its error.
fn answered(
    applied: Result<Applied, ReplicaError>,
    ok: impl FnOnce(Outcome) -> Option<Response>,
) -> Response {
    match applied {
        Err(e) => replica_error(e),
        Ok(Ok(outcome)) => {
            let shown = format!("{outcome:?}");
            ok(outcome).unwrap_or_else(|| {
                replica_error(ReplicaError::Raft(format!("unexpected answer {shown}")))
            })
        }
        Ok(Err(e)) => Response::from_error(&Error::from(e)),
    }
}

/// A write that did not happen (or whose fate is unknown) as the client sees it: not the
/// leader, with its address, so the client asks it again under the same idempotency key.
fn replica_error(e: ReplicaError) -> Response {
    match e {
        ReplicaError::NotLeader { addr, .. } => Response::Error {
            code: codes::NOT_LEADER,
            message: protocol::not_leader_message(addr.as_deref()),
        },
        ReplicaError::Broker(e) => Response::from_error(&e),
        ReplicaError::Unconfirmed { after_ms } => Response::from_error(&Error::Timeout {
            what: "a majority of the cluster to commit the write (its fate is unknown)".into(),
            after_ms,
        }),
        ReplicaError::Raft(why) => Response::from_error(&Error::Invalid {
            what: "replicated write",
            reason: why,
        }),
    }
}
