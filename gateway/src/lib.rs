//! The gateway: holds client websockets and serves the REST API.
//!
//! Every message a client sends becomes a protobuf record on `inbound` (keyed by the
//! conversation), answered "accepted" only after Kafka's delivery report. The gateway consumes its
//! own `outbound-<gateway_id>` topic and pushes each record to the recipient's socket, and
//! publishes to `presence` which users it holds.
//!
//! - `config`: typed configuration from the environment.
//! - `app`: shared state; send, ack and presence operations used by both transports.
//! - `sessions`: the sockets held, one bounded queue each.
//! - `ws`: one websocket connection (sync, then live, with no gap or duplicate at the seam).
//! - `outbound`: the outbound topic consumer.
//! - `http`: routes, authentication before upgrade, error mapping.
//! - `error`: the errors of each boundary, and the status, frame code or close code of each.
//! - `server`: connections: counted per address from accept, bounded in time, drained on
//!   shutdown.
//! - `upgrade`: the websocket handshake and the socket's buffers.

mod app;
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
use rdkafka::consumer::Consumer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    chat_common::telemetry::metrics_handle();
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka.check_reachable(Duration::from_secs(10)))
        .await?
        .context("kafka")?;
    let shards = db_writer::Shards::connect(&config.shards).context("shards")?;
    let producer = config.kafka.producer()?;
    let group = format!("{}gateway-{}", config.topics.prefix(), config.gateway_id);
    let consumer = config.kafka.consumer(&group)?;
    let outbound_topic = config.topics.outbound(&config.gateway_id);
    consumer
        .subscribe(&[&outbound_topic])
        .context("subscribe to outbound")?;

    // A user holds one session: when they connect to another gateway, the presence log says so
    // and the session here is closed (4001), so the old device does not sit there receiving nothing.
    let sessions = Arc::new(sessions::Sessions::default());
    let me = config.gateway_id.clone();
    let on_route: chat_common::presence::OnRoute = {
        let sessions = sessions.clone();
        Arc::new(move |user, route| {
            if route.online && route.gateway != me {
                sessions.replaced_elsewhere(user, route.epoch);
            }
        })
    };
    chat_common::presence::PresenceView::start(
        &config.kafka,
        &config.topics.presence(),
        Some(on_route),
        shutdown.clone(),
    )
    .await
    .context("presence")?;
    let user_limiter = governor::RateLimiter::keyed(app::quota(config.user_rate));
    let app = Arc::new(app::App {
        config,
        producer,
        shards,
        user_limiter,
        per_addr: Default::default(),
        sessions,
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
    });
    // hyper directly, one connection at a time (warp's own server has no timeouts, and hyper's
    // counts nothing per address): see `server`.
    let listener = std::net::TcpListener::bind(app.config.addr).context("bind")?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let bounds = app.config.http;
    let routes = warp::service(http::routes(app.clone(), bounds));
    let http_server = tokio::spawn(server::serve(
        app.clone(),
        listener,
        routes,
        bounds,
        shutdown.clone(),
    ));
    let outbound = tokio::spawn(outbound::run(app.clone(), consumer, shutdown.clone()));
    // One timer pings every socket (through its mailbox), rather than a timer per socket.
    tokio::spawn({
        let (app, shutdown) = (app.clone(), shutdown.clone());
        async move {
            let period = app.config.ping_interval;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => app.sessions.ping_all(),
                }
            }
        }
    });
    tracing::info!(%addr, gateway = %app.config.gateway_id, outbound = %outbound_topic, "gateway started");

    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        app.sessions.kick_all(error::Close::GoingAway);
        let _ = http_server.await;
        app.tracker.close();
        // Connections close with 1001 and publish their offline presence; bounded wait.
        if tokio::time::timeout(Duration::from_secs(10), app.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close within 10 s");
        }
        let _ = outbound.await;
        use rdkafka::producer::Producer;
        let _ = app.producer.flush(Duration::from_secs(5));
        tracing::info!("gateway stopped");
    });
    Ok(Running { addr, task })
}
