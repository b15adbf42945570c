//! Errors back from the wire: [`Error::from_wire`] turns a broker's `(code, message)` answer
//! into the variant the broker had.
//!
//! The broker sends [`Error::code`] and the error's `Display` text. Every variant's text is
//! laid out by its `#[error(...)]` format above, so the fields can be read back out of it.
//! The parse is strict: a message is accepted for a code only if the error rebuilt from it
//! prints exactly the same text again. Anything else (a code the client does not know, a
//! protocol error of 100 and up, a text in another layout, say from a newer broker) stays
//! [`Error::Remote`], which keeps the code and the text as they came.
//!
//! What the client gets back, field by field:
//! - numbers, topics, groups, reasons and the other `String` fields: exactly the broker's;
//! - the `&'static str` fields (`op`, `what`, `setting`, `stands`): the same text, held in a
//!   small process-wide table (each distinct text is stored once and kept for the life of
//!   the process; at most [`INTERNED_MAX`] texts of at most [`INTERNED_BYTES_MAX`] bytes, so
//!   a broker cannot make a client grow without bound; past that the error stays `Remote`);
//! - `Io::source`: an [`std::io::Error`] of the same text; its kind is the broker's when the
//!   text ends in `(os error N)` and this platform words error N identically, `Other`
//!   otherwise;
//! - where two fields are separated by text that may also occur inside them, the split is
//!   the likely one and the printed text is exact either way: an `Io` path or `Disconnected`
//!   address containing `": "`, a `DiskFull` path that is relative and contains a space,
//!   a `Corrupt` path containing `" at byte "` or a `Locked` path containing the words that
//!   follow it.

use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use super::Error;

/// Most distinct `&'static str` field texts a process keeps from the wire.
pub const INTERNED_MAX: usize = 256;
/// Longest `&'static str` field text taken from the wire, in bytes.
pub const INTERNED_BYTES_MAX: usize = 128;

impl Error {
    /// The error a broker answered with: its code ([`Error::code`]) and its text (the
    /// error's `Display`). Rebuilds the broker's variant with its fields where the text allows
    /// (see the [module documentation](self) for what is exact); otherwise, and for the
    /// protocol's own codes (100 and up), an [`Error::Remote`] with the code and the text.
    /// Either way the result has the same [`Error::code`], and for a variant this build knows,
    /// the same `Display` text as the broker's error.
    pub fn from_wire(code: u16, message: String) -> Error {
        match parse(code, &message) {
            Some(e) if e.to_string() == message => e,
            // An `Error::Remote` relayed by a broker (or a proxy) again: its text already
            // says "broker error <code>: ", which is not repeated.
            _ => {
                let prefix = format!("broker error {code}: ");
                match message.strip_prefix(&prefix) {
                    Some(inner) => Error::Remote {
                        code,
                        message: inner.to_owned(),
                    },
                    None => Error::Remote { code, message },
                }
            }
        }
    }
}

