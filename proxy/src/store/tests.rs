//! Tests of the store: tenants, overlap refusal, tokens, the file, and concurrent writers.
use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-store-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        TestDir(dir)
    }

    /// The state dir: a not-yet-existing child, so `open` has to create it.
    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn p(s: &str) -> HostPattern {
    HostPattern::parse(s).unwrap()
}

fn ps(v: &[&str]) -> Vec<HostPattern> {
    v.iter().map(|s| p(s)).collect()
}

fn open() -> (TestDir, Store) {
    let dir = TestDir::new();
    let store = Store::open(&dir.state()).unwrap();
    (dir, store)
}

/// A store with tenant `acme` owning `*.acme.test` and `acme.test`.
fn with_acme() -> (TestDir, Store) {
    let (dir, store) = open();
    store
        .add_tenant("acme", &ps(&["*.acme.test", "acme.test"]))
        .unwrap();
    (dir, store)
}

#[test]
fn open_creates_a_private_dir_and_an_empty_store() {
    let (dir, store) = open();
    let meta = fs::metadata(dir.state()).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(store.path(), dir.state().join("store.json"));
    assert_eq!(store.dir(), dir.state());
    assert!(!store.path().exists(), "open writes nothing");
    assert_eq!(store.load().unwrap(), Snapshot::default());
    assert_eq!(store.fingerprint().unwrap(), None);
    // Opening again is fine.
    Store::open(&dir.state()).unwrap();
}

#[test]
fn open_fails_on_a_file_in_the_way() {
    let dir = TestDir::new();
    fs::create_dir_all(&dir.0).unwrap();
    fs::write(dir.state(), b"x").unwrap();
    let err = Store::open(&dir.state()).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&dir.state().display().to_string()),
        "{err}"
    );
}

#[test]
fn add_list_remove_tenants() {
    let (_dir, store) = open();
    let before = unix_now();
    let acme = store
        .add_tenant("acme", &ps(&["b.acme.test", "*.acme.test", "b.acme.test"]))
        .unwrap();
    assert_eq!(acme.name, "acme");
    assert_eq!(
        acme.hostnames,
        ps(&["b.acme.test", "*.acme.test"]),
        "sorted, deduplicated"
    );
    assert!(acme.created_at >= before && acme.created_at <= unix_now());
    store.add_tenant("globex-2", &ps(&["globex.test"])).unwrap();

    let snap = store.load().unwrap();
    assert_eq!(snap.tenants.keys().collect::<Vec<_>>(), ["acme", "globex-2"]);
    assert_eq!(snap.tenant("acme"), Some(&acme));
    assert_eq!(snap.tenant("nope"), None);

    store.remove_tenant("acme").unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.tenants.keys().collect::<Vec<_>>(), ["globex-2"]);
    let err = store.remove_tenant("acme").unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownTenant { name } if name == "acme"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), r#"no tenant named "acme""#);

    // The name and its hostnames are free again.
    store.add_tenant("acme", &ps(&["b.acme.test"])).unwrap();
}

#[test]
fn refuses_duplicate_tenants_and_bad_names() {
    let (_dir, store) = with_acme();
    let err = store.add_tenant("acme", &ps(&["other.test"])).unwrap_err();
    assert!(
        matches!(&err, StoreError::TenantExists { name } if name == "acme"),
        "{err:?}"
    );
    assert!(err.to_string().contains("acme"));

    let long = "a".repeat(64);
    for bad in [
        "",
        "Acme",
        "ac me",
        "acme_1",
        "-acme",
        "acme.test",
        "ä",
        long.as_str(),
    ] {
        let err = store.add_tenant(bad, &ps(&["x.test"])).unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidTenantName { name, .. } if name == bad),
            "{bad}: {err:?}"
        );
    }
    store.add_tenant(&"a".repeat(63), &ps(&["a.test"])).unwrap();
    store.add_tenant("0-9", &ps(&["b.test"])).unwrap();

    let err = store.add_tenant("empty", &[]).unwrap_err();
    assert!(
        matches!(&err, StoreError::NoHostnames { tenant } if tenant == "empty"),
        "{err:?}"
    );
    assert!(err.to_string().contains("empty"));
    assert!(store.load().unwrap().tenant("empty").is_none());
}

