//! Multiplexer configuration: flags with environment variables behind them ([`Args`], defaults
//! run the local stack), turned into the [`Config`] the multiplexer runs with.

use std::net::SocketAddr;
use std::time::Duration;

use chat_common::config::{parse_args, ConfigError, ShardArgs};
use chat_common::kafka::{KafkaArgs, KafkaConfig};
use chat_common::topics::TopicNames;
use clap::{ArgAction, CommandFactory, Parser};
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
    /// Most records held aside while a shard they need is down (`holding`); at the bound the
    /// multiplexer stops reading until the shard is back.
    pub max_held: usize,
    /// How long to wait to fill a batch once its first record arrived, while the multiplexer
    /// takes at least `batch_wait_above` records a second.
    pub batch_wait: Duration,
    /// Below this many records a second (back below half of it once above), a batch takes what
    /// has arrived and does not wait for more; 0: always wait.
    pub batch_wait_above: u64,
    /// Write the pushes for a gateway as batch records (one per gateway per batch) rather than
    /// one record per push. Gateways read both; turn off while gateways of an earlier version,
    /// which read only single records, still run.
    pub outbound_batches: bool,
    /// Push a batch as soon as it is stored, beside its index write, and again after the index
    /// write to any session announced meanwhile (the default; see the pipeline's `early`). Off:
    /// the index is written first and the batch pushed once, after it.
    pub early_push: bool,
    /// Address of `/healthz`, `/readyz`, `/metrics`.
    pub http_addr: SocketAddr,
    /// In delete-on-ack mode, how long an unacked message is kept before its body is erased.
    pub unacked_ttl: Duration,
    /// How often the expiry sweep runs (delete-on-ack mode).
    pub expiry_interval: Duration,
    /// In delete-on-ack mode, how long the row of a message erased (acked or expired) is kept
    /// before it is deleted outright; longer than `inbound`'s retention, so that a replay of the
    /// log finds every row it could repeat.
    pub erased_row_ttl: Duration,
    /// Apply missing shard migrations at start. Off where migrations run as their own step
    /// before a rollout (the Terraform deployment): the multiplexer then refuses to start on a
    /// shard that lacks one, naming it.
    pub migrate: bool,
    /// Threads of the async runtime `main` builds (`MULTIPLEXER_WORKER_THREADS`); [`crate::start`]
    /// runs on whatever runtime calls it.
    pub worker_threads: usize,
}

