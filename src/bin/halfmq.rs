//! The `halfmq` command line: parse arguments, set up logging, call the library.
//!
//! Exit codes: 0 ok; 1 an error (one line on stderr, `halfmq: error: ...`); 2 bad arguments.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use halfmq::bench::{self, BenchOptions};
use halfmq::broker::NackOutcome;
use halfmq::meta::GroupSettings;
use halfmq::net::client::{Client, ClientConfig};
use halfmq::net::metrics_http::MetricsServer;
use halfmq::net::server::Server;
use halfmq::settings::Settings;
use halfmq::{
    Broker, CheckAnswer, FlushPolicy, HalfMessage, HalfOptions, Message, TxnId, TxnState,
};

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

impl Flush {
    fn name(self) -> &'static str {
        match self {
            Flush::Sync => "sync",
            Flush::Async => "async",
        }
    }
}

/// Broker settings; each also comes from the environment and the TOML file (flags win).
#[derive(Args, Clone)]
struct BrokerArgs {
    /// TOML file with settings (see --print-config for every key).
    #[arg(long, env = "HALFMQ_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: halfmq-data].
    #[arg(long, env = "HALFMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:10911].
    #[arg(long, env = "HALFMQ_LISTEN")]
    listen: Option<String>,
    /// Shared secret clients must present (required off loopback).
    #[arg(long, env = "HALFMQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// When a write is acknowledged [default: sync].
    #[arg(long, value_enum, env = "HALFMQ_FLUSH")]
    flush: Option<Flush>,
    /// Sync interval with --flush async, ms [default: 100].
    #[arg(long, env = "HALFMQ_FLUSH_INTERVAL_MS")]
    flush_interval_ms: Option<u64>,
    /// Create topics on first use [default: true].
    #[arg(long, env = "HALFMQ_AUTO_CREATE_TOPICS")]
    auto_create_topics: Option<bool>,
    /// Queues of auto-created topics [default: 4].
    #[arg(long, env = "HALFMQ_DEFAULT_QUEUES")]
    default_queues: Option<u32>,
    /// First check-back this long after a half message, ms [default: 6000].
    #[arg(long, env = "HALFMQ_TXN_TIMEOUT_MS")]
    txn_timeout_ms: Option<u64>,
    /// Wait after the first failed check, ms; doubles up to the maximum [default: 30000].
    #[arg(long, env = "HALFMQ_TXN_CHECK_INTERVAL_MS")]
    txn_check_interval_ms: Option<u64>,
    /// Longest wait between checks, ms [default: 300000].
    #[arg(long, env = "HALFMQ_TXN_CHECK_BACKOFF_MAX_MS")]
    txn_check_backoff_max_ms: Option<u64>,
    /// Checks before a transaction is unresolved [default: 15].
    #[arg(long, env = "HALFMQ_TXN_CHECK_MAX")]
    txn_check_max: Option<u32>,
    /// A started frame must be complete within this, ms [default: 30000].
    #[arg(long, env = "HALFMQ_FRAME_TIMEOUT_MS")]
    frame_timeout_ms: Option<u64>,
    /// A connection must send its Hello within this, ms [default: 10000].
    #[arg(long, env = "HALFMQ_HELLO_TIMEOUT_MS")]
    hello_timeout_ms: Option<u64>,
    /// A delivery not acked within this is delivered again, ms; per group with
    /// `halfmq groups set` [default: 30000].
    #[arg(long, env = "HALFMQ_VISIBILITY_TIMEOUT_MS")]
    visibility_timeout_ms: Option<u64>,
    /// Failed deliveries before a message moves to the group's dead-letter queue
    /// [default: 16].
    #[arg(long, env = "HALFMQ_MAX_RETRIES")]
    max_retries: Option<u32>,
    /// Waits before redelivery 1, 2, ... after a nack, ms, comma-separated
    /// [default: 1000,5000,10000,30000,60000,...,3600000,7200000].
    #[arg(long, env = "HALFMQ_RETRY_BACKOFF_MS", value_delimiter = ',')]
    retry_backoff_ms: Option<Vec<u64>>,
    /// How long idempotency keys are remembered, ms [default: 86400000 = 24 h].
    #[arg(long, env = "HALFMQ_DEDUP_WINDOW_MS")]
    dedup_window_ms: Option<u64>,
    /// Most idempotency keys remembered (oldest forgotten first) [default: 1000000].
    #[arg(long, env = "HALFMQ_DEDUP_KEYS_MAX")]
    dedup_keys_max: Option<u64>,
    /// Most memory remembered idempotency keys may take, bytes [default: 268435456].
    #[arg(long, env = "HALFMQ_DEDUP_BYTES_MAX")]
    dedup_bytes_max: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics ("off" turns it off) [default: off].
    #[arg(long, env = "HALFMQ_METRICS", value_name = "ADDR")]
    metrics: Option<String>,
    /// Retention: delete the oldest log segments while the log is larger than this, bytes;
    /// only segments every consumer group has acked past and nothing pending needs
    /// [default: no size limit, keep everything].
    #[arg(long, env = "HALFMQ_RETENTION_BYTES")]
    retention_bytes: Option<u64>,
    /// Retention: delete log segments whose newest message is older than this, ms; same
    /// conditions [default: no age limit, keep everything].
    #[arg(long, env = "HALFMQ_RETENTION_AGE_MS")]
    retention_age_ms: Option<u64>,
    /// How often retention runs when a limit is set, ms [default: 60000].
    #[arg(long, env = "HALFMQ_RETENTION_INTERVAL_MS")]
    retention_interval_ms: Option<u64>,
}

