//! Transactions: half messages, commit and rollback (each one path, waited for by blocking
//! or by awaiting), the registry of checkers asked about overdue halves, and listing. The
//! check-back thread is `checker`; the index of pending halves is `crate::txn`.

use std::sync::Arc;

use super::checker::Msg as CheckMsg;
use super::wait::{block_on, blocking_and_async, Async, Blocking, Hook, Wait};
use super::{required_prop, validate_group_name, validate_user_topic_name, Broker, Topic};
use crate::config::TxnConfig;
use crate::txn::{Begin, TxnIndex};
use halfmq_store::consume_queue::ConsumeQueue;
use halfmq_store::record::{self, Properties, RecordKind, RecordView, FLAG_TXN_COMMIT};
use halfmq_store::{Append, DurableHook};
use halfmq_types::error::{Error, Result};
use halfmq_types::props::{
    PROP_CHECK_IMMUNITY_MS, PROP_KEYS, PROP_MESSAGE_GROUP, PROP_PRODUCER_GROUP, PROP_TAG, PROP_TXN,
    RESERVED_PREFIX,
};
use halfmq_types::{
    HalfMessage, HalfOptions, HalfReceipt, Message, Outcome, TransactionChecker, TxnId, TxnInfo,
    TxnState,
};

/// The record that ends a transaction, ready to append.
struct EndRecord {
    info: TxnInfo,
    outcome: Outcome,
    props: Vec<u8>,
    body: Vec<u8>,
    /// The consume queue a commit is indexed in.
    queue: Option<Arc<ConsumeQueue>>,
    /// The record's time, also the time the outcome is remembered with (as recovery does).
    timestamp_ms: u64,
}

impl EndRecord {
    fn append(&self) -> Append<'_> {
        let committed = self.outcome == Outcome::Committed;
        Append {
            kind: if committed {
                RecordKind::Message
            } else {
                RecordKind::TxnEnd
            },
            flags: if committed { FLAG_TXN_COMMIT } else { 0 },
            topic: &self.info.topic,
            queue_id: self.info.queue,
            key: &self.info.key,
            props: &self.props,
            body: &self.body,
            timestamp_ms: self.timestamp_ms,
            dispatch_to: self.queue.as_ref(),
        }
    }

    /// The hook that finishes the transaction in the index once the record is durable. The
    /// claim taken by `begin_resolve` lives in it, so it ends exactly with the record's fate:
    /// the hook runs (resolved), or the store drops it unrun (the record will never be
    /// acknowledged: an error, or an async commit cancelled before its record reached the
    /// log) and the transaction is unfinished again, for a later commit or rollback.
    fn hook(&self, txns: &Arc<TxnIndex>) -> DurableHook {
        let mut claim = Resolving {
            txns: txns.clone(),
            txn: self.info.txn_id,
            done: false,
        };
        let (outcome, at_ms) = (self.outcome, self.timestamp_ms);
        Box::new(move |_| {
            claim.done = true;
            claim.txns.resolve(claim.txn, outcome, at_ms);
        })
    }
}

/// The right to write a transaction's outcome (see [`EndRecord::hook`]).
struct Resolving {
    txns: Arc<TxnIndex>,
    txn: u64,
    done: bool,
}

impl Drop for Resolving {
    fn drop(&mut self) {
        if !self.done {
            self.txns.abort_resolve(self.txn);
        }
    }
}

/// The index entry of a pending half: first checked after the transaction time-out, or
/// after its check immunity when that is longer.
fn pending_half(
    cfg: &TxnConfig,
    (topic, queue, key): (&str, u32, &str),
    producer_group: String,
    created_ms: u64,
    immunity_ms: u64,
) -> TxnInfo {
    let first_check = (cfg.timeout.as_millis() as u64).max(immunity_ms);
    TxnInfo {
        txn_id: 0,
        state: TxnState::Pending,
        topic: topic.to_owned(),
        queue,
        key: key.to_owned(),
        producer_group,
        size: 0,
        created_ms,
        checks: 0,
        // Saturating: an immunity of u64::MAX ms (what a longer one travels as) is never over.
        next_check_ms: created_ms.saturating_add(first_check),
        last_check_ms: 0,
        last_answer: None,
    }
}

