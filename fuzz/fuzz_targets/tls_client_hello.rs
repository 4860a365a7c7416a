//! Fuzzes the ClientHello peek: `sluice::peek::tls::{peek_client_hello, ClientHelloPeeker}`.
//!
//! Input: [`Knobs`] (the peek's `max_len`, and where the stream is cut into reads), then the
//! client's first bytes. Properties, for every input:
//!
//! 1. No panic. A `Done` hello's `len` is within the input and `max_len`; `NeedMore` never
//!    waits past `max_len` (a client cannot make the edge buffer more than its limit), once the
//!    5-byte record header is in.
//! 2. The verdict does not depend on how the network split the bytes: every prefix is
//!    `NeedMore` up to the first one that has a verdict, and that verdict is the whole input's.
//!    In particular every prefix of a hello shorter than its `len` is `NeedMore`, never an error.
//! 3. `ClientHelloPeeker`, fed the growing buffer one byte at a time and at the knobs' cuts,
//!    returns exactly what `peek_client_hello` returns on each of those prefixes until its
//!    verdict.
//! 4. Reassembly: a parsed hello re-framed into one record, and into records cut at the knobs'
//!    cuts, parses to the same name and ALPN offer.
//! 5. Agreement with tls-parser (which parses one record at a time), in both directions:
//!    - ours => tls-parser: a hello we parse, in one record, tls-parser parses as one record
//!      holding exactly one ClientHello; every `server_name` and ALPN extension tls-parser reads
//!      in it (up to the first extension whose contents it judges, if it stops early) names our
//!      host (after our normalization) and our ALPN list; if it reads all extensions, an absent
//!      one is absent for us too.
//!    - tls-parser => ours: where tls-parser parses a record as exactly one ClientHello, and
//!      the hello is one we must accept — version 3.x, a record of at most 2^14 bytes that the
//!      message fills, fields that account for every byte of the message, and `server_name`
//!      and ALPN extensions that re-encode to exactly their bytes, at most one of each, with at
//!      most one host_name entry and no empty ALPN name — we parse it to the same host name
//!      normalized and the same ALPN list, or refuse it as `InvalidServerName` exactly when our
//!      hostname rules reject that name. (Those conditions are where we are stricter than
//!      tls-parser, which tolerates trailing bytes at every level, repeated extensions and
//!      records up to 2^14 + 256 bytes: such hellos we refuse as `Malformed`.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::hostname::normalize;
use sluice::peek::Peek;
use sluice::peek::tls::{ClientHelloError, ClientHelloInfo, ClientHelloPeeker, peek_client_hello};
use sluice_fuzz::Knobs;
use tls_parser::{
    SNIType, TlsExtension, TlsExtensionType, TlsMessage, TlsMessageHandshake, TlsRecordType,
    parse_tls_client_hello_extensions, parse_tls_extension_alpn_content, parse_tls_extension_sni_content,
    parse_tls_extension_unknown, parse_tls_plaintext,
};

type Verdict = Result<Peek<ClientHelloInfo>, ClientHelloError>;

const RECORD_HEADER_LEN: usize = 5;
const MAX_FRAGMENT_LEN: usize = 1 << 14;

fuzz_target!(|data: &[u8]| {
    let Some((knobs, stream)) = Knobs::split(data) else {
        return;
    };
    // Steps of 8 bytes reach every limit up to 1 KiB, beyond any record header or small hello.
    let max_len = knobs.limit(8);
    let verdict = check_prefixes_and_resumption(stream, max_len, knobs.cuts);
    match &verdict {
        Ok(Peek::Done(info)) => {
            assert!(info.len <= stream.len() && info.len <= max_len, "{info:?}");
            check_reframed(stream, info, knobs.cuts);
        }
        // The 5-byte record header is read whatever the limit (the relay's is at least 512).
        Ok(Peek::NeedMore) => assert!(
            stream.len() < max_len.max(RECORD_HEADER_LEN),
            "NeedMore at the limit"
        ),
        Err(_) => {}
    }
    check_tls_parser_agrees(stream);
});

