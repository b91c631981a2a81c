//! The multiplexer: consumes `inbound` in a consumer group, stores each message in the shard the
//! locator names (assigning its per-conversation sequence), applies acks, and produces each
//! stored message to `outbound-<gateway>` of the gateway holding the recipient.
//!
//! - [`config`]: typed configuration from the environment.
//! - `catalogue`: the metric families the multiplexer records, registered at start.
//! - [`pipeline`]: the batch loop; offsets are stored only after the shard commit and every
//!   outbound delivery report; records that can never be stored go to `inbound-dlq`.
//!
//! [`start`] wires them together and is what `main` and the tests call.

mod catalogue;
pub mod config;
mod holding;
pub mod pipeline;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chat_common::http::{ops_routes, NotReady, Ready, ReadyCheck};
use rdkafka::consumer::Consumer;
use rdkafka::types::RDKafkaRespErr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// A started multiplexer.
pub struct Running {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub http_addr: SocketAddr,
    /// Ends when the multiplexer has stopped (after `shutdown` fired).
    pub task: JoinHandle<()>,
}

/// Checks the dependencies, applies shard migrations, and starts the loop and the HTTP server.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    chat_common::telemetry::register_metrics(
        "multiplexer",
        env!("CARGO_PKG_VERSION"),
        &[
            catalogue::FAMILIES,
            db_writer::catalogue::POOL_FAMILIES,
            db_writer::catalogue::WRITE_FAMILIES,
            chat_common::telemetry::PRESENCE_FAMILIES,
        ],
    );
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || kafka.check_reachable(Duration::from_secs(10)))
        .await?
        .context("kafka")?;
    let producer = config.kafka.producer()?;
    // Dead letters are produced only when a bad record comes: check now that their topic exists,
    // rather than find out then, with the partition held until it does.
    let dlq = config.topics.inbound_dlq();
    let client = producer.clone();
    let (dlq_partitions, refused) = tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(Some(&dlq), Duration::from_secs(10))
            .map(|md| {
                let refused = md.topics().iter().any(|t| {
                    t.error() == Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
                });
                let partitions = md
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none())
                    .map(|t| t.partitions().len())
                    .sum::<usize>();
                (partitions, refused)
            })
    })
    .await?
    .context("reading the dead-letter topic's metadata")?;
    // Without DESCRIBE on it the broker says no more than that: not "it does not exist".
    anyhow::ensure!(
        !refused,
        "the broker refuses this multiplexer's Kafka user topic {}: grant it the deployment's \
         ACLs (`chatctl acls`, or the Terraform module)",
        config.topics.inbound_dlq()
    );
    anyhow::ensure!(
        dlq_partitions > 0,
        "topic {} does not exist: create it (`chatctl topics`, or the Terraform module)",
        config.topics.inbound_dlq()
    );
    let shards = db_writer::Shards::connect(&config.shards).context("shards")?;
    // A shard down at start does not keep the multiplexer from starting (a restart during a
    // shard outage would otherwise stop every shard): its records are held from the start, and
    // it is migrated or checked once it answers. Every shard down is refused (a wrong setting
    // looks the same).
    let down: Vec<usize> = shards
        .down_shards(Duration::from_secs(5))
        .await
        .iter()
        .map(|d| d.shard)
        .collect();
    anyhow::ensure!(
        down.len() < shards.len(),
        "no shard answers: {}",
        db_writer::ShardDown::list(&shards.down_shards(Duration::from_secs(5)).await)
    );
    if !down.is_empty() {
        tracing::warn!(
            ?down,
            "shards down at start: their records are held until they answer and are checked"
        );
    }
    for shard in (0..shards.len()).filter(|s| !down.contains(s)) {
        pipeline::check_schema(&shards, shard, config.migrate).await?;
    }

    let presence = chat_common::presence::PresenceView::start(
        &config.kafka,
        &config.topics.presence(),
        None,
        shutdown.clone(),
    )
    .await
    .context("presence")?;
    let consumer = config.kafka.consumer(&config.group)?;
    consumer
        .subscribe(&[&config.topics.inbound()])
        .context("subscribe to inbound")?;
    let consumer = Arc::new(consumer);
    tokio::spawn(pipeline::report_lag(
        consumer.clone(),
        Duration::from_secs(5),
        shutdown.clone(),
    ));

    // Ready while at least one shard answers, like a gateway: the records a shard that is down
    // needs are held aside and the others pass (docs/design.md, "One shard down"), so the
    // answer says which shards are down (`degraded`), and is not ready only when none answers.
    // Nothing routes traffic by a multiplexer's readiness (it only consumes).
    let (ready_shards, ready_producer) = (shards.clone(), producer.clone());
    let ready: ReadyCheck = Arc::new(move || {
        let (shards, producer) = (ready_shards.clone(), ready_producer.clone());
        Box::pin(async move {
            chat_common::http::kafka_ready(producer).await?;
            let down = shards.down_shards(Duration::from_secs(2)).await;
            if down.is_empty() {
                return Ok(Ready::default());
            }
            let named = db_writer::ShardDown::list(&down);
            if down.len() == shards.len() {
                return Err(NotReady::new(
                    "shards",
                    format!("every shard down: {named}"),
                ));
            }
            Ok(Ready::degraded(format!(
                "shards down ({} of {}), their records held: {named}",
                down.len(),
                shards.len()
            )))
        })
    });
    let (http_addr, server) = warp::serve(ops_routes(ready))
        .try_bind_with_graceful_shutdown(config.http_addr, {
            let s = shutdown.clone();
            async move { s.cancelled().await }
        })
        .context("bind http")?;
    let server = tokio::spawn(server);

    if config.retention == db_writer::Retention::DeleteOnAck {
        tokio::spawn(expiry_sweep(
            shards.clone(),
            config.unacked_ttl,
            config.erased_row_ttl,
            config.expiry_interval,
            shutdown.clone(),
        ));
    }
    tracing::info!(%http_addr, group = %config.group, inbound = %config.topics.inbound(), "multiplexer started");
    let pipeline = pipeline::Pipeline {
        config,
        consumer,
        producer,
        shards,
        presence,
        unchecked: down,
    };
    let task = tokio::spawn(async move {
        pipeline.run(shutdown).await;
        let _ = server.await;
    });
    Ok(Running { http_addr, task })
}

