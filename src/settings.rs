//! Broker settings from a TOML file, the environment and flags, merged in that order of
//! precedence (flags win), with every unknown key in the file rejected by name.
//!
//! ```toml
//! # halfmq.toml — every key is optional; `halfmq broker --print-config` shows the rest
//! data_dir = "halfmq-data"
//! listen = "127.0.0.1:10911"
//! flush = "sync"              # or "async"
//! txn_timeout_ms = 6000
//! metrics = "127.0.0.1:9100"  # Prometheus endpoint http://ADDR/metrics; "off" by default
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{BrokerConfig, FlushPolicy};
use crate::error::{Error, Result};
use crate::net::server::ServerConfig;

/// The value of the `metrics` setting that turns the endpoint off.
pub const METRICS_OFF: &str = "off";

/// Every broker setting; `None` means "not given here".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Listen address.
    pub listen: Option<String>,
    /// Shared secret clients must present.
    pub token: Option<String>,
    /// `sync` or `async`.
    pub flush: Option<String>,
    /// Sync interval for `async`, ms.
    pub flush_interval_ms: Option<u64>,
    /// Segment file size.
    pub segment_bytes: Option<u64>,
    /// Largest record.
    pub record_bytes_max: Option<u32>,
    /// Hash slots per key-index file (`trace`).
    pub key_index_slots: Option<u32>,
    /// Entries per key-index file (`trace`).
    pub key_index_entries: Option<u32>,
    /// Queues of auto-created topics.
    pub default_queues: Option<u32>,
    /// Create topics on first use.
    pub auto_create_topics: Option<bool>,
    /// Transaction time-out, ms.
    pub txn_timeout_ms: Option<u64>,
    /// Wait after the first failed check, ms.
    pub txn_check_interval_ms: Option<u64>,
    /// Longest wait between checks, ms.
    pub txn_check_backoff_max_ms: Option<u64>,
    /// Checks before a transaction is unresolved.
    pub txn_check_max: Option<u32>,
    /// Time a check may take, ms.
    pub txn_check_answer_timeout_ms: Option<u64>,
    /// Largest network frame.
    pub frame_bytes_max: Option<u32>,
    /// Most connections.
    pub connections_max: Option<usize>,
    /// A started frame must be complete within this, ms.
    pub frame_timeout_ms: Option<u64>,
    /// A connection must send its Hello within this, ms.
    pub hello_timeout_ms: Option<u64>,
    /// Default visibility time-out of consumer groups, ms.
    pub visibility_timeout_ms: Option<u64>,
    /// Default failed deliveries before dead-lettering.
    pub max_retries: Option<u32>,
    /// Default waits before redelivery after a nack, ms.
    pub retry_backoff_ms: Option<Vec<u64>>,
    /// How long idempotency keys are remembered, ms.
    pub dedup_window_ms: Option<u64>,
    /// Most idempotency keys remembered.
    pub dedup_keys_max: Option<u64>,
    /// Most memory remembered idempotency keys may take, bytes.
    pub dedup_bytes_max: Option<u64>,
    /// Address of the Prometheus endpoint (`http://ADDR/metrics`), or `"off"` (the default).
    pub metrics: Option<String>,
    /// Retention: delete old segments while the log is larger than this, bytes (default: no
    /// size limit).
    pub retention_bytes: Option<u64>,
    /// Retention: delete segments whose newest record is older than this, ms (default: no
    /// age limit).
    pub retention_age_ms: Option<u64>,
    /// How often retention runs, ms (default 60000).
    pub retention_interval_ms: Option<u64>,
}

macro_rules! overlay_fields {
    ($base:ident, $top:ident, $($f:ident),*) => {
        Settings { $($f: $top.$f.or($base.$f)),* }
    };
}

