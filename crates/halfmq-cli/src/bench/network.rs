//! Producers against a running broker over the network, optionally compared with the same
//! load on an embedded broker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::{Error, Message, Result};

use super::baseline::{measure_baseline, remove_between_runs, with_baseline};
use super::embedded::run_producers;
use super::load::{
    check_in_flight, limit_time, monitor, produce_windowed, producers_runtime, Load, Producers,
};
use super::report::{merged, BenchReport, Measured};
use super::rounds::alternate_rounds;
use super::{BenchOptions, Workload};

/// How the network producers batch their sends.
#[derive(Debug, Clone, Copy)]
pub struct NetBatching {
    /// The client's automatic batching of concurrent sends (`ClientConfig::auto_batch`).
    pub auto: bool,
    /// Its linger (`ClientConfig::batch_linger`).
    pub linger: Duration,
    /// More than 1: each request is an explicit `send_batch` of this many messages (the
    /// latency recorded is the batch's, and `in_flight` counts batches).
    pub explicit: usize,
}

impl Default for NetBatching {
    fn default() -> NetBatching {
        NetBatching {
            auto: true,
            linger: Duration::ZERO,
            explicit: 1,
        }
    }
}

/// Run producers (async tasks) against the broker at `addr` over `connections` connections,
/// and, with `compare_embedded`, the same load on an embedded broker afterwards.
pub fn run_network(
    opts: &BenchOptions,
    addr: &str,
    token: Option<String>,
    connections: usize,
    compare_embedded: bool,
    batching: NetBatching,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    if opts.baseline && !compare_embedded {
        // The raw disk (write + fdatasync, on `opts.data_dir`: the broker's disk when both
        // are on one machine) and the broker, alternating `opts.rounds` times; the median
        // round by its ratio to the raw disk is reported, with that round's raw figures
        // (`p50_over_raw_fsync_us`: what one send costs on top of the disk).
        let r = alternate_rounds(opts, progress, |_, tag, progress| {
            progress(&format!(
                "measuring the raw disk (write + fdatasync){tag} ..."
            ));
            let raw = measure_baseline(&opts.data_dir, 3.0)?;
            progress(&format!("over the network{tag} ..."));
            let mut r =
                run_network_once(opts, addr, token.clone(), connections, batching, progress)?;
            Ok((with_baseline(&mut r, &raw, opts.size), r))
        });
        if opts.cleanup {
            let _ = std::fs::remove_dir_all(&opts.data_dir);
        }
        return r.map(|(_, _, r)| r);
    }
    if !compare_embedded {
        return run_network_once(opts, addr, token, connections, batching, progress);
    }
    // Alternate network and embedded runs `opts.rounds` times; report the median round.
    let (ratio, emb, mut report) = alternate_rounds(opts, progress, |round, tag, progress| {
        progress(&format!("over the network{tag} ..."));
        let net = run_network_once(opts, addr, token.clone(), connections, batching, progress)?;
        progress(&format!(
            "the same load on an embedded broker, for ratio_to_embedded{tag} ..."
        ));
        let dir = format!("embedded-compare-{round}");
        let emb = run_producers(opts, Workload::Plain, &dir, progress);
        if opts.cleanup {
            remove_between_runs(&opts.data_dir, &dir);
        }
        Ok((emb?.msgs_per_s, net))
    })?;
    report.embedded_msgs_per_s = Some(emb);
    report.ratio_to_embedded = Some(ratio);
    Ok(report)
}