/// Delete-on-ack retention, every `interval`: erases unacked messages older than `ttl` (and
/// destroys their keys), and deletes the rows erased more than `erased_ttl` ago. Idempotent, so
/// several multiplexers running it at once only repeat work.
async fn expiry_sweep(
    shards: db_writer::Shards,
    ttl: Duration,
    erased_ttl: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    let mut indexed = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The sweep reads its own index, which keep mode does not have. `db-writer migrate
        // --retention delete-on-ack` builds it as the shards' owner; a multiplexer that finds it
        // missing builds it if its role may (without blocking writes; the multiplexer runs
        // meanwhile), and otherwise says what to run and tries again at the next sweep.
        if !indexed {
            let built = tokio::select! {
                _ = shutdown.cancelled() => return,
                built = shards.ensure_sweep_index() => built,
            };
            match built {
                Ok(()) => indexed = true,
                Err(e @ db_writer::SweepIndexError::NotOwner { .. }) => {
                    tracing::error!(
                        error = %e,
                        "delete-on-ack: no unacked message expires until the sweep's index exists; trying again at the next sweep"
                    );
                    metrics::counter!("multiplexer_errors_total", "kind" => "sweep_index")
                        .increment(1);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "building the sweep index failed; trying again at the next sweep");
                    metrics::counter!("multiplexer_errors_total", "kind" => "sweep_index")
                        .increment(1);
                    continue;
                }
            }
        }
        let now = chat_common::now_ms();
        let cutoff = now - i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        match shards.expire_unacked(cutoff, now).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(expired = n, "unacked messages expired");
                metrics::counter!("multiplexer_messages_expired_total").increment(n);
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        let before = now - i64::try_from(erased_ttl.as_millis()).unwrap_or(i64::MAX);
        match shards.purge_erased(before).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    purged = n,
                    "rows past the metadata window deleted (erased messages, failure records)"
                );
                metrics::counter!("multiplexer_rows_purged_total").increment(n);
            }
            Err(e) => tracing::warn!(error = %e, "purge of erased rows failed"),
        }
    }
}
