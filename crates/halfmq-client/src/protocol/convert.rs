//! Between the wire structs and the types users see (`halfmq-types`, the same embedded and
//! over the network). The broker converts one way and the client the other, with these same
//! functions, so the two cannot drift apart.

use std::time::Duration;

use halfmq_types::error::{Error, Result};
use halfmq_types::{
    Delivery, DeliveryConfig, GroupSettings, HalfMessage, Message, Receipt, SendReceipt, TopicInfo,
    TxnId,
};

use super::{Push, Response, SendResult, WireDelivery, WireGroup, WireMessage, WireReceived};

impl SendResult {
    /// One message's outcome of a batch send, as the broker answers it.
    pub fn from_outcome(r: &Result<SendReceipt>) -> SendResult {
        match r {
            Ok(s) => SendResult::Sent {
                queue: s.queue,
                offset: s.offset,
                log_offset: s.log_offset,
                duplicate: s.duplicate,
            },
            Err(e) => SendResult::Error {
                code: e.code(),
                message: e.to_string(),
            },
        }
    }

    /// The outcome again, as the client hands it out: a receipt in `topic`, or the
    /// broker's error ([`Error::from_wire`]).
    pub fn into_outcome(self, topic: &str) -> Result<SendReceipt> {
        match self {
            SendResult::Sent {
                queue,
                offset,
                log_offset,
                duplicate,
            } => Ok(SendReceipt {
                topic: topic.to_owned(),
                queue,
                offset,
                log_offset,
                duplicate,
            }),
            SendResult::Error { code, message } => Err(Error::from_wire(code, message)),
        }
    }
}

impl From<SendReceipt> for Response {
    /// The answer to a `Send`: the message's receipt.
    fn from(s: SendReceipt) -> Response {
        Response::Sent {
            topic: s.topic,
            queue: s.queue,
            offset: s.offset,
            log_offset: s.log_offset,
            duplicate: s.duplicate,
        }
    }
}

impl From<Message> for WireMessage {
    fn from(m: Message) -> WireMessage {
        WireMessage {
            key: m.key,
            body: m.body,
            properties: m.properties,
        }
    }
}

impl From<WireMessage> for Message {
    fn from(m: WireMessage) -> Message {
        Message {
            key: m.key,
            body: m.body,
            properties: m.properties,
        }
    }
}

impl From<Delivery> for WireDelivery {
    fn from(d: Delivery) -> WireDelivery {
        WireDelivery {
            topic: d.topic,
            queue: d.queue,
            offset: d.offset,
            log_offset: d.log_offset,
            timestamp_ms: d.timestamp_ms,
            message: WireMessage {
                key: d.key,
                body: d.body,
                properties: d.properties,
            },
            attempt: d.attempt,
        }
    }
}

impl From<WireDelivery> for Delivery {
    fn from(d: WireDelivery) -> Delivery {
        Delivery {
            topic: d.topic,
            queue: d.queue,
            offset: d.offset,
            log_offset: d.log_offset,
            key: d.message.key,
            body: d.message.body,
            properties: d.message.properties,
            timestamp_ms: d.timestamp_ms,
            attempt: d.attempt,
            receipt: None,
        }
    }
}

impl From<Delivery> for WireReceived {
    fn from(d: Delivery) -> WireReceived {
        let receipt = d.receipt.map(|r| r.handle()).unwrap_or_default();
        WireReceived {
            delivery: WireDelivery::from(d),
            receipt,
        }
    }
}

impl WireReceived {
    /// The delivery as the client hands it out, with its receipt.
    pub fn into_delivery(self) -> Result<Delivery> {
        let receipt = Receipt::parse(&self.receipt).map_err(|e| Error::Decode {
            what: "receipt",
            reason: e.to_string(),
        })?;
        Ok(Delivery {
            receipt: Some(receipt),
            ..Delivery::from(self.delivery)
        })
    }
}

/// A duration in whole milliseconds, as the wire carries it (saturating).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl WireGroup {
    /// The wire form of a group's settings: those in force and the group's own overrides.
    /// Durations travel in whole milliseconds.
    pub fn new(in_force: &DeliveryConfig, overrides: GroupSettings) -> WireGroup {
        WireGroup {
            visibility_timeout_ms: millis(in_force.visibility_timeout),
            max_retries: in_force.max_retries,
            retry_backoff_ms: in_force.retry_backoff.iter().copied().map(millis).collect(),
            overrides,
        }
    }

    /// The settings in force and the overrides, as `Broker::group_settings` returns them.
    pub fn into_parts(self) -> (DeliveryConfig, GroupSettings) {
        let in_force = DeliveryConfig::default()
            .with_visibility_timeout(Duration::from_millis(self.visibility_timeout_ms))
            .with_max_retries(self.max_retries)
            .with_retry_backoff(
                self.retry_backoff_ms
                    .into_iter()
                    .map(Duration::from_millis)
                    .collect(),
            );
        (in_force, self.overrides)
    }
}

