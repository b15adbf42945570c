//! What every producers run shares: the counters that hand out messages, the producers
//! (threads or tasks) and waiting for them, the send window of one producer, and the
//! once-a-second progress.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use halfmq::{Error, Result};

use super::report::histogram;
use super::BenchOptions;

/// `--in-flight` is 1 ..= 1024, and more than 1 only for async producers (a thread calling
/// the blocking `send` has one send at a time).
pub(super) fn check_in_flight(opts: &BenchOptions) -> Result<()> {
    let reason = if opts.in_flight == 0 || opts.in_flight > 1024 {
        format!("{} is outside 1 ..= 1024", opts.in_flight)
    } else if opts.threads && opts.in_flight > 1 {
        "a producer thread makes one blocking send at a time: use tasks (no --threads) for \
         more than 1 in flight"
            .into()
    } else {
        return Ok(());
    };
    Err(Error::Config {
        setting: "in-flight",
        reason,
    })
}

/// The runtime the async producers run on: `opts.runtime_threads` workers, by default
/// `default_workers` but no more than there are producers. A lone producer on two workers
/// pays tokio's hand-off between them on every answer (the worker that takes the socket's
/// event wakes the other, measured at two futex calls and about 10 µs per message here): a
/// cost of the load generator, which a single-producer application avoids the same way.
pub(super) fn producers_runtime(
    opts: &BenchOptions,
    default_workers: usize,
    what: &std::path::Path,
) -> Result<Runtime> {
    let workers = opts
        .runtime_threads
        .unwrap_or(default_workers.min(opts.producers));
    if !(1..=1024).contains(&workers) {
        return Err(Error::Config {
            setting: "runtime-threads",
            reason: format!("{workers} is outside 1 ..= 1024"),
        });
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(|e| Error::io(what, "start runtime", e))
}

/// One worker per core: the embedded producers' default (their tasks do the broker's work
/// of a send themselves, up to the store's batch).
pub(super) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One producer: keeps up to `in_flight` sends outstanding (issuing the next as soon as one
/// is acknowledged) until the load is over; `send(n)` makes this producer's n-th send.
/// Returns the producer's latency histogram (from issuing a send to its acknowledgement).
///
/// The window is `in_flight` lanes, each a loop of one send at a time, made once and polled
/// in place: a send's future is built inside its lane, never boxed or moved into a queue of
/// futures per message (that cost the load generator, which shares the CPUs with the broker
/// it measures, a copy of every send future and an allocation per message).
pub(super) async fn produce_windowed<F, Fut>(
    load: &Load,
    in_flight: usize,
    send: F,
) -> ProducerResult
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let n = AtomicU64::new(0);
    // One histogram for the producer: its lanes run in one task, so the lock is never
    // contended (a lock only because the task must be `Send`).
    let hist = parking_lot::Mutex::new(histogram());
    let lane = || async {
        while load.next() {
            let started = Instant::now();
            send(n.fetch_add(1, Ordering::Relaxed)).await?;
            load.record(&mut hist.lock(), started);
        }
        Ok::<_, Error>(())
    };
    let mut lanes: FuturesUnordered<_> = (0..in_flight.max(1)).map(|_| lane()).collect();
    while let Some(done) = lanes.next().await {
        done?;
    }
    drop(lanes);
    Ok(hist.into_inner())
}

/// Print progress about once a second until `finished`, stopping the load at `limit_time`.
pub(super) fn monitor(
    load: &Load,
    start: Instant,
    limit_time: Option<Duration>,
    finished: impl Fn() -> bool,
    progress: &mut dyn FnMut(&str),
) {
    let mut last = (Instant::now(), 0u64);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let done = finished();
        if limit_time.is_some_and(|l| start.elapsed() >= l) {
            load.stop.store(true, Ordering::Relaxed);
        }
        if last.0.elapsed() >= Duration::from_secs(1) || done {
            let n = load.done.load(Ordering::Relaxed);
            let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
            progress(&format!(
                "{:>6.1} s  {n:>10} msgs  {rate:>10.0} msg/s",
                start.elapsed().as_secs_f64()
            ));
            last = (Instant::now(), n);
        }
        if done {
            return;
        }
    }
}

pub(super) fn limit_time(opts: &BenchOptions) -> Option<Duration> {
    match (opts.messages, opts.seconds) {
        (_, Some(s)) => Some(Duration::from_secs_f64(s)),
        (None, None) => Some(Duration::from_secs(10)),
        (Some(_), None) => None,
    }
}

/// Shared counters of one run.
pub(super) struct Load {
    pub(super) issued: AtomicU64,
    pub(super) done: AtomicU64,
    pub(super) stop: AtomicBool,
    pub(super) limit: u64,
}

impl Load {
    /// Claim the next message to send, if the run is not over.
    pub(super) fn next(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self.issued.fetch_add(1, Ordering::Relaxed) < self.limit
    }

    pub(super) fn record(&self, hist: &mut Histogram<u64>, started: Instant) {
        hist.saturating_record(started.elapsed().as_micros() as u64);
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

pub(super) type ProducerResult = Result<Histogram<u64>>;

pub(super) enum Producers {
    Threads(Vec<std::thread::JoinHandle<ProducerResult>>),
    Tasks(Runtime, Vec<JoinHandle<ProducerResult>>),
}

impl Producers {
    pub(super) fn finished(&self) -> bool {
        match self {
            Producers::Threads(h) => h.iter().all(|h| h.is_finished()),
            Producers::Tasks(_, h) => h.iter().all(|h| h.is_finished()),
        }
    }

    /// Join tasks but keep their runtime alive (for requests after the run).
    pub(super) fn join_keep(self) -> Result<(Runtime, Vec<Histogram<u64>>)> {
        match self {
            Producers::Tasks(rt, hs) => {
                let out = join_tasks(&rt, hs)?;
                Ok((rt, out))
            }
            Producers::Threads(_) => Err(Error::Invalid {
                what: "bench",
                reason: "join_keep needs tasks".into(),
            }),
        }
    }

    pub(super) fn join(self) -> Result<Vec<Histogram<u64>>> {
        match self {
            Producers::Threads(hs) => hs
                .into_iter()
                .map(|h| h.join().map_err(|_| panicked())?)
                .collect(),
            Producers::Tasks(rt, hs) => join_tasks(&rt, hs),
        }
    }
}

fn panicked() -> Error {
    Error::Poisoned("a bench producer panicked".into())
}

/// The outputs of `tasks` in order, once all have finished; a task that failed or panicked
/// fails the run.
pub(super) fn join_tasks<T>(rt: &Runtime, tasks: Vec<JoinHandle<Result<T>>>) -> Result<Vec<T>> {
    rt.block_on(async {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.map_err(|_| panicked())??);
        }
        Ok(out)
    })
}

/// Wait for `tasks` (the writers that fill a store before a measurement), calling `report`
/// every `every` meanwhile so that a long fill shows it is alive, and return their outputs.
pub(super) fn wait_for_tasks<T>(
    rt: &Runtime,
    tasks: Vec<JoinHandle<Result<T>>>,
    every: Duration,
    mut report: impl FnMut(),
) -> Result<Vec<T>> {
    let mut last = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() >= every {
            report();
            last = Instant::now();
        }
    }
    join_tasks(rt, tasks)
}
