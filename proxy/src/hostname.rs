//! Hostnames: the one set of rules for every name Sluice routes on, wherever it comes from — an
//! SNI `host_name`, an HTTP `Host` header, a tenant's hostnames in the store, an agent's routes.
//!
//! A name is DNS letters-digits-hyphen labels (1..=63 bytes each, not starting or ending with a
//! hyphen, 253 bytes in all), compared lowercase, with one trailing dot ignored. Its last label
//! must not read as an IPv4 number part (all decimal digits, or `0x` and hex digits, as the
//! WHATWG URL host parser and `inet_aton` read them), so that `10.1`, `127.0.0.1` or `a.0x7f`
//! can never be taken for a name. Internationalized names are given in their ASCII (`xn--`)
//! form.
//!
//! A [`HostPattern`] is such a name (`app.acme.test`) or a TLS-style wildcard (`*.acme.test`)
//! that matches exactly one extra leftmost label, with a parent of at least two labels. Because
//! [`normalize`] and [`HostPattern::parse`] share the rules, every stored or registered exact
//! pattern is a name a client can route to, and every routable name is a valid pattern.
//!
//! Pure code: no I/O.
use std::fmt;
use std::str::FromStr;

/// Longest hostname DNS allows in presentation form, without the trailing dot.
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest single DNS label.
pub const MAX_LABEL_LEN: usize = 63;
/// How much of a rejected input an error message quotes.
const QUOTE_LIMIT: usize = 80;

/// Why a string is not a valid hostname or [`HostPattern`]. Messages quote the input (cut
/// short), so they are safe to log and to show an operator.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HostnameError {
    /// Nothing (or only a dot).
    #[error("hostname is empty")]
    Empty,
    /// Over [`MAX_HOSTNAME_LEN`] bytes.
    #[error("hostname {name:?} is {len} characters long; the limit is {MAX_HOSTNAME_LEN}")]
    TooLong {
        /// The input, quoted.
        name: String,
        /// Its length without the trailing dot.
        len: usize,
    },
    /// A label that is not a DNS LDH label.
    #[error("hostname {name:?} has an invalid label {label:?}: {reason}")]
    InvalidLabel {
        /// The input, quoted.
        name: String,
        /// The offending label, quoted.
        label: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The last label reads as a number: an IP address, not a hostname.
    #[error("hostname {name:?} ends in a numeric label; IP addresses are not hostnames")]
    NumericFinalLabel {
        /// The input, quoted.
        name: String,
    },
    /// A `*` somewhere other than as the whole leftmost label.
    #[error("hostname pattern {name:?}: a wildcard `*` may only be the whole leftmost label")]
    WildcardNotLeftmost {
        /// The input, quoted.
        name: String,
    },
    /// `*`, `*.com`: a wildcard needs a parent of at least two labels.
    #[error(
        "hostname pattern {name:?} is too broad: a wildcard needs a parent domain of at least two labels"
    )]
    WildcardTooBroad {
        /// The input, quoted.
        name: String,
    },
}

/// Normalizes a hostname a client asks to be routed to (an SNI `host_name`, the name part of a
/// `Host` header): strips one trailing dot, checks the rules of this module and lowercases it.
pub fn normalize(raw: &[u8]) -> Result<String, HostnameError> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    check_name(name, || quote_bytes(raw))?;
    // Only ASCII letters, digits, hyphens and dots are left.
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// Checks `name` (no trailing dot) against the rules; `quoted` renders the input for an error.
fn check_name(name: &[u8], quoted: impl Fn() -> String) -> Result<(), HostnameError> {
    if name.is_empty() {
        return Err(HostnameError::Empty);
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(HostnameError::TooLong {
            name: quoted(),
            len: name.len(),
        });
    }
    let mut last: &[u8] = &[];
    for label in name.split(|&b| b == b'.') {
        if label.contains(&b'*') {
            return Err(HostnameError::WildcardNotLeftmost { name: quoted() });
        }
        check_label(label).map_err(|reason| HostnameError::InvalidLabel {
            name: quoted(),
            label: quote_bytes(label),
            reason,
        })?;
        last = label;
    }
    if is_numeric_label(last) {
        return Err(HostnameError::NumericFinalLabel { name: quoted() });
    }
    Ok(())
}

/// Checks one DNS LDH label; the error is the reason shown to the user.
fn check_label(label: &[u8]) -> Result<(), &'static str> {
    if label.is_empty() {
        return Err("labels must not be empty");
    }
    if label.len() > MAX_LABEL_LEN {
        return Err("labels are at most 63 characters");
    }
    if !label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("only letters, digits and hyphens are allowed (use the xn-- form for IDNs)");
    }
    if label.first() == Some(&b'-') || label.last() == Some(&b'-') {
        return Err("labels must not start or end with a hyphen");
    }
    Ok(())
}

