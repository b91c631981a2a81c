//! Export: messages for data teams, shard by shard, each shard read in one snapshot.
//!
//! Two selections: the messages sent in a time range, or incrementally, the messages committed
//! since the previous export of an [`ExportCursor`]. The cursor is, per shard, the snapshot the
//! previous export read in: a message is taken by the first export whose snapshot sees its
//! inserting transaction committed, and by no later one, so successive exports hold every
//! message exactly once even while the multiplexer writes and its transactions commit out of
//! order (migration 7 and docs/design.md, "Incremental export").
//!
//! Two formats: JSON lines (the caller renders the `chat.v1.ChatMessage` JSON mapping) and
//! Parquet ([`ParquetSink`], schema [`PARQUET_SCHEMA`]), written with the `parquet` crate's
//! column writer.

use std::io::Write;
use std::sync::Arc;

use chat_common::message::Message;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DataType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::schema::parser::parse_message_type;
use thiserror::Error;
use tokio_postgres::IsolationLevel;

use crate::error::DbError;
use crate::rows::{message_columns, MessageRow};
use crate::shards::Shards;

/// Rows per fetch from a shard's portal (bounded memory).
const PAGE: i32 = 5000;

/// The snapshot an export reads in, the database it is of (to check a cursor against the shard
/// it is given to), and whether the shard records inserting transactions (migration 7). Run
/// first in the export's transaction, so it is that transaction's snapshot.
const SNAPSHOT: &str = "SELECT pg_current_snapshot()::text, current_database(),
        EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = 'messages'::regclass AND attname = 'insert_xid'
                  AND NOT attisdropped)";

/// A shard's messages sent in `[$1, $2)`, in send order (the `messages_sent_at` index).
const SENT_BETWEEN: &str = concat!(
    "SELECT ",
    message_columns!(),
    "
     FROM messages m
     WHERE m.sent_at_ms >= $1 AND m.sent_at_ms < $2
     ORDER BY m.sent_at_ms, m.message_id"
);

/// A shard's messages sent at or after `$1`, in send order: the first export of a cursor.
const SENT_SINCE: &str = concat!(
    "SELECT ",
    message_columns!(),
    "
     FROM messages m
     WHERE m.sent_at_ms >= $1
     ORDER BY m.sent_at_ms, m.message_id"
);

/// A shard's messages sent at or after `$1` whose inserting transaction the snapshot `$2` (the
/// previous export's) did not see committed, in send order. Those the export's own snapshot
/// sees are the ones it reads. Transactions below the old snapshot's xmin had all ended when it
/// was taken, so the range condition (which the BRIN index `messages_insert_xid` serves) loses
/// nothing; rows of before migration 7 (NULL) were visible to every snapshot.
const COMMITTED_SINCE: &str = concat!(
    "SELECT ",
    message_columns!(),
    "
     FROM messages m
     WHERE m.insert_xid >= pg_snapshot_xmin($2::text::pg_snapshot)::text::bigint
       AND NOT pg_visible_in_snapshot(m.insert_xid::text::xid8, $2::text::pg_snapshot)
       AND m.sent_at_ms >= $1
     ORDER BY m.sent_at_ms, m.message_id"
);

/// Why an export stopped.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("writing the export: {0}")]
    Write(#[source] std::io::Error),
    /// The cursor is unreadable, or belongs to another shard layout.
    #[error("export cursor: {0}")]
    Cursor(String),
}

/// Which messages an export takes.
#[derive(Clone, Copy, Debug)]
pub enum Selection<'a> {
    /// The messages sent in `[from_ms, until_ms)`.
    SentBetween { from_ms: i64, until_ms: i64 },
    /// The messages committed since `after` was taken (every message when `None`: the first
    /// export of a cursor), of those sent at or after `since_ms`.
    CommittedSince {
        after: Option<&'a ExportCursor>,
        since_ms: i64,
    },
}

/// Where an export stopped: per shard, in shard order, the snapshot it read in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportCursor {
    pub shards: Vec<ShardMark>,
}