#[test]
fn refuses_overlapping_hostnames_across_tenants() {
    let (_dir, store) = open();
    store
        .add_tenant("acme", &ps(&["app.acme.test", "*.dev.acme.test"]))
        .unwrap();
    let cases = [
        // exact vs exact
        ("app.acme.test", "app.acme.test"),
        // exact under an owned wildcard
        ("x.dev.acme.test", "*.dev.acme.test"),
        // wildcard over an owned exact
        ("*.acme.test", "app.acme.test"),
        // wildcard vs wildcard
        ("*.dev.acme.test", "*.dev.acme.test"),
    ];
    for (wanted, owned_by_acme) in cases {
        let err = store.add_tenant("evil", &ps(&["fine.test", wanted])).unwrap_err();
        match &err {
            StoreError::HostnameTaken {
                tenant,
                hostname,
                owner,
                owned,
            } => {
                assert_eq!(tenant, "evil");
                assert_eq!(hostname, &p(wanted));
                assert_eq!(owner, "acme");
                assert_eq!(owned, &p(owned_by_acme));
            }
            other => panic!("{wanted}: unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("evil") && msg.contains("acme") && msg.contains(wanted),
            "{msg}"
        );
    }
    // Nothing was written by the refused attempts.
    assert!(store.load().unwrap().tenant("evil").is_none());

    // Non-overlapping neighbours are fine: the parent, a deeper name, a sibling wildcard.
    store
        .add_tenant(
            "neighbour",
            &ps(&[
                "acme.test",
                "a.b.dev.acme.test",
                "*.prod.acme.test",
                "dev.acme.test",
            ]),
        )
        .unwrap();
    // A tenant may hold overlapping patterns itself.
    store
        .add_tenant("self", &ps(&["*.self.test", "www.self.test"]))
        .unwrap();
}

#[test]
fn token_authenticates_and_is_bound_to_its_tenant() {
    let (_dir, store) = with_acme();
    let issued = store.create_token("acme", "agent-berlin-01", None).unwrap();
    assert!(issued.token.starts_with("sluice_"));
    assert!(issued.token.contains(&issued.record.id));
    assert_eq!(issued.record.tenant, "acme");
    assert_eq!(issued.record.label, "agent-berlin-01");
    assert_eq!(issued.record.expires_at, None);
    assert_eq!(issued.record.revoked_at, None);

    let snap = store.load().unwrap();
    assert_eq!(snap.tokens.get(&issued.record.id), Some(&issued.record));
    let ok = snap.authenticate(&issued.token, unix_now()).unwrap();
    assert_eq!(ok.token, &issued.record);
    assert_eq!(ok.tenant.name, "acme");
    let ok = snap.check_token(&issued.record.id, unix_now()).unwrap();
    assert_eq!(ok.tenant.name, "acme");
    assert_eq!(snap.tokens_of("acme").count(), 1);
    assert_eq!(snap.tokens_of("other").count(), 0);
}

#[test]
fn wrong_secret_unknown_id_and_malformed() {
    let (_dir, store) = with_acme();
    let issued = store.create_token("acme", "a1", None).unwrap();
    let snap = store.load().unwrap();
    let id = &issued.record.id;
    let now = unix_now();

    // Same id, different (well-formed) secret.
    let secret = &issued.token[issued.token.len() - 52..];
    let flipped = if secret.starts_with('a') { "b" } else { "a" };
    let wrong = format!("sluice_{id}_{flipped}{}", &secret[1..]);
    assert_eq!(
        snap.authenticate(&wrong, now).unwrap_err(),
        AuthError::WrongSecret { id: id.clone() }
    );

    // Unknown id with the right secret.
    let other_id = if id.starts_with('0') { "1" } else { "0" };
    let unknown = format!("sluice_{other_id}{}_{secret}", &id[1..]);
    let err = snap.authenticate(&unknown, now).unwrap_err();
    assert!(
        matches!(&err, AuthError::UnknownToken { id } if id.starts_with(other_id)),
        "{err:?}"
    );
    assert!(!err.to_string().contains(secret));
    assert!(matches!(
        snap.check_token("0000000000000000", now),
        Err(AuthError::UnknownToken { .. })
    ));

    for bad in [
        "",
        "sluice_",
        "sluice",
        "Bearer x",
        &issued.token[..issued.token.len() - 1],
        format!("{}x", issued.token).as_str(),
        format!("{} ", issued.token).as_str(),
        issued.token.to_uppercase().as_str(),
        issued.token.replacen("sluice_", "sluice-", 1).as_str(),
        issued.token.replacen('_', "", 1).as_str(),
    ] {
        assert_eq!(
            snap.authenticate(bad, now).unwrap_err(),
            AuthError::Malformed,
            "{bad:?}"
        );
    }
    // No error message for this token carries its secret.
    for err in [
        snap.authenticate(&wrong, now).unwrap_err(),
        snap.authenticate(&issued.token[..10], now).unwrap_err(),
    ] {
        assert!(!err.to_string().contains(secret), "{err}");
        assert!(!format!("{err:?}").contains(secret), "{err:?}");
    }
}

#[test]
fn revoked_tokens_are_refused() {
    let (_dir, store) = with_acme();
    let issued = store
        .create_token("acme", "a1", Some(Duration::from_secs(60)))
        .unwrap();
    let keep = store.create_token("acme", "a2", None).unwrap();
    let revoked = store.revoke_token(&issued.record.id).unwrap();
    let at = revoked.revoked_at.expect("revoked_at set");
    assert!(at <= unix_now());

    let snap = store.load().unwrap();
    let id = issued.record.id.clone();
    assert_eq!(
        snap.authenticate(&issued.token, unix_now()).unwrap_err(),
        AuthError::Revoked { id: id.clone() }
    );
    assert_eq!(
        snap.check_token(&id, unix_now()).unwrap_err(),
        AuthError::Revoked { id: id.clone() }
    );
    // Revoked wins over expired.
    let later = unix_now() + 3600;
    assert_eq!(
        snap.authenticate(&issued.token, later).unwrap_err(),
        AuthError::Revoked { id: id.clone() }
    );
    // Revocation is reported only to holders of the secret.
    let secret = &issued.token[issued.token.len() - 52..];
    let flipped = if secret.starts_with('a') { "b" } else { "a" };
    let wrong = format!("sluice_{id}_{flipped}{}", &secret[1..]);
    assert_eq!(
        snap.authenticate(&wrong, unix_now()).unwrap_err(),
        AuthError::WrongSecret { id: id.clone() }
    );
    // Other tokens are untouched.
    assert!(snap.authenticate(&keep.token, unix_now()).is_ok());

    // Revoking again changes nothing.
    let fp = store.fingerprint().unwrap();
    assert_eq!(store.revoke_token(&id).unwrap().revoked_at, Some(at));
    assert_eq!(store.fingerprint().unwrap(), fp, "no rewrite");

    let err = store.revoke_token("ffffffffffffffff").unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownToken { id } if id == "ffffffffffffffff"),
        "{err:?}"
    );
    assert!(err.to_string().contains("ffffffffffffffff"));
}

