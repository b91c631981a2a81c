//! `chatctl`: operator commands that are not a shard concern.
//!
//! - `chatctl topics --gateways gw1,gw2` creates `inbound`, `inbound-dlq`, `presence` and
//!   `outbound-<id>` with
//!   the settings in `infra/topics.json` (existing topics are left alone).
//! - `chatctl token alice` prints an HS256 token for a user (local stack: the secret is
//!   `JWT_SECRET`, default the dev secret).
//! - `chatctl tail inbound --from beginning --user alice` prints records as JSON lines
//!   (`chatctl tail inbound-dlq` prints dead letters with their original record decoded).

mod tail;

use anyhow::Context;
use chat_common::auth::{TokenIssuer, DEFAULT_AUDIENCE, DEFAULT_ISSUER};
use chat_common::config::{env_or, DEFAULT_BROKERS, DEV_JWT_SECRET};
use chat_common::ids::{GatewayId, UserId};
use chat_common::kafka::KafkaConfig;
use chat_common::topics::{ensure_topics, standard_topics, TopicNames};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Operator commands for the chat pipeline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the topics (inbound, inbound-dlq, presence, outbound-<gateway> for each gateway).
    Topics {
        /// Gateway ids, comma separated.
        #[arg(
            long,
            env = "GATEWAY_IDS",
            default_value = "gw1,gw2",
            value_delimiter = ','
        )]
        gateways: Vec<String>,
        /// Kafka bootstrap servers.
        #[arg(long, env = "KAFKA_BROKERS", default_value = DEFAULT_BROKERS)]
        brokers: String,
        /// Prefix of every topic name.
        #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
        prefix: String,
    },
    /// Print a topic's records as JSON lines (decoded with the chat.v1 schema).
    Tail {
        /// Topic: inbound, inbound-dlq, presence, outbound-<gateway> (the prefix is added).
        topic: String,
        /// Start: beginning, end, offset:N, ms:N or an RFC 3339 time.
        #[arg(long, default_value = "beginning")]
        from: String,
        /// Keep printing new records (default: stop at the end of the log).
        #[arg(long, short)]
        follow: bool,
        /// Only records about this user.
        #[arg(long)]
        user: Option<String>,
        /// Only records of this conversation (for example alice:bob).
        #[arg(long)]
        conversation: Option<String>,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<u64>,
        #[arg(long, env = "KAFKA_BROKERS", default_value = DEFAULT_BROKERS)]
        brokers: String,
        #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
        prefix: String,
    },
    /// Print a signed token for a user.
    Token {
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Topics {
            gateways,
            brokers,
            prefix,
        } => {
            let gateways = gateways
                .iter()
                .map(|g| GatewayId::parse(g.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            let names = TopicNames::new(prefix);
            let topics = standard_topics(&names, &gateways);
            ensure_topics(&KafkaConfig::new(&brokers), &topics, None)
                .await
                .with_context(|| format!("creating topics on {brokers}"))?;
            for (name, spec) in topics {
                println!("{name}: {} partitions", spec.partitions);
            }
        }
        Command::Tail {
            topic,
            from,
            follow,
            user,
            conversation,
            max,
            brokers,
            prefix,
        } => {
            let start = chat_common::kafka::parse_start(&from)
                .map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            let options = tail::TailOptions {
                topic: format!("{prefix}{topic}"),
                start,
                follow,
                user,
                conversation,
                max,
            };
            tail::tail(&KafkaConfig::new(&brokers), options).await?;
        }
        Command::Token { user, ttl } => {
            let user = UserId::parse(&user)?;
            let secret = env_or("JWT_SECRET", DEV_JWT_SECRET);
            let issuer = TokenIssuer::hs256(
                secret.as_bytes(),
                &env_or("JWT_ISSUER", DEFAULT_ISSUER),
                &env_or("JWT_AUDIENCE", DEFAULT_AUDIENCE),
            );
            println!("{}", issuer.issue(&user, ttl)?);
        }
    }
    Ok(())
}
