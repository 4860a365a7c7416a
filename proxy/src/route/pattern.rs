//! Hostname patterns: the names a tenant owns and an agent registers.
//!
//! A pattern is either an exact hostname (`app.acme.test`) or a TLS-style wildcard
//! (`*.acme.test`) that matches exactly one extra leftmost label. This module owns parsing
//! and validation (DNS LDH labels, lengths, wildcard placement), matching a hostname from an
//! SNI against a pattern, and the set relations between patterns ([`HostPattern::covers`],
//! [`HostPattern::overlaps`]) used to check ownership. It does no I/O.
use std::fmt;
use std::str::FromStr;

/// Longest hostname DNS allows in presentation form, without the trailing dot.
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest single DNS label.
pub const MAX_LABEL_LEN: usize = 63;
/// How much of a rejected input an error message quotes.
const QUOTE_LIMIT: usize = 80;

/// A hostname pattern: an exact name or a single-label wildcard.
///
/// Always lowercase, without a trailing dot. Serialized as its string form
/// (`"app.acme.test"`, `"*.acme.test"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HostPattern {
    /// Matches this one hostname.
    Exact(String),
    /// `*.<suffix>`: matches any hostname that is one label followed by `suffix`.
    Wildcard {
        /// The parent domain, e.g. `acme.test` for `*.acme.test`.
        suffix: String,
    },
}

/// Why a string is not a valid [`HostPattern`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("hostname pattern is empty")]
    Empty,
    #[error("hostname pattern {pattern:?} is {len} characters long; the limit is {MAX_HOSTNAME_LEN}")]
    TooLong { pattern: String, len: usize },
    #[error("hostname pattern {pattern:?} has an invalid label {label:?}: {reason}")]
    InvalidLabel {
        pattern: String,
        label: String,
        reason: &'static str,
    },
    #[error("hostname pattern {pattern:?}: a wildcard `*` may only be the whole leftmost label")]
    WildcardNotLeftmost { pattern: String },
    #[error(
        "hostname pattern {pattern:?} is too broad: a wildcard needs a parent domain of at least two labels"
    )]
    WildcardTooBroad { pattern: String },
    #[error("hostname pattern {pattern:?} ends in an all-numeric label; IP addresses are not hostnames")]
    NumericTld { pattern: String },
}

