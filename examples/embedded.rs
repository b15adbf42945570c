//! Embedded use, no network: the payment confirmation from the README, end to end.
//!
//! A payment service writes "paid" as a half message, charges the card, commits; an order
//! service polls, applies the confirmation idempotently (by key) and acks. This file is the
//! README's library snippet (the part between the `README` markers), compiled and run by the
//! test suite.
//!
//! Run it: `cargo run --example embedded` (data in a fresh temporary directory), or
//! `cargo run --example embedded -- DATA_DIR`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use halfmq::{Broker, BrokerConfig, CheckAnswer, HalfMessage, HalfOptions, Message};

fn main() -> halfmq::Result<()> {
    match std::env::args_os().nth(1) {
        Some(dir) => run(Path::new(&dir)),
        None => {
            let dir = tempfile::tempdir().map_err(|e| halfmq::Error::io("tempdir", "create", e))?;
            run(dir.path())
        }
    }
}

/// The cards this pretend payment service has charged, by order key.
fn charged(key: &str) -> bool {
    key == "order-42"
}

/// Open a broker in `dir`, run the payment story, close it.
pub fn run(dir: &Path) -> halfmq::Result<()> {
    let mut applied = HashSet::new();
    let mut apply_idempotently = |key: &str, body: &[u8]| {
        if applied.insert(key.to_owned()) {
            println!("order service: {key} is {}", String::from_utf8_lossy(body));
        }
    };

    // README:start
    let broker = Broker::open(BrokerConfig::new(dir))?;

    // Plain durable send: returns once the message is on disk.
    broker.send("orders", &Message::new("created").with_key("order-42"))?;

    // Transaction: invisible until commit.
    let txn = broker.send_half(
        "payments",
        &Message::new("paid").with_key("order-42"),
        "payment-service",
        HalfOptions::default(),
    )?;
    // ... charge the card ...
    broker.commit(txn)?;

    // If the payment service dies before commit, the broker asks a checker of its group.
    broker.register_checker(
        "payment-service",
        Arc::new(|h: &HalfMessage| {
            if charged(&h.key) {
                CheckAnswer::Commit
            } else {
                CheckAnswer::Rollback
            }
        }),
    )?;

    // Consumers: each group gets every message; ack makes progress durable.
    for d in broker.poll("order-service", "payments", 100)? {
        apply_idempotently(&d.key, &d.body);
        broker.ack("order-service", "payments", d.queue, d.offset)?;
    }
    // README:end

    // What a person would check: nothing is left un-acked, nothing is pending.
    let stats = broker.stats()?;
    assert_eq!(stats.txn_pending, 0);
    assert!(broker.poll("order-service", "payments", 100)?.is_empty());
    broker.close()
}