/// One shard's part of an [`ExportCursor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMark {
    /// The shard's database name, checked when the cursor is used (a cursor of another layout
    /// would select by another server's transaction ids).
    pub database: String,
    /// Postgres's text form of the snapshot, `xmin:xmax:xip,...` (`pg_snapshot`).
    pub snapshot: String,
}

/// What an export did.
#[derive(Clone, Debug)]
pub struct Exported {
    /// Messages handed to the output.
    pub messages: u64,
    /// The cursor to resume from: the snapshots this export read in.
    pub cursor: ExportCursor,
}

/// Version of the cursor file's format.
const CURSOR_FORMAT: u64 = 1;

impl ExportCursor {
    /// The cursor file's content: JSON, with the shards in shard order.
    pub fn to_json(&self) -> String {
        let shards: Vec<serde_json::Value> = self
            .shards
            .iter()
            .map(|s| serde_json::json!({ "database": s.database, "snapshot": s.snapshot }))
            .collect();
        let doc = serde_json::json!({ "format": CURSOR_FORMAT, "shards": shards });
        format!("{doc:#}\n")
    }

    /// Reads a cursor file's content.
    pub fn from_json(text: &str) -> Result<Self, ExportError> {
        let bad = |why: &str| ExportError::Cursor(why.to_owned());
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ExportError::Cursor(e.to_string()))?;
        if doc["format"].as_u64() != Some(CURSOR_FORMAT) {
            return Err(bad("unknown format (expected \"format\": 1)"));
        }
        let shards = doc["shards"]
            .as_array()
            .ok_or_else(|| bad("no \"shards\" list"))?
            .iter()
            .map(|s| {
                let field = |name: &str| {
                    s[name]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(&format!("a shard without \"{name}\"")))
                };
                Ok(ShardMark {
                    database: field("database")?,
                    snapshot: field("snapshot")?,
                })
            })
            .collect::<Result<Vec<_>, ExportError>>()?;
        Ok(Self { shards })
    }
}

impl Shards {
    /// Every message of `selection`, shard by shard, each shard in send order and read in one
    /// repeatable-read snapshot, handed to `out` (bounded memory). Returns how many were
    /// exported and the cursor that resumes after them.
    pub async fn export(
        &self,
        selection: Selection<'_>,
        out: &mut (dyn FnMut(&Message) -> std::io::Result<()> + Send),
    ) -> Result<Exported, ExportError> {
        if let Selection::CommittedSince {
            after: Some(after), ..
        } = selection
        {
            if after.shards.len() != self.len() {
                return Err(ExportError::Cursor(format!(
                    "it is of {} shards, and {} are configured",
                    after.shards.len(),
                    self.len()
                )));
            }
        }
        let mut messages = 0;
        let mut marks = Vec::with_capacity(self.len());
        for shard in 0..self.len() {
            let pg = DbError::pg(shard);
            let mut client = self.client(shard).await?;
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let head = tx.query_one(SNAPSHOT, &[]).await.map_err(pg)?;
            let mark = ShardMark {
                snapshot: head.get(0),
                database: head.get(1),
            };
            if matches!(selection, Selection::CommittedSince { .. }) && !head.get::<_, bool>(2) {
                // A cursor taken before the migration would miss the rows stored between it
                // and the migration (they keep NULL, which every snapshot counts as seen).
                return Err(ExportError::Cursor(format!(
                    "shard {shard} ({}) does not record inserting transactions yet: run `db-writer migrate` (migration 7) first",
                    mark.database
                )));
            }
            let portal = match selection {
                Selection::SentBetween { from_ms, until_ms } => {
                    tx.bind(SENT_BETWEEN, &[&from_ms, &until_ms]).await
                }
                Selection::CommittedSince {
                    after: None,
                    since_ms,
                } => tx.bind(SENT_SINCE, &[&since_ms]).await,
                Selection::CommittedSince {
                    after: Some(after),
                    since_ms,
                } => {
                    let before = &after.shards[shard];
                    if before.database != mark.database {
                        return Err(ExportError::Cursor(format!(
                            "shard {shard} is database {:?}, and the cursor's is {:?}",
                            mark.database, before.database
                        )));
                    }
                    // A server's transaction ids only grow: ids below the cursor's mean another
                    // server (a shard restored or rebuilt elsewhere), whose rows the cursor
                    // would skip until its ids caught up.
                    match (snapshot_bound(&before.snapshot, 0), snapshot_bound(&mark.snapshot, 1)) {
                        (Some(old_xmin), Some(xmax)) if xmax >= old_xmin => {}
                        _ => {
                            return Err(ExportError::Cursor(format!(
                                "shard {shard}'s transaction ids ({}) are behind the cursor's ({}): the shard was restored or rebuilt on another server; start a new cursor",
                                mark.snapshot, before.snapshot
                            )))
                        }
                    }
                    tx.bind(COMMITTED_SINCE, &[&since_ms, &before.snapshot])
                        .await
                }
            }
            .map_err(pg)?;
            loop {
                let rows = tx.query_portal(&portal, PAGE).await.map_err(pg)?;
                for row in &rows {
                    out(&MessageRow::decode(row, shard)?).map_err(ExportError::Write)?;
                    messages += 1;
                }
                if rows.len() < PAGE as usize {
                    break;
                }
            }
            tx.commit().await.map_err(pg)?;
            marks.push(mark);
        }
        Ok(Exported {
            messages,
            cursor: ExportCursor { shards: marks },
        })
    }
}

