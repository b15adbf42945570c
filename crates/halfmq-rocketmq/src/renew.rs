//! Automatic lease renewal, for a ReceiveMessage with `auto_renew` (PushConsumers send it):
//! as RocketMQ's proxy does, the endpoint renews the lease of each message it handed out
//! while the message is unsettled and its client is alive, so that a listener may take longer
//! than one lease. Each renewal is a [`Broker::change_lease`] for the receive's lease (at
//! least [`AUTO_RENEW_LEASE_MIN`]), made when a third of the lease is left. Renewal stops:
//! - when the client settles the message (AckMessage, ChangeInvisibleDuration, or
//!   ForwardMessageToDeadLetterQueue) with the handle it was given;
//! - when the client is gone: it sent NotifyClientTermination, its telemetry stream closed,
//!   or it has sent no heartbeat for [`crate::clients::HEARTBEAT_LAPSE`];
//! - when the client's session changed: the telemetry stream open at the receive is no
//!   longer its stream (it reconnected under the same id, so a receive's answer may have been
//!   lost with the old connection, and the new session may not hold the message);
//! - after [`RENEW_MAX`] from the receive (the listener is taken to be stuck);
//! - when the lease cannot be renewed (it ran out, it was settled through halfmq's own
//!   protocol, the broker restarted);
//! - when the endpoint stops.
//!
//! The lease then runs out as any, and the message is delivered again as its next attempt.
//!
//! Each renewal makes a new receipt (the old one is stale); the client keeps the handle it
//! was given, and the endpoint settles with the newest receipt when it sends that handle back.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use halfmq::{Broker, Receipt};
use parking_lot::Mutex;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::clients::Clients;

/// The longest the endpoint renews one message's lease, from its receive.
pub(crate) const RENEW_MAX: Duration = Duration::from_secs(3600);

/// The shortest lease of an auto-renewed message, so that renewals stay rare.
pub(crate) const AUTO_RENEW_LEASE_MIN: Duration = Duration::from_secs(1);

/// Messages renewed at once, at most; a receive beyond it hands out its messages with their
/// lease alone (not renewed).
pub(crate) const RENEWED_MAX: usize = 65_536;

/// One renewed message.
struct Renewed {
    group: String,
    topic: String,
    /// The receipt of its lease now.
    current: Receipt,
    /// The client renewed for.
    client: String,
    /// Its session (telemetry stream) at the receive; renewal ends with it.
    session: Option<u64>,
    /// The renewing task.
    task: AbortHandle,
}

/// The messages the endpoint renews, by the handle their client holds.
#[derive(Default)]
pub(crate) struct Renewals {
    renewed: Mutex<HashMap<String, Renewed>>,
}

impl Renewals {
    /// Renew, for `client`, the lease `lease` of the message handed out with `handle` (its
    /// receipt `receipt`) of `group` on `topic`. False when [`RENEWED_MAX`] messages are
    /// renewed already (this one is not). Call from a tokio runtime.
    pub(crate) fn start(
        self: &Arc<Self>,
        (broker, clients): (&Arc<Broker>, &Arc<Clients>),
        (group, topic): (&str, &str),
        (handle, receipt): (String, Receipt),
        (client, lease): (&str, Duration),
    ) -> bool {
        let mut renewed = self.renewed.lock();
        if renewed.len() >= RENEWED_MAX {
            return false;
        }
        let task = tokio::spawn(renew(
            Arc::downgrade(self),
            (Arc::downgrade(broker), clients.clone()),
            handle.clone(),
            lease,
        ));
        renewed.insert(
            handle,
            Renewed {
                group: group.to_owned(),
                topic: topic.to_owned(),
                current: receipt,
                client: client.to_owned(),
                session: clients.session(client),
                task: task.abort_handle(),
            },
        );
        true
    }

    /// The client settles the message it holds `handle` of: renewal stops, and the receipt
    /// of its lease now is returned (`None`: the endpoint does not renew it).
    pub(crate) fn settle(&self, handle: &str) -> Option<Receipt> {
        let r = self.renewed.lock().remove(handle)?;
        r.task.abort();
        Some(r.current)
    }

    /// Messages renewed now.
    pub(crate) fn len(&self) -> usize {
        self.renewed.lock().len()
    }

    /// Stop renewing everything (the endpoint stops).
    pub(crate) fn stop(&self) {
        for (_, r) in self.renewed.lock().drain() {
            r.task.abort();
        }
    }

    /// Renew the lease of `handle`'s message once, for `lease`; false when renewal stops
    /// (the message was settled, its client is gone, or the lease could not be renewed).
    fn renew_once(
        &self,
        broker: &Broker,
        clients: &Clients,
        handle: &str,
        lease: Duration,
    ) -> bool {
        // Under the lock: a settle either comes before (and the renewal finds nothing) or
        // after (and takes the renewed receipt). The change is in memory and does not wait.
        let mut renewed = self.renewed.lock();
        let Some(r) = renewed.get_mut(handle) else {
            return false;
        };
        if !r.session.is_some_and(|id| clients.alive_in(&r.client, id)) {
            tracing::debug!(client = %r.client, "auto-renew: the client is gone; the lease runs out");
            renewed.remove(handle);
            return false;
        }
        match broker.change_lease(&r.group, &r.topic, &r.current, lease) {
            Ok(new) => {
                r.current = new;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "auto-renew: the lease could not be renewed");
                renewed.remove(handle);
                false
            }
        }
    }

    /// Forget `handle` (its renewal ends on its own).
    fn forget(&self, handle: &str) {
        self.renewed.lock().remove(handle);
    }
}

/// The renewing task of one message: renews when a third of the lease is left, until
/// renewal stops (see the module docs).
async fn renew(
    renewals: Weak<Renewals>,
    (broker, clients): (Weak<Broker>, Arc<Clients>),
    handle: String,
    lease: Duration,
) {
    let started = Instant::now();
    let ahead = lease / 3;
    let mut due = started + lease;
    loop {
        tokio::time::sleep_until(due - ahead).await;
        let Some(renewals) = renewals.upgrade() else {
            return;
        };
        if started.elapsed() + lease > RENEW_MAX {
            tracing::debug!(
                "auto-renew: the message was renewed for the longest allowed; the lease runs out"
            );
            renewals.forget(&handle);
            return;
        }
        let Some(broker) = broker.upgrade() else {
            renewals.forget(&handle);
            return;
        };
        let now = Instant::now();
        if !renewals.renew_once(&broker, &clients, &handle, lease) {
            return;
        }
        due = now + lease;
    }
}