/// Whether a label reads as an IPv4 number part: decimal digits, or `0x`/`0X` then hex digits.
fn is_numeric_label(label: &[u8]) -> bool {
    if let Some(hex) = label.strip_prefix(b"0x").or_else(|| label.strip_prefix(b"0X")) {
        return hex.iter().all(u8::is_ascii_hexdigit);
    }
    !label.is_empty() && label.iter().all(u8::is_ascii_digit)
}

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

impl HostPattern {
    /// Parses and normalizes a pattern: an exact name under the rules of [`normalize`], or
    /// `*.` followed by such a name of at least two labels.
    pub fn parse(s: &str) -> Result<Self, HostnameError> {
        let quoted = || quote(s);
        let trimmed = s.strip_suffix('.').unwrap_or(s);
        if trimmed.len() > MAX_HOSTNAME_LEN {
            return Err(HostnameError::TooLong {
                name: quoted(),
                len: trimmed.len(),
            });
        }
        if trimmed == "*" {
            return Err(HostnameError::WildcardTooBroad { name: quoted() });
        }
        match trimmed.strip_prefix("*.") {
            Some(suffix) => {
                if suffix.is_empty() {
                    return Err(HostnameError::WildcardTooBroad { name: quoted() });
                }
                check_name(suffix.as_bytes(), quoted)?;
                if !suffix.contains('.') {
                    return Err(HostnameError::WildcardTooBroad { name: quoted() });
                }
                Ok(HostPattern::Wildcard {
                    suffix: suffix.to_ascii_lowercase(),
                })
            }
            None => {
                if let Some(first) = trimmed.split('.').next()
                    && first.contains('*')
                    && first != "*"
                {
                    return Err(HostnameError::InvalidLabel {
                        name: quoted(),
                        label: quote(first),
                        reason: "a wildcard must be the whole label `*`",
                    });
                }
                check_name(trimmed.as_bytes(), quoted)?;
                Ok(HostPattern::Exact(trimmed.to_ascii_lowercase()))
            }
        }
    }

    /// Whether `host` (a normalized hostname) matches this pattern.
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

/// The rejected input for an error message, cut short so a huge input cannot flood logs.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

fn quote_bytes(raw: &[u8]) -> String {
    quote(&String::from_utf8_lossy(raw))
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
    type Err = HostnameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostPattern::parse(s)
    }
}

impl TryFrom<String> for HostPattern {
    type Error = HostnameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostPattern::parse(&s)
    }
}

impl TryFrom<&str> for HostPattern {
    type Error = HostnameError;

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

    fn n(raw: &[u8]) -> Option<String> {
        normalize(raw).ok()
    }

