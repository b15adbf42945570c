//! `halfmq groups`: a consumer group's delivery settings, and forgetting a group.

use clap::{Args, Subcommand};
use halfmq::{GroupSettings, Result};
use halfmq_client::protocol::WireGroup;

use super::{json_line, println_flush, ConnArgs};

/// `halfmq groups set|show|delete`.
#[derive(Subcommand)]
pub enum GroupsCommand {
    /// Override a group's delivery settings (others keep the broker default).
    Set {
        #[command(flatten)]
        args: GroupArgs,
        /// Not acked within this, a delivery fails and the message is delivered again, ms.
        #[arg(long)]
        visibility_timeout_ms: Option<u64>,
        /// Failed deliveries before the message moves to the dead-letter queue.
        #[arg(long)]
        max_retries: Option<u32>,
        /// Waits before redelivery 1, 2, ... after a nack, ms, comma-separated.
        #[arg(long, value_delimiter = ',')]
        retry_backoff_ms: Option<Vec<u64>>,
        /// FIFO message groups (true or false): the next message of a message group is
        /// handed out only after the one before it is acked or dead-lettered.
        #[arg(long)]
        fifo: Option<bool>,
    },
    /// A group's delivery settings in force.
    Show {
        #[command(flatten)]
        args: GroupArgs,
    },
    /// Forget a group that is no longer used: its offsets, acks, retries and settings, so
    /// that it stops holding old messages from retention. Refused while one of its
    /// consumers holds a message. Its dead letters are kept.
    Delete {
        #[command(flatten)]
        args: GroupArgs,
    },
}

/// What every `groups` command takes.
#[derive(Args)]
pub struct GroupArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Consumer group.
    group: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// Set, show or delete.
pub async fn run(command: GroupsCommand) -> Result<()> {
    let (a, set) = match command {
        GroupsCommand::Delete { args } => return delete(args).await,
        GroupsCommand::Set {
            args,
            visibility_timeout_ms,
            max_retries,
            retry_backoff_ms,
            fifo,
        } => (
            args,
            Some(GroupSettings {
                visibility_timeout_ms,
                max_retries,
                retry_backoff_ms,
                fifo,
            }),
        ),
        GroupsCommand::Show { args } => (args, None),
    };
    let client = a.conn.connect().await?;
    // The wire form of the settings is also what `--json` prints, with `fifo`.
    let (in_force, overrides) = match set {
        Some(s) => (client.set_group_settings(&a.group, &s).await?, s),
        None => client.group_settings(&a.group).await?,
    };
    let (fifo, fifo_set) = (in_force.fifo, overrides.fifo.is_some());
    let g = WireGroup::new(&in_force, overrides);
    if a.json {
        let mut v = serde_json::json!(g);
        v["fifo"] = serde_json::json!(fifo);
        v["overrides"]["fifo"] = serde_json::json!(fifo_set.then_some(fifo));
        json_line(&v);
        return Ok(());
    }
    let set_mark = |overridden: bool| if overridden { " (set)" } else { "" };
    println_flush(&format!(
        "group {}: visibility time-out {} ms{}, max retries {}{}, retry backoff {:?} ms{}, fifo {}{}",
        a.group,
        g.visibility_timeout_ms,
        set_mark(g.overrides.visibility_timeout_ms.is_some()),
        g.max_retries,
        set_mark(g.overrides.max_retries.is_some()),
        g.retry_backoff_ms,
        set_mark(g.overrides.retry_backoff_ms.is_some()),
        if fifo { "on" } else { "off" },
        set_mark(fifo_set),
    ));
    Ok(())
}

async fn delete(a: GroupArgs) -> Result<()> {
    let d = a.conn.connect().await?.delete_group(&a.group).await?;
    if a.json {
        json_line(&serde_json::json!(d));
        return Ok(());
    }
    let dlq = match &d.dead_letter_queue {
        Some(t) => format!(
            "; its dead letters are kept in {t} (halfmq dlq list {})",
            a.group
        ),
        None => String::new(),
    };
    println_flush(&format!(
        "group {} deleted: offsets of {} queue(s) forgotten{dlq}",
        a.group, d.queues
    ));
    Ok(())
}
