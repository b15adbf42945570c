//! A broker's log, byte for byte, for comparing nodes of a cluster: shared by the workspace
//! tests (`tests/common`) and `halfmq-raft`'s (which include this file by path).

use std::path::Path;

/// Each segment file (`*.log`) in `log_dir`, in order, as its bytes up to its last non-zero
/// one (the rest is preallocated); empty ones left out. Equal for two brokers that wrote the
/// same records at the same offsets.
pub fn log_segments(log_dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(log_dir)
        .expect("the log directory")
        .map(|e| e.expect("a log file").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let mut b = std::fs::read(p).expect("a segment");
            let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
            b.truncate(end);
            b
        })
        .filter(|b| !b.is_empty())
        .collect()
}