#[test]
fn tokens_expire() {
    let (_dir, store) = with_acme();
    let issued = store
        .create_token("acme", "short", Some(Duration::from_secs(60)))
        .unwrap();
    let created = issued.record.created_at;
    assert_eq!(issued.record.expires_at, Some(created + 60));
    let snap = store.load().unwrap();
    let id = issued.record.id.clone();
    assert!(snap.authenticate(&issued.token, created + 59).is_ok());
    assert_eq!(
        snap.authenticate(&issued.token, created + 60).unwrap_err(),
        AuthError::Expired { id: id.clone() }
    );
    assert_eq!(
        snap.check_token(&id, created + 3600).unwrap_err(),
        AuthError::Expired { id: id.clone() }
    );
    assert_eq!(
        AuthError::Expired { id: id.clone() }.to_string(),
        format!("token {id} has expired")
    );

    // Sub-second lifetimes round up; zero is refused.
    let t = store
        .create_token("acme", "tiny", Some(Duration::from_millis(1500)))
        .unwrap();
    assert_eq!(t.record.expires_at, Some(t.record.created_at + 2));
    let err = store
        .create_token("acme", "zero", Some(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidTtl { .. }), "{err:?}");
}

#[test]
fn token_creation_is_validated() {
    let (_dir, store) = with_acme();
    let err = store.create_token("nope", "a1", None).unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownTenant { name } if name == "nope"),
        "{err:?}"
    );
    let long = "a".repeat(65);
    for bad in ["", "has space", "tab\t", "new\nline", "ümlaut", long.as_str()] {
        let err = store.create_token("acme", bad, None).unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidTokenLabel { label, .. } if label == bad),
            "{err:?}"
        );
    }
    store.create_token("acme", "agent_1.eu-west:a@b", None).unwrap();
    store.create_token("acme", &"a".repeat(64), None).unwrap();
    assert_eq!(store.load().unwrap().tokens.len(), 2);
}

