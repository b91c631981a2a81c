//! Gateway configuration: flags with environment variables behind them ([`Args`], defaults run
//! the local stack), turned into the [`Config`] the gateway runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chat_common::auth::{TokenIssuer, TokenVerifier, DEFAULT_AUDIENCE, DEFAULT_ISSUER};
use chat_common::config::{parse_args, ConfigError, ShardArgs, DEV_JWT_SECRET};
use chat_common::ids::GatewayId;
use chat_common::kafka::{KafkaArgs, KafkaConfig};
use chat_common::topics::TopicNames;
use clap::{ArgAction, CommandFactory, Parser};
use db_writer::ShardConfig;

/// Everything a gateway needs to run.
#[derive(Clone)]
pub struct Config {
    /// This gateway's id; it consumes `outbound-<id>`.
    pub gateway_id: GatewayId,
    /// Address of the public HTTP server (websocket, REST, web client; `/healthz` too).
    pub addr: SocketAddr,
    /// Address of the operations listener: `/metrics`, `/healthz`, `/readyz`. Never the public
    /// one: only the monitoring network reaches it.
    pub metrics_addr: SocketAddr,
    /// Connections the kernel completes and holds for the public listener until it accepts
    /// them (`listen`'s backlog; the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// The public listener's certificate and key; plain HTTP when unset (behind a
    /// TLS-terminating load balancer).
    pub tls: Option<TlsFiles>,
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
            .field("metrics_addr", &self.metrics_addr)
            .field("tls", &self.tls)
            .field("kafka", &self.kafka)
            .field("topics", &self.topics)
            .field("shards", &self.shards.dsns.len())
            .field("dev_tokens", &self.dev_issuer.is_some())
            .finish()
    }
}

