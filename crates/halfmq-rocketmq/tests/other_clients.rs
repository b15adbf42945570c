//! The official Apache RocketMQ clients in Python (`rocketmq-python-client`) and Node.js
//! (`rocketmq-client-nodejs`), unchanged, against the endpoint: the programs in
//! `tests/clients/` run their cases (plain producer, transactions with check-back, a delayed
//! message, a simple consumer with lease changes and redelivery, a tag filter, FIFO groups,
//! a message priority refused, push consumers with a retry and dead letters, plain and FIFO,
//! and one whose listener outlasts its lease, which the endpoint renews)
//! and report each as a JSON line; these tests then check the broker holds what they say.
//!
//! The clients are installed by the tests when missing, pinned exactly
//! (`tests/clients/python/requirements.txt`, `tests/clients/node/package-lock.json`), under
//! the target directory. Without `python3` (with pip) or `node` (with npm), or when the
//! install fails, the test fails saying what is missing: it is never skipped.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use halfmq::{DeadLetter, GroupSettings, TxnId, TxnState};
use serde_json::Value;

use common::{start, Endpoint};

/// The most a client program may run.
const PROGRAM_LIMIT: Duration = Duration::from_secs(50);

/// The cases every program runs, in order.
const CASES: [&str; 10] = [
    "plain",
    "transactions",
    "delayed",
    "consume",
    "tags",
    "fifo",
    "refused",
    "push",
    "fifo_push",
    "slow_push",
];

/// Where this crate's client programs and their pinned dependency lists are.
fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Scratch space under the target directory (installs, the clients' home and logs).
fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("official-rocketmq-clients")
        .join(name)
}

/// Run a set-up command; panics saying what to install if it cannot run or fails.
fn run_setup(cmd: &mut Command, what: &str) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Install into `dir` with `install` (given a fresh directory beside it) unless an earlier
/// run installed these `pins` (the pinned list's text, kept in a marker file); the finished
/// install is moved into place at once, so a broken or outdated one is never used.
fn installed(dir: &Path, pins: &Path, install: impl FnOnce(&Path)) -> PathBuf {
    let pinned = std::fs::read(pins).expect("the pinned dependency list");
    let marker = |d: &Path| d.join(".installed-pins");
    if std::fs::read(marker(dir)).ok().as_deref() == Some(pinned.as_slice()) {
        return dir.to_owned();
    }
    let name = dir.file_name().expect("a directory name").to_string_lossy();
    let partial = dir.with_file_name(format!("{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).expect("a scratch directory");
    install(&partial);
    std::fs::write(marker(&partial), &pinned).expect("marker");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&partial, dir).expect("the install moves into place");
    dir.to_owned()
}

/// The Python client, installed with its pinned dependencies; the PYTHONPATH to use.
fn python_client() -> PathBuf {
    let requirements = clients_dir().join("python/requirements.txt");
    installed(&scratch("python"), &requirements, |dir| {
        let what = "installing the official RocketMQ Python client needs python3 with pip \
                    (python3 -m pip) and access to PyPI";
        run_setup(Command::new("python3").arg("--version"), what);
        run_setup(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                ])
                .args(["--no-deps", "--target"])
                .arg(dir)
                .arg("-r")
                .arg(&requirements),
            what,
        );
    })
}

/// The Node.js client, installed by `npm ci` from the committed lock file; the
/// node_modules directory.
fn node_client() -> PathBuf {
    let src = clients_dir().join("node");
    let dir = installed(&scratch("node"), &src.join("package-lock.json"), |dir| {
        let what = "installing the official RocketMQ Node.js client needs node and npm and \
                    access to the npm registry";
        run_setup(Command::new("node").arg("--version"), what);
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(src.join(f), dir.join(f)).expect("copy the package files");
        }
        run_setup(
            Command::new("npm")
                .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
                .current_dir(dir),
            what,
        );
    });
    dir.join("node_modules")
}

/// What a client program printed: its case lines by name, stdout and stderr.
struct Run {
    cases: BTreeMap<String, Value>,
    shown: String,
}

impl Run {
    /// A field of a case's line.
    fn field(&self, case: &str, name: &str) -> &Value {
        let v = &self.cases[case][name];
        assert!(
            !v.is_null(),
            "case {case} reported no {name}:\n{}",
            self.shown
        );
        v
    }

    fn str(&self, case: &str, name: &str) -> &str {
        self.field(case, name)
            .as_str()
            .unwrap_or_else(|| panic!("case {case}: {name} is not a string"))
    }
}

