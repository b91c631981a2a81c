//! The end-to-end test harness: a fresh, isolated slice of the real stack per test.
//!
//! Each [`TestEnv`] gets a random prefix, its own topics (`<prefix>inbound`, ...), consumer
//! groups and shard databases on the running Kafka and Postgres, and starts gateways and
//! multiplexers in-process on port 0. Tests therefore run in parallel and [`TestEnv::teardown`]
//! leaves nothing behind. The stack itself is started by `make test` (see `infra/`).
//!
//! Environment: `CHAT_TEST_BROKERS` (default `127.0.0.1:9092`), `CHAT_TEST_PG` (an admin DSN,
//! default `postgres://chat@127.0.0.1:54320/postgres`; libpq's `sslmode` and `sslrootcert`
//! are honoured, and the shard DSNs keep them), and the services' own Kafka security settings
//! (`KAFKA_SECURITY_PROTOCOL`, `KAFKA_CA_FILE`, `KAFKA_SASL_*`), which the processes a test
//! spawns inherit: so the suite runs as well against a secured broker and Postgres
//! (`make test-secure`).
//!
//! On the secured test stack, `infra/scripts/test-secure.sh` also says where the services'
//! passwords are (`CHAT_TEST_KAFKA_USERS`, `CHAT_TEST_PG_ROLES`), and every gateway and
//! multiplexer a test starts then signs in as its own Kafka user and Postgres role, under the
//! deployment's ACLs and grants, as `make up` runs them (see [`Identities`]); the test itself
//! keeps the admin user and the owner role for what it sets up and inspects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use chat_common::auth::{TokenIssuer, TokenVerifier};
use chat_common::ids::{ClientMessageId, ConversationKey, GatewayId, UserId};
use chat_common::kafka::{KafkaConfig, KafkaSecurity};
use chat_common::topics::{delete_topics, ensure_topics, standard_topics, TopicNames};
use db_writer::{Retention, ShardConfig};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"test-secret";
const ISSUER: &str = "chat-test";
const AUDIENCE: &str = "chat";

