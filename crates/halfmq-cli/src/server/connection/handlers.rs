//! Each request carried out on the broker, and its answer. Work that may block (sled, a
//! durable ack) runs on the blocking pool; sends and long polls are awaited on the broker's
//! async paths. Every request has room for its answer before it is carried out
//! ([`answer_room`]); a poll takes room for a whole frame only once there may be messages for
//! it, and gives it back while it waits.

use std::sync::Arc;
use std::time::Duration;

use halfmq::{
    Broker, Error, GroupSettings, HalfOptions, Message, NackOutcome, PollOptions, Receipt, Result,
    TagFilter, TxnId,
};
use halfmq_client::protocol::{codes, Request, Response, SendResult, WireGroup, WireMessage};

use super::super::blocking;
use super::{Answer, Conn, Stop};

/// Room taken for the answer of a request whose answer is small (a receipt, `Ok`, an
/// error): a larger one waits for the rest of its room before it is queued.
const SMALL_ANSWER_BYTES: usize = 4 * 1024;

/// Room taken per message for a batch's answer (a receipt, or a short error).
const BATCH_ANSWER_BYTES: usize = 64;

/// The room to take for `req`'s answer before carrying it out: a whole frame for the
/// answers that may be large, a little for the others, `None` for a poll (it takes its own
/// room, see [`handle`]).
pub(super) fn answer_room(req: &Request, frame_bytes_max: u32) -> Option<usize> {
    match req {
        Request::Poll { .. } | Request::Receive { .. } => None,
        Request::Stats
        | Request::ListTopics
        | Request::ListTxns { .. }
        | Request::DeadLetters { .. }
        | Request::Browse { .. }
        | Request::ReplayDeadLetters { .. }
        | Request::Retention
        | Request::Trace { .. } => Some(frame_bytes_max as usize),
        Request::SendBatch { messages, .. } => Some(
            (SMALL_ANSWER_BYTES + messages.len() * BATCH_ANSWER_BYTES)
                .min(frame_bytes_max as usize),
        ),
        _ => Some(SMALL_ANSWER_BYTES),
    }
}

fn result_response<T>(r: Result<T>, ok: impl FnOnce(T) -> Response) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(e) => Response::from_error(&e),
    }
}

/// A poll's answer: its deliveries in the wire form `W` that `answer` carries (`Poll` and
/// `Receive` differ only in that form), or the answer it failed with.
fn deliveries_response<W: From<halfmq::Delivery>>(
    r: std::result::Result<Vec<halfmq::Delivery>, Response>,
    answer: fn(Vec<W>) -> Response,
) -> Response {
    match r {
        Ok(ds) => answer(ds.into_iter().map(W::from).collect()),
        Err(resp) => resp,
    }
}