/// Turn a half record into the index entry of its transaction (recovery replays it).
pub(super) fn txn_info_of(view: &RecordView<'_>, cfg: &TxnConfig) -> Result<TxnInfo> {
    let props = view.properties()?;
    let immunity_ms = props
        .get(PROP_CHECK_IMMUNITY_MS)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let group = props.get(PROP_PRODUCER_GROUP).cloned().unwrap_or_default();
    let mut info = pending_half(
        cfg,
        (view.topic, view.header.queue_id, view.key),
        group,
        view.header.timestamp_ms,
        immunity_ms,
    );
    info.txn_id = view.header.log_offset;
    info.size =
        record::encoded_len(view.topic, view.key, view.props, view.body).unwrap_or_default();
    Ok(info)
}

/// Why a commit or rollback record without its transaction is damaged.
const NO_TXN: &str = "transaction outcome record without a transaction id";

/// The transaction a commit or rollback record ends, from its properties.
pub(super) fn txn_of(view: &RecordView<'_>) -> Result<u64> {
    required_prop(view, PROP_TXN, NO_TXN)
}

impl Broker {
    fn prepare_half(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: &HalfOptions,
    ) -> Result<(Arc<Topic>, usize, Vec<u8>)> {
        validate_group_name(producer_group)?;
        Self::check_user_message(msg)?;
        validate_user_topic_name(topic)?;
        let t = self.topic(topic)?;
        let qi = Self::pick_queue(&t, msg);
        let mut props = msg.properties.clone();
        props.insert(PROP_PRODUCER_GROUP.into(), producer_group.into());
        if opts.check_immunity.is_some() {
            props.insert(
                PROP_CHECK_IMMUNITY_MS.into(),
                opts.check_immunity_ms().to_string(),
            );
        }
        Ok((t, qi, record::encode_properties(&props)?))
    }

