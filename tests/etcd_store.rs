//! The etcd store against a real single-member etcd (Debian's `etcd`, started in a temp dir):
//!
//! - concurrent writers (two store handles, as two relays) never give one hostname to two
//!   tenants, and never leave a token behind a tenant removed while it was being created;
//! - writes of one record land under concurrency, keep the rest of the record, and refuse
//!   unknown records;
//! - two relays in one process share L7 bans (decided on one, enforced on the other) and
//!   operator bans (lifted on one, lifted on the other), and register their presence;
//! - the CLI reports an unreachable etcd, and a fleet command on the file store, clearly;
//! - agents enrolled through one relay are held to their token's `max_agents`, approved, renewed
//!   and revoked for the whole fleet.
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sluice::admin::client::AdminClient;
use sluice::config::relay::RelayConfig;
use sluice::hostname::HostPattern;
use sluice::relay::Relay;
use sluice::store::StoreError;
use sluice::store::etcd::EtcdStore;
use sluice_tests::etcd::EtcdCluster;
use sluice_tests::pki::CertSet;
use sluice_tests::process::{free_port, sluice_binary};
use sluice_tests::world::{eventually, write};

fn store_config(dir: &std::path::Path, cluster: &EtcdCluster) -> std::path::PathBuf {
    CertSet::issue(dir, "relay", &["relay.sluice.test"]);
    write(
        dir,
        "store.toml",
        &format!(
            "[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\nagent_auth = \"token\"\n{}",
            EtcdCluster::store_toml(&cluster.endpoints(), "")
        ),
    )
}

fn etcd_store(path: &std::path::Path) -> EtcdStore {
    EtcdStore::new(&RelayConfig::load(path).unwrap().store).unwrap()
}

