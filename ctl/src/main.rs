//! `chatctl`: operator commands that are not a shard concern.
//!
//! - `chatctl topics --gateways gw1,gw2` creates `inbound`, `inbound-dlq`, `presence` and
//!   `outbound-<id>` with the settings in `infra/topics.json` (existing topics are left alone);
//!   `chatctl topics delete --gateway gw3` deletes the outbound topic of a gateway that is gone
//!   (refused while the presence log says users are online there).
//! - `chatctl token alice` prints an HS256 token for a user (local stack: the secret is
//!   `JWT_SECRET`, default the dev secret).
//! - `chatctl tail inbound --from beginning --user alice` prints records as JSON lines
//!   (`chatctl tail inbound-dlq` prints dead letters with their original record decoded). The
//!   decoder follows the topic's role in the deployment, read from its whole name, or `--role`.

mod tail;
mod topics;

use anyhow::Context;
use chat_common::auth::{TokenIssuer, DEFAULT_AUDIENCE, DEFAULT_ISSUER};
use chat_common::config::{env_or, DEFAULT_BROKERS, DEV_JWT_SECRET};
use chat_common::ids::{GatewayId, UserId};
use chat_common::kafka::KafkaConfig;
use chat_common::topics::{ensure_topics, standard_topics, TopicNames, TopicRole};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Operator commands for the chat pipeline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the deployment's topics are. How to reach the brokers securely is read from the
/// services' variables (`KAFKA_SECURITY_PROTOCOL`, `KAFKA_CA_FILE`, `KAFKA_SASL_*`).
#[derive(Args)]
struct Deployment {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = DEFAULT_BROKERS)]
    brokers: String,
    /// Prefix of every topic name.
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    prefix: String,
}

impl Deployment {
    /// The brokers, with the security settings of the environment.
    fn kafka(&self) -> anyhow::Result<KafkaConfig> {
        Ok(KafkaConfig::new(&self.brokers).with_env_opts()?)
    }
}

#[derive(Args)]
struct CreateTopics {
    /// Gateway ids, comma separated.
    #[arg(
        long,
        env = "GATEWAY_IDS",
        default_value = "gw1,gw2",
        value_delimiter = ','
    )]
    gateways: Vec<String>,
    #[command(flatten)]
    at: Deployment,
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create the topics (what `chatctl topics` alone does).
    Create(CreateTopics),
    /// Delete the outbound topic of a gateway taken out of the deployment for good.
    ///
    /// Refused while the presence log says users are online at that gateway (a gateway stopped
    /// gracefully has marked them offline). A gateway that died without doing so leaves them
    /// online: `--clear-presence` marks them offline first, and they get what they missed by
    /// sync when they reconnect elsewhere.
    Delete {
        /// The gateway whose `outbound-<gateway>` topic goes.
        #[arg(long)]
        gateway: String,
        /// Mark the users still online at the gateway offline, then delete.
        #[arg(long)]
        clear_presence: bool,
        #[command(flatten)]
        at: Deployment,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Create the topics (inbound, inbound-dlq, presence, outbound-<gateway> for each gateway),
    /// or delete a gateway's outbound topic (`topics delete`).
    #[command(args_conflicts_with_subcommands = true)]
    Topics {
        #[command(subcommand)]
        action: Option<TopicsAction>,
        #[command(flatten)]
        create: CreateTopics,
    },
    /// Print a topic's records as JSON lines (decoded with the chat.v1 schema).
    Tail {
        /// Topic: inbound, inbound-dlq, presence, outbound-<gateway> (the prefix is added).
        topic: String,
        /// Decode as this kind of topic (inbound, inbound-dlq, presence, outbound) instead of
        /// the role the topic's name has in the deployment: for a copy of a topic under
        /// another name.
        #[arg(long)]
        role: Option<TopicRole>,
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
        #[command(flatten)]
        at: Deployment,
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
        Command::Topics { action, create } => {
            match action.unwrap_or(TopicsAction::Create(create)) {
                TopicsAction::Create(CreateTopics { gateways, at }) => {
                    let gateways = gateways
                        .iter()
                        .map(|g| GatewayId::parse(g.trim()))
                        .collect::<Result<Vec<_>, _>>()?;
                    let names = TopicNames::new(at.prefix.clone());
                    let topics = standard_topics(&names, &gateways);
                    ensure_topics(&at.kafka()?, &topics, None)
                        .await
                        .with_context(|| format!("creating topics on {}", at.brokers))?;
                    for (name, spec) in topics {
                        println!("{name}: {} partitions", spec.partitions);
                    }
                }
                TopicsAction::Delete {
                    gateway,
                    clear_presence,
                    at,
                } => {
                    let gateway = GatewayId::parse(&gateway)?;
                    let names = TopicNames::new(at.prefix.clone());
                    let kafka = at.kafka()?;
                    topics::delete_outbound(&kafka, &names, &gateway, clear_presence).await?;
                }
            }
        }
        Command::Tail {
            topic,
            role,
            from,
            follow,
            user,
            conversation,
            max,
            at,
        } => {
            let start = chat_common::kafka::parse_start(&from)
                .map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            let names = TopicNames::new(at.prefix.clone());
            let topic = format!("{}{topic}", names.prefix());
            let role = match role.or_else(|| names.role(&topic)) {
                Some(role) => role,
                None => anyhow::bail!(
                    "{topic} is not one of the deployment's topics (inbound, inbound-dlq, \
                     presence, outbound-<gateway>, after the prefix {:?}): say how to decode it \
                     with --role",
                    names.prefix()
                ),
            };
            let options = tail::TailOptions {
                topic,
                role,
                start,
                follow,
                user,
                conversation,
                max,
            };
            tail::tail(&at.kafka()?, options).await?;
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