/// A gateway's settings as declared to its command line: each a flag with an environment variable
/// behind it and the default that runs the local stack. `gateway --help` lists them, and
/// `docs/configuration.md` is checked against this declaration (a test keeps the two in step).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "Holds client websockets, produces their messages to Kafka, pushes what its outbound topic carries.",
    after_help = "Every setting is a flag or the environment variable named beside it (the flag wins); \
                  a variable set to the empty string counts as unset. Logging: RUST_LOG (default \
                  info) and LOG_FORMAT (json for JSON lines). See docs/configuration.md."
)]
pub struct Args {
    /// Unique id of this gateway (user id alphabet); it consumes outbound-<id>.
    #[arg(long, env = "GATEWAY_ID", default_value = "gw1", value_name = "ID", value_parser = GatewayId::parse)]
    pub gateway_id: GatewayId,
    /// Public listen address: websocket, REST, web client (and /healthz).
    #[arg(
        long,
        env = "GATEWAY_ADDR",
        default_value = "127.0.0.1:8080",
        value_name = "HOST:PORT"
    )]
    pub gateway_addr: SocketAddr,
    /// Operations listen address: /metrics, /healthz, /readyz (keep it off the public network).
    #[arg(
        long,
        env = "GATEWAY_METRICS_ADDR",
        default_value = "127.0.0.1:9100",
        value_name = "HOST:PORT"
    )]
    pub gateway_metrics_addr: SocketAddr,
    /// Connections the kernel completes and holds until the gateway accepts them (listen's
    /// backlog, capped by net.core.somaxconn); a burst of connects beyond it loses SYNs, which
    /// clients send again only after 1, 3, 7 s.
    #[arg(
        long,
        env = "LISTEN_BACKLOG",
        default_value_t = 4096,
        value_parser = clap::value_parser!(u32).range(1..),
        value_name = "CONNECTIONS"
    )]
    pub listen_backlog: u32,
    /// PEM certificate chain: the public listener serves TLS (reloaded when the file changes).
    #[arg(
        long,
        env = "TLS_CERT_FILE",
        value_name = "PATH",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of TLS_CERT_FILE's certificate.
    #[arg(
        long,
        env = "TLS_KEY_FILE",
        value_name = "PATH",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Shards, read for history, sync and the conversation list.
    #[command(flatten)]
    pub shards: ShardArgs,
    /// keep, or delete-on-ack (the conversation list then shows no previews).
    #[arg(long, env = "RETENTION", default_value = "keep", value_name = "MODE", value_parser = parse_retention)]
    pub retention: db_writer::Retention,
    /// HS256 secret that signs and verifies tokens. Without it or JWT_PUBLIC_KEY_FILE the gateway
    /// refuses to start, unless DEV_TOKENS=true (then the development secret is used).
    #[arg(
        long,
        env = "JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// Required iss claim.
    #[arg(long, env = "JWT_ISSUER", default_value = DEFAULT_ISSUER, value_name = "ISS")]
    pub jwt_issuer: String,
    /// Required aud claim.
    #[arg(long, env = "JWT_AUDIENCE", default_value = DEFAULT_AUDIENCE, value_name = "AUD")]
    pub jwt_audience: String,
    /// RS256 public key (PEM file); when set, HS256 tokens are not accepted.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE", value_name = "PATH")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// true serves GET /dev/token/{user} and allows the development secret (local stack only).
    #[arg(long, env = "DEV_TOKENS", default_value_t = false, action = ArgAction::Set, value_name = "BOOL")]
    pub dev_tokens: bool,
    /// Largest message body, bytes of UTF-8.
    #[arg(
        long,
        env = "MAX_BODY_BYTES",
        default_value_t = 4096,
        value_name = "BYTES"
    )]
    pub max_body_bytes: usize,
    /// Frames queued per socket before it is closed as not draining.
    #[arg(
        long,
        env = "SOCKET_QUEUE",
        default_value_t = 1024,
        value_name = "FRAMES"
    )]
    pub socket_queue: usize,
    /// Initial read buffer per websocket (grows to the frame being read).
    #[arg(
        long,
        env = "WS_READ_BUFFER_BYTES",
        default_value_t = 256,
        value_name = "BYTES"
    )]
    pub ws_read_buffer_bytes: usize,
    /// Sends per socket awaiting Kafka's ack; more get too_many_in_flight.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 256, value_name = "N")]
    pub max_in_flight: usize,
    /// Static files of the web client, served at / (nothing is served if it is missing).
    #[arg(
        long,
        env = "WEB_DIR",
        default_value = "web/public",
        value_name = "DIR"
    )]
    pub web_dir: PathBuf,
    /// Browser origins allowed to open a websocket, comma separated (empty: same origin only).
    #[arg(
        long,
        env = "ALLOWED_ORIGINS",
        default_value = "",
        value_name = "ORIGIN,..."
    )]
    pub allowed_origins: String,
    /// Frames per second per connection, sustained.
    #[arg(
        long,
        env = "CONN_RATE_PER_SEC",
        default_value_t = 50,
        value_name = "N"
    )]
    pub conn_rate_per_sec: u32,
    /// Frames a connection may send in a burst above its rate.
    #[arg(long, env = "CONN_RATE_BURST", default_value_t = 200, value_name = "N")]
    pub conn_rate_burst: u32,
    /// Sends per second per user over all connections and REST, sustained.
    #[arg(
        long,
        env = "USER_RATE_PER_SEC",
        default_value_t = 100,
        value_name = "N"
    )]
    pub user_rate_per_sec: u32,
    /// Sends a user may make in a burst above their rate.
    #[arg(long, env = "USER_RATE_BURST", default_value_t = 400, value_name = "N")]
    pub user_rate_burst: u32,
    /// Seconds between server pings; a socket silent for two intervals is closed.
    #[arg(
        long,
        env = "PING_INTERVAL_SECS",
        default_value_t = 30,
        value_name = "SECS"
    )]
    pub ping_interval_secs: u64,
    /// Syncs run at once; a connect beyond that waits for a slot.
    #[arg(
        long,
        env = "MAX_CONCURRENT_SYNCS",
        default_value_t = 64,
        value_name = "N"
    )]
    pub max_concurrent_syncs: usize,
    /// Open connections per source address.
    #[arg(
        long,
        env = "MAX_CONNS_PER_ADDR",
        default_value_t = 60_000,
        value_name = "N"
    )]
    pub max_conns_per_addr: usize,
    /// Seconds a client has to send its request headers (slowloris defence).
    #[arg(
        long,
        env = "HANDSHAKE_TIMEOUT_SECS",
        default_value_t = 10,
        value_name = "SECS"
    )]
    pub handshake_timeout_secs: u64,
    /// Seconds a connection with no request in flight is kept; at least 1.
    #[arg(long, env = "HTTP_IDLE_TIMEOUT_SECS", default_value_t = 60, value_name = "SECS", value_parser = at_least_one_second)]
    pub http_idle_timeout_secs: u64,
    /// Seconds a PUT /messages body has to arrive in full; at least 1.
    #[arg(long, env = "HTTP_BODY_TIMEOUT_SECS", default_value_t = 10, value_name = "SECS", value_parser = at_least_one_second)]
    pub http_body_timeout_secs: u64,
    /// Seconds a request has to be answered from the end of its headers; at least 1.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_name = "SECS", value_parser = at_least_one_second)]
    pub http_request_timeout_secs: u64,
}

