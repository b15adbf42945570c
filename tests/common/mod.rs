//! Helpers shared by the tests. For those that run the real `halfmq` binary: child
//! processes whose output is read line by line, finished CLI commands and bench reports, and a
//! broker on free loopback ports (optionally with `/metrics`) that can be stopped with SIGTERM
//! or SIGKILL and restarted on the same data directory; raw protocol frames. For all: one way
//! to wait for a condition with a deadline. For the embedded ones: opening a broker on the
//! simulated disk (waiting out sled's lock), clean restarts, power losses that poison the old
//! broker, what a fresh group sees; and the pieces the model-based tests share (the case
//! runner, the crash/restart harness, proptest settings, delivery-order checks).
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod load;
pub mod netns;
pub mod segments;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use halfmq::{Broker, BrokerConfig, Delivery, HalfOptions, ManualClock, Message, TxnConfig};
use halfmq_client::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT};
use halfmq_client::protocol::{self, Request};
use halfmq_store::sim::{CrashMode, SimStorage};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_halfmq");

/// How long any one CLI command may take before the test calls it hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// `halfmq ARGS` with no `HALFMQ_*` variable inherited from the test's environment.
pub fn halfmq_cmd<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HALFMQ_") {
            c.env_remove(k);
        }
    }
    c
}

/// A child process whose stdout (line by line) and stderr are read by threads; killed and
/// reaped when dropped, also when the test panics.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub lines: Receiver<String>,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<String>>,
    pub readers: Vec<JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let so = stdout.clone();
        let t_out = thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                so.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let se = stderr.clone();
        let t_err = thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => se.lock().unwrap().push_str(&line),
                }
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            lines,
            stdout,
            stderr,
            readers: vec![t_out, t_err],
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line matching `pred`; `None` if the process closed stdout (exited)
    /// or `timeout` passed first.
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.try_wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "{} did not exit within {timeout:?}; stderr:\n{}",
                self.name,
                self.stderr()
            )
        })
    }

    /// The exit status, or `None` if it is still running after `timeout`.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.join_readers();
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send SIGTERM (a clean stop).
    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -TERM failed");
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kill (SIGKILL) if still running, reap, and read the rest of its output.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.join_readers();
    }

    pub fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A finished CLI command.
pub struct Run {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Run {
        assert!(
            self.status.success(),
            "`{}` failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn fails(self) -> Run {
        assert!(
            !self.status.success(),
            "`{}` should have failed:\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("`{}` printed non-JSON {l:?}: {e}", self.what))
            })
            .collect()
    }
}

pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Run {
    run_env(args, &[])
}

pub fn run_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Run {
    let what = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = halfmq_cmd(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn(&format!("halfmq {what}"), cmd);
    let status = p.wait_exit(COMMAND_TIMEOUT);
    let stdout = p.stdout_lines().join("\n");
    Run {
        what: format!("halfmq {what}"),
        status,
        stdout,
        stderr: p.stderr(),
    }
}

/// `halfmq bench ARGS --json`, which must succeed: its report (the last line) and the run.
pub fn bench_json(args: &[&str]) -> (Value, Run) {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = run(&all).ok();
    let report = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    (report, out)
}

/// [`bench_json`] of `--embedded EXTRA --size 64 --data-dir TMP/bench`, EXTRA a command line.
pub fn embedded_bench(extra: &str) -> (Value, Run) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bench");
    let mut args = vec!["--embedded"];
    args.extend(words(extra));
    args.extend(["--size", "64", "--data-dir", data.to_str().unwrap()]);
    bench_json(&args)
}

/// The words of a command line, for argument lists written as one string.
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// The whole number `field` of a JSON line (a report, a produced or consumed message).
pub fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

