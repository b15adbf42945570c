//! openraft's own test suite for storage implementations, run against the durable raft log
//! and the broker state machine: log state, reads, appends, truncation, purges, the vote,
//! applying, and a snapshot built on one node and installed on another.

use halfmq::BrokerConfig;
use halfmq_raft::log_store::LogStore;
use halfmq_raft::state_machine::StateMachine;
use halfmq_raft::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let fail = |e: &halfmq::Error| -> StorageError {
            StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, AnyError::new(e)).into()
        };
        let dir = tempfile::tempdir().map_err(|e| fail(&halfmq::Error::io("tmp", "create", e)))?;
        // Small segments, so that appends roll, and truncates and purges cross segments.
        let log = LogStore::open(&dir.path().join("raft"), 256).map_err(|e| fail(&e))?;
        let sm = StateMachine::open(
            &dir.path().join("state"),
            BrokerConfig::new(dir.path().join("unused")),
        )
        .await
        .map_err(|e| fail(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("the storage suite passes");
}
