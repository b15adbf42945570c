//! How a setting's value as people write it (a number of milliseconds, an address, "off")
//! becomes the configuration field it sets, and how that field is shown again by
//! `--print-config`. One impl per pair of types, so that every setting of the same kind
//! converts the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use halfmq::FlushPolicy;
use serde::Deserialize;
use toml::Value;

/// The value of the `metrics` setting that turns the endpoint off.
pub const METRICS_OFF: &str = "off";

/// The sync interval of `--flush async` when none is given.
pub const FLUSH_INTERVAL_DEFAULT: Duration = Duration::from_millis(100);

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flush {
    /// Acknowledge after fdatasync (nothing acknowledged is lost on power loss).
    Sync,
    /// Acknowledge after write; sync every --flush-interval-ms.
    Async,
}

impl Flush {
    /// The name used in flags and settings.
    pub fn name(self) -> &'static str {
        match self {
            Flush::Sync => "sync",
            Flush::Async => "async",
        }
    }

    /// The store's policy, syncing every `interval` when asynchronous.
    pub fn policy(self, interval: Duration) -> FlushPolicy {
        match self {
            Flush::Sync => FlushPolicy::Sync,
            Flush::Async => FlushPolicy::Async { interval },
        }
    }
}

/// A setting's value as shown by `--print-config`.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    /// In force with this value.
    Value(Value),
    /// Not set, which has a meaning of its own (no retention limit, no token).
    Unset,
}

/// A value people write (`Self`) that sets a configuration field of type `F`.
pub trait Setting<F>: Sized {
    /// Set `field` from this value; the error says what is wrong with the value (the caller
    /// names the setting and where the value came from).
    fn put(self, field: &mut F) -> Result<(), String>;
    /// The field's value, as it would be written in the settings file.
    fn show(field: &F) -> Shown;
}

/// A whole number as TOML shows it; one too large for TOML's signed integers is shown as
/// text rather than wrapped.
fn int(v: u64) -> Shown {
    Shown::Value(i64::try_from(v).map_or_else(|_| Value::String(v.to_string()), Value::Integer))
}

fn ms(d: &Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Numbers and switches that are the field itself.
macro_rules! plain {
    ($($t:ty => |$v:ident| $show:expr),* $(,)?) => {$(
        impl Setting<$t> for $t {
            fn put(self, field: &mut $t) -> Result<(), String> {
                *field = self;
                Ok(())
            }
            fn show($v: &$t) -> Shown {
                $show
            }
        }
    )*};
}

plain! {
    u32 => |v| int(u64::from(*v)),
    u64 => |v| int(*v),
    usize => |v| int(*v as u64),
    bool => |v| Shown::Value(Value::Boolean(*v)),
    PathBuf => |v| Shown::Value(Value::String(v.display().to_string())),
    // Text shown as it is (`peers`); empty is unset.
    String => |v| if v.is_empty() { Shown::Unset } else { Shown::Value(Value::String(v.clone())) },
}

/// A byte count that may be unset (no limit).
impl Setting<Option<u64>> for u64 {
    fn put(self, field: &mut Option<u64>) -> Result<(), String> {
        *field = Some(self);
        Ok(())
    }
    fn show(field: &Option<u64>) -> Shown {
        field.map_or(Shown::Unset, int)
    }
}

/// Milliseconds.
impl Setting<Duration> for u64 {
    fn put(self, field: &mut Duration) -> Result<(), String> {
        *field = Duration::from_millis(self);
        Ok(())
    }
    fn show(field: &Duration) -> Shown {
        int(ms(field))
    }
}

/// Milliseconds that may be unset (no limit).
impl Setting<Option<Duration>> for u64 {
    fn put(self, field: &mut Option<Duration>) -> Result<(), String> {
        *field = Some(Duration::from_millis(self));
        Ok(())
    }
    fn show(field: &Option<Duration>) -> Shown {
        field.as_ref().map_or(Shown::Unset, |d| int(ms(d)))
    }
}

/// A list of milliseconds.
impl Setting<Vec<Duration>> for Vec<u64> {
    fn put(self, field: &mut Vec<Duration>) -> Result<(), String> {
        *field = self.into_iter().map(Duration::from_millis).collect();
        Ok(())
    }
    fn show(field: &Vec<Duration>) -> Shown {
        Shown::Value(Value::Array(
            field
                .iter()
                .map(|d| match int(ms(d)) {
                    Shown::Value(v) => v,
                    Shown::Unset => Value::Integer(0),
                })
                .collect(),
        ))
    }
}

/// An address to listen on.
impl Setting<SocketAddr> for String {
    fn put(self, field: &mut SocketAddr) -> Result<(), String> {
        *field = self
            .parse()
            .map_err(|e| format!("{self:?} is not an address like 127.0.0.1:10911: {e}"))?;
        Ok(())
    }
    fn show(field: &SocketAddr) -> Shown {
        Shown::Value(Value::String(field.to_string()))
    }
}

/// An address for an endpoint that can be turned off: `"off"` (or empty) is `None`.
impl Setting<Option<SocketAddr>> for String {
    fn put(self, field: &mut Option<SocketAddr>) -> Result<(), String> {
        *field = match self.trim() {
            "" | METRICS_OFF => None,
            a => Some(a.parse().map_err(|e| {
                format!("{a:?} is not an address like 127.0.0.1:9100 (or \"{METRICS_OFF}\"): {e}")
            })?),
        };
        Ok(())
    }
    fn show(field: &Option<SocketAddr>) -> Shown {
        Shown::Value(Value::String(
            field.map_or_else(|| METRICS_OFF.to_owned(), |a| a.to_string()),
        ))
    }
}

/// A secret: an empty one is none, and it is never shown, only whether it is set.
impl Setting<Option<String>> for String {
    fn put(self, field: &mut Option<String>) -> Result<(), String> {
        *field = Some(self).filter(|t| !t.is_empty());
        Ok(())
    }
    fn show(field: &Option<String>) -> Shown {
        match field {
            Some(_) => Shown::Value(Value::String("(set)".into())),
            None => Shown::Unset,
        }
    }
}

/// The flush policy; its interval is the `flush_interval_ms` setting's, put in once every
/// setting is known.
impl Setting<FlushPolicy> for Flush {
    fn put(self, field: &mut FlushPolicy) -> Result<(), String> {
        let interval = match *field {
            FlushPolicy::Async { interval } => interval,
            FlushPolicy::Sync => FLUSH_INTERVAL_DEFAULT,
        };
        *field = self.policy(interval);
        Ok(())
    }
    fn show(field: &FlushPolicy) -> Shown {
        let f = match field {
            FlushPolicy::Sync => Flush::Sync,
            FlushPolicy::Async { .. } => Flush::Async,
        };
        Shown::Value(Value::String(f.name().into()))
    }
}
