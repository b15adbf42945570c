//! `halfmq dlq`: a consumer group's dead letters, the messages it failed on too often.

use clap::{Args, Subcommand};
use halfmq::Result;

use super::{ms_time, print_each, println_flush, ConnArgs};

/// `halfmq dlq list|replay`.
#[derive(Subcommand)]
pub enum DlqCommand {
    /// Dead letters of a group: where each came from, why, after how many failures.
    List {
        #[command(flatten)]
        args: DlqArgs,
        /// First dead-letter offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Send a group's dead letters (not replayed yet) back to their topics.
    Replay {
        #[command(flatten)]
        args: DlqArgs,
    },
}

/// What both `dlq` commands take.
#[derive(Args)]
pub struct DlqArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// At most this many.
    #[arg(long, default_value_t = 1000)]
    max: u32,
    /// One JSON object per dead letter.
    #[arg(long)]
    json: bool,
}

/// List or replay.
pub async fn run(command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List { args, from } => list(args, from).await,
        DlqCommand::Replay { args } => replay(args).await,
    }
}

async fn list(a: DlqArgs, from: u64) -> Result<()> {
    let letters = a
        .conn
        .connect()
        .await?
        .dead_letters(&a.group, from, a.max as usize)
        .await?;
    if !a.json {
        println_flush(&format!(
            "{} dead letter(s) of group {}{}",
            letters.len(),
            a.group,
            if letters.len() as u32 >= a.max {
                " (more with --from)"
            } else {
                ""
            }
        ));
    }
    print_each(&letters, a.json, |d| {
        format!(
            "#{} {} key={} from {}/{}@{} after {} failed deliveries: {}{}",
            d.dlq_offset,
            ms_time(d.at_ms),
            d.key,
            d.topic,
            d.queue,
            d.offset,
            d.failures,
            d.reason,
            if d.replayed { " [replayed]" } else { "" }
        )
    });
    Ok(())
}

async fn replay(a: DlqArgs) -> Result<()> {
    let done = a
        .conn
        .connect()
        .await?
        .replay_dead_letters(&a.group, a.max as usize)
        .await?;
    print_each(&done, a.json, |r| {
        format!(
            "#{} key={} -> {}/{}@{}",
            r.dlq_offset, r.key, r.receipt.topic, r.receipt.queue, r.receipt.offset
        )
    });
    if !a.json {
        println_flush(&format!("{} dead letter(s) replayed", done.len()));
    }
    Ok(())
}
