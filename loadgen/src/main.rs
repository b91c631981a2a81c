//! `loadgen`: load generator and benchmark tooling for the chat pipeline.
//!
//! Subcommands: `run` (one open-loop end-to-end trial), `search` (the highest sustainable rate,
//! then latency points), `raw-kafka`, `raw-pg`, `echo-server` + `echo` (raw websocket),
//! `tcp-server` + `hold` (connections held and memory per connection), `storm-seed` + `storm`
//! (users with history connecting to one gateway at once), `topics` and `cleanup` (topics and
//! groups of a bench run, on a secured broker too), `report` (the Markdown table from the JSON
//! reports).
//! `make bench` (bench/bench.sh) runs all of it.

mod chart;
mod cpu;
mod e2e;
mod peer;
mod prometheus;
mod raw;
mod report;
mod stats;
mod storm;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::cpu::Watch;

#[derive(Parser)]
#[command(version, about = "Load generator and benchmarks for the chat pipeline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads of this process's runtime (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// PEM file of CAs trusted by wss:// connections, besides the default roots.
    #[arg(long, global = true, value_name = "PATH")]
    ca_file: Option<std::path::PathBuf>,
}

#[derive(Args, Clone)]
struct FleetArgs {
    /// Gateway base URLs (users are spread over them).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Users, one websocket each (each sends to another user and receives from one).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Source addresses to bind client sockets to: 127.0.0.2-127.0.0.9 or a list.
    #[arg(long, default_value = "")]
    source_ips: String,
    /// Prefix of user ids (unique per bench run).
    #[arg(long, default_value = "lg")]
    user_prefix: String,
    /// Message body size.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// How recipients ack: each message, or cumulatively per read burst.
    #[arg(long, value_enum, default_value = "each")]
    ack: e2e::AckMode,
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Processes to measure CPU of: name=pid, name=pid+ (with children), name=self.
    #[arg(long = "watch")]
    watches: Vec<Watch>,
    /// Where the JSON report and charts go.
    #[arg(long, default_value = "bench/out")]
    out_dir: PathBuf,
}

impl FleetArgs {
    fn setup(&self) -> anyhow::Result<e2e::Setup> {
        Ok(e2e::Setup {
            urls: self.urls.clone(),
            users: self.users,
            source_ips: ws::parse_ips(&self.source_ips)?,
            user_prefix: self.user_prefix.clone(),
            body_bytes: self.body_bytes,
            ack: self.ack,
            connect_concurrency: self.connect_concurrency,
            watches: self.watches.clone(),
        })
    }
}

/// The data set of the connect storm (the same for `storm-seed` and `storm`).
#[derive(Args, Clone)]
struct PlanArgs {
    #[arg(long, default_value_t = 18_000)]
    users: usize,
    /// User ids are this prefix and a number.
    #[arg(long, default_value = "st")]
    user_prefix: String,
    /// Conversations per user (even).
    #[arg(long, default_value_t = 50)]
    conversations: usize,
    /// Conversations per user with messages pending for the user.
    #[arg(long, default_value_t = 3)]
    pending_conversations: usize,
    /// Unacknowledged messages in each of those.
    #[arg(long, default_value_t = 2)]
    pending_messages: usize,
    /// Conversations per user with a receipt of the last 30 days for the user.
    #[arg(long, default_value_t = 2)]
    receipt_conversations: usize,
}

impl PlanArgs {
    fn plan(&self) -> storm::Plan {
        storm::Plan {
            users: self.users,
            user_prefix: self.user_prefix.clone(),
            conversations: self.conversations,
            pending_conversations: self.pending_conversations,
            pending_messages: self.pending_messages,
            receipt_conversations: self.receipt_conversations,
        }
    }
}