/// The number `field` of a JSON line, as a float.
pub fn f(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

/// The `round_ratios` of a comparing bench's JSON report.
pub fn round_ratios(r: &Value) -> Vec<f64> {
    r["round_ratios"]
        .as_array()
        .unwrap_or_else(|| panic!("no round_ratios in {r}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// A port nobody listens on right now (it may be taken again before the broker binds it;
/// [`BrokerProc::start`] retries then).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind("127.0.0.1:0") {
            return l.local_addr().unwrap().port();
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("no free port on 127.0.0.1");
}

/// Check-back fast enough for a test: a transaction is checked 300 ms after its half, then
/// every 100-200 ms, at most `check_max` times.
pub fn fast_check_back(check_max: &str) -> Vec<&str> {
    vec![
        "--txn-timeout-ms",
        "300",
        "--txn-check-interval-ms",
        "100",
        "--txn-check-backoff-max-ms",
        "200",
        "--txn-check-max",
        check_max,
    ]
}

/// `halfmq broker` on `dir`, listening on `addr` (and serving `/metrics` on `metrics`).
fn broker_proc(dir: &Path, addr: &str, metrics: Option<&str>, extra: &[String]) -> Proc {
    let mut args = vec![
        "broker".to_owned(),
        "--data-dir".to_owned(),
        dir.display().to_string(),
        "--listen".to_owned(),
        addr.to_owned(),
    ];
    if let Some(m) = metrics {
        args.extend(["--metrics".to_owned(), m.to_owned()]);
    }
    args.extend(extra.iter().cloned());
    Proc::spawn("broker", halfmq_cmd(&args))
}

/// A `halfmq broker` child on a loopback port, and on a second one for `/metrics` when
/// started with [`BrokerProc::start_with_metrics`].
pub struct BrokerProc {
    pub proc: Proc,
    pub addr: String,
    /// The `/metrics` address (host:port), if it serves one.
    pub metrics: Option<String>,
    /// The data directory and the extra arguments, for [`BrokerProc::restart`].
    pub dir: PathBuf,
    pub extra: Vec<String>,
    /// The temporary data directory of [`BrokerProc::fresh`], removed after the broker
    /// (fields drop in order: the process is stopped first).
    tmp: Option<tempfile::TempDir>,
}

impl BrokerProc {
    /// On a new temporary data directory that lives as long as the broker.
    pub fn fresh(extra: &[&str]) -> BrokerProc {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = BrokerProc::start(tmp.path(), extra);
        b.tmp = Some(tmp);
        b
    }

    pub fn start(dir: &Path, extra: &[&str]) -> BrokerProc {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        BrokerProc::launch(dir.to_path_buf(), extra, false)
    }

    /// With `--metrics` on a second free port; returns once both are announced.
    pub fn start_with_metrics(dir: &Path, extra: &[&str]) -> BrokerProc {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        BrokerProc::launch(dir.to_path_buf(), extra, true)
    }

    fn launch(dir: PathBuf, extra: Vec<String>, with_metrics: bool) -> BrokerProc {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = format!("127.0.0.1:{}", free_port());
            let metrics = with_metrics.then(|| format!("127.0.0.1:{}", free_port()));
            let mut proc = broker_proc(&dir, &addr, metrics.as_deref(), &extra);
            // The metrics endpoint is announced before the broker listens.
            let announced = metrics.as_ref().map(|m| {
                let line = proc.wait_line(|l| l.starts_with("metrics at"), Duration::from_secs(60));
                (m, line)
            });
            let announced_ok = match &announced {
                None => true,
                Some((m, Some(line))) => {
                    assert_eq!(line, &format!("metrics at http://{m}/metrics"));
                    true
                }
                Some((_, None)) => false,
            };
            let listening = if announced_ok {
                proc.wait_line(|l| l.contains("listening on"), Duration::from_secs(60))
            } else {
                None
            };
            if let Some(line) = listening {
                assert!(line.contains(&addr), "listening line {line:?} names {addr}");
                return BrokerProc {
                    proc,
                    addr,
                    metrics,
                    dir,
                    extra,
                    tmp: None,
                };
            }
            proc.kill();
            let err = proc.stderr();
            // A port was taken between free_port() and the broker's bind: try others.
            if attempt < 10 && err.contains("listen") {
                continue;
            }
            panic!(
                "the broker did not start (attempt {attempt}):\nstdout:\n{}\nstderr:\n{err}",
                proc.stdout_lines().join("\n")
            );
        }
    }

    /// Start on `dir`: `Ok` once it listens, `Err(stderr)` if it exits first; an exit
    /// status of 0 without listening, or no answer within a minute, fails the test.
    pub fn try_start(dir: &Path, extra: &[&str]) -> Result<BrokerProc, String> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _attempt in 0..10 {
            let addr = format!("127.0.0.1:{}", free_port());
            let mut proc = broker_proc(dir, &addr, None, &extra);
            if proc
                .wait_line(|l| l.contains("listening on"), Duration::from_secs(60))
                .is_some()
            {
                return Ok(BrokerProc {
                    proc,
                    addr,
                    metrics: None,
                    dir: dir.to_path_buf(),
                    extra,
                    tmp: None,
                });
            }
            let status = proc.wait_exit(Duration::from_secs(30));
            let err = proc.stderr();
            if err.contains("listen") && err.contains("in use") {
                continue; // the port was taken between free_port() and the bind
            }
            assert!(
                !status.success(),
                "the broker exited with status 0 without listening; stderr:\n{err}"
            );
            return Err(err);
        }
        panic!("no free port for the broker after 10 attempts");
    }

    pub fn send_sigterm(&self) {
        self.proc.sigterm();
    }

    /// SIGTERM; the broker must stop cleanly with exit status 0.
    pub fn terminate(&mut self) {
        self.send_sigterm();
        let st = self.proc.wait_exit(Duration::from_secs(30));
        assert!(
            st.success(),
            "the broker should exit 0 on SIGTERM, got {st}; stderr:\n{}",
            self.proc.stderr()
        );
        assert!(
            self.proc.stderr().contains("stopped cleanly"),
            "{}",
            self.proc.stderr()
        );
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// A new broker on the same data directory and settings (on a new port); this one must
    /// have stopped.
    pub fn restart(mut self) -> BrokerProc {
        assert!(!self.proc.is_running(), "restart of a running broker");
        let (dir, extra) = (
            std::mem::take(&mut self.dir),
            std::mem::take(&mut self.extra),
        );
        let with_metrics = self.metrics.is_some();
        let tmp = self.tmp.take();
        drop(self);
        let mut b = BrokerProc::launch(dir, extra, with_metrics);
        b.tmp = tmp;
        b
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }
}

// ---------------------------------------------------------------------------------------
// Protocol frames
// ---------------------------------------------------------------------------------------

/// One encoded frame of `kind`.
pub fn frame_of(kind: FrameKind, correlation: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_into(&mut out, kind, correlation, body, FRAME_BYTES_MAX_DEFAULT).unwrap();
    out
}

/// One encoded request frame.
pub fn request_frame(correlation: u64, req: &Request) -> Vec<u8> {
    frame_of(
        FrameKind::Request,
        correlation,
        &protocol::encode(req).unwrap(),
    )
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Run `f` every `every` until it returns `Some`, or panic with `what` after `timeout`.
pub fn poll_until<T>(
    every: Duration,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        thread::sleep(every);
    }
}

/// [`poll_until`] every 100 ms: for what another process does (a CLI run, an HTTP scrape).
pub fn eventually<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_until(Duration::from_millis(100), timeout, what, f)
}

/// Wait until `f` holds, checking every 2 ms (for what a thread of this process does), or
/// panic with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    poll_until(Duration::from_millis(2), limit, what, || f().then_some(()))
}

