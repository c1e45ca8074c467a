//! The nodes' NATS connections can be encrypted and authenticated without a shared secret on
//! the wire: two nodes talk through a nats-server that requires TLS, verifies client
//! certificates and knows each node by its NKey (`--nats-tls-ca`, `--nats-tls-cert`,
//! `--nats-tls-key`, `--nats-nkey-seed-file`). A node without the right certificate, CA or seed
//! does not start, and says why.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Backend, PrivateNats, ServerBuilder, Ws, database_url, token, unique};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, a client
/// certificate signed by another CA, and two NKey user seeds: one the server knows, one not.
struct Material {
    dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
    seed: PathBuf,
    public_key: String,
    unknown_seed: PathBuf,
}

fn issuer(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// A leaf certificate signed by `ca`, written as PEM to `dir/name.crt` and `dir/name.key`.
fn leaf(
    dir: &Path,
    name: &str,
    ca: &CertifiedIssuer<'_, KeyPair>,
    purpose: ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca).expect("sign");
    let (crt, pem) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem()).expect("write cert");
    std::fs::write(&pem, key.serialize_pem()).expect("write key");
    (crt, pem)
}

fn material() -> Material {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = issuer("parley test nats CA");
    let stranger_ca = issuer("someone else's CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    let (server_cert, server_key) = leaf(
        dir.path(),
        "server",
        &ca,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        leaf(dir.path(), "node", &ca, ExtendedKeyUsagePurpose::ClientAuth);
    let (stranger_cert, stranger_key) = leaf(
        dir.path(),
        "stranger",
        &stranger_ca,
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let user = nkeys::KeyPair::new_user();
    let seed = dir.path().join("node.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().expect("seed"))).expect("write seed");
    let unknown_seed = dir.path().join("unknown.nk");
    let unknown = nkeys::KeyPair::new_user();
    std::fs::write(&unknown_seed, unknown.seed().expect("seed")).expect("write seed");
    Material {
        ca: ca_path,
        server_cert,
        server_key,
        client_cert,
        client_key,
        stranger_cert,
        stranger_key,
        seed,
        public_key: user.public_key(),
        unknown_seed,
        dir,
    }
}

/// nats-server requiring TLS with a verified client certificate, and the NKey of `m`.
fn secure_nats(m: &Material) -> PrivateNats {
    PrivateNats::start_with_config(&format!(
        r#"
tls {{
  cert_file: "{}"
  key_file: "{}"
  ca_file: "{}"
  verify: true
  timeout: 2
}}
authorization {{
  users = [ {{ nkey: "{}" }} ]
}}
"#,
        m.server_cert.display(),
        m.server_key.display(),
        m.ca.display(),
        m.public_key
    ))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_through_nats_over_tls_with_client_certificates_and_nkeys() {
    let m = material();
    let nats = secure_nats(&m);
    let node = || {
        ServerBuilder::new(Backend::Postgres)
            .arg("--nats-url")
            .arg(nats.url())
            .arg("--nats-tls-ca")
            .arg(path(&m.ca))
            .arg("--nats-tls-cert")
            .arg(path(&m.client_cert))
            .arg("--nats-tls-key")
            .arg(path(&m.client_key))
            .arg("--nats-nkey-seed-file")
            .arg(path(&m.seed))
            .start()
    };
    let (a, b) = (node(), node());
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = b.api(&alice).create_channel("tls", &[&bob]).await;
    let mut on_a = Ws::connect(&a, &token(&bob)).await;
    on_a.subscribe(&channel).await;
    // Sent through B, delivered on A: the event crossed the encrypted, authenticated bus.
    b.api(&alice).send(&channel, "over-tls", "hello").await.ok();
    let event = on_a.next_event().await;
    assert_eq!(event["type"], "message.new", "{event}");
    assert_eq!(event["message"]["client_msg_id"], "over-tls", "{event}");
    drop(m.dir);
}

/// Runs `parley serve` against `nats` with these NATS flags; it must exit (not serve), and its
/// stderr is returned.
fn refused_start(nats: &PrivateNats, flags: &[String]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["serve", "--listen", "127.0.0.1:0", "--jwt-hs256-secret"])
        .arg("nats-security-test-secret-0123456789")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--database-url")
        .arg(database_url())
        .arg("--nats-url")
        .arg(nats.url())
        .args(flags)
        .env("PARLEY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start parley");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(!status.success(), "parley started with {flags:?}");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("parley kept running with {flags:?}: the refusal must stop it");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    err
}

#[test]
fn a_node_without_the_right_certificate_ca_or_seed_does_not_start() {
    let m = material();
    let nats = secure_nats(&m);
    let ca = ["--nats-tls-ca".to_owned(), path(&m.ca)];
    let cert = [
        "--nats-tls-cert".to_owned(),
        path(&m.client_cert),
        "--nats-tls-key".to_owned(),
        path(&m.client_key),
    ];
    let seed = ["--nats-nkey-seed-file".to_owned(), path(&m.seed)];
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "no client certificate",
            [&ca[..], &seed[..]].concat(),
            "--nats-tls-cert",
        ),
        (
            "a client certificate from another CA",
            [
                &ca[..],
                &[
                    "--nats-tls-cert".to_owned(),
                    path(&m.stranger_cert),
                    "--nats-tls-key".to_owned(),
                    path(&m.stranger_key),
                ],
                &seed[..],
            ]
            .concat(),
            "--nats-tls-cert",
        ),
        (
            "an NKey the server does not know",
            [
                &ca[..],
                &cert[..],
                &["--nats-nkey-seed-file".to_owned(), path(&m.unknown_seed)],
            ]
            .concat(),
            "author",
        ),
        ("no NKey", [&ca[..], &cert[..]].concat(), "author"),
        (
            "a seed file that holds no seed",
            [
                &ca[..],
                &cert[..],
                &["--nats-nkey-seed-file".to_owned(), path(&m.ca)],
            ]
            .concat(),
            "does not hold an nkey user seed",
        ),
    ];
    for (case, flags, expected) in cases {
        let err = refused_start(&nats, &flags).to_lowercase();
        assert!(
            err.contains(expected),
            "{case}: stderr does not say {expected:?}:\n{err}"
        );
        // The seed never shows in what the node prints.
        let seed = std::fs::read_to_string(&m.seed).expect("seed");
        assert!(
            !err.contains(&seed.trim().to_lowercase()),
            "{case}: the seed was printed"
        );
    }
}
