//! The consumer calls: ReceiveMessage (a long poll of the group's `poll`, leased for the
//! invisible duration, filtered by tag), AckMessage (`ack_receipts`), ChangeInvisibleDuration
//! (`change_lease`), ForwardMessageToDeadLetterQueue (`dead_letter_receipt`) and
//! QueryAssignment. Receipt handles are the broker's receipts: opaque, bound to one lease and
//! tamper-evident.

use std::time::Duration;

use halfmq::lease::{validate_lease, LEASE_MIN};
use halfmq::{Delivery, PollOptions, Receipt, TagFilter};

use crate::convert;
use crate::pb::{self, receive_message_response::Content, Code, FilterType};
use crate::renew::AUTO_RENEW_LEASE_MIN;
use crate::service::{name_of, overall, resource, Service};
use crate::status::{of_error, ok, status, unsupported};

/// Most messages one receive hands out.
const BATCH_MAX: i32 = 1024;

/// Most bytes of messages one receive hands out (at least one message is handed out, however
/// large): a batch of large messages is cut here rather than held in memory whole.
const RECEIVE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// How long a receive waits for a message when the client does not say.
const LONG_POLL_DEFAULT: Duration = Duration::from_secs(20);

/// The longest a receive waits for a message.
const LONG_POLL_MAX: Duration = Duration::from_secs(60);

/// The tag filter of a receive's filter expression, or the status refusing it.
fn tag_filter(f: Option<&pb::FilterExpression>) -> Result<TagFilter, pb::Status> {
    let Some(f) = f else {
        return Ok(TagFilter::All);
    };
    let expr = f.expression.trim();
    match FilterType::try_from(f.r#type).unwrap_or(FilterType::Unspecified) {
        FilterType::Sql => Err(unsupported(
            "SQL92 filter expressions are not supported; filter by tag (`a || b`, or `*`)",
        )),
        FilterType::Tag => TagFilter::parse(expr).map_err(|e| of_error(&e)),
        FilterType::Unspecified if expr.is_empty() || expr == "*" => Ok(TagFilter::All),
        FilterType::Unspecified => Err(status(
            Code::IllegalFilterExpression,
            "a filter expression without a type",
        )),
    }
}

/// The lease a receive asks for (its invisible duration); `None`: the group's visibility
/// timeout.
fn lease_asked(asked: Option<prost_types::Duration>) -> Result<Option<Duration>, pb::Status> {
    let Some(asked) = asked else {
        return Ok(None);
    };
    let d = Duration::try_from(asked).map_err(|_| {
        status(
            Code::IllegalInvisibleTime,
            "invisible_duration is negative or invalid",
        )
    })?;
    validate_lease(d).map_err(|e| of_error(&e))?;
    Ok(Some(d))
}

/// How long a receive waits: a little less than the client's long-polling time-out (its own
/// deadline is the same time-out), at most [`LONG_POLL_MAX`].
fn long_poll(asked: Option<prost_types::Duration>) -> Result<Duration, pb::Status> {
    let d = match asked {
        None => return Ok(LONG_POLL_DEFAULT),
        Some(d) => Duration::try_from(d).map_err(|_| {
            status(
                Code::IllegalPollingTime,
                "long_polling_timeout is negative or invalid",
            )
        })?,
    };
    Ok((d * 4 / 5).min(LONG_POLL_MAX))
}

/// A receipt handle a client sent back, as the broker's receipt.
fn receipt(handle: &str) -> Result<Receipt, pb::Status> {
    Receipt::parse(handle).map_err(|e| of_error(&e))
}

/// The group and topic of a request about messages a consumer holds.
fn group_and_topic<'a>(
    group: Option<&'a pb::Resource>,
    topic: Option<&'a pb::Resource>,
) -> Result<(&'a str, &'a str), pb::Status> {
    let group = name_of(group, "consumer group", Code::IllegalConsumerGroup)?;
    Ok((group, name_of(topic, "topic", Code::IllegalTopic)?))
}

fn receive_status(s: pb::Status) -> Vec<pb::ReceiveMessageResponse> {
    vec![pb::ReceiveMessageResponse {
        content: Some(Content::Status(s)),
    }]
}

impl Service {
    /// The receipt a client settles a message with: the newest of its lease if the endpoint
    /// renews it (renewal stops), or the handle's own.
    fn settled_receipt(&self, handle: &str) -> Result<Receipt, pb::Status> {
        match self.renewals.settle(handle) {
            Some(r) => Ok(r),
            None => receipt(handle),
        }
    }

