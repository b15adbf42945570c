//! The trace document: "where is my confirmation?". Every event of every message with one key,
//! and where each is now. The embedded broker builds it (`Broker::trace`); the client gets the
//! same type over the network; its `Display` is what `halfmq trace KEY` prints.

use serde::{Deserialize, Serialize};

/// What kind of record a traced record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecKind {
    /// A plain message.
    Message,
    /// A half (transactional) message.
    Half,
    /// The commit of a transaction (the visible message).
    Commit,
    /// The rollback of a transaction.
    Rollback,
    /// A delayed message, stored until its time.
    Delayed,
    /// The delivery of a delayed message (the visible message).
    Fire,
}

/// Something that happened to a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A half message was written (from the log).
    Half {
        /// Transaction id (the half's log offset).
        txn: u64,
        /// Topic it goes to once committed.
        topic: String,
        /// Queue it goes to once committed.
        queue: u32,
        /// Producer group asked at check-back.
        producer_group: String,
    },
    /// The transaction was committed (from the log).
    Committed {
        /// Transaction id.
        txn: u64,
    },
    /// The transaction was rolled back (from the log).
    RolledBack {
        /// Transaction id.
        txn: u64,
    },
    /// A delayed message was stored, invisible until its time (from the log).
    DelayedStored {
        /// Topic it will be delivered to.
        topic: String,
        /// When, ms since the Unix epoch.
        deliver_at_ms: u64,
    },
    /// A delayed message's time came: it was copied into its queue (from the log).
    DelayedFired {
        /// The delayed message's id (its log offset).
        id: u64,
    },
    /// The message was stored and is visible to consumers (from the log).
    Stored {
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Offset in the queue.
        offset: u64,
    },
    /// A copy was stored in a dead-letter topic (from the log).
    DeadLetterStored {
        /// The dead-letter topic.
        topic: String,
        /// Offset in it.
        offset: u64,
        /// Why, as the copy says.
        reason: String,
    },
    /// A send with the same idempotency key was answered with this message and not stored.
    Duplicate {
        /// The idempotency key.
        idempotency_key: String,
    },
    /// A check-back asked the producer group about the transaction.
    CheckAsked {
        /// Producer group asked.
        producer_group: String,
        /// Which check this is (1 = first).
        check: u32,
    },
    /// A check-back ended: `commit`, `rollback`, `unknown`, or why there was no answer.
    CheckAnswered {
        /// Which check this was.
        check: u32,
        /// The answer.
        answer: String,
    },
    /// Checked `check_max` times without an answer: needs a person.
    Unresolved {
        /// Checks made.
        checks: u32,
    },
    /// Handed to a consumer of `group`.
    Delivered {
        /// Consumer group.
        group: String,
        /// 1 for the first delivery to this group, 2 for the next, ...
        attempt: u32,
    },
    /// Acknowledged by `group`.
    Acked {
        /// Consumer group.
        group: String,
    },
    /// Delivery to `group` failed (nack or time-out) and will be retried at `next_at_ms`.
    Retried {
        /// Consumer group.
        group: String,
        /// The attempt that failed.
        attempt: u32,
        /// Why (nack, time-out).
        reason: String,
        /// When it will be delivered again, ms since the Unix epoch.
        next_at_ms: u64,
    },
    /// Given up on for `group` and moved to its dead-letter topic.
    DeadLettered {
        /// Consumer group.
        group: String,
        /// Attempts made.
        attempts: u32,
        /// Why.
        reason: String,
        /// Dead-letter topic.
        dlq_topic: String,
        /// Log offset of the copy in the dead-letter topic.
        dlq_log_offset: u64,
    },
    /// Sent again from the dead-letter topic of `group`, as a new message.
    Replayed {
        /// Consumer group.
        group: String,
        /// Topic of the new message.
        new_topic: String,
        /// Log offset of the new message.
        new_log_offset: u64,
    },
    /// Skipped by `group`: its tag did not pass the group's poll filter, so it was acked for
    /// the group without being handed out.
    Filtered {
        /// Consumer group.
        group: String,
        /// The filter expression of the poll.
        filter: String,
    },
}