#[test]
fn removing_a_tenant_removes_its_tokens() {
    let (_dir, store) = with_acme();
    store.add_tenant("globex", &ps(&["globex.test"])).unwrap();
    let gone = store.create_token("acme", "a1", None).unwrap();
    let kept = store.create_token("globex", "g1", None).unwrap();
    let old = store.load().unwrap();
    store.remove_tenant("acme").unwrap();

    let snap = store.load().unwrap();
    let id = gone.record.id.clone();
    assert_eq!(
        snap.authenticate(&gone.token, unix_now()).unwrap_err(),
        AuthError::UnknownToken { id: id.clone() }
    );
    assert_eq!(
        snap.check_token(&id, unix_now()).unwrap_err(),
        AuthError::UnknownToken { id: id.clone() }
    );
    assert!(snap.authenticate(&kept.token, unix_now()).is_ok());
    // The previous snapshot still authenticated it (a live session) until the reload.
    assert!(old.check_token(&id, unix_now()).is_ok());

    // A token whose tenant is missing (e.g. hand-edited file) reports TenantGone.
    let mut orphaned = old.clone();
    orphaned.tenants.remove("acme");
    assert_eq!(
        orphaned.check_token(&id, unix_now()).unwrap_err(),
        AuthError::TenantGone {
            id: id.clone(),
            tenant: "acme".into()
        }
    );
    assert_eq!(
        orphaned.authenticate(&gone.token, unix_now()).unwrap_err(),
        AuthError::TenantGone {
            id,
            tenant: "acme".into()
        }
    );
}

#[test]
fn corrupt_file_names_path_and_position() {
    let (_dir, store) = with_acme();
    fs::write(store.path(), b"{\n  \"version\": 1,\n  \"tenants\": {,\n}").unwrap();
    let err = store.load().unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&store.path().display().to_string()), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
    // Writers refuse to overwrite a corrupt file.
    assert!(matches!(
        store.create_token("acme", "a", None),
        Err(StoreError::Corrupt { .. })
    ));

    fs::write(store.path(), b"").unwrap();
    assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
    fs::write(store.path(), b"{\"tenants\": {}, \"tokens\": {}}").unwrap();
    let msg = store.load().unwrap_err().to_string();
    assert!(msg.contains("version"), "{msg}");
}

