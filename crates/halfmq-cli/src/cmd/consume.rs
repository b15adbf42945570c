//! `halfmq consume`: receive a topic's messages for a consumer group, acking each after it is
//! printed (or nacking it, for drills).

use std::time::{Duration, Instant};

use clap::Args;
use halfmq::{NackOutcome, PollOptions, Result, TagFilter};

use super::{json_line, println_flush, ConnArgs};

/// `halfmq consume`.
#[derive(Args, Clone)]
pub struct ConsumeCmd {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<u64>,
    /// Stop after this long without a message, ms.
    #[arg(long)]
    idle_exit_ms: Option<u64>,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
    /// Nack every message instead of acking it (a consumer that fails: for drills).
    #[arg(long)]
    nack: bool,
    /// With --nack: redeliver after this long, ms [default: the group's retry backoff].
    #[arg(long, requires = "nack")]
    nack_delay_ms: Option<u64>,
    /// Tag filter: `*` or `a || b`; other messages are acked for the group unseen.
    #[arg(long, default_value = "*")]
    filter: TagFilter,
    /// Lease each message this long instead of the group's visibility time-out, ms.
    #[arg(long)]
    lease_ms: Option<u64>,
}

/// Poll in batches until `--max` messages or `--idle-exit-ms` without one (or forever).
pub async fn run(cmd: ConsumeCmd) -> Result<()> {
    let ConsumeCmd {
        conn,
        topic,
        group,
        max,
        idle_exit_ms,
        json,
        nack,
        nack_delay_ms,
        filter,
        lease_ms,
    } = cmd;
    let opts = PollOptions::default()
        .with_filter(filter)
        .with_lease(lease_ms.map(Duration::from_millis));
    let client = conn.connect().await?;
    let mut got = 0u64;
    let mut last = Instant::now();
    loop {
        if max.is_some_and(|m| got >= m) {
            return Ok(());
        }
        let left = max.map_or(256, |m| (m - got).min(256)) as usize;
        let wait = match idle_exit_ms {
            Some(ms) => Duration::from_millis(ms)
                .saturating_sub(last.elapsed())
                .min(Duration::from_secs(1)),
            None => Duration::from_secs(1),
        };
        let batch = client
            .poll_wait_with(&group, &topic, left, wait, &opts)
            .await?;
        if batch.is_empty() {
            if idle_exit_ms.is_some_and(|ms| last.elapsed() >= Duration::from_millis(ms)) {
                return Ok(());
            }
            continue;
        }
        for d in &batch {
            let outcome = if nack {
                let o = client
                    .nack(
                        &group,
                        &topic,
                        d.queue,
                        d.offset,
                        nack_delay_ms.map(Duration::from_millis),
                    )
                    .await?;
                Some(match o {
                    NackOutcome::Redeliver { attempt, at_ms } => {
                        serde_json::json!({"redeliver": {"attempt": attempt, "at_ms": at_ms}})
                    }
                    NackOutcome::DeadLettered { dead_letter } => {
                        serde_json::json!({"dead_letter": dead_letter})
                    }
                })
            } else {
                None
            };
            if json {
                let mut v = serde_json::json!({
                    "key": d.key, "topic": d.topic, "queue": d.queue, "offset": d.offset,
                    "body_len": d.body.len(), "body_crc32": crc32fast::hash(&d.body),
                    "attempt": d.attempt, "tag": d.tag(),
                });
                if let Some(o) = outcome {
                    v["nacked"] = o;
                }
                json_line(&v);
            } else {
                println_flush(&format!(
                    "{}/{}@{} key={} attempt={}{} {}",
                    d.topic,
                    d.queue,
                    d.offset,
                    d.key,
                    d.attempt,
                    outcome.map_or(String::new(), |o| format!(" nacked={o}")),
                    String::from_utf8_lossy(&d.body)
                ));
            }
        }
        if !nack {
            let acks: Vec<(u32, u64)> = batch.iter().map(|d| (d.queue, d.offset)).collect();
            client.ack_many(&group, &topic, &acks).await?;
        }
        got += batch.len() as u64;
        last = Instant::now();
    }
}
