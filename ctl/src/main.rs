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
//! - `chatctl acls --gateways gw1,gw2` creates the deployment's Kafka ACLs (each service's user
//!   may do what it needs, nothing more; `--print` shows them without creating, `acls list`
//!   shows what the brokers hold); `chatctl kafka-users set gateway-gw3` creates a SCRAM user
//!   or sets its password (read from standard input), `kafka-users delete` removes it. Both run
//!   as a user the broker lets alter ACLs and credentials (its admin).

mod kafka_admin;
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

/// The deployment's gateways.
#[derive(Args)]
struct Gateways {
    /// Gateway ids, comma separated.
    #[arg(
        long,
        env = "GATEWAY_IDS",
        default_value = "gw1,gw2",
        value_delimiter = ','
    )]
    gateways: Vec<String>,
}

impl Gateways {
    /// The ids as given (blanks around each trimmed, empty ones skipped).
    fn parse(&self) -> anyhow::Result<Vec<GatewayId>> {
        Ok(self
            .gateways
            .iter()
            .map(|g| g.trim())
            .filter(|g| !g.is_empty())
            .map(GatewayId::parse)
            .collect::<Result<Vec<_>, _>>()?)
    }
}

#[derive(Args)]
struct CreateTopics {
    #[command(flatten)]
    gateways: Gateways,
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
enum AclsAction {
    /// Print the ACLs the brokers hold (every user's, or one user's).
    List {
        /// Only this user's (for example gateway-gw1).
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        at: Deployment,
    },
}

#[derive(Subcommand)]
enum UsersAction {
    /// Create a SCRAM-SHA-512 user or set its password. The password is the first line of
    /// standard input (never an argument: it would show in `ps`).
    Set {
        user: String,
        /// PBKDF2 iterations of the stored hash (Kafka accepts 4096 to 16384).
        #[arg(long, default_value_t = 8192)]
        iterations: i32,
        #[command(flatten)]
        at: Deployment,
    },
    /// Remove a user's SCRAM-SHA-512 credential: it can no longer log in (its ACLs stay until
    /// deleted).
    Delete {
        user: String,
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
    /// Create the deployment's Kafka ACLs (gateway-<id>, multiplexer, data), or list them
    /// (`acls list`). Existing ACLs are left as they are; prints each one.
    #[command(args_conflicts_with_subcommands = true)]
    Acls {
        #[command(subcommand)]
        action: Option<AclsAction>,
        #[command(flatten)]
        gateways: Gateways,
        /// The multiplexers' consumer group (default: <prefix>multiplexer).
        #[arg(long)]
        multiplexer_group: Option<String>,
        /// Print the ACLs without creating them.
        #[arg(long)]
        print: bool,
        #[command(flatten)]
        at: Deployment,
    },
    /// Create, update or delete the brokers' SCRAM users (`kafka-users set NAME`).
    KafkaUsers {
        #[command(subcommand)]
        action: UsersAction,
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
                    let gateways = gateways.parse()?;
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
        Command::Acls {
            action: Some(AclsAction::List { user, at }),
            ..
        } => {
            let kafka = at.kafka()?;
            let who = user.clone();
            let lines =
                tokio::task::spawn_blocking(move || kafka_admin::list_acls(&kafka, who.as_deref()))
                    .await??;
            if lines.is_empty() {
                // librdkafka drops the broker's refusal of a DescribeAcls request (a user
                // without DESCRIBE on the cluster), so an empty answer may be one.
                eprintln!(
                    "no ACLs{} (or none this user may see: only a user allowed to describe the \
                     cluster, such as the admin, sees them)",
                    user.as_deref()
                        .map(|u| format!(" for {u}"))
                        .unwrap_or_default()
                );
            }
            for line in lines {
                println!("{line}");
            }
        }
        Command::Acls {
            action: None,
            gateways,
            multiplexer_group,
            print,
            at,
        } => {
            let names = TopicNames::new(at.prefix.clone());
            let gateways = gateways.parse()?;
            let group = multiplexer_group.unwrap_or_else(|| format!("{}multiplexer", at.prefix));
            let acls = kafka_admin::deployment_acls(&names, &gateways, &group);
            if !print {
                let kafka = at.kafka()?;
                let wanted = acls.clone();
                tokio::task::spawn_blocking(move || kafka_admin::create_acls(&kafka, &wanted))
                    .await?
                    .with_context(|| format!("creating ACLs on {}", at.brokers))?;
            }
            for acl in acls {
                println!("{acl}");
            }
        }
        Command::KafkaUsers { action } => match action {
            UsersAction::Set {
                user,
                iterations,
                at,
            } => {
                let mut password = String::new();
                std::io::stdin()
                    .read_line(&mut password)
                    .context("reading the password from standard input")?;
                let password = password.trim_end_matches(['\r', '\n']).to_owned();
                anyhow::ensure!(
                    !password.is_empty(),
                    "no password: give it as the first line of standard input"
                );
                let kafka = at.kafka()?;
                let who = user.clone();
                tokio::task::spawn_blocking(move || {
                    let change = kafka_admin::UserChange::Set {
                        password: &password,
                        iterations,
                    };
                    kafka_admin::alter_user(&kafka, &who, change)
                })
                .await??;
                println!("{user}: SCRAM-SHA-512 credential set");
            }
            UsersAction::Delete { user, at } => {
                let kafka = at.kafka()?;
                let who = user.clone();
                tokio::task::spawn_blocking(move || {
                    kafka_admin::alter_user(&kafka, &who, kafka_admin::UserChange::Delete)
                })
                .await??;
                println!("{user}: SCRAM-SHA-512 credential deleted");
            }
        },
        Command::Token { user, ttl } => {
            let user = UserId::parse_addressable(&user)?;
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
