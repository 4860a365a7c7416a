//! Sans-IO peeking: owns reading the opening message of a client's byte stream — a TLS ClientHello
//! ([`tls`]) or a plaintext HTTP/1.x request head ([`http`]) — far enough to route the connection,
//! without consuming, decrypting or rewriting anything, plus the canned bytes we answer with when
//! we refuse one (TLS alerts, HTTP redirects and errors).
//!
//! Peekers are pure functions over the bytes received so far: no I/O, no timers, no state. The
//! caller appends what it reads to one buffer and calls the peeker again on the whole buffer after
//! every [`Peek::NeedMore`]; re-parsing from the start is cheap and bounded by the caller's
//! `max_len`. Any valid prefix of a message yields `NeedMore`, never an error, so the result does
//! not depend on how the network split the bytes.

pub mod http;
pub mod tls;

/// Result of feeding the bytes received so far to a peeker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek<T> {
    /// The bytes so far are a valid prefix of the message; call again with more.
    NeedMore,
    /// The message is complete and was parsed.
    Done(T),
}

/// Longest DNS name we accept, without the optional trailing dot (RFC 1035 §2.3.4).
const MAX_DNS_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_DNS_LABEL_LEN: usize = 63;

/// Normalises a host name we are asked to route on: strips one trailing dot, lowercases, and
/// validates it as a DNS name of LDH labels (letters, digits, inner hyphens; 1..=63 bytes each,
/// 253 in total).
///
/// Returns `None` for anything else, including IPv4 literals in any spelling `inet_aton` accepts
/// (a last label that is all digits or `0x` + hex, as in the WHATWG URL host parser), so that
/// `10.1`, `127.0.0.1` or `0x7f.1` can never be taken for a name.
pub(crate) fn normalize_dns_name(raw: &[u8]) -> Option<String> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    if name.is_empty() || name.len() > MAX_DNS_NAME_LEN {
        return None;
    }
    let mut last_label: &[u8] = &[];
    for label in name.split(|&b| b == b'.') {
        let ldh = label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        let hyphen_at_edge = label.first() == Some(&b'-') || label.last() == Some(&b'-');
        if label.is_empty() || label.len() > MAX_DNS_LABEL_LEN || !ldh || hyphen_at_edge {
            return None;
        }
        last_label = label;
    }
    if is_numeric_label(last_label) {
        return None;
    }
    String::from_utf8(name.to_ascii_lowercase()).ok()
}

/// Whether a label reads as an IPv4 number part: decimal digits, or `0x`/`0X` then hex digits.
fn is_numeric_label(label: &[u8]) -> bool {
    if let Some(hex) = label.strip_prefix(b"0x").or_else(|| label.strip_prefix(b"0X")) {
        return hex.iter().all(u8::is_ascii_hexdigit);
    }
    !label.is_empty() && label.iter().all(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_lowercased_and_lose_one_trailing_dot() {
        assert_eq!(normalize_dns_name(b"Example.COM").as_deref(), Some("example.com"));
        assert_eq!(
            normalize_dns_name(b"example.com.").as_deref(),
            Some("example.com")
        );
        assert_eq!(normalize_dns_name(b"localhost").as_deref(), Some("localhost"));
        assert_eq!(
            normalize_dns_name(b"xn--bcher-kva.example").as_deref(),
            Some("xn--bcher-kva.example")
        );
        assert_eq!(normalize_dns_name(b"a-1.b2.c").as_deref(), Some("a-1.b2.c"));
        assert_eq!(
            normalize_dns_name(b"1password.com").as_deref(),
            Some("1password.com")
        );
    }

    #[test]
    fn dns_name_limits() {
        let label63 = "a".repeat(63);
        assert!(normalize_dns_name(format!("{label63}.com").as_bytes()).is_some());
        assert!(normalize_dns_name(format!("{label63}a.com").as_bytes()).is_none());
        // 4 x 63 + 3 dots = 255 bytes: too long; trimmed to 253 it passes.
        let long = [label63.as_str(); 4].join(".");
        assert!(normalize_dns_name(long.as_bytes()).is_none());
        let max = long.get(..253).unwrap();
        assert!(normalize_dns_name(max.as_bytes()).is_some());
        assert!(normalize_dns_name(format!("{max}.").as_bytes()).is_some());
    }

    #[test]
    fn dns_name_rejects() {
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
            b"example.123",
            b"[::1]",
            b"::1",
        ] {
            assert_eq!(
                normalize_dns_name(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