/// Properties 1-3: walks the prefixes up to the first verdict, feeding two resuming peekers
/// (one read per byte, and one read per cut) alongside, and returns the whole input's verdict.
fn check_prefixes_and_resumption(stream: &[u8], max_len: usize, cut_seed: u8) -> Verdict {
    let whole = peek_client_hello(stream, max_len);
    let mut per_byte = ClientHelloPeeker::new(max_len);
    let mut per_cut = ClientHelloPeeker::new(max_len);
    let cuts = sluice_fuzz::cuts(cut_seed, stream.len());
    let mut next_cut = cuts.iter().copied().peekable();
    for end in 0..=stream.len() {
        let prefix = &stream[..end];
        let fresh = peek_client_hello(prefix, max_len);
        // Bytes arrive one at a time: the resumed peek sees every prefix.
        assert_eq!(per_byte.peek(prefix), fresh, "per-byte peeker at prefix {end}");
        while next_cut.peek().is_some_and(|&cut| cut < end) {
            next_cut.next();
        }
        if next_cut.peek() == Some(&end) {
            assert_eq!(per_cut.peek(prefix), fresh, "per-cut peeker at prefix {end}");
        }
        if fresh != Ok(Peek::NeedMore) {
            // The edge stops reading at the first verdict; more bytes must not change it.
            assert_eq!(
                fresh, whole,
                "verdict at prefix {end} differs from the whole input's"
            );
            if let Ok(Peek::Done(info)) = &fresh {
                assert_eq!(info.len, end, "a hello is complete only at its last byte");
            }
            // A read may carry the verdict's byte and more: the peeker fed at a later cut
            // must give the same verdict.
            if let Some(&cut) = next_cut.peek().filter(|&&cut| cut > end) {
                assert_eq!(
                    per_cut.peek(&stream[..cut]),
                    whole,
                    "per-cut peeker at prefix {cut}"
                );
            }
            return whole;
        }
    }
    assert_eq!(whole, Ok(Peek::NeedMore));
    whole
}

/// The records of a parsed hello: `(header, fragment)` pairs covering `stream[..len]`.
fn records(stream: &[u8], len: usize) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let header = &stream[at..at + RECORD_HEADER_LEN];
        let fragment_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let start = at + RECORD_HEADER_LEN;
        out.push((header, &stream[start..start + fragment_len]));
        at = start + fragment_len;
    }
    assert_eq!(at, len, "a parsed hello ends on a record boundary");
    out
}

/// Handshake bytes in records of the given fragment ends.
fn framed(message: &[u8], ends: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in ends {
        let fragment = &message[start..end];
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(fragment.len()).expect("fragment").to_be_bytes());
        out.extend_from_slice(fragment);
        start = end;
    }
    out
}

/// Property 4, and property 5 (ours => tls-parser) on the one-record form.
fn check_reframed(stream: &[u8], info: &ClientHelloInfo, cut_seed: u8) {
    let records = records(stream, info.len);
    let message: Vec<u8> = records
        .iter()
        .flat_map(|(_, fragment)| fragment.iter().copied())
        .collect();
    let same = |framing: &[u8], how: &str| match peek_client_hello(framing, usize::MAX) {
        Ok(Peek::Done(again)) => {
            assert_eq!(
                (&again.server_name, &again.alpn, again.len),
                (&info.server_name, &info.alpn, framing.len()),
                "{how}"
            );
        }
        other => panic!("{how}: {other:?}, but {info:?} as sent"),
    };
    if message.len() <= MAX_FRAGMENT_LEN {
        let single = framed(&message, &[message.len()]);
        same(&single, "re-framed into one record");
        check_ours_implies_tls_parser(&single, info);
    }
    // Records of 1 to 64 bytes: every field of the hello gets split somewhere.
    let cuts = sluice_fuzz::cuts(cut_seed.max(2), message.len());
    same(&framed(&message, &cuts), "re-framed at the knobs' cuts");
}

/// Property 5, ours => tls-parser, for a hello we parsed that sits in one record.
fn check_ours_implies_tls_parser(record: &[u8], ours: &ClientHelloInfo) {
    let (rest, plaintext) = parse_tls_plaintext(record)
        .unwrap_or_else(|e| panic!("tls-parser refuses a hello we parse ({ours:?}): {e:?}"));
    assert!(rest.is_empty(), "tls-parser leaves bytes of our one record");
    let [TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))] = plaintext.msg.as_slice() else {
        panic!(
            "tls-parser reads {:?} where we read one ClientHello",
            plaintext.msg
        );
    };
    let (rest, extensions) =
        parse_tls_client_hello_extensions(hello.ext.unwrap_or_default()).expect("many0 does not fail");
    let (mut saw_sni, mut saw_alpn) = (false, false);
    for extension in &extensions {
        match extension {
            TlsExtension::SNI(names) => {
                saw_sni = true;
                let host = names.iter().find(|(kind, _)| *kind == SNIType::HostName);
                let expected = host
                    .map(|(_, name)| normalize(name).expect("we parsed a hello whose host name we reject"));
                assert_eq!(ours.server_name, expected, "server_name");
            }
            TlsExtension::ALPN(protocols) => {
                saw_alpn = true;
                assert_eq!(ours.alpn, *protocols, "ALPN");
            }
            _ => {}
        }
    }
    if rest.is_empty() {
        assert!(
            saw_sni || ours.server_name.is_none(),
            "a host name tls-parser does not see"
        );
        assert!(
            saw_alpn || ours.alpn.is_empty(),
            "an ALPN offer tls-parser does not see"
        );
    }
}

