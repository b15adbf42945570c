//! Requests that borrow what they carry, for a client sending a message (or acks) it keeps:
//! each encodes to exactly the bytes of the owned [`Request`] variant of the same name (a test
//! checks each one), without copying the message body or the names into a `Request` first.
//!
//! [`Request`]: super::Request

use serde::ser::{SerializeStruct, SerializeStructVariant};
use serde::{Serialize, Serializer};

use halfmq_types::Message;

use super::body_bytes;

/// A borrowed twin of one `Request` variant: its position among `Request`'s variants, its
/// name, and its fields in declaration order (all three must match the owned variant).
macro_rules! borrowed_request {
    ($(#[$doc:meta])* $name:ident<$lt:lifetime> = $index:literal $variant:literal {
        $($field:ident: $ty:ty),+ $(,)?
    }) => {
        $(#[$doc])*
        pub(crate) struct $name<$lt> {
            $(pub $field: $ty,)+
        }

        impl Serialize for $name<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                const FIELDS: usize = [$(stringify!($field)),+].len();
                let mut v = s.serialize_struct_variant("Request", $index, $variant, FIELDS)?;
                $(v.serialize_field(stringify!($field), &self.$field)?;)+
                v.end()
            }
        }
    };
}

borrowed_request! {
    /// `Request::Send`.
    SendRef<'a> = 1 "Send" { topic: &'a str, message: MessageRef<'a> }
}

borrowed_request! {
    /// `Request::SendHalf`.
    SendHalfRef<'a> = 2 "SendHalf" {
        topic: &'a str,
        message: MessageRef<'a>,
        producer_group: &'a str,
        check_immunity_ms: u64,
    }
}

borrowed_request! {
    /// `Request::Ack`.
    AckRef<'a> = 6 "Ack" { group: &'a str, topic: &'a str, acks: &'a [(u32, u64)] }
}

borrowed_request! {
    /// `Request::SendDelayed`.
    SendDelayedRef<'a> = 20 "SendDelayed" {
        topic: &'a str,
        message: MessageRef<'a>,
        deliver_at_ms: u64,
    }
}

borrowed_request! {
    /// `Request::SendBatch`.
    SendBatchRef<'a> = 24 "SendBatch" { topic: &'a str, messages: MessagesRef<'a> }
}

/// [`Message`]s serialized as a sequence of `WireMessage`s.
pub(crate) struct MessagesRef<'a>(pub &'a [Message]);

impl Serialize for MessagesRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(MessageRef))
    }
}

/// A [`Message`] serialized as a `WireMessage`.
pub(crate) struct MessageRef<'a>(pub &'a Message);

impl Serialize for MessageRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Body<'a>(&'a [u8]);
        impl Serialize for Body<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                body_bytes::serialize(self.0, s)
            }
        }
        let mut m = s.serialize_struct("WireMessage", 3)?;
        m.serialize_field("key", &self.0.key)?;
        m.serialize_field("body", &Body(&self.0.body))?;
        m.serialize_field("properties", &self.0.properties)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode, Request, WireMessage};

    fn same_bytes<B: Serialize>(borrowed: &B, owned: &Request) {
        assert_eq!(
            encode(borrowed).unwrap(),
            encode(owned).unwrap(),
            "{owned:?}"
        );
        assert_eq!(
            serde_json::to_string(borrowed).unwrap(),
            serde_json::to_string(owned).unwrap()
        );
    }

    #[test]
    fn every_borrowed_request_encodes_as_the_owned_one() {
        let msg = Message::new(vec![5u8; 1500])
            .with_key("key-1")
            .with_property("p", "q");
        let wire = WireMessage::from(msg.clone());
        same_bytes(
            &SendRef {
                topic: "orders",
                message: MessageRef(&msg),
            },
            &Request::Send {
                topic: "orders".into(),
                message: wire.clone(),
            },
        );
        same_bytes(
            &SendHalfRef {
                topic: "orders",
                message: MessageRef(&msg),
                producer_group: "pg",
                check_immunity_ms: 300,
            },
            &Request::SendHalf {
                topic: "orders".into(),
                message: wire.clone(),
                producer_group: "pg".into(),
                check_immunity_ms: 300,
            },
        );
        let acks = [(0, 1), (3, 70_000), (u32::MAX, u64::MAX)];
        same_bytes(
            &AckRef {
                group: "g",
                topic: "orders",
                acks: &acks,
            },
            &Request::Ack {
                group: "g".into(),
                topic: "orders".into(),
                acks: acks.to_vec(),
            },
        );
        same_bytes(
            &SendDelayedRef {
                topic: "orders",
                message: MessageRef(&msg),
                deliver_at_ms: 1_700_000_000_000,
            },
            &Request::SendDelayed {
                topic: "orders".into(),
                message: wire.clone(),
                deliver_at_ms: 1_700_000_000_000,
            },
        );
        let batch = [msg.clone(), Message::new(vec![1u8; 3]), msg];
        same_bytes(
            &SendBatchRef {
                topic: "orders",
                messages: MessagesRef(&batch),
            },
            &Request::SendBatch {
                topic: "orders".into(),
                messages: batch.iter().cloned().map(WireMessage::from).collect(),
            },
        );
    }
}
