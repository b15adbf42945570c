//! The `halfmq` command line: parse arguments, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use halfmq::bench::{self, BenchOptions};
use halfmq::{Broker, BrokerConfig, FlushPolicy, StoreConfig};

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

#[derive(Clone, Copy, ValueEnum)]
enum Flush {
    /// Acknowledge after fdatasync (nothing acknowledged is lost on power loss).
    Sync,
    /// Acknowledge after write; sync every --flush-interval-ms.
    Async,
}

#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// Data directory.
    #[arg(long, env = "HALFMQ_DATA_DIR", default_value = "halfmq-data")]
    data_dir: PathBuf,
    /// When a send is acknowledged.
    #[arg(long, value_enum, env = "HALFMQ_FLUSH", default_value = "sync")]
    flush: Flush,
    /// Longest time an acknowledged message may stay unsynced with --flush async.
    #[arg(long, env = "HALFMQ_FLUSH_INTERVAL_MS", default_value_t = 100)]
    flush_interval_ms: u64,
}

impl StoreArgs {
    fn policy(&self) -> FlushPolicy {
        match self.flush {
            Flush::Sync => FlushPolicy::Sync,
            Flush::Async => FlushPolicy::Async {
                interval: Duration::from_millis(self.flush_interval_ms),
            },
        }
    }

