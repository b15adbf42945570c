//! `halfmq produce`: send messages, one line per message once the broker stored it durably.

use clap::Args;
use halfmq::{Message, Result};
use halfmq_client::Client;

use super::{json_line, ms_time, println_flush, ConnArgs};

/// `halfmq produce`.
#[derive(Args, Clone)]
pub struct ProduceCmd {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// The key of every message.
    #[arg(long, conflicts_with = "key_prefix")]
    key: Option<String>,
    /// Keys are PREFIX-0, PREFIX-1, ... (default: a random prefix, so keys are unique).
    #[arg(long)]
    key_prefix: Option<String>,
    /// Body text.
    #[arg(long, conflicts_with = "size")]
    body: Option<String>,
    /// Random body of this many bytes.
    #[arg(long)]
    size: Option<usize>,
    /// Messages to send.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Idempotency key: a message whose key the broker already stored is not stored
    /// again (the original is reported, "duplicate"). With --count N the keys are K-0 ..
    /// K-(N-1).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
    /// Deliver each message this long from now, ms (stored durably now, invisible until
    /// then).
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Tag of every message (what `consume --filter` matches).
    #[arg(long)]
    tag: Option<String>,
    /// Message group of every message (its queue; in order for a FIFO consumer group).
    #[arg(long)]
    message_group: Option<String>,
}

impl ProduceCmd {
    /// Message number `i` of this run, and its key.
    fn message(&self, prefix: &str, i: u64) -> (String, Message) {
        let k = self.key.clone().unwrap_or_else(|| format!("{prefix}-{i}"));
        let b = match (&self.body, self.size) {
            (Some(t), _) => t.clone().into_bytes(),
            (None, Some(n)) => (0..n).map(|_| fastrand::u8(..)).collect(),
            (None, None) => format!("message {i}").into_bytes(),
        };
        let mut msg = Message::new(b).with_key(&k);
        if let Some(ik) = &self.idempotency_key {
            msg = msg.with_idempotency_key(if self.count > 1 {
                format!("{ik}-{i}")
            } else {
                ik.clone()
            });
        }
        if let Some(t) = &self.tag {
            msg = msg.with_tag(t);
        }
        if let Some(g) = &self.message_group {
            msg = msg.with_message_group(g);
        }
        (k, msg)
    }

    /// Send one message and print what the broker answered.
    async fn send_one(&self, client: &Client, k: &str, msg: &Message) -> Result<()> {
        let json = self.json;
        if let Some(ms) = self.delay_ms {
            let at = halfmq::clock::now_ms() + ms;
            let r = client.send_delayed(&self.topic, msg, at).await?;
            if json {
                json_line(&serde_json::json!({
                    "key": k, "topic": r.topic, "queue": r.queue, "delayed_id": r.id,
                    "deliver_at_ms": r.deliver_at_ms,
                }));
            } else {
                println_flush(&format!(
                    "stored {k} for {}/{}, to be delivered at {}",
                    r.topic,
                    r.queue,
                    ms_time(r.deliver_at_ms)
                ));
            }
            return Ok(());
        }
        let r = client.send(&self.topic, msg).await?;
        if json {
            json_line(
                &serde_json::json!({"key": k, "topic": r.topic, "queue": r.queue, "offset": r.offset, "duplicate": r.duplicate}),
            );
        } else if r.duplicate {
            println_flush(&format!(
                "duplicate of {k}: already stored in {}/{} at offset {}",
                r.topic, r.queue, r.offset
            ));
        } else {
            println_flush(&format!(
                "stored {k} in {}/{} at offset {}",
                r.topic, r.queue, r.offset
            ));
        }
        Ok(())
    }
}

/// Send `--count` messages one after the other, following the leader when `--addr` names
/// several nodes of a cluster; on an error, say how many were acknowledged before it, so
/// that a script knows where to resume.
///
/// With several addresses every message carries an idempotency key (`--idempotency-key`'s,
/// or one the client makes): a send whose fate is unknown (its node died, or lost its
/// leadership, before answering) is made again under the same key on the new leader, which
/// stores it only if the first attempt was not committed. A line is printed only for a send
/// the cluster acknowledged.
pub async fn run(cmd: ProduceCmd) -> Result<()> {
    let client = cmd.conn.connect().await?;
    let prefix = cmd
        .key_prefix
        .clone()
        .unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)));
    for i in 0..cmd.count {
        let (k, msg) = cmd.message(&prefix, i);
        if let Err(e) = cmd.send_one(&client, &k, &msg).await {
            eprintln!(
                "halfmq: {i} of {} messages were acknowledged before this error",
                cmd.count
            );
            return Err(e);
        }
    }
    Ok(())
}
