//! Every setting of `halfmq broker`, each defined once (see `settings!`): its name, the type
//! people write it in, its environment variable, the configuration field it sets, and its
//! help. Defaults are the configuration's own (`BrokerConfig::default()` and the like).

use std::path::PathBuf;

use super::Flush;

settings! {
    /// Where and how the log is stored.
    storage: StorageSettings, "storage" {
        /// Data directory.
        data_dir: PathBuf = "HALFMQ_DATA_DIR" => broker.data_dir;
        /// When a write is acknowledged.
        flush: Flush = "HALFMQ_FLUSH" => broker.store.flush;
        /// Sync interval with --flush async, ms; consumers see a message once it is synced.
        flush_interval_ms: u64 = "HALFMQ_FLUSH_INTERVAL_MS" => flush_interval;
        /// Size of one commit-log segment file (preallocated), bytes.
        segment_bytes: u64 = "HALFMQ_SEGMENT_BYTES" => broker.store.segment_bytes;
        /// Largest record (header, topic, key, properties and body), bytes; at most a
        /// quarter of a segment.
        record_bytes_max: u32 = "HALFMQ_RECORD_BYTES_MAX" => broker.store.record_bytes_max;
        /// Bytes that may wait for the flusher before senders are made to wait; also bounds
        /// what --flush async can lose on power loss.
        pending_bytes_max: u64 = "HALFMQ_PENDING_BYTES_MAX" => broker.store.pending_bytes_max;
        /// Log bytes between recovery checkpoints; recovery re-reads at most about this much.
        checkpoint_bytes: u64 = "HALFMQ_CHECKPOINT_BYTES" => broker.store.checkpoint_bytes;
        /// Hash slots per key-index file (`trace`).
        key_index_slots: u32 = "HALFMQ_KEY_INDEX_SLOTS" => broker.store.key_index_slots;
        /// Entries per key-index file (`trace`).
        key_index_entries: u32 = "HALFMQ_KEY_INDEX_ENTRIES" => broker.store.key_index_entries;
        /// A lone producer's request writes and syncs its own group commit on the network
        /// worker, instead of waking the flusher thread and being woken back by it.
        tasks_may_lead: bool = "HALFMQ_TASKS_MAY_LEAD" => broker.store.tasks_may_lead;
    }

    /// Topics.
    topics: TopicSettings, "topics" {
        /// Queues of auto-created topics.
        default_queues: u32 = "HALFMQ_DEFAULT_QUEUES" => broker.default_queues;
        /// Create topics on first use.
        auto_create_topics: bool = "HALFMQ_AUTO_CREATE_TOPICS" => broker.auto_create_topics;
    }

    /// Transactions and check-back.
    txn: TxnSettings, "transactions" {
        /// First check-back this long after a half message, ms.
        txn_timeout_ms: u64 = "HALFMQ_TXN_TIMEOUT_MS" => broker.txn.timeout;
        /// Wait after the first failed check, ms; doubles up to the maximum.
        txn_check_interval_ms: u64 = "HALFMQ_TXN_CHECK_INTERVAL_MS" => broker.txn.check_interval;
        /// Longest wait between checks, ms.
        txn_check_backoff_max_ms: u64 = "HALFMQ_TXN_CHECK_BACKOFF_MAX_MS" => broker.txn.check_backoff_max;
        /// Checks before a transaction is unresolved.
        txn_check_max: u32 = "HALFMQ_TXN_CHECK_MAX" => broker.txn.check_max;
        /// A check slower than this counts as "no answer", ms.
        txn_check_answer_timeout_ms: u64 = "HALFMQ_TXN_CHECK_ANSWER_TIMEOUT_MS" => broker.txn.check_answer_timeout;
        /// Checks running at once; further due ones wait for a free slot.
        txn_checks_in_flight_max: u32 = "HALFMQ_TXN_CHECKS_IN_FLIGHT_MAX" => broker.txn.checks_in_flight_max;
        /// How long the outcome of a finished transaction is remembered, ms; a commit or
        /// rollback of an older one is `UnknownTxn`.
        txn_outcome_retention_ms: u64 = "HALFMQ_TXN_OUTCOME_RETENTION_MS" => broker.txn.outcome_retention;
    }

    /// Redelivery, retries and dead letters: the defaults of every consumer group.
    delivery: DeliverySettings, "delivery (each group can override these: halfmq groups set)" {
        /// A delivery not acked within this is delivered again, ms.
        visibility_timeout_ms: u64 = "HALFMQ_VISIBILITY_TIMEOUT_MS" => broker.delivery.visibility_timeout;
        /// Failed deliveries before a message moves to the group's dead-letter queue.
        max_retries: u32 = "HALFMQ_MAX_RETRIES" => broker.delivery.max_retries;
        /// Waits before redelivery 1, 2, ... after a nack, ms, comma-separated.
        retry_backoff_ms: Vec<u64> = "HALFMQ_RETRY_BACKOFF_MS", value_delimiter = ',' => broker.delivery.retry_backoff;
    }

    /// Idempotency keys.
    dedup: DedupSettings, "idempotency keys" {
        /// How long idempotency keys are remembered, ms.
        dedup_window_ms: u64 = "HALFMQ_DEDUP_WINDOW_MS" => broker.dedup_window;
        /// Most idempotency keys remembered (oldest forgotten first).
        dedup_keys_max: u64 = "HALFMQ_DEDUP_KEYS_MAX" => broker.dedup_keys_max;
        /// Most memory remembered idempotency keys may take, bytes.
        dedup_bytes_max: u64 = "HALFMQ_DEDUP_BYTES_MAX" => broker.dedup_bytes_max;
    }

    /// Retention: which old log segments are deleted. Nothing is, unless a limit is set.
    retention: RetentionSettings, "retention (off unless a limit is set)" {
        /// Delete the oldest log segments while the log is larger than this, bytes; only
        /// segments every consumer group has acked past and nothing pending needs.
        retention_bytes: u64 = "HALFMQ_RETENTION_BYTES" => broker.retention.bytes_max;
        /// Delete log segments whose newest message is older than this, ms; same conditions.
        retention_age_ms: u64 = "HALFMQ_RETENTION_AGE_MS" => broker.retention.age_max;
        /// How often retention runs when a limit is set, ms.
        retention_interval_ms: u64 = "HALFMQ_RETENTION_INTERVAL_MS" => broker.retention.interval;
    }

    /// Replication: this broker as one node of a raft cluster. Off unless --peers is set.
    replication: ReplicationSettings, "replication (off unless --peers is set)" {
        /// This node's id, one of the ids in --peers.
        node_id: u64 = "HALFMQ_NODE_ID" => node_id;
        /// Every node's client address, this one's included: ID=HOST:PORT,... (the same
        /// list on every node). Nodes talk to each other on the port after each client port
        /// (10912 for 10911), presenting --token; the cluster is formed at first start.
        peers: String = "HALFMQ_PEERS", value_name = "ID=ADDR,..." => peers;
        /// Join an existing cluster instead of forming one: at first start the node waits,
        /// with an empty log, until a member adds it (`halfmq cluster add-node`). Needs
        /// --peers (this node's own entry at least).
        join: bool = "HALFMQ_JOIN" => join;
        /// For this long after a node becomes leader, a due check-back whose producer group
        /// has no checker on it waits for one instead of counting "no live producer" (the
        /// checkers were connected to the old leader and are reconnecting), ms.
        checker_grace_ms: u64 = "HALFMQ_CHECKER_GRACE_MS" => checker_grace;
    }

    /// The network server and the metrics endpoint.
    network: NetworkSettings, "network" {
        /// Address to listen on.
        listen: String = "HALFMQ_LISTEN" => server.listen;
        /// Shared secret clients must present (required off loopback).
        token: String = "HALFMQ_TOKEN", hide_env_values = true => server.token;
        /// Largest network frame, bytes.
        frame_bytes_max: u32 = "HALFMQ_FRAME_BYTES_MAX" => server.frame_bytes_max;
        /// Most connections at once.
        connections_max: usize = "HALFMQ_CONNECTIONS_MAX" => server.connections_max;
        /// Most requests in flight on one connection.
        in_flight_max: usize = "HALFMQ_IN_FLIGHT_MAX" => server.in_flight_max;
        /// A started frame must be complete within this, ms.
        frame_timeout_ms: u64 = "HALFMQ_FRAME_TIMEOUT_MS" => server.frame_timeout;
        /// A connection must send its Hello within this, ms.
        hello_timeout_ms: u64 = "HALFMQ_HELLO_TIMEOUT_MS" => server.hello_timeout;
        /// Most bytes of answers one connection may have waiting to be written (at least
        /// frame_bytes_max); a client that does not read is handed nothing more.
        out_bytes_max: usize = "HALFMQ_OUT_BYTES_MAX" => server.out_bytes_max;
        /// A client that takes no bytes of its answers for this long is disconnected; at
        /// shutdown, queued answers get this long to be written, ms.
        write_timeout_ms: u64 = "HALFMQ_WRITE_TIMEOUT_MS" => server.write_timeout;
        /// A connection with nothing to do for this long is closed: nothing received, no
        /// request in flight (a waiting long poll is one), nothing to write, no checker, ms.
        idle_timeout_ms: u64 = "HALFMQ_IDLE_TIMEOUT_MS" => server.idle_timeout;
        /// Serve Prometheus metrics at http://ADDR/metrics ("off" turns it off).
        metrics: String = "HALFMQ_METRICS", value_name = "ADDR" => metrics;
        /// Serve RocketMQ 5 clients (gRPC MessagingService) at ADDR, beside the native
        /// listener, on the same broker ("off" turns it off).
        rocketmq_listen: String = "HALFMQ_ROCKETMQ_LISTEN", value_name = "ADDR" => rocketmq;
    }
}