impl BrokerArgs {
    fn settings(&self) -> halfmq::Result<Settings> {
        let file = match &self.config {
            Some(p) => Settings::from_file(p)?,
            None => Settings::default(),
        };
        let flags = Settings {
            data_dir: self.data_dir.clone(),
            listen: self.listen.clone(),
            token: self.token.clone(),
            flush: self.flush.map(|f| f.name().to_owned()),
            flush_interval_ms: self.flush_interval_ms,
            auto_create_topics: self.auto_create_topics,
            default_queues: self.default_queues,
            txn_timeout_ms: self.txn_timeout_ms,
            txn_check_interval_ms: self.txn_check_interval_ms,
            txn_check_backoff_max_ms: self.txn_check_backoff_max_ms,
            txn_check_max: self.txn_check_max,
            frame_timeout_ms: self.frame_timeout_ms,
            hello_timeout_ms: self.hello_timeout_ms,
            visibility_timeout_ms: self.visibility_timeout_ms,
            max_retries: self.max_retries,
            retry_backoff_ms: self.retry_backoff_ms.clone(),
            dedup_window_ms: self.dedup_window_ms,
            dedup_keys_max: self.dedup_keys_max,
            dedup_bytes_max: self.dedup_bytes_max,
            metrics: self.metrics.clone(),
            retention_bytes: self.retention_bytes,
            retention_age_ms: self.retention_age_ms,
            retention_interval_ms: self.retention_interval_ms,
            ..Settings::default()
        };
        Ok(file.overlay(flags))
    }
}

