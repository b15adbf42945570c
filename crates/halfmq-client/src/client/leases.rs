//! Polls with options and everything done by receipt: the embedded `Broker`'s `poll_with`,
//! `ack_receipts`, `nack_receipt`, `dead_letter_receipt` and `change_lease`, made `async`
//! (requests `Receive`, `AckReceipts`, `NackReceipt`, `DeadLetterReceipt` and `ChangeLease`).

use std::time::Duration;

use super::{count, millis, unexpected, Client};
use crate::protocol::{Request, Response};
use halfmq_types::error::{Error, Result};
use halfmq_types::{Delivery, NackOutcome, PollOptions, Receipt, SendReceipt};

impl Client {
    /// [`Client::poll`] with options: each message is leased for `opts.lease` instead of the
    /// group's visibility time-out, and only messages passing `opts.filter` are handed out
    /// (the others are acked for the group). Without waiting.
    pub async fn poll_with(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        opts: &PollOptions,
    ) -> Result<Vec<Delivery>> {
        self.poll_wait_with(group, topic, max, Duration::ZERO, opts)
            .await
    }

    /// [`Client::poll_wait`] with options ([`Client::poll_with`]).
    pub async fn poll_wait_with(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        timeout: Duration,
        opts: &PollOptions,
    ) -> Result<Vec<Delivery>> {
        opts.validate()?;
        let req = Request::Receive {
            group: group.into(),
            topic: topic.into(),
            max: count(max),
            wait_ms: millis(timeout),
            lease_ms: opts.lease.map(millis),
            filter: opts.filter.to_string(),
        };
        let got =
            answer!(self.request(&req, 128, timeout, true).await?, Response::Received(m) => m)?;
        got.into_iter().map(|d| d.into_delivery()).collect()
    }

    /// Acknowledge messages by their receipts with one durable write; all or nothing
    /// ([`Error::BadReceipt`], [`Error::StaleReceipt`]).
    pub async fn ack_receipts(&self, group: &str, topic: &str, receipts: &[Receipt]) -> Result<()> {
        let req = Request::AckReceipts {
            group: group.into(),
            topic: topic.into(),
            receipts: receipts.iter().map(Receipt::handle).collect(),
        };
        answer!(self.call(req).await?, Response::Ok => ())
    }

    /// Acknowledge one message by its receipt ([`Client::ack_receipts`]).
    pub async fn ack_receipt(&self, group: &str, topic: &str, receipt: &Receipt) -> Result<()> {
        self.ack_receipts(group, topic, std::slice::from_ref(receipt))
            .await
    }

    /// [`Client::nack`] by receipt: it must name the message's lease now.
    pub async fn nack_receipt(
        &self,
        group: &str,
        topic: &str,
        receipt: &Receipt,
        delay: Option<Duration>,
    ) -> Result<NackOutcome> {
        let req = Request::NackReceipt {
            group: group.into(),
            topic: topic.into(),
            receipt: receipt.handle(),
            delay_ms: delay.map(millis),
        };
        answer!(self.call(req).await?, Response::Nacked(o) => o)
    }

    /// Move a delivered message to the group's dead-letter queue now, by its receipt
    /// (whatever its failure count); returns where the dead letter is.
    pub async fn dead_letter_receipt(
        &self,
        group: &str,
        topic: &str,
        receipt: &Receipt,
        reason: &str,
    ) -> Result<SendReceipt> {
        let req = Request::DeadLetterReceipt {
            group: group.into(),
            topic: topic.into(),
            receipt: receipt.handle(),
            reason: reason.into(),
        };
        answer!(self.call(req).await?,
            Response::Nacked(NackOutcome::DeadLettered { dead_letter }) => dead_letter)
    }

    /// Change the lease of a delivered message to run out `lease` from now, without
    /// counting a failure; returns the new receipt (the old one is stale from now on).
    /// `lease` travels in whole milliseconds.
    pub async fn change_lease(
        &self,
        group: &str,
        topic: &str,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Receipt> {
        let req = Request::ChangeLease {
            group: group.into(),
            topic: topic.into(),
            receipt: receipt.handle(),
            lease_ms: millis(lease),
        };
        let receipt =
            answer!(self.call(req).await?, Response::LeaseChanged { receipt } => receipt)?;
        Receipt::parse(&receipt).map_err(|e| Error::Decode {
            what: "receipt",
            reason: e.to_string(),
        })
    }
}
