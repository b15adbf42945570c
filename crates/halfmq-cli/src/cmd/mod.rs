//! One module per command group, each with its clap arguments and the code that runs them
//! (the layout of tokio-rs/mini-redis's `cmd/`). What several groups share lives here: how
//! to reach the broker, how lines reach stdout, and how a stopped broker's data directory is
//! opened for a one-off read.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use halfmq::{Broker, BrokerConfig, Error, Result};
use halfmq_client::{Client, ClientConfig};

pub mod bench;
pub mod broker;
pub mod cluster;
pub mod consume;
pub mod dlq;
pub mod groups;
pub mod produce;
pub mod repair;
pub mod retention;
pub mod stats;
pub mod topics;
pub mod trace;
pub mod txn;

/// Where the broker is.
#[derive(Args, Clone)]
pub struct ConnArgs {
    /// Broker address; for a replicated cluster, several, comma-separated (A,B,C): the
    /// client follows the leader among them (and keys every message `produce` sends).
    #[arg(long, env = "HALFMQ_ADDR", default_value = "127.0.0.1:10911")]
    pub addr: String,
    /// Shared secret, if the broker requires one.
    #[arg(long, env = "HALFMQ_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Time-out of each request, ms; with several addresses, also the longest a request
    /// spends following the leader.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
}

impl ConnArgs {
    /// A client of the broker these arguments name: with several addresses, the first that
    /// answers, and it follows the leader among them (see `halfmq_client::Client`).
    pub async fn connect(&self) -> Result<Client> {
        self.connect_to(&self.addr).await
    }

    /// A client given every address of `--addr`: it follows a replicated cluster's leader
    /// by itself (requests refused `NOT_LEADER` are made again on the leader; checkers
    /// register again on the new leader after a failover).
    pub async fn connect_following(&self) -> Result<Client> {
        self.connect_to(&self.addrs().join(",")).await
    }

    /// The addresses of `--addr`, in order.
    pub fn addrs(&self) -> Vec<String> {
        self.addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// A client of `addr` (one address, or several comma-separated) with these arguments'
    /// token and time-outs.
    pub async fn connect_to(&self, addr: &str) -> Result<Client> {
        let timeout = Duration::from_millis(self.timeout_ms);
        let config = ClientConfig::new(addr.to_owned())
            .with_token(self.token.clone())
            .with_name("halfmq-cli".into())
            .with_request_timeout(timeout)
            .with_failover_timeout(timeout);
        Client::connect(config).await
    }
}

/// Where a reading command gets its answer: a running broker, or the data directory of a
/// stopped one.
#[derive(Args, Clone)]
pub struct ReadFrom {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Read a data directory directly instead (the broker must not be running on it).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Write `text` to standard output and flush it at once, so that a script reading a pipe
/// sees each line as it happens (a consumer's or producer's output is a stream, not a
/// report). If standard output is gone (`halfmq trace K | head -1`, a closed pipe) or
/// fails, the process ends here, quietly for a closed pipe, as the default `SIGPIPE`
/// action would end it (Rust ignores `SIGPIPE`, and `print!` would panic): nothing that
/// follows a print, such as a consumer's ack of the message just printed, happens for
/// output nobody got.
pub fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // 128 + SIGPIPE, what a shell reports for a process a closed pipe ended.
            std::process::exit(141);
        }
        eprintln!("halfmq: error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// [`print_out`] of one line.
pub fn println_flush(line: &str) {
    print_out(&format!("{line}\n"));
}

/// Print one JSON value as one line.
pub fn json_line(v: &serde_json::Value) {
    println_flush(&v.to_string());
}

/// Print any serializable value as one JSON line; a value that cannot be encoded is reported
/// on stderr rather than failing a command whose work is already done.
pub fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println_flush(&s),
        Err(e) => eprintln!("halfmq: cannot encode the output as JSON: {e}"),
    }
}

/// Print each of `items`: as one JSON line each with `json`, otherwise as the line `text`
/// makes of it.
pub fn print_each<T: serde::Serialize>(items: &[T], json: bool, text: impl Fn(&T) -> String) {
    for item in items {
        if json {
            json_line(&serde_json::json!(item));
        } else {
            println_flush(&text(item));
        }
    }
}

/// A time in ms since the Unix epoch, as RFC 3339 UTC with milliseconds.
pub fn ms_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Run blocking work (opening, closing, a bench) off the async executor. A panic in it is
/// reported as an error naming `what`, not propagated, so the command still exits cleanly.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|_| Err(Error::Poisoned(format!("{what} panicked"))))
}

/// Open the stopped broker's data directory `dir`, run `read` on it and close it again, for
/// the commands that can read a directory instead of asking a running broker (`stats`,
/// `trace`). Check-back stays off, so that reading never resolves a transaction.
pub async fn read_data_dir<T: Send + 'static>(
    what: &str,
    dir: PathBuf,
    read: impl FnOnce(&Broker) -> Result<T> + Send + 'static,
) -> Result<T> {
    let mut config = BrokerConfig::new(dir);
    config.txn.check_back = false;
    blocking(what, move || {
        let b = Broker::open(config)?;
        let out = read(&b);
        b.close()?;
        out
    })
    .await
}
