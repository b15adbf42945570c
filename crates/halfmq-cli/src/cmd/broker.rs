//! `halfmq broker`: run the network broker (or only print its settings, or only recover and
//! report).

use clap::{ArgMatches, Args};
use halfmq::{Broker, Error, Result};
use halfmq_cli::metrics_http::MetricsServer;
use halfmq_cli::server::Server;
use halfmq_cli::settings::{self, BrokerSettings, Replication, Resolved};

use super::{blocking, cluster, println_flush, stats};

/// `halfmq broker`.
#[derive(Args)]
pub struct BrokerCmd {
    /// Print every setting in force, with where its value came from (default, file, env,
    /// flag), as a TOML settings file, and exit.
    #[arg(long)]
    print_config: bool,
    /// Open the data directory, recover, print its status and exit, without serving.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    settings: BrokerSettings,
}

/// The `broker` subcommand with every setting's default in its help.
pub fn with_defaults_in_help(cli: clap::Command) -> clap::Command {
    cli.mut_subcommand("broker", settings::with_defaults_in_help)
}

/// Run the broker until Ctrl-C or SIGTERM, then stop cleanly: finish requests in flight,
/// flush, close. `matches` (the subcommand's) tell a flag from an environment variable for
/// `--print-config`.
pub async fn run(cmd: BrokerCmd, matches: Option<&ArgMatches>) -> Result<()> {
    let BrokerCmd {
        settings,
        print_config,
        check,
    } = cmd;
    let resolved = settings.resolve(matches)?;
    if print_config {
        super::print_out(&resolved.to_toml());
        return Ok(());
    }
    if let Some(cluster) = resolved.replication.clone() {
        return run_replicated(&resolved, &cluster, check).await;
    }
    let metrics_addr = resolved.metrics;
    let rocketmq_addr = resolved.rocketmq;
    let (config, server_config) = (resolved.broker, resolved.server);
    // Installed before the broker opens, so that everything it records is counted.
    let metrics_handle = match metrics_addr {
        Some(_) if !check => Some(halfmq::metrics::install()?),
        _ => None,
    };
    let broker = blocking("opening", move || Broker::open(config)).await?;
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
    let rocketmq = match rocketmq_addr {
        Some(addr) => {
            let r = halfmq_rocketmq::RocketMqServer::start(broker.clone(), addr).await?;
            println_flush(&format!("RocketMQ 5 endpoint at {}", r.local_addr()));
            Some(r)
        }
        None => None,
    };
    println_flush(&format!(
        "halfmq broker listening on {} (data directory {}); Ctrl-C or SIGTERM stops it cleanly",
        server.local_addr(),
        broker.data_dir().display()
    ));
    stopped().await?;
    eprintln!("halfmq: stopping: finishing requests in flight, then flushing");
    if let Some(m) = metrics_server {
        m.shutdown().await;
    }
    if let Some(r) = rocketmq {
        r.shutdown(std::time::Duration::from_secs(5)).await;
    }
    server.shutdown().await;
    blocking("closing", move || broker.close()).await?;
    eprintln!("halfmq: stopped cleanly");
    Ok(())
}

/// Returns on Ctrl-C or SIGTERM.
async fn stopped() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("signal", "install signal handler", e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Run one node of the cluster `cluster` until Ctrl-C or SIGTERM. The metrics and RocketMQ
/// endpoints write to a broker directly, past the cluster's log, so they are refused here.
async fn run_replicated(resolved: &Resolved, cluster: &Replication, check: bool) -> Result<()> {
    let refused = [
        ("check", check),
        ("metrics", resolved.metrics.is_some()),
        ("rocketmq_listen", resolved.rocketmq.is_some()),
    ];
    if let Some((setting, _)) = refused.iter().find(|(_, on)| *on) {
        return Err(Error::Config {
            setting,
            reason: "not available on a replicated broker (--peers) yet".into(),
        });
    }
    let node = cluster::Node::start(resolved, cluster).await?;
    println_flush(&format!(
        "halfmq broker node {} listening on {} (peers on {}, data directory {}); Ctrl-C or \
         SIGTERM stops it cleanly",
        cluster.node_id,
        node.server.local_addr(),
        node.peer_addr(),
        resolved.broker.data_dir.display()
    ));
    stopped().await?;
    eprintln!("halfmq: stopping: finishing requests in flight, then the node");
    node.shutdown().await?;
    eprintln!("halfmq: stopped cleanly");
    Ok(())
}

/// What recovery found and the state of the data, printed when the broker starts. Only
/// informative: a broker whose standard output is closed (a service manager's) still
/// starts, so a failed write is ignored.
fn print_status(b: &Broker) -> Result<()> {
    let r = b.recovery_report();
    let mut notes = String::new();
    if r.verified_bytes > 0 {
        notes += &format!(
            ", checked {} bytes of the newest segment below the checkpoint",
            r.verified_bytes
        );
    }
    if r.torn_bytes_cut > 0 {
        notes += &format!(
            ", cut a torn tail of {} bytes (never acknowledged)",
            r.torn_bytes_cut
        );
    }
    if r.full_rebuild {
        notes += ", rebuilt all indexes";
    }
    let text = format!(
        "data directory: {}\nrecovery: {} segment(s), read {} record(s) from log offset {}, log ends at {}{notes}\n{}",
        b.data_dir().display(),
        r.segments,
        r.records_scanned,
        r.scanned_from,
        r.log_end,
        stats::stats_table(&b.stats()?),
    );
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    Ok(())
}
