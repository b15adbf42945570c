//! The binary's log output: the `HALFMQ_LOG` filter, or by default `info` with openraft's
//! lines that only repeat what the peer links already say.
//!
//! A peer that is down is logged by the peer links once when it goes and once when it comes
//! back (`halfmq_raft::network::tcp`). openraft logs it too: four replication lines every
//! half second for as long as it is down (turned off by target), and, at every election and
//! leadership check, an ERROR per unreachable peer ("while requesting vote", "timeout while
//! confirming leadership"), and a WARN per vote answer that came after the vote moved on
//! ("A message will be ignored because vote changed"), all expected when a node is down.
//! ERROR lines for what is normal teach operators to ignore ERROR lines, so [`Quiet`] drops
//! exactly these; an unreachable-peer error is dropped only when its error says so
//! (`Unreachable`), any other error in those lines is kept. With `HALFMQ_LOG` set, nothing
//! is dropped but what its filter says (`HALFMQ_LOG=info,openraft=warn` shows them all).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// The filter unless `HALFMQ_LOG` sets one.
pub const LOG_DEFAULT: &str =
    "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=off";

/// Log to standard error: `HALFMQ_LOG`'s filter if set, else [`LOG_DEFAULT`] and [`Quiet`].
pub fn init() {
    let (filter, quiet) = match EnvFilter::try_from_env("HALFMQ_LOG") {
        Ok(f) => (f, None),
        Err(_) => (EnvFilter::new(LOG_DEFAULT), Some(Quiet)),
    };
    let out = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(out.with_filter(filter).with_filter(quiet))
        .init();
}

/// Drops openraft's lines that repeat what the peer links log about a peer being down (see
/// the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Quiet;

/// openraft's messages that [`Quiet`] drops: (the message's start, whether only when its
/// `error` field names an unreachable peer).
const NOISE: [(&str, bool); 3] = [
    ("while requesting vote", true),
    ("timeout while confirming leadership", true),
    ("A message will be ignored because vote changed", false),
];

impl Quiet {
    /// Whether an event of `target` with `message` and `error` is one [`Quiet`] drops.
    pub fn drops(target: &str, message: &str, error: &str) -> bool {
        target.starts_with("openraft::core")
            && NOISE.iter().any(|&(start, unreachable_only)| {
                message.starts_with(start) && (!unreachable_only || error.contains("Unreachable"))
            })
    }
}

impl<S> Filter<S> for Quiet {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let target = event.metadata().target();
        if !target.starts_with("openraft::core") {
            return true;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        !Quiet::drops(target, &fields.message, &fields.error)
    }
}

/// An event's `message` and `error` fields, as text.
#[derive(Default)]
struct Fields {
    message: String,
    error: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "error" => self.error = value.to_owned(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a subscriber with [`Quiet`] lets through, as "target: message" lines.
    fn through(emit: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| std::io::ErrorKind::Other)?
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let sink = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .without_time()
            .with_filter(Some(Quiet));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn drops_openraft_lines_about_unreachable_peers_and_keeps_the_rest() {
        let out = through(|| {
            tracing::error!(target: "openraft::core::raft_core", error = %"Unreachable node: connect refused", "while requesting vote");
            tracing::error!(target: "openraft::core::raft_core", error = %"Unreachable node: x", target = 2, "timeout while confirming leadership for read request");
            tracing::warn!(target: "openraft::core::raft_core", "A message will be ignored because vote changed: msg sent by vote: T1-N2");
            tracing::error!(target: "openraft::core::raft_core", error = %"StorageError: disk", "while requesting vote");
            tracing::error!(target: "openraft::core::raft_core", "something else went wrong");
            tracing::warn!(target: "halfmq_raft::network::tcp", "while requesting vote (not openraft's)");
        });
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[0].contains("StorageError: disk"), "{out:?}");
        assert!(out[1].contains("something else went wrong"), "{out:?}");
        assert!(out[2].contains("not openraft's"), "{out:?}");
    }
}
