//! A transactional producer whose process dies between its half message and its commit, and
//! the check-back that finishes the transaction for it.
//!
//! 1. A payment service writes a half message and "crashes" (it never commits).
//! 2. A new instance of the service registers a checker for its producer group.
//! 3. When the half is older than the transaction time-out, the broker asks the checker, which
//!    looks up its own records (here: a set of charged orders) and answers commit.
//! 4. The order service then sees the confirmation, exactly once.
//!
//! Run it: `cargo run --example transactional`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use halfmq::{Broker, BrokerConfig, CheckAnswer, HalfMessage, HalfOptions, Message, TxnState};

fn main() -> halfmq::Result<()> {
    let dir = tempfile::tempdir().map_err(|e| halfmq::Error::io("tempdir", "create", e))?;
    run(dir.path())
}

/// Run the story in a broker kept in `dir`.
pub fn run(dir: &Path) -> halfmq::Result<()> {
    let mut config = BrokerConfig::new(dir);
    // Ask about an unfinished transaction after 200 ms instead of RocketMQ's 6 s, so the
    // example does not keep you waiting.
    config.txn.timeout = Duration::from_millis(200);
    config.txn.check_interval = Duration::from_millis(100);

    // The payment service's own record of what it charged (its database, in real life).
    let charged: Arc<HashSet<String>> = Arc::new(["order-7".to_owned()].into());

    // 1. The half message is durable when send_half returns; then the service dies.
    let txn = {
        let broker = Broker::open(config.clone())?;
        let msg = Message::new("paid 12.50").with_key("order-7");
        let txn = broker.send_half("payments", &msg, "payment-service", HalfOptions::default())?;
        println!("payment service: half message {txn} written, now crashing before commit");
        broker.close()?;
        txn
    };

    // 2. The broker restarts (or never stopped); a new instance of the service registers
    //    the checker of its producer group.
    let broker = Broker::open(config)?;
    assert_eq!(broker.transaction_state(txn)?, TxnState::Pending);
    broker.register_checker(
        "payment-service",
        Arc::new(move |half: &HalfMessage| {
            let answer = if charged.contains(&half.key) {
                CheckAnswer::Commit
            } else {
                CheckAnswer::Rollback
            };
            println!(
                "checker: asked about {} ({}): {answer:?}",
                half.txn_id, half.key
            );
            answer
        }),
    )?;

    // 3 and 4. The order service long-polls; the confirmation appears once the check-back
    //    has committed it.
    let got = broker.poll_wait("order-service", "payments", 10, Duration::from_secs(30))?;
    let confirmation = got.first().ok_or_else(|| halfmq::Error::Invalid {
        what: "example",
        reason: "the check-back did not commit the transaction within 30 s".into(),
    })?;
    println!(
        "order service: {} is {}",
        confirmation.key,
        String::from_utf8_lossy(&confirmation.body)
    );
    broker.ack(
        "order-service",
        "payments",
        confirmation.queue,
        confirmation.offset,
    )?;
    assert_eq!(broker.transaction_state(txn)?, TxnState::Committed);
    broker.close()
}