/// The variant of `code` read out of `m`, if `m` has that variant's layout. The caller
/// checks that it prints as `m`.
fn parse(code: u16, m: &str) -> Option<Error> {
    Some(match code {
        1 => {
            let [path, op, source] = split_layout(m, ["I/O error on ", ": ", ": "], "")?;
            Error::Io {
                path: PathBuf::from(path),
                op: intern(op)?,
                source: io_error(source),
            }
        }
        2 => {
            let mid = between(
                m,
                "disk full while ",
                ": the write was refused, nothing acknowledged is lost",
            )?;
            // An absolute path starts at the first " /" (no operation name has one); for a
            // relative path, the operation is everything up to the last space.
            let (op, path) = match mid.find(" /") {
                Some(i) => (&mid[..i], &mid[i + 1..]),
                None => mid.rsplit_once(' ')?,
            };
            Error::DiskFull {
                path: PathBuf::from(path),
                op: intern(op)?,
            }
        }
        3 => {
            let prefix = "the store stopped accepting writes after an earlier I/O failure: ";
            Error::Poisoned(between(m, prefix, "; reopen it to recover")?.to_owned())
        }
        4 => {
            let (path, offset, reason) = file_damage(m, "corrupt data in ", "")?;
            Error::Corrupt {
                path,
                offset,
                reason,
            }
        }
        5 => {
            let (what, reason) = what_reason(m, ["cannot decode ", ": "])?;
            Error::Decode { what, reason }
        }
        6 => {
            let (setting, reason) = what_reason(m, ["invalid configuration `", "`: "])?;
            Error::Config { setting, reason }
        }
        7 => {
            let layout = [
                "data directory ",
                " is locked by another process (lock file ",
            ];
            let [path, lock] = split_layout(m, layout, ")")?;
            Error::Locked {
                path: PathBuf::from(path),
                lock: PathBuf::from(lock),
            }
        }
        8 => {
            let suffix = "` (create it first, or enable auto-create-topics)";
            Error::UnknownTopic(between(m, "unknown topic `", suffix)?.to_owned())
        }
        9 => {
            let layout = ["topic `", "` exists with ", " queues, not "];
            let [topic, existing, requested] = split_layout(m, layout, "")?;
            Error::TopicExists {
                topic: topic.to_owned(),
                existing: number(existing)?,
                requested: number(requested)?,
            }
        }
        10 => {
            let [topic, queue, queues] =
                split_layout(m, ["topic `", "` has no queue ", " (it has "], ")")?;
            Error::UnknownQueue {
                topic: topic.to_owned(),
                queue: number(queue)?,
                queues: number(queues)?,
            }
        }
        11 => {
            let (what, reason) = what_reason(m, ["invalid ", ": "])?;
            Error::Invalid { what, reason }
        }
        12 => {
            let [place, group, reason] =
                split_layout(m, ["cannot ack ", " for group `", "`: "], "")?;
            let (topic, queue, offset) = queue_place(place)?;
            Error::BadAck {
                group: group.to_owned(),
                topic,
                queue,
                offset,
                reason: reason.to_owned(),
            }
        }
        13 => Error::Meta(m.strip_prefix("metadata store error: ")?.to_owned()),
        14 => Error::Closed,
        15 => {
            let suffix = " (never written, or finished longer ago than the outcome retention)";
            Error::UnknownTxn(number(between(m, "unknown transaction ", suffix)?)?)
        }
        16 => {
            let layout = ["transaction ", " is already "];
            let [txn, stands] = split_layout(m, layout, "; the first outcome stands")?;
            Error::TxnConflict {
                txn: number(txn)?,
                stands: intern(stands)?,
            }
        }
        17 => {
            let (what, after) = m.rsplit_once(": no answer within ")?;
            Error::Timeout {
                what: what.to_owned(),
                after_ms: number(after.strip_suffix(" ms")?)?,
            }
        }
        18 => {
            let [addr, reason] = split_layout(m, ["not connected to the broker at ", ": "], "")?;
            Error::Disconnected {
                addr: addr.to_owned(),
                reason: reason.to_owned(),
            }
        }
        19 => {
            let layout = ["", " was deleted by retention (the queue now starts at "];
            let [place, first] = split_layout(m, layout, ")")?;
            let (topic, queue, offset) = queue_place(place)?;
            Error::Expired {
                topic,
                queue,
                offset,
                first: number(first)?,
            }
        }
        20 => {
            let suffix = "` (it has no offsets, settings or deliveries)";
            Error::UnknownGroup(between(m, "unknown consumer group `", suffix)?.to_owned())
        }
        21 => {
            let suffix = "; run `halfmq repair` to quarantine it";
            let (path, offset, reason) =
                file_damage(m, "acknowledged data is damaged in ", suffix)?;
            Error::Damaged {
                path,
                offset,
                reason,
            }
        }
        22 => {
            let place = m.strip_suffix(" was lost to damage and quarantined by repair")?;
            let (topic, queue, offset) = queue_place(place)?;
            Error::Lost {
                topic,
                queue,
                offset,
            }
        }
        23 => {
            let [receipt, reason] = split_layout(m, ["invalid receipt `", "`: "], "")?;
            Error::BadReceipt {
                receipt: receipt.to_owned(),
                reason: reason.to_owned(),
            }
        }
        24 => {
            let layout = ["stale receipt for ", " of group `", "`: "];
            let [place, group, reason] = split_layout(m, layout, "")?;
            let (topic, queue, offset) = queue_place(place)?;
            Error::StaleReceipt {
                group: group.to_owned(),
                topic,
                queue,
                offset,
                reason: reason.to_owned(),
            }
        }
        _ => return None,
    })
}