    #[test]
    fn names_are_lowercased_and_lose_one_trailing_dot() {
        assert_eq!(n(b"Example.COM").as_deref(), Some("example.com"));
        assert_eq!(n(b"example.com.").as_deref(), Some("example.com"));
        assert_eq!(n(b"localhost").as_deref(), Some("localhost"));
        assert_eq!(
            n(b"xn--bcher-kva.example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(n(b"a-1.b2.c").as_deref(), Some("a-1.b2.c"));
        assert_eq!(n(b"1password.com").as_deref(), Some("1password.com"));
        assert_eq!(n(b"1.2.3.example").as_deref(), Some("1.2.3.example"));
    }

    #[test]
    fn name_limits() {
        let label63 = "a".repeat(63);
        assert!(n(format!("{label63}.com").as_bytes()).is_some());
        assert!(n(format!("{label63}a.com").as_bytes()).is_none());
        // 4 x 63 + 3 dots = 255 bytes: too long; trimmed to 253 it passes.
        let long = [label63.as_str(); 4].join(".");
        assert!(matches!(
            normalize(long.as_bytes()),
            Err(HostnameError::TooLong { len: 255, .. })
        ));
        let max = long.get(..253).unwrap();
        assert!(n(max.as_bytes()).is_some());
        assert!(n(format!("{max}.").as_bytes()).is_some());
        // A huge input is rejected without quoting all of it.
        let huge = "a".repeat(1 << 20);
        let msg = normalize(huge.as_bytes()).unwrap_err().to_string();
        assert!(msg.len() < 300, "{}", msg.len());
    }

    #[test]
    fn names_refused() {
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"example..com",
            b".example.com",
            b"example.com..",
            b"-example.com",
            b"example-.com",
            b"exa mple.com",
            b"exa_mple.com",
            b"example.com:443",
            b"b\xc3\xbccher.example",
            b"bad\0.example",
            b"127.0.0.1",
            b"10.1",
            b"0x7f.0x1",
            b"a.0x7f",
            b"a.0X1F",
            b"example.123",
            b"[::1]",
            b"::1",
            b"*.example.com",
            b"a.*.com",
        ] {
            assert_eq!(n(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_exact_pattern_is_exactly_a_routable_name() {
        // One set of rules: whatever the input, the pattern parser and the name normalizer
        // accept the same exact names and agree on their form. (Once, `a.0x7f` was a valid
        // pattern that no client could ever be routed to.)
        let mut inputs: Vec<String> = [
            "a.0x7f",
            "a.0x",
            "a.0xg",
            "x.123",
            "x.12a",
            "1.example",
            "App.Test.",
            "a..b",
            "-a.b",
            "a_b.c",
            "localhost",
            "a.b.c.d",
            "*.a.b",
            "a*.b.c",
            "a.*",
            "xn--p1ai",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        inputs.push(format!("{}.test", "a".repeat(63)));
        inputs.push(format!("{}.test", "a".repeat(64)));
        for input in inputs {
            let as_name = normalize(input.as_bytes()).ok();
            let as_exact = match HostPattern::parse(&input) {
                Ok(HostPattern::Exact(name)) => Some(name),
                _ => None,
            };
            assert_eq!(as_name, as_exact, "{input:?}");
        }
    }

    #[test]
    fn parses_and_normalizes_patterns() {
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
    fn refuses_empty_patterns() {
        assert_eq!(HostPattern::parse(""), Err(HostnameError::Empty));
        assert_eq!(HostPattern::parse("."), Err(HostnameError::Empty));
    }

    #[test]
    fn refuses_bad_labels() {
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
        ];
        for (input, label) in cases {
            match HostPattern::parse(input) {
                Err(HostnameError::InvalidLabel { name, label: got, .. }) => {
                    assert_eq!(name, input);
                    assert_eq!(got, label, "{input}");
                }
                other => panic!("{input:?}: unexpected {other:?}"),
            }
        }
        let long_label = format!("{}.test", "a".repeat(64));
        assert!(matches!(
            HostPattern::parse(&long_label),
            Err(HostnameError::InvalidLabel { .. })
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
    fn refuses_too_long_patterns() {
        // 4 labels of 63 + 3 dots = 255.
        let label = "a".repeat(63);
        let long = [label.as_str(); 4].join(".");
        match HostPattern::parse(&long) {
            Err(HostnameError::TooLong { len, name }) => {
                assert_eq!(len, 255);
                assert!(name.len() < 100, "error quotes a shortened pattern");
            }
            other => panic!("unexpected {other:?}"),
        }
        // 253 exactly is fine, and so is 253 plus the trailing dot.
        let ok = format!("{}.{}.{}.{}", label, label, label, "a".repeat(61));
        assert_eq!(ok.len(), 253);
        assert!(HostPattern::parse(&ok).is_ok());
        assert!(HostPattern::parse(&format!("{ok}.")).is_ok());
        let huge = "a".repeat(1 << 20);
        let msg = HostPattern::parse(&huge).unwrap_err().to_string();
        assert!(msg.len() < 300, "{}", msg.len());
    }

    #[test]
    fn refuses_misplaced_or_broad_wildcards() {
        for s in ["*", "*.", "*.com", "*.com."] {
            assert!(
                matches!(HostPattern::parse(s), Err(HostnameError::WildcardTooBroad { .. })),
                "{s}: {:?}",
                HostPattern::parse(s)
            );
        }
        for s in ["a.*.test", "app.*", "*.*.test", "a.b.*", "a.*b.test"] {
            assert!(
                matches!(
                    HostPattern::parse(s),
                    Err(HostnameError::WildcardNotLeftmost { .. })
                ),
                "{s}: {:?}",
                HostPattern::parse(s)
            );
        }
        for s in ["a*.test.x", "**.test.x", "*a.test.x"] {
            assert!(
                matches!(HostPattern::parse(s), Err(HostnameError::InvalidLabel { .. })),
                "{s}: {:?}",
                HostPattern::parse(s)
            );
        }
        assert!(matches!(
            HostPattern::parse("*..test"),
            Err(HostnameError::InvalidLabel { .. })
        ));
    }

    #[test]
    fn refuses_ip_addresses_in_any_spelling() {
        for s in [
            "10.0.0.1",
            "127.0.0.1.",
            "*.0.1",
            "example.123",
            "a.0x7f",
            "*.a.0xff",
        ] {
            assert!(
                matches!(
                    HostPattern::parse(s),
                    Err(HostnameError::NumericFinalLabel { .. })
                ),
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
