//! Writes the seed corpus, `fuzz/corpus/<target>/<name>`: real inputs each target starts from,
//! made by the code that makes them in production (rustls for ClientHellos, Sluice's own
//! encoders for frames, headers and joins) or copied from what browsers and curl send.
//!
//! Run by `cargo xtask fuzz-seeds`; the files it writes are checked in. It replaces the files it
//! names and leaves any others. ClientHellos carry fresh randoms and key shares, so their bytes
//! change on every run while their structure does not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion};
use sluice::wire::frame::encode;
use sluice::wire::message::{AgentMessage, HttpMode, RefusedRoute, RelayMessage, RouteAd};
use sluice::wire::stream_header::{StreamHeader, StreamKind};
use sluice::wire::tcp_data::Join;
use sluice_fuzz::{Knobs, TCP_AGENT_ID, TCP_NONCES, tcp_stream_key};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut written = 0;
    for (target, seeds) in [
        ("tls_client_hello", tls_client_hello()?),
        ("http_request_head", http_request_head()),
        ("http_request_stream", http_request_stream()),
        ("control_frame", control_frame()?),
        ("stream_header", stream_header()?),
        ("tcp_data", tcp_data()?),
        ("hostname", text_seeds(HOSTNAMES)),
        ("cidr", text_seeds(CIDRS)),
        ("agent_cert", agent_cert()?),
    ] {
        let dir: PathBuf = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
            written += 1;
        }
    }
    println!("wrote {written} seeds under {}", corpus.display());
    Ok(())
}

type Seeds = Vec<(String, Vec<u8>)>;

/// The first flight rustls sends for `server_name` (a DNS name or an IP address), offering
/// TLS 1.3 and 1.2.
fn rustls_flight(
    server_name: &str,
    alpn: &[&[u8]],
    tweak: impl FnOnce(&mut ClientConfig),
) -> Result<Vec<u8>> {
    rustls_flight_of(rustls::DEFAULT_VERSIONS, server_name, alpn, tweak)
}

fn rustls_flight_of(
    versions: &[&'static SupportedProtocolVersion],
    server_name: &str,
    alpn: &[&[u8]],
    tweak: impl FnOnce(&mut ClientConfig),
) -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tweak(&mut config);
    let mut conn = ClientConnection::new(Arc::new(config), ServerName::try_from(server_name.to_owned())?)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

fn tls_client_hello() -> Result<Seeds> {
    let h2 = [&b"h2"[..], b"http/1.1"];
    let plain = rustls_flight("example.com", &h2, |_| {})?;
    let many_alpn: Vec<Vec<u8>> = (0..60).map(|i| format!("proto-{i:02}").into_bytes()).collect();
    let many_alpn: Vec<&[u8]> = many_alpn.iter().map(Vec::as_slice).collect();
    let mut with_trailing = plain.clone();
    // A middlebox-compatibility ChangeCipherSpec and an application data record after it.
    with_trailing.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 2, 0xaa, 0xbb]);
    let whole = Knobs::WHOLE;
    Ok(vec![
        ("rustls-example-com".into(), whole.prepend(&plain)),
        (
            "rustls-no-sni".into(),
            whole.prepend(&rustls_flight("example.com", &[], |c| c.enable_sni = false)?),
        ),
        (
            "rustls-ip-address".into(),
            whole.prepend(&rustls_flight("192.0.2.1", &h2, |_| {})?),
        ),
        (
            "rustls-fragmented-64".into(),
            whole.prepend(&rustls_flight("fragmented.example.net", &[b"h2"], |c| {
                c.max_fragment_size = Some(64)
            })?),
        ),
        (
            "rustls-tls12-only".into(),
            whole.prepend(&rustls_flight_of(
                &[&rustls::version::TLS12],
                "a-long-subdomain.of.some.example.org",
                &h2,
                |_| {},
            )?),
        ),
        (
            "rustls-many-alpn".into(),
            whole.prepend(&rustls_flight("big.example", &many_alpn, |_| {})?),
        ),
        ("rustls-then-ccs-and-data".into(), whole.prepend(&with_trailing)),
        // The same hello read one byte per read, and under a 320-byte limit.
        (
            "rustls-per-byte".into(),
            Knobs { limit: 0, cuts: 1 }.prepend(&plain),
        ),
        (
            "rustls-limit-320".into(),
            Knobs {
                limit: 128 + 40,
                cuts: 7,
            }
            .prepend(&plain),
        ),
    ])
}

