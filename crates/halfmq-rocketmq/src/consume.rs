//! The consumer calls: ReceiveMessage (a long poll of the group's `poll`), AckMessage (`ack`),
//! ChangeInvisibleDuration (`nack` with a delay) and QueryAssignment.

use std::time::Duration;

use halfmq::{Delivery, NackOutcome};

use crate::convert::{self, Handle};
use crate::pb::{self, receive_message_response::Content, Code, FilterType};
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

/// Whether a filter expression lets every message through, or the status refusing it.
fn check_filter(f: Option<&pb::FilterExpression>) -> Result<(), pb::Status> {
    let Some(f) = f else { return Ok(()) };
    let expr = f.expression.trim();
    match FilterType::try_from(f.r#type).unwrap_or(FilterType::Unspecified) {
        FilterType::Sql => Err(unsupported(
            "SQL92 filter expressions are not supported; subscribe with the TAG expression `*`",
        )),
        _ if expr.is_empty() || expr == "*" => Ok(()),
        FilterType::Tag => Err(unsupported(&format!(
            "tag filters other than `*` are not supported yet (asked for `{}`); subscribe with `*` and filter in the consumer",
            expr.chars().take(128).collect::<String>()
        ))),
        FilterType::Unspecified => Err(status(
            Code::IllegalFilterExpression,
            "a filter expression without a type",
        )),
    }
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

/// The group, topic and receipt handle of a request about one message a consumer holds.
fn held<'a>(
    group: Option<&'a pb::Resource>,
    topic: Option<&'a pb::Resource>,
    handle: &str,
) -> Result<(&'a str, &'a str, Handle), pb::Status> {
    let group = name_of(group, "consumer group", Code::IllegalConsumerGroup)?;
    let topic = name_of(topic, "topic", Code::IllegalTopic)?;
    Ok((group, topic, Handle::decode(handle)?))
}

fn receive_status(s: pb::Status) -> Vec<pb::ReceiveMessageResponse> {
    vec![pb::ReceiveMessageResponse {
        content: Some(Content::Status(s)),
    }]
}

impl Service {
    /// A ReceiveMessage: checks, the long poll, and the answer stream's items.
    pub(crate) async fn receive(
        &self,
        req: pb::ReceiveMessageRequest,
    ) -> Vec<pb::ReceiveMessageResponse> {
        match self.receive_checked(req).await {
            Ok(items) => items,
            Err(s) => receive_status(s),
        }
    }