/// A multiplexer's settings as declared to its command line: each a flag with an environment
/// variable behind it and the default that runs the local stack. `multiplexer --help` lists them,
/// and `docs/configuration.md` is checked against this declaration (a test keeps the two in step).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "multiplexer",
    version,
    about = "Consumes inbound, stores each message in its shard, routes it to the recipient's gateway topic.",
    after_help = "Every setting is a flag or the environment variable named beside it (the flag wins); \
                  a variable set to the empty string counts as unset. Logging: RUST_LOG (default \
                  info) and LOG_FORMAT (json for JSON lines). See docs/configuration.md.",
    // A batch's pushes to one gateway are one record, sent when the batch is done: there is
    // nothing to wait for.
    mut_arg("kafka_linger_ms", |a| a.default_value("0")),
    // Only a gateway's producer has lanes; the variable is accepted and has no effect here.
    mut_arg("kafka_linger_above", |a| a.hide(true))
)]
pub struct Args {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub shards: ShardArgs,
    /// keep, or delete-on-ack (erase a body once its recipient acks; unacked ones after
    /// UNACKED_TTL_SECS).
    #[arg(long, env = "RETENTION", default_value = "keep", value_name = "MODE", value_parser = parse_retention)]
    pub retention: Retention,
    /// Consumer group over inbound (every multiplexer of a deployment shares it).
    #[arg(
        long,
        env = "MULTIPLEXER_GROUP",
        default_value = "multiplexer",
        value_name = "GROUP"
    )]
    pub multiplexer_group: String,
    /// Address of /healthz, /readyz, /metrics.
    #[arg(
        long,
        env = "MULTIPLEXER_HTTP_ADDR",
        default_value = "127.0.0.1:9300",
        value_name = "HOST:PORT"
    )]
    pub multiplexer_http_addr: SocketAddr,
    /// Records per batch (one transaction per shard per batch).
    #[arg(
        long,
        env = "MULTIPLEXER_MAX_BATCH",
        default_value_t = 5000,
        value_name = "N"
    )]
    pub multiplexer_max_batch: usize,
    /// Records held aside at most while a shard they need is down.
    #[arg(
        long,
        env = "MULTIPLEXER_MAX_HELD",
        default_value_t = 200_000,
        value_name = "N"
    )]
    pub multiplexer_max_held: usize,
    /// Milliseconds to fill a batch after its first record, above MULTIPLEXER_BATCH_WAIT_ABOVE.
    #[arg(
        long,
        env = "MULTIPLEXER_BATCH_WAIT_MS",
        default_value_t = 2,
        value_name = "MS"
    )]
    pub multiplexer_batch_wait_ms: u64,
    /// Records a second (messages and acks) below which a batch does not wait to fill; 0:
    /// always wait.
    #[arg(
        long,
        env = "MULTIPLEXER_BATCH_WAIT_ABOVE",
        default_value_t = 10_000,
        value_name = "N"
    )]
    pub multiplexer_batch_wait_above: u64,
    /// Write a batch's pushes for a gateway as one batch record; false while gateways older than
    /// batched outbound records run.
    #[arg(long, env = "MULTIPLEXER_OUTBOUND_BATCH", default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub multiplexer_outbound_batch: bool,
    /// Push a batch once stored, beside its index write (then again to sessions announced
    /// meanwhile).
    #[arg(long, env = "MULTIPLEXER_EARLY_PUSH", default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub multiplexer_early_push: bool,
    /// Milliseconds a multiplexer may be silent before it loses its partitions to the others.
    #[arg(
        long,
        env = "MULTIPLEXER_MAX_POLL_INTERVAL_MS",
        default_value_t = 60_000,
        value_name = "MS"
    )]
    pub multiplexer_max_poll_interval_ms: u64,
    /// Delete-on-ack: seconds after which an unacked message is erased (default 30 days).
    #[arg(long, env = "UNACKED_TTL_SECS", default_value_t = 30 * 24 * 3600, value_name = "SECS")]
    pub unacked_ttl_secs: u64,
    /// Delete-on-ack: seconds after which the row of an erased message (acked or expired) is
    /// deleted, leaving the conversation's counters (default 8 days: longer than inbound's 7-day
    /// retention, so a replay of the log never stores an erased message again).
    #[arg(long, env = "ERASED_ROW_TTL_SECS", default_value_t = 8 * 24 * 3600, value_name = "SECS")]
    pub erased_row_ttl_secs: u64,
    /// Apply missing shard migrations at start; false: refuse to start while a shard lacks one
    /// (where migrations run as their own step before a rollout).
    #[arg(long, env = "MULTIPLEXER_MIGRATE", default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub multiplexer_migrate: bool,
    /// Threads of the multiplexer's async runtime. One by default: its stages share one task
    /// and its blocking calls go to a pool of their own, and a second thread cost latency under
    /// load (docs/performance-log.md, 2026-12-05).
    #[arg(long, env = "MULTIPLEXER_WORKER_THREADS", default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub multiplexer_worker_threads: u16,
    /// Delete-on-ack: seconds between expiry sweeps.
    #[arg(
        long,
        env = "EXPIRY_INTERVAL_SECS",
        default_value_t = 60,
        value_name = "SECS"
    )]
    pub expiry_interval_secs: u64,
}

fn parse_retention(s: &str) -> Result<Retention, db_writer::UnknownRetention> {
    s.parse()
}

impl Config {
    /// The declaration of the multiplexer's settings as a command (what `multiplexer --help`
    /// prints): each argument's flag, variable and default.
    pub fn command() -> clap::Command {
        Args::command()
    }

    /// Reads the process's flags and environment. `--help` and `--version` print and exit 0, a
    /// value that does not parse exits 2 naming it, before anything else happens (see
    /// [`chat_common::config::parse_args`]).
    pub fn from_command_line() -> Result<Self, ConfigError> {
        Self::from_args(parse_args())
    }

