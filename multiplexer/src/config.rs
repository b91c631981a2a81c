//! Multiplexer configuration, from environment variables (defaults run the local stack).

use std::net::SocketAddr;
use std::time::Duration;

use chat_common::config::{env_or, env_parse, ConfigError, DEFAULT_BROKERS, DEFAULT_SHARD_DSNS};
use chat_common::kafka::KafkaConfig;
use chat_common::topics::TopicNames;
use db_writer::{Retention, ShardConfig};

/// Everything a multiplexer needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicNames,
    /// Consumer group over `inbound` (all multiplexers of a deployment share it).
    pub group: String,
    pub shards: ShardConfig,
    pub retention: Retention,
    /// Most records handled in one batch (one shard transaction per shard per batch).
    pub max_batch: usize,
    /// How long to wait to fill a batch once its first record arrived.
    pub batch_wait: Duration,
    /// Write the pushes for a gateway as batch records (one per gateway per batch) rather than
    /// one record per push. Gateways read both; turn off while gateways of an earlier version,
    /// which read only single records, still run.
    pub outbound_batches: bool,
    /// Address of `/healthz`, `/readyz`, `/metrics`.
    pub http_addr: SocketAddr,
    /// In delete-on-ack mode, how long an unacked message is kept before its body is erased.
    pub unacked_ttl: Duration,
    /// How often the expiry sweep runs (delete-on-ack mode).
    pub expiry_interval: Duration,
}

impl Config {
    /// Reads the environment; every variable, with its default, is listed in
    /// `docs/configuration.md` (a test keeps the list and the code in step).
    pub fn from_env() -> Result<Self, ConfigError> {
        let dsns = env_or("SHARD_DSNS", DEFAULT_SHARD_DSNS);
        let shards = ShardConfig::from_list(&dsns, env_parse("SHARD_POOL_SIZE", 8)?)
            .map_err(|e| ConfigError::new("SHARD_DSNS", dsns.clone(), e))?;
        let mut kafka = KafkaConfig {
            // A batch's pushes to one gateway are one record, sent when the batch is done:
            // there is nothing to wait for.
            linger: Duration::ZERO,
            ..KafkaConfig::new(env_or("KAFKA_BROKERS", DEFAULT_BROKERS))
        }
        .with_env_opts()?;
        kafka.max_poll_interval =
            Duration::from_millis(env_parse("MULTIPLEXER_MAX_POLL_INTERVAL_MS", 60_000)?);
        Ok(Self {
            kafka,
            topics: TopicNames::new(env_or("TOPIC_PREFIX", "")),
            group: env_or("MULTIPLEXER_GROUP", "multiplexer"),
            shards,
            retention: env_parse("RETENTION", Retention::Keep)?,
            max_batch: env_parse("MULTIPLEXER_MAX_BATCH", 2000)?,
            batch_wait: Duration::from_millis(env_parse("MULTIPLEXER_BATCH_WAIT_MS", 2)?),
            outbound_batches: env_parse("MULTIPLEXER_OUTBOUND_BATCH", true)?,
            http_addr: env_parse(
                "MULTIPLEXER_HTTP_ADDR",
                "127.0.0.1:9300".parse().expect("valid"),
            )?,
            unacked_ttl: Duration::from_secs(env_parse("UNACKED_TTL_SECS", 30 * 24 * 3600)?),
            expiry_interval: Duration::from_secs(env_parse("EXPIRY_INTERVAL_SECS", 60)?),
        })
    }
}
