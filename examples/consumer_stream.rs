//! A consumer as a stream of deliveries, each acked (or given back with a nack) by itself:
//! over the network against a running broker (`halfmq broker`), or embedded. The loop that
//! consumes ([`consume`]) is the same code for both: the embedded `halfmq::Consumer` and the
//! network `halfmq_client::Consumer` hand out the same stream of the same deliveries.
//!
//! Run it: `cargo run --example network_producer`, then `cargo run --example consumer_stream`
//! (or `-- ADDR` for a broker elsewhere); `cargo run --example consumer_stream -- --embedded`
//! needs no broker.

use std::path::Path;
use std::time::Duration;

use halfmq_client::deliveries::{Deliveries, Source};
use halfmq_client::{Client, ClientConfig, StreamOptions};

#[tokio::main]
async fn main() -> halfmq_client::Result<()> {
    let keys = match std::env::args().nth(1) {
        Some(flag) if flag == "--embedded" => {
            let dir = tempfile::tempdir().map_err(|e| halfmq::Error::io("tempdir", "create", e))?;
            run_embedded(dir.path(), 3).await?
        }
        addr => run(addr.as_deref().unwrap_or("127.0.0.1:10911"), 3).await?,
    };
    println!("consumed {keys:?}");
    Ok(())
}

/// At most 16 deliveries out at once: the stream asks for more only as they are settled.
fn options() -> StreamOptions {
    StreamOptions::default()
        .with_in_flight_max(16)
        .with_wait(Duration::from_secs(1))
}

/// Consume `count` messages of `orders` for the group `billing` from the broker at `addr`;
/// their keys and bodies.
pub async fn run(addr: &str, count: usize) -> halfmq_client::Result<Vec<String>> {
    let client =
        Client::connect(ClientConfig::new(addr).with_name("example-consumer".into())).await?;
    let consumer = halfmq_client::Consumer::new(client, "billing", "orders");
    consume(consumer.stream(options()), count).await
}

/// The same, embedded: a broker on `dir` with three orders (and one message that always
/// fails), consumed by the very same loop.
pub async fn run_embedded(dir: &Path, count: usize) -> halfmq::Result<Vec<String>> {
    let broker = halfmq::Broker::open(halfmq::BrokerConfig::new(dir))?;
    for body in ["created", "poison", "paid", "shipped"] {
        let msg = halfmq::Message::new(body).with_key("order-42");
        broker.send_async("orders", &msg).await?;
    }
    let consumer = halfmq::Consumer::new(broker.clone(), "billing", "orders");
    let seen = consume(consumer.stream(options()), count).await;
    drop(consumer);
    broker.close()?;
    seen
}

/// `count` deliveries of a stream, embedded or network alike: each acked, except a "poison"
/// one, which is given back.
pub async fn consume<S: Source>(
    mut deliveries: Deliveries<S>,
    count: usize,
) -> halfmq_client::Result<Vec<String>> {
    // A `futures_core::Stream`: `StreamExt` combinators work on it too; its own `next` needs
    // no extension trait.
    let mut seen = Vec::new();
    while seen.len() < count {
        let Some(delivery) = deliveries.next().await else {
            break;
        };
        // A failed poll (say, the broker restarting) is an error item; the stream goes on.
        let delivery = delivery?;
        // Each delivery derefs to the same `Delivery` either way.
        let body = String::from_utf8_lossy(&delivery.body).into_owned();
        if body == "poison" {
            // Given back: delivered again after the group's retry backoff, and moved to the
            // dead-letter queue once it has failed too often.
            delivery.nack(None).await?;
            continue;
        }
        seen.push(format!("{}={body}", delivery.key));
        delivery.ack().await?;
    }
    Ok(seen)
}
