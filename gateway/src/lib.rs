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
//! - `outbound`: the outbound topic consumer.
//! - `http`: the routes table and one handler per route; authentication before upgrade;
//!   rejections rendered as JSON errors.
//! - `error`: the errors of each boundary, and the status, frame code or close code of each.
//! - `server`: connections: counted per address from accept, bounded in time, drained on
//!   shutdown.
//! - `upgrade`: the websocket handshake and the socket's buffers.
//! - `catalogue`: the metric families the gateway records, registered at start.
//!
//! Imports run one way: `error` and `config` at the bottom, then `sessions`, then `app`, then the
//! transports (`upgrade`, `ws`, `server`, `outbound`), and `http`, which makes routes of them.
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

pub use config::{Config, HttpBounds};

/// A started gateway.
pub struct Running {
    /// Where the HTTP server listens (useful with port 0).
    pub addr: SocketAddr,
    /// Ends when the gateway has drained after `shutdown`.
    pub task: JoinHandle<()>,
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
    let listener = bind(app.config().addr)?;
    let addr = listener.local_addr()?;
    let bounds = app.config().http;
    let routes = warp::service(http::routes(app.clone()));
    let http_server = tokio::spawn(server::serve(
        app.clone(),
        listener,
        routes,
        bounds,
        shutdown.clone(),
    ));
    let outbound = tokio::spawn(outbound::run(app.clone(), consumer, shutdown.clone()));
    tokio::spawn(ping_sessions(app.clone(), shutdown.clone()));
    tracing::info!(%addr, gateway = %app.config().gateway_id, outbound = %outbound_topic, "gateway started");

    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        app.close_sessions(error::Close::GoingAway);
        let _ = http_server.await;
        // Connections close with 1001 and publish their offline presence; bounded wait.
        if !app.drain(Duration::from_secs(10)).await {
            tracing::warn!("some connections did not close within 10 s");
        }
        let _ = outbound.await;
        app.flush(Duration::from_secs(5));
        tracing::info!("gateway stopped");
    });
    Ok(Running { addr, task })
}

/// The consumer of this gateway's outbound topic, subscribed.
fn outbound_consumer(config: &Config, topic: &str) -> anyhow::Result<StreamConsumer> {
    let group = format!("{}gateway-{}", config.topics.prefix(), config.gateway_id);
    let consumer = config.kafka.consumer(&group)?;
    consumer
        .subscribe(&[topic])
        .context("subscribe to outbound")?;
    Ok(consumer)
}

fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).context("bind")?;
    listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
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