impl Response {
    /// The answer carrying a group's settings in force and its overrides, FIFO included.
    pub fn group_settings(in_force: &DeliveryConfig, overrides: GroupSettings) -> Response {
        let fifo_override = overrides.fifo;
        Response::GroupSettings {
            group: WireGroup::new(in_force, overrides),
            fifo: in_force.fifo,
            fifo_override,
        }
    }

    /// The settings in force and the overrides of a [`Response::GroupSettings`], as
    /// `Broker::group_settings` returns them; another answer is given back as the error.
    pub fn into_group_settings(self) -> Result<(DeliveryConfig, GroupSettings), Response> {
        match self {
            Response::GroupSettings {
                group,
                fifo,
                fifo_override,
            } => {
                let (d, o) = group.into_parts();
                Ok((
                    d.with_fifo(fifo),
                    GroupSettings {
                        fifo: fifo_override,
                        ..o
                    },
                ))
            }
            other => Err(other),
        }
    }
}

impl Push {
    /// The check-back question about `half`.
    pub fn check(half: &HalfMessage) -> Push {
        Push::Check {
            txn: half.txn_id.0,
            topic: half.topic.clone(),
            producer_group: half.producer_group.clone(),
            message: WireMessage {
                key: half.key.clone(),
                body: half.body.clone(),
                properties: half.properties.clone(),
            },
            created_ms: half.created_ms,
            checks: half.checks,
        }
    }

    /// The half message a check-back asks about.
    pub fn into_half(self) -> HalfMessage {
        match self {
            Push::Check {
                txn,
                topic,
                producer_group,
                message,
                created_ms,
                checks,
            } => HalfMessage {
                txn_id: TxnId(txn),
                topic,
                key: message.key,
                body: message.body,
                properties: message.properties,
                producer_group,
                created_ms,
                checks,
            },
        }
    }
}

/// `(name, queues)` pairs of a `Topics` answer as the embedded broker's [`TopicInfo`].
pub(crate) fn topic_infos(topics: Vec<(String, u32)>) -> Vec<TopicInfo> {
    topics
        .into_iter()
        .map(|(name, queues)| TopicInfo { name, queues })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_comes_back_as_it_went() {
        let d = Delivery {
            topic: "t".into(),
            queue: 3,
            offset: 7,
            log_offset: 4096,
            key: "k".into(),
            body: b"body".to_vec(),
            properties: [("a".to_owned(), "b".to_owned())].into(),
            timestamp_ms: 1_700_000_000_000,
            attempt: 2,
            receipt: None,
        };
        assert_eq!(Delivery::from(WireDelivery::from(d.clone())), d);
        let d = Delivery {
            receipt: Some(Receipt {
                queue: 3,
                offset: 7,
                lease: 9,
                mac: 1 << 63,
            }),
            ..d
        };
        let back = WireReceived::from(d.clone()).into_delivery().unwrap();
        assert_eq!(back, d);
        let bad = WireReceived {
            receipt: "x".into(),
            ..WireReceived::from(d)
        };
        assert!(bad.into_delivery().is_err());
    }

    #[test]
    fn group_settings_come_back_as_they_went() {
        let d = DeliveryConfig::default()
            .with_visibility_timeout(Duration::from_millis(1500))
            .with_max_retries(3);
        let overrides = GroupSettings {
            max_retries: Some(3),
            ..GroupSettings::default()
        };
        let (back, o) = WireGroup::new(&d, overrides.clone()).into_parts();
        assert_eq!((back, o), (d.clone(), overrides.clone()));
        let (d, overrides) = (
            d.with_fifo(true),
            GroupSettings {
                fifo: Some(true),
                ..overrides
            },
        );
        let r = Response::group_settings(&d, overrides.clone());
        assert_eq!(r.into_group_settings(), Ok((d, overrides)));
    }

    #[test]
    fn a_check_comes_back_as_its_half() {
        let half = HalfMessage {
            txn_id: TxnId(42),
            topic: "t".into(),
            key: "k".into(),
            body: vec![1, 2],
            properties: Default::default(),
            producer_group: "pg".into(),
            created_ms: 5,
            checks: 1,
        };
        let back = Push::check(&half).into_half();
        assert_eq!(
            (
                back.txn_id,
                back.topic,
                back.key,
                back.body,
                back.producer_group
            ),
            (TxnId(42), "t".into(), "k".into(), vec![1, 2], "pg".into())
        );
        assert_eq!((back.created_ms, back.checks), (5, 1));
    }
}
