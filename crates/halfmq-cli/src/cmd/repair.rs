//! `halfmq repair`: quarantine damaged acknowledged data in a stopped broker's data
//! directory, so that it opens again and serves everything else.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use halfmq::Result;
use halfmq_store::io::FsStorage;
use halfmq_store::repair::{self, RepairReport};

use super::{blocking, print_json, println_flush};

/// `halfmq repair`.
#[derive(Args)]
pub struct RepairCmd {
    /// The data directory (the broker must not be running on it).
    #[arg(long)]
    data_dir: PathBuf,
    /// Report what would be quarantined; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object per damaged range.
    #[arg(long)]
    json: bool,
}

/// Run the repair and print its report.
pub async fn run(cmd: RepairCmd) -> Result<()> {
    let dir = cmd.data_dir.clone();
    let dry_run = cmd.dry_run;
    let report: RepairReport = blocking("repair", move || {
        let storage = Arc::new(FsStorage);
        repair::repair(&*storage, &dir, dry_run)
    })
    .await?;
    if cmd.json {
        for d in &report.damaged {
            let lost: Vec<serde_json::Value> = d
                .lost
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "log_offset": l.log_offset,
                        "size": l.size,
                        "kind": l.kind,
                        "topic": l.topic,
                        "queue": l.queue,
                        "offset": l.queue_offset,
                        "key": l.key,
                        "from_index": l.from_index,
                    })
                })
                .collect();
            print_json(&serde_json::json!({
                "dry_run": report.dry_run,
                "file": d.path,
                "file_pos": d.file_pos,
                "log_offset": d.log_offset,
                "bytes": d.len,
                "reason": d.reason,
                "quarantine": d.quarantine,
                "lost": lost,
            }));
        }
        return Ok(());
    }
    for line in report.to_string().lines() {
        println_flush(line);
    }
    Ok(())
}