/// A timeout in whole seconds; zero is refused, as it would close every connection.
fn at_least_one_second(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1 second".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_retention(s: &str) -> Result<db_writer::Retention, db_writer::UnknownRetention> {
    s.parse()
}

impl Config {
    /// The declaration of the gateway's settings as a command (what `gateway --help` prints):
    /// each argument's flag, variable and default.
    pub fn command() -> clap::Command {
        Args::command()
    }

    /// Reads the process's flags and environment. `--help` and `--version` print and exit 0, a
    /// value that does not parse exits 2 naming it, before anything else happens (see
    /// [`chat_common::config::parse_args`]).
    pub fn from_command_line() -> Result<Self, ConfigError> {
        Self::from_args(parse_args())
    }

    /// The configuration `args` declare. Refuses what parses but cannot be used (the shard list,
    /// the public key file), naming the variable.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let dsns = &args.shards.shard_dsns;
        // The gateway only reads, by key: generic plans (docs/design.md).
        let shards = ShardConfig::from_list(dsns, args.shards.shard_pool_size)
            .map_err(|e| ConfigError::new("SHARD_DSNS", dsns.clone(), e))?
            .with_plans(db_writer::Plans::Auto);
        let (issuer, audience) = (&args.jwt_issuer, &args.jwt_audience);
        let secret = match (&args.jwt_secret, &args.jwt_public_key_file, args.dev_tokens) {
            (Some(secret), _, _) => secret.clone(),
            // Dev tokens are signed with the secret; with a public key they would not verify.
            (None, Some(_), _) => String::new(),
            // Local stack only: the development secret is in this repository.
            (None, None, true) => DEV_JWT_SECRET.to_owned(),
            (None, None, false) => return Err(no_token_key()),
        };
        let secret = &secret;
        let verifier = match &args.jwt_public_key_file {
            Some(path) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path)
                    .map_err(|e| ConfigError::new("JWT_PUBLIC_KEY_FILE", shown.clone(), e))?;
                TokenVerifier::rs256(&pem, issuer, audience)
                    .map_err(|e| ConfigError::new("JWT_PUBLIC_KEY_FILE", shown, e))?
            }
            None => TokenVerifier::hs256(secret.as_bytes(), issuer, audience),
        };
        let dev_issuer = (args.dev_tokens && !secret.is_empty())
            .then(|| TokenIssuer::hs256(secret.as_bytes(), issuer, audience));
        let tls = match (args.tls_cert_file, args.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                reload_every: TLS_RELOAD_EVERY,
            }),
            // clap requires both or neither.
            _ => None,
        };
        Ok(Self {
            gateway_id: args.gateway_id,
            addr: args.gateway_addr,
            metrics_addr: args.gateway_metrics_addr,
            listen_backlog: args.listen_backlog,
            tls,
            kafka: KafkaConfig::from_args(&args.kafka),
            topics: TopicNames::new(args.kafka.topic_prefix.clone()),
            shards,
            verifier,
            dev_issuer,
            max_body_bytes: args.max_body_bytes,
            socket_queue: args.socket_queue,
            ws_read_buffer_bytes: args.ws_read_buffer_bytes,
            max_in_flight: args.max_in_flight,
            web_dir: Some(args.web_dir),
            allowed_origins: args
                .allowed_origins
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            conn_rate: (args.conn_rate_per_sec, args.conn_rate_burst),
            user_rate: (args.user_rate_per_sec, args.user_rate_burst),
            ping_interval: Duration::from_secs(args.ping_interval_secs),
            max_conns_per_addr: args.max_conns_per_addr,
            handshake_timeout: Duration::from_secs(args.handshake_timeout_secs),
            http: HttpBounds {
                idle_timeout: Duration::from_secs(args.http_idle_timeout_secs),
                body_timeout: Duration::from_secs(args.http_body_timeout_secs),
                request_timeout: Duration::from_secs(args.http_request_timeout_secs),
            },
            max_concurrent_syncs: args.max_concurrent_syncs,
            retention: args.retention,
        })
    }
}