/// Everything known about the messages with one key: `Broker::trace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// The key looked up.
    pub key: String,
    /// One entry per message (a transaction and its outcome, a delayed message and its
    /// delivery, a message and its dead-letter copy count as one), in log order.
    pub messages: Vec<TracedMessage>,
    /// Records with this key that retention has deleted from the log since they were
    /// indexed (only their existence is known).
    pub expired: u32,
}

/// The story of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedMessage {
    /// Topic.
    pub topic: String,
    /// Transaction id, for transactional messages.
    pub txn: Option<u64>,
    /// Log offset of the first record of the story (the half, the delayed message, or the
    /// message itself).
    pub log_offset: u64,
    /// The dead-letter queue it was replayed from (`group/offset`), for a replayed message.
    pub replayed_from: Option<String>,
    /// What happened, oldest first.
    pub events: Vec<TraceLine>,
    /// Where it is now.
    pub now: Now,
}

/// One event of a [`TracedMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceLine {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The log offset of the record it is about.
    pub log_offset: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// Where a message is now, from the live state (transaction index, consumer offsets,
/// leases), not from the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Now {
    /// `pending`, `unresolved`, `rolled_back`, `delayed`, `stored` or `finished` (a
    /// transaction whose outcome record is no longer in the log).
    pub state: String,
    /// Since when, ms since the Unix epoch.
    pub since_ms: u64,
    /// Check-backs so far (transactions).
    pub checks: u32,
    /// The last check-back's answer.
    pub last_answer: Option<String>,
    /// Next check-back (pending transactions) or delivery time (delayed messages), ms since
    /// the Unix epoch.
    pub next_at_ms: Option<u64>,
    /// Where it is stored: (topic, queue, offset).
    pub stored_at: Option<(String, u32, u64)>,
    /// Per consumer group that reads the topic.
    pub groups: Vec<GroupNow>,
    /// The same as one line for people.
    pub line: String,
}

/// One consumer group's view of a stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupNow {
    /// Group name.
    pub group: String,
    /// Handed to a consumer of the group (now or before a restart).
    pub delivered: bool,
    /// Latest attempt known (0 when only the group's position shows it was handed out).
    pub attempts: u32,
    /// Acknowledged (a dead-lettered message is acked by the move).
    pub acked: bool,
    /// With a consumer now, lease ending at this time (ms since the Unix epoch).
    pub in_flight_until_ms: Option<u64>,
    /// Waiting for redelivery at this time (ms since the Unix epoch).
    pub retry_at_ms: Option<u64>,
    /// Moved to this dead-letter topic.
    pub dead_letter_topic: Option<String>,
    /// Its dead-letter copy was replayed.
    pub replayed: bool,
}

impl GroupNow {
    /// One line for people: where this group is with the message.
    pub fn describe(&self) -> String {
        let g = &self.group;
        if let Some(dlq) = &self.dead_letter_topic {
            return if self.replayed {
                format!("group {g}: dead-lettered to {dlq}, then replayed as a new message")
            } else {
                format!("group {g}: parked in dead-letter queue {dlq} (replay with `halfmq dlq replay`)")
            };
        }
        if self.acked {
            return format!("group {g}: acked");
        }
        let attempt = if self.attempts > 0 {
            format!(" (attempt {})", self.attempts)
        } else {
            String::new()
        };
        if let Some(at) = self.retry_at_ms {
            return format!(
                "group {g}: delivery failed{attempt}, redelivery at {}",
                format_ms(at)
            );
        }
        if let Some(until) = self.in_flight_until_ms {
            return format!(
                "group {g}: delivered{attempt}, not acked (lease until {})",
                format_ms(until)
            );
        }
        if self.delivered {
            format!("group {g}: delivered{attempt}, not acked")
        } else {
            format!("group {g}: not delivered yet")
        }
    }
}