impl HostPattern {
    /// Parses and normalizes a pattern: lowercases it, strips one trailing dot, and checks
    /// every label is a DNS LDH label (1..=63 letters, digits or hyphens, not starting or
    /// ending with a hyphen), the whole name is at most 253 characters, a `*` appears only as
    /// the entire leftmost label, a wildcard's parent has at least two labels, and the last
    /// label is not all digits (SNI never carries IP addresses). Internationalized names must
    /// be given in their ASCII (`xn--`) form.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        let trimmed = s.strip_suffix('.').unwrap_or(s);
        if trimmed.is_empty() {
            return Err(PatternError::Empty);
        }
        let quoted = || quote(s);
        if trimmed.len() > MAX_HOSTNAME_LEN {
            return Err(PatternError::TooLong {
                pattern: quoted(),
                len: trimmed.len(),
            });
        }
        let lower = trimmed.to_ascii_lowercase();
        let (wildcard, name) = match lower.split_once('.') {
            Some(("*", rest)) => (true, rest),
            _ if lower == "*" => return Err(PatternError::WildcardTooBroad { pattern: quoted() }),
            _ => (false, lower.as_str()),
        };
        let mut labels = 0usize;
        let mut last = "";
        for label in name.split('.') {
            if label.contains('*') {
                return Err(if labels == 0 && !wildcard {
                    PatternError::InvalidLabel {
                        pattern: quoted(),
                        label: quote(label),
                        reason: "a wildcard must be the whole label `*`",
                    }
                } else {
                    PatternError::WildcardNotLeftmost { pattern: quoted() }
                });
            }
            if let Err(reason) = check_label(label) {
                return Err(PatternError::InvalidLabel {
                    pattern: quoted(),
                    label: quote(label),
                    reason,
                });
            }
            labels += 1;
            last = label;
        }
        if last.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PatternError::NumericTld { pattern: quoted() });
        }
        if wildcard {
            if labels < 2 {
                return Err(PatternError::WildcardTooBroad { pattern: quoted() });
            }
            Ok(HostPattern::Wildcard {
                suffix: name.to_owned(),
            })
        } else {
            Ok(HostPattern::Exact(lower))
        }
    }

    /// Whether `host` (an SNI hostname, already lowercase) matches this pattern.
    ///
    /// TLS-style wildcard: `*.acme.test` matches exactly one extra label (`a.acme.test`), not
    /// `acme.test` nor `a.b.acme.test`. `Exact` matches itself. The comparison ignores ASCII
    /// case anyway, so a host that slipped through un-lowercased still routes.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name.eq_ignore_ascii_case(host),
            HostPattern::Wildcard { suffix } => {
                wildcard_key(host).is_some_and(|parent| parent.eq_ignore_ascii_case(suffix))
            }
        }
    }

    /// Whether `self` (an owned pattern) covers every host `other` can match.
    ///
    /// `Exact` covers only the same `Exact`; `Wildcard { s }` covers `Wildcard { s }` and the
    /// `Exact` hosts it matches.
    pub fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Exact(_), HostPattern::Wildcard { .. }) => false,
            (HostPattern::Wildcard { suffix: a }, HostPattern::Wildcard { suffix: b }) => a == b,
            (HostPattern::Wildcard { .. }, HostPattern::Exact(host)) => self.matches(host),
        }
    }

    /// Whether some hostname could match both patterns (used to refuse two tenants owning
    /// overlapping names).
    ///
    /// Two wildcards each match hosts of exactly one label more than their suffix, so they
    /// overlap only when their suffixes are equal.
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Wildcard { suffix: a }, HostPattern::Wildcard { suffix: b }) => a == b,
            (wild @ HostPattern::Wildcard { .. }, HostPattern::Exact(host))
            | (HostPattern::Exact(host), wild @ HostPattern::Wildcard { .. }) => wild.matches(host),
        }
    }

    /// Whether this is a `*.` wildcard.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, HostPattern::Wildcard { .. })
    }
}

/// For route lookups: the key under which a wildcard that matches `host` is stored, i.e. the
/// parent domain (`"a.acme.test"` -> `Some("acme.test")`); `None` for single-label hosts.
///
/// A [`HostPattern::Wildcard`] matches `host` exactly when its `suffix` equals this key.
pub fn wildcard_key(host: &str) -> Option<&str> {
    match host.split_once('.') {
        Some((label, parent)) if !label.is_empty() && !parent.is_empty() => Some(parent),
        _ => None,
    }
}

/// Checks one DNS LDH label; the error is the reason shown to the user.
fn check_label(label: &str) -> Result<(), &'static str> {
    if label.is_empty() {
        return Err("labels must not be empty");
    }
    if label.len() > MAX_LABEL_LEN {
        return Err("labels are at most 63 characters");
    }
    if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("only letters, digits and hyphens are allowed (use the xn-- form for IDNs)");
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("labels must not start or end with a hyphen");
    }
    Ok(())
}

/// The rejected input for an error message, cut short so a huge input cannot flood logs.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard { suffix } => write!(f, "*.{suffix}"),
        }
    }
}

impl FromStr for HostPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostPattern::parse(s)
    }
}

impl TryFrom<String> for HostPattern {
    type Error = PatternError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostPattern::parse(&s)
    }
}

impl TryFrom<&str> for HostPattern {
    type Error = PatternError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        HostPattern::parse(s)
    }
}