/// What tls-parser reads in a first record that holds a hello we must accept (property 5,
/// tls-parser => ours): its host_name entry, if any, and its ALPN list. `None` when tls-parser
/// does not parse the record as one ClientHello, or the hello breaks one of the rules we are
/// stricter about.
fn strict_reference_hello(record: &[u8]) -> Option<ReferenceHello<'_>> {
    let (rest, plaintext) = parse_tls_plaintext(record).ok()?;
    let header = &plaintext.hdr;
    let record_len = usize::from(header.len);
    let strict_record = rest.is_empty()
        && header.record_type == TlsRecordType::Handshake
        && header.version.0 >> 8 == 3
        && (1..=MAX_FRAGMENT_LEN).contains(&record_len);
    let [TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))] = plaintext.msg.as_slice() else {
        return None;
    };
    let message = &record[RECORD_HEADER_LEN..];
    let message_len = usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
    // Re-encode the fields tls-parser read: they must account for the whole message.
    let fields_len = 2
        + 32
        + 1
        + hello.session_id.map_or(0, <[u8]>::len)
        + 2
        + 2 * hello.ciphers.len()
        + 1
        + hello.comp.len()
        + hello.ext.map_or(0, |ext| 2 + ext.len());
    if !strict_record || 4 + message_len != record_len || fields_len != message_len {
        return None;
    }
    let mut block = hello.ext.unwrap_or_default();
    let (mut host, mut alpn) = (None, None);
    while !block.is_empty() {
        let (next, TlsExtension::Unknown(TlsExtensionType(kind), data)) =
            parse_tls_extension_unknown(block).ok()?
        else {
            return None;
        };
        block = next;
        match kind {
            0 if host.is_some() => return None,
            0 => {
                let (_, TlsExtension::SNI(names)) = parse_tls_extension_sni_content(data).ok()? else {
                    return None;
                };
                let mut list = Vec::new();
                for (kind, name) in &names {
                    list.push(kind.0);
                    list.extend_from_slice(&u16::try_from(name.len()).ok()?.to_be_bytes());
                    list.extend_from_slice(name);
                }
                let host_names: Vec<&[u8]> = names
                    .iter()
                    .filter(|(kind, _)| *kind == SNIType::HostName)
                    .map(|(_, name)| *name)
                    .collect();
                if names.is_empty() || with_u16_len(&list)? != data || host_names.len() > 1 {
                    return None;
                }
                host = Some(host_names.first().copied());
            }
            16 if alpn.is_some() => return None,
            16 => {
                let (_, TlsExtension::ALPN(protocols)) = parse_tls_extension_alpn_content(data).ok()? else {
                    return None;
                };
                let mut list = Vec::new();
                for protocol in &protocols {
                    list.push(u8::try_from(protocol.len()).ok()?);
                    list.extend_from_slice(protocol);
                }
                if protocols.is_empty()
                    || protocols.iter().any(|p| p.is_empty())
                    || with_u16_len(&list)? != data
                {
                    return None;
                }
                alpn = Some(protocols);
            }
            _ => {}
        }
    }
    Some(ReferenceHello {
        host: host.flatten(),
        alpn: alpn.unwrap_or_default(),
    })
}

/// What tls-parser read in a hello: the host_name entry's bytes, and the ALPN names.
struct ReferenceHello<'a> {
    host: Option<&'a [u8]>,
    alpn: Vec<&'a [u8]>,
}

fn with_u16_len(list: &[u8]) -> Option<Vec<u8>> {
    let mut out = u16::try_from(list.len()).ok()?.to_be_bytes().to_vec();
    out.extend_from_slice(list);
    Some(out)
}

/// Property 5, tls-parser => ours, on the input's first record.
fn check_tls_parser_agrees(stream: &[u8]) {
    let Some(header) = stream.first_chunk::<RECORD_HEADER_LEN>() else {
        return;
    };
    let record_len = RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]]));
    let Some(record) = stream.get(..record_len) else {
        return;
    };
    let Some(ReferenceHello { host, alpn }) = strict_reference_hello(record) else {
        return;
    };
    let ours = peek_client_hello(record, usize::MAX);
    match host.map(normalize).transpose() {
        Ok(server_name) => assert_eq!(
            ours,
            Ok(Peek::Done(ClientHelloInfo {
                server_name,
                alpn: alpn.into_iter().map(<[u8]>::to_vec).collect(),
                len: record_len,
            })),
            "a hello tls-parser reads strictly"
        ),
        Err(_) => assert_eq!(ours, Err(ClientHelloError::InvalidServerName)),
    }
}
