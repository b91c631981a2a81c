//! `db-writer`: the shard layer's operator commands.
//!
//! - `db-writer migrate` applies the schema migrations to every shard in `SHARD_DSNS`.
//! - `db-writer locate alice bob` prints the shard of a conversation.

use anyhow::Context;
use chat_common::config::DEFAULT_SHARD_DSNS;
use chat_common::ids::{ConversationKey, UserId};
use clap::{Parser, Subcommand};
use db_writer::{ShardConfig, Shards};

#[derive(Parser)]
#[command(version, about = "Shard layer operations for the chat pipeline")]
struct Cli {
    /// Shard DSNs in shard order, comma separated.
    #[arg(long, env = "SHARD_DSNS", default_value = DEFAULT_SHARD_DSNS, global = true)]
    shards: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply missing schema migrations to every shard.
    Migrate,
    /// Print which shard holds the conversation between two users.
    Locate { a: String, b: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chat_common::telemetry::init_logging();
    let cli = Cli::parse();
    let config = ShardConfig::from_list(&cli.shards, 2)?;
    match cli.command {
        Command::Migrate => {
            let shards = Shards::connect(&config)?;
            shards.migrate().await.context("migrating shards")?;
            println!("{} shards migrated", shards.len());
        }
        Command::Locate { a, b } => {
            let key = ConversationKey::of(&UserId::parse(&a)?, &UserId::parse(&b)?)
                .context("a conversation needs two different users")?;
            let shard = Shards::connect(&config)?.locator().shard_of(&key);
            println!("{key} -> shard {shard} ({})", config.dsns[shard]);
        }
    }
    Ok(())
}
