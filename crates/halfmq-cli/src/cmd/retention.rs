//! `halfmq retention`: one retention pass now, and what pins the log.

use clap::Args;
use halfmq::Result;

use super::{print_json, println_flush, stats::retention_line, ConnArgs};

/// `halfmq retention`.
#[derive(Args)]
pub struct RetentionCmd {
    #[command(flatten)]
    conn: ConnArgs,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

/// Run the pass on the broker and print its report.
pub async fn run(cmd: RetentionCmd) -> Result<()> {
    let r = cmd.conn.connect().await?.enforce_retention().await?;
    if cmd.json {
        print_json(&r);
        return Ok(());
    }
    if r.disabled {
        println_flush("retention: no limit configured (--retention-bytes / --retention-age-ms): nothing is deleted");
    }
    println_flush(&format!(
        "retention: deleted {} segment(s), {} bytes; log now starts at {} and takes {} bytes; pass took {} µs (floor {} µs)",
        r.segments_deleted, r.bytes_deleted, r.log_start, r.log_bytes, r.pass_us, r.floor_us
    ));
    println_flush(&retention_line(&r.floor, r.held_by_floor));
    Ok(())
}
