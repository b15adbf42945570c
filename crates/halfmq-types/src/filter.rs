//! Tags, message groups and the tag filter of a poll.
//!
//! A message's tag is its property [`PROP_TAG`](crate::props::PROP_TAG) and its message group
//! the property [`PROP_MESSAGE_GROUP`](crate::props::PROP_MESSAGE_GROUP), both set by the
//! producer. A poll may carry a [`TagFilter`], written as RocketMQ writes a TAG filter
//! expression: `*` (every message) or tags joined by `||` (`a || b || c`: a message whose
//! tag is one of them; a message without a tag matches only `*`).

use std::collections::BTreeSet;

use crate::error::{Error, Result};

/// Longest tag or message group, in bytes.
pub const TAG_BYTES_MAX: usize = 128;

/// Longest filter expression, in bytes.
pub const FILTER_BYTES_MAX: usize = 4096;

/// Check a tag or message group: 1 to [`TAG_BYTES_MAX`] bytes, no `|`, no control
/// characters, no space at either end (so that a filter expression can name any tag).
pub fn validate_tag(what: &'static str, tag: &str) -> Result<()> {
    let bad = |reason: String| Err(Error::Invalid { what, reason });
    if tag.is_empty() || tag.len() > TAG_BYTES_MAX {
        return bad(format!(
            "{} bytes: use 1 to {TAG_BYTES_MAX} bytes",
            tag.len()
        ));
    }
    if tag.contains('|') || tag.chars().any(char::is_control) {
        return bad(format!(
            "{tag:?}: `|` and control characters are not allowed"
        ));
    }
    if tag.trim() != tag {
        return bad(format!("{tag:?}: no spaces at either end"));
    }
    Ok(())
}

/// Which messages a poll hands out, by tag. Messages of the topic that do not match are
/// skipped for the consumer group: acked for it, as RocketMQ does.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TagFilter {
    /// Every message (`*`, or an empty expression).
    #[default]
    All,
    /// Messages whose tag is one of these.
    Tags(BTreeSet<String>),
}

impl TagFilter {
    /// Parse a filter expression: `*` (or nothing but spaces) for every message, else tags
    /// separated by `||`, each trimmed. Empty parts (`a ||`), a `*` among tags, a single `|`
    /// inside a tag or a tag that [`validate_tag`] refuses are [`Error::Invalid`] (`what`:
    /// "filter expression").
    pub fn parse(expr: &str) -> Result<TagFilter> {
        let bad = |reason: String| {
            Err(Error::Invalid {
                what: "filter expression",
                reason,
            })
        };
        if expr.len() > FILTER_BYTES_MAX {
            return bad(format!("{} bytes: at most {FILTER_BYTES_MAX}", expr.len()));
        }
        let e = expr.trim();
        if e.is_empty() || e == "*" {
            return Ok(TagFilter::All);
        }
        let mut tags = BTreeSet::new();
        for part in e.split("||") {
            let tag = part.trim();
            if tag.is_empty() {
                return bad(format!("{expr:?}: an empty tag between `||`"));
            }
            if tag == "*" {
                return bad(format!("{expr:?}: `*` stands alone, not among tags"));
            }
            if let Err(Error::Invalid { reason, .. }) = validate_tag("tag", tag) {
                return bad(format!("{expr:?}: tag {tag:?}: {reason}"));
            }
            tags.insert(tag.to_owned());
        }
        Ok(TagFilter::Tags(tags))
    }

    /// Whether a message with this tag (None: no tag) passes.
    pub fn matches(&self, tag: Option<&str>) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::Tags(tags) => tag.is_some_and(|t| tags.contains(t)),
        }
    }

    /// Whether it lets every message through.
    pub fn is_all(&self) -> bool {
        matches!(self, TagFilter::All)
    }
}

impl std::fmt::Display for TagFilter {
    /// The expression again: `*`, or the tags joined by ` || ` in sorted order.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TagFilter::All => f.write_str("*"),
            TagFilter::Tags(tags) => {
                for (i, t) in tags.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" || ")?;
                    }
                    f.write_str(t)?;
                }
                Ok(())
            }
        }
    }
}

impl std::str::FromStr for TagFilter {
    type Err = Error;

    fn from_str(s: &str) -> Result<TagFilter> {
        TagFilter::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_parse_as_rocketmq_reads_them() {
        assert_eq!(TagFilter::parse("*").unwrap(), TagFilter::All);
        assert_eq!(TagFilter::parse("  ").unwrap(), TagFilter::All);
        let f = TagFilter::parse(" a ||b||  c d ").unwrap();
        assert_eq!(f.to_string(), "a || b || c d");
        assert!(f.matches(Some("a")) && f.matches(Some("c d")));
        assert!(!f.matches(Some("d")) && !f.matches(None));
        assert!(TagFilter::All.matches(None));
        assert_eq!(TagFilter::parse(&f.to_string()).unwrap(), f);
    }

    #[test]
    fn bad_expressions_are_invalid() {
        for e in ["a ||", "|| a", "a |||| b", "a | b", "a || *", "x\u{7}"] {
            match TagFilter::parse(e) {
                Err(Error::Invalid { what, .. }) => assert_eq!(what, "filter expression"),
                other => panic!("{e:?} gave {other:?}"),
            }
        }
        assert!(TagFilter::parse(&"a".repeat(FILTER_BYTES_MAX + 1)).is_err());
        assert!(TagFilter::parse(&"a".repeat(TAG_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn tags_are_checked() {
        assert!(validate_tag("tag", "paid").is_ok());
        for t in ["", " a", "a ", "a|b", "\n"] {
            assert!(validate_tag("tag", t).is_err(), "{t:?}");
        }
        assert!(validate_tag("tag", &"x".repeat(TAG_BYTES_MAX)).is_ok());
    }
}
