//! The status page (`GET /status` on the admin listener): what an SRE looks at first. Plain
//! HTML rendered on the server from a [`StatusView`] (no script, no external asset), refreshed
//! by the browser every few seconds.
//!
//! Lifting a ban is a form POST to `/status/lift`, authenticated like every admin request, and
//! carrying the page's anti-forgery value: a page of another site can make the browser send the
//! POST (with its cached credentials) but cannot read this page to learn the value.
use std::fmt::Write as _;
use std::time::Duration;

/// Everything the page shows, gathered at request time.
#[derive(Debug, Default)]
pub struct StatusView {
    /// This relay's id in the fleet (the host name unless configured).
    pub relay_id: String,
    /// The relay's version.
    pub version: &'static str,
    /// How long the relay has run.
    pub uptime: Duration,
    /// Tenants with their hostnames, sorted by name.
    pub tenants: Vec<TenantStatus>,
    /// Live agent sessions, sorted by id.
    pub agents: Vec<AgentStatus>,
    /// Browser connections open now, by edge listener (`tls`, `http`).
    pub connections: Vec<(&'static str, i64)>,
    /// Bans, sorted by source.
    pub bans: Vec<BanStatus>,
    /// `XDP on eth0 (driver)`, or the userspace fallback and why.
    pub shield_mode: String,
    /// The kernel's verdict counters (packets), by reason; empty without XDP.
    pub shield_counters: Vec<(&'static str, u64)>,
    /// Bans decided by the kernel, from L7 abuse, and connections the gate refused.
    pub shield_stats: [(&'static str, u64); 3],
    /// The store has not answered for a while: routing goes on from the last snapshot.
    pub store_stale: bool,
}

/// One tenant on the page.
#[derive(Debug)]
pub struct TenantStatus {
    /// Its name.
    pub name: String,
    /// Its hostnames, each with whether an agent serves it now.
    pub hostnames: Vec<(String, bool)>,
    /// Streams its agents carry now.
    pub streams: usize,
}

/// One agent session on the page.
#[derive(Debug)]
pub struct AgentStatus {
    /// The session id, `tenant/agent-name/random`.
    pub id: String,
    /// The tenant it serves.
    pub tenant: String,
    /// Where its control connection comes from.
    pub address: Option<std::net::SocketAddr>,
    /// The fingerprint of its certificate, when it presented one.
    pub fingerprint: Option<String>,
    /// How long it has been connected.
    pub uptime: Duration,
    /// Streams it carries now.
    pub streams: usize,
    /// Idle data connections it holds ready.
    pub idle: usize,
}

/// One ban on the page.
#[derive(Debug)]
pub struct BanStatus {
    /// The banned source as shown (`203.0.113.7`, `2001:db8::/64`).
    pub source: String,
    /// An address inside it, which the lift form sends.
    pub address: std::net::IpAddr,
    /// Time left; `None` for a ban without expiry.
    pub remaining: Option<Duration>,
}

/// The page for `view`; `csrf` goes into each lift form.
pub fn render(view: &StatusView, csrf: &str) -> String {
    let mut page = String::with_capacity(8192);
    let streams: usize = view.agents.iter().map(|a| a.streams).sum();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>Sluice relay {id}</title><style>{STYLE}</style></head><body>\
         <h1>Sluice relay {id}</h1><p class=\"meta\">version {version}, up {uptime}{stale}</p>",
        id = escape(&view.relay_id),
        version = escape(view.version),
        uptime = human(view.uptime),
        stale = if view.store_stale {
            " &middot; <strong>store unreachable: routing from the last snapshot</strong>"
        } else {
            ""
        },
    );

    let _ = write!(
        page,
        "<h2>Traffic</h2><table><tr><th>live streams</th><td id=\"streams\">{streams}</td></tr>"
    );
    for (listener, open) in &view.connections {
        let _ = write!(
            page,
            "<tr><th>open {listener} connections</th><td>{open}</td></tr>"
        );
    }
    page.push_str("</table>");

    page.push_str("<h2>Tenants</h2>");
    if view.tenants.is_empty() {
        page.push_str("<p>none</p>");
    } else {
        page.push_str("<table><tr><th>tenant</th><th>hostnames</th><th>streams</th></tr>");
        for tenant in &view.tenants {
            let names: Vec<String> = tenant
                .hostnames
                .iter()
                .map(|(name, served)| {
                    let state = if *served { "served" } else { "offline" };
                    format!("<span class=\"{state}\">{} ({state})</span>", escape(name))
                })
                .collect();
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&tenant.name),
                names.join("<br>"),
                tenant.streams
            );
        }
        page.push_str("</table>");
    }

    let _ = write!(page, "<h2>Agents ({})</h2>", view.agents.len());
    if view.agents.is_empty() {
        page.push_str("<p>none connected</p>");
    } else {
        page.push_str(
            "<table><tr><th>agent</th><th>tenant</th><th>address</th><th>fingerprint</th>\
             <th>connected for</th><th>streams</th><th>idle data connections</th></tr>",
        );
        for agent in &view.agents {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&agent.id),
                escape(&agent.tenant),
                agent.address.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                agent
                    .fingerprint
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), escape),
                human(agent.uptime),
                agent.streams,
                agent.idle
            );
        }
        page.push_str("</table>");
    }

    let _ = write!(page, "<h2>Bans ({})</h2>", view.bans.len());
    if view.bans.is_empty() {
        page.push_str("<p>none</p>");
    } else {
        page.push_str("<table><tr><th>source</th><th>remaining</th><th></th></tr>");
        for ban in &view.bans {
            let _ = write!(
                page,
                "<tr><td>{source}</td><td>{remaining}</td><td>\
                 <form method=\"post\" action=\"/status/lift\" data-source=\"{source}\">\
                 <input type=\"hidden\" name=\"source\" value=\"{address}\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <button type=\"submit\">lift</button></form></td></tr>",
                source = escape(&ban.source),
                remaining = ban.remaining.map_or_else(|| "until lifted".to_owned(), human),
                address = ban.address,
                csrf = escape(csrf),
            );
        }
        page.push_str("</table>");
    }

    let _ = write!(
        page,
        "<h2>Shield</h2><p id=\"shield-mode\">{}</p><table>",
        escape(&view.shield_mode)
    );
    for (what, count) in view.shield_stats.iter().chain(&view.shield_counters) {
        let _ = write!(page, "<tr><th>{what}</th><td>{count}</td></tr>");
    }
    page.push_str("</table></body></html>\n");
    page
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin-bottom:1em}\
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}\
.meta{color:#666}.offline{color:#a00}.served{color:#070}.mono{font-family:monospace}";

/// `text` safe inside HTML text and double-quoted attributes.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
fn human(duration: Duration) -> String {
    let s = duration.as_secs();
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// The lift form's fields, from its `application/x-www-form-urlencoded` body: `(source, csrf)`.
pub fn lift_form(body: &[u8]) -> (Option<String>, Option<String>) {
    let (mut source, mut csrf) = (None, None);
    for (key, value) in form_urlencoded::parse(body) {
        match key.as_ref() {
            "source" => source = Some(value.into_owned()),
            "csrf" => csrf = Some(value.into_owned()),
            _ => {}
        }
    }
    (source, csrf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> StatusView {
        StatusView {
            relay_id: "edge-1".into(),
            version: "0.1.0",
            uptime: Duration::from_secs(3725),
            tenants: vec![TenantStatus {
                name: "acme".into(),
                hostnames: vec![("app.acme.test".into(), true), ("*.acme.test".into(), false)],
                streams: 2,
            }],
            agents: vec![AgentStatus {
                id: "acme/<script>/x1".into(),
                tenant: "acme".into(),
                address: Some("192.0.2.7:50000".parse().unwrap()),
                fingerprint: None,
                uptime: Duration::from_secs(65),
                streams: 2,
                idle: 4,
            }],
            connections: vec![("tls", 3)],
            bans: vec![BanStatus {
                source: "2001:db8::/64".into(),
                address: "2001:db8::".parse().unwrap(),
                remaining: Some(Duration::from_secs(590)),
            }],
            shield_mode: "userspace fallback: no [shield] interfaces configured".into(),
            shield_counters: Vec::new(),
            shield_stats: [("kernel bans", 0), ("abuse bans", 1), ("refused at accept", 5)],
            store_stale: false,
        }
    }

    #[test]
    fn the_page_shows_every_section_and_escapes_what_it_shows() {
        let page = render(&view(), "c5rf");
        for expected in [
            "Sluice relay edge-1",
            "up 1h 2m",
            "app.acme.test (served)",
            "*.acme.test (offline)",
            "acme/&lt;script&gt;/x1",
            "192.0.2.7:50000",
            "1m 5s",
            "<td id=\"streams\">2</td>",
            "open tls connections</th><td>3",
            "2001:db8::/64",
            "9m 50s",
            "name=\"source\" value=\"2001:db8::\"",
            "name=\"csrf\" value=\"c5rf\"",
            "no [shield] interfaces configured",
            "refused at accept</th><td>5",
        ] {
            assert!(page.contains(expected), "{expected} missing from\n{page}");
        }
        assert!(!page.contains("<script>"), "agent names are escaped");
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external asset"
        );
    }

    #[test]
    fn the_lift_form_is_decoded() {
        assert_eq!(
            lift_form(b"source=2001%3Adb8%3A%3A&csrf=ab+c"),
            (Some("2001:db8::".into()), Some("ab c".into()))
        );
        assert_eq!(lift_form(b"garbage"), (None, None));
    }

    #[test]
    fn durations_read_like_a_person_wrote_them() {
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(250)), "4m 10s");
        assert_eq!(human(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(human(Duration::from_secs(273_600)), "3d 4h");
    }
}
