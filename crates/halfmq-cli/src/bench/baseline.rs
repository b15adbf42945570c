//! The raw disk's own limits, measured on the bench directory, for the ratios to them.

use std::path::Path;
use std::time::{Duration, Instant};

use halfmq::Result;
use halfmq_store::io::{FsStorage, Storage};

use super::report::{histogram, round2, round3, BenchReport};

/// The raw disk's limits, measured on the bench directory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    /// One-at-a-time 1 KiB write + fdatasync per second.
    pub serial_fsync_ops_per_s: f64,
    /// Median of one such write + fdatasync, microseconds.
    pub serial_fsync_p50_us: u64,
    /// p99 of one such write + fdatasync, microseconds.
    pub serial_fsync_p99_us: u64,
    /// 256 KiB write + fdatasync, MiB/s.
    pub group_mib_per_s: f64,
}

/// Measure the raw disk in `dir` for about `seconds` per test, through the same file layer
/// and preallocation the store uses.
pub fn measure_baseline(dir: &Path, seconds: f64) -> Result<Baseline> {
    let storage = FsStorage;
    storage.create_dir_all(dir)?;
    let path = dir.join("baseline.raw");
    let file = storage.open(&path, true)?;
    let file_bytes: u64 = 256 * 1024 * 1024;
    file.allocate(file_bytes)?;
    file.sync_data()?;
    let limit = Duration::from_secs_f64(seconds);

    let mut hist = histogram();
    let small = vec![0xA5u8; 1024];
    let start = Instant::now();
    let mut pos = 0u64;
    let mut ops = 0u64;
    while start.elapsed() < limit && pos + 1024 <= file_bytes {
        let t = Instant::now();
        file.write_all_at(&small, pos)?;
        file.sync_data()?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        pos += 1024;
        ops += 1;
    }
    let serial_secs = start.elapsed().as_secs_f64();

    let big = vec![0x5Au8; 256 * 1024];
    let start = Instant::now();
    let mut pos = 0u64;
    let mut bytes = 0u64;
    while start.elapsed() < limit {
        if pos + big.len() as u64 > file_bytes {
            pos = 0;
        }
        file.write_all_at(&big, pos)?;
        file.sync_data()?;
        pos += big.len() as u64;
        bytes += big.len() as u64;
    }
    let group_secs = start.elapsed().as_secs_f64();
    drop(file);
    storage.remove_file(&path)?;
    settle_deletes(dir);
    Ok(Baseline {
        serial_fsync_ops_per_s: ops as f64 / serial_secs,
        serial_fsync_p50_us: hist.value_at_quantile(0.50),
        serial_fsync_p99_us: hist.value_at_quantile(0.99),
        group_mib_per_s: bytes as f64 / (1024.0 * 1024.0) / group_secs,
    })
}

/// Add the raw disk's figures and the ratios to them to `report`; returns the raw disk's
/// rate in messages of `msg_bytes`.
pub(super) fn with_baseline(report: &mut BenchReport, b: &Baseline, msg_bytes: usize) -> f64 {
    let raw_msgs = b.group_mib_per_s * 1024.0 * 1024.0 / msg_bytes.max(1) as f64;
    report.raw_serial_fsync_ops_per_s = Some(round2(b.serial_fsync_ops_per_s));
    report.raw_serial_fsync_p50_us = Some(b.serial_fsync_p50_us);
    report.raw_serial_fsync_p99_us = Some(b.serial_fsync_p99_us);
    report.raw_group_mib_per_s = Some(round2(b.group_mib_per_s));
    report.raw_group_msgs_per_s = Some(round2(raw_msgs));
    report.ratio_to_raw = Some(round3(report.msgs_per_s / raw_msgs));
    report.p99_ratio_to_raw_fsync = Some(round3(
        report.p99_us as f64 / b.serial_fsync_p99_us.max(1) as f64,
    ));
    raw_msgs
}

/// Remove `data_dir/name` (a finished run's data) and wait until the deletion reached the
/// disk, so that it is not paid for during the next run: on a file system mounted with
/// `discard` (this project's machine), freeing gigabytes sends discards to the disk at the
/// next journal commit, and back-to-back rounds ran up to 2x slower behind them.
pub(super) fn remove_between_runs(data_dir: &Path, name: &str) {
    let _ = std::fs::remove_dir_all(data_dir.join(name));
    settle_deletes(data_dir);
}

/// `syncfs` of the file system holding `dir`: commits (and discards) what deletes freed.
/// Only a measurement aid; failing it changes nothing but the next run's noise.
pub(super) fn settle_deletes(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = rustix::fs::syncfs(&d);
    }
}