pub(super) async fn handle(
    conn: &Arc<Conn>,
    req: Request,
    stop: Stop,
    answer: &mut Answer,
) -> Response {
    let (req, b) = match &conn.replica {
        None => (req, conn.broker.clone()),
        // A node of a cluster: writes go through its log; its broker, replaced when it
        // installs a snapshot, answers the rest.
        Some(node) => match super::super::replicated::route(node, req).await {
            super::super::replicated::Routed::Answered(resp) => return resp,
            super::super::replicated::Routed::Local(req) => (req, node.broker()),
        },
    };
    match req {
        Request::ClusterStatus
        | Request::ClusterAddNode { .. }
        | Request::ClusterRemoveNode { .. } => Response::Error {
            code: codes::BAD_REQUEST,
            message: "this broker is not replicated (it was started without --peers)".into(),
        },
        Request::Hello { .. } => Response::Hello {
            server: format!("halfmq {}", env!("CARGO_PKG_VERSION")),
        },
        Request::Send { topic, message } => {
            let r = b.send_async(&topic, &Message::from(message)).await;
            result_response(r, Response::from)
        }
        Request::SendBatch { topic, messages } => send_batch(&b, topic, messages).await,
        Request::SendDelayed {
            topic,
            message,
            deliver_at_ms,
        } => result_response(
            b.send_delayed_async(&topic, &Message::from(message), deliver_at_ms)
                .await,
            Response::Delayed,
        ),
        Request::SendHalf {
            topic,
            message,
            producer_group,
            check_immunity_ms,
        } => {
            let opts = HalfOptions::from_check_immunity_ms(check_immunity_ms);
            let r = b
                .send_half_receipt_async(&topic, &Message::from(message), &producer_group, opts)
                .await;
            result_response(r, |h| Response::HalfSent {
                txn: h.txn.0,
                duplicate: h.duplicate,
            })
        }
        Request::Commit { txn } => {
            result_response(b.commit_async(TxnId(txn)).await, |()| Response::Ok)
        }
        Request::Rollback { txn } => {
            result_response(b.rollback_async(TxnId(txn)).await, |()| Response::Ok)
        }
        Request::Poll {
            group,
            topic,
            max,
            wait_ms,
        } => {
            let opts = PollOptions::default();
            let asked = (group.as_str(), topic.as_str(), &opts);
            let r = poll(&b, conn, answer, stop, asked, (max, wait_ms)).await;
            deliveries_response(r, Response::Messages)
        }
        Request::Receive {
            group,
            topic,
            max,
            wait_ms,
            lease_ms,
            filter,
        } => {
            let r = match TagFilter::parse(&filter) {
                Ok(filter) => {
                    let opts = PollOptions::default()
                        .with_lease(lease_ms.map(Duration::from_millis))
                        .with_filter(filter);
                    let asked = (group.as_str(), topic.as_str(), &opts);
                    poll(&b, conn, answer, stop, asked, (max, wait_ms)).await
                }
                Err(e) => Err(Response::from_error(&e)),
            };
            deliveries_response(r, Response::Received)
        }
        Request::AckReceipts {
            group,
            topic,
            receipts,
        } => result_response(
            blocking(move || {
                let rs = receipts
                    .iter()
                    .map(|r| Receipt::parse(r))
                    .collect::<Result<Vec<_>>>()?;
                b.ack_receipts(&group, &topic, &rs)
            })
            .await,
            |()| Response::Ok,
        ),
        Request::NackReceipt {
            group,
            topic,
            receipt,
            delay_ms,
        } => result_response(
            blocking(move || {
                let r = Receipt::parse(&receipt)?;
                b.nack_receipt(&group, &topic, &r, delay_ms.map(Duration::from_millis))
            })
            .await,
            Response::Nacked,
        ),
        Request::DeadLetterReceipt {
            group,
            topic,
            receipt,
            reason,
        } => result_response(
            blocking(move || {
                let r = Receipt::parse(&receipt)?;
                b.dead_letter_receipt(&group, &topic, &r, &reason)
            })
            .await,
            |dead_letter| Response::Nacked(NackOutcome::DeadLettered { dead_letter }),
        ),
        Request::ChangeLease {
            group,
            topic,
            receipt,
            lease_ms,
        } => result_response(
            blocking(move || {
                let r = Receipt::parse(&receipt)?;
                b.change_lease(&group, &topic, &r, Duration::from_millis(lease_ms))
            })
            .await,
            |r| Response::LeaseChanged {
                receipt: r.handle(),
            },
        ),
        Request::Ack { group, topic, acks } => result_response(
            blocking(move || b.ack_many(&group, &topic, &acks)).await,
            |()| Response::Ok,
        ),
        Request::Nack {
            group,
            topic,
            queue,
            offset,
            delay_ms,
        } => result_response(
            blocking(move || {
                b.nack(
                    &group,
                    &topic,
                    queue,
                    offset,
                    delay_ms.map(Duration::from_millis),
                )
            })
            .await,
            Response::Nacked,
        ),
        Request::DeadLetters { group, from, max } => {
            // As many as fit in a frame: a dead letter's listing is small (no body).
            let max = (max as usize).clamp(1, 10_000);
            result_response(
                blocking(move || b.dead_letters(&group, from, max)).await,
                Response::DeadLetters,
            )
        }
        Request::ReplayDeadLetters { group, max } => {
            let max = (max as usize).clamp(1, 10_000);
            result_response(
                blocking(move || b.replay_dead_letters(&group, max)).await,
                Response::Replayed,
            )
        }
        Request::SetGroup { group, settings } => result_response(
            blocking(move || {
                // This request cannot carry the FIFO override: it keeps the one in force.
                let fifo = b.group_settings(&group)?.1.fifo;
                let settings = GroupSettings { fifo, ..settings };
                b.set_group_settings(&group, &settings)
                    .map(|d| WireGroup::new(&d, settings))
            })
            .await,
            Response::Group,
        ),
        Request::SetGroupSettings {
            group,
            settings,
            fifo,
        } => result_response(
            blocking(move || {
                let settings = GroupSettings { fifo, ..settings };
                b.set_group_settings(&group, &settings)
                    .map(|d| Response::group_settings(&d, settings))
            })
            .await,
            |r| r,
        ),
        Request::GetGroupSettings { group } => result_response(
            blocking(move || {
                b.group_settings(&group)
                    .map(|(d, s)| Response::group_settings(&d, s))
            })
            .await,
            |r| r,
        ),
        Request::DeleteGroup { group } => result_response(
            blocking(move || b.delete_group(&group)).await,
            Response::GroupDeleted,
        ),
        Request::GetGroup { group } => result_response(
            blocking(move || b.group_settings(&group).map(|(d, s)| WireGroup::new(&d, s))).await,
            Response::Group,
        ),
        Request::CreateTopic { name, queues } => result_response(
            blocking(move || b.create_topic(&name, queues)).await,
            |_| Response::Ok,
        ),
        Request::Browse {
            topic,
            queue,
            from,
            max,
        } => {
            let max = (max as usize).clamp(1, POLL_MESSAGES_MAX);
            // As many as fit in a frame (at least one), as a poll's answer.
            let room = (conn.config.frame_bytes_max as usize).saturating_sub(64 * 1024);
            let r = blocking(move || b.browse(&topic, queue, from, max)).await;
            let r = r.map(|mut got| {
                let mut bytes = 0;
                let fit = got
                    .iter()
                    .position(|d| {
                        bytes += d.key.len() + d.body.len() + d.topic.len() + 64;
                        bytes += d
                            .properties
                            .iter()
                            .map(|(k, v)| k.len() + v.len() + 16)
                            .sum::<usize>();
                        bytes > room
                    })
                    .map_or(got.len(), |i| i.max(1));
                got.truncate(fit);
                got
            });
            deliveries_response(r.map_err(|e| Response::from_error(&e)), Response::Messages)
        }
        Request::ListTopics => {
            Response::Topics(b.topics().into_iter().map(|t| (t.name, t.queues)).collect())
        }
        Request::Retention => {
            let r = blocking(move || b.enforce_retention())
                .await
                .and_then(|rep| {
                    serde_json::to_string(&rep).map_err(|e| Error::Invalid {
                        what: "retention report",
                        reason: e.to_string(),
                    })
                });
            result_response(r, Response::Retention)
        }
        Request::Stats => {
            let r = blocking(move || b.stats()).await.and_then(|s| {
                serde_json::to_string(&s).map_err(|e| Error::Invalid {
                    what: "stats",
                    reason: e.to_string(),
                })
            });
            result_response(r, Response::Stats)
        }
        Request::ListTxns { state, after, max } => {
            // One page: ids from `after` on, as many as fit in a frame.
            let room = conn.config.frame_bytes_max as usize - 64 * 1024;
            let mut bytes = 0;
            let mut page = Vec::new();
            for t in b
                .transactions(state)
                .into_iter()
                .filter(|t| t.txn_id >= after)
            {
                let size = t.topic.len()
                    + t.key.len()
                    + t.producer_group.len()
                    + t.last_answer.as_ref().map_or(0, String::len)
                    + 96;
                if page.len() >= max.clamp(1, 10_000) as usize
                    || (!page.is_empty() && bytes + size > room)
                {
                    break;
                }
                bytes += size;
                page.push(t);
            }
            Response::Txns(page)
        }
        Request::TxnState { txn } => result_response(
            blocking(move || b.transaction_state(TxnId(txn))).await,
            Response::TxnState,
        ),
        Request::Rearm { txn } => {
            result_response(blocking(move || b.rearm(TxnId(txn))).await, |()| {
                Response::Ok
            })
        }
        Request::RegisterChecker { producer_group } => conn.register_checker(producer_group),
        Request::CheckAnswer { .. } => Response::Error {
            code: codes::BAD_REQUEST,
            message: "CheckAnswer is handled by the connection".into(),
        },
        Request::Trace { key } => {
            // Room for the frame's own header and the response envelope.
            let room = (conn.config.frame_bytes_max as usize).saturating_sub(64 * 1024);
            let r = blocking(move || b.trace(&key)).await.and_then(|t| {
                let text = serde_json::to_string(&t).map_err(|e| Error::Invalid {
                    what: "trace",
                    reason: e.to_string(),
                })?;
                if text.len() > room {
                    return Err(Error::Invalid {
                        what: "trace",
                        reason: format!(
                            "{} messages with this key do not fit in one answer ({} bytes); \
                             use `halfmq trace KEY --data-dir` on a stopped broker",
                            t.messages.len(),
                            text.len()
                        ),
                    });
                }
                Ok(text)
            });
            result_response(r, Response::Trace)
        }
    }
}

