//! `db-writer`: the shard layer's operator commands.
//!
//! - `db-writer roles`, connected as an administrator (the RDS master user), creates the owner,
//!   writer and reader roles with the passwords in `CHAT_OWNER_PASSWORD`, `CHAT_WRITER_PASSWORD`
//!   and `CHAT_READER_PASSWORD`, hands the shard databases to the owner and grants the others
//!   their part.
//! - `db-writer migrate` applies the schema migrations to every shard in `SHARD_DSNS` (as the
//!   owner); with `--retention delete-on-ack` it also builds the expiry sweep's index.
//! - `db-writer locate alice bob` prints the shard of a conversation.
//! - `db-writer replay --from beginning` rebuilds the shards in `SHARD_DSNS` (the same layout,
//!   empty shards, or a new layout: resharding) from the `inbound` log, idempotently.
//! - `db-writer rebuild-index` builds every user's conversation index from the shards (after
//!   upgrading to a release with the index, or restoring shards); `check-index` checks it.
//! - `db-writer export --since 2026-11-01T00:00:00Z --out messages.jsonl` writes a time range of
//!   messages as JSON lines, or Parquet with `--format parquet`; with `--cursor FILE`, the
//!   messages committed since the previous export of that cursor (keep mode only).

use std::io::Write as _;

use anyhow::Context;
use chat_common::config::DEFAULT_SHARD_DSNS;
use chat_common::ids::{ConversationKey, UserId};
use clap::{Parser, Subcommand};
use db_writer::{replay, roles, Retention, ShardConfig, Shards};

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
    /// Apply missing schema migrations to every shard, and what the retention mode needs (in
    /// delete-on-ack mode, the expiry sweep's index). Run as the shards' owner.
    Migrate {
        /// The deployment's retention mode: keep | delete-on-ack.
        #[arg(long, env = "RETENTION", default_value = "keep")]
        retention: Retention,
    },
    /// Create the owner, writer and reader roles (or set their passwords), make the owner the
    /// owner of each shard database and its tables, and grant the writer and the reader their
    /// part. Run as an administrator (the RDS master user). The passwords are read from
    /// CHAT_OWNER_PASSWORD, CHAT_WRITER_PASSWORD and CHAT_READER_PASSWORD, never from the
    /// command line.
    Roles,
    /// Print which shard holds the conversation between two users.
    Locate { a: String, b: String },
    /// Export messages as JSON lines or Parquet: a time range, or incrementally from a cursor
    /// (keep mode only).
    Export(ExportArgs),
    /// Rebuild (or reshard into) the shards in --shards from the inbound log.
    Replay(ReplayArgs),
    /// Build every user's conversation index from what the shards hold (safe while the
    /// pipeline runs), then mark it built so that gateways read it.
    RebuildIndex,
    /// Check every user's conversation index against the shards; exits 1 on a violation.
    CheckIndex {
        /// Most violations to print.
        #[arg(long, default_value_t = 20)]
        max: usize,
    },
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Start of the range: ms:N or an RFC 3339 time (inclusive). Optional with --cursor
    /// (default: the beginning).
    #[arg(long, required_unless_present = "cursor")]
    since: Option<String>,
    /// End of the range: ms:N or an RFC 3339 time (exclusive; default now). Not with --cursor,
    /// which would never come back for what it left out.
    #[arg(long, conflicts_with = "cursor")]
    until: Option<String>,
    /// Output file (default: standard output).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Output format: jsonl (the `chat.v1.ChatMessage` JSON mapping, one message a line) or
    /// parquet (typed columns: docs/data.md).
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
    /// Incremental export: the messages committed since the export that wrote FILE (all of
    /// them if FILE does not exist yet); FILE is replaced once the output is complete.
    #[arg(long, value_name = "FILE")]
    cursor: Option<std::path::PathBuf>,
    /// The deployment's retention mode: keep | delete-on-ack.
    #[arg(long, env = "RETENTION", default_value = "keep")]
    retention: Retention,
}

