//! Export: a time range of messages, shard by shard, page by page, for data teams.

use chat_common::message::Message;
use thiserror::Error;
use uuid::Uuid;

use crate::error::DbError;
use crate::rows::{message_columns, MessageRow};
use crate::shards::Shards;

/// Messages per page of the export query.
const PAGE: i64 = 5000;

/// One page of a shard's messages in `[cursor, until)`, in send order (keyset paging).
const PAGE_OF_MESSAGES: &str = concat!(
    "SELECT ",
    message_columns!(),
    "
     FROM messages m
     WHERE (m.sent_at_ms, m.message_id) > ($1, $2) AND m.sent_at_ms < $3
     ORDER BY m.sent_at_ms, m.message_id
     LIMIT $4"
);

/// Why an export stopped.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("writing the export: {0}")]
    Write(#[source] std::io::Error),
}

impl Shards {
    /// Every message sent in `[from_ms, until_ms)`, shard by shard, each shard in send order,
    /// handed to `out` page by page (bounded memory). Returns how many were exported.
    pub async fn export_range(
        &self,
        from_ms: i64,
        until_ms: i64,
        out: &mut (dyn FnMut(&Message) -> std::io::Result<()> + Send),
    ) -> Result<u64, ExportError> {
        let mut total = 0;
        for shard in 0..self.len() {
            let client = self.client(shard).await?;
            let mut cursor: (i64, Uuid) = (from_ms, Uuid::nil());
            loop {
                let rows = client
                    .query(PAGE_OF_MESSAGES, &[&cursor.0, &cursor.1, &until_ms, &PAGE])
                    .await
                    .map_err(DbError::pg(shard))?;
                for row in &rows {
                    out(&MessageRow::decode(row, shard)?).map_err(ExportError::Write)?;
                    total += 1;
                }
                match rows.last() {
                    Some(row) if rows.len() as i64 == PAGE => {
                        cursor = (
                            row.get(MessageRow::SENT_AT_MS),
                            row.get(MessageRow::MESSAGE_ID),
                        )
                    }
                    _ => break,
                }
            }
        }
        Ok(total)
    }
}
