//! The etcd store over TLS with client certificates, and with etcd's password authentication,
//! against real etcd members: what `[store] ca`, `cert`, `key`, `username` and `password_file`
//! promise. A relay config without the client certificate, or with a wrong password, gets a
//! clear error and changes nothing.
use std::process::Command;

use sluice_tests::etcd::EtcdCluster;
use sluice_tests::pki::CertSet;
use sluice_tests::process::sluice_binary;
use sluice_tests::world::write;

fn sluice(args: &[&str], config: &std::path::Path) -> (bool, String, String) {
    let output = Command::new(sluice_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const TUNNEL: &str =
    "[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = \"relay-cert.pem\"\nkey = \"relay-key.pem\"\n";

#[test]
fn tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    let server = CertSet::issue(dir.path(), "etcd", &["localhost"]);
    let client = CertSet::issue(dir.path(), "client", &["sluice-relay"]);
    let cluster = EtcdCluster::start_tls(&server, &client.ca_pem);
    let endpoints = cluster.endpoints_https();
    let tls = format!(
        "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        server.ca_pem.display(),
        client.cert_pem.display(),
        client.key_pem.display()
    );
    let good = write(
        dir.path(),
        "good.toml",
        &format!("{TUNNEL}{}", EtcdCluster::store_toml(&endpoints, &tls)),
    );
    let (ok, _, stderr) = sluice(&["tenant", "add", "acme", "--hostname", "app.acme.test"], &good);
    assert!(ok, "{stderr}");
    let (ok, listed, stderr) = sluice(&["tenant", "list"], &good);
    assert!(
        ok && listed.starts_with("acme\tapp.acme.test"),
        "{listed}{stderr}"
    );

    // Without the client certificate etcd refuses the connection.
    let no_cert = format!("ca = \"{}\"\n", server.ca_pem.display());
    let bad = write(
        dir.path(),
        "bad.toml",
        &format!("{TUNNEL}{}", EtcdCluster::store_toml(&endpoints, &no_cert)),
    );
    let (ok, _, stderr) = sluice(&["tenant", "add", "evil", "--hostname", "evil.test"], &bad);
    assert!(!ok);
    assert!(stderr.contains("etcd"), "{stderr}");
    // Nor does a CA that did not issue the members' certificates get through.
    let wrong_ca = format!(
        "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        client.ca_pem.display(),
        client.cert_pem.display(),
        client.key_pem.display()
    );
    let bad = write(
        dir.path(),
        "wrong-ca.toml",
        &format!("{TUNNEL}{}", EtcdCluster::store_toml(&endpoints, &wrong_ca)),
    );
    let (ok, _, _) = sluice(&["tenant", "list"], &bad);
    assert!(!ok);
    let (_, listed, _) = sluice(&["tenant", "list"], &good);
    assert!(!listed.contains("evil"), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication() {
    let cluster = EtcdCluster::start(1);
    let mut root = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    root.user_add("root", "root-secret", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    root.auth_enable().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    CertSet::issue(dir.path(), "relay", &["relay.sluice.test"]);
    std::fs::write(dir.path().join("good.password"), "root-secret\n").unwrap();
    std::fs::write(dir.path().join("bad.password"), "guess\n").unwrap();
    let config = |password: &str| {
        write(
            dir.path(),
            &format!("{password}.toml"),
            &format!(
                "{TUNNEL}{}",
                EtcdCluster::store_toml(
                    &cluster.endpoints(),
                    &format!("username = \"root\"\npassword_file = \"{password}.password\"\n")
                )
            ),
        )
    };
    let (good, bad) = (config("good"), config("bad"));
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
        sluice(&["tenant", "add", "acme", "--hostname", "app.acme.test"], &good)
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || sluice(&["tenant", "list"], &bad))
        .await
        .unwrap();
    assert!(!ok);
    assert!(stderr.contains("authentication failed"), "{stderr}");
}
