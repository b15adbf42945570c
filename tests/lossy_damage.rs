//! Damaged sectors under the real broker: one sector (512 bytes, every bit inverted) of one
//! kind of file in the data directory, after a clean run whose acknowledgements the test
//! recorded. The data directory lives on the lossy file system (`halfmq-lossyfs`); the
//! damage is done to its durable copy while nothing is mounted, as a bad sector would be
//! found after a reboot.
//!
//! After each, the broker must either serve everything that was acknowledged (every send at
//! its queue and offset with its bytes, every committed transaction once and no rolled-back
//! one, every half left pending still pending, every idempotency key still remembered), or
//! refuse to start with a non-zero exit and an error naming the damaged file. Serving less
//! than what was acknowledged, silently, fails. Damage to a record the checkpoint covers must
//! stop the start; `halfmq repair` then quarantines it, and the broker serves everything
//! but the messages repair reports lost. Damage to a consume-queue file (derived from the
//! log) must not stop anything: the entries are rebuilt from the log.

mod common;
mod lossy;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::run;
use halfmq::{HalfOptions, Message, TxnState};
use halfmq_client::{Client, ClientConfig, Consumer, Delivery, SendReceipt};
use halfmq_lossyfs::SECTOR;
use lossy::{body_of, runtime, Rig};

const TOPIC: &str = "orders";
const PAY: &str = "payments";
const GROUP: &str = "workers";
const PRODUCER_GROUP: &str = "pay-svc";
const SENDS: usize = 600;

