//! A consumer as a [`Stream`] of deliveries, each of which acks or nacks itself, over any
//! [`Source`] of deliveries: the embedded broker's consumer (`halfmq::Consumer`) and the
//! network client's (`halfmq_client::Consumer`) are both one, so a loop over their streams
//! reads the same either way.
//!
//! The stream polls its source for a batch at a time. At most
//! [`StreamOptions::in_flight_max`] deliveries are out at once: handed out by the stream and
//! not yet acked, nacked or dropped. At that bound the stream asks for nothing more until one
//! of them is settled, so a slow consumer does not lease messages it cannot get to before
//! their visibility time-out.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::{Delivery, NackOutcome};

/// Where a [`Deliveries`] stream takes its messages from and settles them: one consumer group
/// on one topic. Cheap to clone (every delivery holds a clone to settle itself with).
pub trait Source: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Up to `max` messages, waiting up to `wait` for the first (none when `wait` passes).
    fn poll(
        &self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send;

    /// Acknowledge a delivered message; durable when the future is done.
    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<()>> + Send;

    /// Give back a delivered message: delivered again after `delay` (or the group's retry
    /// backoff when `None`); past the group's maximum it moves to the dead-letter queue.
    fn nack(
        &self,
        delivery: &Delivery,
        delay: Option<Duration>,
    ) -> impl Future<Output = Result<NackOutcome>> + Send;
}

/// How a [`Deliveries`] stream polls. `#[non_exhaustive]`: start from `default()` and use the
/// `with_` setters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamOptions {
    /// Most deliveries out at once (handed out, not yet acked, nacked or dropped). Default
    /// 64; at least 1.
    pub in_flight_max: usize,
    /// Most messages one poll asks for. Default 32; at least 1.
    pub batch_max: usize,
    /// How long one poll waits for a message before it polls again (a long poll; a network
    /// broker caps it at 60 s). Default 10 s.
    pub wait: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            in_flight_max: 64,
            batch_max: 32,
            wait: Duration::from_secs(10),
        }
    }
}

crate::with_setters! {
    StreamOptions {
        /// Sets [`StreamOptions::in_flight_max`].
        with_in_flight_max => in_flight_max: usize;
        /// Sets [`StreamOptions::batch_max`].
        with_batch_max => batch_max: usize;
        /// Sets [`StreamOptions::wait`].
        with_wait => wait: Duration;
    }
}

/// After a failed poll, the stream waits this long before it polls again, so that a
/// consumer that keeps going on errors does not spin.
pub const ERROR_PAUSE: Duration = Duration::from_millis(200);

type Fetch<S> = Pin<Box<dyn Future<Output = Result<Vec<Received<S>>>> + Send>>;

/// The messages of a [`Source`] (a consumer group on a topic), as a [`Stream`] of
/// [`Received`] deliveries.
///
/// It never ends by itself. A failed poll (the connection is lost, the topic does not exist)
/// is an `Err` item, and the stream goes on: the next item polls again, after a short pause
/// ([`ERROR_PAUSE`]). Stop on errors by leaving the loop.
///
/// Delivery is at-least-once, as with every consumer: a delivery dropped without
/// [`Received::ack`] or [`Received::nack`], or whose ack failed, is delivered again after
/// the group's visibility time-out.
pub struct Deliveries<S: Source> {
    source: S,
    options: StreamOptions,
    /// One permit per delivery out, held by the [`Received`].
    permits: Arc<Semaphore>,
    /// Deliveries of the last poll not handed out yet.
    ready: VecDeque<Received<S>>,
    /// The poll in progress.
    fetch: Option<Fetch<S>>,
    /// The last poll failed: pause before the next.
    failed: bool,
}

impl<S: Source> std::fmt::Debug for Deliveries<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("source", &self.source)
            .field("options", &self.options)
            .field("ready", &self.ready.len())
            .finish()
    }
}

