//! A real full disk: the broker's data directory on a small tmpfs, filled until the log and
//! sled both fail with ENOSPC, then space freed. Without a restart, acks and checkpoints
//! must work again (sled latches its first write error, see `crates/halfmq/src/meta/live.rs`),
//! and after a restart nothing acknowledged is lost: every acknowledged send is there, and no
//! acknowledged ack is undone.
//!
//! Needs root (it mounts a tmpfs). If the mount fails, the test fails saying so; it never
//! passes without having filled a disk.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use halfmq::{Broker, BrokerConfig, Error, Message};

use common::*;

/// A size-limited tmpfs, unmounted (and its mount point removed) when dropped, whatever
/// happened in between.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Tmpfs {
        let parent = tempfile::tempdir().expect("a temporary directory for the mount point");
        // The mount point outlives the TempDir guard: the Drop below removes it.
        let dir = parent.keep();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Tmpfs { dir },
            Ok(o) => {
                let _ = std::fs::remove_dir(&dir);
                panic!(
                    "this test needs a size-limited tmpfs, and `mount -t tmpfs` failed \
                     (run it as root, with CAP_SYS_ADMIN): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                panic!("this test needs `mount` to make a size-limited tmpfs: {e}")
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still has a file open there (a failed test's broker): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn config(dir: &Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.store.segment_bytes = 1024 * 1024;
    c.store.record_bytes_max = 64 * 1024;
    c.store.pending_bytes_max = 256 * 1024;
    c.store.checkpoint_bytes = 128 * 1024;
    c.store.key_index_slots = 1024;
    c.store.key_index_entries = 4096;
    c.default_queues = 1;
    c
}

fn is_disk_full(e: &Error) -> bool {
    matches!(
        e,
        Error::DiskFull { .. } | Error::Io { .. } | Error::Meta(_)
    )
}

/// Fill what is left of the file system with one file; its path. Fails the test if the
/// file system never reports ENOSPC (then it is not full).
fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = File::create(&path).expect("create the filler file");
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut full = false;
    for _ in 0..(1 << 16) {
        if f.write_all(&chunk).is_err() {
            full = true;
            break;
        }
    }
    for _ in 0..(1 << 16) {
        if full && f.write_all(&[0xA5]).is_err() && f.flush().is_ok() {
            break;
        }
    }
    assert!(full, "the file system never reported a full disk");
    path
}

fn checkpoint_seqs(data: &Path) -> BTreeSet<u64> {
    std::fs::read_dir(data)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("checkpoint.")?.parse::<u64>().ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn after_a_full_disk_acks_and_checkpoints_work_again_without_a_restart_and_nothing_acknowledged_is_lost(
) {
    let fs = Tmpfs::mount(24 * 1024 * 1024);
    let data = fs.dir.join("data");
    let cfg = config(&data);
    let b = Broker::open(cfg.clone()).expect("open on the tmpfs");
    b.create_topic("t", 1).unwrap();

    let body = |i: usize| format!("m{i:06}-{}", "x".repeat(4000)).into_bytes();
    let mut sent: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();

    // Some traffic, some of it acked.
    for i in 0..200 {
        b.send("t", &Message::new(body(i))).unwrap();
        sent.insert(body(i));
    }
    let delivered = b.poll("g", "t", 1000).unwrap();
    assert_eq!(delivered.len(), 200);
    for d in &delivered[..50] {
        b.ack("g", "t", d.queue, d.offset).unwrap();
        acked.insert(d.offset);
    }

    // Ballast that the "operator" deletes later, so that space really comes back (room for
    // new segments), then the log fills the disk: sends are refused, never half-stored.
    let ballast = fs.dir.join("ballast");
    std::fs::write(&ballast, vec![0x5Au8; 8 * 1024 * 1024]).unwrap();
    let mut i = 200;
    let refused = loop {
        match b.send("t", &Message::new(body(i))) {
            Ok(_) => {
                sent.insert(body(i));
                i += 1;
            }
            Err(e) => break e,
        }
        assert!(i < 100_000, "the disk never filled up");
    };
    assert!(is_disk_full(&refused), "{refused:?}");
    // Whatever is left goes to a filler file, so that sled's next write fails too.
    let filler = fill_up(&fs.dir);

    // Acks now fail (sled cannot write): each one either is acknowledged (Ok) or fails.
    let mut failed_acks = 0;
    let mut next = 50;
    while next < 150 {
        let d = &delivered[next];
        next += 1;
        match b.ack("g", "t", d.queue, d.offset) {
            Ok(()) => {
                acked.insert(d.offset);
            }
            Err(e) => {
                assert!(is_disk_full(&e), "{e:?}");
                failed_acks += 1;
                if failed_acks >= 3 {
                    break;
                }
            }
        }
    }
    assert!(
        failed_acks > 0,
        "sled never hit the full disk: the test did not test a full metadata store"
    );
    let checkpoints_before = checkpoint_seqs(&data);

    // Space is back.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&ballast).unwrap();

    // Acks work again, without a restart.
    for d in &delivered[next..] {
        b.ack("g", "t", d.queue, d.offset).unwrap_or_else(|e| {
            panic!(
                "an ack still fails after space came back (offset {}): {e}",
                d.offset
            )
        });
        acked.insert(d.offset);
    }
    // So do sends, and with them checkpoints (which persist idempotency keys to sled first).
    let newest_before = checkpoints_before.last().copied().unwrap_or(0);
    let mut j = 0;
    while checkpoint_seqs(&data).last().copied().unwrap_or(0) <= newest_before {
        let k = 1_000_000 + j;
        let m = Message::new(body(k)).with_idempotency_key(format!("idem-{k}"));
        b.send("t", &m)
            .unwrap_or_else(|e| panic!("a send still fails after space came back: {e}"));
        sent.insert(body(k));
        j += 1;
        assert!(
            j < 400,
            "no checkpoint was written after space came back (newest before: {newest_before})"
        );
    }

    // Restart: nothing acknowledged is lost.
    close(b);
    let b: Arc<Broker> = open_waiting_for_lock(|| Broker::open(cfg.clone())).unwrap();
    let all = visible(&b, "t");
    let bodies: BTreeSet<Vec<u8>> = all.iter().map(|d| d.body.clone()).collect();
    let missing: Vec<_> = sent.difference(&bodies).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged sends are missing after the restart",
        missing.len()
    );
    let again: BTreeSet<u64> = b
        .poll("g", "t", 100_000)
        .unwrap()
        .iter()
        .map(|d| d.offset)
        .collect();
    let undone: Vec<_> = acked.intersection(&again).collect();
    assert!(
        undone.is_empty(),
        "acknowledged acks were undone: {undone:?}"
    );
    close(b);
    drop(fs);
}
