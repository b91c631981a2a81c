//! `db-writer export` as a data team uses it: Parquet read back by an independent reader
//! (pyarrow, in a venv that `db-writer/tests/parquet/run.sh` creates under `.local/`), the
//! incremental cursor across runs while transactions commit out of order, a data stream free of
//! logs at `RUST_LOG=debug`, and the shard locator reimplemented in Python from docs/data.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use chat_common::ids::{ConversationKey, UserId};
use chat_common::message::Message;
use chat_e2e::{new_message, run_binary, TestEnv};
use db_writer::{Locator, ShardConfig, Shards};
use serde_json::Value;

/// Runs one of the Python checks in `db-writer/tests/parquet` (installing pyarrow on first
/// use); returns its stdout as JSON.
async fn python(script: &str, args: &[&str]) -> anyhow::Result<Value> {
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("../db-writer/tests/parquet/run.sh");
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(runner)
            .arg(script)
            .args(args)
            .output(),
    )
    .await
    .context("the Python check (or installing pyarrow) took over 10 minutes")??;
    anyhow::ensure!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("the Python check's output is JSON")
}

/// A message as pyarrow reads it back, in the export's column names.
fn as_row(m: &Message) -> Value {
    serde_json::json!({
        "conversation": m.conversation.as_str(),
        "seq": m.seq,
        "message_id": m.id.to_string(),
        "client_message_id": m.client_id.as_str(),
        "sender": m.sender.as_str(),
        "recipient": m.recipient.as_str(),
        "sent_at_ms": m.sent_at_ms,
        "body": m.body,
    })
}

/// Rows sorted by message id, to compare sets of rows.
fn by_id(rows: impl IntoIterator<Item = Value>) -> BTreeMap<String, Value> {
    rows.into_iter()
        .map(|r| (r["message_id"].as_str().unwrap_or_default().to_owned(), r))
        .collect()
}

