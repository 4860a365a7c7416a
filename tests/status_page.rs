//! The relay's status page (`/status` on the admin listener) in a real browser: headless
//! Chromium, authenticated like every admin request (the admin token as the Basic password),
//! shows the tenant and its hostnames, the connected agent with its address and key fingerprint, the live stream
//! count, a ban with its remaining time and the shield's mode; pressing the ban's "lift" button
//! lifts it. Without the token the page is refused, and a lift form that did not come from the
//! page (no anti-forgery value) changes nothing.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use sluice_tests::browser::{Browser, Page};
use sluice_tests::client::{ask, connect};
use sluice_tests::servers::tls_echo;
use sluice_tests::world::{RelayOptions, World, passthrough_route, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SNI: &str = "app.acme.test";
const TOKEN: &str = "status-page-token";

/// One HTTP/1.1 request to the admin listener; the whole response as text.
async fn admin_request(admin: SocketAddr, head: &str, body: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(
        format!(
            "{head}\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    response
}

/// The page's text once `done` holds for it (reloading it as the browser would).
async fn page_until(browser: &mut Browser, page: &Page, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = page.text(browser).await;
        if done(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never got there; it shows:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_live_relay_and_lifts_a_ban_in_a_real_browser() {
    let world = World::start(RelayOptions {
        admin_token: Some(TOKEN),
        ..RelayOptions::default()
    })
    .await;
    let (acme, token) = world.tenant("acme", &[SNI, "*.acme.test"], &[SNI]);
    let app = tls_echo("app", acme.server_config()).await;
    let _agent = world
        .agent(
            &world.agent_config("acme-1", &passthrough_route(SNI, app.addr)),
            &token,
        )
        .await;
    // A stream held open through the relay, and a banned source.
    let (mut stream, _) = connect(world.tls_addr(), SNI, acme.client_config())
        .await
        .unwrap();
    assert_eq!(ask(&mut stream, "hi").await.unwrap(), "app: hi");
    let banned: IpAddr = "203.0.113.7".parse().unwrap();
    world
        .relay()
        .shield()
        .ban(banned, Some(Duration::from_secs(600)))
        .unwrap();
    let admin = world.admin_addr();

    // The same auth as the API: nothing without the token, and a browser is asked for it.
    let refused = admin_request(admin, "GET /status HTTP/1.1", "").await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused.contains("www-authenticate: Basic realm=\"sluice admin\""),
        "{refused}"
    );

    let log = world.path("chromium-status.log");
    let mut browser = Browser::launch(&[], &log, &[admin]).await;
    let page = browser.open("about:blank").await;
    let basic = data_encoding::BASE64.encode(format!("sre:{TOKEN}").as_bytes());
    let session = Some(page.session().to_owned());
    browser
        .call("Network.enable", json!({}), session.as_deref())
        .await;
    browser
        .call(
            "Network.setExtraHTTPHeaders",
            json!({ "headers": { "Authorization": format!("Basic {basic}") } }),
            session.as_deref(),
        )
        .await;
    browser
        .call(
            "Page.navigate",
            json!({ "url": format!("http://{admin}/status") }),
            session.as_deref(),
        )
        .await;
    let text = page_until(&mut browser, &page, |t| t.contains("Bans (1)")).await;
    let snapshot = world.store.load().unwrap();
    let enrolled = snapshot.agents.values().next().expect("the agent enrolled");
    for expected in [
        enrolled.key_sha256.as_str(),
        "Sluice relay",
        "acme",
        "app.acme.test (served)",
        "*.acme.test (offline)",
        "acme/acme-1/",
        "127.0.0.1:",
        "203.0.113.7",
        "userspace fallback",
    ] {
        assert!(text.contains(expected), "{expected:?} not on the page:\n{text}");
    }
    let streams = browser
        .eval(&page, "document.getElementById('streams').innerText")
        .await;
    assert_eq!(streams, json!("1"), "the open stream is counted:\n{text}");
    let remaining = text
        .lines()
        .find(|l| l.contains("203.0.113.7"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        remaining.contains("9m") || remaining.contains("10m"),
        "{remaining}"
    );

    // Not cacheable, not frameable, nothing loaded from elsewhere, refreshed every 5 s.
    let served = admin_request(
        admin,
        &format!("GET /status HTTP/1.1\r\nAuthorization: Bearer {TOKEN}"),
        "",
    )
    .await
    .to_ascii_lowercase();
    assert!(served.starts_with("http/1.1 200"), "{served}");
    for expected in [
        "cache-control: no-store",
        "default-src 'none'",
        "frame-ancestors 'none'",
        "<meta http-equiv=\"refresh\" content=\"5\">",
    ] {
        assert!(served.contains(expected), "{expected:?} missing:\n{served}");
    }
    assert!(!served.contains("<script"), "{served}");

    // A lift that did not come from the page is refused, even with the token.
    let forged = admin_request(
        admin,
        &format!("POST /status/lift HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/x-www-form-urlencoded"),
        "source=203.0.113.7",
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 403"), "{forged}");
    assert!(world.relay().shield().is_banned(banned));

    // The button lifts it.
    browser
        .eval(
            &page,
            "document.querySelector('form[data-source=\"203.0.113.7\"] button').click()",
        )
        .await;
    let text = page_until(&mut browser, &page, |t| t.contains("Bans (0)")).await;
    assert!(!text.contains("203.0.113.7"), "{text}");
    within(Duration::from_secs(5), async {
        while world.relay().shield().is_banned(banned) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Closing the stream shows on the next render.
    drop(stream);
    let text = page_until(&mut browser, &page, |t| t.contains("live streams\t0")).await;
    assert!(text.contains("Agents (1)"), "{text}");
}