/// A batch of sends: one answer per message, or one error for the whole batch.
async fn send_batch(b: &halfmq::Broker, topic: String, messages: Vec<WireMessage>) -> Response {
    let msgs: Vec<Message> = messages.into_iter().map(Message::from).collect();
    match b.send_batch_async(&topic, &msgs).await {
        Ok(outcomes) => Response::SentBatch {
            topic,
            results: outcomes.iter().map(SendResult::from_outcome).collect(),
        },
        Err(e) => Response::from_error(&e),
    }
}

/// A long poll on `b` (the connection's broker, or a replicated node's current one: a node
/// that installs a snapshot replaces its broker): wait (holding no room) until there may be
/// messages, take room for a whole answer, then hand out what fits. A client that does not read its answers is handed
/// nothing more. It ends early, empty, when the server stops or the connection is cut; the
/// waits are its only await points, so nothing has been handed out when it is cut short.
/// `max` and `wait_ms` are the request's, cut here to [`POLL_MESSAGES_MAX`] and
/// [`POLL_WAIT_MS_MAX`] (the same for `Poll` and `Receive`).
async fn poll(
    b: &Broker,
    conn: &Conn,
    answer: &mut Answer,
    mut stop: Stop,
    (group, topic, opts): (&str, &str, &PollOptions),
    (max, wait_ms): (u32, u64),
) -> std::result::Result<Vec<halfmq::Delivery>, Response> {
    let max = (max as usize).min(POLL_MESSAGES_MAX);
    let wait = Duration::from_millis(wait_ms.min(POLL_WAIT_MS_MAX));
    let room = conn.config.frame_bytes_max as usize;
    let max_bytes = room - 64 * 1024;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if max == 0 || stop.is_stopped() || !answer.reserve(room).await {
            return Ok(Vec::new());
        }
        let got = match &conn.replica {
            None => b
                .poll_limited_with(group, topic, max, max_bytes, opts)
                .map_err(|e| Response::from_error(&e))?,
            // A node of a cluster (the leader: `replicated::route` let the poll through):
            // failed deliveries are settled through the log first.
            Some(node) => {
                let asked = (group, topic, opts);
                match super::super::replicated::poll(node, b, asked, (max, max_bytes)).await? {
                    Some(got) => got,
                    None => {
                        answer.release();
                        continue;
                    }
                }
            }
        };
        let now = tokio::time::Instant::now();
        if !got.is_empty() || now >= deadline {
            return Ok(got);
        }
        answer.release();
        tokio::select! {
            r = b.wait_for_poll_async(group, topic, deadline - now) => {
                r.map_err(|e| Response::from_error(&e))?;
            }
            () = stop.stopped() => {}
        }
    }
}

/// Most messages one poll answer carries.
const POLL_MESSAGES_MAX: usize = 10_000;

/// Longest a poll waits for a message, ms (a longer `wait_ms` is cut to this).
const POLL_WAIT_MS_MAX: u64 = 60_000;
