//! `halfmq stats`: the log, transactions, and one row per queue and consumer group; and the
//! table the broker prints when it starts.

use std::fmt::Write as _;

use clap::Args;
use halfmq::{Result, RetentionFloor, Stats};

use super::{print_json, print_out, read_data_dir, ReadFrom};

/// `halfmq stats`.
#[derive(Args)]
pub struct StatsCmd {
    #[command(flatten)]
    from: ReadFrom,
    /// One JSON object.
    #[arg(long)]
    json: bool,
}

/// Ask the broker (or read its stopped data directory) and print.
pub async fn run(cmd: StatsCmd) -> Result<()> {
    let s: Stats = match cmd.from.data_dir {
        Some(dir) => read_data_dir("stats", dir, |b| b.stats()).await?,
        None => cmd.from.conn.connect().await?.stats().await?,
    };
    if cmd.json {
        print_json(&s);
    } else {
        print_out(&stats_table(&s));
    }
    Ok(())
}

/// "what pins retention" for people.
pub fn retention_line(f: &RetentionFloor, held: bool) -> String {
    match &f.pinned_by {
        Some(p) => format!(
            "retention floor: log offset {}{}, pinned by {p}",
            f.floor,
            if held {
                " (a limit is exceeded but this is still needed)"
            } else {
                ""
            }
        ),
        None => format!(
            "retention floor: log offset {} (nothing older is needed)",
            f.floor
        ),
    }
}

/// What opening found wrong with `meta/` (nothing when it was as new as the log).
fn meta_lines(out: &mut String, m: &halfmq::MetaRecovery) {
    if let Some(why) = &m.rebuilt {
        let _ = writeln!(
            out,
            "metadata: rebuilt from the log at offset {} ({} records) because {why}",
            m.rebuilt_from, m.records_replayed
        );
    }
    if let Some(aside) = &m.moved_aside {
        let _ = writeln!(out, "metadata: the damaged database was moved to {aside}");
    }
    for o in &m.offsets_lost {
        let _ = writeln!(
            out,
            "metadata: position may have gone back (redelivery): {o}"
        );
    }
    for o in &m.offsets_clamped {
        let _ = writeln!(
            out,
            "metadata: offset past the end of the queue, clamped: {o}"
        );
    }
    if m.outcomes_fenced > 0 {
        let _ = writeln!(
            out,
            "metadata: {} transaction outcome(s) past the end of the log forgotten",
            m.outcomes_fenced
        );
    }
}

/// `halfmq stats` for people: the log and transactions, then one row per queue and
/// consumer group.
pub fn stats_table(s: &Stats) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "log: {} segment(s), durable up to offset {}; transactions: {} pending, {} unresolved{}",
        s.log.segments,
        s.log.durable_offset,
        s.txn_pending,
        s.txn_unresolved,
        if s.txn_unresolved > 0 {
            " (see `halfmq txn list --state unresolved`)"
        } else {
            ""
        }
    );
    if s.log.index_entries_rebuilt > 0 {
        let _ = writeln!(
            out,
            "consume queues: {} damaged entries rebuilt from the log since the start (see the broker's log)",
            s.log.index_entries_rebuilt
        );
    }
    if s.delayed_pending > 0 {
        let _ = writeln!(out, "delayed: {} pending", s.delayed_pending);
    }
    if let Some(r) = &s.retention {
        let _ = writeln!(
            out,
            "log start: offset {}, log size {} bytes; {}",
            s.log.log_start,
            s.log.log_bytes,
            retention_line(
                &r.floor,
                r.last_pass.as_ref().is_some_and(|p| p.held_by_floor)
            )
        );
        if r.expired_skipped > 0 {
            let _ = writeln!(
                out,
                "expired: {} message(s) skipped by polls because retention had deleted them",
                r.expired_skipped
            );
        }
    }
    meta_lines(&mut out, &s.meta);
    for d in &s.dead_letters {
        let _ = writeln!(
            out,
            "dead letters of {}: {} waiting, {} replayed (see `halfmq dlq list --group {}`)",
            d.group,
            d.messages.saturating_sub(d.replayed),
            d.replayed,
            d.group
        );
    }
    if s.queues.is_empty() {
        out.push_str("topics: none yet\n");
        return out;
    }
    let row = |out: &mut String, cells: [&str; 10]| {
        let [topic, queue, messages, group, committed, backlog, lag, in_flight, retrying, oldest] =
            cells;
        let _ = writeln!(
            out,
            "{topic:<24} {queue:>5} {messages:>10}  {group:<20} {committed:>10} {backlog:>10} {lag:>10} {in_flight:>9} {retrying:>8}  {oldest}"
        );
    };
    row(
        &mut out,
        [
            "topic",
            "queue",
            "messages",
            "group",
            "committed",
            "backlog",
            "lag",
            "in-flight",
            "retrying",
            "oldest-un-acked",
        ],
    );
    for q in &s.queues {
        let (queue, messages) = (q.queue.to_string(), q.messages.to_string());
        if q.groups.is_empty() {
            row(
                &mut out,
                [&q.topic, &queue, &messages, "-", "", "", "", "", "", ""],
            );
        }
        for g in &q.groups {
            let oldest = g
                .oldest_unacked_age_ms
                .map_or_else(|| "-".to_owned(), human_age);
            row(
                &mut out,
                [
                    &q.topic,
                    &queue,
                    &messages,
                    &g.group,
                    &g.committed.to_string(),
                    &g.backlog.to_string(),
                    &g.lag.to_string(),
                    &g.in_flight.to_string(),
                    &g.retrying.to_string(),
                    &oldest,
                ],
            );
        }
    }
    out
}

