//! Broker settings: every one defined once (in `settings/table.rs`), and read from four layers, each
//! winning over the one before: its default, the TOML file (`--config`), its `HALFMQ_*`
//! environment variable, its flag. `halfmq broker --print-config` shows every setting with
//! its value and the layer it came from.
//!
//! A setting has one name, spelled three ways: the TOML key `txn_timeout_ms`, the flag
//! `--txn-timeout-ms` and the variable `HALFMQ_TXN_TIMEOUT_MS`. Durations are whole
//! milliseconds and their names end in `_ms`.
//!
//! ```toml
//! # halfmq.toml — every key is optional; `halfmq broker --print-config` shows the rest
//! data_dir = "halfmq-data"
//! listen = "127.0.0.1:10911"
//! flush = "sync"              # or "async"
//! txn_timeout_ms = 6000
//! metrics = "127.0.0.1:9100"  # Prometheus endpoint http://ADDR/metrics; "off" by default
//! rocketmq_listen = "127.0.0.1:8081"  # RocketMQ 5 gRPC endpoint; "off" by default
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::de::DeserializeOwned;

use halfmq::{BrokerConfig, Error, FlushPolicy, Result};

use crate::server::ServerConfig;

mod values;

pub use values::{Flush, Setting, Shown, FLUSH_INTERVAL_DEFAULT, METRICS_OFF};