/// Request heads as browsers and tools send them.
const HEADS: &[(&str, &[u8])] = &[
    (
        "firefox-get",
        b"GET /search?q=sluice&lang=en HTTP/1.1\r\nHost: WWW.Example.com:8080\r\n\
          User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
          Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
          Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n\
          Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\n\r\n",
    ),
    (
        "chrome-get",
        b"GET / HTTP/1.1\r\nHost: app.acme.test\r\nConnection: keep-alive\r\n\
          sec-ch-ua: \"Chromium\";v=\"131\", \"Not_A Brand\";v=\"24\"\r\nsec-ch-ua-mobile: ?0\r\n\
          sec-ch-ua-platform: \"Linux\"\r\nUpgrade-Insecure-Requests: 1\r\n\
          User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
          Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n\
          Sec-Fetch-Site: none\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-User: ?1\r\n\
          Sec-Fetch-Dest: document\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n\
          Accept-Language: en-US,en;q=0.9\r\n\r\n",
    ),
    (
        "curl-get",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    ),
    (
        "acme-challenge",
        b"GET /.well-known/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0 HTTP/1.1\r\n\
          Host: app.acme.test\r\nUser-Agent: Mozilla/5.0 (compatible; Let's Encrypt validation server; +https://www.letsencrypt.org)\r\n\
          Accept: */*\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    ),
    (
        "post-form",
        b"POST /login HTTP/1.1\r\nHost: app.acme.test\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 27\r\n\r\nuser=alice&password=secret1",
    ),
    (
        "post-chunked",
        b"POST /upload HTTP/1.1\r\nHost: app.acme.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    ),
    (
        "absolute-form",
        b"GET http://App.Acme.Test:80/x?y=1 HTTP/1.1\r\nHost: app.acme.test\r\n\r\n",
    ),
    ("ipv6-host", b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:8080\r\n\r\n"),
    ("http10-no-host", b"GET / HTTP/1.0\r\n\r\n"),
    ("bare-lf", b"GET / HTTP/1.1\nHost: a.example\n\n"),
    (
        "websocket",
        b"GET /chat HTTP/1.1\r\nHost: app.acme.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ),
    ("options-star", b"OPTIONS * HTTP/1.1\r\nHost: app.acme.test\r\n\r\n"),
];

fn http_request_head() -> Seeds {
    let mut seeds: Seeds = HEADS
        .iter()
        .map(|(name, head)| (name.to_string(), Knobs::WHOLE.prepend(head)))
        .collect();
    // A 100-byte limit (128 + 25 steps of 4), read in pieces.
    seeds.push((
        "firefox-get-limit-100".into(),
        Knobs {
            limit: 128 + 25,
            cuts: 9,
        }
        .prepend(HEADS[0].1),
    ));
    seeds
}

fn http_request_stream() -> Seeds {
    let get = &b"GET /a HTTP/1.1\r\nHost: app.acme.test\r\n\r\n"[..];
    let keep_alive = [
        get,
        b"POST /b HTTP/1.1\r\nHost: APP.acme.test:80\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /c HTTP/1.1\r\nHost: app.acme.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"GET http://app.acme.test/d HTTP/1.1\r\nHost: app.acme.test\r\n\r\n",
        get,
    ]
    .concat();
    let body = b"GET / HTTP/1.1\r\nHost: admin.acme.test\r\n\r\n";
    let body_like_a_request = [
        format!(
            "POST /a HTTP/1.1\r\nHost: app.acme.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
        body,
        get,
    ]
    .concat();
    let other_host = [get, get, b"GET /secret HTTP/1.1\r\nHost: admin.acme.test\r\n\r\n"].concat();
    let chunked_large = [
        &b"POST /c HTTP/1.1\r\nHost: app.acme.test\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"1a\r\nabcdefghijklmnopqrstuvwxyz\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
        get,
    ]
    .concat();
    vec![
        ("keep-alive".into(), Knobs::WHOLE.prepend(&keep_alive)),
        (
            "keep-alive-split".into(),
            Knobs { limit: 0, cuts: 5 }.prepend(&keep_alive),
        ),
        (
            "body-like-a-request".into(),
            Knobs::WHOLE.prepend(&body_like_a_request),
        ),
        (
            "other-host".into(),
            Knobs { limit: 0, cuts: 3 }.prepend(&other_host),
        ),
        (
            "chunked".into(),
            Knobs { limit: 0, cuts: 2 }.prepend(&chunked_large),
        ),
        // Later heads limited to 32 + 3 * 16 = 80 bytes.
        (
            "keep-alive-small-heads".into(),
            Knobs {
                limit: 128 + 3,
                cuts: 0,
            }
            .prepend(&keep_alive),
        ),
    ]
}

fn control_frame() -> Result<Seeds> {
    let routes = vec![
        RouteAd {
            hostname: "app.acme.test".into(),
            http: HttpMode::Redirect,
        },
        RouteAd {
            hostname: "*.acme.test".into(),
            http: HttpMode::Forward,
        },
    ];
    let agent = [
        AgentMessage::Hello {
            protocol: sluice::wire::PROTOCOL_VERSION,
            token: Some("sluice_acme_0123456789abcdef".into()),
            agent_name: "edge-1".into(),
            routes: routes.clone(),
        },
        AgentMessage::Data {
            agent_id: "acme/edge-1/4f2a".into(),
            credential: "c2Vzc2lvbi1jcmVkZW50aWFs".into(),
        },
        AgentMessage::Renew {
            token: Some("sluice_acme_0123456789abcdef".into()),
        },
        AgentMessage::Renew { token: None },
        AgentMessage::Enroll {
            protocol: sluice::wire::PROTOCOL_VERSION,
            token: "sluice_acme_0123456789abcdef".into(),
            agent_name: "edge-1".into(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n".into(),
        },
        AgentMessage::RenewCertificate,
        AgentMessage::Routes { routes },
        AgentMessage::Ping { seq: 1 },
        AgentMessage::Pong { seq: u64::MAX },
    ];
    let refused = vec![RefusedRoute {
        hostname: "other.test".into(),
        reason: "not among the tenant's hostnames".into(),
    }];
    let relay = [
        RelayMessage::Welcome {
            agent_id: "acme/edge-1/4f2a".into(),
            credential: "c2Vzc2lvbi1jcmVkZW50aWFs".into(),
            credential_ttl_secs: 3600,
            heartbeat_secs: 10,
            pool_size: 8,
            accepted: vec!["app.acme.test".into(), "*.acme.test".into()],
            refused: refused.clone(),
        },
        RelayMessage::Rejected {
            reason: "token revoked".into(),
        },
        RelayMessage::Renewed {
            credential: "bmV3LWNyZWRlbnRpYWw".into(),
            credential_ttl_secs: 3600,
        },
        RelayMessage::RoutesUpdated {
            accepted: vec!["app.acme.test".into()],
            refused,
        },
        RelayMessage::OpenData {
            count: 4,
            require_tls: true,
        },
        RelayMessage::OpenData {
            count: 1,
            require_tls: false,
        },
        RelayMessage::Ping { seq: 7 },
        RelayMessage::Pong { seq: 7 },
        RelayMessage::Moving,
        RelayMessage::Goodbye {
            reason: "relay shutting down".into(),
        },
    ];
    let mut seeds = Seeds::new();
    for message in &agent {
        seeds.push((format!("agent-{}", kind(message)?), encode(message)?));
    }
    for message in &relay {
        seeds.push((format!("relay-{}", kind(message)?), encode(message)?));
    }
    // Two frames back to back: the decoder reads the first.
    let mut two = encode(&agent[4])?;
    two.extend_from_slice(&encode(&agent[5])?);
    seeds.push(("agent-ping-then-pong".into(), two));
    Ok(seeds)
}

/// The message's `type` tag and, for `open_data`, whether it requires TLS: a file name.
fn kind<T: serde::Serialize>(message: &T) -> Result<String> {
    let json = serde_json::to_value(message)?;
    let tag = json["type"].as_str().ok_or("a message without a type tag")?;
    Ok(match json.get("require_tls") {
        Some(_) => format!("{tag}-tls"),
        None => tag.to_owned(),
    })
}

fn headers() -> Result<Vec<(&'static str, StreamHeader)>> {
    Ok(vec![
        (
            "tls-v4",
            StreamHeader {
                kind: StreamKind::Tls,
                client: "192.0.2.7:51000".parse()?,
                relay_port: 443,
                host: "app.acme.test".into(),
            },
        ),
        (
            "http-v6",
            StreamHeader {
                kind: StreamKind::Http,
                client: "[2001:db8::1]:40000".parse()?,
                relay_port: 80,
                host: "a.b".into(),
            },
        ),
        (
            "tls-v6-longest-host",
            StreamHeader {
                kind: StreamKind::Tls,
                client: "[::ffff:192.0.2.1]:1".parse()?,
                relay_port: 8443,
                host: "a".repeat(255),
            },
        ),
    ])
}

fn stream_header() -> Result<Seeds> {
    let mut seeds = Seeds::new();
    for (name, header) in headers()? {
        let mut bytes = Vec::new();
        header.encode(&mut bytes)?;
        // The client's stream follows the header.
        bytes.extend_from_slice(&[22, 3, 1, 0, 5]);
        seeds.push((name.to_owned(), bytes));
    }
    Ok(seeds)
}

fn tcp_data() -> Result<Seeds> {
    let key = tcp_stream_key();
    let mut seeds = Seeds::new();
    let join = Join {
        agent_id: TCP_AGENT_ID.into(),
        agent_nonce: TCP_NONCES.agent,
    };
    let mut joined = join.encode()?;
    seeds.push(("join".into(), joined.clone()));
    // The join proof follows the join.
    joined.extend_from_slice(&[0x11; 32]);
    seeds.push(("join-then-proof".into(), joined));
    for (name, header) in headers()? {
        let mut sealed = Vec::new();
        key.seal(&header, &mut sealed)?;
        sealed.extend_from_slice(&[22, 3, 1, 0, 5]);
        seeds.push((format!("sealed-{name}"), sealed));
    }
    Ok(seeds)
}

const HOSTNAMES: &[&str] = &[
    "example.com",
    "App.Example.COM.",
    "*.acme.test",
    "*.Acme.TEST.",
    "xn--bcher-kva.example",
    "localhost",
    "a-1.b2.c",
    "1password.com",
    "a.0x7f",
    "10.1",
    "127.0.0.1",
    "[::1]",
    "*.com",
    "a.*.test",
    "a..b",
    "exa_mple.com",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.test",
];

const CIDRS: &[&str] = &[
    "192.0.2.0/24",
    "2001:db8::/32",
    "203.0.113.9",
    "::1",
    "::ffff:192.0.2.1/128",
    "0.0.0.0/0",
    "::/0",
    "192.0.2.1/24",
    " 10.0.0.0 / 8 ",
    "192.0.2.0/33",
    "fe80::1%eth0",
];

/// A certificate the agent CA issues (DER), the CSR an agent sends to enroll (PEM), and an
/// identity URI, all made by Sluice's own code in a scratch directory.
fn agent_cert() -> Result<Seeds> {
    use sluice::relay::agent_ca::{self, AgentCa, AgentKey};
    use sluice::store::IssuedCert;
    use sluice::wire::agent_cert::AgentIdentity;

    let scratch = std::env::temp_dir().join(format!("sluice-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let (ca_cert, ca_key) = (scratch.join("ca.pem"), scratch.join("ca-key.pem"));
    std::fs::create_dir_all(&scratch)?;
    agent_ca::init(&ca_cert, &ca_key)?;
    let ca = AgentCa::load(&ca_cert, &ca_key)?;
    let csr = sluice::agent::identity::Identity::open(&scratch.join("agent"))?.csr("office")?;
    let identity = AgentIdentity {
        tenant: "acme".into(),
        agent: "0123456789abcdef".into(),
    };
    let issued = IssuedCert {
        serial: agent_ca::new_serial(),
        expires_at: 2_000_000_000,
    };
    let pem = ca.issue(&AgentKey::from_csr(&csr)?, &identity, &issued, 1_900_000_000)?;
    let der = {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec()
    };
    std::fs::remove_dir_all(&scratch)?;
    Ok(vec![
        ("certificate".into(), der),
        ("csr".into(), csr.into_bytes()),
        ("uri".into(), identity.uri().into_bytes()),
    ])
}

fn text_seeds(texts: &[&str]) -> Seeds {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| (format!("seed-{i:02}"), text.as_bytes().to_vec()))
        .collect()
}