/// `db-writer export`'s output formats.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Jsonl,
    Parquet,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Start: `beginning`, `offset:N` (every partition), `ms:N` or an RFC 3339 time.
    #[arg(long, default_value = "beginning", value_parser = replay::parse_start)]
    from: replay::Start,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = chat_common::config::DEFAULT_BROKERS)]
    brokers: String,
    /// Prefix of the topic names.
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// The replay's own consumer group (default: a new one per run).
    #[arg(long)]
    group: Option<String>,
    /// Retention mode the acks are applied with: keep | delete-on-ack.
    #[arg(long, env = "RETENTION", default_value = "keep")]
    retention: Retention,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chat_common::telemetry::init_logging();
    let cli = Cli::parse();
    let config = ShardConfig::from_list(&cli.shards, 2)?;
    match cli.command {
        Command::Migrate { retention } => {
            let shards = Shards::connect(&config)?;
            shards
                .migrate_for(retention)
                .await
                .context("migrating shards")?;
            match retention {
                Retention::Keep => println!("{} shards migrated", shards.len()),
                Retention::DeleteOnAck => println!(
                    "{} shards migrated; the expiry sweep's index is ready",
                    shards.len()
                ),
            }
        }
        Command::Roles => {
            let password = |name: &str| match std::env::var(name) {
                Ok(p) if !p.is_empty() => Ok(p),
                _ => Err(anyhow::anyhow!("{name} is not set")),
            };
            let passwords = roles::RolePasswords {
                owner: password("CHAT_OWNER_PASSWORD")?,
                writer: password("CHAT_WRITER_PASSWORD")?,
                reader: password("CHAT_READER_PASSWORD")?,
            };
            let shards = Shards::connect(&config)?;
            let done = shards
                .ensure_roles(&passwords)
                .await
                .context("creating the roles")?;
            println!(
                "roles {}, {}, {} in place on {} shards: {} created, {} passwords set, {} databases and {} tables handed to {}",
                roles::OWNER,
                roles::WRITER,
                roles::READER,
                shards.len(),
                done.created,
                done.updated,
                done.databases,
                done.relations,
                roles::OWNER
            );
        }
        Command::Locate { a, b } => {
            let key = ConversationKey::of(&UserId::parse(&a)?, &UserId::parse(&b)?)
                .context("a conversation needs two different users")?;
            let shard = Shards::connect(&config)?.locator().shard_of(&key);
            // The DSN without its password: this is printed, and terminals are logged.
            let dsn = db_writer::redacted(&config.dsns[shard]);
            println!("{key} -> shard {shard} ({dsn})");
        }
        Command::Export(args) => export(&config, args).await?,
        Command::Replay(args) => replay(&config, args).await?,
        Command::RebuildIndex => {
            let shards = Shards::connect(&config)?;
            migrate_if_behind(&shards).await?;
            let done = shards
                .rebuild_index()
                .await
                .context("rebuilding the index")?;
            println!(
                "user index rebuilt on {} shards: {} conversation directions read, {} index rows written",
                shards.len(),
                done.directions,
                done.rows
            );
        }
        Command::CheckIndex { max } => {
            let shards = Shards::connect(&config)?;
            let found = shards
                .check_index(max)
                .await
                .context("checking the index")?;
            for v in &found {
                println!("{v}");
            }
            if !found.is_empty() {
                anyhow::bail!("{} index rows break the invariant", found.len());
            }
            println!("user index consistent with {} shards", shards.len());
        }
    }
    Ok(())
}