    fn config(&self) -> BrokerConfig {
        let mut c = BrokerConfig::new(&self.data_dir);
        c.store = StoreConfig {
            flush: self.policy(),
            ..StoreConfig::default()
        };
        c
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker on a data directory (embedded engine; runs until Ctrl-C or SIGTERM).
    Broker {
        #[command(flatten)]
        store: StoreArgs,
        /// Open, recover, print the status and exit instead of running.
        #[arg(long)]
        check: bool,
    },
    /// Print topics, queues, consumer-group backlog and log figures of a data directory.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure durable send throughput and latency.
    Bench {
        /// Run against an embedded broker (the only mode so far).
        #[arg(long, required = true)]
        embedded: bool,
        /// Data directory for the run (default: a fresh directory here, removed afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Concurrent producers.
        #[arg(long, default_value_t = 64)]
        producers: usize,
        /// Body bytes per message.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Stop after this many messages.
        #[arg(long)]
        messages: Option<u64>,
        /// Stop after this many seconds (default 10 when --messages is not given).
        #[arg(long)]
        seconds: Option<f64>,
        /// When a send is acknowledged.
        #[arg(long, value_enum, default_value = "sync")]
        flush: Flush,
        /// First measure the raw disk (write + fdatasync) on the same directory.
        #[arg(long)]
        baseline: bool,
        /// One OS thread per producer calling the blocking send (default: async tasks on a
        /// tokio runtime with one worker per core).
        #[arg(long)]
        threads: bool,
        /// Transactions: each message is a half message plus a commit. Plain sends are
        /// measured first in the same run, for ratio_to_plain.
        #[arg(long)]
        txn: bool,
        /// Instead of throughput: the cost of one check-back tick with --pending unfinished
        /// transactions of which --due are due.
        #[arg(long, conflicts_with = "txn")]
        txn_tick: bool,
        /// Unfinished transactions for --txn-tick.
        #[arg(long, default_value_t = 1_000_000)]
        pending: u64,
        /// Due transactions for --txn-tick.
        #[arg(long, default_value_t = 100)]
        due: u64,
        /// Print one JSON object as the last line of stdout.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HALFMQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halfmq: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> halfmq::Result<()> {
    match cli.command {
        Command::Broker { store, check } => broker(&store, check),
        Command::Stats { store, json } => stats(&store, json),
        Command::Bench {
            embedded: _,
            data_dir,
            producers,
            size,
            messages,
            seconds,
            flush,
            baseline,
            threads,
            txn,
            txn_tick,
            pending,
            due,
            json,
        } => {
            let (data_dir, cleanup) = match data_dir {
                Some(d) => (d, false),
                None => (
                    PathBuf::from(format!("halfmq-bench-{}", std::process::id())),
                    true,
                ),
            };
            let policy = match flush {
                Flush::Sync => FlushPolicy::Sync,
                Flush::Async => FlushPolicy::Async {
                    interval: Duration::from_millis(100),
                },
            };
            if txn_tick {
                let dir = data_dir.clone();
                eprintln!(
                    "halfmq bench: mode=txn_tick pending={pending} due={due} dir={}",
                    dir.display()
                );
                let r = bench::run_check_tick(&dir, pending, due, &mut |line| eprintln!("{line}"));
                if cleanup {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                let r = r?;
                println!(
                    "one check-back tick with {} pending, {} due: {} µs (start checks {} µs + apply answers {} µs); setup wrote the halves in {:.1} s",
                    r.pending, r.due, r.tick_us, r.dispatch_us, r.apply_us, r.fill_seconds
                );
                if json {
                    match serde_json::to_string(&r) {
                        Ok(s) => println!("{s}"),
                        Err(e) => eprintln!("halfmq: cannot encode the report as JSON: {e}"),
                    }
                }
                return Ok(());
            }
            let opts = BenchOptions {
                txn,
                threads,
                data_dir,
                cleanup,
                producers,
                size,
                messages,
                seconds,
                flush: policy,
                baseline,
            };
            eprintln!(
                "halfmq bench: mode=embedded producers={producers} size={size} flush={} messages={messages:?} seconds={seconds:?} dir={} cores={}",
                if matches!(policy, FlushPolicy::Sync) { "sync" } else { "async" },
                opts.data_dir.display(),
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            );
            let report = bench::run_embedded(&opts, &mut |line| eprintln!("{line}"))?;
            print_bench(&report, json);
            Ok(())
        }
    }
}

fn print_bench(r: &bench::BenchReport, json: bool) {
    println!(
        "{} msgs in {:.2} s: {:.0} msg/s, {:.1} MiB/s; latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        r.messages, r.seconds, r.msgs_per_s, r.mib_per_s, r.p50_us, r.p99_us, r.p999_us, r.max_us
    );
    println!(
        "group commit: {:.0} fsyncs/s, {:.1} messages per fsync",
        r.fsyncs_per_s, r.msgs_per_fsync
    );
    if let (Some(raw), Some(ratio), Some(p99), Some(pr)) = (
        r.raw_group_msgs_per_s,
        r.ratio_to_raw,
        r.raw_serial_fsync_p99_us,
        r.p99_ratio_to_raw_fsync,
    ) {
        println!(
            "raw disk: {:.0} msg/s of this size in 256 KiB fsynced writes ({:.1} MiB/s); one 1 KiB write+fdatasync p99 {p99} µs",
            raw,
            r.raw_group_mib_per_s.unwrap_or_default()
        );
        println!("ratio to raw throughput: {ratio:.3}; p99 / raw fsync p99: {pr:.2}");
    }
    if let (Some(plain), Some(ratio)) = (r.plain_msgs_per_s, r.ratio_to_plain) {
        println!("plain durable sends in the same run: {plain:.0} msg/s; transactions / plain: {ratio:.3}");
    }
    if json {
        match serde_json::to_string(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("halfmq: cannot encode the report as JSON: {e}"),
        }
    }
}

fn print_status(b: &Broker) -> halfmq::Result<()> {
    let r = b.recovery_report();
    println!("data directory: {}", b.data_dir().display());
    println!(
        "recovery: {} segment(s), read {} record(s) from log offset {}, log ends at {}{}{}",
        r.segments,
        r.records_scanned,
        r.scanned_from,
        r.log_end,
        if r.torn_bytes_cut > 0 {
            format!(", cut a torn tail of {} bytes", r.torn_bytes_cut)
        } else {
            String::new()
        },
        if r.full_rebuild {
            ", rebuilt all indexes"
        } else {
            ""
        },
    );
    print_stats_table(&b.stats()?);
    Ok(())
}

fn print_stats_table(s: &halfmq::Stats) {
    println!(
        "log: {} segment(s), durable up to offset {}",
        s.log.segments, s.log.durable_offset
    );
    if s.queues.is_empty() {
        println!("topics: none yet");
        return;
    }
    println!(
        "{:<24} {:>5} {:>12}  groups (committed / backlog)",
        "topic", "queue", "messages"
    );
    for q in &s.queues {
        let groups: Vec<String> = q
            .groups
            .iter()
            .map(|g| format!("{} {}/{}", g.group, g.committed, g.backlog))
            .collect();
        println!(
            "{:<24} {:>5} {:>12}  {}",
            q.topic,
            q.queue,
            q.messages,
            groups.join(", ")
        );
    }
}

fn stats(args: &StoreArgs, json: bool) -> halfmq::Result<()> {
    let mut config = args.config();
    config.txn.check_back = false;
    let b = Broker::open(config)?;
    let s = b.stats()?;
    if json {
        match serde_json::to_string(&s) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("halfmq: cannot encode stats as JSON: {e}"),
        }
    } else {
        print_stats_table(&s);
    }
    b.close()
}

fn broker(args: &StoreArgs, check: bool) -> halfmq::Result<()> {
    let b = Broker::open(args.config())?;
    print_status(&b)?;
    if check {
        return b.close();
    }
    println!("running the embedded engine (network serving is not built yet); Ctrl-C or SIGTERM stops it cleanly");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| halfmq::Error::io(&args.data_dir, "start runtime", e))?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| halfmq::Error::io(&args.data_dir, "install signal handler", e))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<(), halfmq::Error>(())
    })?;
    b.close()?;
    println!("stopped cleanly");
    Ok(())
}
