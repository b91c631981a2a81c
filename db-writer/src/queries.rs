//! Reads for clients: a conversation's history, and what a user's sync delivers.

use std::collections::HashMap;

use chat_common::ids::{ConversationKey, UserId};
use chat_common::message::Message;

use crate::error::DbError;
use crate::rows::{bigint, message_columns, MessageRow};
use crate::shards::Shards;

/// A page of one conversation, newest first (reversed by the caller).
const HISTORY: &str = concat!(
    "SELECT ",
    message_columns!(),
    "
     FROM messages m WHERE m.conversation = $1 AND m.seq < $2
     ORDER BY m.seq DESC LIMIT $3"
);

/// What a user has not acknowledged, through the watermarks of the directions toward them
/// (`acks`, one row per conversation they received a message in), after what the client holds
/// ($2, $3). At most $4 per conversation and $4 in all.
const PENDING: &str = concat!(
    "SELECT ",
    message_columns!(),
    "
     FROM acks k
     LEFT JOIN unnest($2::text[], $3::bigint[]) AS h(conversation, seq)
            ON h.conversation = k.conversation
     CROSS JOIN LATERAL (
         SELECT * FROM messages m
         WHERE m.conversation = k.conversation AND m.recipient = k.recipient
           AND m.expired_at_ms IS NULL
           AND m.seq > greatest(k.up_to_seq, coalesce(h.seq, 0))
         ORDER BY m.seq
         LIMIT $4) m
     WHERE k.recipient = $1
     ORDER BY m.conversation, m.seq
     LIMIT $4"
);

impl Shards {
    /// A page of a conversation's history, oldest first: the `limit` messages before `before`
    /// (or the latest `limit` when `before` is `None`). Erased bodies come back empty.
    pub async fn history(
        &self,
        conversation: &ConversationKey,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>, DbError> {
        let shard = self.locator().shard_of(conversation);
        let client = self.client(shard).await?;
        let before = before.map(bigint).unwrap_or(i64::MAX);
        let statement = client
            .prepare_cached(HISTORY)
            .await
            .map_err(DbError::pg(shard))?;
        let rows = client
            .query(
                &statement,
                &[&conversation.as_str(), &before, &i64::from(limit)],
            )
            .await
            .map_err(DbError::pg(shard))?;
        let mut page = rows
            .iter()
            .map(|row| MessageRow::decode(row, shard))
            .collect::<Result<Vec<_>, _>>()?;
        page.reverse();
        Ok(page)
    }

    /// Every message to `user` not yet acknowledged, ordered by conversation then sequence,
    /// skipping what the client says it holds (`after[conversation]` = last seq held).
    /// Reads every shard: a user's conversations are spread over all of them.
    pub async fn pending(
        &self,
        user: &UserId,
        after: &HashMap<ConversationKey, u64>,
        limit: u32,
    ) -> Result<Vec<Message>, DbError> {
        let (conversations, seqs): (Vec<&str>, Vec<i64>) =
            after.iter().map(|(c, s)| (c.as_str(), bigint(*s))).unzip();
        let (conversations, seqs, limit) = (&conversations, &seqs, i64::from(limit));
        let mut all = self
            .on_every_shard(|shard, client| async move {
                let rows = client
                    .query(PENDING, &[&user.as_str(), conversations, seqs, &limit])
                    .await
                    .map_err(DbError::pg(shard))?;
                rows.iter()
                    .map(|row| MessageRow::decode(row, shard))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        all.sort_by(|a, b| (&a.conversation, a.seq).cmp(&(&b.conversation, b.seq)));
        Ok(all)
    }
}