/// The fields of `m` laid out as `layout[0]` FIELD `layout[1]` FIELD ... `layout[N - 1]`
/// FIELD `suffix`, if it is: each field but the last ends where the next piece of the layout
/// first occurs.
fn split_layout<'a, const N: usize>(
    m: &'a str,
    layout: [&str; N],
    suffix: &str,
) -> Option<[&'a str; N]> {
    let (prefix, separators) = layout.split_first()?;
    let mut rest = m.strip_suffix(suffix)?.strip_prefix(prefix)?;
    let mut out = [""; N];
    for (i, separator) in separators.iter().enumerate() {
        (out[i], rest) = rest.split_once(separator)?;
    }
    out[N - 1] = rest;
    Some(out)
}

/// The `&'static str` field (`what`, `setting`) and the reason of `m`, laid out as
/// `layout[0]` FIELD `layout[1]` REASON.
fn what_reason(m: &str, layout: [&str; 2]) -> Option<(&'static str, String)> {
    let [what, reason] = split_layout(m, layout, "")?;
    Some((intern(what)?, reason.to_owned()))
}

/// The file, byte offset and reason of damage found in it (`Corrupt`, `Damaged`), laid out
/// as `prefix` PATH ` at byte ` OFFSET `: ` REASON `suffix`.
fn file_damage(m: &str, prefix: &str, suffix: &str) -> Option<(PathBuf, u64, String)> {
    let [path, offset, reason] = split_layout(m, [prefix, " at byte ", ": "], suffix)?;
    Some((PathBuf::from(path), number(offset)?, reason.to_owned()))
}

/// `s` without `prefix` and `suffix`, if it has both.
fn between<'a>(s: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    s.strip_prefix(prefix)?.strip_suffix(suffix)
}

/// A number exactly as `Display` prints it: digits only (no sign, no leading zero), so that
/// what is accepted prints the same again.
fn number<T: FromStr + ToString>(s: &str) -> Option<T> {
    let n: T = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// `topic/queue@offset`: topic names have neither `/` nor `@`, so the last of each splits.
fn queue_place(s: &str) -> Option<(String, u32, u64)> {
    let (rest, offset) = s.rsplit_once('@')?;
    let (topic, queue) = rest.rsplit_once('/')?;
    Some((topic.to_owned(), number(queue)?, number(offset)?))
}

/// An I/O error with this text: the operating system's error when the text is one this
/// platform prints for a raw OS error code, otherwise a custom error of kind `Other`.
fn io_error(text: &str) -> io::Error {
    let os = text
        .strip_suffix(')')
        .and_then(|t| t.rsplit_once(" (os error "))
        .and_then(|(_, n)| number::<i32>(n))
        .map(io::Error::from_raw_os_error);
    match os {
        Some(e) if e.to_string() == text => e,
        _ => io::Error::other(text.to_owned()),
    }
}

/// `s` as a `&'static str`: the texts of an error's `&'static str` fields (an operation, a
/// setting's name) come from a small fixed set in the broker's code, so each is stored once
/// for the life of the process. Bounded in count and length, so a broker sending arbitrary
/// texts cannot make the client grow without limit; `None` past the bounds.
fn intern(s: &str) -> Option<&'static str> {
    static TEXTS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    if s.is_empty() {
        return Some("");
    }
    if s.len() > INTERNED_BYTES_MAX {
        return None;
    }
    // A panic while holding the lock leaves the table as it was: still usable.
    let mut texts = TEXTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(t) = texts.iter().find(|t| **t == s) {
        return Some(t);
    }
    if texts.len() >= INTERNED_MAX {
        return None;
    }
    let t: &'static str = Box::leak(s.to_owned().into_boxed_str());
    texts.push(t);
    Some(t)
}