impl Event {
    /// (short name, details) for people.
    fn describe(&self) -> (&'static str, String) {
        match self {
            Event::Half {
                txn,
                topic,
                queue,
                producer_group,
            } => (
                "half",
                format!("txn {txn} for {topic} queue {queue}, producer group {producer_group}"),
            ),
            Event::Committed { txn } => ("committed", format!("txn {txn}")),
            Event::RolledBack { txn } => ("rolled back", format!("txn {txn}")),
            Event::DelayedStored {
                topic,
                deliver_at_ms,
            } => (
                "delayed",
                format!("for {topic} until {}", format_ms(*deliver_at_ms)),
            ),
            Event::DelayedFired { id } => ("fired", format!("delayed message {id} is due")),
            Event::Stored {
                topic,
                queue,
                offset,
            } => ("stored", format!("{topic} queue {queue} offset {offset}")),
            Event::DeadLetterStored {
                topic,
                offset,
                reason,
            } => ("dlq stored", format!("{topic} offset {offset}: {reason}")),
            Event::Duplicate { idempotency_key } => (
                "duplicate",
                format!("a resend with idempotency key {idempotency_key:?} was answered with this message"),
            ),
            Event::CheckAsked {
                producer_group,
                check,
            } => (
                "check asked",
                format!("check {check}, producer group {producer_group}"),
            ),
            Event::CheckAnswered { check, answer } => {
                ("check answer", format!("check {check}: {answer}"))
            }
            Event::Unresolved { checks } => (
                "UNRESOLVED",
                format!("no answer after {checks} checks: needs a person"),
            ),
            Event::Delivered { group, attempt } => {
                ("delivered", format!("group {group}, attempt {attempt}"))
            }
            Event::Acked { group } => ("acked", format!("group {group}")),
            Event::Filtered { group, filter } => (
                "filtered",
                format!("group {group}: its tag does not pass `{filter}`, acked unseen"),
            ),
            Event::Retried {
                group,
                attempt,
                reason,
                next_at_ms,
            } => (
                "retry",
                format!(
                    "group {group}, attempt {attempt} failed: {reason}; next at {}",
                    format_ms(*next_at_ms)
                ),
            ),
            Event::DeadLettered {
                group,
                attempts,
                reason,
                dlq_topic,
                dlq_log_offset,
            } => (
                "dead-lettered",
                format!(
                    "group {group}, after {attempts} attempts: {reason}; moved to {dlq_topic} (log {dlq_log_offset})"
                ),
            ),
            Event::Replayed {
                group,
                new_topic,
                new_log_offset,
            } => (
                "replayed",
                format!("from group {group}'s dead letters, as a new message in {new_topic} (log {new_log_offset})"),
            ),
        }
    }
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.messages.is_empty() {
            writeln!(
                f,
                "no message with key {:?} (keys are exact and case-sensitive)",
                self.key
            )?;
            if self.expired > 0 {
                writeln!(
                    f,
                    "({} older records with this key were deleted by retention)",
                    self.expired
                )?;
            }
            return Ok(());
        }
        let n = self.messages.len();
        writeln!(
            f,
            "key {:?}: {n} message{} (times UTC)",
            self.key,
            if n == 1 { "" } else { "s" }
        )?;
        for m in &self.messages {
            writeln!(f)?;
            match (m.txn, &m.replayed_from) {
                (Some(t), _) => writeln!(f, "transaction {t}, topic {}", m.topic)?,
                (None, Some(from)) => writeln!(
                    f,
                    "message at log {}, topic {}, replayed from dead letter {from}",
                    m.log_offset, m.topic
                )?,
                (None, None) => writeln!(f, "message at log {}, topic {}", m.log_offset, m.topic)?,
            }
            for l in &m.events {
                let (what, details) = l.event.describe();
                writeln!(f, "  {}  {what:<13} {details}", format_ms(l.at_ms))?;
            }
            writeln!(f, "  now: {}", m.now.line)?;
        }
        if self.expired > 0 {
            writeln!(
                f,
                "\n({} older records with this key were deleted by retention)",
                self.expired
            )?;
        }
        Ok(())
    }
}

/// `2026-11-30 19:02:01.123` (UTC) for ms since the Unix epoch.
pub fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}
