//! The etcd store against a real single-member etcd (Debian's `etcd`, started in a temp dir):
//!
//! - concurrent writers (two store handles, as two relays) never give one hostname to two
//!   tenants, and never leave a token behind a tenant removed while it was being created;
//! - two relays in one process share L7 bans (decided on one, enforced on the other) and
//!   operator bans (lifted on one, lifted on the other), and register their presence;
//! - the CLI reports an unreachable etcd, and a fleet command on the file store, clearly.
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
            "[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n{}",
            EtcdCluster::store_toml(&cluster.endpoints(), "")
        ),
    )
}

fn etcd_store(path: &std::path::Path) -> EtcdStore {
    EtcdStore::new(&RelayConfig::load(path).unwrap().store).unwrap()
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
                 [tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n\
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
            "[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n{}",
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
        "state_dir = \"state\"\n[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n",
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