#[test]
fn file_format_is_versioned_and_strict() {
    let (_dir, store) = with_acme();
    let issued = store.create_token("acme", "a1", None).unwrap();
    let text = fs::read_to_string(store.path()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(
        json["tenants"]["acme"]["hostnames"],
        serde_json::json!(["acme.test", "*.acme.test"])
    );
    assert_eq!(json["tokens"][&issued.record.id]["label"], "a1");

    let newer = text.replacen("\"version\": 1", "\"version\": 2", 1);
    fs::write(store.path(), newer).unwrap();
    let err = store.load().unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedVersion { found: 2, .. }),
        "{err:?}"
    );

    // A misspelt field is refused, not ignored.
    let typo = text.replacen("\"revoked_at\"", "\"revokd_at\"", 1);
    fs::write(store.path(), typo).unwrap();
    let msg = store.load().unwrap_err().to_string();
    assert!(msg.contains("revokd_at"), "{msg}");

    // An invalid hostname is refused with the path.
    let bad_host = text.replacen("\"acme.test\"", "\"acme_test\"", 1);
    fs::write(store.path(), bad_host).unwrap();
    let msg = store.load().unwrap_err().to_string();
    assert!(msg.contains("acme_test") && msg.contains("store.json"), "{msg}");
}

#[test]
fn hand_edited_inconsistencies_are_refused() {
    let (_dir, store) = with_acme();
    let issued = store.create_token("acme", "a1", None).unwrap();
    let snap = store.load().unwrap();
    let write = |snap: &Snapshot| {
        let doc = FileRef {
            version: FORMAT_VERSION,
            tenants: &snap.tenants,
            tokens: &snap.tokens,
            agents: &snap.agents,
        };
        fs::write(store.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
    };
    let check = |snap: &Snapshot, needle: &str| {
        write(snap);
        match store.load() {
            Err(StoreError::Inconsistent { problem, .. }) => assert!(problem.contains(needle), "{problem}"),
            other => panic!("{needle}: unexpected {other:?}"),
        }
    };

    let mut overlap = snap.clone();
    let mut other = snap.tenants["acme"].clone();
    other.name = "other".into();
    other.hostnames = ps(&["x.acme.test"]);
    overlap.tenants.insert("other".into(), other);
    check(&overlap, "x.acme.test");

    let mut renamed = snap.clone();
    renamed.tenants.get_mut("acme").unwrap().name = "acme2".into();
    check(&renamed, "acme2");

    let mut no_hosts = snap.clone();
    no_hosts.tenants.get_mut("acme").unwrap().hostnames.clear();
    check(&no_hosts, "no hostnames");

    let mut bad_hash = snap.clone();
    bad_hash.tokens.get_mut(&issued.record.id).unwrap().secret_sha256 = "abc".into();
    check(&bad_hash, "secret_sha256");

    let mut bad_id = snap.clone();
    let mut record = bad_id.tokens.remove(&issued.record.id).unwrap();
    record.id = "XYZ".into();
    bad_id.tokens.insert("XYZ".into(), record);
    check(&bad_id, "XYZ");

    write(&snap);
    assert_eq!(store.load().unwrap(), snap);
}

#[test]
fn fingerprint_changes_after_each_write() {
    let (_dir, store) = open();
    assert_eq!(store.fingerprint().unwrap(), None);
    store.add_tenant("acme", &ps(&["acme.test"])).unwrap();
    let first = store.fingerprint().unwrap().expect("file exists");
    assert_eq!(store.fingerprint().unwrap(), Some(first), "stable without writes");
    store.load().unwrap();
    assert_eq!(store.fingerprint().unwrap(), Some(first), "reads change nothing");
    let t = store.create_token("acme", "a1", None).unwrap();
    let second = store.fingerprint().unwrap().unwrap();
    assert_ne!(first, second);
    store.revoke_token(&t.record.id).unwrap();
    let third = store.fingerprint().unwrap().unwrap();
    assert_ne!(second, third);
    // A failed change writes nothing.
    store.add_tenant("acme", &ps(&["x.test"])).unwrap_err();
    assert_eq!(store.fingerprint().unwrap(), Some(third));
}

#[test]
fn the_file_never_holds_the_secret() {
    let (dir, store) = with_acme();
    let issued = store.create_token("acme", "a1", None).unwrap();
    let secret = &issued.token[issued.token.len() - 52..];
    for entry in fs::read_dir(dir.state()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(secret), "{} holds the secret", path.display());
        assert!(
            !text.contains(&issued.token),
            "{} holds the token",
            path.display()
        );
    }
    let text = fs::read_to_string(store.path()).unwrap();
    assert!(text.contains(&token::hash_secret(secret)));
    assert!(!format!("{issued:?}").contains(secret), "Debug redacts the token");
}

