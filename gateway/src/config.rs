//! Gateway configuration, from environment variables (defaults run the local stack).

use std::net::SocketAddr;
use std::time::Duration;

use chat_common::auth::{TokenIssuer, TokenVerifier, DEFAULT_AUDIENCE, DEFAULT_ISSUER};
use chat_common::config::{
    env_or, env_parse, ConfigError, DEFAULT_BROKERS, DEFAULT_SHARD_DSNS, DEV_JWT_SECRET,
};
use chat_common::ids::GatewayId;
use chat_common::kafka::KafkaConfig;
use chat_common::topics::TopicNames;
use db_writer::ShardConfig;

/// Everything a gateway needs to run.
#[derive(Clone)]
pub struct Config {
    /// This gateway's id; it consumes `outbound-<id>`.
    pub gateway_id: GatewayId,
    /// Address of the HTTP server (websocket, REST, web client, health, metrics).
    pub addr: SocketAddr,
    pub kafka: KafkaConfig,
    pub topics: TopicNames,
    /// Shards, read for history and sync (writes go through Kafka and the multiplexer).
    pub shards: ShardConfig,
    pub verifier: TokenVerifier,
    /// Set only when dev tokens are enabled (`DEV_TOKENS=true`, local stack only): serves
    /// `GET /dev/token/{user}`.
    pub dev_issuer: Option<TokenIssuer>,
    /// Largest message body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Frames queued per socket before it counts as not draining and is closed.
    pub socket_queue: usize,
    /// Initial read buffer of a websocket (it grows to the frame being read): the main cost of
    /// an idle connection, so small.
    pub ws_read_buffer_bytes: usize,
    /// Sends awaiting Kafka's delivery report per socket; more get an error frame.
    pub max_in_flight: usize,
    /// Directory of the web client's static files, served at `/` (none when unset or missing).
    pub web_dir: Option<std::path::PathBuf>,
    /// Browser origins allowed to open a websocket (cross-site websocket hijacking defence).
    /// Empty: same origin only (the Origin's host:port equals the Host header). Requests without
    /// an Origin header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Frames per second one connection may send, sustained, and the burst above that.
    pub conn_rate: (u32, u32),
    /// Messages per second one user may send over all connections and REST, and the burst.
    pub user_rate: (u32, u32),
    /// How often the server pings each socket; a socket silent for two intervals is closed.
    pub ping_interval: std::time::Duration,
    /// Most sockets from one source address.
    pub max_conns_per_addr: usize,
    /// How long a client may take to send its request headers (the websocket handshake
    /// included) before the connection is closed.
    pub handshake_timeout: std::time::Duration,
    /// How long an HTTP connection that is not a websocket may hold a descriptor without progress.
    pub http: HttpBounds,
    /// Syncs run at once; a connect beyond that waits for a slot (its socket open, `welcome`
    /// sent, live messages held). Bounds what a reconnect storm asks of the shards.
    pub max_concurrent_syncs: usize,
    /// The deployment's retention mode: in delete-on-ack mode the conversation list shows no
    /// previews.
    pub retention: db_writer::Retention,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and secrets stay out of logs.
        f.debug_struct("Config")
            .field("gateway_id", &self.gateway_id)
            .field("addr", &self.addr)
            .field("kafka", &self.kafka)
            .field("topics", &self.topics)
            .field("shards", &self.shards.dsns.len())
            .field("dev_tokens", &self.dev_issuer.is_some())
            .finish()
    }
}