fn split_dsns(dsns: &str) -> Vec<String> {
    dsns.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[derive(Subcommand)]
enum Command {
    /// One open-loop end-to-end trial at a fixed rate.
    Run {
        #[command(flatten)]
        fleet: FleetArgs,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        #[arg(long, default_value_t = 15.0)]
        drain_seconds: f64,
        #[arg(long, default_value_t = 1000.0)]
        max_p99_ms: f64,
        /// The pipeline's metrics endpoints, name=url (repeatable), scraped before and after
        /// the trial: the report gets what it added to each histogram.
        #[arg(long = "metrics")]
        metrics: Vec<prometheus::Endpoint>,
    },
    /// Finds the highest rate sustained for a full trial, then measures latency points.
    Search {
        #[command(flatten)]
        fleet: FleetArgs,
        #[arg(long, default_value_t = 2000.0)]
        start_rate: f64,
        #[arg(long, default_value_t = 30000.0)]
        max_rate: f64,
        #[arg(long, default_value_t = 12.0)]
        probe_seconds: f64,
        #[arg(long, default_value_t = 60.0)]
        confirm_seconds: f64,
        #[arg(long, default_value_t = 10000.0)]
        latency_rate: f64,
        #[arg(long, default_value_t = 30.0)]
        latency_seconds: f64,
        /// A fixed latency point at this rate (whatever the maximum, if it is sustainable).
        #[arg(long, default_value_t = 500.0)]
        low_rate: f64,
        #[arg(long, default_value_t = 30.0)]
        low_seconds: f64,
        /// A trial passes only if the receipt p99 (overall and in its last 5 s) is at most this.
        #[arg(long, default_value_t = 1000.0)]
        max_p99_ms: f64,
        /// Stop probing after this long (confirmation and latency runs still happen).
        #[arg(long, default_value_t = 300.0)]
        budget_seconds: f64,
        /// The pipeline's metrics endpoints, name=url (repeatable, e.g.
        /// gateway=http://127.0.0.1:9100/metrics, a gateway's GATEWAY_METRICS_ADDR), scraped before and after every trial: each
        /// trial's report gets what it added to each histogram (same names are added together).
        #[arg(long = "metrics")]
        metrics: Vec<prometheus::Endpoint>,
    },
    /// Raw Kafka: produce and consume records of the pipeline's size with its settings.
    RawKafka {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long)]
        topic: String,
        /// Also time the presence catch-up on this topic.
        #[arg(long)]
        presence_topic: Option<String>,
        #[arg(long)]
        group: String,
        /// Records for the flat-out phase.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Open-loop phase rate and length.
        #[arg(long, default_value_t = 10000.0)]
        rate: f64,
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[arg(long, default_value_t = 500)]
        conversations: usize,
        #[arg(long = "watch")]
        watches: Vec<Watch>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Raw Postgres: the db-writer's batched insert and ack update on migrated shards.
    RawPg {
        /// Shard DSNs, comma separated, in shard order.
        #[arg(long)]
        dsns: String,
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 250)]
        batch: usize,
        /// Acks applied one statement each (the rest are applied batched).
        #[arg(long, default_value_t = 20_000)]
        acks_each: usize,
        #[arg(long, default_value_t = 500)]
        conversations: usize,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[arg(long = "watch")]
        watches: Vec<Watch>,
        #[arg(long)]
        out: PathBuf,
    },
    /// A trivial websocket echo server.
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:18490")]
        addr: String,
    },
    /// Raw websocket: round trips through the echo server, flat out then open loop.
    Echo {
        #[arg(long, default_value = "ws://127.0.0.1:18490")]
        url: String,
        #[arg(long, default_value_t = 200)]
        conns: usize,
        #[arg(long, default_value = "")]
        source_ips: String,
        /// Frame size (default: a Send frame with a 100-byte body).
        #[arg(long)]
        frame_bytes: Option<usize>,
        #[arg(long, default_value_t = 16)]
        window: usize,
        #[arg(long, default_value_t = 10.0)]
        flat_seconds: f64,
        #[arg(long, default_value_t = 10000.0)]
        rate: f64,
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        #[arg(long = "watch")]
        watches: Vec<Watch>,
        #[arg(long)]
        out: PathBuf,
    },
    /// A tokio TCP server that accepts and holds sockets.
    TcpServer {
        #[arg(long, default_value = "127.0.0.1:18491")]
        addr: String,
    },
    /// Opens and holds many idle connections; reports the target's memory per connection.
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long, value_enum, default_value = "ws")]
        mode: raw::HoldMode,
        #[arg(long, default_value_t = 19_500)]
        conns: usize,
        #[arg(long, default_value = "127.0.0.2-127.0.0.5")]
        source_ips: String,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// The server process (for RSS and descriptors).
        #[arg(long)]
        target_pid: u32,
        #[arg(long, default_value_t = 3.0)]
        settle_seconds: f64,
        #[arg(long, default_value_t = 10.0)]
        hold_seconds: f64,
        #[arg(long, default_value = "lg")]
        user_prefix: String,
        #[arg(long)]
        out: PathBuf,
        /// DIR:COUNT: wait, once connected, until COUNT holders have said so in DIR, so the
        /// connections of several holders (one per server) are open at the same time.
        #[arg(long)]
        barrier: Option<String>,
    },
    /// Writes the connect storm's users, conversations and messages into migrated, empty shards
    /// (each conversation on its shard), and marks the user index not built.
    StormSeed {
        /// Shard DSNs, comma separated, in shard order.
        #[arg(long)]
        dsns: String,
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Connects every seeded user to one gateway at once; time to `syncDone`, what each sync
    /// carried, CPU per connect, memory per idle connection.
    Storm {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long, default_value = "127.0.0.2-127.0.0.5")]
        source_ips: String,
        /// Connections in progress at once (0: every user at once).
        #[arg(long, default_value_t = 0)]
        concurrency: usize,
        /// The gateway process (for its memory).
        #[arg(long)]
        target_pid: u32,
        /// Shard DSNs (comma separated), to count the statements the shards ran.
        #[arg(long, default_value = "")]
        dsns: String,
        /// What is measured (code and layout), for the report.
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long, default_value_t = 120.0)]
        timeout_seconds: f64,
        /// Wait after the last `syncDone` before reading the gateway's memory.
        #[arg(long, default_value_t = 3.0)]
        settle_seconds: f64,
        /// Wait after that before reading it again (jemalloc returns freed pages within 10 s).
        #[arg(long, default_value_t = 12.0)]
        idle_seconds: f64,
        #[arg(long = "watch")]
        watches: Vec<Watch>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Deletes the topics whose names start with the topic prefix (`--topic-prefix`, at least 4
    /// characters) and the named consumer groups, on the brokers the Kafka settings name (a
    /// secured broker included: `KAFKA_SECURITY_PROTOCOL` and the settings beside it).
    Cleanup {
        #[command(flatten)]
        kafka: chat_common::kafka::KafkaArgs,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Creates a deployment's topics under the topic prefix, as `chatctl topics` does, on the
    /// brokers the Kafka settings name (a secured broker included, as its admin user).
    Topics {
        #[command(flatten)]
        kafka: chat_common::kafka::KafkaArgs,
        /// Gateway ids, comma separated: an outbound topic each.
        #[arg(long, value_delimiter = ',', required = true)]
        gateways: Vec<String>,
    },
    /// Measures the CPU the watched processes use while this one does nothing (idle load).
    Idle {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long = "watch")]
        watches: Vec<Watch>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Prints in-memory sizes of the frame types a gateway queues per socket (diagnostics).
    #[command(hide = true)]
    Sizes,
    /// A peer websocket server (Centrifugo) measured with the same client as the gateway.
    Peer(peer::PeerArgs),
    /// Prints the Markdown results table from a bench output directory.
    Report {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(path) = &cli.ca_file {
        ws::trust(chat_client::Tls::with_ca_file(path)?);
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cli.threads {
        rt.worker_threads(t.max(1));
    }
    rt.build()?.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Peer(args) => peer::run(args).await?,
        Command::Run {
            fleet,
            rate,
            seconds,
            drain_seconds,
            max_p99_ms,
            metrics,
        } => {
            std::fs::create_dir_all(&fleet.out_dir)?;
            let mut f = e2e::Fleet::connect(fleet.setup()?).await?;
            f.scrape_metrics(metrics);
            let spec = e2e::TrialSpec {
                label: "run".into(),
                rate,
                seconds,
                drain_seconds,
                abort_backlog_seconds: f64::MAX,
                max_p99_ms,
            };
            let report = f.trial(&spec, &fleet.out_dir.join("run.png")).await;
            write_json(&fleet.out_dir.join("run.json"), &report)?;
        }
        Command::Search {
            fleet,
            start_rate,
            max_rate,
            probe_seconds,
            confirm_seconds,
            latency_rate,
            latency_seconds,
            low_rate,
            low_seconds,
            max_p99_ms,
            budget_seconds,
            metrics,
        } => {
            std::fs::create_dir_all(&fleet.out_dir)?;
            let mut f = e2e::Fleet::connect(fleet.setup()?).await?;
            f.scrape_metrics(metrics);
            let s = e2e::SearchSpec {
                start_rate,
                max_rate,
                probe_seconds,
                confirm_seconds,
                latency_rate,
                latency_seconds,
                low_rate,
                low_seconds,
                max_p99_ms,
                budget_seconds,
                out_dir: fleet.out_dir.clone(),
            };
            let report = e2e::search(&mut f, &s).await?;
            write_json(&fleet.out_dir.join("search.json"), &report)?;
        }
        Command::RawKafka {
            brokers,
            topic,
            presence_topic,
            group,
            records,
            rate,
            seconds,
            body_bytes,
            conversations,
            watches,
            out,
        } => {
            let r = raw::raw_kafka(raw::KafkaArgs {
                brokers,
                topic,
                presence_topic,
                group,
                records,
                rate,
                seconds,
                body_bytes,
                pairs: conversations,
                watches,
            })
            .await?;
            write_json(&out, &r)?;
        }
        Command::RawPg {
            dsns,
            rows,
            batch,
            acks_each,
            conversations,
            body_bytes,
            watches,
            out,
        } => {
            let r = raw::raw_pg(raw::PgArgs {
                dsns: dsns.split(',').map(|s| s.trim().to_owned()).collect(),
                rows,
                batch,
                acks_each,
                pairs: conversations,
                body_bytes,
                watches,
            })
            .await?;
            write_json(&out, &r)?;
        }
        Command::EchoServer { addr } => raw::echo_server(&addr).await?,
        Command::Echo {
            url,
            conns,
            source_ips,
            frame_bytes,
            window,
            flat_seconds,
            rate,
            seconds,
            watches,
            out,
        } => {
            let r = raw::echo(raw::EchoArgs {
                url,
                conns,
                source_ips: ws::parse_ips(&source_ips)?,
                frame_bytes: frame_bytes.unwrap_or_else(|| raw::send_frame_bytes(100)),
                window,
                flat_seconds,
                rate,
                seconds,
                watches,
            })
            .await?;
            write_json(&out, &r)?;
        }
        Command::TcpServer { addr } => raw::tcp_server(&addr).await?,
        Command::Hold {
            url,
            mode,
            conns,
            source_ips,
            concurrency,
            target_pid,
            settle_seconds,
            hold_seconds,
            user_prefix,
            out,
            barrier,
        } => {
            let barrier = match barrier {
                Some(b) => {
                    let (dir, count) = b
                        .rsplit_once(':')
                        .ok_or_else(|| anyhow::anyhow!("--barrier is DIR:COUNT"))?;
                    Some((PathBuf::from(dir), count.parse()?))
                }
                None => None,
            };
            let r = raw::hold(raw::HoldArgs {
                url,
                mode,
                conns,
                source_ips: ws::parse_ips(&source_ips)?,
                concurrency,
                target_pid,
                settle_seconds,
                hold_seconds,
                user_prefix,
                barrier,
            })
            .await?;
            write_json(&out, &r)?;
        }
        Command::StormSeed {
            dsns,
            plan,
            body_bytes,
            out,
        } => {
            let r = storm::seed(&split_dsns(&dsns), &plan.plan(), body_bytes).await?;
            if let Some(out) = out {
                write_json(&out, &r)?;
            }
        }
        Command::Storm {
            url,
            plan,
            source_ips,
            concurrency,
            target_pid,
            dsns,
            label,
            timeout_seconds,
            settle_seconds,
            idle_seconds,
            watches,
            out,
        } => {
            let r = storm::storm(storm::StormArgs {
                url,
                plan: plan.plan(),
                source_ips: ws::parse_ips(&source_ips)?,
                concurrency,
                target_pid,
                watches,
                dsns: split_dsns(&dsns),
                label,
                timeout: Duration::from_secs_f64(timeout_seconds),
                settle: Duration::from_secs_f64(settle_seconds),
                idle: Duration::from_secs_f64(idle_seconds),
            })
            .await?;
            write_json(&out, &r)?;
        }
        Command::Cleanup { kafka, groups } => cleanup(&kafka, &groups).await?,
        Command::Topics { kafka, gateways } => {
            use chat_common::topics::{ensure_topics, standard_topics, TopicNames};
            let gateways = gateways
                .iter()
                .map(|g| chat_common::ids::GatewayId::parse(g.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            let topics = standard_topics(&TopicNames::new(&kafka.topic_prefix), &gateways);
            ensure_topics(
                &chat_common::kafka::KafkaConfig::from_args(&kafka),
                &topics,
                None,
            )
            .await
            .with_context(|| format!("creating topics on {}", kafka.kafka_brokers))?;
            for (name, spec) in topics {
                println!("{name}: {} partitions", spec.partitions);
            }
        }
        Command::Idle {
            seconds,
            watches,
            out,
        } => {
            let probe = cpu::Probe::start(&watches);
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            let use_ = probe.stop();
            eprintln!(
                "idle CPU over {seconds} s: {:?}",
                use_.seconds
                    .iter()
                    .map(|(k, v)| format!("{k} {:.2} cores", v / use_.wall_seconds))
                    .collect::<Vec<_>>()
            );
            write_json(&out, &use_)?;
        }
        Command::Sizes => {
            use chat_proto::v1::{ChatMessage, ServerFrame};
            let (f, m) = (
                std::mem::size_of::<ServerFrame>(),
                std::mem::size_of::<ChatMessage>(),
            );
            println!("size_of ServerFrame {f} B, ChatMessage {m} B");
            println!(
                "a tokio mpsc block holds 32 slots: ~{} B for a queue of ServerFrame-sized items (allocated with the channel)",
                32 * (f.max(m) + 8)
            );
        }
        Command::Report { dir } => print!("{}", report::markdown(&dir)?),
    }
    Ok(())
}

async fn cleanup(kafka: &chat_common::kafka::KafkaArgs, groups: &[String]) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::Consumer;
    let prefix = kafka.topic_prefix.as_str();
    anyhow::ensure!(
        prefix.len() >= 4,
        "refusing a topic prefix shorter than 4 characters"
    );
    let cfg = chat_common::kafka::KafkaConfig::from_args(kafka);
    let reader = cfg.reader()?;
    let md = reader.fetch_metadata(None, Duration::from_secs(10))?;
    let topics: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    let admin: AdminClient<DefaultClientContext> = cfg.client_config().create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    if !topics.is_empty() {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        admin.delete_topics(&refs, &opts).await?;
    }
    if !groups.is_empty() {
        let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
        for r in admin.delete_groups(&refs, &opts).await? {
            if let Err((g, code)) = r {
                eprintln!("group {g}: {code}");
            }
        }
    }
    eprintln!("deleted {} topics: {}", topics.len(), topics.join(" "));
    Ok(())
}
