//! A consumer as a [`Stream`](futures_core::Stream) of deliveries, each of which acks or
//! nacks itself: [`Consumer::stream`].
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
//! The stream is `halfmq-types`' [`Deliveries`](halfmq_types::deliveries::Deliveries) over
//! this [`Consumer`], the same one the embedded broker's consumer (`halfmq::Consumer`) has: a
//! loop over either reads the same. It long-polls the broker for a batch at a time; at most
//! [`StreamOptions::in_flight_max`] deliveries are out at once (handed out, not yet acked,
//! nacked or dropped), so a slow consumer does not lease messages it cannot get to before
//! their visibility time-out. A failed poll is an `Err` item, and the stream goes on (the
//! client reconnects on its own).

use std::future::Future;
use std::time::Duration;

use super::Consumer;
use halfmq_types::deliveries::{self, Source};
use halfmq_types::error::Result;
use halfmq_types::{Delivery, NackOutcome};

pub use halfmq_types::deliveries::StreamOptions;

/// The messages of a [`Consumer`]'s topic for its group, as a
/// [`Stream`](futures_core::Stream) of [`Received`] deliveries (from [`Consumer::stream`]).
/// See [`halfmq_types::deliveries::Deliveries`].
pub type Deliveries = deliveries::Deliveries<Consumer>;

/// A delivered message, from a [`Deliveries`] stream: it derefs to the [`Delivery`] and
/// settles itself with `ack()` or `nack()`. See [`halfmq_types::deliveries::Received`].
pub type Received = deliveries::Received<Consumer>;

impl Source for Consumer {
    fn poll(
        &self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send {
        Consumer::poll(self, max, wait)
    }

    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<()>> + Send {
        Consumer::ack(self, delivery)
    }

    fn nack(
        &self,
        delivery: &Delivery,
        delay: Option<Duration>,
    ) -> impl Future<Output = Result<NackOutcome>> + Send {
        Consumer::nack(self, delivery, delay)
    }
}