/// One error of every variant, with field values that make the parse work hard (spaces,
/// colons and backticks where the layout allows them). For the tests of every crate that
/// carries errors over the wire.
#[doc(hidden)]
pub fn every_variant() -> Vec<Error> {
    let mut all = vec![
        Error::Io {
            path: "/var/lib/half mq/00000000000000000000.log".into(),
            op: "sync directory",
            source: io::Error::from_raw_os_error(5),
        },
        Error::Io {
            path: "data/x".into(),
            op: "write",
            // A custom error comes back as `Other` (its kind is not in the text).
            source: io::Error::other("short write: 3 of 9 bytes"),
        },
        Error::DiskFull {
            path: "/data/my log/seg".into(),
            op: "set length",
        },
        Error::DiskFull {
            path: "relative/seg.log".into(),
            op: "create directory",
        },
        Error::Poisoned("fsync of /d/0.log failed: I/O error; (os error 5)".into()),
        Error::Corrupt {
            path: "/d/00000000000000000000.log".into(),
            offset: 4096,
            reason: "CRC mismatch: stored 0x1, computed 0x2".into(),
        },
        Error::Decode {
            what: "protocol message",
            reason: "unexpected end: 3 bytes left".into(),
        },
        Error::Config {
            setting: "retention_bytes",
            reason: "0 is below `segment_bytes`: 1 MiB".into(),
        },
        Error::Locked {
            path: "/srv/halfmq data".into(),
            lock: "/srv/halfmq data/LOCK".into(),
        },
        Error::UnknownTopic("orders.eu-1".into()),
        Error::TopicExists {
            topic: "orders".into(),
            existing: 3,
            requested: 5,
        },
        Error::UnknownQueue {
            topic: "orders".into(),
            queue: 9,
            queues: 4,
        },
        Error::Invalid {
            what: "consumer group deletion",
            reason: "group `g` has 2 message(s) with a consumer now: stop them".into(),
        },
        Error::BadAck {
            group: "billing".into(),
            topic: "orders".into(),
            queue: 2,
            offset: u64::MAX,
            reason: "offset 18446744073709551615 is past the end: the queue has 7".into(),
        },
        Error::Meta("sled: Io(Custom { kind: Other, error: \"x: y\" })".into()),
        Error::Closed,
        Error::UnknownTxn(4711),
        Error::TxnConflict {
            txn: 0,
            stands: "rolled back",
        },
        Error::Remote {
            code: 104,
            message: "CheckAnswer is handled by the connection".into(),
        },
        Error::Timeout {
            what: "request 7 to 127.0.0.1:10911: poll".into(),
            after_ms: 30_000,
        },
        Error::Disconnected {
            addr: "[::1]:10911".into(),
            reason: "broker error 102: too many connections".into(),
        },
        Error::Expired {
            topic: "orders".into(),
            queue: 0,
            offset: 12,
            first: 40,
        },
        Error::UnknownGroup("%replay".into()),
        Error::Damaged {
            path: "/d/log/00000000000000000000.log".into(),
            offset: 5012,
            reason: "CRC mismatch: a durable mark at 9000 shows it was acknowledged".into(),
        },
        Error::Lost {
            topic: "orders".into(),
            queue: 1,
            offset: 31,
        },
        Error::BadReceipt {
            receipt: "1.2.x: 3`".into(),
            reason: "not a receipt".into(),
        },
        Error::StaleReceipt {
            group: "billing".into(),
            topic: "orders".into(),
            queue: 1,
            offset: 31,
            reason: "it was delivered again: `lease` 4 ended".into(),
        },
    ];
    // Empty texts where the layout allows them.
    all.push(Error::Poisoned(String::new()));
    all.push(Error::Invalid {
        what: "key",
        reason: String::new(),
    });
    all
}

