//! The gateway: holds client websockets and serves the REST API.
//!
//! Every message a client sends becomes a protobuf record on `inbound` (keyed by the
//! conversation), answered "accepted" only after Kafka's delivery report. The gateway consumes its
//! own `outbound-<gateway_id>` topic and pushes each record to the recipient's socket, and
//! publishes to `presence` which users it holds.
//!
//! - `config`: typed configuration from the environment.
//! - `app`: the service every transport calls (send, ack, sync, history, sessions and
//!   presence), with private state; the only user of the store.
//! - `sessions`: the sockets held, one bounded queue each.
//! - `ws`: one websocket connection (sync, then live, with no gap or duplicate at the seam).
//! - `outbound`: the outbound topic consumer (in delete-on-ack mode on a thread of its own).
//! - `http`: the routes table and one handler per route; authentication before upgrade;
//!   rejections rendered as JSON errors.
//! - `error`: the errors of each boundary, and the status, frame code or close code of each.
//! - `server`: connections: counted per address from accept, bounded in time, drained on
//!   shutdown; served on two listeners, the public one (websocket, REST, web client) and the
//!   operations one (`/metrics`, `/healthz`, `/readyz`, for the monitoring network only).
//! - `tls`: the public listener's TLS, when a certificate is configured, reloaded when its
//!   files change.
//! - `upgrade`: the websocket handshake and the socket's buffers.
//! - `catalogue`: the metric families the gateway records, registered at start.
//!
//! Imports run one way: `error` and `config` at the bottom, then `sessions`, then `app`, then the
//! transports (`tls`, `upgrade`, `ws`, `server`, `outbound`), and `http`, which makes routes of them.
//! The transports parse what comes in, call `app`, and render its answers; only `app` reads the
//! store.

mod app;
mod catalogue;
mod config;
mod error;
mod http;
mod outbound;
mod server;
mod sessions;
mod tls;
mod upgrade;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;

pub use config::{Config, HttpBounds, TlsFiles, TLS_RELOAD_EVERY};

/// A started gateway.
pub struct Running {
    /// Where the public HTTP server listens (useful with port 0).
    pub addr: SocketAddr,
    /// Where the operations listener (`/metrics`, `/healthz`, `/readyz`) listens.
    pub metrics_addr: SocketAddr,
    /// Ends when the gateway has drained after `shutdown`: an error if the gateway stopped
    /// because its outbound relay did (a panic), not because it was told to.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Checks Kafka, connects the shards, subscribes to the outbound topic and starts serving.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    chat_common::telemetry::register_metrics(
        "gateway",
        env!("CARGO_PKG_VERSION"),
        &[
            catalogue::FAMILIES,
            db_writer::catalogue::POOL_FAMILIES,
            chat_common::telemetry::PRESENCE_FAMILIES,
            chat_common::telemetry::LANES_FAMILIES,
        ],
    );
    // A configured certificate that cannot be served stops the start, before anything connects.
    let tls = config
        .tls
        .clone()
        .map(tls::Tls::load)
        .transpose()
        .context("TLS_CERT_FILE / TLS_KEY_FILE")?;
    if config.dev_issuer.is_some() {
        tracing::warn!(
            "DEV_TOKENS=true: GET /dev/token/{{user}} hands out tokens to anyone (local stack only)"
        );
    }
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka.check_reachable(Duration::from_secs(10)))
        .await?
        .context("kafka")?;
    let outbound_topic = config.topics.outbound(&config.gateway_id);
    let app = Arc::new(App::new(config, shutdown.clone())?);
    let consumer = outbound_consumer(app.config(), &outbound_topic)?;
    chat_common::presence::PresenceView::start(
        &app.config().kafka,
        &app.config().topics.presence(),
        Some(app.on_route()),
        shutdown.clone(),
    )
    .await
    .context("presence")?;

    // hyper directly, one connection at a time (warp's own server has no timeouts, and hyper's
    // counts nothing per address): see `server`.
    let listener = bind(app.config().addr, app.config().listen_backlog).context("GATEWAY_ADDR")?;
    let addr = listener.local_addr()?;
    let ops_listener =
        bind(app.config().metrics_addr, OPS_BACKLOG).context("GATEWAY_METRICS_ADDR")?;
    let metrics_addr = ops_listener.local_addr()?;
    let bounds = app.config().http;
    let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
    if let Some(tls) = tls {
        tokio::spawn(tls::watch(tls, shutdown.clone()));
    }
    let routes = warp::service(http::routes(app.clone()));
    let http_server = tokio::spawn(server::serve(
        app.clone(),
        listener,
        server::Role::Public {
            tls: acceptor.clone(),
        },
        routes,
        bounds,
        shutdown.clone(),
    ));
    let ops_server = tokio::spawn(server::serve(
        app.clone(),
        ops_listener,
        server::Role::Operations,
        warp::service(http::ops_routes(app.clone())),
        bounds,
        shutdown.clone(),
    ));
    tracing::info!(%addr, %metrics_addr, tls = acceptor.is_some(), gateway = %app.config().gateway_id, outbound = %outbound_topic, "gateway started");
    let outbound = outbound::start(app.clone(), consumer, outbound_topic, shutdown.clone())?;
    tokio::spawn(ping_sessions(app.clone(), shutdown.clone()));

    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        app.close_sessions(error::Close::GoingAway);
        let _ = http_server.await;
        let _ = ops_server.await;
        // Connections close with 1001 and publish their offline presence; bounded wait.
        if !app.drain(Duration::from_secs(10)).await {
            tracing::warn!("some connections did not close within 10 s");
        }
        let relay_failed = outbound.await.unwrap_or(true);
        app.flush(Duration::from_secs(5));
        tracing::info!("gateway stopped");
        if relay_failed {
            anyhow::bail!("the outbound relay stopped before shutdown");
        }
        Ok(())
    });
    Ok(Running {
        addr,
        metrics_addr,
        task,
    })
}