/// `db-writer export`: a time range of messages, or those committed since a cursor, as JSON
/// lines (the wire mapping of `chat.v1.ChatMessage`) or Parquet. Only data goes to the output;
/// the summary and the logs go to stderr.
async fn export(config: &ShardConfig, args: ExportArgs) -> anyhow::Result<()> {
    use db_writer::export::{ExportCursor, Selection};
    let ExportArgs {
        since,
        until,
        out,
        format,
        cursor,
        retention,
    } = args;
    anyhow::ensure!(
        retention == Retention::Keep,
        "export works in keep mode only: in delete-on-ack mode a message's content is erased once its recipient acks, so an export would be partial and would copy content the system promised to delete"
    );
    let time = |s: &str| match chat_common::kafka::parse_start(s) {
        Ok(chat_common::kafka::Start::Timestamp(ms)) => Ok(ms),
        _ => Err(anyhow::anyhow!(
            "expected ms:N or an RFC 3339 time, got {s:?}"
        )),
    };
    let from = since.as_deref().map(time).transpose()?.unwrap_or(i64::MIN);
    let until = match until {
        Some(u) => time(&u)?,
        None => chat_common::now_ms(),
    };
    let previous = match &cursor {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(
                ExportCursor::from_json(&text)
                    .with_context(|| format!("reading the cursor {}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("reading the cursor {}", path.display()))
            }
        },
        None => None,
    };
    let selection = match &cursor {
        Some(_) => Selection::CommittedSince {
            after: previous.as_ref(),
            since_ms: from,
        },
        None => Selection::SentBetween {
            from_ms: from,
            until_ms: until,
        },
    };
    let shards = Shards::connect(config)?;
    let sink: Box<dyn std::io::Write + Send> = match &out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let written = write_export(&shards, selection, format, sink).await;
    if let (Err(_), Some(path)) = (&written, &out) {
        // Nothing half-written is left where a reader might take it for an export.
        let _ = std::fs::remove_file(path);
    }
    let exported = written?;
    if let Some(path) = &out {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", path.display()))?;
    }
    match &cursor {
        Some(path) => {
            // Only now that the output is complete: a failed run leaves the cursor where it was.
            write_atomically(path, exported.cursor.to_json().as_bytes())
                .with_context(|| format!("writing the cursor {}", path.display()))?;
            eprintln!(
                "exported {} messages committed since {}; cursor {} moved",
                exported.messages,
                if previous.is_some() {
                    "the previous export"
                } else {
                    "the beginning"
                },
                path.display()
            );
        }
        None => eprintln!(
            "exported {} messages sent in [{from}, {until}) ms",
            exported.messages
        ),
    }
    Ok(())
}

/// Writes the export of `selection` to `sink` in `format`, flushed.
async fn write_export(
    shards: &Shards,
    selection: db_writer::export::Selection<'_>,
    format: Format,
    mut sink: Box<dyn std::io::Write + Send>,
) -> anyhow::Result<db_writer::export::Exported> {
    let exported = match format {
        Format::Jsonl => shards
            .export(selection, &mut |m| {
                let line = serde_json::to_string(&chat_proto::v1::ChatMessage::from(m))
                    .map_err(std::io::Error::other)?;
                writeln!(sink, "{line}")
            })
            .await
            .context("export")?,
        Format::Parquet => {
            let mut parquet =
                db_writer::export::ParquetSink::new(sink).context("starting the Parquet file")?;
            let exported = shards
                .export(selection, &mut |m| {
                    parquet.push(m).map_err(std::io::Error::other)
                })
                .await
                .context("export")?;
            sink = parquet.finish().context("finishing the Parquet file")?;
            exported
        }
    };
    sink.flush()?;
    Ok(exported)
}

/// Replaces `path` with `content` as one step: a temporary file beside it, synced, then renamed
/// over it (a crash leaves the old file or the new one, never a part).
fn write_atomically(path: &std::path::Path, content: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `db-writer replay`: the shards rebuilt from the `inbound` log, with a progress bar.
/// Migrates the shards when some lack a migration (new shards to replay into), which needs the
/// owner role; shards already migrated are only checked, so the writer role may replay into them.
async fn migrate_if_behind(shards: &Shards) -> anyhow::Result<()> {
    let behind = shards
        .missing_migrations()
        .await
        .context("reading the shards' schema")?;
    if behind.is_empty() {
        return Ok(());
    }
    shards.migrate().await.with_context(|| {
        format!(
            "migrating shards that lack migrations (shard: versions) {behind:?}: this needs the \
             owner role (db-writer migrate)"
        )
    })
}

async fn replay(config: &ShardConfig, args: ReplayArgs) -> anyhow::Result<()> {
    let ReplayArgs {
        from,
        brokers,
        topic_prefix,
        group,
        retention,
        quiet,
    } = args;
    let shards = Shards::connect(config)?;
    migrate_if_behind(&shards).await?;
    let topics = chat_common::topics::TopicNames::new(topic_prefix);
    let group =
        group.unwrap_or_else(|| format!("{}replay-{}", topics.prefix(), chat_common::now_ms()));
    let options = replay::ReplayOptions {
        topic: topics.inbound(),
        group: group.clone(),
        start: from,
        retention,
        max_batch: 1000,
    };
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} records ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // The security settings (`KAFKA_SECURITY_PROTOCOL`, `KAFKA_CA_FILE`, `KAFKA_SASL_*`) are the
    // services' own variables.
    let kafka = chat_common::kafka::KafkaConfig::new(brokers).with_env_opts()?;
    let summary = replay::replay(&shards, &kafka, &options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await
    .context("replay")?;
    bar.finish_and_clear();
    println!(
        "replayed {} into {} shards (group {group}): {} records read, {} messages ({} rows written, {} already present), {} acks, {} invalid records skipped, {} refused by the store, {} user index rows written",
        options.topic,
        shards.len(),
        summary.records_read,
        summary.messages,
        summary.rows_written,
        summary.rows_present,
        summary.acks,
        summary.invalid,
        summary.refused,
        summary.index_rows
    );
    Ok(())
}
