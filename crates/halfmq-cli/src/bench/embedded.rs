//! Producers against an embedded broker in this process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use halfmq::{Broker, BrokerConfig, Error, FlushPolicy, HalfOptions, Message, Result};

use super::baseline::{measure_baseline, remove_between_runs, with_baseline};
use super::load::{
    check_in_flight, cores, limit_time, monitor, produce_windowed, producers_runtime, Load,
    Producers,
};
use super::report::{histogram, merged, BenchReport, Measured};
use super::rounds::alternate_rounds;
use super::{BenchOptions, Workload};

/// Run producers against an embedded broker. `progress` receives a line about once a second.
pub fn run_embedded(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport> {
    if opts.producers == 0 || opts.producers > 4096 {
        return Err(Error::Config {
            setting: "producers",
            reason: format!("{} is outside 1 ..= 4096", opts.producers),
        });
    }
    check_in_flight(opts)?;
    let plain_with_baseline = opts.baseline && !opts.txn && !opts.idempotency_keys;
    let baseline = if opts.baseline && !plain_with_baseline {
        progress("measuring the raw disk (write + fdatasync) ...");
        Some(measure_baseline(&opts.data_dir, 3.0)?)
    } else {
        None
    };
    let result = if opts.txn {
        compare_rounds(opts, Workload::Txn, progress).map(|(mut r, plain, ratio)| {
            r.plain_msgs_per_s = Some(plain);
            r.ratio_to_plain = Some(ratio);
            r
        })
    } else if opts.idempotency_keys {
        compare_rounds(opts, Workload::Keyed, progress).map(|(mut r, plain, ratio)| {
            r.without_keys_msgs_per_s = Some(plain);
            r.ratio_to_without_keys = Some(ratio);
            r
        })
    } else if plain_with_baseline {
        // The raw disk and the store, alternating `rounds` times: the disk's own rate moves
        // by 2x and more within minutes on a shared virtual disk, so each round's ratio
        // compares figures taken seconds apart, and the median round is reported.
        alternate_rounds(opts, progress, |round, tag, progress| {
            progress(&format!(
                "measuring the raw disk (write + fdatasync){tag} ..."
            ));
            let raw = measure_baseline(&opts.data_dir, 3.0)?;
            progress(&format!("plain durable sends{tag} ..."));
            let dir = format!("plain-{round}");
            let mut r = run_producers(opts, Workload::Plain, &dir, progress)?;
            if opts.cleanup {
                remove_between_runs(&opts.data_dir, &dir);
            }
            Ok((with_baseline(&mut r, &raw, opts.size), r))
        })
        .map(|(_, _, r)| r)
    } else {
        run_producers(opts, Workload::Plain, "plain", progress)
    };
    if opts.cleanup {
        let _ = std::fs::remove_dir_all(&opts.data_dir);
    }
    let mut report = result?;
    if let Some(b) = baseline {
        with_baseline(&mut report, &b, opts.size);
    }
    Ok(report)
}

pub(super) fn run_producers(
    opts: &BenchOptions,
    work: Workload,
    name: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let mut config = BrokerConfig::new(opts.data_dir.join(name));
    config.store.flush = opts.flush;
    let broker = Arc::new(Broker::open(config)?);
    broker.create_topic("bench", 8)?;
    let messages_in = |h: &metrics_exporter_prometheus::PrometheusHandle| {
        halfmq::metrics::sample_sum(&h.render(), halfmq::metrics::MESSAGES_IN) as u64
    };
    let in_before = opts.metrics.as_ref().map(messages_in);
    let scraper = match &opts.metrics {
        Some(h) => Some(Scraper::start(Arc::clone(&*broker), h.clone())?),
        None => None,
    };
    let limit_msgs = opts.messages.unwrap_or(u64::MAX);
    let limit_time = limit_time(opts);
    let load = Arc::new(Load {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        limit: limit_msgs,
    });
    let start = Instant::now();
    let producers = if opts.threads {
        let mut handles = Vec::new();
        for p in 0..opts.producers {
            let (broker, load) = (broker.clone(), load.clone());
            let mut msg = Message::new(vec![b'x'; opts.size]);
            let mut sent = 0u64;
            let handle = std::thread::Builder::new()
                .name(format!("bench-producer-{p}"))
                .spawn(move || -> Result<Histogram<u64>> {
                    let mut hist = histogram();
                    while load.next() {
                        let t = Instant::now();
                        match work {
                            Workload::Plain => drop(broker.send("bench", &msg)?),
                            Workload::Keyed => {
                                msg = msg.with_idempotency_key(format!("{p}-{sent}"));
                                sent += 1;
                                drop(broker.send("bench", &msg)?);
                            }
                            Workload::Txn => {
                                let txn = broker.send_half(
                                    "bench",
                                    &msg,
                                    "bench",
                                    HalfOptions::default(),
                                )?;
                                broker.commit(txn)?;
                            }
                        }
                        load.record(&mut hist, t);
                    }
                    Ok(hist)
                })
                .map_err(|e| Error::io(&opts.data_dir, "start producer thread", e))?;
            handles.push(handle);
        }
        Producers::Threads(handles)
    } else {
        let rt = producers_runtime(opts, cores(), &opts.data_dir)?;
        let handles = (0..opts.producers)
            .map(|p| {
                let (broker, load) = (broker.clone(), load.clone());
                let msg = Arc::new(Message::new(vec![b'x'; opts.size]));
                let in_flight = opts.in_flight;
                rt.spawn(async move {
                    produce_windowed(&load, in_flight, |n| {
                        let (broker, msg) = (broker.clone(), msg.clone());
                        async move {
                            match work {
                                Workload::Plain => drop(broker.send_async("bench", &msg).await?),
                                Workload::Keyed => {
                                    let keyed = Message::clone(&msg)
                                        .with_idempotency_key(format!("{p}-{n}"));
                                    drop(broker.send_async("bench", &keyed).await?);
                                }
                                Workload::Txn => {
                                    let txn = broker
                                        .send_half_async(
                                            "bench",
                                            &msg,
                                            "bench",
                                            HalfOptions::default(),
                                        )
                                        .await?;
                                    broker.commit_async(txn).await?;
                                }
                            }
                            Ok(())
                        }
                    })
                    .await
                })
            })
            .collect();
        Producers::Tasks(rt, handles)
    };
    monitor(&load, start, limit_time, || producers.finished(), progress);
    let seconds = start.elapsed().as_secs_f64();
    let producer_kind = match &producers {
        Producers::Threads(_) => "threads".to_owned(),
        Producers::Tasks(rt, _) => {
            format!("tasks on {} runtime workers", rt.metrics().num_workers())
        }
    };
    let hist = merged(producers.join()?)?;
    let log = broker.store().log_stats();
    let scrapes = scraper.map(Scraper::stop);
    let in_after = opts.metrics.as_ref().map(messages_in);
    broker.close()?;
    let run = Measured {
        messages: load.done.load(Ordering::Relaxed),
        seconds,
        hist,
        syncs: log.syncs,
        records: log.records,
    };
    Ok(BenchReport {
        mode: match work {
            Workload::Plain => "embedded".into(),
            Workload::Txn => "txn".into(),
            Workload::Keyed => "idempotency_keys".into(),
        },
        producer_kind,
        flush: match opts.flush {
            FlushPolicy::Sync => "sync".into(),
            FlushPolicy::Async { .. } => "async".into(),
        },
        metrics_recorder: opts.metrics.is_some(),
        metrics_messages_in: in_after.zip(in_before).map(|(a, b)| a.saturating_sub(b)),
        metrics_scrapes: scrapes,
        ..run.report(opts)
    })
}

/// Scrapes a recorder every second on a thread, as the `/metrics` endpoint would.
struct Scraper {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<u64>,
}

impl Scraper {
    fn start(
        broker: Arc<Broker>,
        handle: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Result<Scraper> {
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-scraper".into())
            .spawn(move || {
                let mut scrapes = 0u64;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(Duration::from_secs(1))
                {
                    match broker.stats() {
                        Ok(s) => halfmq::metrics::record_stats(&s),
                        Err(_) => halfmq::metrics::stats_failed(),
                    }
                    std::hint::black_box(handle.render());
                    handle.run_upkeep();
                    scrapes += 1;
                }
                scrapes
            })
            .map_err(|e| Error::io("bench-scraper", "start scraper thread", e))?;
        Ok(Scraper { stop, thread })
    }

    /// Stop and return the number of scrapes.
    fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or(0)
    }
}

/// Run plain sends, then `variant`, `opts.rounds` times. Returns the variant's report from
/// the median round, that round's plain msgs/s, and the median ratio; the report lists every
/// round's ratio.
fn compare_rounds(
    opts: &BenchOptions,
    variant: Workload,
    progress: &mut dyn FnMut(&str),
) -> Result<(BenchReport, f64, f64)> {
    let (ratio, plain, r) = alternate_rounds(opts, progress, |round, tag, progress| {
        progress(&format!("plain durable sends{tag} ..."));
        let plain_dir = format!("plain-{round}");
        let plain = run_producers(opts, Workload::Plain, &plain_dir, progress)?;
        progress(&format!("{}{tag} ...", variant.describe()));
        let variant_dir = format!("{}-{round}", variant.dir_name());
        let r = run_producers(opts, variant, &variant_dir, progress)?;
        if opts.cleanup {
            // Rounds write gigabytes on fast disks: keep only what is being measured.
            remove_between_runs(&opts.data_dir, &plain_dir);
            remove_between_runs(&opts.data_dir, &variant_dir);
        }
        Ok((plain.msgs_per_s, r))
    })?;
    Ok((r, plain, ratio))
}
