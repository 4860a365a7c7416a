//! Fuzzes the hostname rules: `sluice::hostname::{normalize, HostPattern}`, the one rule set
//! for SNI names, Host headers, stored hostnames and agents' routes.
//!
//! Input: a name as a client or an operator might give it (any bytes for `normalize`; UTF-8
//! ones for `HostPattern::parse` too). Properties:
//!
//! 1. No panic; an error message stays short however long the input (it quotes a cut).
//! 2. `normalize` is idempotent, lowercase, at most 253 bytes, ignores one trailing dot and
//!    ASCII case, and what it accepts is a valid exact pattern of the same form.
//! 3. An exact pattern and a normalized name agree: `parse(s)` is `Exact(n)` exactly when
//!    `normalize(s)` is `n`.
//! 4. `parse(display(p)) == p`, and the serde (JSON string) and `String` forms are the display.
//! 5. Wildcards: a `*.suffix` pattern's suffix is itself a normalized name of two labels or
//!    more, and the pattern matches (and covers) one more label on it but not the suffix; the
//!    parent of any normalized name of three labels or more makes a wildcard that matches it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::hostname::{HostPattern, MAX_HOSTNAME_LEN, normalize, wildcard_key};

/// An error message quotes at most 80 characters of the input and of the label, each escaped
/// (up to 10 bytes a character), plus fixed text.
const MAX_MESSAGE: usize = 2 * 80 * 10 + 200;

fuzz_target!(|data: &[u8]| {
    check_name(data);
    if let Ok(text) = std::str::from_utf8(data) {
        check_pattern(text);
    }
});

/// Property 2, and 1 for `normalize`.
fn check_name(raw: &[u8]) {
    let name = match normalize(raw) {
        Ok(name) => name,
        Err(error) => {
            assert!(
                error.to_string().len() <= MAX_MESSAGE,
                "{} bytes",
                error.to_string().len()
            );
            return;
        }
    };
    assert_eq!(normalize(name.as_bytes()).as_ref(), Ok(&name), "not idempotent");
    assert_eq!(name, name.to_ascii_lowercase());
    assert!(name.len() <= MAX_HOSTNAME_LEN && !name.ends_with('.'));
    assert_eq!(
        normalize(format!("{name}.").as_bytes()).as_ref(),
        Ok(&name),
        "trailing dot"
    );
    assert_eq!(
        normalize(name.to_ascii_uppercase().as_bytes()).as_ref(),
        Ok(&name),
        "case"
    );
    assert_eq!(HostPattern::parse(&name), Ok(HostPattern::Exact(name.clone())));
    if let Some(parent) = wildcard_key(&name).filter(|parent| parent.contains('.')) {
        let wildcard = HostPattern::parse(&format!("*.{parent}"))
            .unwrap_or_else(|e| panic!("the parent of {name:?} makes no wildcard: {e}"));
        assert!(wildcard.matches(&name), "*.{parent} does not match {name:?}");
        assert!(wildcard.covers(&HostPattern::Exact(name.clone())));
    }
}

/// Properties 3-5, and 1 for `HostPattern::parse`.
fn check_pattern(text: &str) {
    let pattern = HostPattern::parse(text);
    // Property 3, in both directions.
    match (normalize(text.as_bytes()), &pattern) {
        (Ok(name), Ok(HostPattern::Exact(exact))) => assert_eq!(&name, exact),
        (Ok(name), other) => panic!("{text:?} normalizes to {name:?} but parses to {other:?}"),
        (Err(_), Ok(HostPattern::Exact(exact))) => {
            panic!("{text:?} is the exact pattern {exact:?} but not a routable name")
        }
        (Err(_), _) => {}
    }
    let pattern = match pattern {
        Ok(pattern) => pattern,
        Err(error) => {
            assert!(
                error.to_string().len() <= MAX_MESSAGE,
                "{} bytes",
                error.to_string().len()
            );
            return;
        }
    };
    let display = pattern.to_string();
    assert_eq!(
        HostPattern::parse(&display).as_ref(),
        Ok(&pattern),
        "parse(display(p)) != p"
    );
    assert_eq!(String::from(pattern.clone()), display);
    let json = serde_json::to_string(&pattern).expect("a pattern serializes");
    assert_eq!(
        json,
        serde_json::to_string(&display).expect("a string serializes")
    );
    assert_eq!(
        serde_json::from_str::<HostPattern>(&json).ok().as_ref(),
        Some(&pattern)
    );
    if let HostPattern::Wildcard { suffix } = &pattern {
        assert_eq!(
            normalize(suffix.as_bytes()).as_ref(),
            Ok(suffix),
            "suffix not a name"
        );
        assert!(suffix.contains('.'), "a wildcard over one label");
        assert!(!pattern.matches(suffix), "*.{suffix} matches its suffix");
        let one_more = format!("x.{suffix}");
        if one_more.len() <= MAX_HOSTNAME_LEN {
            assert_eq!(normalize(one_more.as_bytes()).as_ref(), Ok(&one_more));
            assert!(pattern.matches(&one_more), "*.{suffix} does not match {one_more}");
            assert!(pattern.covers(&HostPattern::Exact(one_more.clone())));
            assert!(
                !pattern.matches(&format!("x.{one_more}")),
                "matches two more labels"
            );
        }
    }
}