/// Field `i` of a snapshot's text form `xmin:xmax:xip,...` (0: xmin, 1: xmax).
fn snapshot_bound(snapshot: &str, i: usize) -> Option<u64> {
    snapshot.split(':').nth(i)?.parse().ok()
}

/// The Parquet schema of an export, one row per message. Ids and text are UTF-8 strings (the
/// message id in its hyphenated form), `seq` and `sent_at_ms` (ms since the Unix epoch, the
/// gateway's clock when it accepted the message) are 64-bit integers. Nothing is nullable.
pub const PARQUET_SCHEMA: &str = "message chat_message {
    required binary conversation (STRING);
    required int64 seq;
    required binary message_id (STRING);
    required binary client_message_id (STRING);
    required binary sender (STRING);
    required binary recipient (STRING);
    required int64 sent_at_ms;
    required binary body (STRING);
}";

/// A row group is written when it holds this many messages...
const ROW_GROUP_ROWS: usize = 100_000;
/// ...or this many bytes of text, whichever comes first (bounds the memory an export holds).
const ROW_GROUP_BYTES: usize = 64 << 20;

/// Writes messages as a Parquet file of [`PARQUET_SCHEMA`]: buffered by column, a row group
/// at a time, snappy-compressed, with dictionary encoding where it pays (ids, users).
pub struct ParquetSink<W: Write + Send> {
    writer: SerializedFileWriter<W>,
    group: RowGroup,
}

/// The columns of the row group being filled, in schema order.
#[derive(Default)]
struct RowGroup {
    conversation: Vec<ByteArray>,
    seq: Vec<i64>,
    message_id: Vec<ByteArray>,
    client_message_id: Vec<ByteArray>,
    sender: Vec<ByteArray>,
    recipient: Vec<ByteArray>,
    sent_at_ms: Vec<i64>,
    body: Vec<ByteArray>,
    bytes: usize,
}