/// The fields of `e` as text, for tests that compare two errors (`Error` has no
/// `PartialEq`): its `Debug`, except that an I/O error's source is compared by its kind and
/// text.
#[doc(hidden)]
pub fn fields(e: &Error) -> String {
    match e {
        Error::Io { path, op, source } => {
            format!("Io {path:?} {op:?} {:?} {source}", source.kind())
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_comes_back_from_its_code_and_text() {
        let all = every_variant();
        // Each variant has a code of its own (`Error::code`, whose match names every
        // variant), so 25 distinct codes are the 25 variants.
        let mut codes: Vec<u16> = all.iter().map(Error::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), 25, "every variant is covered: {codes:?}");
        for e in all {
            let back = Error::from_wire(e.code(), e.to_string());
            assert_eq!(back.code(), e.code(), "{e}");
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(fields(&back), fields(&e), "the fields of {e}");
        }
    }

    #[test]
    fn an_os_error_keeps_its_kind_and_a_custom_one_becomes_other() {
        let e = Error::io("/x", "open", io::Error::from_raw_os_error(2));
        let Error::Io { source, .. } = Error::from_wire(1, e.to_string()) else {
            panic!("not Io");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        let e = Error::io(
            "/x",
            "open",
            io::Error::new(io::ErrorKind::NotFound, "gone"),
        );
        let Error::Io { source, .. } = Error::from_wire(1, e.to_string()) else {
            panic!("not Io");
        };
        assert_eq!(
            (source.kind(), source.to_string()),
            (io::ErrorKind::Other, "gone".into())
        );
    }

    #[test]
    fn ambiguous_texts_print_the_same_even_when_the_split_differs() {
        // The path has ": " in it: the fields differ, the text does not.
        let e = Error::Io {
            path: "/odd: name".into(),
            op: "read",
            source: io::Error::other("boom"),
        };
        let back = Error::from_wire(1, e.to_string());
        assert!(matches!(back, Error::Io { .. }));
        assert_eq!(back.to_string(), e.to_string());
        // A relative path with a space.
        let e = Error::DiskFull {
            path: "my dir/seg".into(),
            op: "write",
        };
        let back = Error::from_wire(2, e.to_string());
        assert_eq!(back.to_string(), e.to_string());
    }

    #[test]
    fn texts_in_another_layout_stay_remote() {
        let cases: &[(u16, &str)] = &[
            (3, "the broker failed while handling this request"),
            (9, "topic `t` exists with three queues, not 5"),
            (9, "topic `t` exists with 03 queues, not 5"),
            (9, "topic `t` exists with +3 queues, not 5"),
            (10, "topic `t` has no queue 4294967296 (it has 1)"),
            (14, "the store is closed!"),
            (15, "unknown transaction -1 (never written, or finished longer ago than the outcome retention)"),
            (16, "transaction 1 is already committed"),
            (19, "t/x@1 was deleted by retention (the queue now starts at 2)"),
            (0, "no code"),
            (99, "a variant of a newer broker"),
            (100, "the first request must be Hello with the right token"),
            (65535, ""),
        ];
        for &(code, text) in cases {
            match Error::from_wire(code, text.to_owned()) {
                Error::Remote { code: c, message } => {
                    assert_eq!((c, message.as_str()), (code, text));
                }
                other => panic!("{code} {text:?} became {other:?}"),
            }
        }
    }

    #[test]
    fn a_relayed_remote_error_is_not_wrapped_twice() {
        let e = Error::Remote {
            code: 101,
            message: "cannot decode frame: CRC mismatch".into(),
        };
        let back = Error::from_wire(e.code(), e.to_string());
        assert_eq!(fields(&back), fields(&e));
    }

    #[test]
    fn field_texts_are_kept_once_and_bounded() {
        let a = intern("open lock file").unwrap();
        let b = intern(&String::from("open lock file")).unwrap();
        assert!(std::ptr::eq(a, b), "one copy per text");
        assert_eq!(intern(&"x".repeat(INTERNED_BYTES_MAX + 1)), None);
        let long = Error::Invalid {
            what: "k",
            reason: "r".into(),
        };
        let text = long
            .to_string()
            .replace("k:", &format!("{}:", "k".repeat(200)));
        assert!(matches!(
            Error::from_wire(11, text),
            Error::Remote { code: 11, .. }
        ));
    }
}