    async fn receive_checked(
        &self,
        req: pb::ReceiveMessageRequest,
    ) -> Result<Vec<pb::ReceiveMessageResponse>, pb::Status> {
        let group = name_of(
            req.group.as_ref(),
            "consumer group",
            Code::IllegalConsumerGroup,
        )?;
        let topic = req.message_queue.as_ref().and_then(|q| q.topic.as_ref());
        let topic = name_of(topic, "topic", Code::IllegalTopic)?;
        check_filter(req.filter_expression.as_ref())?;
        if !(1..=BATCH_MAX).contains(&req.batch_size) {
            return Err(status(
                Code::BadRequest,
                format!("batch_size {} is outside 1 ..= {BATCH_MAX}", req.batch_size),
            ));
        }
        let (delivery, _) = self
            .broker
            .group_settings(group)
            .map_err(|e| of_error(&e))?;
        let lease = delivery.visibility_timeout;
        if let Some(asked) = req.invisible_duration {
            let asked = Duration::try_from(asked).ok();
            if asked.map(|d| d.as_millis()) != Some(lease.as_millis()) {
                return Err(status(
                    Code::IllegalInvisibleTime,
                    format!(
                        "halfmq: per-request invisible durations are not supported yet: group `{group}` leases messages for {lease:?} (its visibility timeout); receive with invisible_duration {lease:?}, or change the group's visibility_timeout_ms"
                    ),
                ));
            }
        }
        let wait = long_poll(req.long_polling_timeout)?;
        let max = req.batch_size as usize;
        let got = self
            .broker
            .poll_wait_async(group, topic, max, RECEIVE_BYTES_MAX, wait)
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
            let m = self.delivered(d, lease);
            items.push(pb::ReceiveMessageResponse {
                content: Some(Content::Message(m)),
            });
        }
        Ok(items)
    }

    /// A delivery as a RocketMQ message, with its receipt handle.
    fn delivered(&self, d: Delivery, lease: Duration) -> pb::Message {
        let handle = Handle::of(&d).encode();
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
        convert::outgoing(&topic, (&key, body, &properties), log_offset, extra)
    }

    /// An AckMessage: each entry acked durably, each with its own status.
    pub(crate) async fn ack(&self, req: pb::AckMessageRequest) -> pb::AckMessageResponse {
        let checked = name_of(
            req.group.as_ref(),
            "consumer group",
            Code::IllegalConsumerGroup,
        )
        .and_then(|g| Ok((g, name_of(req.topic.as_ref(), "topic", Code::IllegalTopic)?)));
        let (group, topic) = match checked {
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
        let mut entries = Vec::with_capacity(req.entries.len());
        for e in &req.entries {
            let result = match Handle::decode(&e.receipt_handle) {
                Ok(h) => self
                    .broker
                    .ack_async(group, topic, h.queue, h.offset)
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

    /// A ChangeInvisibleDuration: the message is given back (a nack) and comes again after the
    /// duration. This counts as a failed delivery, as a RocketMQ consumer's nack does;
    /// renewing a lease without a failure is not possible yet.
    pub(crate) async fn change_invisible(
        &self,
        req: pb::ChangeInvisibleDurationRequest,
    ) -> pb::ChangeInvisibleDurationResponse {
        let s = match self.change_invisible_checked(&req).await {
            Ok(handle) => {
                return pb::ChangeInvisibleDurationResponse {
                    status: Some(ok()),
                    receipt_handle: handle,
                }
            }
            Err(s) => s,
        };
        pb::ChangeInvisibleDurationResponse {
            status: Some(s),
            receipt_handle: String::new(),
        }
    }

    async fn change_invisible_checked(
        &self,
        req: &pb::ChangeInvisibleDurationRequest,
    ) -> Result<String, pb::Status> {
        let (group, topic, h) = held(req.group.as_ref(), req.topic.as_ref(), &req.receipt_handle)?;
        let d = req
            .invisible_duration
            .and_then(|d| Duration::try_from(d).ok())
            .ok_or_else(|| {
                status(
                    Code::IllegalInvisibleTime,
                    "invisible_duration is missing, negative or invalid",
                )
            })?;
        let outcome = self
            .broker
            .nack_async(group, topic, h.queue, h.offset, Some(d))
            .await
            .map_err(|e| of_error(&e))?;
        match outcome {
            NackOutcome::Redeliver { attempt, .. } => Ok(Handle { attempt, ..h }.encode()),
            // Past the group's max_retries: it is a dead letter now, no handle to give.
            NackOutcome::DeadLettered { dead_letter } => {
                tracing::info!(group, topic, dead_letter = %dead_letter.topic, "ChangeInvisibleDuration dead-lettered the message");
                Ok(String::new())
            }
        }
    }

    /// A ForwardMessageToDeadLetterQueue, which a client sends when a message failed its last
    /// attempt. halfmq dead-letters a message when a failure passes the group's
    /// `max_retries`: the last attempt's failure is recorded (a nack) and moves it to
    /// `%DLQ%<group>`. Asked earlier, nothing is done and the answer says so (dead-lettering
    /// before the group's last attempt is not supported yet).
    pub(crate) async fn forward_to_dead_letters(
        &self,
        req: pb::ForwardMessageToDeadLetterQueueRequest,
    ) -> Result<(), pb::Status> {
        let (group, topic, h) = held(req.group.as_ref(), req.topic.as_ref(), &req.receipt_handle)?;
        let (delivery, _) = self
            .broker
            .group_settings(group)
            .map_err(|e| of_error(&e))?;
        let early = |attempt: u32| {
            unsupported(&format!(
                "dead-lettering before the group's last attempt is not supported yet: group `{group}` dead-letters a message after {} failed deliveries, and this is delivery {attempt}",
                delivery.max_retries
            ))
        };
        if h.attempt <= delivery.max_retries {
            return Err(early(h.attempt));
        }
        let outcome = self
            .broker
            .nack_async(group, topic, h.queue, h.offset, None)
            .await
            .map_err(|e| of_error(&e))?;
        match outcome {
            NackOutcome::DeadLettered { .. } => Ok(()),
            // The handle claimed a later attempt than the message had: it was given back.
            NackOutcome::Redeliver { attempt, .. } => Err(early(attempt.saturating_sub(1))),
        }
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
    fn only_filters_that_pass_everything_are_served() {
        assert!(check_filter(None).is_ok());
        assert!(check_filter(Some(&filter(FilterType::Tag, "*"))).is_ok());
        assert!(check_filter(Some(&filter(FilterType::Tag, " "))).is_ok());
        let e = check_filter(Some(&filter(FilterType::Tag, "a || b"))).unwrap_err();
        assert_eq!(e.code, Code::Unsupported as i32);
        assert!(e.message.contains("a || b"), "{}", e.message);
        let e = check_filter(Some(&filter(FilterType::Sql, "a > 1"))).unwrap_err();
        assert!(e.message.contains("SQL92"), "{}", e.message);
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