impl<W: Write + Send> ParquetSink<W> {
    /// Starts a file on `out` (the header goes out now; rows follow by row group).
    pub fn new(out: W) -> Result<Self, ParquetError> {
        let schema = Arc::new(parse_message_type(PARQUET_SCHEMA)?);
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("db-writer {}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            writer: SerializedFileWriter::new(out, schema, Arc::new(props))?,
            group: RowGroup::default(),
        })
    }

    /// Adds a message, writing a row group out when one is full.
    pub fn push(&mut self, m: &Message) -> Result<(), ParquetError> {
        let g = &mut self.group;
        let text = |s: &str| ByteArray::from(s.as_bytes());
        g.conversation.push(text(m.conversation.as_str()));
        g.seq.push(i64::try_from(m.seq).unwrap_or(i64::MAX));
        g.message_id.push(text(&m.id.to_string()));
        g.client_message_id.push(text(m.client_id.as_str()));
        g.sender.push(text(m.sender.as_str()));
        g.recipient.push(text(m.recipient.as_str()));
        g.sent_at_ms.push(m.sent_at_ms);
        g.body.push(text(&m.body));
        g.bytes += m.body.len() + m.conversation.as_str().len() + 128;
        if g.seq.len() >= ROW_GROUP_ROWS || g.bytes >= ROW_GROUP_BYTES {
            self.write_row_group()?;
        }
        Ok(())
    }

    /// Writes what is buffered and the footer; returns the output.
    pub fn finish(mut self) -> Result<W, ParquetError> {
        if !self.group.seq.is_empty() {
            self.write_row_group()?;
        }
        self.writer.into_inner()
    }

    fn write_row_group(&mut self) -> Result<(), ParquetError> {
        let g = std::mem::take(&mut self.group);
        let mut rg = self.writer.next_row_group()?;
        column::<ByteArrayType, W>(&mut rg, &g.conversation)?;
        column::<Int64Type, W>(&mut rg, &g.seq)?;
        column::<ByteArrayType, W>(&mut rg, &g.message_id)?;
        column::<ByteArrayType, W>(&mut rg, &g.client_message_id)?;
        column::<ByteArrayType, W>(&mut rg, &g.sender)?;
        column::<ByteArrayType, W>(&mut rg, &g.recipient)?;
        column::<Int64Type, W>(&mut rg, &g.sent_at_ms)?;
        column::<ByteArrayType, W>(&mut rg, &g.body)?;
        rg.close()?;
        Ok(())
    }
}

/// Writes the next column of a row group (every column is required: no levels).
fn column<T: DataType, W: Write + Send>(
    rg: &mut SerializedRowGroupWriter<'_, W>,
    values: &[T::T],
) -> Result<(), ParquetError> {
    let mut col = rg
        .next_column()?
        .ok_or_else(|| ParquetError::General("more columns written than the schema has".into()))?;
    col.typed::<T>().write_batch(values, None, None)?;
    col.close()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_what_it_wrote() {
        let c = ExportCursor {
            shards: vec![
                ShardMark {
                    database: "chat_0".into(),
                    snapshot: "100:104:101,103".into(),
                },
                ShardMark {
                    database: "chat_1".into(),
                    snapshot: "7:7:".into(),
                },
            ],
        };
        assert_eq!(ExportCursor::from_json(&c.to_json()).expect("reads"), c);
        assert!(ExportCursor::from_json("{\"format\": 2, \"shards\": []}").is_err());
        assert!(ExportCursor::from_json("{\"format\": 1, \"shards\": [{}]}").is_err());
        assert!(ExportCursor::from_json("not json").is_err());
    }

    #[test]
    fn snapshot_bounds_are_read_from_the_text_form() {
        assert_eq!(snapshot_bound("100:104:101,103", 0), Some(100));
        assert_eq!(snapshot_bound("100:104:101,103", 1), Some(104));
        assert_eq!(snapshot_bound("7:7:", 1), Some(7));
        assert_eq!(snapshot_bound("garbage", 1), None);
    }

    #[test]
    fn the_schema_parses_with_typed_columns() {
        let schema = parse_message_type(PARQUET_SCHEMA).expect("valid schema");
        let names: Vec<(&str, parquet::basic::Type)> = schema
            .get_fields()
            .iter()
            .map(|f| (f.name(), f.get_physical_type()))
            .collect();
        use parquet::basic::Type::{BYTE_ARRAY, INT64};
        assert_eq!(
            names,
            [
                ("conversation", BYTE_ARRAY),
                ("seq", INT64),
                ("message_id", BYTE_ARRAY),
                ("client_message_id", BYTE_ARRAY),
                ("sender", BYTE_ARRAY),
                ("recipient", BYTE_ARRAY),
                ("sent_at_ms", INT64),
                ("body", BYTE_ARRAY),
            ]
        );
    }
}