/// Defines every setting once. Each row gives the setting's name (the TOML key, and with
/// dashes the flag), its type as people write it, its environment variable, any further
/// clap attributes, and the field of [`Resolved`] it sets; the doc comment is the flag's
/// help. From the rows come one clap `Args` struct per section (flattened into
/// `halfmq broker`), the reading of the TOML file, the layering, and `--print-config`.
macro_rules! settings {
    ($(
        $(#[$sdoc:meta])*
        $field:ident: $section:ident, $title:literal {
            $(
                $(#[$doc:meta])*
                $key:ident: $ty:ty = $env:literal $(, $arg:ident $(= $argv:expr)?)* => $($path:ident).+;
            )+
        }
    )+) => {
        $(
            $(#[$sdoc])*
            #[derive(clap::Args, Clone, Debug, Default)]
            pub struct $section {
                $(
                    $(#[$doc])*
                    #[arg(long, env = $env $(, $arg $(= $argv)?)*)]
                    pub $key: Option<$ty>,
                )+
            }

            impl $section {
                /// Put this section's winning values into `into`, noting where each came from.
                fn apply(&self, layers: &mut $crate::settings::Layers<'_>, into: &mut $crate::settings::Resolved) -> halfmq::Result<()> {
                    $(
                        if let Some((v, source)) = layers.pick(stringify!($key), self.$key.clone())? {
                            $crate::settings::Setting::put(v, &mut into.$($path).+)
                                .map_err(|reason| layers.invalid(stringify!($key), source, reason))?;
                            into.sources.insert(stringify!($key), source);
                        }
                    )+
                    Ok(())
                }
            }
        )+

        /// Every section of settings, as `halfmq broker` takes them.
        #[derive(clap::Args, Clone, Debug, Default)]
        pub struct Sections {
            $(
                #[command(flatten, next_help_heading = $title)]
                #[allow(missing_docs)]
                pub $field: $section,
            )+
        }

        impl Sections {
            pub(super) fn apply(&self, layers: &mut $crate::settings::Layers<'_>, into: &mut $crate::settings::Resolved) -> halfmq::Result<()> {
                $( self.$field.apply(layers, into)?; )+
                Ok(())
            }
        }

        /// Every setting, in the order `--print-config` shows them.
        pub(crate) const SETTINGS: &[$crate::settings::Def] = &[
            $($(
                $crate::settings::Def {
                    key: stringify!($key),
                    env: $env,
                    section: $title,
                    show: |r: &$crate::settings::Resolved| {
                        <$ty as $crate::settings::Setting<_>>::show(&r.$($path).+)
                    },
                },
            )+)+
        ];
    };
}

mod table;

pub use table::*;

/// One setting, for the code that treats them all alike.
pub(crate) struct Def {
    /// The TOML key; the flag is `--` and this with dashes.
    pub key: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// The heading it is shown under.
    pub section: &'static str,
    /// Its value in a resolved configuration.
    pub show: fn(&Resolved) -> Shown,
}

impl Def {
    fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Its default.
    Default,
    /// The default, raised to stay consistent with the setting named.
    Raised(&'static str),
    /// The TOML file.
    File,
    /// Its environment variable.
    Env,
    /// Its flag.
    Flag,
}

/// `halfmq broker`'s settings: the file to read, then every setting.
#[derive(Args, Clone, Debug, Default)]
pub struct BrokerSettings {
    /// TOML file with settings (see --print-config for every key).
    #[arg(long, env = "HALFMQ_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub sections: Sections,
}

/// What a broker runs with, every setting resolved and checked.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The embedded broker's configuration.
    pub broker: BrokerConfig,
    /// The network server's configuration.
    pub server: ServerConfig,
    /// Where to serve Prometheus metrics; `None` when off.
    pub metrics: Option<SocketAddr>,
    /// Where to serve RocketMQ 5 clients; `None` when off.
    pub rocketmq: Option<SocketAddr>,
    /// The sync interval of `--flush async`; kept apart from the flush policy so that it is
    /// shown, and kept, under `sync` too.
    pub flush_interval: Duration,
    /// The settings file read, if any.
    pub config: Option<PathBuf>,
    /// `--node-id`, with `--peers`.
    pub node_id: Option<u64>,
    /// `--peers` as given; empty when unset.
    pub peers: String,
    /// `--join`: wait to be added instead of forming the cluster of `--peers`.
    pub join: bool,
    /// `--checker-grace-ms`: a new leader's wait for checkers to reconnect before a due
    /// check-back without one counts "no live producer".
    pub checker_grace: Duration,
    /// The cluster this broker is a node of (`--node-id` and `--peers`, checked); `None`
    /// for a single broker.
    pub replication: Option<Replication>,
    /// Where each setting not at its default came from.
    sources: BTreeMap<&'static str, Source>,
}

impl Default for Resolved {
    fn default() -> Self {
        let mut broker = BrokerConfig::default();
        // The broker's runtime has a worker to spare while a lone producer's request task
        // writes its own round (see `StoreConfig::tasks_may_lead`).
        broker.store.tasks_may_lead = true;
        Resolved {
            broker,
            server: ServerConfig::default(),
            metrics: None,
            rocketmq: None,
            flush_interval: FLUSH_INTERVAL_DEFAULT,
            config: None,
            node_id: None,
            peers: String::new(),
            join: false,
            checker_grace: halfmq_raft::ReplicaConfig::new(BrokerConfig::default()).checker_grace,
            replication: None,
            sources: BTreeMap::new(),
        }
    }
}

/// The file, environment and flag layers while settings are picked from them.
pub(crate) struct Layers<'a> {
    /// The file's keys not picked yet: what is left at the end is unknown.
    file: toml::Table,
    path: Option<&'a Path>,
    /// The parsed command line, to tell a flag from an environment variable; without it
    /// every value given on the command line counts as a flag.
    matches: Option<&'a ArgMatches>,
}

impl Layers<'_> {
    /// The winning value of setting `key` and its source: `cli` (a flag or an environment
    /// variable, as clap parsed them) over the file. The file's value is checked even when
    /// it loses, so that a broken file is noticed before it is relied on.
    fn pick<T: DeserializeOwned>(
        &mut self,
        key: &'static str,
        cli: Option<T>,
    ) -> Result<Option<(T, Source)>> {
        let file = match self.file.remove(key) {
            Some(v) => Some(
                v.try_into::<T>()
                    .map_err(|e| self.invalid(key, Source::File, e.to_string()))?,
            ),
            None => None,
        };
        Ok(match cli {
            Some(v) => {
                let source = match self.matches.and_then(|m| m.value_source(key)) {
                    Some(ValueSource::EnvVariable) => Source::Env,
                    _ => Source::Flag,
                };
                Some((v, source))
            }
            None => file.map(|v| (v, Source::File)),
        })
    }

    /// The error for a bad value of `key`, saying where the value came from.
    fn invalid(&self, key: &'static str, source: Source, reason: String) -> Error {
        let from = match (source, self.path) {
            (Source::File, Some(p)) => format!(" (in {})", p.display()),
            (Source::Env, _) => def(key).map_or_else(String::new, |d| format!(" (from {})", d.env)),
            _ => String::new(),
        };
        Error::Config {
            setting: key,
            reason: format!("{reason}{from}"),
        }
    }
}

fn def(key: &str) -> Option<&'static Def> {
    SETTINGS.iter().find(|d| d.key == key)
}

impl BrokerSettings {
    /// Every setting resolved: defaults, then the file, then the environment and flags
    /// (which clap has already merged; `matches` tells them apart for `--print-config`).
    /// Everything is checked; an error names the setting.
    pub fn resolve(&self, matches: Option<&ArgMatches>) -> Result<Resolved> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => toml::Table::new(),
        };
        let mut layers = Layers {
            file,
            path: self.config.as_deref(),
            matches,
        };
        let mut r = Resolved {
            config: self.config.clone(),
            ..Resolved::default()
        };
        self.sections.apply(&mut layers, &mut r)?;
        if let Some(unknown) = layers.file.keys().next() {
            return Err(Error::Config {
                setting: "config",
                reason: format!(
                    "{}: unknown key `{unknown}` (`halfmq broker --print-config` lists every key)",
                    layers
                        .path
                        .map_or_else(String::new, |p| p.display().to_string())
                ),
            });
        }
        r.finish()?;
        Ok(r)
    }
}