/// Run a client program against the endpoint (killed after [`PROGRAM_LIMIT`]); every case
/// must be reported ok and the program must exit 0, or the test fails showing its output
/// and the client's own log.
async fn run_program(mut cmd: Command, home: &Path, log: &Path) -> Run {
    std::fs::create_dir_all(home).expect("a home for the client");
    cmd.env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown_cmd = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {shown_cmd}: {e}"));
        wait_at_most(child, PROGRAM_LIMIT)
    })
    .await
    .expect("the program's waiter joins");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let log_tail = std::fs::read_to_string(log)
        .map(|l| {
            let lines: Vec<&str> = l.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        })
        .unwrap_or_default();
    let shown = format!(
        "exit: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- client log ({})\n{log_tail}",
        out.status,
        log.display()
    );
    // Shown with the test's output (each case's line says how long it took).
    println!("{shown}");
    let mut cases = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{shown}"));
        let name = v["case"].as_str().expect("a case name").to_owned();
        cases.insert(name, v);
    }
    for case in CASES {
        let line = cases
            .get(case)
            .unwrap_or_else(|| panic!("case {case} was not reported:\n{shown}"));
        assert_eq!(
            line["ok"],
            Value::Bool(true),
            "case {case} failed:\n{shown}"
        );
    }
    assert!(out.status.success(), "the program failed:\n{shown}");
    Run { cases, shown }
}

/// Wait for `child`; killed when it runs longer than `limit`.
fn wait_at_most(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let until = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                break;
            }
            Err(e) => panic!("waiting for the client program: {e}"),
        }
    }
    child.wait_with_output().expect("the program's output")
}

/// A broker with the topics and groups the programs expect, its transactions checked back
/// soon after they are left open, and the endpoint in front of it.
async fn endpoint() -> Endpoint {
    let e = start("orders", 2, |mut c| {
        c.txn.timeout = Duration::from_millis(1000);
        c.txn.check_interval = Duration::from_millis(500);
        c
    })
    .await;
    for (topic, queues) in [
        ("txn", 1),
        ("reminders", 1),
        ("work", 2),
        ("tags", 1),
        ("ledger", 4),
        ("push", 1),
        ("fifo-push", 1),
        ("slow-push", 1),
    ] {
        e.broker.create_topic(topic, queues).expect("topic");
    }
    let fifo = GroupSettings {
        fifo: Some(true),
        ..Default::default()
    };
    e.broker
        .set_group_settings("books", &fifo)
        .expect("settings");
    // The push consumers' group: a failed message is retried once, 200 ms later (the retry
    // policy the clients are sent), then dead-lettered.
    let pushers = GroupSettings {
        max_retries: Some(1),
        retry_backoff_ms: Some(vec![200]),
        ..Default::default()
    };
    e.broker
        .set_group_settings("pushers", &pushers)
        .expect("settings");
    let fifo_pushers = GroupSettings {
        fifo: Some(true),
        ..pushers
    };
    e.broker
        .set_group_settings("fifo-pushers", &fifo_pushers)
        .expect("settings");
    // The slow push consumer's group: 1 s leases, which its listener outlasts; the endpoint
    // renews them (the PushConsumer's `auto_renew`).
    let slow = GroupSettings {
        visibility_timeout_ms: Some(1000),
        ..Default::default()
    };
    e.broker
        .set_group_settings("slow-pushers", &slow)
        .expect("settings");
    e
}

/// Bodies of what group `group` is handed of `topic` now, sorted.
fn bodies(e: &Endpoint, group: &str, topic: &str) -> Vec<String> {
    let got = e.broker.poll(group, topic, 100).expect("poll");
    let mut b: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    b.sort();
    b
}

/// The dead letters of group `group`, whose keys must be `keys`.
fn dead_letters(e: &Endpoint, group: &str, keys: &[&str]) -> Vec<DeadLetter> {
    let dead = e.broker.dead_letters(group, 0, 10).expect("dead letters");
    let got: Vec<&str> = dead.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(got, keys, "{dead:?}");
    dead
}

