//! The fault-test topology on this machine: a 3-broker Kafka cluster (replication 3,
//! min.insync.replicas 2, no unclean election), two Postgres servers (one shard each), two
//! gateways and two multiplexers running as separate processes, so they can be killed, stopped
//! and restarted like real ones.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use chat_common::ids::GatewayId;
use chat_common::kafka::KafkaConfig;
use chat_common::topics::{delete_topics, ensure_topics, standard_topics, TopicNames};

/// Bootstrap servers of the 3-node cluster started by `infra/scripts/kafka.sh --cluster`.
pub const CLUSTER: &str = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094";
/// The two Postgres servers: (name for postgres.sh, port). Below Linux's ephemeral range
/// (32768-60999): a server stopped by a scenario could otherwise find its port taken by an
/// outgoing connection when it starts again (the proxy's 55442 once was, on a busy machine).
pub const PG: [(&str, u16); 2] = [("chaos-pg1", 25431), ("chaos-pg2", 25432)];
pub const GATEWAYS: [(&str, u16); 2] = [("cg1", 18080), ("cg2", 18081)];

/// The operations listener (`/metrics`, `/readyz`) of the gateway whose public port is `port`.
pub fn gateway_metrics_addr(port: u16) -> String {
    format!("127.0.0.1:{}", port + 100)
}
pub const MULTIPLEXER_PORTS: [u16; 2] = [19300, 19301];
/// The proxy in front of the second Postgres server (for the cut-link scenario).
pub const PG2_PROXY_PORT: u16 = 25442;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs an infra script, failing with its output.
pub async fn script(args: &[&str]) -> anyhow::Result<()> {
    let (name, rest) = args.split_first().expect("a script name");
    let out = tokio::process::Command::new(repo_root().join("infra/scripts").join(name))
        .args(rest)
        .output()
        .await
        .with_context(|| format!("running {name}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{name} {}: {}{}",
        rest.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Starts the cluster and the two Postgres servers (each idempotent).
pub async fn start_infra() -> anyhow::Result<()> {
    infra("start").await
}

pub async fn stop_infra() -> anyhow::Result<()> {
    infra("stop").await
}

/// Runs `action` (start or stop) on the cluster, then on each Postgres server.
async fn infra(action: &str) -> anyhow::Result<()> {
    script(&["kafka.sh", action, "--cluster"]).await?;
    for (name, port) in PG {
        script(&[
            "postgres.sh",
            action,
            "--name",
            name,
            "--port",
            &port.to_string(),
        ])
        .await?;
    }
    Ok(())
}

async fn admin(port: u16) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(
        &format!("postgres://chat@127.0.0.1:{port}/postgres"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(c)
}

/// One scenario's slice: its own topics and shard databases.
pub struct Slice {
    pub topics: TopicNames,
    pub db: String,
    pub kafka: KafkaConfig,
}

impl Slice {
    pub async fn create(name: &str) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("chaos-{name}-{}-", &id[..6]);
        let db = format!("chaos_{}_{}", name.replace('-', "_"), &id[..6]);
        let kafka = KafkaConfig::new(CLUSTER);
        let topics = TopicNames::new(prefix);
        let gateways: Vec<GatewayId> = GATEWAYS
            .iter()
            .map(|(g, _)| GatewayId::parse(g))
            .collect::<Result<_, _>>()?;
        ensure_topics(&kafka, &standard_topics(&topics, &gateways), None).await?;
        for (_, port) in PG {
            admin(port)
                .await?
                .batch_execute(&format!("CREATE DATABASE \"{db}\""))
                .await?;
        }
        let slice = Self { topics, db, kafka };
        let config = db_writer::ShardConfig::from_list(&slice.dsns(false).join(","), 1)?;
        db_writer::Shards::connect(&config)?.migrate().await?;
        Ok(slice)
    }

    /// Shard DSNs: shard 0 on the first server, shard 1 on the second (through the proxy if asked).
    pub fn dsns(&self, via_proxy: bool) -> Vec<String> {
        let p2 = if via_proxy { PG2_PROXY_PORT } else { PG[1].1 };
        vec![
            format!("postgres://chat@127.0.0.1:{}/{}", PG[0].1, self.db),
            format!("postgres://chat@127.0.0.1:{p2}/{}", self.db),
        ]
    }

    pub async fn drop(self) -> anyhow::Result<()> {
        let names: Vec<String> = standard_topics(
            &self.topics,
            &GATEWAYS
                .iter()
                .map(|(g, _)| GatewayId::parse(g))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .into_iter()
        .map(|(n, _)| n)
        .collect();
        delete_topics(&self.kafka, &names).await?;
        for (_, port) in PG {
            admin(port)
                .await?
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.db
                ))
                .await?;
        }
        Ok(())
    }
}

/// A gateway or multiplexer process.
pub struct Proc {
    pub name: String,
    pub port: u16,
    /// Where it answers `/readyz`: a gateway's `GATEWAY_METRICS_ADDR` port, else `port`.
    ready_port: u16,
    bin: PathBuf,
    env: Vec<(String, String)>,
    /// stdout and stderr, appended to across restarts.
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Proc {
    pub fn new(
        name: &str,
        bin: PathBuf,
        port: u16,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Self {
        let ready_port = env
            .iter()
            .find(|(k, _)| k == "GATEWAY_METRICS_ADDR")
            .and_then(|(_, v)| v.rsplit_once(':')?.1.parse().ok())
            .unwrap_or(port);
        Self {
            name: name.to_owned(),
            port,
            ready_port,
            bin,
            env,
            log,
            child: None,
        }
    }

    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = tokio::process::Command::new(&self.bin)
            .envs(self.env.iter().cloned())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let rest = chat_client::Rest::new(&format!("http://127.0.0.1:{}", self.ready_port));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = rest.request("GET", "/readyz", None, None).await {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    anyhow::bail!("{} exited: {status}", self.name);
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} not ready in 60 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()?;
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?;
            c.wait().await?;
        }
        Ok(())
    }

    /// SIGSTOP: a zombie that holds its sockets but does nothing.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    /// SIGTERM and wait (graceful).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.signal("-TERM")?;
        if let Some(mut c) = self.child.take() {
            if tokio::time::timeout(Duration::from_secs(30), c.wait())
                .await
                .is_err()
            {
                c.start_kill()?;
                c.wait().await?;
            }
        }
        Ok(())
    }
}

/// Secret, issuer and audience the chaos processes and clients share.
pub const SECRET: &str = "chaos-secret";

/// The common environment of every process of a slice.
pub fn base_env(slice: &Slice, via_proxy: bool, retention: &str) -> Vec<(String, String)> {
    vec![
        ("KAFKA_BROKERS".into(), CLUSTER.into()),
        ("TOPIC_PREFIX".into(), slice.topics.prefix().into()),
        ("SHARD_DSNS".into(), slice.dsns(via_proxy).join(",")),
        ("SHARD_POOL_SIZE".into(), "8".into()),
        ("JWT_SECRET".into(), SECRET.into()),
        ("RETENTION".into(), retention.into()),
        (
            "MULTIPLEXER_GROUP".into(),
            format!("{}multiplexer", slice.topics.prefix()),
        ),
        ("MULTIPLEXER_MAX_POLL_INTERVAL_MS".into(), "15000".into()),
        ("CONN_RATE_PER_SEC".into(), "10000".into()),
        ("CONN_RATE_BURST".into(), "10000".into()),
        ("USER_RATE_PER_SEC".into(), "10000".into()),
        ("USER_RATE_BURST".into(), "10000".into()),
        ("RUST_LOG".into(), "warn".into()),
    ]
}