/// Where the broker is.
#[derive(Args, Clone)]
struct ConnArgs {
    /// Broker address.
    #[arg(long, env = "HALFMQ_ADDR", default_value = "127.0.0.1:10911")]
    addr: String,
    /// Shared secret, if the broker requires one.
    #[arg(long, env = "HALFMQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Time-out of each request, ms.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

impl ConnArgs {
    async fn connect(&self) -> halfmq::Result<Client> {
        Client::connect(ClientConfig {
            addr: self.addr.clone(),
            token: self.token.clone(),
            name: "halfmq-cli".into(),
            request_timeout: Duration::from_millis(self.timeout_ms),
            ..ClientConfig::default()
        })
        .await
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (Ctrl-C or SIGTERM stops it cleanly).
    Broker {
        #[command(flatten)]
        args: BrokerArgs,
        /// Print the effective configuration (defaults filled in) and exit.
        #[arg(long)]
        print_config: bool,
        /// Open the data directory, recover, print its status and exit, without serving.
        #[arg(long)]
        check: bool,
    },
    /// Send messages; with --json one line per message once the broker stored it durably.
    Produce {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        args: ProduceArgs,
    },
    /// Receive messages of a topic for a consumer group; each is acked after it is printed
    /// (or, with --nack, given back for redelivery).
    Consume {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        args: ConsumeArgs,
    },
    /// Dead-letter queues: messages a group failed to process too often.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Delivery settings of a consumer group (visibility time-out, retries, backoff).
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// Transactions.
    Txn {
        #[command(subcommand)]
        command: TxnCommand,
    },
    /// Topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Per topic and queue: messages, backlog per group; pending and unresolved transactions.
    Stats {
        #[command(flatten)]
        conn: ConnArgs,
        /// Read a data directory directly instead (the broker must not be running on it).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Where is my message? Every event of every message with this key (half, check-backs,
    /// commit or rollback, stored, deliveries, acks, retries, dead letters, replays), and
    /// where each is now.
    Trace {
        /// The key (exact, case-sensitive).
        key: String,
        #[command(flatten)]
        conn: ConnArgs,
        /// Read a data directory directly instead (the broker must not be running on it).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// One JSON object (the `Trace` document), for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Run one retention pass now: delete the old log segments the configured limits allow
    /// and nothing still needs; print what was deleted and what pins the rest.
    Retention {
        #[command(flatten)]
        conn: ConnArgs,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Measure durable throughput and latency.
    Bench(BenchArgs),
}

#[derive(Args, Clone)]
struct ProduceArgs {
    /// Topic.
    #[arg(long)]
    topic: String,
    /// The key of every message.
    #[arg(long, conflicts_with = "key_prefix")]
    key: Option<String>,
    /// Keys are PREFIX-0, PREFIX-1, ... (default: a random prefix, so keys are unique).
    #[arg(long)]
    key_prefix: Option<String>,
    /// Body text.
    #[arg(long, conflicts_with = "size")]
    body: Option<String>,
    /// Random body of this many bytes.
    #[arg(long)]
    size: Option<usize>,
    /// Messages to send.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Idempotency key: a message whose key the broker already stored is not stored
    /// again (the original is reported, "duplicate"). With --count N the keys are K-0 ..
    /// K-(N-1).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
    /// Deliver each message this long from now, ms (stored durably now, invisible until
    /// then).
    #[arg(long)]
    delay_ms: Option<u64>,
}

#[derive(Args, Clone)]
struct ConsumeArgs {
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
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters of a group: where each came from, why, after how many failures.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// First dead-letter offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        max: u32,
        /// One JSON object per dead letter.
        #[arg(long)]
        json: bool,
    },
    /// Send a group's dead letters (not replayed yet) back to their topics.
    Replay {
        #[command(flatten)]
        conn: ConnArgs,
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        max: u32,
        /// One JSON object per replayed message.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GroupsCommand {
    /// Override a group's delivery settings (others keep the broker default).
    Set {
        #[command(flatten)]
        conn: ConnArgs,
        /// Consumer group.
        group: String,
        /// Not acked within this, a delivery fails and the message is delivered again, ms.
        #[arg(long)]
        visibility_timeout_ms: Option<u64>,
        /// Failed deliveries before the message moves to the dead-letter queue.
        #[arg(long)]
        max_retries: Option<u32>,
        /// Waits before redelivery 1, 2, ... after a nack, ms, comma-separated.
        #[arg(long, value_delimiter = ',')]
        retry_backoff_ms: Option<Vec<u64>>,
    },
    /// A group's delivery settings in force.
    Show {
        #[command(flatten)]
        conn: ConnArgs,
        /// Consumer group.
        group: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Forget a group that is no longer used: its offsets, acks, retries and settings, so
    /// that it stops holding old messages from retention. Refused while one of its
    /// consumers holds a message. Its dead letters are kept.
    Delete {
        #[command(flatten)]
        conn: ConnArgs,
        /// Consumer group.
        group: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TxnCommand {
    /// Write a half message and exit without an outcome, as a crashed payment service would.
    Begin {
        #[command(flatten)]
        conn: ConnArgs,
        /// Topic.
        #[arg(long)]
        topic: String,
        /// Key.
        #[arg(long)]
        key: String,
        /// Producer group asked at check-back.
        #[arg(long)]
        group: String,
        /// Body text.
        #[arg(long, default_value = "")]
        body: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Commit a transaction.
    Commit {
        #[command(flatten)]
        conn: ConnArgs,
        /// Transaction id.
        id: u64,
    },
    /// Roll back a transaction.
    Rollback {
        #[command(flatten)]
        conn: ConnArgs,
        /// Transaction id.
        id: u64,
    },
    /// Check an unfinished transaction again now, with its check count reset.
    Rearm {
        #[command(flatten)]
        conn: ConnArgs,
        /// Transaction id.
        id: u64,
    },
    /// Unfinished transactions.
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// One JSON object per transaction.
        #[arg(long)]
        json: bool,
    },
    /// Stay connected as a producer of GROUP and answer every check-back with ANSWER.
    Checker {
        #[command(flatten)]
        conn: ConnArgs,
        /// Producer group.
        #[arg(long)]
        group: String,
        /// The answer to give.
        #[arg(long, value_enum)]
        answer: AnswerArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Pending,
    Unresolved,
}

#[derive(Clone, Copy, ValueEnum)]
enum AnswerArg {
    Commit,
    Rollback,
    Unknown,
}

#[derive(Subcommand)]
enum TopicsCommand {
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

#[derive(Args)]
struct BenchArgs {
    /// Against an embedded broker in this process.
    #[arg(long, conflicts_with = "addr", required_unless_present_any = ["addr", "trace"])]
    embedded: bool,
    /// Against the broker at this address (mode "broker").
    #[arg(long)]
    addr: Option<String>,
    /// Shared secret for --addr.
    #[arg(long, env = "HALFMQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connections for --addr; producers share them, many requests in flight on each.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// With --addr: afterwards, the same load on an embedded broker in this process, for
    /// ratio_to_embedded.
    #[arg(long, requires = "addr")]
    compare_embedded: bool,
    /// Data directory for embedded runs (default: a fresh directory here, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Concurrent producers.
    #[arg(long, default_value_t = 64)]
    producers: usize,
    /// Sends each producer keeps in flight: it issues the next without waiting for the
    /// previous acknowledgement, up to this many outstanding (async producers only).
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Body bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Stop after this many messages.
    #[arg(long)]
    messages: Option<u64>,
    /// Stop after this many seconds (default 10 when --messages is not given).
    #[arg(long)]
    seconds: Option<f64>,
    /// When a send is acknowledged (embedded).
    #[arg(long, value_enum, default_value = "sync")]
    flush: Flush,
    /// First measure the raw disk (write + fdatasync) on the same directory.
    #[arg(long)]
    baseline: bool,
    /// One OS thread per producer calling the blocking send (default: async tasks).
    #[arg(long)]
    threads: bool,
    /// Transactions: each message is a half message plus a commit; plain sends are measured
    /// first in the same run, for ratio_to_plain.
    #[arg(long)]
    txn: bool,
    /// Instead: the cost of one check-back tick with --pending unfinished transactions of
    /// which --due are due.
    #[arg(long, conflicts_with = "txn")]
    txn_tick: bool,
    /// Every message with a unique idempotency key; sends without keys are measured first
    /// in the same run, for ratio_to_without_keys.
    #[arg(long, conflicts_with_all = ["txn", "txn_tick", "addr"])]
    idempotency_keys: bool,
    /// With --txn, --idempotency-keys or --compare-embedded (default 3), or --baseline with
    /// plain sends (default 1): run the pair (without, with; or raw disk, store) this many
    /// times, alternating; the ratio is the median of the rounds' ratios (robust to a burst
    /// of load from other processes on a shared machine, and to the disk's own rate moving).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
    /// Instead: fill a store with --messages keyed messages (default 10 000 000), time
    /// `trace` of --samples random keys, reopen it and time them again; a keyless fill of up
    /// to 2 000 000 messages first gives the fill's ratio_to_unindexed.
    #[arg(long, conflicts_with_all = ["txn", "txn_tick", "addr", "idempotency_keys"])]
    trace: bool,
    /// Traces to time for --trace.
    #[arg(long, default_value_t = 1000)]
    samples: u64,
    /// Unfinished transactions for --txn-tick.
    #[arg(long, default_value_t = 1_000_000)]
    pending: u64,
    /// Due transactions for --txn-tick.
    #[arg(long, default_value_t = 100)]
    due: u64,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Install the Prometheus recorder (as `broker --metrics` does) and scrape it every
    /// second during the run, to measure what metrics cost (embedded runs).
    #[arg(long, conflicts_with = "addr")]
    metrics: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HALFMQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halfmq: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> halfmq::Result<()> {
    match cli.command {
        Command::Broker {
            args,
            print_config,
            check,
        } => broker(args, print_config, check).await,
        Command::Produce { conn, args } => produce(conn, args).await,
        Command::Consume { conn, args } => consume(conn, args).await,
        Command::Dlq { command } => dlq(command).await,
        Command::Groups { command } => groups(command).await,
        Command::Txn { command } => txn(command).await,
        Command::Topics { command } => topics(command).await,
        Command::Stats {
            conn,
            data_dir,
            json,
        } => stats(conn, data_dir, json).await,
        Command::Trace {
            key,
            conn,
            data_dir,
            json,
        } => trace(key, conn, data_dir, json).await,
        Command::Retention { conn, json } => retention(conn, json).await,
        Command::Bench(args) => tokio::task::spawn_blocking(move || bench_cmd(args))
            .await
            .unwrap_or_else(|_| Err(halfmq::Error::Poisoned("the bench panicked".into()))),
    }
}

fn println_flush(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn json_line(v: &serde_json::Value) {
    println_flush(&v.to_string());
}

async fn broker(args: BrokerArgs, print_config: bool, check: bool) -> halfmq::Result<()> {
    let settings = args.settings()?;
    if print_config {
        print!("{}", settings.effective()?.to_toml()?);
        return Ok(());
    }
    let (config, server_config) = settings.resolve()?;
    let metrics_addr = settings.metrics_addr()?;
    // Installed before the broker opens, so that everything it records is counted.
    let metrics_handle = match metrics_addr {
        Some(_) if !check => Some(halfmq::metrics::install()?),
        _ => None,
    };
    let broker = tokio::task::spawn_blocking(move || Broker::open(config))
        .await
        .unwrap_or_else(|_| Err(halfmq::Error::Poisoned("opening panicked".into())))?;
    print_status(&broker)?;
    if check {
        return broker.close();
    }
    let server = Server::start(broker.clone(), server_config).await?;
    let metrics_server = match (metrics_addr, metrics_handle) {
        (Some(addr), Some(handle)) => {
            let m = MetricsServer::start(addr, broker.clone(), handle).await?;
            println_flush(&format!("metrics at http://{}/metrics", m.local_addr()));
            Some(m)
        }
        _ => None,
    };
    println_flush(&format!(
        "halfmq broker listening on {} (data directory {}); Ctrl-C or SIGTERM stops it cleanly",
        server.local_addr(),
        broker.data_dir().display()
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| halfmq::Error::io("signal", "install signal handler", e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("halfmq: stopping: finishing requests in flight, then flushing");
    if let Some(m) = metrics_server {
        m.shutdown().await;
    }
    server.shutdown().await;
    tokio::task::spawn_blocking(move || broker.close())
        .await
        .unwrap_or_else(|_| Err(halfmq::Error::Poisoned("closing panicked".into())))?;
    eprintln!("halfmq: stopped cleanly");
    Ok(())
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
            format!(
                ", cut a torn tail of {} bytes (never acknowledged)",
                r.torn_bytes_cut
            )
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

async fn retention(conn: ConnArgs, json: bool) -> halfmq::Result<()> {
    let r = conn.connect().await?.retention().await?;
    if json {
        match serde_json::to_string(&r) {
            Ok(j) => println_flush(&j),
            Err(e) => eprintln!("halfmq: cannot encode the report as JSON: {e}"),
        }
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

/// "what pins retention" for people.
fn retention_line(f: &halfmq::RetentionFloor, held: bool) -> String {
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

fn print_stats_table(s: &halfmq::Stats) {
    print!("{}", stats_table(s));
}

/// `halfmq stats` for people: the log and transactions, then one row per queue and
/// consumer group.
fn stats_table(s: &halfmq::Stats) -> String {
    use std::fmt::Write as _;
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

async fn produce(conn: ConnArgs, args: ProduceArgs) -> halfmq::Result<()> {
    let ProduceArgs {
        topic,
        key,
        key_prefix,
        body,
        size,
        count,
        idempotency_key,
        json,
        delay_ms,
    } = args;
    let client = conn.connect().await?;
    let prefix = key_prefix.unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)));
    for i in 0..count {
        let k = key.clone().unwrap_or_else(|| format!("{prefix}-{i}"));
        let b = match (&body, size) {
            (Some(t), _) => t.clone().into_bytes(),
            (None, Some(n)) => (0..n).map(|_| fastrand::u8(..)).collect(),
            (None, None) => format!("message {i}").into_bytes(),
        };
        let mut msg = Message::new(b).with_key(&k);
        if let Some(ik) = &idempotency_key {
            msg = msg.with_idempotency_key(if count > 1 {
                format!("{ik}-{i}")
            } else {
                ik.clone()
            });
        }
        if let Some(ms) = delay_ms {
            let at = halfmq::broker::now_ms() + ms;
            let r = match client.send_delayed(&topic, &msg, at).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!(
                        "halfmq: {i} of {count} messages were acknowledged before this error"
                    );
                    return Err(e);
                }
            };
            if json {
                json_line(&serde_json::json!({
                    "key": k, "topic": r.topic, "queue": r.queue, "delayed_id": r.id,
                    "deliver_at_ms": r.deliver_at_ms,
                }));
            } else {
                println_flush(&format!(
                    "stored {k} for {}/{}, to be delivered at {}",
                    r.topic,
                    r.queue,
                    ms_time(r.deliver_at_ms)
                ));
            }
            continue;
        }
        let r = match client.send(&topic, &msg).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("halfmq: {i} of {count} messages were acknowledged before this error");
                return Err(e);
            }
        };
        if json {
            json_line(
                &serde_json::json!({"key": k, "topic": r.topic, "queue": r.queue, "offset": r.offset, "duplicate": r.duplicate}),
            );
        } else if r.duplicate {
            println_flush(&format!(
                "duplicate of {k}: already stored in {}/{} at offset {}",
                r.topic, r.queue, r.offset
            ));
        } else {
            println_flush(&format!(
                "stored {k} in {}/{} at offset {}",
                r.topic, r.queue, r.offset
            ));
        }
    }
    Ok(())
}

async fn consume(conn: ConnArgs, args: ConsumeArgs) -> halfmq::Result<()> {
    let ConsumeArgs {
        topic,
        group,
        max,
        idle_exit_ms,
        json,
        nack,
        nack_delay_ms,
    } = args;
    let client = conn.connect().await?;
    let mut got = 0u64;
    let mut last = Instant::now();
    loop {
        if max.is_some_and(|m| got >= m) {
            return Ok(());
        }
        let left = max.map_or(256, |m| (m - got).min(256)) as u32;
        let wait = match idle_exit_ms {
            Some(ms) => Duration::from_millis(ms)
                .saturating_sub(last.elapsed())
                .min(Duration::from_secs(1)),
            None => Duration::from_secs(1),
        };
        let batch = client.poll(&group, &topic, left, wait).await?;
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
                    "key": d.message.key, "topic": d.topic, "queue": d.queue, "offset": d.offset,
                    "body_len": d.message.body.len(), "body_crc32": crc32fast::hash(&d.message.body),
                    "attempt": d.attempt,
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
                    d.message.key,
                    d.attempt,
                    outcome.map_or(String::new(), |o| format!(" nacked={o}")),
                    String::from_utf8_lossy(&d.message.body)
                ));
            }
        }
        if !nack {
            client
                .ack(
                    &group,
                    &topic,
                    batch.iter().map(|d| (d.queue, d.offset)).collect(),
                )
                .await?;
        }
        got += batch.len() as u64;
        last = Instant::now();
    }
}

/// A time in ms since the Unix epoch, as RFC 3339 UTC with milliseconds.
fn ms_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

async fn dlq(command: DlqCommand) -> halfmq::Result<()> {
    match command {
        DlqCommand::List {
            conn,
            group,
            from,
            max,
            json,
        } => {
            let client = conn.connect().await?;
            let letters = client.dead_letters(&group, from, max).await?;
            if !json {
                println_flush(&format!(
                    "{} dead letter(s) of group {group}{}",
                    letters.len(),
                    if letters.len() as u32 >= max {
                        " (more with --from)"
                    } else {
                        ""
                    }
                ));
            }
            for d in &letters {
                if json {
                    json_line(&serde_json::json!(d));
                } else {
                    println_flush(&format!(
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
                    ));
                }
            }
            Ok(())
        }
        DlqCommand::Replay {
            conn,
            group,
            max,
            json,
        } => {
            let client = conn.connect().await?;
            let done = client.replay_dead_letters(&group, max).await?;
            for r in &done {
                if json {
                    json_line(&serde_json::json!(r));
                } else {
                    println_flush(&format!(
                        "#{} key={} -> {}/{}@{}",
                        r.dlq_offset, r.key, r.receipt.topic, r.receipt.queue, r.receipt.offset
                    ));
                }
            }
            if !json {
                println_flush(&format!("{} dead letter(s) replayed", done.len()));
            }
            Ok(())
        }
    }
}

async fn groups(command: GroupsCommand) -> halfmq::Result<()> {
    let (conn, group, set, json) = match command {
        GroupsCommand::Delete { conn, group, json } => {
            let d = conn.connect().await?.delete_group(&group).await?;
            if json {
                json_line(&serde_json::json!(d));
            } else {
                let dlq = match &d.dead_letter_queue {
                    Some(t) => {
                        format!("; its dead letters are kept in {t} (halfmq dlq list {group})")
                    }
                    None => String::new(),
                };
                println_flush(&format!(
                    "group {group} deleted: offsets of {} queue(s) forgotten{dlq}",
                    d.queues
                ));
            }
            return Ok(());
        }
        GroupsCommand::Set {
            conn,
            group,
            visibility_timeout_ms,
            max_retries,
            retry_backoff_ms,
        } => (
            conn,
            group,
            Some(GroupSettings {
                visibility_timeout_ms,
                max_retries,
                retry_backoff_ms,
            }),
            false,
        ),
        GroupsCommand::Show { conn, group, json } => (conn, group, None, json),
    };
    let client = conn.connect().await?;
    let g = match set {
        Some(s) => client.set_group(&group, s).await?,
        None => client.group(&group).await?,
    };
    if json {
        json_line(&serde_json::json!(g));
    } else {
        println_flush(&format!(
            "group {group}: visibility time-out {} ms{}, max retries {}{}, retry backoff {:?} ms{}",
            g.visibility_timeout_ms,
            if g.overrides.visibility_timeout_ms.is_some() {
                " (set)"
            } else {
                ""
            },
            g.max_retries,
            if g.overrides.max_retries.is_some() {
                " (set)"
            } else {
                ""
            },
            g.retry_backoff_ms,
            if g.overrides.retry_backoff_ms.is_some() {
                " (set)"
            } else {
                ""
            },
        ));
    }
    Ok(())
}

async fn txn(command: TxnCommand) -> halfmq::Result<()> {
    match command {
        TxnCommand::Begin {
            conn,
            topic,
            key,
            group,
            body,
            json,
        } => {
            let client = conn.connect().await?;
            let msg = Message::new(body).with_key(&key);
            let t = client
                .send_half(&topic, &msg, &group, HalfOptions::default())
                .await?;
            if json {
                json_line(&serde_json::json!({"txn_id": t.0, "topic": topic, "key": key}));
            } else {
                println_flush(&format!("half message written: transaction {t} (pending)"));
            }
            Ok(())
        }
        TxnCommand::Commit { conn, id } => {
            conn.connect().await?.commit(TxnId(id)).await?;
            println_flush(&format!("transaction {id} committed"));
            Ok(())
        }
        TxnCommand::Rollback { conn, id } => {
            conn.connect().await?.rollback(TxnId(id)).await?;
            println_flush(&format!("transaction {id} rolled back"));
            Ok(())
        }
        TxnCommand::Rearm { conn, id } => {
            conn.connect().await?.rearm(TxnId(id)).await?;
            println_flush(&format!("transaction {id} will be checked again now"));
            Ok(())
        }
        TxnCommand::List { conn, state, json } => {
            let state = state.map(|s| match s {
                StateArg::Pending => TxnState::Pending,
                StateArg::Unresolved => TxnState::Unresolved,
            });
            let list = conn.connect().await?.transactions(state).await?;
            for t in &list {
                if json {
                    match serde_json::to_value(t) {
                        Ok(v) => json_line(&v),
                        Err(e) => eprintln!("halfmq: cannot encode: {e}"),
                    }
                } else {
                    println_flush(&format!(
                        "{} {} topic={} key={} group={} checks={} last_answer={}",
                        t.txn_id,
                        t.state.as_str(),
                        t.topic,
                        t.key,
                        t.producer_group,
                        t.checks,
                        t.last_answer.as_deref().unwrap_or("-")
                    ));
                }
            }
            if !json && list.is_empty() {
                println_flush("no unfinished transactions");
            }
            Ok(())
        }
        TxnCommand::Checker {
            conn,
            group,
            answer,
        } => {
            let answer = match answer {
                AnswerArg::Commit => CheckAnswer::Commit,
                AnswerArg::Rollback => CheckAnswer::Rollback,
                AnswerArg::Unknown => CheckAnswer::Unknown,
            };
            let client = conn.connect().await?;
            client
                .register_checker(
                    &group,
                    Arc::new(move |h: &HalfMessage| {
                        eprintln!(
                            "check-back for transaction {} (key {}): answering {answer:?}",
                            h.txn_id, h.key
                        );
                        answer
                    }),
                )
                .await?;
            println_flush(&format!(
                "answering check-backs of group {group} with {answer:?}; Ctrl-C stops"
            ));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = client.closed() => {
                        eprintln!("halfmq: connection lost; reconnecting");
                        // Any request reconnects (with backoff) and registers the checker again.
                        while let Err(e) = client.topics().await {
                            eprintln!("halfmq: still not connected: {e}");
                        }
                    }
                }
            }
        }
    }
}

async fn topics(command: TopicsCommand) -> halfmq::Result<()> {
    match command {
        TopicsCommand::Create { conn, name, queues } => {
            conn.connect().await?.create_topic(&name, queues).await?;
            println_flush(&format!("topic {name} with {queues} queues"));
        }
        TopicsCommand::List { conn, json } => {
            for (name, queues) in conn.connect().await?.topics().await? {
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

async fn stats(conn: ConnArgs, data_dir: Option<PathBuf>, json: bool) -> halfmq::Result<()> {
    let s: halfmq::Stats = match data_dir {
        Some(dir) => {
            let mut config = halfmq::BrokerConfig::new(dir);
            config.txn.check_back = false;
            tokio::task::spawn_blocking(move || {
                let b = Broker::open(config)?;
                let s = b.stats();
                b.close()?;
                s
            })
            .await
            .unwrap_or_else(|_| Err(halfmq::Error::Poisoned("stats panicked".into())))?
        }
        None => {
            let text = conn.connect().await?.stats_json().await?;
            serde_json::from_str(&text).map_err(|e| halfmq::Error::Decode {
                what: "stats",
                reason: e.to_string(),
            })?
        }
    };
    if json {
        match serde_json::to_string(&s) {
            Ok(j) => println_flush(&j),
            Err(e) => eprintln!("halfmq: cannot encode stats as JSON: {e}"),
        }
    } else {
        print_stats_table(&s);
    }
    Ok(())
}

async fn trace(
    key: String,
    conn: ConnArgs,
    data_dir: Option<PathBuf>,
    json: bool,
) -> halfmq::Result<()> {
    let t = match data_dir {
        Some(dir) => {
            let mut config = halfmq::BrokerConfig::new(dir);
            config.txn.check_back = false;
            tokio::task::spawn_blocking(move || {
                let b = Broker::open(config)?;
                let t = b.trace(&key);
                b.close()?;
                t
            })
            .await
            .unwrap_or_else(|_| Err(halfmq::Error::Poisoned("trace panicked".into())))?
        }
        None => conn.connect().await?.trace(&key).await?,
    };
    if json {
        match serde_json::to_string(&t) {
            Ok(j) => println_flush(&j),
            Err(e) => eprintln!("halfmq: cannot encode the trace as JSON: {e}"),
        }
    } else {
        print!("{t}");
    }
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> halfmq::Result<()> {
    let (data_dir, cleanup) = match a.data_dir {
        Some(d) => (d, false),
        None => (
            PathBuf::from(format!("halfmq-bench-{}", std::process::id())),
            true,
        ),
    };
    if a.trace {
        let messages = a.messages.unwrap_or(10_000_000);
        eprintln!(
            "halfmq bench: mode=trace messages={messages} samples={} dir={}",
            a.samples,
            data_dir.display()
        );
        let r = bench::run_trace(&data_dir, messages, a.samples, &mut |l| eprintln!("{l}"));
        if cleanup {
            let _ = std::fs::remove_dir_all(&data_dir);
        }
        let r = r?;
        println!("{r}");
        if a.json {
            print_json(&r);
        }
        return Ok(());
    }
    if a.txn_tick {
        eprintln!(
            "halfmq bench: mode=txn_tick pending={} due={} dir={}",
            a.pending,
            a.due,
            data_dir.display()
        );
        let r = bench::run_check_tick(&data_dir, a.pending, a.due, &mut |line| eprintln!("{line}"));
        if cleanup {
            let _ = std::fs::remove_dir_all(&data_dir);
        }
        let r = r?;
        println!(
            "one check-back tick with {} pending, {} due: {} µs (start checks {} µs + apply answers {} µs); setup wrote the halves in {:.1} s",
            r.pending, r.due, r.tick_us, r.dispatch_us, r.apply_us, r.fill_seconds
        );
        if a.json {
            print_json(&r);
        }
        return Ok(());
    }
    let flush = match a.flush {
        Flush::Sync => FlushPolicy::Sync,
        Flush::Async => FlushPolicy::Async {
            interval: Duration::from_millis(100),
        },
    };
    let opts = BenchOptions {
        data_dir,
        cleanup,
        producers: a.producers,
        in_flight: a.in_flight,
        threads: a.threads,
        size: a.size,
        messages: a.messages,
        seconds: a.seconds,
        flush,
        baseline: a.baseline,
        txn: a.txn,
        idempotency_keys: a.idempotency_keys,
        // Raw disk and store alternate in one process; at high rates, on this project's
        // virtual machine, later rounds ran up to 2x slower than the first (the flusher's
        // copy into the page cache), which separate runs did not: one round unless asked.
        rounds: a
            .rounds
            .unwrap_or(if a.txn || a.idempotency_keys || a.addr.is_some() {
                3
            } else {
                1
            }),
        metrics: if a.metrics {
            Some(halfmq::metrics::install()?)
        } else {
            None
        },
    };
    eprintln!(
        "halfmq bench: mode={} producers={} in_flight={} size={} flush={} metrics={} messages={:?} seconds={:?} dir={} cores={}",
        if a.addr.is_some() {
            "broker"
        } else if a.txn {
            "txn"
        } else if a.idempotency_keys {
            "idempotency_keys"
        } else {
            "embedded"
        },
        a.producers,
        a.in_flight,
        a.size,
        a.flush.name(),
        if a.metrics { "recorder" } else { "none" },
        a.messages,
        a.seconds,
        opts.data_dir.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    let report = match &a.addr {
        Some(addr) => bench::run_network(
            &opts,
            addr,
            a.token.clone(),
            a.connections,
            a.compare_embedded,
            &mut |l| eprintln!("{l}"),
        )?,
        None => bench::run_embedded(&opts, &mut |line| eprintln!("{line}"))?,
    };
    print_bench(&report, a.json);
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("halfmq: cannot encode the report as JSON: {e}"),
    }
}

fn print_bench(r: &bench::BenchReport, json: bool) {
    println!(
        "{} msgs in {:.2} s: {:.0} msg/s, {:.1} MiB/s; latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        r.messages, r.seconds, r.msgs_per_s, r.mib_per_s, r.p50_us, r.p99_us, r.p999_us, r.max_us
    );
    if r.fsyncs_per_s > 0.0 {
        println!(
            "group commit: {:.0} fsyncs/s, {:.1} messages per fsync",
            r.fsyncs_per_s, r.msgs_per_fsync
        );
    }
    if let (Some(raw), Some(ratio), Some(p99), Some(pr)) = (
        r.raw_group_msgs_per_s,
        r.ratio_to_raw,
        r.raw_serial_fsync_p99_us,
        r.p99_ratio_to_raw_fsync,
    ) {
        println!(
            "raw disk: {raw:.0} msg/s of this size in 256 KiB fsynced writes ({:.1} MiB/s); one 1 KiB write+fdatasync p99 {p99} µs",
            r.raw_group_mib_per_s.unwrap_or_default()
        );
        println!("ratio to raw throughput: {ratio:.3}; p99 / raw fsync p99: {pr:.2}");
    }
    if !r.round_ratios.is_empty() {
        println!(
            "ratios of the {} rounds: {:?} (the median is reported)",
            r.round_ratios.len(),
            r.round_ratios
        );
    }
    if let (Some(plain), Some(ratio)) = (r.plain_msgs_per_s, r.ratio_to_plain) {
        println!("plain durable sends in the same run: {plain:.0} msg/s; transactions / plain: {ratio:.3}");
    }
    if let (Some(plain), Some(ratio)) = (r.without_keys_msgs_per_s, r.ratio_to_without_keys) {
        println!("sends without idempotency keys in the same run: {plain:.0} msg/s; with keys / without: {ratio:.3}");
    }
    if let (Some(emb), Some(ratio)) = (r.embedded_msgs_per_s, r.ratio_to_embedded) {
        println!("embedded broker in the same run: {emb:.0} msg/s; network / embedded: {ratio:.3}");
    }
    if r.metrics_recorder {
        println!(
            "metrics recorder: {} scrapes; halfmq_messages_in_total grew by {}",
            r.metrics_scrapes.unwrap_or_default(),
            r.metrics_messages_in.unwrap_or_default()
        );
    }
    if json {
        print_json(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_for_people() {
        assert_eq!(human_age(0), "0 ms");
        assert_eq!(human_age(999), "999 ms");
        assert_eq!(human_age(1_000), "1.0 s");
        assert_eq!(human_age(59_999), "59.9 s");
        assert_eq!(human_age(60_000), "1m 00s");
        assert_eq!(human_age(245_000), "4m 05s");
        assert_eq!(human_age(3_600_000 * 3 + 120_000), "3h 02m");
        assert_eq!(human_age(86_400_000 * 2 + 3_600_000 * 4 + 1), "2d 04h");
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
