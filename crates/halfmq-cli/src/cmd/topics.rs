//! `halfmq topics`: create and list topics.

use clap::Subcommand;
use halfmq::Result;

use super::{json_line, println_flush, ConnArgs};

/// `halfmq topics create|list`.
#[derive(Subcommand)]
pub enum TopicsCommand {
    /// Create a topic.
    Create {
        #[command(flatten)]
        conn: ConnArgs,
        /// Name.
        name: String,
        /// Queues.
        #[arg(long, default_value_t = 4)]
        queues: u32,
    },
    /// List topics.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// One JSON object per topic.
        #[arg(long)]
        json: bool,
    },
}

/// Create or list.
pub async fn run(command: TopicsCommand) -> Result<()> {
    match command {
        TopicsCommand::Create { conn, name, queues } => {
            conn.connect().await?.create_topic(&name, queues).await?;
            println_flush(&format!("topic {name} with {queues} queues"));
        }
        TopicsCommand::List { conn, json } => {
            for halfmq::TopicInfo { name, queues } in conn.connect().await?.topics().await? {
                if json {
                    json_line(&serde_json::json!({"name": name, "queues": queues}));
                } else {
                    println_flush(&format!("{name} ({queues} queues)"));
                }
            }
        }
    }
    Ok(())
}
