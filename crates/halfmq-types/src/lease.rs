//! Leases and their receipts: what a poll may ask for ([`PollOptions`]), and the
//! [`Receipt`] of one delivery, which acks, nacks and lease changes can name instead of the
//! message's queue offset.
//!
//! A receipt is bound to one lease: the broker gives every lease (every handout, and every
//! change of a lease) a new lease number, and a receipt names the lease number it was issued
//! with. An ack, nack or change with a receipt whose lease has ended (redelivered after its
//! time ran out, nacked, or changed) is [`Error::StaleReceipt`]. A receipt also carries a
//! keyed checksum (SipHash with a key drawn at random when the broker opens) over the
//! consumer group, topic, queue, offset and lease number, so a receipt that was modified,
//! made up, or issued before the broker last opened is [`Error::BadReceipt`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::filter::TagFilter;

/// Shortest lease a poll or a lease change may ask for.
pub const LEASE_MIN: Duration = Duration::from_millis(10);

/// Longest lease a poll or a lease change may ask for (the longest visibility time-out).
pub const LEASE_MAX: Duration = Duration::from_secs(24 * 3600);

/// Check a lease duration asked for: [`LEASE_MIN`] ..= [`LEASE_MAX`], else
/// [`Error::Invalid`] (`what`: "lease duration").
pub fn validate_lease(d: Duration) -> Result<()> {
    if d < LEASE_MIN || d > LEASE_MAX {
        return Err(Error::Invalid {
            what: "lease duration",
            reason: format!("{d:?} is outside {LEASE_MIN:?} ..= {LEASE_MAX:?}"),
        });
    }
    Ok(())
}

/// What a poll asks for beyond how many messages: its own lease duration and a tag filter.
/// `#[non_exhaustive]`: start from `PollOptions::default()` and use the `with_` setters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PollOptions {
    /// How long each message handed out is leased (RocketMQ's invisible duration); `None`:
    /// the group's visibility time-out. [`LEASE_MIN`] ..= [`LEASE_MAX`].
    pub lease: Option<Duration>,
    /// Which messages to hand out. Messages that do not match are acked for the group and
    /// never handed out to it.
    pub filter: TagFilter,
}

crate::with_setters! {
    PollOptions {
        /// Sets [`PollOptions::lease`].
        with_lease => lease: Option<Duration>;
        /// Sets [`PollOptions::filter`].
        with_filter => filter: TagFilter;
    }
}

impl PollOptions {
    /// Check the options (the filter was checked when it was parsed).
    pub fn validate(&self) -> Result<()> {
        match self.lease {
            Some(d) => validate_lease(d),
            None => Ok(()),
        }
    }
}

/// Longest receipt handle text accepted, in bytes.
pub const RECEIPT_BYTES_MAX: usize = 64;

/// Proof of one lease of one delivered message. Its text form ([`Receipt::handle`],
/// `Display`) is opaque to consumers: `q.offset.lease.mac` in lower-case hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Receipt {
    /// The queue of the message.
    pub queue: u32,
    /// Its queue offset.
    pub offset: u64,
    /// The number of the lease it was issued with.
    pub lease: u64,
    /// The broker's keyed checksum of the group, topic and the fields above.
    pub mac: u64,
}

impl Receipt {
    /// The text form, as RocketMQ's receipt handle.
    pub fn handle(&self) -> String {
        self.to_string()
    }

    /// Read a receipt back from its text form; anything else is [`Error::BadReceipt`].
    pub fn parse(handle: &str) -> Result<Receipt> {
        let bad = |reason: &str| Error::BadReceipt {
            receipt: shown(handle),
            reason: reason.to_owned(),
        };
        if handle.len() > RECEIPT_BYTES_MAX {
            return Err(bad("too long to be a receipt"));
        }
        let mut parts = handle.split('.');
        let mut field = |max_digits: usize| -> Result<u64> {
            let p = parts.next().ok_or_else(|| bad("not a receipt"))?;
            let hex = !p.is_empty()
                && p.len() <= max_digits
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                return Err(bad("not a receipt"));
            }
            u64::from_str_radix(p, 16).map_err(|_| bad("not a receipt"))
        };
        let queue = u32::try_from(field(8)?).map_err(|_| bad("not a receipt"))?;
        let offset = field(16)?;
        let lease = field(16)?;
        let mac = field(16)?;
        if parts.next().is_some() {
            return Err(bad("not a receipt"));
        }
        let r = Receipt {
            queue,
            offset,
            lease,
            mac,
        };
        // One text per receipt: leading zeros would give another text for the same one.
        if r.to_string() != handle {
            return Err(bad("not a receipt"));
        }
        Ok(r)
    }
}

/// A handle as an error shows it: at most [`RECEIPT_BYTES_MAX`] bytes of it.
fn shown(handle: &str) -> String {
    let mut end = handle.len().min(RECEIPT_BYTES_MAX);
    while !handle.is_char_boundary(end) {
        end -= 1;
    }
    handle[..end].to_owned()
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:x}.{:x}.{:x}.{:x}",
            self.queue, self.offset, self.lease, self.mac
        )
    }
}

impl FromStr for Receipt {
    type Err = Error;

    fn from_str(s: &str) -> Result<Receipt> {
        Receipt::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_comes_back_from_its_handle_and_nothing_else_does() {
        let r = Receipt {
            queue: 3,
            offset: u64::MAX,
            lease: 17,
            mac: 0xdead_beef_0000_0001,
        };
        let h = r.handle();
        assert!(h.len() <= RECEIPT_BYTES_MAX);
        assert_eq!(Receipt::parse(&h).unwrap(), r);
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.G",
            "1.2.3.-4",
            "100000000.1.1.1",
            "1..3.4",
            &"1".repeat(100),
            "é.1.1.1",
        ] {
            assert!(
                matches!(Receipt::parse(bad), Err(Error::BadReceipt { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn lease_durations_are_bounded() {
        assert!(validate_lease(LEASE_MIN).is_ok() && validate_lease(LEASE_MAX).is_ok());
        assert!(validate_lease(Duration::from_millis(9)).is_err());
        assert!(validate_lease(LEASE_MAX + Duration::from_millis(1)).is_err());
        let o = PollOptions::default().with_lease(Some(Duration::ZERO));
        assert!(matches!(
            o.validate(),
            Err(Error::Invalid {
                what: "lease duration",
                ..
            })
        ));
    }
}