#[test]
fn files_are_private_and_no_temp_files_remain() {
    let (dir, store) = with_acme();
    store.create_token("acme", "a1", None).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.path()), 0o600);
    assert_eq!(mode(&dir.state().join(LOCK_FILE)), 0o600);
    let mut names: Vec<_> = fs::read_dir(dir.state())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["store.json", "store.lock"]);
}

#[test]
fn concurrent_writers_all_land() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 5;
    let (dir, store) = with_acme();
    let state = dir.state();
    let issued: Vec<IssuedToken> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let state = state.clone();
                s.spawn(move || {
                    // Each thread opens its own handle, like separate CLI processes would.
                    let store = Store::open(&state).unwrap();
                    (0..PER_THREAD)
                        .map(|j| {
                            store
                                .create_token("acme", &format!("agent-{i}-{j}"), None)
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(issued.len(), THREADS * PER_THREAD);
    let snap = store.load().unwrap();
    assert_eq!(snap.tokens.len(), THREADS * PER_THREAD);
    for t in &issued {
        assert!(
            snap.authenticate(&t.token, unix_now()).is_ok(),
            "{}",
            t.record.label
        );
    }
}

#[test]
fn readers_never_see_a_partial_file() {
    let (dir, store) = with_acme();
    let state = dir.state();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let store = Store::open(&state).unwrap();
            for i in 0..30 {
                store.create_token("acme", &format!("w{i}"), None).unwrap();
            }
        });
        while !writer.is_finished() {
            store.load().unwrap();
        }
        writer.join().unwrap();
    });
    assert_eq!(store.load().unwrap().tokens.len(), 30);
}

fn enrollment(token: &str, key: char, now: u64) -> EnrollRequest {
    EnrollRequest {
        tenant: "acme".into(),
        token: token.into(),
        name: "office".into(),
        key_sha256: key.to_string().repeat(64),
        certificate: IssuedCert {
            serial: "01".into(),
            expires_at: now + 60,
        },
        now,
    }
}

