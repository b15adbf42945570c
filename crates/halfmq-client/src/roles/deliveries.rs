//! A consumer as a [`Stream`] of deliveries, each of which acks or nacks itself.
//!
//! ```no_run
//! # async fn run(client: halfmq_client::Client) -> halfmq_client::Result<()> {
//! use halfmq_client::{Consumer, StreamOptions};
//!
//! let consumer = Consumer::new(client, "billing", "orders");
//! let mut deliveries = consumer.stream(StreamOptions::default());
//! while let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     println!("{} bytes, attempt {}", delivery.body.len(), delivery.attempt);
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Under the hood it long-polls the broker for a batch at a time. At most
//! [`StreamOptions::in_flight_max`] deliveries are out at once: handed out by the stream and
//! not yet acked, nacked or dropped. At that bound the stream asks the broker for nothing
//! more until one of them is settled, so a slow consumer does not lease messages it cannot
//! get to before their visibility time-out.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Consumer;
use halfmq_types::error::{Error, Result};
use halfmq_types::{Delivery, NackOutcome};

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
    /// How long one poll waits on the broker for a message before it polls again (a long
    /// poll; the broker caps it at 60 s). Default 10 s.
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

halfmq_types::with_setters! {
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
const ERROR_PAUSE: Duration = Duration::from_millis(200);

type Fetch = Pin<Box<dyn Future<Output = Result<Vec<Received>>> + Send>>;

/// The messages of a [`Consumer`]'s topic for its group, as a [`Stream`] of [`Received`]
/// deliveries (from [`Consumer::stream`]).
///
/// It never ends by itself. A failed poll (the connection is lost, the topic does not exist)
/// is an `Err` item, and the stream goes on: the next item polls again, after a short pause
/// (the client reconnects on its own). Stop on errors by leaving the loop.
///
/// Delivery is at-least-once, as with every consumer: a delivery dropped without
/// [`Received::ack`] or [`Received::nack`], or whose ack failed, is delivered again after
/// the group's visibility time-out.
pub struct Deliveries {
    consumer: Consumer,
    options: StreamOptions,
    /// One permit per delivery out, held by the [`Received`].
    permits: Arc<Semaphore>,
    /// Deliveries of the last poll not handed out yet.
    ready: VecDeque<Received>,
    /// The poll in progress.
    fetch: Option<Fetch>,
    /// The last poll failed: pause before the next.
    failed: bool,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("consumer", &self.consumer)
            .field("options", &self.options)
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl Deliveries {
    pub(crate) fn new(consumer: Consumer, mut options: StreamOptions) -> Deliveries {
        options.in_flight_max = options.in_flight_max.clamp(1, Semaphore::MAX_PERMITS);
        options.batch_max = options.batch_max.max(1);
        Deliveries {
            consumer,
            permits: Arc::new(Semaphore::new(options.in_flight_max)),
            options,
            ready: VecDeque::new(),
            fetch: None,
            failed: false,
        }
    }

    /// The next delivery: the same as `StreamExt::next`, for code without a stream
    /// extension trait at hand.
    pub async fn next(&mut self) -> Option<Result<Received>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Deliveries {
    type Item = Result<Received>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is `Unpin` (the poll in progress is boxed).
        let this = &mut *self;
        loop {
            if let Some(r) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            let fetch = this.fetch.get_or_insert_with(|| {
                Box::pin(fetch(
                    this.consumer.clone(),
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
async fn fetch(
    consumer: Consumer,
    permits: Arc<Semaphore>,
    options: StreamOptions,
    pause_first: bool,
) -> Result<Vec<Received>> {
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
        let got = consumer.poll(room.len(), options.wait).await?;
        if got.is_empty() {
            // The permits go back as `room` is dropped.
            continue;
        }
        // The broker hands out at most what was asked for; were it to send more, the rest
        // would come again after their visibility time-out.
        return Ok(got
            .into_iter()
            .zip(room)
            .map(|(delivery, permit)| Received {
                delivery,
                consumer: consumer.clone(),
                _permit: permit,
            })
            .collect());
    }
}

/// A delivered message, from a [`Deliveries`] stream. It derefs to the [`Delivery`]; settle
/// it with [`Received::ack`] or [`Received::nack`]. Until then (or until it is dropped) it
/// counts against the stream's [`StreamOptions::in_flight_max`].
pub struct Received {
    delivery: Delivery,
    consumer: Consumer,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.delivery.fmt(f)
    }
}

impl std::ops::Deref for Received {
    type Target = Delivery;

    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}

impl Received {
    /// Acknowledge it; durable when this returns. If the ack fails, the message is delivered
    /// again after the group's visibility time-out.
    pub async fn ack(self) -> Result<()> {
        self.consumer.ack(&self.delivery).await
    }

    /// Give it back: delivered again after `delay` (or the group's retry backoff when
    /// `None`); past the group's maximum it moves to the dead-letter queue.
    pub async fn nack(self, delay: Option<Duration>) -> Result<NackOutcome> {
        self.consumer.nack(&self.delivery, delay).await
    }

    /// The delivery itself, giving up its place among the stream's deliveries out without
    /// settling it: ack or nack it through the [`Consumer`] (or it is delivered again after
    /// the visibility time-out).
    pub fn into_delivery(self) -> Delivery {
        self.delivery
    }
}