/// The consumer of this gateway's outbound topic, subscribed.
fn outbound_consumer(config: &Config, topic: &str) -> anyhow::Result<StreamConsumer> {
    let group = config.topics.gateway_group(&config.gateway_id);
    let consumer = config.kafka.consumer(&group)?;
    consumer
        .subscribe(&[topic])
        .context("subscribe to outbound")?;
    Ok(consumer)
}

/// The operations listener's backlog: a few scrapers and probes.
const OPS_BACKLOG: u32 = 128;

/// A listener on `addr` whose kernel queue holds `backlog` connections not yet accepted
/// (`std::net::TcpListener::bind` asks for 128: a connect storm past that loses SYNs, and their
/// clients wait 1 s, then 3, then 7 before they try again).
fn bind(addr: SocketAddr, backlog: u32) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .context("socket")?;
    // As std's bind does on Unix: a restarted gateway binds while old connections linger.
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    socket.bind(addr).context("bind")?;
    socket.listen(backlog).context("listen")
}

/// One timer pings every socket (through its mailbox), rather than a timer per socket.
async fn ping_sessions(app: Arc<App>, shutdown: CancellationToken) {
    let period = app.config().ping_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => app.ping_sessions(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects `n` clients at once to `addr` and counts those whose handshake completes within
    /// half a second (a SYN the kernel dropped is sent again only after a second).
    async fn connected_at_once(addr: SocketAddr, n: usize) -> usize {
        let within = std::time::Duration::from_millis(500);
        let attempts =
            (0..n).map(|_| tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)));
        let results = futures_util::future::join_all(attempts).await;
        results
            .into_iter()
            .filter(|r| matches!(r, Ok(Ok(_))))
            .count()
    }

    /// A burst of connects larger than std's backlog of 128 completes while nothing accepts,
    /// because the listener asks the kernel for the backlog it is given; a small backlog, the
    /// same way, holds only about that many (so the first figure is the setting's doing).
    #[tokio::test]
    async fn a_burst_of_connects_waits_in_the_listen_backlog_it_is_given() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let roomy = bind(any, 512).expect("bind");
        let done = connected_at_once(roomy.local_addr().expect("addr"), 400).await;
        assert_eq!(done, 400, "every handshake completes with a backlog of 512");

        let narrow = bind(any, 16).expect("bind");
        let done = connected_at_once(narrow.local_addr().expect("addr"), 400).await;
        assert!(
            done <= 40,
            "{done} handshakes completed with a backlog of 16"
        );
        drop((roomy, narrow));
    }
}