/// The refusal of a gateway with no way to verify tokens but the development secret, which
/// anyone can read in this repository.
fn no_token_key() -> ConfigError {
    ConfigError::new(
        "JWT_SECRET",
        "",
        "no token key: set JWT_SECRET (HS256) or JWT_PUBLIC_KEY_FILE (RS256); \
         DEV_TOKENS=true allows the development secret (local stack only)",
    )
}

/// The public listener's certificate chain and key (PEM files), and how often they are read
/// to see whether they changed (see `crate::tls`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often both files are read; a changed, valid pair replaces the one served.
    pub reload_every: Duration,
}

/// The default of [`TlsFiles::reload_every`]: a renewal is served within a few seconds.
pub const TLS_RELOAD_EVERY: Duration = Duration::from_secs(2);

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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    /// `args` parsed as the gateway's command line, with no environment variable in play.
    fn parse(args: &[&str]) -> Result<Config, String> {
        let cmd = Args::command().mut_args(|a| a.env(clap::builder::Resettable::Reset));
        let matches = cmd
            .try_get_matches_from(std::iter::once("gateway").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let args = Args::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        Config::from_args(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_run_the_local_stack() {
        let c = parse(&["--jwt-secret", "s"]).expect("the defaults parse");
        assert_eq!(c.gateway_id.as_str(), "gw1");
        assert_eq!(c.addr, "127.0.0.1:8080".parse().expect("an address"));
        assert_eq!(
            c.metrics_addr,
            "127.0.0.1:9100".parse().expect("an address")
        );
        assert_eq!(c.tls, None);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.linger, Duration::from_millis(10));
        assert_eq!(c.kafka.linger_above, 2000);
        assert!(c.kafka.producer_opts.is_empty() && c.kafka.consumer_opts.is_empty());
        assert_eq!(c.topics.prefix(), "");
        assert_eq!(c.shards.dsns.len(), 4);
        assert_eq!(c.shards.pool_size, 8);
        assert!(c.dev_issuer.is_none());
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.socket_queue, 1024);
        assert_eq!(c.ws_read_buffer_bytes, 256);
        assert_eq!(c.max_in_flight, 256);
        assert_eq!(c.web_dir, Some(PathBuf::from("web/public")));
        assert!(c.allowed_origins.is_empty());
        assert_eq!((c.conn_rate, c.user_rate), ((50, 200), (100, 400)));
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.max_conns_per_addr, 60_000);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.http, HttpBounds::default());
        assert_eq!(c.max_concurrent_syncs, 64);
        assert_eq!(c.retention, db_writer::Retention::Keep);
    }

    #[test]
    fn flags_set_what_the_variables_set() {
        let c = parse(&[
            "--gateway-metrics-addr",
            "0.0.0.0:9101",
            "--tls-cert-file",
            "/c.pem",
            "--tls-key-file",
            "/k.pem",
            "--gateway-id",
            "gw2",
            "--gateway-addr",
            "127.0.0.1:8081",
            "--dev-tokens",
            "true",
            "--allowed-origins",
            "https://a.example, https://b.example,,",
            "--conn-rate-burst",
            "9",
            "--http-body-timeout-secs",
            "3",
            "--kafka-linger-above",
            "0",
        ])
        .expect("valid flags");
        assert_eq!(c.gateway_id.as_str(), "gw2");
        assert_eq!(c.addr.port(), 8081);
        assert_eq!(c.metrics_addr, "0.0.0.0:9101".parse().expect("an address"));
        let tls = c.tls.expect("TLS files");
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str()),
            (Some("/c.pem"), Some("/k.pem"))
        );
        assert!(c.dev_issuer.is_some());
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(c.conn_rate, (50, 9));
        assert_eq!(c.http.body_timeout, Duration::from_secs(3));
        assert_eq!(c.kafka.linger_above, 0);
    }

    #[test]
    fn bad_values_are_refused_naming_the_setting() {
        let e = parse(&["--tls-cert-file", "/c.pem", "--jwt-secret", "s"]).expect_err("no key");
        assert!(e.contains("--tls-key-file"), "{e}");
        let e = parse(&["--http-idle-timeout-secs", "0"]).expect_err("zero closes everything");
        assert!(
            e.contains("--http-idle-timeout-secs") && e.contains("at least 1 second"),
            "{e}"
        );
        let e = parse(&["--gateway-id", "gw 1"]).expect_err("not an id");
        assert!(e.contains("--gateway-id"), "{e}");
        let e = parse(&["--dev-tokens", "yes"]).expect_err("true or false");
        assert!(e.contains("--dev-tokens"), "{e}");
        let e = parse(&["--jwt-public-key-file", "/nonexistent/key.pem"]).expect_err("no file");
        assert!(e.contains("JWT_PUBLIC_KEY_FILE"), "{e}");
    }

    #[test]
    fn without_a_token_key_it_refuses_unless_dev_tokens_are_on() {
        let e = parse(&[]).expect_err("no secret, no key, no dev tokens");
        for name in ["JWT_SECRET", "JWT_PUBLIC_KEY_FILE", "DEV_TOKENS"] {
            assert!(e.contains(name), "{e}");
        }
        let dev = parse(&["--dev-tokens", "true"]).expect("dev tokens allow the dev secret");
        let issued = dev
            .dev_issuer
            .expect("dev tokens")
            .issue(&chat_common::ids::UserId::parse("alice").expect("id"), 60)
            .expect("token");
        let with_dev_secret =
            TokenVerifier::hs256(DEV_JWT_SECRET.as_bytes(), DEFAULT_ISSUER, DEFAULT_AUDIENCE);
        assert!(with_dev_secret.verify(&issued).is_ok());
        assert!(dev.verifier.verify(&issued).is_ok());
        let own = parse(&["--jwt-secret", "mine"]).expect("a secret");
        assert!(own.dev_issuer.is_none());
        assert!(own.verifier.verify(&issued).is_err(), "not the dev secret");
    }

    #[test]
    fn every_setting_has_a_variable_and_the_flag_of_its_name() {
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("{id} has no variable"));
            let flag = chat_common::config::flag_for(&env.to_string_lossy());
            assert_eq!(arg.get_long().map(|l| format!("--{l}")), Some(flag));
        }
    }
}