struct Export {
    shards_env: Vec<(&'static str, String)>,
    cursor: PathBuf,
    dir: PathBuf,
    runs: usize,
}

impl Export {
    /// One incremental Parquet export; returns what pyarrow reads in the file.
    async fn next(&mut self) -> anyhow::Result<Value> {
        self.runs += 1;
        let file = self.dir.join(format!("run{}.parquet", self.runs));
        let (code, stdout, err) = run_binary(
            "db-writer",
            &[
                "export",
                "--format",
                "parquet",
                "--cursor",
                &self.cursor.to_string_lossy(),
                "--out",
                &file.to_string_lossy(),
            ],
            &self.shards_env,
        )
        .await?;
        assert_eq!(code, 0, "{err}");
        assert!(stdout.is_empty(), "with --out nothing goes to stdout");
        python("read_export.py", &[&file.to_string_lossy()]).await
    }
}

fn rows(read: &Value) -> Vec<Value> {
    read["rows"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_export_is_typed_and_the_cursor_takes_each_message_once() -> anyhow::Result<()> {
    let mut env = TestEnv::new(2, &[]).await?;
    let shards = Shards::connect(&ShardConfig::from_list(&env.shard_dsns.join(","), 2)?)?;
    let dir = std::env::temp_dir().join(format!("{}export", env.topics.prefix()));
    std::fs::create_dir_all(&dir)?;
    let mut export = Export {
        shards_env: vec![("SHARD_DSNS", env.shard_dsns.join(","))],
        cursor: dir.join("cursor.json"),
        dir: dir.clone(),
        runs: 0,
    };

    // Five messages in three conversations, stored through the store's write path.
    let t0 = 1_764_000_000_000i64;
    let first: Vec<Message> = shards
        .store_batch(&[
            new_message("alice", "bob", "hello bob", t0)?,
            new_message("bob", "alice", "hi alice", t0 + 1)?,
            new_message("alice", "carol", "ça va? 🙂", t0 + 2)?,
            new_message("dave", "erin", "one", t0 + 3)?,
            new_message("dave", "erin", "two", t0 + 4)?,
        ])
        .await?
        .into_iter()
        .map(|s| s.message)
        .collect();
    let placed: std::collections::HashSet<usize> = first
        .iter()
        .map(|m| shards.locator().shard_of(&m.conversation))
        .collect();
    assert_eq!(placed.len(), 2, "the messages are on both shards");

    let read = export.next().await?;
    println!("pyarrow's view of the first export:\n{}", read["printed"]);
    let schema: Vec<(String, String, bool)> = serde_json::from_value(read["schema"].clone())?;
    let want = [
        ("conversation", "string"),
        ("seq", "int64"),
        ("message_id", "string"),
        ("client_message_id", "string"),
        ("sender", "string"),
        ("recipient", "string"),
        ("sent_at_ms", "int64"),
        ("body", "string"),
    ];
    assert_eq!(
        schema,
        want.iter()
            .map(|(n, t)| (n.to_string(), t.to_string(), false))
            .collect::<Vec<_>>()
    );
    assert_eq!(read["num_rows"], 5);
    assert_eq!(by_id(rows(&read)), by_id(first.iter().map(as_row)));
    assert_eq!(
        rows(&read)
            .iter()
            .filter(|r| r["conversation"] == "dave:erin")
            .map(|r| r["seq"].as_i64())
            .collect::<Vec<_>>(),
        [Some(1), Some(2)],
        "seq is an integer"
    );

    // Nothing new: an empty file with the same schema.
    let read = export.next().await?;
    assert_eq!(read["num_rows"], 0);
    assert_eq!(read["schema"].as_array().map(Vec::len), Some(8));

    // A transaction that started first and commits last: a high-water mark over ids or times
    // would skip it for good. Held open on the shard of its conversation, as a slow
    // multiplexer batch would be.
    let late = new_message("frank", "grace", "committed late", t0 + 5)?;
    let late_shard = shards.locator().shard_of(&late.conversation);
    let slow = env.shard(late_shard).await?;
    slow.batch_execute("BEGIN").await?;
    slow.execute(
        "INSERT INTO messages (conversation, seq, message_id, client_message_id, sender,
                               recipient, body, sent_at_ms)
         VALUES ($1, 1, $2, $3, $4, $5, $6, $7)",
        &[
            &late.conversation.as_str(),
            &late.id,
            &late.client_id.as_str(),
            &late.sender.as_str(),
            &late.recipient.as_str(),
            &late.body,
            &late.sent_at_ms,
        ],
    )
    .await?;

    // More writes, committed while it is open, on both shards and in a known conversation.
    let second: Vec<Message> = shards
        .store_batch(&[
            new_message("alice", "bob", "again", t0 + 6)?,
            new_message("carol", "alice", "back", t0 + 7)?,
            new_message("dave", "erin", "three", t0 + 8)?,
        ])
        .await?
        .into_iter()
        .map(|s| s.message)
        .collect();
    let read = export.next().await?;
    assert_eq!(read["num_rows"], 3);
    assert_eq!(by_id(rows(&read)), by_id(second.iter().map(as_row)));
    assert!(rows(&read)
        .iter()
        .any(|r| r["conversation"] == "dave:erin" && r["seq"] == 3));

    // The late transaction commits: the next export has it, and only it.
    slow.batch_execute("COMMIT").await?;
    let mut late_stored = late.clone();
    late_stored.seq = 1;
    let read = export.next().await?;
    assert_eq!(rows(&read), vec![as_row(&late_stored)]);

    // Together, the runs hold every stored message exactly once.
    let stored = env.message_count().await?;
    assert_eq!(stored, 5 + 3 + 1);

    // A cursor of another layout is refused, and left as it was.
    let before = std::fs::read_to_string(&export.cursor)?;
    let (code, _, err) = run_binary(
        "db-writer",
        &[
            "export",
            "--format",
            "parquet",
            "--cursor",
            &export.cursor.to_string_lossy(),
            "--out",
            &dir.join("refused.parquet").to_string_lossy(),
        ],
        &[("SHARD_DSNS", env.shard_dsns[0].clone())],
    )
    .await?;
    assert_ne!(code, 0);
    assert!(err.contains("cursor"), "{err}");
    assert_eq!(std::fs::read_to_string(&export.cursor)?, before);
    assert!(
        !dir.join("refused.parquet").exists(),
        "a failed export leaves no output behind"
    );

    // A cursor ahead of the shard's transaction ids (a shard restored on another server) is
    // refused rather than followed: it would skip the shard's new rows.
    let ahead = dir.join("ahead.json");
    let mut doc: Value = serde_json::from_str(&before)?;
    doc["shards"][late_shard]["snapshot"] = "900000000000:900000000000:".into();
    std::fs::write(&ahead, doc.to_string())?;
    let (code, _, err) = run_binary(
        "db-writer",
        &["export", "--cursor", &ahead.to_string_lossy()],
        &export.shards_env,
    )
    .await?;
    assert_ne!(code, 0);
    assert!(err.contains("start a new cursor"), "{err}");

    // --until would leave messages behind for good, so it does not go with --cursor.
    let (code, _, err) = run_binary(
        "db-writer",
        &[
            "export",
            "--cursor",
            &export.cursor.to_string_lossy(),
            "--until",
            "ms:1",
        ],
        &export.shards_env,
    )
    .await?;
    assert_ne!(code, 0);
    assert!(err.contains("--until"), "{err}");

    // A shard without migration 7 cannot start a cursor: rows stored between that first export
    // and the migration would be missed.
    let old = env.empty_databases(1).await?;
    Shards::connect(&ShardConfig::from_list(&old[0], 1)?)?
        .migrate_to(6)
        .await?;
    let fresh = dir.join("fresh-cursor.json");
    let (code, _, err) = run_binary(
        "db-writer",
        &["export", "--cursor", &fresh.to_string_lossy()],
        &[("SHARD_DSNS", old[0].clone())],
    )
    .await?;
    assert_ne!(code, 0);
    assert!(err.contains("db-writer migrate"), "{err}");
    assert!(!fresh.exists());

    std::fs::remove_dir_all(&dir)?;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_debug_log_level_stdout_carries_only_the_data() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &[]).await?;
    let shards = Shards::connect(&ShardConfig::from_list(&env.shard_dsns.join(","), 2)?)?;
    shards
        .store_batch(&[
            new_message("alice", "bob", "one", 1_000)?,
            new_message("bob", "carol", "two", 2_000)?,
            new_message("carol", "dave", "three", 3_000)?,
        ])
        .await?;
    let debug = [
        ("SHARD_DSNS", env.shard_dsns.join(",")),
        ("RUST_LOG", "debug".to_owned()),
    ];

    // JSON lines: every stdout line is a message; the logs went to stderr.
    let (code, stdout, err) =
        run_binary("db-writer", &["export", "--since", "ms:0"], &debug).await?;
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8(stdout)?;
    let lines: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("a stdout line is not JSON:\n{text}"))?;
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines.iter().all(|l| l["messageId"].is_string()), "{text}");
    assert!(
        err.contains("DEBUG"),
        "debug logs are written, to stderr: {err}"
    );

    // Parquet on stdout: the bytes are exactly a Parquet file that pyarrow reads.
    let (code, stdout, err) = run_binary(
        "db-writer",
        &["export", "--since", "ms:0", "--format", "parquet"],
        &debug,
    )
    .await?;
    assert_eq!(code, 0, "{err}");
    assert!(stdout.starts_with(b"PAR1") && stdout.ends_with(b"PAR1"));
    let file = std::env::temp_dir().join(format!("{}stdout.parquet", env.topics.prefix()));
    std::fs::write(&file, &stdout)?;
    let read = python("read_export.py", &[&file.to_string_lossy()]).await?;
    std::fs::remove_file(&file)?;
    assert_eq!(read["num_rows"], 3);
    let mut bodies: Vec<String> = rows(&read)
        .iter()
        .filter_map(|r| r["body"].as_str().map(str::to_owned))
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["one", "three", "two"]);

    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_locator_reimplemented_from_the_docs_agrees() -> anyhow::Result<()> {
    // Keys of every length class the hash treats apart (below, at and above 8-byte blocks),
    // conversation keys and user ids alike.
    let mut keys: Vec<String> = vec!["alice:bob".into(), "a:b".into(), "u1".into()];
    for i in 0..150 {
        let a = format!("u{}", "x".repeat(i % 40));
        let b = format!("peer.{i}-{}", "y".repeat(i % 17));
        keys.push(
            ConversationKey::of(&UserId::parse(&a)?, &UserId::parse(&b)?)
                .context("distinct")?
                .as_str()
                .to_owned(),
        );
        keys.push(b);
    }
    keys.push("z".repeat(64));
    for shards in [1u32, 2, 3, 4, 6, 12, 1000, 10_000_000] {
        let mut args = vec![shards.to_string()];
        args.extend(keys.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let python = python("locator.py", &args).await?;
        let locator = Locator::new(shards);
        for key in &keys {
            let rust = match ConversationKey::parse(key) {
                Ok(k) => locator.shard_of(&k),
                Err(_) => locator.home_of(&UserId::parse(key)?),
            };
            assert_eq!(
                python[key].as_u64(),
                Some(rust as u64),
                "{key} over {shards} shards"
            );
        }
    }
    Ok(())
}