// Nothing of a `Deliveries` is ever pinned in place: the poll in progress is boxed, and the
// source is only cloned.
impl<S: Source> Unpin for Deliveries<S> {}

impl<S: Source> Deliveries<S> {
    /// The deliveries of `source`, polled as `options` say (a bound of 0 counts as 1).
    pub fn new(source: S, mut options: StreamOptions) -> Deliveries<S> {
        options.in_flight_max = options.in_flight_max.clamp(1, Semaphore::MAX_PERMITS);
        options.batch_max = options.batch_max.max(1);
        Deliveries {
            source,
            permits: Arc::new(Semaphore::new(options.in_flight_max)),
            options,
            ready: VecDeque::new(),
            fetch: None,
            failed: false,
        }
    }

    /// The next delivery: the same as `StreamExt::next`, for code without a stream
    /// extension trait at hand.
    pub async fn next(&mut self) -> Option<Result<Received<S>>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl<S: Source> Stream for Deliveries<S> {
    type Item = Result<Received<S>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(r) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            let fetch = this.fetch.get_or_insert_with(|| {
                Box::pin(fetch(
                    this.source.clone(),
                    this.permits.clone(),
                    this.options.clone(),
                    std::mem::take(&mut this.failed),
                ))
            });
            let got = match fetch.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(got) => got,
            };
            this.fetch = None;
            match got {
                Ok(batch) => this.ready.extend(batch),
                Err(e) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

/// One poll of the stream: wait for room for one delivery, take what room there is up to a
/// batch, and long-poll for that many until some come.
async fn fetch<S: Source>(
    source: S,
    permits: Arc<Semaphore>,
    options: StreamOptions,
    pause_first: bool,
) -> Result<Vec<Received<S>>> {
    if pause_first {
        tokio::time::sleep(ERROR_PAUSE).await;
    }
    loop {
        // The semaphore is never closed; the error is only there for completeness.
        let first = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let mut room = vec![first];
        while room.len() < options.batch_max {
            match permits.clone().try_acquire_owned() {
                Ok(p) => room.push(p),
                Err(_) => break,
            }
        }
        let got = source.poll(room.len(), options.wait).await?;
        if got.is_empty() {
            // The permits go back as `room` is dropped.
            continue;
        }
        // A source hands out at most what was asked for; were it to give more, the rest
        // would come again after their visibility time-out.
        return Ok(got
            .into_iter()
            .zip(room)
            .map(|(delivery, permit)| Received {
                delivery,
                source: source.clone(),
                _permit: permit,
            })
            .collect());
    }
}

/// A delivered message, from a [`Deliveries`] stream. It derefs to the [`Delivery`]; settle
/// it with [`Received::ack`] or [`Received::nack`]. Until then (or until it is dropped) it
/// counts against the stream's [`StreamOptions::in_flight_max`].
pub struct Received<S: Source> {
    delivery: Delivery,
    source: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: Source> std::fmt::Debug for Received<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.delivery.fmt(f)
    }
}

impl<S: Source> std::ops::Deref for Received<S> {
    type Target = Delivery;

    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}

impl<S: Source> Received<S> {
    /// Acknowledge it; durable when this returns. If the ack fails, the message is delivered
    /// again after the group's visibility time-out.
    pub async fn ack(self) -> Result<()> {
        self.source.ack(&self.delivery).await
    }

    /// Give it back: delivered again after `delay` (or the group's retry backoff when
    /// `None`); past the group's maximum it moves to the dead-letter queue.
    pub async fn nack(self, delay: Option<Duration>) -> Result<NackOutcome> {
        self.source.nack(&self.delivery, delay).await
    }

    /// The delivery itself, giving up its place among the stream's deliveries out without
    /// settling it: ack or nack it through the consumer (or it is delivered again after the
    /// visibility time-out).
    pub fn into_delivery(self) -> Delivery {
        self.delivery
    }
}
