//! `halfmq trace KEY`: where is my message? Every event of every message with the key, and
//! where each is now.

use clap::Args;
use halfmq::Result;

use super::{print_json, print_out, read_data_dir, ReadFrom};

/// `halfmq trace`.
#[derive(Args)]
pub struct TraceCmd {
    /// The key (exact, case-sensitive).
    key: String,
    #[command(flatten)]
    from: ReadFrom,
    /// One JSON object (the `Trace` document), for scripts.
    #[arg(long)]
    json: bool,
}

/// Ask the broker (or read its stopped data directory) and print.
pub async fn run(cmd: TraceCmd) -> Result<()> {
    let TraceCmd { key, from, json } = cmd;
    let t = match from.data_dir {
        Some(dir) => read_data_dir("trace", dir, move |b| b.trace(&key)).await?,
        None => from.conn.connect().await?.trace(&key).await?,
    };
    if json {
        print_json(&t);
    } else {
        print_out(&t.to_string());
    }
    Ok(())
}
