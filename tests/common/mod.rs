//! Helpers shared by the tests: for those that run the real `halfmq` binary, child
//! processes whose output is read line by line, finished CLI commands, and a broker on a
//! free loopback port that can be stopped with SIGTERM or SIGKILL and restarted on the same
//! data directory; for the embedded ones, reopening a broker right after closing one.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

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

/// A `halfmq broker` child on a loopback port.
pub struct BrokerProc {
    pub proc: Proc,
    pub addr: String,
    pub dir: PathBuf,
    pub extra: Vec<String>,
}

impl BrokerProc {
    pub fn start(dir: &Path, extra: &[&str]) -> BrokerProc {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        BrokerProc::start_with(dir.to_path_buf(), extra)
    }

    pub fn start_with(dir: PathBuf, extra: Vec<String>) -> BrokerProc {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr = format!("127.0.0.1:{}", free_port());
            let mut args = vec![
                "broker".to_owned(),
                "--data-dir".to_owned(),
                dir.display().to_string(),
                "--listen".to_owned(),
                addr.clone(),
            ];
            args.extend(extra.iter().cloned());
            let mut proc = Proc::spawn("broker", halfmq_cmd(&args));
            if let Some(line) =
                proc.wait_line(|l| l.contains("listening on"), Duration::from_secs(60))
            {
                assert!(line.contains(&addr), "listening line {line:?} names {addr}");
                return BrokerProc {
                    proc,
                    addr,
                    dir,
                    extra,
                };
            }
            proc.kill();
            let err = proc.stderr();
            // The port was taken between free_port() and the broker's bind: try another.
            if attempt < 10 && err.contains("listen") {
                continue;
            }
            panic!(
                "the broker did not start (attempt {attempt}):\nstdout:\n{}\nstderr:\n{err}",
                proc.stdout_lines().join("\n")
            );
        }
    }

    pub fn send_sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -TERM failed");
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
        drop(self);
        BrokerProc::start_with(dir, extra)
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }
}

/// Run `f` until it returns `Some`, or panic with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// Embedded brokers
// ---------------------------------------------------------------------------------------

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
