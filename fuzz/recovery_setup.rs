//! Where and how the `recovery` fuzz target opens its store; `tests/fuzz_corpus.rs` writes
//! the seed inputs of that target with the same set-up (both include this file).

use halfmq_store::StoreConfig;

/// The data directory on the simulated disk.
pub const DIR: &str = "/fuzz";
/// Its first (and in the raw-bytes modes only) segment.
pub const SEGMENT: &str = "/fuzz/log/00000000000000000000.log";
/// The checkpoint the raw-bytes modes may add.
pub const CHECKPOINT: &str = "/fuzz/checkpoint.00000000000000000001";

pub fn config() -> StoreConfig {
    StoreConfig::default()
        .with_segment_bytes(64 * 1024)
        .with_record_bytes_max(4 * 1024)
        .with_pending_bytes_max(16 * 1024)
        .with_checkpoint_bytes(8 * 1024)
}