async fn connect(addr: &str) -> Client {
    Client::connect(ClientConfig::new(addr).with_request_timeout(Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// What the clients saw acknowledged before the damage.
#[derive(Default)]
struct Acked {
    sends: Vec<(String, SendReceipt)>,
    committed: Vec<String>,
    rolled_back: Vec<String>,
    /// Halves left without an outcome: (txn id, key).
    pending: Vec<(u64, String)>,
}

/// Keyed sends with idempotency keys, transactions of every outcome, and a consumer group
/// that acks part of the topic; then a clean shutdown (everything durable).
fn load(rig: &mut Rig) -> Acked {
    rig.start();
    let addr = rig.addr();
    let acked = runtime().block_on(async {
        let c = connect(&addr).await;
        c.create_topic(TOPIC, 2).await.unwrap();
        c.create_topic(PAY, 2).await.unwrap();
        let mut a = Acked::default();
        for i in 0..SENDS {
            let key = format!("order-{i}");
            let msg = Message::new(body_of(&key))
                .with_key(key.clone())
                .with_idempotency_key(key.clone());
            let r = c.send(TOPIC, &msg).await.unwrap();
            a.sends.push((key, r));
        }
        for i in 0..30 {
            let key = format!("pay-{i}");
            let msg = Message::new(body_of(&key)).with_key(key.clone());
            let txn = c
                .send_half(PAY, &msg, PRODUCER_GROUP, HalfOptions::default())
                .await
                .unwrap();
            match i % 3 {
                0 => {
                    c.commit(txn).await.unwrap();
                    a.committed.push(key);
                }
                1 => {
                    c.rollback(txn).await.unwrap();
                    a.rolled_back.push(key);
                }
                _ => a.pending.push((txn.0, key)),
            }
        }
        let consumer = Consumer::new(c.clone(), GROUP, TOPIC);
        let got = consumer
            .poll(200, Duration::from_millis(500))
            .await
            .unwrap();
        assert!(!got.is_empty());
        consumer.ack_many(&got).await.unwrap();
        a
    });
    rig.shut_down();
    acked
}

/// Everything `group` gets from `topic`; a failed poll or ack is pushed to `problems`.
async fn drain(
    client: &Client,
    group: &str,
    topic: &str,
    problems: &mut Vec<String>,
) -> Vec<Delivery> {
    let c = Consumer::new(client.clone(), group, topic);
    let mut all = Vec::new();
    loop {
        let got = match c.poll(512, Duration::from_millis(300)).await {
            Ok(got) => got,
            Err(e) => {
                problems.push(format!(
                    "poll {group}/{topic} after {} messages: {e}",
                    all.len()
                ));
                return all;
            }
        };
        if got.is_empty() {
            return all;
        }
        if let Err(e) = c.ack_many(&got).await {
            problems.push(format!("ack {group}/{topic}: {e}"));
            return all;
        }
        all.extend(got);
    }
}

/// Everything acknowledged, served by the running broker, except the sends with a key in
/// `lost` (reported lost by `halfmq repair`): the broken promises, if any.
fn served(rig: &Rig, a: &Acked, lost_keys: &HashSet<String>) -> Vec<String> {
    let addr = rig.addr();
    runtime().block_on(async {
        let c = connect(&addr).await;
        let mut lost = Vec::new();
        let got = drain(&c, "check", TOPIC, &mut lost).await;
        let at: HashMap<&str, &Delivery> = got.iter().map(|d| (d.key.as_str(), d)).collect();
        let kept = || a.sends.iter().filter(|(k, _)| !lost_keys.contains(k));
        for (key, r) in kept() {
            match at.get(key.as_str()) {
                Some(d) if (d.queue, d.offset) == (r.queue, r.offset) && d.body == body_of(key) => {}
                Some(d) => lost.push(format!(
                    "{key}, acknowledged at {}/{} (log offset {}), is served at {}/{} with {} bytes",
                    r.queue,
                    r.offset,
                    r.log_offset,
                    d.queue,
                    d.offset,
                    d.body.len()
                )),
                None => lost.push(format!(
                    "{key}, acknowledged at {}/{} (log offset {}), is not served",
                    r.queue, r.offset, r.log_offset
                )),
            }
        }
        if got.len() != kept().count() {
            lost.push(format!(
                "{} messages served, {} sent and not lost",
                got.len(),
                kept().count()
            ));
        }
        let pay = drain(&c, "check", PAY, &mut lost).await;
        for key in &a.committed {
            let n = pay.iter().filter(|d| &d.key == key).count();
            if n != 1 {
                lost.push(format!("committed {key} is visible {n} times"));
            }
        }
        for key in &a.rolled_back {
            if pay.iter().any(|d| &d.key == key) {
                lost.push(format!("rolled-back {key} is visible"));
            }
        }
        let listed: HashMap<u64, (TxnState, String)> = c
            .transactions(None)
            .await
            .unwrap()
            .into_iter()
            .map(|t| (t.txn_id, (t.state, t.key)))
            .collect();
        for (id, key) in &a.pending {
            match listed.get(id) {
                Some((_, k)) if k == key => {}
                other => lost.push(format!("half {id} ({key}) is not pending: {other:?}")),
            }
        }
        for (key, r) in kept() {
            let msg = Message::new(body_of(key))
                .with_key(key.clone())
                .with_idempotency_key(key.clone());
            match c.send(TOPIC, &msg).await {
                Ok(again) if again.duplicate && (again.queue, again.offset) == (r.queue, r.offset) => {}
                other => lost.push(format!("idempotency key {key} is forgotten: {other:?}")),
            }
        }
        lost
    })
}

/// Invert every bit of the sector at `offset` (rounded down to a sector) of `file`.
fn flip_sector(file: &Path, offset: u64) {
    let mut bytes = std::fs::read(file).unwrap();
    let start = (offset / SECTOR * SECTOR) as usize;
    assert!(
        start < bytes.len(),
        "{} has no byte {offset}",
        file.display()
    );
    let end = (start + SECTOR as usize).min(bytes.len());
    for b in &mut bytes[start..end] {
        *b ^= 0xff;
    }
    std::fs::write(file, bytes).unwrap();
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// The offset of the middle one of the sectors of `file` that hold anything but zeros.
fn middle_used_sector(file: &Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let used: Vec<u64> = bytes
        .chunks(SECTOR as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, _)| i as u64 * SECTOR)
        .collect();
    assert!(!used.is_empty(), "{} holds only zeros", file.display());
    used[used.len() / 2]
}

/// The segment file that holds log offset `log_offset`, and the position in it.
fn segment_of(data: &Path, log_offset: u64) -> (PathBuf, u64) {
    let base = files(&data.join("log"))
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            name.strip_suffix(".log")?.parse::<u64>().ok()
        })
        .filter(|b| *b <= log_offset)
        .max()
        .expect("a segment that holds the offset");
    (
        data.join("log").join(format!("{base:020}.log")),
        log_offset - base,
    )
}

/// How a damage case ended (each already checked by `damage_case`).
enum Outcome {
    /// The broker started and served everything acknowledged; it is still running.
    Served(Rig),
    /// The broker refused to start, naming the damaged file; the mount is up, nothing runs.
    Refused(Rig, Acked),
}

/// Load, damage what `pick` chooses (a file of the durable data directory and an offset in
/// it), restart, and check the outcome, which is returned with the rig.
fn damage_case(what: &str, pick: impl FnOnce(&Path, &Acked) -> (PathBuf, u64)) -> Outcome {
    let mut rig = Rig::new();
    let acked = load(&mut rig);
    let data = rig.durable_data_dir();
    let (file, offset) = pick(&data, &acked);
    assert!(file.is_file(), "{what}: no file {}", file.display());
    flip_sector(&file, offset);
    let rel = file.strip_prefix(&data).unwrap().to_path_buf();
    eprintln!(
        "{what}: inverted the sector at {offset} of {}",
        rel.display()
    );
    rig.remount();
    match rig.try_start() {
        Ok(()) => {
            let lost = served(&rig, &acked, &HashSet::new());
            eprintln!("{what}: the broker started; {} problems", lost.len());
            assert!(
                lost.is_empty(),
                "{what} ({} at {offset}): the broker started but does not serve everything \
                 acknowledged ({} problems):\n{}\nbroker:\n{}",
                rel.display(),
                lost.len(),
                lost.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
                rig.broker.as_ref().unwrap().stderr()
            );
            Outcome::Served(rig)
        }
        Err(stderr) => {
            eprintln!("{what}: the broker refused to start:\n{stderr}");
            let name = rel.file_name().unwrap().to_string_lossy().into_owned();
            // sled's files are its own: an error naming the metadata directory names them.
            let named =
                stderr.contains(&name) || (rel.starts_with("meta") && stderr.contains("meta"));
            assert!(
                named,
                "{what}: the broker refused to start, but its error does not name {}:\n{stderr}",
                rel.display()
            );
            Outcome::Refused(rig, acked)
        }
    }
}

#[test]
fn undamaged_the_broker_serves_everything_acknowledged() {
    let mut rig = Rig::new();
    let acked = load(&mut rig);
    rig.remount();
    rig.try_start()
        .unwrap_or_else(|e| panic!("no damage, yet the broker does not start:\n{e}"));
    let lost = served(&rig, &acked, &HashSet::new());
    assert!(lost.is_empty(), "without any damage:\n{}", lost.join("\n"));
}

#[test]
fn damaged_segment_header() {
    damage_case("segment header", |data, a| {
        let last = a.sends.last().unwrap().1.log_offset;
        let (seg, _) = segment_of(data, last);
        (seg, 0)
    });
}

/// The open re-reads the newest segment below the checkpoint, so it stops at the damage;
/// `halfmq repair` quarantines it and the broker serves everything else.
#[test]
fn damaged_record_in_the_acknowledged_region() {
    let outcome = damage_case("acknowledged record", |data, a| {
        let mid = a.sends[a.sends.len() / 2].1.log_offset;
        segment_of(data, mid + 40)
    });
    let Outcome::Refused(mut rig, acked) = outcome else {
        panic!("damage below the checkpoint must stop the start");
    };
    let data = rig.data_dir();
    let r = run(&["repair", "--data-dir", data.to_str().unwrap(), "--json"]).ok();
    let mut lost_keys = HashSet::new();
    for range in r.json_lines() {
        // Messages of the topic, by the place their index entry gives (a key in a damaged
        // header may be unreadable); the group commits' marks have neither.
        for l in range["lost"].as_array().expect("lost") {
            if l["topic"].as_str() == Some(TOPIC) {
                let place = (l["queue"].as_u64(), l["offset"].as_u64());
                let (key, _) = acked
                    .sends
                    .iter()
                    .find(|(_, r)| (Some(u64::from(r.queue)), Some(r.offset)) == place)
                    .unwrap_or_else(|| panic!("a lost message that was never sent: {l}"));
                lost_keys.insert(key.clone());
            }
        }
    }
    eprintln!("repair lost {lost_keys:?}");
    assert!(
        (1..=2).contains(&lost_keys.len()),
        "one sector touches one or two records: {}",
        r.stdout
    );
    rig.try_start()
        .unwrap_or_else(|e| panic!("the broker does not start after repair:\n{e}"));
    let problems = served(&rig, &acked, &lost_keys);
    assert!(
        problems.is_empty(),
        "after repair:\n{}",
        problems.join("\n")
    );
}

/// Derived from the log: the damaged entries are rebuilt from it when a poll reaches them.
#[test]
fn damaged_consume_queue() {
    let outcome = damage_case("consume queue", |data, _| {
        let cq = data.join("cq").join(TOPIC);
        let f = files(&cq).into_iter().next().expect("a consume-queue file");
        let f = cq.join(f);
        let at = middle_used_sector(&f);
        (f, at)
    });
    let Outcome::Served(rig) = outcome else {
        panic!("a damaged consume queue stops the broker");
    };
    let log = rig.broker.as_ref().expect("running").stderr();
    assert!(
        log.contains("rebuilt them from the log"),
        "the rebuild is not in the broker's log:\n{log}"
    );
}

#[test]
fn damaged_key_index() {
    damage_case("key index", |data, _| {
        let f = files(data)
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "idx"))
            .expect("a key-index file");
        let f = data.join(f);
        let at = middle_used_sector(&f);
        (f, at)
    });
}

#[test]
fn damaged_checkpoint() {
    damage_case("checkpoint", |data, _| {
        let f = files(data)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("checkpoint."))
            })
            .max()
            .expect("a checkpoint file");
        (data.join(f), 0)
    });
}

#[test]
fn damaged_sled() {
    damage_case("sled", |data, _| {
        let f = data.join("meta").join("db");
        let at = middle_used_sector(&f);
        (f, at)
    });
}