    /// The group, topic and receipt of a request settling one message a consumer holds.
    fn held<'a>(
        &self,
        group: Option<&'a pb::Resource>,
        topic: Option<&'a pb::Resource>,
        handle: &str,
    ) -> Result<(&'a str, &'a str, Receipt), pb::Status> {
        let (group, topic) = group_and_topic(group, topic)?;
        Ok((group, topic, self.settled_receipt(handle)?))
    }

    /// A ReceiveMessage of `client`: checks, the long poll, and the answer stream's items.
    pub(crate) async fn receive(
        &self,
        client: Option<&str>,
        req: pb::ReceiveMessageRequest,
    ) -> Vec<pb::ReceiveMessageResponse> {
        match self.receive_checked(client, req).await {
            Ok(items) => items,
            Err(s) => receive_status(s),
        }
    }

    async fn receive_checked(
        &self,
        client: Option<&str>,
        req: pb::ReceiveMessageRequest,
    ) -> Result<Vec<pb::ReceiveMessageResponse>, pb::Status> {
        // Renewal lasts while the client is alive, which needs its id.
        let renew_for = match (req.auto_renew, client) {
            (false, _) => None,
            (true, Some(c)) => Some(c),
            (true, None) => {
                return Err(status(
                    Code::ClientIdRequired,
                    "auto_renew needs the x-mq-client-id header: leases are renewed while that client is alive",
                ))
            }
        };
        let group = name_of(
            req.group.as_ref(),
            "consumer group",
            Code::IllegalConsumerGroup,
        )?;
        let topic = req.message_queue.as_ref().and_then(|q| q.topic.as_ref());
        let topic = name_of(topic, "topic", Code::IllegalTopic)?;
        let filter = tag_filter(req.filter_expression.as_ref())?;
        if !(1..=BATCH_MAX).contains(&req.batch_size) {
            return Err(status(
                Code::BadRequest,
                format!("batch_size {} is outside 1 ..= {BATCH_MAX}", req.batch_size),
            ));
        }
        let lease = match lease_asked(req.invisible_duration)? {
            Some(d) => d,
            None => {
                let (delivery, _) = self
                    .broker
                    .group_settings(group)
                    .map_err(|e| of_error(&e))?;
                delivery.visibility_timeout
            }
        };
        let lease = match renew_for {
            Some(_) => lease.max(AUTO_RENEW_LEASE_MIN),
            None => lease,
        };
        let opts = PollOptions::default()
            .with_lease(Some(lease))
            .with_filter(filter);
        let wait = long_poll(req.long_polling_timeout)?;
        let max = req.batch_size as usize;
        let got = self
            .broker
            .poll_wait_with_async(group, topic, max, RECEIVE_BYTES_MAX, wait, &opts)
            .await
            .map_err(|e| of_error(&e))?;
        if got.is_empty() {
            return Err(status(Code::MessageNotFound, "no new message"));
        }
        let mut items = Vec::with_capacity(got.len() + 2);
        items.push(pb::ReceiveMessageResponse {
            content: Some(Content::Status(ok())),
        });
        items.push(pb::ReceiveMessageResponse {
            content: Some(Content::DeliveryTimestamp(convert::timestamp(now_ms()))),
        });
        for d in got {
            let renewed = d.receipt.zip(renew_for);
            let m = self.delivered(d, lease)?;
            if let Some((r, client)) = renewed {
                let with = (&self.broker, &self.clients);
                let held = (r.handle(), r);
                // Beyond the most renewed at once, the message keeps its lease alone.
                let _ = self
                    .renewals
                    .start(with, (group, topic), held, (client, lease));
            }
            items.push(pb::ReceiveMessageResponse {
                content: Some(Content::Message(m)),
            });
        }
        Ok(items)
    }

    /// A delivery as a RocketMQ message, with its receipt handle.
    fn delivered(&self, d: Delivery, lease: Duration) -> Result<pb::Message, pb::Status> {
        // A poll's deliveries carry their receipt; without one the message could not be
        // acked, so the receive fails (the message comes again when its lease runs out).
        let handle = d.receipt.map(|r| r.handle()).ok_or_else(|| {
            status(
                Code::InternalServerError,
                "halfmq: a delivery came without its receipt",
            )
        })?;
        let extra = pb::SystemProperties {
            receipt_handle: Some(handle),
            queue_id: d.queue as i32,
            queue_offset: i64::try_from(d.offset).ok(),
            store_timestamp: Some(convert::timestamp(d.timestamp_ms)),
            store_host: self.local_addr.to_string(),
            invisible_duration: Some(convert::duration(lease)),
            delivery_attempt: i32::try_from(d.attempt).ok(),
            ..pb::SystemProperties::default()
        };
        let Delivery {
            topic,
            key,
            body,
            properties,
            log_offset,
            ..
        } = d;
        Ok(convert::outgoing(
            &topic,
            (&key, body, &properties),
            log_offset,
            extra,
        ))
    }

    /// An AckMessage: each entry acked durably by its receipt, each with its own status.
    pub(crate) async fn ack(&self, req: pb::AckMessageRequest) -> pb::AckMessageResponse {
        let (group, topic) = match group_and_topic(req.group.as_ref(), req.topic.as_ref()) {
            Ok(gt) => gt,
            Err(s) => {
                return pb::AckMessageResponse {
                    status: Some(s),
                    entries: vec![],
                }
            }
        };
        if req.entries.is_empty() {
            return pb::AckMessageResponse {
                status: Some(status(Code::BadRequest, "AckMessage with no entries")),
                entries: vec![],
            };
        }
        let receipts: Vec<_> = req
            .entries
            .iter()
            .map(|e| self.settled_receipt(&e.receipt_handle))
            .collect();
        // Several entries are acked with one durable write; if that fails (it is all or
        // nothing), each is acked on its own below, so that each gets its own status.
        let all: Option<Vec<Receipt>> = receipts.iter().map(|r| r.as_ref().ok().copied()).collect();
        let together = match all {
            Some(all) if all.len() > 1 => self
                .broker
                .ack_receipts_async(group, topic, &all)
                .await
                .is_ok(),
            _ => false,
        };
        let mut entries = Vec::with_capacity(req.entries.len());
        for (e, r) in req.entries.iter().zip(receipts) {
            let result = match r {
                _ if together => Ok(()),
                Ok(r) => self
                    .broker
                    .ack_receipt_async(group, topic, &r)
                    .await
                    .map_err(|err| of_error(&err)),
                Err(s) => Err(s),
            };
            entries.push(pb::AckMessageResultEntry {
                message_id: e.message_id.clone(),
                receipt_handle: e.receipt_handle.clone(),
                status: Some(result.err().unwrap_or_else(ok)),
            });
        }
        let status = overall(entries.iter().filter_map(|e| e.status.as_ref()));
        pb::AckMessageResponse {
            status: Some(status),
            entries,
        }
    }

    /// A ChangeInvisibleDuration: the lease now runs out the duration from now, longer or
    /// shorter than before (shorter than the broker's shortest lease, 10 ms, it is that). Not
    /// a failed delivery: the attempt number stays (a lease that then runs out is a failure,
    /// as any). The answer's handle is the new lease's; the old one is stale.
    pub(crate) async fn change_invisible(
        &self,
        req: pb::ChangeInvisibleDurationRequest,
    ) -> pb::ChangeInvisibleDurationResponse {
        let (status, receipt_handle) = match self.change_invisible_checked(&req) {
            Ok(handle) => (ok(), handle),
            Err(s) => (s, String::new()),
        };
        pb::ChangeInvisibleDurationResponse {
            status: Some(status),
            receipt_handle,
        }
    }

    fn change_invisible_checked(
        &self,
        req: &pb::ChangeInvisibleDurationRequest,
    ) -> Result<String, pb::Status> {
        let (group, topic, r) =
            self.held(req.group.as_ref(), req.topic.as_ref(), &req.receipt_handle)?;
        let d = req
            .invisible_duration
            .and_then(|d| Duration::try_from(d).ok())
            .ok_or_else(|| {
                status(
                    Code::IllegalInvisibleTime,
                    "invisible_duration is missing, negative or invalid",
                )
            })?;
        // Leases are in memory: the change writes nothing and does not wait.
        let new = self
            .broker
            .change_lease(group, topic, &r, d.max(LEASE_MIN))
            .map_err(|e| of_error(&e))?;
        Ok(new.handle())
    }

    /// A ForwardMessageToDeadLetterQueue, which a client sends when it gives up on a
    /// message (its last attempt failed): the message moves to `%DLQ%<group>` now, whatever
    /// its attempt, durably; the delivery counts as failed.
    pub(crate) async fn forward_to_dead_letters(
        &self,
        req: pb::ForwardMessageToDeadLetterQueueRequest,
    ) -> Result<(), pb::Status> {
        let (group, topic, r) =
            self.held(req.group.as_ref(), req.topic.as_ref(), &req.receipt_handle)?;
        let reason = format!(
            "forwarded by the RocketMQ client at delivery {} of {}",
            req.delivery_attempt, req.max_delivery_attempts
        );
        self.broker
            .dead_letter_receipt_async(group, topic, &r, &reason)
            .await
            .map(drop)
            .map_err(|e| of_error(&e))
    }

    /// A QueryAssignment: one assignment standing for the whole topic (a receive polls all
    /// its queues for the group).
    pub(crate) async fn assignment(
        &self,
        req: pb::QueryAssignmentRequest,
    ) -> pb::QueryAssignmentResponse {
        let checked = name_of(
            req.group.as_ref(),
            "consumer group",
            Code::IllegalConsumerGroup,
        )
        .and_then(|_| name_of(req.topic.as_ref(), "topic", Code::IllegalTopic));
        let topic = match checked {
            Ok(t) => t.to_owned(),
            Err(s) => {
                return pb::QueryAssignmentResponse {
                    status: Some(s),
                    assignments: vec![],
                }
            }
        };
        match self.queues_of(&topic).await {
            Ok(_) => {
                let mut queues = self.message_queues(&topic, 1, req.endpoints);
                for q in &mut queues {
                    q.topic = Some(resource(&topic));
                }
                pb::QueryAssignmentResponse {
                    status: Some(ok()),
                    assignments: queues
                        .into_iter()
                        .map(|q| pb::Assignment {
                            message_queue: Some(q),
                        })
                        .collect(),
                }
            }
            Err(s) => pb::QueryAssignmentResponse {
                status: Some(s),
                assignments: vec![],
            },
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(kind: FilterType, expr: &str) -> pb::FilterExpression {
        pb::FilterExpression {
            r#type: kind as i32,
            expression: expr.into(),
        }
    }

    #[test]
    fn tag_expressions_become_tag_filters_and_sql92_is_refused() {
        let all = |f: Option<&pb::FilterExpression>| tag_filter(f).expect("valid").is_all();
        assert!(all(None));
        assert!(all(Some(&filter(FilterType::Tag, "*"))));
        assert!(all(Some(&filter(FilterType::Tag, " "))));
        assert!(all(Some(&filter(FilterType::Unspecified, ""))));
        let f = tag_filter(Some(&filter(FilterType::Tag, "a || b"))).expect("valid");
        assert!(f.matches(Some("a")) && f.matches(Some("b")));
        assert!(!f.matches(Some("c")) && !f.matches(None));
        let e = tag_filter(Some(&filter(FilterType::Tag, "a ||"))).unwrap_err();
        assert_eq!(e.code, Code::IllegalFilterExpression as i32);
        let e = tag_filter(Some(&filter(FilterType::Unspecified, "a"))).unwrap_err();
        assert_eq!(e.code, Code::IllegalFilterExpression as i32);
        let e = tag_filter(Some(&filter(FilterType::Sql, "a > 1"))).unwrap_err();
        assert_eq!(e.code, Code::Unsupported as i32);
        assert!(e.message.contains("SQL92"), "{}", e.message);
    }

    #[test]
    fn the_invisible_duration_is_the_lease_within_the_brokers_bounds() {
        assert_eq!(lease_asked(None).expect("valid"), None);
        let d = Duration::from_secs(15);
        assert_eq!(
            lease_asked(Some(convert::duration(d))).expect("valid"),
            Some(d)
        );
        for bad in [Duration::ZERO, Duration::from_secs(2 * 24 * 3600)] {
            let e = lease_asked(Some(convert::duration(bad))).unwrap_err();
            assert_eq!(e.code, Code::IllegalInvisibleTime as i32, "{bad:?}");
        }
    }

    #[test]
    fn the_long_poll_ends_before_the_clients_deadline() {
        let asked = convert::duration(Duration::from_secs(10));
        assert_eq!(
            long_poll(Some(asked)).expect("valid"),
            Duration::from_secs(8)
        );
        let bad = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert_eq!(
            long_poll(Some(bad)).unwrap_err().code,
            Code::IllegalPollingTime as i32
        );
        assert_eq!(long_poll(None).expect("default"), LONG_POLL_DEFAULT);
    }
}