/// A TOML file as a table of settings.
fn read_file(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read config file", e))?;
    text.parse::<toml::Table>().map_err(|e| Error::Config {
        setting: "config",
        reason: format!("{}: {e}", path.display()),
    })
}

impl Resolved {
    /// What depends on more than one setting, then every check.
    fn finish(&mut self) -> Result<()> {
        if let FlushPolicy::Async { interval } = &mut self.broker.store.flush {
            *interval = self.flush_interval;
        }
        // A longer first wait than the longest wait would be refused; unless the longest is
        // given too, it follows the first.
        let txn = &mut self.broker.txn;
        if !self.sources.contains_key("txn_check_backoff_max_ms")
            && txn.check_backoff_max < txn.check_interval
        {
            txn.check_backoff_max = txn.check_interval;
            self.sources.insert(
                "txn_check_backoff_max_ms",
                Source::Raised("txn_check_interval_ms"),
            );
        }
        // Room for four frames per connection unless set: a larger frame raises the default.
        let server = &mut self.server;
        let four_frames = 4 * server.frame_bytes_max as usize;
        if !self.sources.contains_key("out_bytes_max") && server.out_bytes_max < four_frames {
            server.out_bytes_max = four_frames;
            self.sources
                .insert("out_bytes_max", Source::Raised("frame_bytes_max"));
        }
        self.broker.validate().map_err(our_name)?;
        self.server.validate().map_err(our_name)?;
        self.replication = Replication::from_settings(self)?;
        let (frame, record) = (
            self.server.frame_bytes_max,
            self.broker.store.record_bytes_max,
        );
        if u64::from(record) + 64 * 1024 > u64::from(frame) {
            return Err(Error::Config {
                setting: "frame_bytes_max",
                reason: format!(
                    "{frame} leaves no room for a record of record_bytes_max ({record}) plus 64 KiB"
                ),
            });
        }
        Ok(())
    }

    /// Where setting `key` got its value.
    pub fn source(&self, key: &str) -> Source {
        self.sources.get(key).copied().unwrap_or(Source::Default)
    }

    /// Every setting with its value and where it came from, as a TOML file that can be
    /// given back with `--config` (`--print-config`). The token is never shown.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# Every setting of `halfmq broker` in force, and where its value came from: its\n\
             # default, the settings file, its environment variable or its flag. Each key\n\
             # also works in the file, as --KEY-WITH-DASHES and as HALFMQ_KEY_IN_CAPITALS.\n",
        );
        let _ = writeln!(
            out,
            "# settings file: {}",
            self.config.as_ref().map_or_else(
                || "none (--config FILE reads one)".to_owned(),
                |p| p.display().to_string()
            )
        );
        let mut section = "";
        for d in SETTINGS {
            if d.section != section {
                section = d.section;
                let _ = write!(out, "\n# {section}\n");
            }
            let line = match (d.show)(self) {
                Shown::Value(v) => format!("{} = {v}", d.key),
                Shown::Unset => format!("# {} is not set", d.key),
            };
            let from = match self.source(d.key) {
                Source::Default => "default".to_owned(),
                Source::Raised(by) => format!("default, raised to {by}"),
                Source::File => "file".to_owned(),
                Source::Env => format!("env {}", d.env),
                Source::Flag => format!("flag {}", d.flag()),
            };
            let _ = writeln!(out, "{line:<44} # {from}");
        }
        out
    }
}