impl Config {
    /// Reads the environment; every variable, with its default, is listed in
    /// `docs/configuration.md` (a test keeps the list and the code in step).
    pub fn from_env() -> Result<Self, ConfigError> {
        let id = env_or("GATEWAY_ID", "gw1");
        let gateway_id =
            GatewayId::parse(&id).map_err(|e| ConfigError::new("GATEWAY_ID", id.clone(), e))?;
        let dsns = env_or("SHARD_DSNS", DEFAULT_SHARD_DSNS);
        // The gateway only reads, by key: generic plans (docs/design.md).
        let shards = ShardConfig::from_list(&dsns, env_parse("SHARD_POOL_SIZE", 8)?)
            .map_err(|e| ConfigError::new("SHARD_DSNS", dsns.clone(), e))?
            .with_plans(db_writer::Plans::Auto);
        let issuer = env_or("JWT_ISSUER", DEFAULT_ISSUER);
        let audience = env_or("JWT_AUDIENCE", DEFAULT_AUDIENCE);
        let secret = env_or("JWT_SECRET", DEV_JWT_SECRET);
        let verifier = match std::env::var("JWT_PUBLIC_KEY_FILE") {
            Ok(path) if !path.is_empty() => {
                let pem = std::fs::read(&path)
                    .map_err(|e| ConfigError::new("JWT_PUBLIC_KEY_FILE", path.clone(), e))?;
                TokenVerifier::rs256(&pem, &issuer, &audience)
                    .map_err(|e| ConfigError::new("JWT_PUBLIC_KEY_FILE", path.clone(), e))?
            }
            _ => TokenVerifier::hs256(secret.as_bytes(), &issuer, &audience),
        };
        let dev_issuer = env_parse("DEV_TOKENS", false)?
            .then(|| TokenIssuer::hs256(secret.as_bytes(), &issuer, &audience));
        Ok(Self {
            gateway_id,
            addr: env_parse("GATEWAY_ADDR", "127.0.0.1:8080".parse().expect("valid"))?,
            kafka: KafkaConfig::new(env_or("KAFKA_BROKERS", DEFAULT_BROKERS)).with_env_opts()?,
            topics: TopicNames::new(env_or("TOPIC_PREFIX", "")),
            shards,
            verifier,
            dev_issuer,
            max_body_bytes: env_parse("MAX_BODY_BYTES", 4096)?,
            socket_queue: env_parse("SOCKET_QUEUE", 1024)?,
            ws_read_buffer_bytes: env_parse("WS_READ_BUFFER_BYTES", 256)?,
            max_in_flight: env_parse("MAX_IN_FLIGHT", 256)?,
            web_dir: Some(env_or("WEB_DIR", "web/public").into()),
            allowed_origins: env_or("ALLOWED_ORIGINS", "")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            conn_rate: (
                env_parse("CONN_RATE_PER_SEC", 50)?,
                env_parse("CONN_RATE_BURST", 200)?,
            ),
            user_rate: (
                env_parse("USER_RATE_PER_SEC", 100)?,
                env_parse("USER_RATE_BURST", 400)?,
            ),
            ping_interval: std::time::Duration::from_secs(env_parse("PING_INTERVAL_SECS", 30)?),
            max_conns_per_addr: env_parse("MAX_CONNS_PER_ADDR", 60_000)?,
            handshake_timeout: std::time::Duration::from_secs(env_parse(
                "HANDSHAKE_TIMEOUT_SECS",
                10,
            )?),
            http: HttpBounds::from_env()?,
            max_concurrent_syncs: env_parse("MAX_CONCURRENT_SYNCS", 64)?,
            retention: env_parse("RETENTION", db_writer::Retention::Keep)?,
        })
    }
}

/// How long an HTTP connection may hold the server's resources without progress. With the
/// header-read timeout (`Config::handshake_timeout`) these bound every phase of a connection
/// that has not become a websocket, so each descriptor it holds comes back in bounded time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpBounds {
    /// A keep-alive connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A request body (`PUT /messages`) not fully received within this long is answered 408
    /// and its connection closed.
    pub body_timeout: Duration,
    /// A request not answered within this long from the end of its headers is answered 408
    /// and its connection closed (a websocket upgrade is answered at once; the socket that
    /// follows is bounded by its pings, not by this).
    pub request_timeout: Duration,
}

impl Default for HttpBounds {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl HttpBounds {
    /// Reads `HTTP_IDLE_TIMEOUT_SECS` (default 60), `HTTP_BODY_TIMEOUT_SECS` (10) and
    /// `HTTP_REQUEST_TIMEOUT_SECS` (30). A zero is refused: it would close every connection.
    pub fn from_env() -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let secs = |name: &str, default: Duration| -> Result<Duration, ConfigError> {
            let n: u64 = env_parse(name, default.as_secs())?;
            if n == 0 {
                return Err(ConfigError {
                    name: name.to_owned(),
                    value: n.to_string(),
                    reason: "must be at least 1 second".to_owned(),
                });
            }
            Ok(Duration::from_secs(n))
        };
        Ok(Self {
            idle_timeout: secs("HTTP_IDLE_TIMEOUT_SECS", defaults.idle_timeout)?,
            body_timeout: secs("HTTP_BODY_TIMEOUT_SECS", defaults.body_timeout)?,
            request_timeout: secs("HTTP_REQUEST_TIMEOUT_SECS", defaults.request_timeout)?,
        })
    }
}
