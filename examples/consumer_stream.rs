//! A consumer over the network as a stream of deliveries, each acked (or given back with a
//! nack) by itself, against a running broker (`halfmq broker`).
//!
//! Run it: `cargo run --example network_producer`, then `cargo run --example consumer_stream`
//! (or `-- ADDR` for a broker elsewhere).

use std::time::Duration;

use halfmq_client::{Client, ClientConfig, Consumer, StreamOptions};

#[tokio::main]
async fn main() -> halfmq_client::Result<()> {
    let addr = std::env::args().nth(1);
    let keys = run(addr.as_deref().unwrap_or("127.0.0.1:10911"), 3).await?;
    println!("consumed {keys:?}");
    Ok(())
}

/// Consume `count` messages of `orders` for the group `billing` from the broker at `addr`;
/// their keys and bodies.
pub async fn run(addr: &str, count: usize) -> halfmq_client::Result<Vec<String>> {
    let client =
        Client::connect(ClientConfig::new(addr).with_name("example-consumer".into())).await?;
    let consumer = Consumer::new(client, "billing", "orders");
    // At most 16 deliveries out at once: the stream asks for more only as they are settled.
    let options = StreamOptions::default()
        .with_in_flight_max(16)
        .with_wait(Duration::from_secs(1));
    // A `futures_core::Stream`: `StreamExt` combinators work on it too; its own `next` needs
    // no extension trait.
    let mut deliveries = consumer.stream(options);
    let mut seen = Vec::new();
    while seen.len() < count {
        let Some(delivery) = deliveries.next().await else {
            break;
        };
        // A failed poll (say, the broker restarting) is an error item; the stream goes on.
        let delivery = delivery?;
        // Each delivery derefs to the same `Delivery` an embedded broker hands out.
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
