//! A real browser for the tests: headless Chromium (Debian's `chromium`, installed by
//! `cargo xtask setup`), driven over the Chrome DevTools Protocol.
//!
//! [`Browser::launch`] starts Chromium with a fresh profile, no sandbox (the tests run as
//! root), no GPU, no QUIC and no background traffic, and `--remote-debugging-port=0`; Chromium
//! writes the port it took into `DevToolsActivePort` in the profile, and the browser-level
//! WebSocket is opened there.
//!
//! Chromium runs in a network namespace of its own, with nothing but loopback: it closes every
//! connection when it sees the host's network change (`ERR_NETWORK_CHANGED`), and on a machine
//! where other tests add and remove veth links that would break a long-lived stream for reasons
//! that have nothing to do with the test. The addresses it is given to reach (`forward`) are
//! served on its own loopback, at the same address and port, by this process, which copies each
//! connection to the host's address unchanged (TLS and all, end to end). The client is minimal: [`Browser::call`] sends one command and
//! waits for the answer with its id, skipping the events Chromium sends meanwhile.
//! [`Browser::open`] creates a tab and attaches to it (flat sessions), [`Page::text`] evaluates
//! `document.body.innerText` in it. Name resolution and trust are the caller's, as Chromium
//! flags: `--host-resolver-rules="MAP app.test 127.0.0.1:8443"` sends a hostname to a test port,
//! and [`spki_flag`] trusts chains that hold a given key.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Child,
    socket: WebSocketStream<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// A tab, attached with a flat session.
pub struct Page {
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts Chromium with `flags` added, in its own network namespace where each of
    /// `forward` (loopback addresses of the host) reaches the host's, and connects to it; its
    /// log goes to `log`.
    pub async fn launch(flags: &[String], log: &Path, forward: &[SocketAddr]) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(flags)
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
        let forward = forward.to_vec();
        let active_port = profile.path().join("DevToolsActivePort");
        // A thread of its own enters the new namespace (namespaces belong to threads), binds the
        // forwarded ports there, starts Chromium, which inherits the namespace, and opens the
        // connection to its DevTools port, inside.
        let (child, listeners, devtools, url) = std::thread::spawn(move || {
            // SAFETY: a plain syscall; it changes only this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            let up = Command::new("ip").args(["link", "set", "lo", "up"]).status();
            assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
            let listeners: Vec<(std::net::TcpListener, SocketAddr)> = forward
                .iter()
                .map(|&addr| (std::net::TcpListener::bind(addr).unwrap(), addr))
                .collect();
            let child = command
                .spawn()
                .expect("chromium (Debian's chromium package; `cargo xtask setup` installs it)");
            let (port, path) = devtools_endpoint(&active_port);
            let devtools = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            (child, listeners, devtools, format!("ws://127.0.0.1:{port}{path}"))
        })
        .join()
        .unwrap();
        for (listener, host) in listeners {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            // Sockets stay in the namespace they were made in: this task's connects (from the
            // runtime's threads) reach the host's loopback.
            tokio::spawn(async move {
                while let Ok((mut inside, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if let Ok(mut outside) = TcpStream::connect(host).await {
                            let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                        }
                    });
                }
            });
        }
        devtools.set_nonblocking(true).unwrap();
        let devtools = TcpStream::from_std(devtools).unwrap();
        let (socket, _) = tokio_tungstenite::client_async(url.as_str(), devtools)
            .await
            .expect("the DevTools WebSocket handshake");
        Self {
            child,
            socket,
            next_id: 1,
            _profile: profile,
        }
    }

    /// Sends `method` with `params` (to the tab of `session`, if given) and returns its result;
    /// a protocol error fails the test.
    pub async fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("sending a DevTools command");
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let message = self
                    .socket
                    .next()
                    .await
                    .expect("Chromium closed the DevTools connection")
                    .expect("reading from the DevTools connection");
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                if value["id"] == json!(id) {
                    return value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
        assert!(answer.get("error").is_none(), "{method}: {}", answer["error"]);
        answer["result"].clone()
    }

    /// Opens `url` in a new tab and attaches to it.
    pub async fn open(&mut self, url: &str) -> Page {
        let target = self
            .call("Target.createTarget", json!({ "url": url }), None)
            .await;
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
                None,
            )
            .await;
        Page {
            session: attached["sessionId"].as_str().expect("a session id").to_owned(),
        }
    }

    /// The value of a JavaScript `expression` evaluated in `page`.
    pub async fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
                Some(&page.session),
            )
            .await;
        result["result"]["value"].clone()
    }
}

impl Page {
    /// The DevTools session attached to the tab, for [`Browser::call`].
    pub fn session(&self) -> &str {
        &self.session
    }

    /// What the page shows: `document.body.innerText` (empty while there is no body).
    pub async fn text(&self, browser: &mut Browser) -> String {
        let value = browser
            .eval(self, "document.body ? document.body.innerText : ''")
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }
}

/// `--ignore-certificate-errors-spki-list=<base64 SHA-256 of the SPKI>` for the certificate in
/// `pem`: Chromium accepts a chain that holds this key, as if its CA were trusted.
pub fn spki_flag(pem: &str) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("an X.509 certificate");
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.tbs_certificate.subject_pki.raw);
    format!(
        "--ignore-certificate-errors-spki-list={}",
        data_encoding::BASE64.encode(digest.as_ref())
    )
}

/// Waits for Chromium to write its DevTools port and path (blocking: this runs on the thread
/// inside Chromium's namespace).
fn devtools_endpoint(file: &PathBuf) -> (u16, String) {
    for _ in 0..400 {
        if let Ok(text) = std::fs::read_to_string(file)
            && let Some((port, path)) = text.split_once('\n')
            && !path.trim().is_empty()
        {
            return (port.trim().parse().unwrap(), path.trim().to_owned());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("Chromium wrote no {} within 10 s", file.display());
}