/// An age for people: "850 ms", "12.3 s", "4m 05s", "3h 02m", "2d 04h".
fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{s}.{} s", ms % 1000 / 100),
        60_000..3_600_000 => format!("{}m {:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_for_people() {
        for (ms, text) in [
            (0, "0 ms"),
            (999, "999 ms"),
            (1_000, "1.0 s"),
            (59_999, "59.9 s"),
            (60_000, "1m 00s"),
            (245_000, "4m 05s"),
            (3_600_000 * 3 + 120_000, "3h 02m"),
            (86_400_000 * 2 + 3_600_000 * 4 + 1, "2d 04h"),
        ] {
            assert_eq!(human_age(ms), text);
        }
    }

    #[test]
    fn stats_table_has_a_row_per_queue_and_group() {
        let stats: halfmq::Stats = serde_json::from_value(serde_json::json!({
            "log": {"segments": 1, "first_offset": 32, "durable_offset": 500,
                    "written_offset": 500, "syncs": 3, "records": 4},
            "queues": [
                {"topic": "payments", "queue": 0, "messages": 3, "groups": [
                    {"group": "orders", "committed": 1, "backlog": 1, "lag": 2,
                     "in_flight": 1, "retrying": 0, "oldest_unacked_age_ms": 65_000},
                    {"group": "audit", "committed": 3, "backlog": 0, "lag": 0,
                     "oldest_unacked_age_ms": null}]},
                {"topic": "payments", "queue": 1, "messages": 0, "groups": []}
            ],
            "txn_pending": 2,
            "txn_unresolved": 1
        }))
        .unwrap();
        let t = stats_table(&stats);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert!(t.starts_with("log: 1 segment(s), durable up to offset 500; transactions: 2 pending, 1 unresolved (see"), "{t}");
        assert_eq!(lines.len(), 5, "{t}");
        assert_eq!(
            lines[2],
            ["payments", "0", "3", "orders", "1", "1", "2", "1", "0", "1m", "05s"]
        );
        assert_eq!(
            lines[3],
            ["payments", "0", "3", "audit", "3", "0", "0", "0", "0", "-"]
        );
        assert_eq!(lines[4], ["payments", "1", "0", "-"]);
    }

    #[test]
    fn stats_json_from_an_older_broker_still_reads() {
        // A broker without lag and oldest un-acked age: the fields default.
        let stats: halfmq::Stats = serde_json::from_value(serde_json::json!({
            "log": {"segments": 1, "first_offset": 32, "durable_offset": 32,
                    "written_offset": 32, "syncs": 0, "records": 0},
            "queues": [{"topic": "t", "queue": 0, "messages": 1, "groups": [
                {"group": "g", "committed": 0, "backlog": 1}]}],
            "txn_pending": 0,
            "txn_unresolved": 0
        }))
        .unwrap();
        let g = &stats.queues[0].groups[0];
        assert_eq!((g.lag, g.oldest_unacked_age_ms), (0, None));
    }
}