/// One run against the broker at `addr`.
fn run_network_once(
    opts: &BenchOptions,
    addr: &str,
    token: Option<String>,
    connections: usize,
    batching: NetBatching,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    use halfmq_client::client::{Client, ClientConfig};
    if connections == 0 || connections > 1024 || opts.producers == 0 {
        return Err(Error::Config {
            setting: "connections",
            reason: "connections and producers must be 1 ..= 1024".into(),
        });
    }
    check_in_flight(opts)?;
    // One worker by default, however many producers: the client only frames requests and
    // routes answers, and on a machine it shares with the broker a second worker costs more
    // in hand-offs and wake-ups (work stealing, each parking and unparking the other) than
    // it adds (16 producers x 16 in flight: the client's CPU per message 2.0-2.1 -> 1.6-1.7
    // µs, ARCHITECTURE.md, "Where the time goes").
    let rt = producers_runtime(opts, 1, std::path::Path::new(addr))?;
    if batching.explicit == 0 || batching.explicit > halfmq::SEND_BATCH_MESSAGES_MAX {
        return Err(Error::Config {
            setting: "batch",
            reason: format!("1 ..= {} messages", halfmq::SEND_BATCH_MESSAGES_MAX),
        });
    }
    let config = ClientConfig::new(addr)
        .with_token(token)
        .with_name("halfmq-bench".into())
        .with_auto_batch(batching.auto)
        .with_batch_linger(batching.linger);
    let clients = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..connections {
            out.push(Client::connect(config.clone()).await?);
        }
        match out[0].create_topic("bench", 8).await {
            Ok(_) | Err(Error::TopicExists { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok::<_, Error>(out)
    })?;
    let syncs_before = rt.block_on(remote_log_counters(&clients[0]));
    let load = Arc::new(Load {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        limit: opts.messages.unwrap_or(u64::MAX),
    });
    let start = Instant::now();
    let handles: Vec<_> = (0..opts.producers)
        .map(|p| {
            let (client, load) = (clients[p % connections].clone(), load.clone());
            let msgs = Arc::new(vec![Message::new(vec![b'x'; opts.size]); batching.explicit]);
            let in_flight = opts.in_flight;
            rt.spawn(async move {
                let l = load.clone();
                produce_windowed(&load, in_flight, |_| {
                    let (client, msgs, load) = (client.clone(), msgs.clone(), l.clone());
                    async move {
                        if let [msg] = msgs.as_slice() {
                            return client.send("bench", msg).await.map(drop);
                        }
                        // The window counts one message per batch: count the rest.
                        let extra = msgs.len() as u64 - 1;
                        load.issued.fetch_add(extra, Ordering::Relaxed);
                        for r in client.send_batch("bench", &msgs).await? {
                            r?;
                        }
                        load.done.fetch_add(extra, Ordering::Relaxed);
                        Ok(())
                    }
                })
                .await
            })
        })
        .collect();
    let producers = Producers::Tasks(rt, handles);
    monitor(
        &load,
        start,
        limit_time(opts),
        || producers.finished(),
        progress,
    );
    let seconds = start.elapsed().as_secs_f64();
    let hists = producers.join_keep()?;
    let (rt, hists) = hists;
    let workers = rt.metrics().num_workers();
    let syncs_after = rt.block_on(remote_log_counters(&clients[0]));
    drop(clients);
    drop(rt);
    let (syncs, records) = match (syncs_before, syncs_after) {
        (Some(a), Some(b)) => (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)),
        _ => (0, 0),
    };
    let run = Measured {
        messages: load.done.load(Ordering::Relaxed),
        seconds,
        hist: merged(hists)?,
        syncs,
        records,
    };
    Ok(BenchReport {
        mode: "broker".into(),
        producer_kind: format!(
            "tasks on {workers} runtime workers over {connections} connections, auto-batch {} \
             (linger {:?}), {} per request",
            if batching.auto { "on" } else { "off" },
            batching.linger,
            batching.explicit
        ),
        flush: "broker's".into(),
        ..run.report(opts)
    })
}

/// (log fsyncs, records) of a remote broker, from its stats.
async fn remote_log_counters(client: &halfmq_client::client::Client) -> Option<(u64, u64)> {
    let log = client.stats().await.ok()?.log;
    Some((log.syncs, log.records))
}
