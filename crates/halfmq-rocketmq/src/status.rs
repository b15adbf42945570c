//! RocketMQ status codes: every answer of the endpoint carries a [`pb::Status`], and every
//! halfmq [`Error`] becomes the RocketMQ code that names it best, with halfmq's own message.

use halfmq::Error;

use crate::pb::{self, Code};

/// A RocketMQ status: its code and a message for people.
pub(crate) fn status(code: Code, message: impl Into<String>) -> pb::Status {
    pb::Status {
        code: code as i32,
        message: message.into(),
    }
}

/// The status of a request that succeeded.
pub(crate) fn ok() -> pb::Status {
    status(Code::Ok, "OK")
}

/// Whether `s` says the request succeeded.
pub(crate) fn is_ok(s: &pb::Status) -> bool {
    s.code == Code::Ok as i32
}

/// The status of a request the endpoint does not serve (yet), naming what does not work and
/// what to do instead. Never an OK: a request that did nothing must not look as if it did.
pub(crate) fn unsupported(what: &str) -> pb::Status {
    status(Code::Unsupported, format!("halfmq: {what}"))
}

/// The RocketMQ status of a halfmq error.
pub(crate) fn of_error(e: &Error) -> pb::Status {
    let code = match e {
        Error::UnknownTopic(_) => Code::TopicNotFound,
        Error::UnknownGroup(_) => Code::ConsumerGroupNotFound,
        Error::UnknownTxn(_) => Code::InvalidTransactionId,
        Error::TxnConflict { .. } => Code::BadRequest,
        Error::UnknownQueue { .. } => Code::NotFound,
        // A handle this endpoint did not make (or made before the broker last opened), and
        // one of a lease that has ended: RocketMQ answers both as an invalid receipt handle.
        Error::BadAck { .. } | Error::BadReceipt { .. } | Error::StaleReceipt { .. } => {
            Code::InvalidReceiptHandle
        }
        Error::Invalid { what, .. } => match *what {
            "topic name" => Code::IllegalTopic,
            "group name" | "consumer group" => Code::IllegalConsumerGroup,
            "key" => Code::IllegalMessageKey,
            "property name" => Code::IllegalMessagePropertyKey,
            "idempotency key" => Code::IllegalMessageId,
            "delivery time" => Code::IllegalDeliveryTime,
            "lease duration" => Code::IllegalInvisibleTime,
            "filter expression" => Code::IllegalFilterExpression,
            "tag" => Code::IllegalMessageTag,
            "message group" => Code::IllegalMessageGroup,
            _ => Code::BadRequest,
        },
        Error::Timeout { .. } => Code::ProxyTimeout,
        Error::Expired { .. } => Code::MessageNotFound,
        _ => Code::InternalServerError,
    };
    status(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_message_and_get_a_specific_code() {
        let s = of_error(&Error::UnknownTopic("orders".into()));
        assert_eq!(s.code, Code::TopicNotFound as i32);
        assert!(s.message.contains("orders"), "{}", s.message);
        let s = of_error(&Error::Invalid {
            what: "property name",
            reason: "reserved".into(),
        });
        assert_eq!(s.code, Code::IllegalMessagePropertyKey as i32);
        let s = of_error(&Error::StaleReceipt {
            group: "g".into(),
            topic: "t".into(),
            queue: 0,
            offset: 3,
            reason: "its lease ended".into(),
        });
        assert_eq!(s.code, Code::InvalidReceiptHandle as i32);
        assert!(s.message.contains("stale"), "{}", s.message);
        assert!(!is_ok(&unsupported("SQL92 filters")));
        assert!(is_ok(&ok()));
    }
}
