//! The `halfmq` command line: parse arguments, set up logging, hand the command to its
//! module in [`cmd`].
//!
//! Exit codes: 0 ok; 1 an error (one line on stderr, `halfmq: error: ...`); 2 bad arguments.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

mod cmd;

/// The allocator of the binary (library users keep their own).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "halfmq",
    version,
    about = "A transactional message queue with a durable commit log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// The broker's variant carries every setting; a command line is parsed once and dropped at
// dispatch, so its size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the broker (Ctrl-C or SIGTERM stops it cleanly).
    Broker(cmd::broker::BrokerCmd),
    /// Send messages; with --json one line per message once the broker stored it durably.
    Produce(cmd::produce::ProduceCmd),
    /// Receive messages of a topic for a consumer group; each is acked after it is printed
    /// (or, with --nack, given back for redelivery).
    Consume(cmd::consume::ConsumeCmd),
    /// Dead-letter queues: messages a group failed to process too often.
    Dlq {
        #[command(subcommand)]
        command: cmd::dlq::DlqCommand,
    },
    /// Delivery settings of a consumer group (visibility time-out, retries, backoff).
    Groups {
        #[command(subcommand)]
        command: cmd::groups::GroupsCommand,
    },
    /// Transactions.
    Txn {
        #[command(subcommand)]
        command: cmd::txn::TxnCommand,
    },
    /// A replicated cluster (`halfmq broker --peers`).
    Cluster {
        #[command(subcommand)]
        command: cmd::cluster::ClusterCommand,
    },
    /// Topics.
    Topics {
        #[command(subcommand)]
        command: cmd::topics::TopicsCommand,
    },
    /// Per topic and queue: messages, backlog per group; pending and unresolved transactions.
    Stats(cmd::stats::StatsCmd),
    /// Where is my message? Every event of every message with this key (half, check-backs,
    /// commit or rollback, stored, deliveries, acks, retries, dead letters, replays), and
    /// where each is now.
    Trace(cmd::trace::TraceCmd),
    /// Run one retention pass now: delete the old log segments the configured limits allow
    /// and nothing still needs; print what was deleted and what pins the rest.
    Retention(cmd::retention::RetentionCmd),
    /// Quarantine damaged acknowledged data in a stopped broker's data directory: copy the
    /// damaged bytes aside, report the messages lost (topic, queue, offset, key), and let the
    /// broker open again with everything else.
    Repair(cmd::repair::RepairCmd),
    /// Measure durable throughput and latency.
    Bench(cmd::bench::BenchArgs),
}

/// Transparent huge pages off for this process (and what it starts), unless
/// `MIMALLOC_ALLOW_THP` is set, which then decides as mimalloc reads it. mimalloc takes fresh
/// memory from the kernel as the heap grows and gives it back after a second unused; with
/// huge pages every first touch of a 2 MiB region made the kernel zero all of it, 30% of a
/// replicated leader's CPU in a profile (ARCHITECTURE.md, "Replication"). Best effort: a
/// kernel without them has nothing to turn off.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    halfmq_cli::logs::init();
    let matches = cmd::broker::with_defaults_in_help(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("halfmq: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, &matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halfmq: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run the command; `matches` are the parsed command line, which the broker reads to tell
/// flags from environment variables.
async fn run(command: Command, matches: &ArgMatches) -> halfmq::Result<()> {
    match command {
        Command::Broker(c) => cmd::broker::run(c, matches.subcommand_matches("broker")).await,
        Command::Produce(c) => cmd::produce::run(c).await,
        Command::Consume(c) => cmd::consume::run(c).await,
        Command::Dlq { command } => cmd::dlq::run(command).await,
        Command::Groups { command } => cmd::groups::run(command).await,
        Command::Txn { command } => cmd::txn::run(command).await,
        Command::Topics { command } => cmd::topics::run(command).await,
        Command::Cluster { command } => cmd::cluster::run(command).await,
        Command::Stats(c) => cmd::stats::run(c).await,
        Command::Trace(c) => cmd::trace::run(c).await,
        Command::Retention(c) => cmd::retention::run(c).await,
        Command::Repair(c) => cmd::repair::run(c).await,
        // The bench drives its own runtimes and threads: it runs off this executor.
        Command::Bench(a) => cmd::blocking("the bench", move || cmd::bench::run(a)).await,
    }
}
