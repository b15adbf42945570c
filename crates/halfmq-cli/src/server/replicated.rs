//! The requests of a broker that is one node of a replicated cluster (`halfmq broker
//! --peers`): writes go through the cluster's raft log ([`ReplicaNode`]) and are answered
//! once a majority has them fsynced; a node that is not the leader answers
//! [`codes::NOT_LEADER`] with the leader's client address. Reads are answered by the node's
//! own broker.
//!
//! Replicated today: `Send`, `SendBatch`, `SendHalf`, `SendDelayed` (fired by the leader
//! through the log), `Commit`, `Rollback`, `Rearm`, `Ack`, `SetGroup`, `SetGroupSettings`,
//! `CreateTopic`, and check-back: `RegisterChecker` is taken by the leader only (it alone
//! asks checkers, and proposes what each check found through the log, see
//! `halfmq_raft::checkback`). The other writes (nacks, receipts, dead letters, group
//! deletion, retention) would change one node's broker alone, so a
//! replicated node refuses them with [`codes::BAD_REQUEST`] until they are carried by the
//! log.

use std::sync::Arc;

use halfmq::{
    DeliveryConfig, Error, GroupSettings, HalfOptions, Message, TransactionChecker, TxnId,
};
use halfmq_client::protocol::{self, codes, Request, Response, SendResult, WireGroup};
use halfmq_raft::{Applied, Command, MessageData, Outcome, ReplicaError, ReplicaNode};

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
                    Some(Ok(s)) => Response::Sent {
                        topic: s.topic,
                        queue: s.queue,
                        offset: s.offset,
                        log_offset: s.log_offset,
                        duplicate: s.duplicate,
                    },
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
        Request::Nack { .. }
        | Request::ReplayDeadLetters { .. }
        | Request::Retention
        | Request::DeleteGroup { .. }
        | Request::AckReceipts { .. }
        | Request::NackReceipt { .. }
        | Request::ChangeLease { .. }
        | Request::DeadLetterReceipt { .. } => Response::Error {
            code: codes::BAD_REQUEST,
            message: "a replicated broker does not carry this request yet (only sends, \
                      delayed sends, halves, commits, rollbacks, re-arms, acks, group \
                      settings, topic creation and check-back go through its log)"
                .into(),
        },
        other => return Routed::Local(other),
    })
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
