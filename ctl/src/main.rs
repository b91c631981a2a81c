//! `chatctl`: operator commands that are not a shard concern.
//!
//! - `chatctl topics --gateways gw1,gw2` creates `inbound`, `presence` and `outbound-<id>` with
//!   the settings in `infra/topics.json` (existing topics are left alone).
//! - `chatctl token alice` prints an HS256 token for a user (local stack: the secret is
//!   `JWT_SECRET`, default the dev secret).

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
    /// Create the topics (inbound, presence, outbound-<gateway> for each gateway).
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
