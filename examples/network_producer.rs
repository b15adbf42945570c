//! A producer over the network: plain durable sends, a send with an idempotency key that is
//! safe to retry, and a transaction, against a running broker (`halfmq broker`).
//!
//! Run it: `halfmq broker` in one terminal, then `cargo run --example network_producer`
//! (or `-- ADDR` for a broker elsewhere).

use std::sync::Arc;

use halfmq_client::{
    CheckAnswer, Client, ClientConfig, Error, HalfMessage, HalfOptions, Message, Producer,
    TransactionalProducer,
};

#[tokio::main]
async fn main() -> halfmq_client::Result<()> {
    let addr = std::env::args().nth(1);
    run(addr.as_deref().unwrap_or("127.0.0.1:10911")).await
}

/// Send the orders of the story to the broker at `addr`.
pub async fn run(addr: &str) -> halfmq_client::Result<()> {
    let client =
        Client::connect(ClientConfig::new(addr).with_name("example-producer".into())).await?;
    match client.create_topic("orders", 4).await {
        // A topic created earlier with another queue count is the broker's own typed error.
        Ok(_) | Err(Error::TopicExists { .. }) => {}
        Err(e) => return Err(e),
    }

    // Plain durable send: answered once the message is on the broker's disk.
    let producer = Producer::new(client.clone());
    let receipt = producer
        .send("orders", &Message::new("created").with_key("order-42"))
        .await?;
    println!(
        "stored in queue {} at offset {}",
        receipt.queue, receipt.offset
    );

    // After a time-out or a lost connection the outcome of a send is unknown: send again
    // with the same idempotency key, and the broker stores it once.
    let paid = Message::new("paid")
        .with_key("order-42")
        .with_idempotency_key("order-42/paid");
    let first = producer.send("orders", &paid).await?;
    let again = producer.send("orders", &paid).await?;
    assert!(again.duplicate && again.offset == first.offset);

    // A transaction: invisible to consumers until committed; the checker answers for this
    // producer group if it dies before it commits.
    let checker = Arc::new(|_: &HalfMessage| CheckAnswer::Commit);
    let txns = TransactionalProducer::new(client, "shipping", checker).await?;
    let txn = txns
        .send_half(
            "orders",
            &Message::new("shipped").with_key("order-42"),
            HalfOptions::default(),
        )
        .await?;
    txns.commit(txn).await?;
    println!("transaction {} committed", txn.0);
    Ok(())
}