// ---------------------------------------------------------------------------------------
// Settings from the environment
// ---------------------------------------------------------------------------------------

/// `name` as a number, `None` when unset; a value that is not a number is a test bug.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

/// Cases per model-based property: `HALFMQ_MODEL_CASES`, or `default`.
pub fn model_cases(default: u32) -> u32 {
    std::env::var("HALFMQ_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Embedded brokers
// ---------------------------------------------------------------------------------------

/// The smallest segment the configuration allows, so that tests roll over to new files.
pub const SEGMENT_BYTES_SMALL: u64 = 64 * 1024;
/// Small enough that a few KiB of traffic writes a checkpoint (and so persists the broker's
/// indexes to sled) in the middle of a test.
pub const CHECKPOINT_BYTES_SMALL: u64 = 16 * 1024;
/// Large enough that no checkpoint is written during a test except on open and close.
pub const CHECKPOINT_BYTES_NEVER: u64 = 64 * 1024 * 1024;

/// A configuration on `dir` with the smallest segments ([`SEGMENT_BYTES_SMALL`]), the
/// largest record they allow, and a checkpoint every `checkpoint_bytes`.
pub fn small_segments(dir: &Path, checkpoint_bytes: u64) -> BrokerConfig {
    let mut cfg = BrokerConfig::new(dir);
    cfg.store.segment_bytes = SEGMENT_BYTES_SMALL;
    // At most a quarter of a segment, less headers (the configuration checks it).
    cfg.store.record_bytes_max = 16 * 1024 - 64;
    cfg.store.checkpoint_bytes = checkpoint_bytes;
    cfg
}

/// Check-back timing in ms (`timeout`, `interval`, `backoff_max`), at most `check_max` checks,
/// each answer awaited up to `answer_timeout` ms.
pub fn check_back(
    (timeout, interval, backoff_max): (u64, u64, u64),
    check_max: u32,
    answer_timeout: u64,
) -> TxnConfig {
    let ms = Duration::from_millis;
    TxnConfig::default()
        .with_timeout(ms(timeout))
        .with_check_interval(ms(interval))
        .with_check_backoff_max(ms(backoff_max))
        .with_check_max(check_max)
        .with_check_answer_timeout(ms(answer_timeout))
}

/// A fresh simulated disk (sled in a new temporary directory) and a broker on it, configured
/// by `config` for that directory, with `topic` of `queues` queues.
pub fn fresh_sim(
    config: impl FnOnce(&Path) -> BrokerConfig,
    topic: &str,
    queues: u32,
) -> (tempfile::TempDir, SimStorage, BrokerConfig, Arc<Broker>) {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimStorage::new();
    let cfg = config(dir.path());
    let b = open_sim(&disk, &cfg);
    b.create_topic(topic, queues).unwrap();
    (dir, disk, cfg, b)
}

/// A broker in a new temporary directory, configured by `config` for that directory, whose
/// clock moves only when the test moves it, so that "not yet" and "now" are exact; the
/// directory (keep it as long as the broker), the broker and that clock.
pub fn fresh_with_clock(
    config: impl FnOnce(&Path) -> BrokerConfig,
) -> (tempfile::TempDir, Arc<Broker>, ManualClock) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::starting_now();
    let cfg = config(dir.path()).with_clock(clock.clone());
    let b = Broker::open(cfg).unwrap_or_else(|e| panic!("open: {e}"));
    (dir, b, clock)
}

/// Move the broker's manual clock by `ms` and run what fell due (check-backs, delayed
/// messages) now.
pub fn advance(b: &Broker, clock: &ManualClock, ms: u64) {
    clock.advance_ms(ms);
    b.run_due_now();
}

/// How long a reopen waits for the metadata lock of the broker closed just before.
pub const OPEN_WAIT: Duration = Duration::from_secs(15);

/// Run `open` again while it fails on sled's metadata lock, which sled releases lazily after
/// the previous handle is dropped, for up to [`OPEN_WAIT`]; any other outcome is returned.
pub fn open_waiting_for_lock(
    mut open: impl FnMut() -> halfmq::Result<Arc<halfmq::Broker>>,
) -> halfmq::Result<Arc<halfmq::Broker>> {
    let start = Instant::now();
    loop {
        match open() {
            Err(halfmq::Error::Meta(m))
                if m.contains("could not acquire lock") && start.elapsed() < OPEN_WAIT =>
            {
                thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Open a broker on the simulated disk `disk` (sled on the real directory of `cfg`), waiting
/// out the metadata lock of one closed just before.
pub fn try_open_sim(disk: &SimStorage, cfg: &BrokerConfig) -> halfmq::Result<Arc<Broker>> {
    open_waiting_for_lock(|| Broker::open_with(Arc::new(disk.clone()), cfg.clone()))
}

/// [`try_open_sim`], which must succeed.
pub fn open_sim(disk: &SimStorage, cfg: &BrokerConfig) -> Arc<Broker> {
    try_open_sim(disk, cfg).unwrap_or_else(|e| panic!("open failed: {e}"))
}

/// Close cleanly and drop the last handle.
pub fn close(b: Arc<Broker>) {
    b.close()
        .unwrap_or_else(|e| panic!("clean close failed: {e}"));
    release_last(b);
}

/// The broker itself, once `b` is its only handle. Its own background threads hold it
/// weakly and upgrade for a moment while they work, so another handle for an instant is
/// theirs and is waited out; one kept for 5 s is a bug, and `b` comes back as `Err`.
pub fn sole(mut b: Arc<Broker>) -> Result<Broker, Arc<Broker>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(b) {
            Ok(broker) => return Ok(broker),
            Err(shared) if Instant::now() < deadline => b = shared,
            Err(shared) => return Err(shared),
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Drop `b`, which must be the last handle of its broker (see [`sole`]).
pub fn release_last(b: Arc<Broker>) {
    if sole(b).is_err() {
        panic!("the old broker is still shared");
    }
}

/// Clean close, then open again on the same disk.
pub fn restart_sim(disk: &SimStorage, b: Arc<Broker>, cfg: &BrokerConfig) -> Arc<Broker> {
    close(b);
    open_sim(disk, cfg)
}

/// A write on a crashed disk, which must poison the store so that the old broker cannot
/// persist anything more (no closing checkpoint). A half, not a plain send: a plain send may
/// fail early (growing its consume-queue file) without reaching the flusher, and then the
/// store is not poisoned. When the half needs a new segment, making it fails first (an I/O
/// error to the caller: the flusher turns every failure of its own into `Poisoned`); that
/// changes nothing and by design poisons nothing (it is how a full disk answers), so the
/// store is stopped as the power loss would have stopped it. `topic` must exist.
pub fn poison(b: &Broker, topic: &str) {
    let r = b.send_half(
        topic,
        &Message::new("probe"),
        "probe",
        HalfOptions::default(),
    );
    match r {
        Err(halfmq::Error::Poisoned(_)) => {}
        Err(halfmq::Error::Io { .. }) => {
            b.store().fail_stop("power lost");
            let again = b.send_half(
                topic,
                &Message::new("probe"),
                "probe",
                HalfOptions::default(),
            );
            assert!(
                matches!(again, Err(halfmq::Error::Poisoned(_))),
                "{again:?}"
            );
        }
        r => panic!("the write on the crashed disk did not poison the store: {r:?}"),
    }
}

/// Stop a broker whose disk has crashed: its threads are stopped and joined, errors are
/// expected; `b` must be the last handle.
pub fn close_after_crash(b: Arc<Broker>) {
    let _ = b.close();
    release_last(b);
}

/// Power loss under a running broker: the disk as it comes back after `mode`; the old broker
/// is poisoned through `probe_topic` (see [`poison`]) and closed.
pub fn crash_sim(
    disk: &SimStorage,
    b: Arc<Broker>,
    mode: CrashMode,
    probe_topic: &str,
) -> SimStorage {
    let after = disk.crash(mode);
    poison(&b, probe_topic);
    close_after_crash(b);
    after
}

/// Drop the last handle of a broker, if any, so that its metadata database is closed before
/// the next open; an error if anything else still holds it.
pub fn release(broker: Option<Arc<Broker>>) -> Result<(), String> {
    match broker.map(sole) {
        None | Some(Ok(_)) => Ok(()),
        Some(Err(_)) => Err("the broker is still shared after its users stopped".into()),
    }
}

/// Larger than any poll here: "everything there is".
pub const POLL_ALL: usize = 1 << 20;

static GROUP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Everything a consumer group that never consumed gets from `topic`.
pub fn visible(b: &Broker, topic: &str) -> Vec<Delivery> {
    let group = format!("check-{}", GROUP_SEQ.fetch_add(1, Ordering::Relaxed));
    b.poll(&group, topic, POLL_ALL)
        .unwrap_or_else(|e| panic!("poll {topic}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Model-based tests
// ---------------------------------------------------------------------------------------

/// Either crash the simulated disk can have.
pub fn crash_mode() -> impl Strategy<Value = CrashMode> {
    prop_oneof![
        Just(CrashMode::DropUnsynced),
        any::<u64>().prop_map(|seed| CrashMode::KeepRandomPrefix { seed }),
    ]
}

/// The operations of a case, one a line, the one that failed marked.
pub fn format_ops<Op: std::fmt::Debug>(ops: &[Op], failed_at: Option<usize>) -> String {
    let mut s = String::new();
    for (i, op) in ops.iter().enumerate() {
        let mark = if Some(i) == failed_at {
            "  <== failed here"
        } else {
            ""
        };
        s.push_str(&format!("  {i:3}: {op:?}{mark}\n"));
    }
    s
}

/// Run a model-based case: `setup`, each op through `step`, then `finish`; a failure names
/// where it happened, describes the case (`case`) and lists the ops with the failed one
/// marked.
pub fn run_ops<H, Op: std::fmt::Debug>(
    case: &str,
    ops: &[Op],
    setup: impl FnOnce() -> Result<H, String>,
    mut step: impl FnMut(&mut H, &Op) -> Result<(), String>,
    (finish_what, finish): (&str, impl FnOnce(H) -> Result<(), String>),
) -> Result<(), TestCaseError> {
    let fail = |at: Option<usize>, what: &str, msg: String| {
        TestCaseError::fail(format!(
            "{what}: {msg}\ncase: {case}\nops:\n{}",
            format_ops(ops, at)
        ))
    };
    let mut h = setup().map_err(|m| fail(None, "setup", m))?;
    for (i, op) in ops.iter().enumerate() {
        step(&mut h, op).map_err(|m| fail(Some(i), &format!("step {i} {op:?}"), m))?;
    }
    finish(h).map_err(|m| fail(None, finish_what, m))
}

/// [`run_ops`] that finishes with a power loss (`final_crash`, through the harness) and then
/// `after`.
pub fn run_ops_then_crash<H: SimHarness, Op: std::fmt::Debug>(
    case: &str,
    ops: &[Op],
    (setup, step): (
        impl FnOnce() -> Result<H, String>,
        impl FnMut(&mut H, &Op) -> Result<(), String>,
    ),
    final_crash: CrashMode,
    after: impl FnOnce(&mut H) -> Result<(), String>,
) -> Result<(), TestCaseError> {
    let finish = |mut h: H| {
        h.crash(final_crash)?;
        after(&mut h)
    };
    run_ops(
        case,
        ops,
        setup,
        step,
        (&format!("final crash {final_crash:?}"), finish),
    )
}

/// Open a broker on the simulated disk; the error names `when`.
pub fn open_sim_at(
    disk: &SimStorage,
    cfg: &BrokerConfig,
    when: &str,
) -> Result<Arc<Broker>, String> {
    Broker::open_with(Arc::new(disk.clone()), cfg.clone()).map_err(|e| format!("open {when}: {e}"))
}

/// The simulated disk, the configuration and the broker (`None` between closing one and
/// opening the next) of a [`SimHarness`].
pub type SimParts<'a> = (
    &'a mut SimStorage,
    &'a BrokerConfig,
    &'a mut Option<Arc<Broker>>,
);

/// A model-based harness over one broker on a simulated disk: power loss and clean restarts
/// the same way for every model.
pub trait SimHarness {
    fn parts(&mut self) -> SimParts<'_>;

    /// The broker was just opened again `when`: check what the model expects.
    fn opened(&mut self, when: &str) -> Result<(), String>;

    /// Open the broker again on the disk, then [`SimHarness::opened`].
    fn reopen(&mut self, when: &str) -> Result<(), String> {
        let (disk, cfg, broker) = self.parts();
        *broker = Some(open_sim_at(disk, cfg, when)?);
        self.opened(when)
    }

    /// Power loss: crash the disk first, so that the old broker can change nothing on the
    /// disk that survives; only then let it go, and reopen.
    fn crash(&mut self, mode: CrashMode) -> Result<(), String> {
        let (disk, _, broker) = self.parts();
        let survivor = disk.crash(mode);
        release(broker.take())?;
        *disk = survivor;
        self.reopen(&format!("after crash {mode:?}"))
    }

    /// Close cleanly and reopen.
    fn clean_restart(&mut self) -> Result<(), String> {
        let (_, _, broker) = self.parts();
        if let Some(b) = broker {
            b.close().map_err(|e| format!("clean close failed: {e}"))?;
        }
        release(broker.take())?;
        self.reopen("after a clean close")
    }
}

/// The proptest configuration of a model-based property: [`model_cases`] cases (`default`
/// unless set), shrinking for at most `max_shrink_iters` steps.
pub fn model_config(default: u32, max_shrink_iters: u32) -> ProptestConfig {
    ProptestConfig {
        max_shrink_iters,
        ..ProptestConfig::with_cases(model_cases(default))
    }
}

/// The offsets one poll of `group` returned from each queue of `topic` are the first ones of
/// those due there: none acked before, given twice, or out of order.
pub fn check_due_order(
    group: &str,
    topic: &str,
    per_queue: &BTreeMap<u32, Vec<u64>>,
    due: &BTreeMap<u32, Vec<u64>>,
) -> Result<(), String> {
    for (q, offsets) in per_queue {
        let due = &due[q];
        if offsets.len() > due.len() || offsets[..] != due[..offsets.len()] {
            return Err(format!(
                "poll {group} {topic} gave queue {q} offsets {offsets:?}; the next due were {due:?} (acked before, given twice, or out of order)"
            ));
        }
    }
    Ok(())
}

/// Note what a poll handed to a group: delivered, and outstanding (oldest first) until acked.
pub fn mark_delivered<T: Ord + Clone>(
    delivered: &mut BTreeSet<T>,
    outstanding: &mut Vec<T>,
    got: impl IntoIterator<Item = T>,
) {
    for id in got {
        delivered.insert(id.clone());
        if !outstanding.contains(&id) {
            outstanding.push(id);
        }
    }
}

/// Everything `group` gets from `topic` until a poll comes back empty, by queue in the order
/// delivered (nothing acked).
pub fn poll_by_queue(
    b: &Broker,
    group: &str,
    topic: &str,
) -> halfmq::Result<BTreeMap<u32, Vec<Delivery>>> {
    let mut got: BTreeMap<u32, Vec<Delivery>> = BTreeMap::new();
    loop {
        let batch = b.poll(group, topic, POLL_ALL)?;
        if batch.is_empty() {
            return Ok(got);
        }
        for d in batch {
            got.entry(d.queue).or_default().push(d);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The metadata database on disk
// ---------------------------------------------------------------------------------------

/// Wait until sled has let go of the database in `meta_dir` (its file lock, which sled
/// releases from a background thread after the last handle is dropped), so that a test can
/// change its files without sled writing into them afterwards.
pub fn wait_for_sled_released(meta_dir: &Path) {
    let db = meta_dir.join("db");
    wait_until("sled to release its database", OPEN_WAIT, || {
        let Ok(f) = std::fs::File::open(&db) else {
            return true;
        };
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
    });
}

/// Run `test` on a new runtime with `broker` and a client of it served in this process
/// ([`serve_in_process`]); the server is shut down once `test` is done with the client.
pub fn with_served<F, Fut>(broker: &Arc<Broker>, test: F)
where
    F: FnOnce(Arc<Broker>, halfmq_client::Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    load::runtime().block_on(async {
        let (server, client) = serve_in_process(broker.clone()).await;
        test(broker.clone(), client).await;
        server.shutdown().await;
    });
}

/// `broker` served on a free loopback port in this process, and a client connected to it:
/// for network tests that move the broker's manual clock.
pub async fn serve_in_process(
    broker: Arc<Broker>,
) -> (halfmq_cli::server::Server, halfmq_client::Client) {
    let config = halfmq_cli::server::ServerConfig::new("127.0.0.1:0".parse().unwrap());
    let server = halfmq_cli::server::Server::start(broker, config)
        .await
        .unwrap_or_else(|e| panic!("serve: {e}"));
    let addr = server.local_addr().to_string();
    let client = halfmq_client::Client::connect(halfmq_client::ClientConfig::new(addr))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    (server, client)
}