/// The cluster a replicated broker is a node of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// This node's id.
    pub node_id: u64,
    /// Every node's client address, by id, this one's included.
    pub peers: BTreeMap<u64, String>,
    /// Wait to be added to an existing cluster instead of forming one (`--join`).
    pub join: bool,
}

/// Ports above a node's client port its peers use (`--peers`' help says so).
pub const PEER_PORT_OFFSET: u16 = 1;

impl Replication {
    /// `--node-id` and `--peers` checked against each other and `--listen`: `None` without
    /// `--peers`.
    fn from_settings(r: &Resolved) -> Result<Option<Replication>> {
        let bad = |setting, reason: String| Error::Config { setting, reason };
        let Some(text) = Some(r.peers.as_str()).filter(|p| !p.is_empty()) else {
            return match (r.node_id, r.join) {
                (Some(_), _) => Err(bad("node_id", "--node-id needs --peers".into())),
                (None, true) => Err(bad("join", "--join needs --peers and --node-id".into())),
                (None, false) => Ok(None),
            };
        };
        let mut peers = BTreeMap::new();
        for entry in text.split(',') {
            let (id, addr) = entry
                .split_once('=')
                .ok_or_else(|| bad("peers", format!("`{entry}` is not ID=HOST:PORT")))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| bad("peers", format!("`{id}` in `{entry}` is not a node id")))?;
            let addr: SocketAddr = addr
                .trim()
                .parse()
                .map_err(|e| bad("peers", format!("`{addr}` in `{entry}`: {e}")))?;
            if addr.port().checked_add(PEER_PORT_OFFSET).is_none() {
                return Err(bad("peers", format!("{addr}: no port above it for peers")));
            }
            if peers.insert(id, addr.to_string()).is_some() {
                return Err(bad("peers", format!("node {id} is listed twice")));
            }
        }
        let node_id = r
            .node_id
            .ok_or_else(|| bad("node_id", "--peers needs --node-id".into()))?;
        match peers.get(&node_id) {
            Some(own) if *own == r.server.listen.to_string() => {}
            Some(own) => {
                return Err(bad(
                    "peers",
                    format!(
                        "node {node_id} is at {own} in --peers but listens on {}",
                        r.server.listen
                    ),
                ))
            }
            None => return Err(bad("node_id", format!("node {node_id} is not in --peers"))),
        }
        Ok(Some(Replication {
            node_id,
            peers,
            join: r.join,
        }))
    }
}

/// A check of the broker's or the server's configuration names the field it checked; name
/// the setting instead where the two differ (`retention_age` is set as `retention_age_ms`).
fn our_name(e: Error) -> Error {
    match e {
        Error::Config { setting, reason } if def(setting).is_none() => Error::Config {
            setting: SETTINGS
                .iter()
                .find(|d| d.key.strip_suffix("_ms") == Some(setting))
                .map_or(setting, |d| d.key),
            reason,
        },
        e => e,
    }
}

/// `halfmq broker`'s command with each setting's default at the end of its help, taken from
/// the defaults themselves so that the help cannot drift from them.
pub fn with_defaults_in_help(broker: clap::Command) -> clap::Command {
    let defaults = Resolved::default();
    SETTINGS.iter().fold(broker, |cmd, d| {
        let default = match (d.show)(&defaults) {
            Shown::Value(toml::Value::String(s)) => s,
            // As the flag takes a list: comma-separated.
            Shown::Value(toml::Value::Array(a)) => a
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            Shown::Value(v) => v.to_string(),
            Shown::Unset => "not set".to_owned(),
        };
        // Every key in SETTINGS is a field of `Sections`, flattened into this command, so
        // the argument exists.
        cmd.mut_arg(d.key, |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            a.help(format!("{help} [default: {default}]"))
        })
    })
}

#[cfg(test)]
mod tests;
