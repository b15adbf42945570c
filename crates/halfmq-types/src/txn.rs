//! Transaction types: ids, states, check-back questions and answers.

use std::time::Duration;

use crate::message::Properties;

/// A transaction id: the log offset of its half record.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TxnId(pub u64);

impl std::fmt::Display for TxnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// The message was made visible.
    Committed,
    /// The message was discarded.
    RolledBack,
}

impl Outcome {
    /// `"committed"` or `"rolled back"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled back",
        }
    }
}

/// Where a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TxnState {
    /// Waiting for commit, rollback or a check-back answer.
    Pending,
    /// Checked `check_max` times without an answer: kept, listed, resolvable by hand.
    Unresolved,
    /// Committed.
    Committed,
    /// Rolled back.
    RolledBack,
}

impl TxnState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Pending => "pending",
            TxnState::Unresolved => "unresolved",
            TxnState::Committed => "committed",
            TxnState::RolledBack => "rolled back",
        }
    }
}

/// What a producer answers to a check-back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CheckAnswer {
    /// The local transaction committed: make the message visible.
    Commit,
    /// The local transaction rolled back: discard the message.
    Rollback,
    /// Not known yet: ask again later.
    Unknown,
}

/// A half message as shown to a [`TransactionChecker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfMessage {
    /// The transaction id.
    pub txn_id: TxnId,
    /// Topic it will be visible in once committed.
    pub topic: String,
    /// Key.
    pub key: String,
    /// Payload.
    pub body: Vec<u8>,
    /// User properties.
    pub properties: Properties,
    /// The producer group that wrote it.
    pub producer_group: String,
    /// When it was written, ms since the Unix epoch.
    pub created_ms: u64,
    /// Checks so far, this one not included.
    pub checks: u32,
}

/// Asked by the broker for the outcome of a transaction whose producer did not say.
/// Register one per producer group with `Broker::register_checker`. A checker may be
/// called from several threads at once; one that panics or takes longer than
/// `check_answer_timeout` counts as "no answer".
pub trait TransactionChecker: Send + Sync + 'static {
    /// The outcome of the local transaction behind `half`.
    fn check(&self, half: &HalfMessage) -> CheckAnswer;
}

impl<F: Fn(&HalfMessage) -> CheckAnswer + Send + Sync + 'static> TransactionChecker for F {
    fn check(&self, half: &HalfMessage) -> CheckAnswer {
        self(half)
    }
}

/// Options of one half message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HalfOptions {
    /// Do not check before this long after the half was written (if longer than the
    /// transaction time-out). The wait does not use up any checks.
    pub check_immunity: Option<Duration>,
}

impl HalfOptions {
    /// Options whose check-immunity time is `ms` milliseconds, 0 for none: the form the
    /// network protocol carries ([`HalfOptions::check_immunity_ms`] the other way).
    pub fn from_check_immunity_ms(ms: u64) -> HalfOptions {
        HalfOptions {
            check_immunity: (ms > 0).then(|| Duration::from_millis(ms)),
        }
    }

    /// The check-immunity time in whole milliseconds (saturating), 0 for none: as the network
    /// protocol carries it and the broker's transaction index counts it.
    pub fn check_immunity_ms(&self) -> u64 {
        self.check_immunity
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// What is known about a transaction that has not finished.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TxnInfo {
    /// The transaction id.
    pub txn_id: u64,
    /// Pending or unresolved.
    pub state: TxnState,
    /// Topic of the message.
    pub topic: String,
    /// Queue it goes to once committed.
    pub queue: u32,
    /// Key.
    pub key: String,
    /// Producer group asked at check-back.
    pub producer_group: String,
    /// Encoded size of the half record.
    pub size: u32,
    /// When the half was written, ms since the Unix epoch.
    pub created_ms: u64,
    /// Check-backs so far.
    pub checks: u32,
    /// When the next check is due, ms since the Unix epoch.
    pub next_check_ms: u64,
    /// When the last check ended (0: never checked).
    pub last_check_ms: u64,
    /// What the last check said: `unknown`, `no answer`, `no live producer`, ...
    pub last_answer: Option<String>,
}

/// What `Broker::send_half_receipt` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HalfReceipt {
    /// The transaction.
    pub txn: TxnId,
    /// True when the half carried an idempotency key that was already stored: nothing was
    /// written now, and `txn` is the original transaction (in whatever state it is now).
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_immunity_travels_in_whole_milliseconds_and_zero_is_none() {
        for ms in [0, 1, 6_000, u64::MAX] {
            assert_eq!(
                HalfOptions::from_check_immunity_ms(ms).check_immunity_ms(),
                ms
            );
        }
        assert_eq!(
            HalfOptions::from_check_immunity_ms(0),
            HalfOptions::default()
        );
        let long = HalfOptions {
            check_immunity: Some(Duration::MAX),
        };
        assert_eq!(long.check_immunity_ms(), u64::MAX);
        let sub_ms = HalfOptions {
            check_immunity: Some(Duration::from_micros(1_999)),
        };
        assert_eq!(sub_ms.check_immunity_ms(), 1);
    }
}
