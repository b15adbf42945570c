//! The cost of one check-back tick with many unfinished transactions of which a few are due.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq::{Broker, BrokerConfig, Error, HalfOptions, Message, Result};

use super::load::wait_for_tasks;
use super::report::round2;

/// Result of [`run_check_tick`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TickReport {
    /// `"txn_tick"`.
    pub mode: String,
    /// Unfinished transactions in the index.
    pub pending: u64,
    /// How many of them were due in the measured round.
    pub due: u64,
    /// Time to write the pending halves (setup, not the measurement).
    pub fill_seconds: f64,
    /// The round that found the due halves and started their checks, µs.
    pub dispatch_us: u64,
    /// The round that applied their answers (counted, rescheduled, persisted to sled), µs.
    pub apply_us: u64,
    /// `dispatch_us + apply_us`: one check-back tick's own cost.
    pub tick_us: u64,
}

/// Measure one check-back tick with `pending` unfinished transactions of which `due` are
/// due: the cost must follow `due`, not `pending`.
pub fn run_check_tick(
    data_dir: &Path,
    pending: u64,
    due: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<TickReport> {
    use halfmq::{CheckAnswer, TxnId};

    if due > pending || due == 0 {
        return Err(Error::Config {
            setting: "due",
            reason: format!("{due} must be in 1 ..= pending ({pending})"),
        });
    }
    let mut config = BrokerConfig::new(data_dir.join("tick"));
    // The measured rounds are driven here, not by the broker's own check-back thread, and
    // nothing becomes due by itself during the run.
    config.txn.check_back = false;
    config.txn.timeout = Duration::from_secs(3600);
    config.txn.checks_in_flight_max = due.min(4096) as u32;
    let broker = Broker::open(config)?;
    broker.create_topic("tick", 8)?;
    let fill_start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io(data_dir, "start runtime", e))?;
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (broker, next) = (broker.clone(), next.clone());
            rt.spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= pending {
                        return Ok::<_, Error>(mine);
                    }
                    let msg = Message::new(format!("half {i}")).with_key(format!("k{i}"));
                    let txn = broker
                        .send_half_async("tick", &msg, "tick", HalfOptions::default())
                        .await?;
                    if i < due {
                        mine.push(txn);
                    }
                }
            })
        })
        .collect();
    let written = wait_for_tasks(&rt, tasks, Duration::from_secs(2), || {
        progress(&format!(
            "writing halves: {} of {pending}",
            next.load(Ordering::Relaxed).min(pending)
        ))
    })?;
    let first: Vec<TxnId> = written.into_iter().flatten().collect();
    let fill_seconds = fill_start.elapsed().as_secs_f64();
    let counts = broker.stats()?;
    if counts.txn_pending != pending {
        return Err(Error::Invalid {
            what: "bench",
            reason: format!("{} pending, {pending} written", counts.txn_pending),
        });
    }
    for &txn in &first {
        broker.rearm(txn)?;
    }
    broker.register_checker(
        "tick",
        Arc::new(|_: &halfmq::HalfMessage| CheckAnswer::Unknown),
    )?;
    progress(&format!("{pending} pending, {due} due: measuring one tick"));

    let (dispatch_us, apply_us) = broker.measure_check_tick(due)?;
    let checked = broker
        .transactions(None)
        .iter()
        .filter(|i| i.checks == 1)
        .count() as u64;
    if checked != due {
        return Err(Error::Invalid {
            what: "bench",
            reason: format!("{checked} transactions checked, {due} due"),
        });
    }
    broker.close()?;
    Ok(TickReport {
        mode: "txn_tick".into(),
        pending,
        due,
        fill_seconds: round2(fill_seconds),
        dispatch_us,
        apply_us,
        tick_us: dispatch_us + apply_us,
    })
}