/// A running in-process component.
pub struct Component {
    pub addr: SocketAddr,
    /// Where it serves `/metrics`, `/healthz` and `/readyz`: a gateway's operations listener, a
    /// multiplexer's one HTTP address.
    pub ops_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Component {
    /// Stops it gracefully and waits for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// One test's isolated slice of the stack.
pub struct TestEnv {
    pub kafka: KafkaConfig,
    pub topics: TopicNames,
    pub gateway_ids: Vec<GatewayId>,
    pub shard_dsns: Vec<String>,
    admin_dsn: String,
    databases: Vec<String>,
    issuer: TokenIssuer,
    /// Retention mode of the multiplexers this env starts.
    pub retention: Retention,
    /// Delete-on-ack expiry of unacked messages, for multiplexers this env starts.
    pub unacked_ttl: Duration,
    pub expiry_interval: Duration,
    /// Delete-on-ack: how long an erased row is kept (the metadata window).
    pub erased_row_ttl: Duration,
    /// Who the processes this env starts sign in as (`None`: the stack's one user).
    identities: Option<Identities>,
    /// Gateways whose Kafka user and ACLs exist for this env's topics.
    allowed_gateways: Mutex<Vec<String>>,
}

/// The services' own users and roles on the secured test stack, where their passwords are:
/// `CHAT_TEST_KAFKA_USERS` (a directory with one file per Kafka user, as `kafka.sh --secure`
/// keeps them) and `CHAT_TEST_PG_ROLES` (one file per Postgres role, as `postgres.sh --secure`
/// keeps them). With them, an env's gateways sign in as `gateway-<id>` and `chat_reader`, its
/// multiplexers as `multiplexer` and `chat_writer` and do not migrate (the env migrated its
/// shards as `chat_owner`, in delete-on-ack mode when its multiplexers run in it), each under
/// the ACLs `chatctl acls` creates for the env's prefix and the grants of `db-writer roles`.
#[derive(Clone, Debug)]
pub struct Identities {
    kafka_users: PathBuf,
    pg_roles: PathBuf,
}

impl Identities {
    /// The directories from the environment, when both are set.
    pub fn from_env() -> Option<Self> {
        Some(Self {
            kafka_users: std::env::var_os("CHAT_TEST_KAFKA_USERS")?.into(),
            pg_roles: std::env::var_os("CHAT_TEST_PG_ROLES")?.into(),
        })
    }

    fn password(dir: &std::path::Path, name: &str) -> anyhow::Result<String> {
        let path = dir.join(name);
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading the password of {name} ({})", path.display()))?
            .trim()
            .to_owned())
    }

    /// `kafka` signing in as `user` instead (same brokers, CA and mechanism).
    fn kafka_as(&self, kafka: &KafkaConfig, user: &str) -> anyhow::Result<KafkaConfig> {
        let (ca_file, mechanism) = match &kafka.security {
            KafkaSecurity::SaslSsl {
                ca_file, mechanism, ..
            } => (ca_file.clone(), mechanism.clone()),
            other => anyhow::bail!("per-service Kafka users need SASL_SSL, not {other:?}"),
        };
        Ok(KafkaConfig {
            security: KafkaSecurity::SaslSsl {
                ca_file,
                mechanism,
                username: user.to_owned(),
                password: Self::password(&self.kafka_users, user)?,
            },
            ..kafka.clone()
        })
    }

    /// `dsns` (URL form) signing in as `role` instead.
    fn dsns_as(&self, dsns: &[String], role: &str) -> anyhow::Result<Vec<String>> {
        let password = Self::password(&self.pg_roles, role)?;
        dsns.iter()
            .map(|dsn| {
                let (scheme, rest) = dsn.split_once("://").context("a DSN in URL form")?;
                let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                Ok(format!("{scheme}://{role}:{password}@{host}"))
            })
            .collect()
    }

    /// Makes Kafka user `user` when this stack has no password for it (the broker's own users
    /// are made when it is formatted, see [`Identities::is_made_by_tests`]), and sets that
    /// password on the broker once per test binary.
    async fn ensure_kafka_user(&self, kafka: &KafkaConfig, user: &str) -> anyhow::Result<()> {
        static SET: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let path = self.kafka_users.join(user);
        // Written whole, then linked into place: a concurrent test sees no file or all of it.
        let tmp = self
            .kafka_users
            .join(format!(".{user}.{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, format!("{}\n", uuid::Uuid::new_v4().simple()))?;
        let linked = std::fs::hard_link(&tmp, &path);
        std::fs::remove_file(&tmp)?;
        let made = match linked {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        };
        let known = SET
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&user.to_owned());
        if !made && (known || !self.is_made_by_tests(user)?) {
            return Ok(());
        }
        let password = Self::password(&self.kafka_users, user)?;
        chatctl(kafka, &["kafka-users", "set", user], Some(&password)).await?;
        SET.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(user.to_owned());
        Ok(())
    }

    /// True for a user the broker was not formatted with (its password was made here):
    /// `kafka.sh --secure` lists the users it formats the broker with in `users.list`, beside
    /// the directory of their passwords.
    fn is_made_by_tests(&self, user: &str) -> anyhow::Result<bool> {
        let list = self.kafka_users.with_file_name("users.list");
        let formatted = std::fs::read_to_string(&list)
            .with_context(|| format!("the broker's users ({})", list.display()))?;
        Ok(!formatted.split_whitespace().any(|u| u == user))
    }
}

/// Runs `chatctl` against `kafka`'s brokers as the test's own Kafka user (the environment's),
/// with `stdin` as its standard input; fails with its stderr unless it succeeds.
async fn chatctl(kafka: &KafkaConfig, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let path = binary("chatctl");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    let mut child = tokio::process::Command::new(&path)
        .args(args)
        .env("KAFKA_BROKERS", &kafka.brokers)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let (Some(mut input), Some(text)) = (child.stdin.take(), stdin) {
        input.write_all(format!("{text}\n").as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
    anyhow::ensure!(
        out.status.success(),
        "chatctl {}: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl TestEnv {
    /// Creates topics for `gateways` and `shards` empty databases.
    pub async fn new(shards: usize, gateways: &[&str]) -> anyhow::Result<Self> {
        chat_common::telemetry::init_logging();
        let brokers =
            std::env::var("CHAT_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let admin_dsn = std::env::var("CHAT_TEST_PG")
            .unwrap_or_else(|_| "postgres://chat@127.0.0.1:54320/postgres".into());
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("t{}-", &id[..10]);
        let kafka = KafkaConfig::new(brokers).with_env_opts()?;
        let identities = Identities::from_env();
        let topics = TopicNames::new(prefix.clone());
        let gateway_ids: Vec<GatewayId> = gateways
            .iter()
            .map(|g| GatewayId::parse(g))
            .collect::<Result<_, _>>()?;
        ensure_topics(&kafka, &standard_topics(&topics, &gateway_ids), None)
            .await
            .context("creating test topics (is Kafka running? `make up` or `make stack`)")?;

        let admin = pg_connect(&admin_dsn)
            .await
            .context("connecting to Postgres (is it running? `make stack`)")?;
        let mut databases = Vec::new();
        let mut shard_dsns = Vec::new();
        for i in 0..shards {
            let db = format!("t{}_{i}", &id[..10]);
            admin
                .batch_execute(&format!("CREATE DATABASE \"{db}\""))
                .await?;
            let dsn = with_database(&admin_dsn, &db);
            if identities.is_some() {
                grant(&dsn).await?;
            }
            shard_dsns.push(dsn);
            databases.push(db);
        }
        // Migrated as an operator would (`db-writer migrate`) before any process starts.
        let shards = ShardConfig::from_list(&shard_dsns.join(","), 1)?;
        db_writer::Shards::connect(&shards)?.migrate().await?;
        let env = Self {
            kafka,
            topics,
            gateway_ids,
            shard_dsns,
            admin_dsn,
            databases,
            issuer: TokenIssuer::hs256(SECRET, ISSUER, AUDIENCE),
            retention: Retention::Keep,
            unacked_ttl: Duration::from_secs(30 * 24 * 3600),
            expiry_interval: Duration::from_secs(60),
            erased_row_ttl: Duration::from_secs(8 * 24 * 3600),
            identities,
            allowed_gateways: Mutex::new(Vec::new()),
        };
        let ids: Vec<&str> = env.gateway_ids.iter().map(|g| g.as_str()).collect();
        env.allow_gateways(&ids).await?;
        Ok(env)
    }

    /// Creates the Kafka users and ACLs of `ids` (with the multiplexer's and the data team's)
    /// for this env's topics, unless done already or there are no per-service users.
    async fn allow_gateways(&self, ids: &[&str]) -> anyhow::Result<()> {
        let Some(identities) = &self.identities else {
            return Ok(());
        };
        let new: Vec<&str> = {
            let done = self
                .allowed_gateways
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            ids.iter()
                .copied()
                .filter(|id| !done.iter().any(|d| d == id))
                .collect()
        };
        if !new.is_empty() || ids.is_empty() {
            for id in &new {
                identities
                    .ensure_kafka_user(&self.kafka, &format!("gateway-{id}"))
                    .await?;
            }
            let group = format!("{}multiplexer", self.topics.prefix());
            self.acls(&self.topics, &new, &group).await?;
            self.allowed_gateways
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(new.iter().map(|id| id.to_string()));
        }
        Ok(())
    }

    /// The shards as `role` signs in to them (the owner's DSNs without per-service roles).
    /// Also grants the multiplexer user consumer group `group` (a second multiplexer in a group
    /// of its own: a replay), when the processes sign in as their own users.
    pub async fn allow_multiplexer_group(&self, group: &str) -> anyhow::Result<()> {
        if self.least_privilege() {
            self.acls(&self.topics, &[], group).await?;
        }
        Ok(())
    }

    /// Also creates the deployment's ACLs for topics named by `names` (another prefix than the
    /// env's) and `gateways`, when the processes sign in as their own users.
    pub async fn allow_topics(&self, names: &TopicNames, gateways: &[&str]) -> anyhow::Result<()> {
        if self.least_privilege() {
            let group = format!("{}multiplexer", names.prefix());
            self.acls(names, gateways, &group).await?;
        }
        Ok(())
    }

    /// `chatctl acls` for `names`' prefix, `gateways` and the multiplexers' `group`.
    async fn acls(&self, names: &TopicNames, gateways: &[&str], group: &str) -> anyhow::Result<()> {
        let gateways = gateways.join(",");
        let args = [
            "acls",
            "--prefix",
            names.prefix(),
            "--gateways",
            &gateways,
            "--multiplexer-group",
            group,
        ];
        chatctl(&self.kafka, &args, None).await
    }

    fn shard_dsns_as(&self, role: &str) -> anyhow::Result<Vec<String>> {
        match &self.identities {
            Some(i) => i.dsns_as(&self.shard_dsns, role),
            None => Ok(self.shard_dsns.clone()),
        }
    }

    /// This env's Kafka settings as `user` signs in (the test's own without per-service users).
    fn kafka_as(&self, user: &str) -> anyhow::Result<KafkaConfig> {
        match &self.identities {
            Some(i) => i.kafka_as(&self.kafka, user),
            None => Ok(self.kafka.clone()),
        }
    }

    /// True when the processes this env starts sign in as their own users and roles.
    pub fn least_privilege(&self) -> bool {
        self.identities.is_some()
    }

    /// A token for `user`.
    pub fn token(&self, user: &str) -> String {
        self.issuer
            .issue(&UserId::parse(user).expect("valid user id"), 3600)
            .expect("token")
    }

    /// Starts gateway `id` (one of those given to [`TestEnv::new`]) on a free port.
    pub async fn start_gateway(&self, id: &str) -> anyhow::Result<Component> {
        self.start_gateway_with(id, |_| {}).await
    }

    /// Like [`TestEnv::start_gateway`], with the configuration adjusted by `adjust`.
    pub async fn start_gateway_with(
        &self,
        id: &str,
        adjust: impl FnOnce(&mut gateway::Config),
    ) -> anyhow::Result<Component> {
        self.allow_gateways(&[id]).await?;
        let reader = self.shard_dsns_as(db_writer::roles::READER)?;
        let mut config = gateway::Config {
            gateway_id: GatewayId::parse(id)?,
            addr: "127.0.0.1:0".parse()?,
            metrics_addr: "127.0.0.1:0".parse()?,
            listen_backlog: 4096,
            tls: None,
            kafka: self.kafka_as(&format!("gateway-{id}"))?,
            topics: self.topics.clone(),
            shards: ShardConfig::from_list(&reader.join(","), 4)?
                .with_plans(db_writer::Plans::Auto),
            verifier: TokenVerifier::hs256(SECRET, ISSUER, AUDIENCE),
            dev_issuer: None,
            max_body_bytes: 4096,
            socket_queue: 1024,
            ws_read_buffer_bytes: 256,
            max_in_flight: 256,
            web_dir: None,
            allowed_origins: Vec::new(),
            // Tests send in bursts far above a person's pace; the limits have their own test.
            conn_rate: (100_000, 100_000),
            user_rate: (100_000, 100_000),
            ping_interval: Duration::from_secs(30),
            max_conns_per_addr: 60_000,
            max_concurrent_syncs: 64,
            retention: self.retention,
            handshake_timeout: Duration::from_secs(10),
            http: gateway::HttpBounds::default(),
        };
        adjust(&mut config);
        let shutdown = CancellationToken::new();
        let running = gateway::start(config, shutdown.clone()).await?;
        let task = running.task;
        Ok(Component {
            addr: running.addr,
            ops_addr: running.metrics_addr,
            shutdown,
            task: tokio::spawn(async move {
                if let Ok(Err(e)) = task.await {
                    eprintln!("gateway stopped with an error: {e:#}");
                }
            }),
        })
    }

    /// Starts a multiplexer in this test's consumer group.
    pub async fn start_multiplexer(&self) -> anyhow::Result<Component> {
        self.start_multiplexer_with(|_| {}).await
    }

    /// Starts a multiplexer in this test's consumer group, with its configuration adjusted.
    pub async fn start_multiplexer_with(
        &self,
        adjust: impl FnOnce(&mut multiplexer::Config),
    ) -> anyhow::Result<Component> {
        self.prepare_multiplexer().await?;
        let writer = self.shard_dsns_as(db_writer::roles::WRITER)?;
        let mut config = multiplexer::Config {
            kafka: self.kafka_as("multiplexer")?,
            topics: self.topics.clone(),
            group: format!("{}multiplexer", self.topics.prefix()),
            shards: ShardConfig::from_list(&writer.join(","), 4)?,
            retention: self.retention,
            max_batch: 500,
            max_held: 10_000,
            batch_wait: Duration::from_millis(2),
            batch_wait_above: 10_000,
            outbound_batches: true,
            early_push: true,
            http_addr: "127.0.0.1:0".parse()?,
            unacked_ttl: self.unacked_ttl,
            expiry_interval: self.expiry_interval,
            erased_row_ttl: self.erased_row_ttl,
            migrate: !self.least_privilege(),
            worker_threads: 1,
        };
        adjust(&mut config);
        let shutdown = CancellationToken::new();
        let running = multiplexer::start(config, shutdown.clone()).await?;
        Ok(Component {
            addr: running.http_addr,
            ops_addr: running.http_addr,
            shutdown,
            task: running.task,
        })
    }

    /// What a multiplexer that does not migrate needs first: in delete-on-ack mode, the expiry
    /// sweep's index, which only the owner may build (`db-writer migrate --retention
    /// delete-on-ack`).
    async fn prepare_multiplexer(&self) -> anyhow::Result<()> {
        if self.least_privilege() && self.retention == Retention::DeleteOnAck {
            let shards = ShardConfig::from_list(&self.shard_dsns.join(","), 1)?;
            db_writer::Shards::connect(&shards)?
                .migrate_for(Retention::DeleteOnAck)
                .await?;
        }
        Ok(())
    }

    /// The environment of a gateway or multiplexer process for this test's slice of the stack,
    /// signing in as `kafka_user` and `pg_role` (when the stack has per-service users).
    fn process_env(
        &self,
        kafka_user: &str,
        pg_role: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut env = self.process_env_common(pg_role)?;
        if self.least_privilege() {
            if let KafkaSecurity::SaslSsl {
                username, password, ..
            } = self.kafka_as(kafka_user)?.security
            {
                env.push(("KAFKA_SASL_USERNAME".into(), username));
                env.push(("KAFKA_SASL_PASSWORD".into(), password));
            }
        }
        Ok(env)
    }

    fn process_env_common(&self, pg_role: &str) -> anyhow::Result<Vec<(String, String)>> {
        Ok(vec![
            ("KAFKA_BROKERS".into(), self.kafka.brokers.clone()),
            ("TOPIC_PREFIX".into(), self.topics.prefix().to_owned()),
            ("SHARD_DSNS".into(), self.shard_dsns_as(pg_role)?.join(",")),
            ("SHARD_POOL_SIZE".into(), "4".into()),
            (
                "JWT_SECRET".into(),
                String::from_utf8_lossy(SECRET).into_owned(),
            ),
            ("JWT_ISSUER".into(), ISSUER.into()),
            ("JWT_AUDIENCE".into(), AUDIENCE.into()),
            (
                "RETENTION".into(),
                match self.retention {
                    Retention::Keep => "keep".into(),
                    Retention::DeleteOnAck => "delete-on-ack".into(),
                },
            ),
            (
                "MULTIPLEXER_GROUP".into(),
                format!("{}multiplexer", self.topics.prefix()),
            ),
            (
                "MULTIPLEXER_MIGRATE".into(),
                (!self.least_privilege()).to_string(),
            ),
            ("RUST_LOG".into(), "warn".into()),
        ])
    }

    /// Starts the multiplexer binary as a child process (so a test can SIGKILL it).
    pub async fn spawn_multiplexer_process(&self) -> anyhow::Result<Process> {
        self.prepare_multiplexer().await?;
        let port = free_port()?;
        let mut env = self.process_env("multiplexer", db_writer::roles::WRITER)?;
        env.push(("MULTIPLEXER_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        Process::spawn("multiplexer", env, port, port).await
    }

    /// Starts the gateway binary `id` as a child process.
    pub async fn spawn_gateway_process(&self, id: &str) -> anyhow::Result<Process> {
        self.spawn_gateway_process_with(id, |_| {}).await
    }

    /// Like [`TestEnv::spawn_gateway_process`], with the environment adjusted by `adjust`.
    pub async fn spawn_gateway_process_with(
        &self,
        id: &str,
        adjust: impl FnOnce(&mut Vec<(String, String)>),
    ) -> anyhow::Result<Process> {
        let port = free_port()?;
        let mut ops_port = free_port()?;
        while ops_port == port {
            ops_port = free_port()?;
        }
        self.allow_gateways(&[id]).await?;
        let mut env = self.process_env(&format!("gateway-{id}"), db_writer::roles::READER)?;
        env.push(("GATEWAY_ID".into(), id.into()));
        env.push(("GATEWAY_ADDR".into(), format!("127.0.0.1:{port}")));
        env.push((
            "GATEWAY_METRICS_ADDR".into(),
            format!("127.0.0.1:{ops_port}"),
        ));
        adjust(&mut env);
        Process::spawn("gateway", env, port, ops_port).await
    }

    /// Creates `n` more empty, migrated databases (dropped by teardown); returns their DSNs.
    pub async fn extra_shards(&mut self, n: usize) -> anyhow::Result<Vec<String>> {
        let dsns = self.empty_databases(n).await?;
        let config = ShardConfig::from_list(&dsns.join(","), 1)?;
        db_writer::Shards::connect(&config)?.migrate().await?;
        Ok(dsns)
    }

    /// Creates `n` more empty databases, not migrated (dropped by teardown); returns their DSNs.
    pub async fn empty_databases(&mut self, n: usize) -> anyhow::Result<Vec<String>> {
        let admin = pg_connect(&self.admin_dsn).await?;
        let mut dsns = Vec::new();
        for _ in 0..n {
            let db = format!(
                "{}x{}",
                self.databases[0].trim_end_matches(char::is_numeric),
                self.databases.len()
            );
            admin
                .batch_execute(&format!("CREATE DATABASE \"{db}\""))
                .await?;
            let dsn = with_database(&self.admin_dsn, &db);
            if self.least_privilege() {
                grant(&dsn).await?;
            }
            dsns.push(dsn);
            self.databases.push(db);
        }
        Ok(dsns)
    }

    /// Messages stored, over every shard.
    pub async fn message_count(&self) -> anyhow::Result<i64> {
        let mut n = 0;
        for i in 0..self.shard_dsns.len() {
            n += self
                .shard(i)
                .await?
                .query_one("SELECT count(*) FROM messages", &[])
                .await?
                .get::<_, i64>(0);
        }
        Ok(n)
    }

    /// The stored (seq, body) of a conversation, over every shard, in seq order.
    pub async fn stored(&self, conversation: &str) -> anyhow::Result<Vec<(i64, Option<String>)>> {
        let mut out = Vec::new();
        for i in 0..self.shard_dsns.len() {
            let rows = self
                .shard(i)
                .await?
                .query(
                    "SELECT seq, body FROM messages WHERE conversation = $1 ORDER BY seq",
                    &[&conversation],
                )
                .await?;
            out.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
        }
        out.sort();
        Ok(out)
    }

    /// Every stored message row of every shard, ordered, as text: for before/after comparisons.
    pub async fn snapshot(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for i in 0..self.shard_dsns.len() {
            let rows = self
                .shard(i)
                .await?
                .query(
                    "SELECT row(conversation, seq, message_id, client_message_id, sender, recipient,
                                body, sent_at_ms, acked, expired_at_ms, stored_at)::text
                     FROM message_status ORDER BY conversation, seq",
                    &[],
                )
                .await?;
            out.extend(
                rows.iter()
                    .map(|r| format!("{i}:{}", r.get::<_, String>(0))),
            );
        }
        Ok(out)
    }

    /// Produces a raw record (tests use it to inject outbound records).
    pub async fn produce(&self, topic: &str, key: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.produce_all(topic, key, vec![payload]).await
    }

    /// Produces records with one producer, all in flight at once, in order.
    pub async fn produce_all(
        &self,
        topic: &str,
        key: &str,
        payloads: Vec<Vec<u8>>,
    ) -> anyhow::Result<()> {
        use rdkafka::producer::FutureRecord;
        let producer = self.kafka.producer()?;
        let sends = payloads.iter().map(|p| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(p),
                Duration::from_secs(10),
            )
        });
        for r in futures_util::future::join_all(sends).await {
            r.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        }
        Ok(())
    }

    /// True when consumer group `group` has committed offsets at the end of every partition of
    /// `topic` (a replay has finished).
    pub async fn group_caught_up(&self, group: &str, topic: &str) -> anyhow::Result<bool> {
        let consumer: StreamConsumer = self.kafka.consumer(group)?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition(topic, p.id());
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        for e in committed.elements() {
            let (_, high) =
                consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(10))?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            if at < high {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A direct connection to shard `i`.
    pub async fn shard(&self, i: usize) -> anyhow::Result<tokio_postgres::Client> {
        pg_connect(&self.shard_dsns[i]).await
    }

    /// Every record of `topic` present now, read from the beginning.
    pub async fn read_topic(&self, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
        let consumer = self.kafka.reader()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut highs = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            if high > 0 {
                highs.insert(p.id(), high);
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
        let mut out = Vec::new();
        if highs.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let mut done: HashMap<i32, bool> = highs.keys().map(|p| (*p, false)).collect();
        while done.values().any(|d| !d) {
            let m = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
                .await
                .context("reading topic")??;
            if m.offset() + 1 >= highs[&m.partition()] {
                done.insert(m.partition(), true);
            }
            out.push(m.detach());
        }
        Ok(out)
    }

    /// Deletes this test's topics and databases.
    pub async fn teardown(self) -> anyhow::Result<()> {
        let mut names: Vec<String> = standard_topics(&self.topics, &self.gateway_ids)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.sort();
        delete_topics(&self.kafka, &names).await?;
        let admin = pg_connect(&self.admin_dsn).await?;
        for db in &self.databases {
            let drop = format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)");
            let mut tries = 0;
            loop {
                match admin.batch_execute(&drop).await {
                    Ok(()) => break,
                    // An autovacuum worker in the database, which FORCE may end only for a
                    // superuser or a member of pg_signal_backend: not the secured stack's owner
                    // role (`make test`). It ends on its own in a moment.
                    Err(e)
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
                            && tries < 100 =>
                    {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}

/// The grants of `db-writer roles` in the database of `dsn` (the owner's): the writer's and
/// the reader's part of every table, now and as migrations create them.
async fn grant(dsn: &str) -> anyhow::Result<()> {
    pg_connect(dsn)
        .await?
        .batch_execute(db_writer::roles::GRANTS_SQL)
        .await
        .context("granting the writer and the reader their part")
}

/// A connection to `dsn` (URL form), with its TLS settings (`sslmode`, `sslrootcert`) honoured.
pub async fn pg_connect(dsn: &str) -> anyhow::Result<tokio_postgres::Client> {
    db_writer::connect(dsn)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", without_password(dsn)))
}

/// `dsn` (URL form) with its database replaced by `db`, its parameters kept.
pub fn with_database(dsn: &str, db: &str) -> String {
    let (url, query) = match dsn.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (dsn, None),
    };
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// `dsn` without its password, for messages.
fn without_password(dsn: &str) -> String {
    match (dsn.find("://"), dsn.find('@')) {
        (Some(scheme), Some(at)) if scheme < at => {
            let user_info = &dsn[scheme + 3..at];
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{}{user}{}", &dsn[..scheme + 3], &dsn[at..])
        }
        _ => dsn.to_owned(),
    }
}

/// A websocket opened by hand (no client library), for tests of the raw protocol.
pub type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until the server closes (within [`WAIT`]); returns the close code, if the server sent
/// one.
pub async fn close_code(ws: &mut RawWs) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let until = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    };
    tokio::time::timeout(WAIT, until)
        .await
        .expect("closed in time")
}

/// `ws://` base URL of a component.
pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}")
}

/// `http://` base URL of a component.
pub fn http_url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// How long tests wait for anything that should happen.
pub const WAIT: Duration = Duration::from_secs(20);

/// Connects (binary frames, no reconnection) and waits for the initial sync to finish, so the
/// messages that follow are live ones.
pub async fn connect(url: &str, token: &str) -> chat_client::Client {
    let mut c = chat_client::Client::connect(url, token)
        .await
        .expect("connect");
    c.until_sync_done(WAIT).await.expect("initial sync");
    c
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One of the project's binaries running as a child process.
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// Where it serves `/metrics`, `/healthz` and `/readyz` (a gateway's operations listener).
    pub ops_addr: SocketAddr,
    name: &'static str,
    env: Vec<(String, String)>,
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`]: for states no event announces
/// (rows in a shard, committed offsets, what a scrape shows later).
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    eventually_within(what, WAIT, check).await
}

/// [`eventually`], for at most `within`.
pub async fn eventually_within<T, F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Seeded randomness for randomized tests (splitmix64: small, and the same on every platform).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// A randomized test's seed (from `var`, see [`seed`]) and its generator. Prints
    /// `var=<seed>`, what replays the run.
    pub fn seeded(var: &str) -> (u64, Rng) {
        let seed = seed(var);
        println!("{var}={seed}");
        (seed, Rng(seed))
    }
}

/// The seed of a randomized test: the environment variable `var` when set (to replay a run),
/// else a fresh one. The test prints it.
pub fn seed(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var} is a u64")),
        Err(_) => {
            let u = uuid::Uuid::new_v4();
            u.as_u64_pair().0 ^ u.as_u64_pair().1
        }
    }
}

/// A new message from `from` to `to`, as a gateway would accept it (fresh ids; seq 0, which the
/// store assigns), for tests that write through the shard layer directly.
pub fn new_message(
    from: &str,
    to: &str,
    body: &str,
    sent_at_ms: i64,
) -> anyhow::Result<chat_common::message::Message> {
    let (sender, recipient) = (UserId::parse(from)?, UserId::parse(to)?);
    Ok(chat_common::message::Message {
        sealed: None,
        id: uuid::Uuid::new_v4(),
        client_id: ClientMessageId::parse(&uuid::Uuid::new_v4().to_string())?,
        conversation: ConversationKey::of(&sender, &recipient).context("same user")?,
        sender,
        recipient,
        body: body.into(),
        sent_at_ms,
        seq: 0,
    })
}

/// Runs a binary of the workspace (built by `cargo build --bins`) with `args` and `env`, for
/// at most 60 s: its exit code, stdout and stderr.
pub async fn run_binary(
    name: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<(i32, Vec<u8>, String)> {
    let path = binary(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(path)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output(),
    )
    .await??;
    Ok((
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Path of a binary of this workspace (built by `cargo build --bins`, which `make test` runs).
pub fn binary(name: &str) -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug").join(name)
}

impl Process {
    async fn spawn(
        name: &'static str,
        env: Vec<(String, String)>,
        port: u16,
        ops_port: u16,
    ) -> anyhow::Result<Self> {
        let path = binary(name);
        anyhow::ensure!(
            path.exists(),
            "{} is missing: run `cargo build --bins` first",
            path.display()
        );
        let child = tokio::process::Command::new(&path)
            .envs(env.iter().cloned())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let ops_addr: SocketAddr = format!("127.0.0.1:{ops_port}").parse()?;
        let mut p = Self {
            child,
            addr,
            ops_addr,
            name,
            env,
        };
        p.wait_ready().await?;
        Ok(p)
    }

    /// Waits until `/readyz` (on the operations address) answers 200.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let rest = chat_client::Rest::new(&http_url(self.ops_addr));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = rest.request("GET", "/readyz", None, None).await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("{} exited during start-up: {status}", self.name);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} not ready in 30 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no drain, no offset commit, no offline presence.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM and wait: the graceful path.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??)
    }

    /// Starts the same binary again with the same environment (same port).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let path = binary(self.name);
        self.child = tokio::process::Command::new(&path)
            .envs(self.env.iter().cloned())
            .kill_on_drop(true)
            .spawn()?;
        self.wait_ready().await
    }
}
