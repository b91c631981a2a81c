//! The gateway serving TLS itself (`TLS_CERT_FILE`, `TLS_KEY_FILE`): `wss://` and `https://`
//! end to end with the client library and the `chat` binary, a client that does not trust the
//! CA, and a renewed certificate served without a restart. Certificates are made here (rcgen):
//! a CA per test, and a server certificate for 127.0.0.1 and localhost.
//!
//! The `chat` binary must be built first (`cargo build --bins`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chat_client::{Client, ClientError, Options, Rest, Tls};
use chat_common::auth::TokenIssuer;
use chat_e2e::{binary, http_url, Component, TestEnv, WAIT};

/// A certificate authority made for one test.
struct Ca {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self { key, cert }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost, and its key (PEM).
    fn server_pair(&self) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("server key");
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn trusted(&self) -> Tls {
        Tls::with_ca_pem(self.pem().as_bytes()).expect("a CA")
    }
}

/// This test's files, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("chat-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` whole: a reader sees the old file or the new one.
    fn put(&self, name: &str, text: &str) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.path(name)).expect("rename");
    }

    fn files(&self) -> gateway::TlsFiles {
        gateway::TlsFiles {
            cert: self.path("cert.pem"),
            key: self.path("key.pem"),
            reload_every: Duration::from_millis(200),
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// gw1 serving TLS with the pair in `dir`, handing out dev tokens signed like the harness's.
async fn tls_gateway(env: &TestEnv, dir: &Dir) -> anyhow::Result<Component> {
    let files = dir.files();
    env.start_gateway_with("gw1", |c| {
        c.tls = Some(files);
        c.dev_issuer = Some(TokenIssuer::hs256(b"test-secret", "chat-test", "chat"));
    })
    .await
}

fn wss(gw: &Component) -> String {
    format!("wss://127.0.0.1:{}", gw.addr.port())
}

fn https(gw: &Component) -> String {
    format!("https://127.0.0.1:{}", gw.addr.port())
}

/// Connects over `wss://` trusting `tls`, and waits for the first sync.
async fn connect(gw: &Component, token: &str, tls: &Tls, auto_ack: bool) -> anyhow::Result<Client> {
    let mut options = Options::new(&wss(gw), token);
    options.tls = tls.clone();
    options.auto_ack = auto_ack;
    let mut client = Client::connect_with(options).await?;
    client.until_sync_done(WAIT).await?;
    Ok(client)
}

/// The `ClientError::Tls` reason of a connection attempt that must fail its handshake.
async fn refused(gw: &Component, token: &str, tls: &Tls) -> String {
    let mut options = Options::new(&wss(gw), token);
    options.tls = tls.clone();
    match Client::connect_with(options).await {
        Err(ClientError::Tls { reason, .. }) => reason,
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("connected without trusting the server's CA"),
    }
}

/// Runs `chat` with its own login file; (exit code, stdout, stderr).
async fn chat(config: &Path, args: &[&str]) -> anyhow::Result<(Option<i32>, String, String)> {
    let path = binary("chat");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    let child = tokio::process::Command::new(path)
        .args(args)
        .env("CHAT_CONFIG", config)
        .env_remove("CHAT_TOKEN")
        .env_remove("CHAT_SERVER")
        .env_remove("CHAT_CA_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    Ok((
        out.status.code(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// A counter of the gateway's `/metrics` (operations listener), 0 when absent.
async fn counter(gw: &Component, series: &str) -> anyhow::Result<f64> {
    let r = Rest::new(&http_url(gw.ops_addr))
        .request("GET", "/metrics", None, None)
        .await?;
    Ok(r.body
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Waits (up to `WAIT`) until `series` reaches `min`.
async fn at_least(gw: &Component, series: &str, min: f64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = counter(gw, series).await?;
        if value >= min {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{series} is {value}, expected at least {min}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_end_to_end_with_the_library_and_the_cli() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let dir = Dir::new();
    let ca = Ca::new("chat test CA");
    let (cert, key) = ca.server_pair();
    dir.put("cert.pem", &cert);
    dir.put("key.pem", &key);
    dir.put("ca.pem", &ca.pem());
    let mux = env.start_multiplexer().await?;
    let gw = tls_gateway(&env, &dir).await?;
    let tls = Tls::with_ca_file(dir.path("ca.pem"))?;

    // The library: both ways between two users over wss://.
    let mut alice = connect(&gw, &env.token("alice"), &tls, false).await?;
    let mut bob = connect(&gw, &env.token("bob"), &tls, true).await?;
    alice.send("bob", "hello over TLS").await?;
    assert_eq!(bob.next_message(WAIT).await?.body, "hello over TLS");
    bob.send("alice", "and back").await?;
    assert_eq!(alice.next_message(WAIT).await?.body, "and back");

    // REST over https://.
    let rest = Rest::with_tls(&https(&gw), &tls);
    let me = rest
        .request("GET", "/me", Some(&env.token("alice")), None)
        .await?;
    assert_eq!((me.status, me.body["user"].as_str()), (200, Some("alice")));

    // A client that does not trust the CA is told so, and nothing is served to it.
    let reason = refused(&gw, &env.token("carol"), &Tls::default()).await;
    assert!(reason.contains("not signed by a trusted CA"), "{reason}");
    let untrusted = Rest::new(&https(&gw))
        .request("GET", "/me", Some(&env.token("carol")), None)
        .await;
    match untrusted {
        Err(ClientError::Tls { reason, .. }) => {
            assert!(reason.contains("not signed by a trusted CA"), "{reason}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    at_least(&gw, "gateway_tls_handshakes_failed_total", 2.0).await?;
    // Plain HTTP on the TLS port gets nothing.
    assert!(Rest::new(&http_url(gw.addr))
        .request("GET", "/me", None, None)
        .await
        .is_err());

    // The CLI (as another user: a websocket of alice's would replace hers): `--ca-file` at
    // login, saved with it for the next commands.
    let ca_file = dir.path("ca.pem").display().to_string();
    let config = dir.path("cleo/config.json");
    let server = https(&gw);
    let (code, out, err) = chat(
        &config,
        &[
            "login",
            "cleo",
            "--server",
            &server,
            "--ca-file",
            &ca_file,
            "--json",
        ],
    )
    .await?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("\"logged_in\""), "{out}");
    // REST (https://) ...
    let (code, out, err) = chat(&config, &["send", "bob", "from the CLI", "--json"]).await?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(bob.next_message(WAIT).await?.body, "from the CLI");
    // ... and the websocket (wss://), which waits for bob's receipt.
    let (code, out, err) = chat(
        &config,
        &["send", "bob", "delivered?", "--wait-delivered", "--json"],
    )
    .await?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("\"delivered\""), "{out}");
    assert_eq!(bob.next_message(WAIT).await?.body, "delivered?");

    // Without the CA: the server cannot be reached (exit 5), saying why.
    let stranger = dir.path("carol/config.json");
    let (code, _, err) = chat(&stranger, &["login", "carol", "--server", &server]).await?;
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("not signed by a trusted CA"), "{err}");

    alice.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let dir = Dir::new();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (cert, key) = old_ca.server_pair();
    dir.put("cert.pem", &cert);
    dir.put("key.pem", &key);
    let mux = env.start_multiplexer().await?;
    let gw = tls_gateway(&env, &dir).await?;

    let mut alice = connect(&gw, &env.token("alice"), &old_ca.trusted(), false).await?;
    let mut bob = connect(&gw, &env.token("bob"), &old_ca.trusted(), false).await?;
    alice.send("bob", "before").await?;
    assert_eq!(bob.next_message(WAIT).await?.body, "before");
    let reason = refused(&gw, &env.token("carol"), &new_ca.trusted()).await;
    assert!(reason.contains("not signed by a trusted CA"), "{reason}");

    // The renewal: a pair from another CA, written over the old files.
    let (cert, key) = new_ca.server_pair();
    dir.put("key.pem", &key);
    dir.put("cert.pem", &cert);
    let deadline = tokio::time::Instant::now() + WAIT;
    let carol = loop {
        let mut options = Options::new(&wss(&gw), &env.token("carol"));
        options.tls = new_ca.trusted();
        match Client::connect_with(options).await {
            Ok(c) => break c,
            Err(ClientError::Tls { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("the new certificate is not served: {e}"),
        }
    };
    // New connections see the new certificate only ...
    let reason = refused(&gw, &env.token("dave"), &old_ca.trusted()).await;
    assert!(reason.contains("not signed by a trusted CA"), "{reason}");
    at_least(&gw, "gateway_tls_reloads_total{result=\"ok\"}", 1.0).await?;
    // ... and the connections made before it keep working.
    alice.send("bob", "after").await?;
    assert_eq!(bob.next_message(WAIT).await?.body, "after");
    bob.send("alice", "still here").await?;
    assert_eq!(alice.next_message(WAIT).await?.body, "still here");

    // A bad renewal is refused and counted; the last good pair stays in service.
    dir.put(
        "cert.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    );
    at_least(&gw, "gateway_tls_reloads_total{result=\"error\"}", 1.0).await?;
    let erin = connect(&gw, &env.token("erin"), &new_ca.trusted(), false).await?;

    for c in [alice, bob, carol, erin] {
        c.close();
    }
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}