    /// The configuration `args` declare. Refuses a shard list that cannot be used, naming the
    /// variable.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let dsns = &args.shards.shard_dsns;
        let shards = ShardConfig::from_list(dsns, args.shards.shard_pool_size)
            .map_err(|e| ConfigError::new("SHARD_DSNS", dsns.clone(), e))?;
        let kafka = KafkaConfig {
            max_poll_interval: Duration::from_millis(args.multiplexer_max_poll_interval_ms),
            ..KafkaConfig::from_args(&args.kafka)
        };
        Ok(Self {
            kafka,
            topics: TopicNames::new(args.kafka.topic_prefix.clone()),
            group: args.multiplexer_group,
            shards,
            retention: args.retention,
            max_batch: args.multiplexer_max_batch,
            max_held: args.multiplexer_max_held,
            batch_wait: Duration::from_millis(args.multiplexer_batch_wait_ms),
            batch_wait_above: args.multiplexer_batch_wait_above,
            outbound_batches: args.multiplexer_outbound_batch,
            early_push: args.multiplexer_early_push,
            http_addr: args.multiplexer_http_addr,
            unacked_ttl: Duration::from_secs(args.unacked_ttl_secs),
            expiry_interval: Duration::from_secs(args.expiry_interval_secs),
            erased_row_ttl: Duration::from_secs(args.erased_row_ttl_secs),
            migrate: args.multiplexer_migrate,
            worker_threads: usize::from(args.multiplexer_worker_threads),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    /// `args` parsed as the multiplexer's command line, with no environment variable in play.
    fn parse(args: &[&str]) -> Result<Config, String> {
        let cmd = Args::command().mut_args(|a| a.env(clap::builder::Resettable::Reset));
        let matches = cmd
            .try_get_matches_from(std::iter::once("multiplexer").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let args = Args::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        Config::from_args(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_run_the_local_stack_and_do_not_linger() {
        let c = parse(&[]).expect("the defaults parse");
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.linger, Duration::ZERO);
        assert_eq!(c.kafka.max_poll_interval, Duration::from_secs(60));
        assert_eq!(c.topics.prefix(), "");
        assert_eq!(c.group, "multiplexer");
        assert_eq!(c.shards.dsns.len(), 4);
        assert_eq!(c.shards.pool_size, 8);
        assert_eq!(c.retention, Retention::Keep);
        assert_eq!(c.max_batch, 5000);
        assert_eq!(c.max_held, 200_000);
        assert_eq!(c.batch_wait, Duration::from_millis(2));
        assert_eq!(c.batch_wait_above, 10_000);
        assert!(c.outbound_batches);
        assert!(c.early_push);
        assert_eq!(c.http_addr, "127.0.0.1:9300".parse().expect("an address"));
        assert_eq!(c.unacked_ttl, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(c.expiry_interval, Duration::from_secs(60));
        assert_eq!(c.erased_row_ttl, Duration::from_secs(8 * 24 * 3600));
        assert!(c.migrate);
        assert_eq!(c.worker_threads, 1);
    }

    #[test]
    fn flags_set_what_the_variables_set() {
        let c = parse(&[
            "--kafka-linger-ms",
            "7",
            "--multiplexer-max-poll-interval-ms",
            "1500",
            "--multiplexer-outbound-batch",
            "false",
            "--retention",
            "delete-on-ack",
            "--kafka-consumer-opts",
            "fetch.min.bytes=65536",
            "--topic-prefix",
            "t1-",
            "--multiplexer-worker-threads",
            "3",
        ])
        .expect("valid flags");
        assert_eq!(c.worker_threads, 3);
        assert_eq!(c.kafka.linger, Duration::from_millis(7));
        assert_eq!(c.kafka.max_poll_interval, Duration::from_millis(1500));
        assert!(!c.outbound_batches);
        assert_eq!(c.retention, Retention::DeleteOnAck);
        assert_eq!(
            c.kafka.consumer_opts,
            [("fetch.min.bytes".to_owned(), "65536".to_owned())]
        );
        assert_eq!(c.topics.prefix(), "t1-");
    }

    #[test]
    fn bad_values_are_refused_naming_the_setting() {
        let e = parse(&["--multiplexer-max-batch", "many"]).expect_err("not a number");
        assert!(e.contains("--multiplexer-max-batch"), "{e}");
        let e = parse(&["--kafka-producer-opts", "linger.ms"]).expect_err("not key=value");
        assert!(e.contains("--kafka-producer-opts"), "{e}");
        let e = parse(&["--shard-dsns", " , "]).expect_err("no shard");
        assert!(e.contains("SHARD_DSNS"), "{e}");
        let e = parse(&["--multiplexer-worker-threads", "0"]).expect_err("no thread");
        assert!(e.contains("--multiplexer-worker-threads"), "{e}");
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