/// What the broker must hold after a program's cases passed: each message stored exactly
/// once, the rolled-back ones invisible, every consumer group done with what it acked.
fn check_broker(e: &Endpoint, run: &Run) {
    // plain: stored once, with its tag, both keys, its property and the client's id (and
    // the refused priority message is not stored beside it).
    let got = e.broker.poll("native", "orders", 10).expect("poll");
    assert_eq!(got.len(), 1, "{got:?}");
    let d = &got[0];
    assert_eq!(d.body, b"paid 12.50");
    assert_eq!(d.tag(), Some("paid"));
    assert_eq!(d.properties.get("region").map(String::as_str), Some("eu"));
    let message_id = run.str("plain", "message_id");
    assert_eq!(
        d.properties.get("rocketmq.message_id").map(String::as_str),
        Some(message_id)
    );
    let mut keys: Vec<&str> = d.properties["rocketmq.keys"].split(' ').collect();
    keys.sort();
    assert_eq!(keys, ["order-42", "user-7"]);
    for key in keys {
        let t = e.broker.trace(key).expect("trace");
        assert_eq!(t.messages.len(), 1, "{key}: {t}");
    }

    // transactions: each ended as the producer or its checker said.
    let txns = run.field("transactions", "transactions");
    for (body, want) in [
        ("kept", TxnState::Committed),
        ("dropped", TxnState::RolledBack),
        ("commit me", TxnState::Committed),
        ("roll me back", TxnState::RolledBack),
    ] {
        let id: u64 = txns[body]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no halfmq transaction id for {body}: {txns}"));
        let state = e.broker.transaction_state(TxnId(id)).expect("state");
        assert_eq!(state, want, "{body}");
    }
    assert_eq!(bodies(e, "native", "txn"), ["commit me", "kept"]);

    // delayed: delivered once, not before its time.
    assert_eq!(e.broker.delayed_pending(), 0);
    let got = e.broker.poll("native", "reminders", 10).expect("poll");
    assert_eq!(got.len(), 1);
    let at = run.field("delayed", "deliver_at_ms").as_u64().expect("ms");
    assert!(got[0].timestamp_ms >= at, "delivered before its time");

    // consume, tags, fifo: each message stored once; the consuming group acked all it
    // was handed (and a tag filter's skipped message is done for its group).
    assert_eq!(bodies(e, "native", "work"), ["job 0", "job 1", "job 2"]);
    assert_eq!(bodies(e, "workers", "work"), Vec::<String>::new());
    assert_eq!(bodies(e, "native", "tags"), ["p1", "p2", "r1", "s1"]);
    assert_eq!(bodies(e, "billing", "tags"), Vec::<String>::new());
    assert_eq!(bodies(e, "native", "ledger"), ["a0", "a1", "a2", "b0"]);
    assert_eq!(bodies(e, "books", "ledger"), Vec::<String>::new());
    assert_eq!(run.field("fifo", "order"), &serde_json::json!(["a1", "a2"]));

    // push: the message failing both attempts is the group's one dead letter (the broker's
    // doing: the clients give a failed message back by a lease change); the others were
    // acked.
    assert_eq!(
        bodies(e, "native", "push"),
        ["ok 1", "ok 2", "poison", "retry me"]
    );
    assert_eq!(bodies(e, "pushers", "push"), Vec::<String>::new());
    let dead = dead_letters(e, "pushers", &["poison"]);
    assert_eq!(dead[0].failures, 2, "{dead:?}");

    // fifo_push: the client forwarded the failing head of the message group to the dead
    // letters itself; the next one of the group came after it and was acked.
    let dead = dead_letters(e, "fifo-pushers", &["first"]);
    assert!(
        dead[0].reason.contains("forwarded by the RocketMQ client"),
        "{dead:?}"
    );
    assert_eq!(bodies(e, "native", "fifo-push"), ["first", "second"]);
    assert_eq!(bodies(e, "fifo-pushers", "fifo-push"), Vec::<String>::new());

    // slow_push: handed out once although its listener took three leases, and acked.
    assert_eq!(
        run.field("slow_push", "seen"),
        &serde_json::json!({"slow": [1]})
    );
    assert_eq!(bodies(e, "slow-pushers", "slow-push"), Vec::<String>::new());
}

/// A client's program under `tests/clients/`, run by `interpreter` with `env`, its home (where
/// it logs) named `home`, and its log file there.
struct Program<'a> {
    interpreter: &'a str,
    path: &'a str,
    env: Vec<(&'a str, PathBuf)>,
    home: &'a str,
    log: &'a str,
}

/// Run `p` against a fresh endpoint, then check what the broker holds.
async fn run_and_check(p: Program<'_>) {
    let e = endpoint().await;
    let home = scratch(p.home);
    let mut cmd = Command::new(p.interpreter);
    cmd.arg(clients_dir().join(p.path))
        .arg(e.addr.to_string())
        .envs(p.env);
    let run = run_program(cmd, &home, &home.join(p.log)).await;
    check_broker(&e, &run);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_works_unchanged() {
    let site = python_client();
    run_and_check(Program {
        interpreter: "python3",
        path: "python/official_client.py",
        env: vec![
            ("PYTHONPATH", site),
            ("PYTHONPYCACHEPREFIX", scratch("python-pycache")),
        ],
        home: "python-home",
        log: "logs/rocketmq_python/rocketmq_client.log",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_node_client_works_unchanged() {
    let modules = node_client();
    run_and_check(Program {
        interpreter: "node",
        path: "node/official_client.js",
        env: vec![("NODE_PATH", modules)],
        home: "node-home",
        log: "logs/rocketmq/rocketmq_client_nodejs.log",
    })
    .await;
}