impl From<HostPattern> for String {
    fn from(p: HostPattern) -> String {
        match p {
            HostPattern::Exact(name) => name,
            HostPattern::Wildcard { .. } => p.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn parses_and_normalizes() {
        assert_eq!(p("app.acme.test"), HostPattern::Exact("app.acme.test".into()));
        assert_eq!(p("App.ACME.Test."), HostPattern::Exact("app.acme.test".into()));
        assert_eq!(
            p("*.acme.test"),
            HostPattern::Wildcard {
                suffix: "acme.test".into()
            }
        );
        assert_eq!(
            p("*.Acme.TEST."),
            HostPattern::Wildcard {
                suffix: "acme.test".into()
            }
        );
        assert_eq!(p("localhost"), HostPattern::Exact("localhost".into()));
        assert_eq!(
            p("xn--bcher-kva.example"),
            HostPattern::Exact("xn--bcher-kva.example".into())
        );
        assert_eq!(p("a-b.c0.test"), HostPattern::Exact("a-b.c0.test".into()));
        assert_eq!(p("1.2.3.example"), HostPattern::Exact("1.2.3.example".into()));
    }

    #[test]
    fn display_and_fromstr_round_trip() {
        for s in ["app.acme.test", "*.acme.test", "*.a.b.c.d", "x"] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(s.parse::<HostPattern>().unwrap(), p(s));
            assert_eq!(String::from(p(s)), s);
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        let v = vec![p("*.acme.test"), p("app.acme.test")];
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, r#"["*.acme.test","app.acme.test"]"#);
        let back: Vec<HostPattern> = serde_json::from_str(r#"["*.ACME.test.","app.acme.test"]"#).unwrap();
        assert_eq!(back, v);
        let err = serde_json::from_str::<HostPattern>(r#""*.com""#).unwrap_err();
        assert!(err.to_string().contains("too broad"), "{err}");
        assert!(serde_json::from_str::<HostPattern>("42").is_err());
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(HostPattern::parse(""), Err(PatternError::Empty));
        assert_eq!(HostPattern::parse("."), Err(PatternError::Empty));
    }

    #[test]
    fn rejects_bad_labels() {
        let cases = [
            ("a..b", ""),
            (".a.b", ""),
            ("a.b..", ""),
            ("-a.test", "-a"),
            ("a-.test", "a-"),
            ("a_b.test", "a_b"),
            ("a b.test", "a b"),
            ("app.acme.test/x", "test/x"),
            ("bücher.test", "bücher"),
            ("a.*b.test", "*b"),
        ];
        for (input, label) in cases {
            match HostPattern::parse(input) {
                Err(PatternError::InvalidLabel {
                    pattern, label: got, ..
                }) if label != "*b" => {
                    assert_eq!(pattern, input);
                    assert_eq!(got, label, "{input}");
                }
                Err(PatternError::WildcardNotLeftmost { .. }) if label == "*b" => {}
                other => panic!("{input:?}: unexpected {other:?}"),
            }
        }
        let long_label = format!("{}.test", "a".repeat(64));
        assert!(matches!(
            HostPattern::parse(&long_label),
            Err(PatternError::InvalidLabel { .. })
        ));
        let ok_label = format!("{}.test", "a".repeat(63));
        assert!(HostPattern::parse(&ok_label).is_ok());
    }

    #[test]
    fn error_messages_name_pattern_and_label() {
        let e = HostPattern::parse("a_b.acme.test").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("a_b.acme.test") && msg.contains("\"a_b\""), "{msg}");
    }

    #[test]
    fn rejects_too_long() {
        // 4 labels of 63 + 3 dots = 255.
        let label = "a".repeat(63);
        let long = [label.as_str(); 4].join(".");
        match HostPattern::parse(&long) {
            Err(PatternError::TooLong { len, pattern }) => {
                assert_eq!(len, 255);
                assert!(pattern.len() < 100, "error quotes a shortened pattern");
            }
            other => panic!("unexpected {other:?}"),
        }
        // 253 exactly is fine, and so is 253 plus the trailing dot.
        let ok = format!("{}.{}.{}.{}", label, label, label, "a".repeat(61));
        assert_eq!(ok.len(), 253);
        assert!(HostPattern::parse(&ok).is_ok());
        assert!(HostPattern::parse(&format!("{ok}.")).is_ok());
        // A huge input is rejected without quoting all of it.
        let huge = "a".repeat(1 << 20);
        let msg = HostPattern::parse(&huge).unwrap_err().to_string();
        assert!(msg.len() < 300, "{}", msg.len());
    }

    #[test]
    fn rejects_misplaced_or_broad_wildcards() {
        for s in ["*", "*.", "*.com", "*.com."] {
            assert!(
                matches!(HostPattern::parse(s), Err(PatternError::WildcardTooBroad { .. })),
                "{s}: {:?}",
                HostPattern::parse(s)
            );
        }
        for s in ["a.*.test", "app.*", "*.*.test", "a.b.*"] {
            assert!(
                matches!(
                    HostPattern::parse(s),
                    Err(PatternError::WildcardNotLeftmost { .. })
                ),
                "{s}: {:?}",
                HostPattern::parse(s)
            );
        }
        for s in ["a*.test.x", "**.test.x", "*a.test.x"] {
            assert!(
                matches!(HostPattern::parse(s), Err(PatternError::InvalidLabel { .. })),
                "{s}: {:?}",
                HostPattern::parse(s)
            );
        }
        assert!(matches!(
            HostPattern::parse("*..test"),
            Err(PatternError::InvalidLabel { .. })
        ));
    }

    #[test]
    fn rejects_ip_addresses() {
        for s in ["10.0.0.1", "127.0.0.1.", "*.0.1", "example.123"] {
            assert!(
                matches!(HostPattern::parse(s), Err(PatternError::NumericTld { .. })),
                "{s}: {:?}",
                HostPattern::parse(s)
            );
        }
    }

    #[test]
    fn exact_matches_only_itself() {
        let e = p("app.acme.test");
        assert!(e.matches("app.acme.test"));
        assert!(e.matches("APP.acme.test"));
        assert!(!e.matches("acme.test"));
        assert!(!e.matches("x.app.acme.test"));
        assert!(!e.matches("app.acme.test."));
        assert!(!e.matches(""));
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let w = p("*.acme.test");
        assert!(w.matches("a.acme.test"));
        assert!(w.matches("app-1.acme.test"));
        assert!(!w.matches("acme.test"));
        assert!(!w.matches("a.b.acme.test"));
        assert!(!w.matches(".acme.test"));
        assert!(!w.matches("aacme.test"));
        assert!(!w.matches("a.acme.test.evil"));
        assert!(!w.matches("a.xacme.test"));
        assert!(!w.matches(""));
    }

    #[test]
    fn wildcard_key_is_the_parent() {
        assert_eq!(wildcard_key("a.acme.test"), Some("acme.test"));
        assert_eq!(wildcard_key("acme.test"), Some("test"));
        assert_eq!(wildcard_key("localhost"), None);
        assert_eq!(wildcard_key(""), None);
        assert_eq!(wildcard_key(".acme.test"), None);
        assert_eq!(wildcard_key("a."), None);
        // The key agrees with matching.
        for host in ["a.acme.test", "b.c.acme.test", "acme.test", "x"] {
            let w = p("*.acme.test");
            assert_eq!(w.matches(host), wildcard_key(host) == Some("acme.test"), "{host}");
        }
    }

    #[test]
    fn covers() {
        let w = p("*.acme.test");
        assert!(w.covers(&w));
        assert!(w.covers(&p("a.acme.test")));
        assert!(!w.covers(&p("acme.test")));
        assert!(!w.covers(&p("a.b.acme.test")));
        assert!(!w.covers(&p("*.b.acme.test")));
        assert!(!w.covers(&p("*.other.test")));
        let e = p("a.acme.test");
        assert!(e.covers(&e));
        assert!(!e.covers(&p("b.acme.test")));
        assert!(!e.covers(&w));
    }

    #[test]
    fn overlaps_is_symmetric_and_exact() {
        let cases = [
            ("a.acme.test", "a.acme.test", true),
            ("a.acme.test", "b.acme.test", false),
            ("*.acme.test", "a.acme.test", true),
            ("*.acme.test", "acme.test", false),
            ("*.acme.test", "a.b.acme.test", false),
            ("*.acme.test", "*.acme.test", true),
            ("*.acme.test", "*.b.acme.test", false),
            ("*.acme.test", "*.other.test", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(p(a).overlaps(&p(b)), want, "{a} vs {b}");
            assert_eq!(p(b).overlaps(&p(a)), want, "{b} vs {a}");
        }
    }

    #[test]
    fn ordering_is_stable() {
        let mut v = vec![p("*.b.test"), p("b.test"), p("a.test"), p("*.a.test")];
        v.sort();
        assert_eq!(v, vec![p("a.test"), p("b.test"), p("*.a.test"), p("*.b.test")]);
    }
}