/// Writes of one record (a tenant's stream limit, a token's revocation) read it, change it and
/// write it back only if nobody wrote it meanwhile: concurrent writers on two handles all land,
/// each at a revision of its own, the rest of the record kept; unknown records are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_record_writes_land_keep_the_rest_and_refuse_unknown_records() {
    let cluster = EtcdCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(dir.path(), &cluster);
    let relays = [Arc::new(etcd_store(&config)), Arc::new(etcd_store(&config))];
    relays[0]
        .add_tenant("acme", &[HostPattern::parse("app.acme.test").unwrap()])
        .await
        .unwrap();

    let mut writers = tokio::task::JoinSet::new();
    for i in 0..8u32 {
        let store = Arc::clone(&relays[i as usize % 2]);
        writers.spawn(async move { store.set_max_streams("acme", Some(i + 1)).await });
    }
    let mut revisions = Vec::new();
    while let Some(written) = writers.join_next().await {
        let (tenant, revision) = written.unwrap().unwrap();
        assert_eq!(tenant.hostnames.len(), 1, "the rest of the record is kept");
        revisions.push(revision);
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 8, "each write landed at a revision of its own");
    let (snapshot, _, _) = relays[1].load().await.unwrap();
    let limit = snapshot.tenants["acme"].max_streams.unwrap();
    assert!((1..=8).contains(&limit), "{limit}");
    assert!(matches!(
        relays[0].set_max_streams("nobody", Some(1)).await,
        Err(StoreError::UnknownTenant { .. })
    ));

    let (issued, _) = relays[0].create_token("acme", "agent", None).await.unwrap();
    let (revoked, at) = relays[1].revoke_token(&issued.record.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    let (again, _) = relays[0].revoke_token(&issued.record.id).await.unwrap();
    assert_eq!(
        again.revoked_at, revoked.revoked_at,
        "revoking twice changes nothing"
    );
    let (snapshot, _, revision) = relays[0].load().await.unwrap();
    assert!(revision >= at);
    assert!(snapshot.tokens[&issued.record.id].revoked_at.is_some());
    assert!(matches!(
        relays[0].revoke_token("0000000000000000").await,
        Err(StoreError::UnknownToken { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_give_one_hostname_to_two_tenants() {
    let cluster = EtcdCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let config = store_config(dir.path(), &cluster);
    let relays = [Arc::new(etcd_store(&config)), Arc::new(etcd_store(&config))];

    for round in 0..3 {
        // Twelve writers at once, half of them on each "relay", all claiming names that
        // overlap: the exact name, or the wildcard over it.
        let mut writers = tokio::task::JoinSet::new();
        for i in 0..12 {
            let store = Arc::clone(&relays[i % 2]);
            let hostname = if i % 2 == 0 {
                format!("app.shared{round}.test")
            } else {
                format!("*.shared{round}.test")
            };
            writers.spawn(async move {
                let pattern = HostPattern::parse(&hostname).unwrap();
                store.add_tenant(&format!("t{round}-{i}"), &[pattern]).await
            });
        }
        let mut won = 0;
        while let Some(result) = writers.join_next().await {
            match result.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::HostnameTaken { .. }) => {}
                Err(e) => panic!("unexpected refusal: {e}"),
            }
        }
        assert_eq!(won, 1, "round {round}: one tenant, and only one, owns the name");
    }
    let (snapshot, _, _) = relays[0].load().await.unwrap();
    assert_eq!(snapshot.tenants.len(), 3);

    // A tenant removed while tokens are being created for it leaves none behind.
    relays[0]
        .add_tenant("gone", &[HostPattern::parse("gone.test").unwrap()])
        .await
        .unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = Arc::clone(&relays[i % 2]);
        writers.spawn(async move {
            if i == 8 {
                store.remove_tenant("gone").await.map(|_| ())
            } else {
                store
                    .create_token("gone", &format!("agent-{i}"), None)
                    .await
                    .map(|_| ())
            }
        });
    }
    while let Some(result) = writers.join_next().await {
        match result.unwrap() {
            Ok(()) | Err(StoreError::UnknownTenant { .. }) => {}
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    let (snapshot, _, _) = relays[1].load().await.unwrap();
    assert!(!snapshot.tenants.contains_key("gone"));
    let orphans: Vec<_> = snapshot
        .tokens
        .values()
        .filter(|t| !snapshot.tenants.contains_key(&t.tenant))
        .collect();
    assert!(orphans.is_empty(), "tokens outlived their tenant: {orphans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_share_l7_and_operator_bans_and_register_their_presence() {
    let cluster = EtcdCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let relay_toml = |id: &str| {
        let path = write(
            dir.path(),
            &format!("{id}.toml"),
            &format!(
                "[edge]\ntls_listen = [\"127.0.0.1:0\"]\nhttp_listen = []\n\
                 [tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\nagent_auth = \"token\"\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n[shield]\nabuse_threshold = 2\nban_duration = \"1h\"\n{}",
                EtcdCluster::store_toml(&cluster.endpoints(), &format!("relay_id = \"{id}\"\n"))
            ),
        );
        RelayConfig::load(&path).unwrap()
    };
    let relay_a = Relay::start(relay_toml("relay-a")).await.unwrap();
    let relay_b = Relay::start(relay_toml("relay-b")).await.unwrap();
    let etcd = EtcdStore::new(&relay_toml("cli").store).unwrap();
    let ids = |relays: Vec<sluice::store::RelayPresence>| {
        let mut ids: Vec<String> = relays.into_iter().map(|r| r.id).collect();
        ids.sort();
        ids
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ids(etcd.relays().await.unwrap()) != ["relay-a", "relay-b"] {
        assert!(tokio::time::Instant::now() < deadline, "both relays register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Garbage on A's TLS port from 127.0.0.3: A bans it, and so does B.
    let offender: IpAddr = "127.0.0.3".parse().unwrap();
    let edge_a = relay_a.tls_addrs[0];
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(offender, 0)).unwrap();
        if let Ok(mut tcp) = socket.connect(edge_a).await {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let _ = tcp
                .write_all(b"\x16\x03\x01\x00\x05garbage-not-a-client-hello")
                .await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
        }
    }
    eventually(Duration::from_secs(3), || relay_a.shield().is_banned(offender)).await;
    eventually(Duration::from_secs(3), || relay_b.shield().is_banned(offender)).await;
    let bystander: IpAddr = "127.0.0.4".parse().unwrap();
    assert!(!relay_b.shield().is_banned(bystander));

    // An operator ban through A's admin API, lifted through A: B follows both ways.
    let admin_a = format!("http://{}", relay_a.admin_addr);
    let call = |method: &'static str, path: &'static str| {
        let base = admin_a.clone();
        tokio::task::spawn_blocking(move || AdminClient::new(&base, None).request(method, path).unwrap())
    };
    let banned = call("POST", "/api/bans/127.0.0.9").await.unwrap();
    assert_eq!(banned.status, 200, "{}", banned.body);
    let operator_banned: IpAddr = "127.0.0.9".parse().unwrap();
    eventually(Duration::from_secs(3), || {
        relay_b.shield().is_banned(operator_banned)
    })
    .await;
    let lifted = call("DELETE", "/api/bans/127.0.0.9").await.unwrap();
    assert_eq!(lifted.status, 200, "{}", lifted.body);
    eventually(Duration::from_secs(3), || {
        !relay_b.shield().is_banned(operator_banned)
    })
    .await;

    // A relay that stops leaves the fleet at once (its lease is revoked).
    relay_b.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while ids(etcd.relays().await.unwrap()) != ["relay-a"] {
        assert!(tokio::time::Instant::now() < deadline, "relay-b leaves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay_a.shutdown().await;
}

#[test]
fn the_cli_says_when_etcd_is_unreachable_or_not_configured() {
    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let closed = free_port();
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\nagent_auth = \"token\"\n{}",
            EtcdCluster::store_toml(&[format!("http://127.0.0.1:{closed}")], "")
        ),
    );
    let output = Command::new(sluice_binary())
        .args(["token", "revoke", "0123456789abcdef", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("etcd store is unreachable") && stderr.contains(&closed.to_string()),
        "{stderr}"
    );

    let file = write(
        dir.path(),
        "file.toml",
        "state_dir = \"state\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\nagent_auth = \"token\"\n",
    );
    let output = Command::new(sluice_binary())
        .args(["relays", "list", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("needs the etcd store"), "{stderr}");
    let _ = std::io::stderr().flush();
}

/// Agent records live in etcd like tenants and tokens: a token's `max_agents` holds across
/// relays, the tenant approves through the CLI, a renewal on one relay is recorded for all, and
/// a revocation through one relay's admin API cuts the agent's tunnel on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enrolled_through_one_relay_are_approved_renewed_and_revoked_fleet_wide() {
    use sluice::agent::{Agent, LinkState};
    use sluice::store::AgentState;

    let cluster = EtcdCluster::start(1);
    let dir = tempfile::tempdir().unwrap();
    let relay_pki = CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    sluice::relay::agent_ca::init(
        &dir.path().join("agent-ca.pem"),
        &dir.path().join("agent-ca-key.pem"),
    )
    .unwrap();
    let relay_toml = |id: &str| {
        write(
            dir.path(),
            &format!("{id}.toml"),
            &format!(
                "store_poll = \"200ms\"\n[edge]\ntls_listen = [\"127.0.0.1:0\"]\nhttp_listen = []\n\
                 [tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
                 agent_ca_cert = \"agent-ca.pem\"\nagent_ca_key = \"agent-ca-key.pem\"\nagent_cert_ttl = \"3s\"\nheartbeat = \"1s\"\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n{}",
                EtcdCluster::store_toml(&cluster.endpoints(), &format!("relay_id = \"{id}\"\n"))
            ),
        )
    };
    let (path_a, path_b) = (relay_toml("relay-a"), relay_toml("relay-b"));
    let etcd = etcd_store(&path_a);
    etcd.add_tenant("acme", &[HostPattern::parse("app.acme.test").unwrap()])
        .await
        .unwrap();
    let token = etcd.create_token("acme", "office", None).await.unwrap().0.token;
    let relay_a = Relay::start(RelayConfig::load(&path_a).unwrap()).await.unwrap();
    let relay_b = Relay::start(RelayConfig::load(&path_b).unwrap()).await.unwrap();
    let agent = |name: &str, relay: &Relay| {
        let toml = format!(
            "name = \"{name}\"\nstate_dir = \"{name}-state\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"300ms\"\n\
             [[relays]]\naddress = \"{}\"\nserver_name = \"relay.sluice.test\"\nca = \"{}\"\n\
             [[routes]]\nhostname = \"app.acme.test\"\ntarget = \"127.0.0.1:9\"\n",
            relay.tunnel_addr,
            relay_pki.ca_pem.display()
        );
        let config =
            sluice::config::agent::AgentConfig::load(&write(dir.path(), &format!("{name}.toml"), &toml))
                .unwrap();
        Agent::start(&config, Some(token.clone())).unwrap()
    };
    let first = agent("first", &relay_a);
    tokio::time::timeout(
        Duration::from_secs(10),
        first.wait_for_link(0, |s| matches!(s, LinkState::Connected { .. })),
    )
    .await
    .expect("the first agent enrolls and connects through relay A");
    let agents = etcd.load().await.unwrap().0.agents;
    assert_eq!(agents.len(), 1);
    let first_record = agents.values().next().unwrap().clone();
    assert_eq!(first_record.state, AgentState::Active);

    // The token copied to a second machine, enrolling through relay B: pending.
    let second = agent("second", &relay_b);
    tokio::time::timeout(
        Duration::from_secs(10),
        second.wait_for_link(0, |s| matches!(s, LinkState::Pending { .. })),
    )
    .await
    .expect("the second machine waits for approval");
    let LinkState::Pending { agent: pending } = second.links()[0].clone() else {
        unreachable!()
    };
    let approve = Command::new(sluice_binary())
        .args(["agents", "approve", &pending, "--config"])
        .arg(&path_a)
        .output()
        .unwrap();
    assert!(
        approve.status.success(),
        "{}",
        String::from_utf8_lossy(&approve.stderr)
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        second.wait_for_link(0, |s| matches!(s, LinkState::Connected { .. })),
    )
    .await
    .expect("approved, it connects");

    // Renewed at half-life through relay A; the new expiry is in etcd.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let record = etcd.load().await.unwrap().0.agents[&first_record.id].clone();
        if record.cert_serial != first_record.cert_serial {
            assert!(record.cert_expires_at > first_record.cert_expires_at);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewed within its lifetime"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Revoked through relay B's admin API: relay A cuts the first agent's tunnel.
    let admin_b = format!("http://{}", relay_b.admin_addr);
    let path = format!("/api/agents/{}/revoke", first_record.id);
    let revoked =
        tokio::task::spawn_blocking(move || AdminClient::new(&admin_b, None).request("POST", &path).unwrap())
            .await
            .unwrap();
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    eventually(Duration::from_secs(3), || relay_a.sessions().is_empty()).await;
    tokio::time::timeout(
        Duration::from_secs(10),
        first.wait_for_link(
            0,
            |s| matches!(s, LinkState::Rejected(r) if r.contains("revoked")),
        ),
    )
    .await
    .expect("the revoked agent is refused");
    assert_eq!(relay_b.sessions().len(), 1, "the approved agent stays");
    first.shutdown(Duration::ZERO).await;
    second.shutdown(Duration::ZERO).await;
    relay_a.shutdown().await;
    relay_b.shutdown().await;
}
