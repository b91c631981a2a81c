//! The gateway's two listeners and its refusal to start insecurely:
//! - the public listener serves what clients use and no longer `/metrics` or `/readyz` (404);
//!   the operations listener (`GATEWAY_METRICS_ADDR`) serves `/metrics`, `/healthz`, `/readyz`;
//! - without `JWT_SECRET` or `JWT_PUBLIC_KEY_FILE` the binary exits non-zero naming them and
//!   `DEV_TOKENS`, before connecting to anything; with `DEV_TOKENS=true` it starts.
//!
//! The gateway binary must be built first (`cargo build --bins`).

use std::process::Stdio;

use chat_client::Rest;
use chat_e2e::{binary, free_port, http_url, TestEnv, WAIT};

/// The status and body of `GET path` at `addr`.
async fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let r = Rest::new(&http_url(addr))
        .request("GET", path, None, None)
        .await?;
    let body = match r.body {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    Ok((r.status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_are_served_on_the_operations_listener_only() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    assert_ne!(gw.addr, gw.ops_addr);

    let (status, body) = get(gw.addr, "/metrics").await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not_found"), "{body}");
    assert_eq!(get(gw.addr, "/readyz").await?.0, 404);
    // The public /healthz stays (it says only "ok"), for probes of the client port.
    assert_eq!(get(gw.addr, "/healthz").await?, (200, "ok".to_owned()));

    let (status, metrics) = get(gw.ops_addr, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(metrics.contains("gateway_connections "), "{metrics}");
    assert!(
        metrics.contains("gateway_tls_reloads_total{result=\"ok\"} 0"),
        "{metrics}"
    );
    assert_eq!(
        get(gw.ops_addr, "/readyz").await?,
        (200, "ready".to_owned())
    );
    assert_eq!(get(gw.ops_addr, "/healthz").await?, (200, "ok".to_owned()));
    // And nothing of the clients' API there.
    assert_eq!(get(gw.ops_addr, "/me").await?.0, 404);

    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_key_the_gateway_refuses_to_start() -> anyhow::Result<()> {
    let path = binary("gateway");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    let port = free_port()?;
    let child = tokio::process::Command::new(&path)
        .env_remove("JWT_SECRET")
        .env_remove("JWT_PUBLIC_KEY_FILE")
        .env_remove("DEV_TOKENS")
        // Nothing listens there: a start that got past its configuration would hang, not exit.
        .env("KAFKA_BROKERS", "127.0.0.1:1")
        .env("GATEWAY_ADDR", format!("127.0.0.1:{port}"))
        .env("GATEWAY_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for name in ["JWT_SECRET", "JWT_PUBLIC_KEY_FILE", "DEV_TOKENS"] {
        assert!(stderr.contains(name), "the refusal names {name}: {stderr}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dev_tokens_on_the_gateway_starts_with_the_development_secret() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let mut gw = env
        .spawn_gateway_process_with("gw1", |vars| {
            vars.retain(|(k, _)| k != "JWT_SECRET");
            vars.push(("DEV_TOKENS".into(), "true".into()));
        })
        .await?;
    // Ready (the harness waited for /readyz on the operations listener) and serving dev tokens.
    let rest = Rest::new(&http_url(gw.addr));
    let token = rest.dev_token("alice").await?;
    let me = rest.request("GET", "/me", Some(&token), None).await?;
    assert_eq!((me.status, me.body["user"].as_str()), (200, Some("alice")));
    assert_eq!(get(gw.addr, "/metrics").await?.0, 404);
    assert_eq!(get(gw.ops_addr, "/metrics").await?.0, 200);
    gw.terminate().await?;
    env.teardown().await
}