#[test]
fn a_token_enrolls_its_machines_and_holds_the_rest_for_approval() {
    let (_dir, store) = with_acme();
    let token = store.create_token_with("acme", "a1", None, 2).unwrap().record.id;
    let now = unix_now();
    let first = store.enroll(&enrollment(&token, 'a', now)).unwrap();
    assert_eq!(first.state, AgentState::Active);
    assert_eq!(first.cert_expires_at, Some(now + 60));
    // The same key is the same machine: same record, no place taken.
    let again = store.enroll(&enrollment(&token, 'a', now + 1)).unwrap();
    assert_eq!(
        (again.id.as_str(), again.state),
        (first.id.as_str(), AgentState::Active)
    );
    let second = store.enroll(&enrollment(&token, 'b', now)).unwrap();
    assert_eq!(second.state, AgentState::Active, "max_agents = 2");
    let third = store.enroll(&enrollment(&token, 'c', now)).unwrap();
    assert_eq!(third.state, AgentState::Pending);
    assert_eq!(third.cert_serial, None, "no certificate for a pending agent");
    let snap = store.load().unwrap();
    let check = |snap: &Snapshot, key: char| {
        snap.check_agent("acme", &third.id, &key.to_string().repeat(64), now)
            .map(|_| ())
    };
    assert_eq!(
        check(&snap, 'c'),
        Err(AuthError::AgentPending { id: third.id.clone() })
    );

    // Approved, it enrolls again with the same key and gets its certificate.
    store.change_agent(&third.id, &AgentChange::Approve).unwrap();
    let approved = store.enroll(&enrollment(&token, 'c', now)).unwrap();
    assert_eq!(
        (approved.id.as_str(), approved.state),
        (third.id.as_str(), AgentState::Active)
    );
    let snap = store.load().unwrap();
    assert!(check(&snap, 'c').is_ok());
    assert_eq!(
        check(&snap, 'd'),
        Err(AuthError::WrongKey { id: third.id.clone() })
    );
    assert!(matches!(
        snap.check_agent("globex", &third.id, &"c".repeat(64), now),
        Err(AuthError::ForeignAgent { .. })
    ));
    assert_eq!(
        snap.check_agent("acme", &third.id, &"c".repeat(64), now + 61)
            .map(|_| ()),
        Err(AuthError::CertificateExpired { id: third.id.clone() })
    );

    // Revoked: refused, cannot enroll again nor be approved.
    store.change_agent(&third.id, &AgentChange::Revoke).unwrap();
    let snap = store.load().unwrap();
    assert_eq!(
        check(&snap, 'c'),
        Err(AuthError::AgentRevoked { id: third.id.clone() })
    );
    assert!(matches!(
        store.enroll(&enrollment(&token, 'c', now)),
        Err(StoreError::AgentRevoked { .. })
    ));
    assert!(matches!(
        store.change_agent(&third.id, &AgentChange::Approve),
        Err(StoreError::AgentRevoked { .. })
    ));

    // A token that merely expires enrolls no more machines; what it enrolled stays.
    let later = now + 3600;
    let short = store
        .create_token_with("acme", "short", Some(Duration::from_secs(60)), 1)
        .unwrap()
        .record
        .id;
    let mut early = enrollment(&short, 'f', now);
    early.certificate.expires_at = later + 60;
    let enrolled = store.enroll(&early).unwrap();
    let snap = store.load().unwrap();
    assert!(
        snap.check_agent("acme", &enrolled.id, &"f".repeat(64), later)
            .is_ok()
    );
    assert!(matches!(
        store.enroll(&enrollment(&short, 'e', later)),
        Err(StoreError::TokenInactive { .. })
    ));

    // Revoking the token voids what it enrolled.
    store.revoke_token(&token).unwrap();
    let snap = store.load().unwrap();
    assert!(matches!(
        snap.check_agent("acme", &first.id, &"a".repeat(64), now),
        Err(AuthError::EnrollingTokenRevoked { .. })
    ));
    assert!(matches!(
        store.enroll(&enrollment(&token, 'e', now)),
        Err(StoreError::TokenInactive { .. })
    ));
    // Removing the tenant removes its agents.
    store.remove_tenant("acme").unwrap();
    assert!(store.load().unwrap().agents.is_empty());
}

#[test]
fn a_leaked_token_cannot_fill_the_store_with_pending_enrollments() {
    let (_dir, store) = with_acme();
    let token = store.create_token("acme", "a1", None).unwrap().record.id;
    assert_eq!(
        store
            .create_token_with("acme", "a2", None, 0)
            .err()
            .map(|e| e.to_string()),
        Some(StoreError::InvalidMaxAgents.to_string())
    );
    let now = unix_now();
    for i in 0..18 {
        let mut request = enrollment(&token, 'a', now);
        request.key_sha256 = format!("{i:02x}").repeat(32);
        let result = store.enroll(&request);
        match i {
            0 => assert_eq!(result.unwrap().state, AgentState::Active),
            1..=16 => assert_eq!(result.unwrap().state, AgentState::Pending),
            _ => assert!(matches!(
                result,
                Err(StoreError::TooManyPending { limit: 16, .. })
            )),
        }
    }
}