    /// The half record to append and the hook that indexes it once durable.
    fn half_parts<'a>(
        &self,
        t: &'a Topic,
        qi: usize,
        msg: &'a Message,
        props: &'a [u8],
        producer_group: &str,
        opts: &HalfOptions,
    ) -> (Append<'a>, DurableHook) {
        let a = t.append(
            qi,
            RecordKind::Half,
            (&msg.key, props, &msg.body),
            self.now(),
        );
        let immunity_ms = opts.check_immunity_ms();
        let mut info = pending_half(
            &self.config.txn,
            (&t.name, a.queue_id, &msg.key),
            producer_group.to_owned(),
            a.timestamp_ms,
            immunity_ms,
        );
        // The record was sized when it was prepared; a size that does not fit is refused by
        // the append itself, so 0 here never reaches the index.
        info.size = Self::size_of(&a);
        let txns = self.txns.clone();
        let hook: DurableHook = Box::new(move |log_offset| {
            info.txn_id = log_offset;
            txns.insert_half(info);
        });
        (a, hook)
    }

    blocking_and_async! {
        /// Write a half message: durable when this returns (under any flush policy),
        /// invisible to every consumer until [`Broker::commit`]. If neither commit nor
        /// rollback comes within the transaction time-out, a checker of `producer_group` is
        /// asked.
        fn send_half;
        /// [`Broker::send_half`] for async code.
        async fn send_half_async;
        (&self, topic: &str, msg: &Message, producer_group: &str, opts: HalfOptions) -> Result<TxnId>;
        send_half_with(topic, msg, producer_group, &opts).map(|r| r.txn)
    }

    blocking_and_async! {
        /// [`Broker::send_half`] that also says whether the half was a duplicate of an
        /// idempotency key already stored (then nothing was written and the original
        /// transaction is returned).
        fn send_half_receipt;
        /// [`Broker::send_half_receipt`] for async code.
        async fn send_half_receipt_async;
        (&self, topic: &str, msg: &Message, producer_group: &str, opts: HalfOptions) -> Result<HalfReceipt>;
        send_half_with(topic, msg, producer_group, &opts)
    }

    /// The one path of a half: claim its idempotency key (a key already stored answers with
    /// the original transaction), then a `Half` record, synced whatever the flush policy,
    /// indexed by its hook once durable.
    async fn send_half_with<W: Wait>(
        &self,
        w: &W,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: &HalfOptions,
    ) -> Result<HalfReceipt> {
        let (t, qi, props) = self.prepare_half(topic, msg, producer_group, opts)?;
        let reservation = match self
            .claim_or_original(w, RecordKind::Half, (&t.name, &msg.properties), |rec| {
                HalfReceipt {
                    txn: TxnId(rec.header.log_offset),
                    duplicate: true,
                }
            })
            .await?
        {
            Ok(reservation) => reservation,
            Err(original) => return Ok(original),
        };
        let (a, hook) = self.half_parts(&t, qi, msg, &props, producer_group, opts);
        let hook = Self::with_reservation(&a, hook, reservation);
        let appended = w.append(&self.store, a, Hook::Durable(hook)).await?;
        Ok(HalfReceipt {
            txn: TxnId(appended.log_offset),
            duplicate: false,
        })
    }

    /// Read a pending half message back from the log.
    pub(crate) fn read_half(&self, info: &TxnInfo) -> Result<HalfMessage> {
        let rec = self.store.read_at(info.txn_id, info.size)?;
        if rec.header.kind != RecordKind::Half {
            return Err(Error::Corrupt {
                path: std::path::PathBuf::from("log"),
                offset: info.txn_id,
                reason: format!(
                    "transaction {} points at a {:?} record",
                    info.txn_id, rec.header.kind
                ),
            });
        }
        let mut properties = rec.properties;
        // The user's own properties, with the tag and message group (which the committed
        // message keeps); the idempotency key belonged to the half.
        properties.retain(|k, _| {
            !k.starts_with(RESERVED_PREFIX)
                || k == PROP_TAG
                || k == PROP_MESSAGE_GROUP
                || k == PROP_KEYS
        });
        Ok(HalfMessage {
            txn_id: TxnId(info.txn_id),
            topic: rec.topic,
            key: rec.key,
            body: rec.body,
            properties,
            producer_group: info.producer_group.clone(),
            created_ms: info.created_ms,
            checks: info.checks,
        })
    }

    /// Commit: the message becomes visible, exactly once, in its topic and key's queue.
    /// Durable when this returns. Committing again is a no-op; committing a rolled-back
    /// transaction is [`Error::TxnConflict`]; an unknown id is [`Error::UnknownTxn`].
    pub fn commit(&self, txn: TxnId) -> Result<()> {
        block_on(self.finish_with(&Blocking, txn, Outcome::Committed))
    }

    /// Roll back: the message is discarded and never visible. Durable when this returns.
    /// Rolling back again is a no-op; rolling back a committed transaction is
    /// [`Error::TxnConflict`]; an unknown id is [`Error::UnknownTxn`].
    pub fn rollback(&self, txn: TxnId) -> Result<()> {
        block_on(self.finish_with(&Blocking, txn, Outcome::RolledBack))
    }

    /// [`Broker::commit`] for async code.
    pub async fn commit_async(&self, txn: TxnId) -> Result<()> {
        self.finish_with(&Async, txn, Outcome::Committed).await
    }

    /// [`Broker::rollback`] for async code.
    pub async fn rollback_async(&self, txn: TxnId) -> Result<()> {
        self.finish_with(&Async, txn, Outcome::RolledBack).await
    }

    /// The one path of a commit or rollback: claim the transaction, append the record that
    /// ends it (synced whatever the flush policy), finish it in the index once durable.
    async fn finish_with<W: Wait>(&self, w: &W, txn: TxnId, outcome: Outcome) -> Result<()> {
        let Some(end) = self.begin_finish(txn, outcome)? else {
            return Ok(());
        };
        let hook = Hook::Durable(end.hook(&self.txns));
        w.append(&self.store, end.append(), hook).await?;
        if end.outcome == Outcome::Committed {
            crate::metrics::message_in(&end.info.topic, end.body.len());
        }
        Ok(())
    }

    /// Claim the transaction and build the record that ends it; `None` when the same
    /// outcome is already recorded.
    fn begin_finish(&self, txn: TxnId, outcome: Outcome) -> Result<Option<EndRecord>> {
        let info = match self.txns.begin_resolve(txn.0, outcome, &self.meta)? {
            Begin::Done => return Ok(None),
            Begin::Write(info) => info,
        };
        let end = self.end_record(info, outcome);
        if end.is_err() {
            self.txns.abort_resolve(txn.0);
        }
        end.map(Some)
    }

    /// A commit is the half's message (its user properties plus the transaction id) as one
    /// Message record; a rollback is a TxnEnd record with just the transaction id.
    fn end_record(&self, info: TxnInfo, outcome: Outcome) -> Result<EndRecord> {
        let (body, mut props, queue) = match outcome {
            Outcome::Committed => {
                let half = self.read_half(&info)?;
                (
                    half.body,
                    half.properties,
                    Some(self.store.queue(&info.topic, info.queue)?),
                )
            }
            Outcome::RolledBack => (Vec::new(), Properties::new(), None),
        };
        props.insert(PROP_TXN.into(), info.txn_id.to_string());
        let props = record::encode_properties(&props)?;
        Ok(EndRecord {
            info,
            outcome,
            props,
            body,
            queue,
            timestamp_ms: self.now(),
        })
    }

    /// Register the checker asked about unfinished transactions of `producer_group`. Several
    /// may be registered per group (one per producer); each check asks one of them, in turn.
    /// The group's pending halves whose last check found no producer of the group are asked
    /// about at once, not at their next scheduled check (as many as `checks_in_flight_max`
    /// leaves room for; the rest when due). Unresolved ones are left to an operator
    /// ([`Broker::rearm`]). Returns an id for [`Broker::unregister_checker`].
    pub fn register_checker(
        &self,
        producer_group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<u64> {
        validate_group_name(producer_group)?;
        let id = self.checkers.register(producer_group, checker);
        // The check-back thread asks the group at once about its halves that found no
        // producer (see `Checkers::take_arrived`).
        if let Some(t) = self.check_thread.lock().as_ref() {
            t.send(CheckMsg::Wake);
        }
        Ok(id)
    }

    /// Remove a checker registered with [`Broker::register_checker`].
    pub fn unregister_checker(&self, producer_group: &str, id: u64) {
        self.checkers.unregister(producer_group, id);
    }

    pub(crate) fn checker_for(&self, producer_group: &str) -> Option<Arc<dyn TransactionChecker>> {
        self.checkers.get(producer_group)
    }

    /// Unfinished transactions, oldest first: all, or those in `state`.
    pub fn transactions(&self, state: Option<TxnState>) -> Vec<TxnInfo> {
        self.txns.list(state)
    }

    /// Transactions that were checked `check_max` times without an answer. They stay stored
    /// and can be committed, rolled back or re-armed.
    pub fn unresolved_transactions(&self) -> Vec<TxnInfo> {
        self.txns.list(Some(TxnState::Unresolved))
    }

    /// Where a transaction is. Finished ones are known for `outcome_retention`.
    pub fn transaction_state(&self, txn: TxnId) -> Result<TxnState> {
        if let Some(info) = self.txns.get(txn.0) {
            return Ok(info.state);
        }
        match self.txns.finished(txn.0, &self.meta)? {
            Some(Outcome::Committed) => Ok(TxnState::Committed),
            Some(Outcome::RolledBack) => Ok(TxnState::RolledBack),
            None => Err(Error::UnknownTxn(txn.0)),
        }
    }

    /// Check an unfinished transaction again now, with its check count reset (for
    /// unresolved ones once the producer is back).
    pub fn rearm(&self, txn: TxnId) -> Result<()> {
        let info = self
            .txns
            .rearm(txn.0, self.now())
            .ok_or(Error::UnknownTxn(txn.0))?;
        self.txns.persist_checks(&self.meta, &[info])?;
        if let Some(t) = self.check_thread.lock().as_ref() {
            t.send(CheckMsg::Wake);
        }
        Ok(())
    }
}