impl Settings {
    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Settings> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(path, "read config file", e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            setting: "config",
            reason: format!("{}: {e}", path.display()),
        })
    }

    /// These settings with `top`'s given values winning.
    pub fn overlay(self, top: Settings) -> Settings {
        let base = self;
        overlay_fields!(
            base,
            top,
            data_dir,
            listen,
            token,
            flush,
            flush_interval_ms,
            segment_bytes,
            record_bytes_max,
            key_index_slots,
            key_index_entries,
            default_queues,
            auto_create_topics,
            txn_timeout_ms,
            txn_check_interval_ms,
            txn_check_backoff_max_ms,
            txn_check_max,
            txn_check_answer_timeout_ms,
            frame_bytes_max,
            connections_max,
            frame_timeout_ms,
            hello_timeout_ms,
            visibility_timeout_ms,
            max_retries,
            retry_backoff_ms,
            dedup_window_ms,
            dedup_keys_max,
            dedup_bytes_max,
            metrics,
            retention_bytes,
            retention_age_ms,
            retention_interval_ms
        )
    }

    /// The broker and server configuration these settings give, defaults filled in and
    /// everything validated.
    pub fn resolve(&self) -> Result<(BrokerConfig, ServerConfig)> {
        let mut b = BrokerConfig::default();
        let mut s = ServerConfig::default();
        if let Some(d) = &self.data_dir {
            b.data_dir = d.clone();
        }
        if let Some(l) = &self.listen {
            s.listen = l.parse::<SocketAddr>().map_err(|e| Error::Config {
                setting: "listen",
                reason: format!("{l:?} is not an address like 127.0.0.1:10911: {e}"),
            })?;
        }
        s.token = self.token.clone().filter(|t| !t.is_empty());
        let interval = Duration::from_millis(self.flush_interval_ms.unwrap_or(100));
        b.store.flush = match self.flush.as_deref() {
            None | Some("sync") => FlushPolicy::Sync,
            Some("async") => FlushPolicy::Async { interval },
            Some(other) => {
                return Err(Error::Config {
                    setting: "flush",
                    reason: format!("{other:?}: use \"sync\" or \"async\""),
                })
            }
        };
        if let Some(v) = self.segment_bytes {
            b.store.segment_bytes = v;
        }
        if let Some(v) = self.record_bytes_max {
            b.store.record_bytes_max = v;
        }
        if let Some(v) = self.key_index_slots {
            b.store.key_index_slots = v;
        }
        if let Some(v) = self.key_index_entries {
            b.store.key_index_entries = v;
        }
        if let Some(v) = self.default_queues {
            b.default_queues = v;
        }
        if let Some(v) = self.auto_create_topics {
            b.auto_create_topics = v;
        }
        let ms = Duration::from_millis;
        if let Some(v) = self.txn_timeout_ms {
            b.txn.timeout = ms(v);
        }
        if let Some(v) = self.txn_check_interval_ms {
            b.txn.check_interval = ms(v);
            b.txn.check_backoff_max = b.txn.check_backoff_max.max(ms(v));
        }
        if let Some(v) = self.txn_check_backoff_max_ms {
            b.txn.check_backoff_max = ms(v);
        }
        if let Some(v) = self.txn_check_max {
            b.txn.check_max = v;
        }
        if let Some(v) = self.txn_check_answer_timeout_ms {
            b.txn.check_answer_timeout = ms(v);
        }
        if let Some(v) = self.dedup_window_ms {
            b.dedup_window = ms(v);
        }
        if let Some(v) = self.dedup_keys_max {
            b.dedup_keys_max = v;
        }
        if let Some(v) = self.dedup_bytes_max {
            b.dedup_bytes_max = v;
        }
        if let Some(v) = self.retention_bytes {
            b.retention.bytes_max = Some(v);
        }
        if let Some(v) = self.retention_age_ms {
            b.retention.age_max = Some(ms(v));
        }
        if let Some(v) = self.retention_interval_ms {
            b.retention.interval = ms(v);
        }
        if let Some(v) = self.frame_bytes_max {
            s.frame_bytes_max = v;
        }
        if let Some(v) = self.connections_max {
            s.connections_max = v;
        }
        if let Some(v) = self.frame_timeout_ms {
            s.frame_timeout = ms(v);
        }
        if let Some(v) = self.hello_timeout_ms {
            s.hello_timeout = ms(v);
        }
        if let Some(v) = self.visibility_timeout_ms {
            b.delivery.visibility_timeout = ms(v);
        }
        if let Some(v) = self.max_retries {
            b.delivery.max_retries = v;
        }
        if let Some(v) = &self.retry_backoff_ms {
            b.delivery.retry_backoff = v.iter().map(|&m| ms(m)).collect();
        }
        b.validate()?;
        s.validate()?;
        if u64::from(b.store.record_bytes_max) + 64 * 1024 > u64::from(s.frame_bytes_max) {
            return Err(Error::Config {
                setting: "frame_bytes_max",
                reason: format!(
                    "{} leaves no room for a record of record_bytes_max ({}) plus 64 KiB",
                    s.frame_bytes_max, b.store.record_bytes_max
                ),
            });
        }
        Ok((b, s))
    }

    /// Every setting with the value in force, for `--print-config`.
    pub fn effective(&self) -> Result<Settings> {
        let (b, s) = self.resolve()?;
        let ms = |d: Duration| Some(d.as_millis() as u64);
        let (flush, interval) = match b.store.flush {
            FlushPolicy::Sync => ("sync", None),
            FlushPolicy::Async { interval } => ("async", ms(interval)),
        };
        Ok(Settings {
            data_dir: Some(b.data_dir),
            listen: Some(s.listen.to_string()),
            token: s.token.map(|_| "(set)".to_owned()),
            flush: Some(flush.into()),
            flush_interval_ms: interval.or(self.flush_interval_ms).or(Some(100)),
            segment_bytes: Some(b.store.segment_bytes),
            record_bytes_max: Some(b.store.record_bytes_max),
            key_index_slots: Some(b.store.key_index_slots),
            key_index_entries: Some(b.store.key_index_entries),
            default_queues: Some(b.default_queues),
            auto_create_topics: Some(b.auto_create_topics),
            txn_timeout_ms: ms(b.txn.timeout),
            txn_check_interval_ms: ms(b.txn.check_interval),
            txn_check_backoff_max_ms: ms(b.txn.check_backoff_max),
            txn_check_max: Some(b.txn.check_max),
            txn_check_answer_timeout_ms: ms(b.txn.check_answer_timeout),
            frame_bytes_max: Some(s.frame_bytes_max),
            connections_max: Some(s.connections_max),
            frame_timeout_ms: ms(s.frame_timeout),
            hello_timeout_ms: ms(s.hello_timeout),
            visibility_timeout_ms: ms(b.delivery.visibility_timeout),
            max_retries: Some(b.delivery.max_retries),
            retry_backoff_ms: Some(
                b.delivery
                    .retry_backoff
                    .iter()
                    .map(|d| d.as_millis() as u64)
                    .collect(),
            ),
            dedup_window_ms: ms(b.dedup_window),
            dedup_keys_max: Some(b.dedup_keys_max),
            dedup_bytes_max: Some(b.dedup_bytes_max),
            metrics: Some(
                self.metrics_addr()?
                    .map_or_else(|| METRICS_OFF.to_owned(), |a| a.to_string()),
            ),
            retention_bytes: b.retention.bytes_max,
            retention_age_ms: b.retention.age_max.and_then(ms),
            retention_interval_ms: ms(b.retention.interval),
        })
    }

    /// Where to serve Prometheus metrics: `None` when off (not set, empty, or `"off"`).
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>> {
        match self.metrics.as_deref().map(str::trim) {
            None | Some("") | Some(METRICS_OFF) => Ok(None),
            Some(a) => a
                .parse::<SocketAddr>()
                .map(Some)
                .map_err(|e| Error::Config {
                    setting: "metrics",
                    reason: format!(
                        "{a:?} is not an address like 127.0.0.1:9100 (or \"off\"): {e}"
                    ),
                }),
        }
    }

    /// As TOML text.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config {
            setting: "config",
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_unknown_keys_are_named() {
        let file: Settings =
            toml::from_str("listen = \"127.0.0.1:1\"\ntxn_check_max = 3\n").unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:2".into()),
            ..Settings::default()
        };
        let (b, s) = file.overlay(flags).resolve().unwrap();
        assert_eq!(s.listen.port(), 2);
        assert_eq!(b.txn.check_max, 3);
        let s: Settings = toml::from_str("retention_bytes = 1000").unwrap();
        assert!(matches!(
            s.resolve(),
            Err(Error::Config {
                setting: "retention_bytes",
                ..
            })
        ));
        let s: Settings = toml::from_str("retention_age_ms = 10").unwrap();
        assert!(matches!(
            s.resolve(),
            Err(Error::Config {
                setting: "retention_age",
                ..
            })
        ));
        let s: Settings =
            toml::from_str("retention_bytes = 1073741824\nretention_age_ms = 3600000").unwrap();
        let (b, _) = s.resolve().unwrap();
        assert_eq!(b.retention.bytes_max, Some(1 << 30));
        assert_eq!(b.retention.age_max, Some(Duration::from_secs(3600)));
        let s: Settings = toml::from_str("dedup_window_ms = 0").unwrap();
        assert!(matches!(
            s.resolve(),
            Err(Error::Config {
                setting: "dedup_window_ms",
                ..
            })
        ));
        let s: Settings = toml::from_str("dedup_keys_max = 10\ndedup_window_ms = 5000").unwrap();
        let (b, _) = s.resolve().unwrap();
        assert_eq!(
            (b.dedup_keys_max, b.dedup_window),
            (10, Duration::from_secs(5))
        );
        let err = toml::from_str::<Settings>("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn metrics_is_off_by_default_and_an_address_when_set() {
        let s = Settings::default();
        assert_eq!(s.metrics_addr().unwrap(), None);
        assert_eq!(s.effective().unwrap().metrics.as_deref(), Some("off"));
        let file: Settings = toml::from_str("metrics = \"127.0.0.1:9100\"\n").unwrap();
        let s = file.overlay(Settings::default());
        assert_eq!(
            s.metrics_addr().unwrap(),
            Some("127.0.0.1:9100".parse().unwrap())
        );
        let text = s.effective().unwrap().to_toml().unwrap();
        assert!(text.contains("metrics = \"127.0.0.1:9100\""), "{text}");
        let flags = Settings {
            metrics: Some("off".into()),
            ..Settings::default()
        };
        assert_eq!(s.overlay(flags).metrics_addr().unwrap(), None);
        let bad = Settings {
            metrics: Some("localhost".into()),
            ..Settings::default()
        };
        assert!(matches!(
            bad.metrics_addr(),
            Err(Error::Config {
                setting: "metrics",
                ..
            })
        ));
        assert!(matches!(
            bad.effective(),
            Err(Error::Config {
                setting: "metrics",
                ..
            })
        ));
    }

    #[test]
    fn public_address_needs_a_token() {
        let s = Settings {
            listen: Some("0.0.0.0:10911".into()),
            ..Settings::default()
        };
        assert!(matches!(
            s.resolve(),
            Err(Error::Config {
                setting: "listen",
                ..
            })
        ));
        let s = Settings {
            token: Some("t".into()),
            ..s
        };
        assert!(s.resolve().is_ok());
    }
}
