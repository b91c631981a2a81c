//! Messages set aside for good (dead-lettered): remembered per shard so that their sender learns
//! it at the next sync, even if it was offline when the multiplexer set them aside.

use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_common::message::Message;
use chat_proto::v1::Failed;
use futures_util::future::try_join_all;

use crate::error::DbError;
use crate::shards::Shards;

/// One message that can never be stored, with validated ids only (nothing of its body), so that
/// writing it cannot fail for the reason the message failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedMessage {
    pub conversation: ConversationKey,
    pub sender: UserId,
    pub recipient: UserId,
    pub client_message_id: ClientMessageId,
    /// The id the sender's `Accepted` carried.
    pub message_id: uuid::Uuid,
    /// Machine-readable reason (the dead letter's code).
    pub code: String,
    /// Human-readable detail.
    pub reason: String,
    pub failed_at_ms: i64,
}

impl FailedMessage {
    /// The failure of `message`, which will never be stored: its ids, not its body.
    pub fn of(message: &Message, code: &str, reason: &str, failed_at_ms: i64) -> Self {
        Self {
            conversation: message.conversation.clone(),
            sender: message.sender.clone(),
            recipient: message.recipient.clone(),
            client_message_id: message.client_id.clone(),
            message_id: message.id,
            code: code.to_owned(),
            reason: reason.to_owned(),
            failed_at_ms,
        }
    }

    /// A row of `failed_messages` (columns as `FAILURES_SINCE` selects them).
    fn decode(row: &tokio_postgres::Row, shard: usize) -> Result<Self, DbError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| DbError::BadRow {
            shard,
            reason: format!("failed message {what}: {e}"),
        };
        Ok(Self {
            conversation: ConversationKey::parse(row.get(0))
                .map_err(|e| bad("conversation", &e))?,
            sender: UserId::parse(row.get(1)).map_err(|e| bad("sender", &e))?,
            recipient: UserId::parse(row.get(2)).map_err(|e| bad("recipient", &e))?,
            client_message_id: ClientMessageId::parse(row.get(3))
                .map_err(|e| bad("client message id", &e))?,
            message_id: uuid::Uuid::parse_str(row.get(4)).map_err(|e| bad("message id", &e))?,
            code: row.get(5),
            reason: row.get(6),
            failed_at_ms: row.get(7),
        })
    }

    /// What the sender is told.
    pub fn to_proto(&self) -> Failed {
        Failed {
            client_message_id: self.client_message_id.as_str().to_owned(),
            message_id: self.message_id.to_string(),
            peer: self.recipient.as_str().to_owned(),
            code: self.code.clone(),
            reason: self.reason.clone(),
            failed_at_ms: self.failed_at_ms,
        }
    }
}

/// Makes free text storable in a text column: U+0000 (which Postgres refuses) becomes U+FFFD.
/// Only for the store's own reasons, never for message bodies.
fn storable(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// A sender's failures after a time, newest first.
const FAILURES_SINCE: &str = "SELECT conversation, sender, recipient, client_message_id,
            message_id, code, reason, failed_at_ms
     FROM failed_messages
     WHERE sender = $1 AND failed_at_ms > $2
     ORDER BY failed_at_ms DESC
     LIMIT $3";

impl Shards {
    /// Remembers failed messages, each in the shard of its conversation. Idempotent: a failure
    /// already recorded (a replayed batch) is kept as it was.
    pub async fn record_failures(&self, failures: &[FailedMessage]) -> Result<(), DbError> {
        let per_shard = self.group_by_shard(failures, |f| &f.conversation);
        try_join_all(per_shard.into_iter().map(|(shard, rows)| async move {
            let client = self.client(shard).await?;
            let (mut conv, mut from, mut cid, mut id, mut to, mut code, mut reason, mut at) = (
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
                vec![],
            );
            for f in rows {
                conv.push(f.conversation.as_str());
                from.push(f.sender.as_str());
                cid.push(f.client_message_id.as_str());
                id.push(f.message_id.to_string());
                to.push(f.recipient.as_str());
                code.push(storable(&f.code));
                reason.push(storable(&f.reason));
                at.push(f.failed_at_ms);
            }
            client
                .execute(
                    "INSERT INTO failed_messages (conversation, sender, client_message_id,
                                                  message_id, recipient, code, reason, failed_at_ms)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                          $5::text[], $6::text[], $7::text[], $8::bigint[])
                     ON CONFLICT DO NOTHING",
                    &[&conv, &from, &cid, &id, &to, &code, &reason, &at],
                )
                .await
                .map_err(DbError::pg(shard))?;
            Ok::<_, DbError>(())
        }))
        .await?;
        Ok(())
    }

    /// The messages of `sender` set aside after `after_ms`, newest first, at most `limit` per
    /// shard. Reads every shard: a user's conversations are spread over all of them.
    pub async fn failures_since(
        &self,
        sender: &UserId,
        after_ms: i64,
        limit: u32,
    ) -> Result<Vec<FailedMessage>, DbError> {
        let limit = i64::from(limit);
        let mut all = self
            .on_every_shard(|shard, client| async move {
                let rows = client
                    .query(FAILURES_SINCE, &[&sender.as_str(), &after_ms, &limit])
                    .await
                    .map_err(DbError::pg(shard))?;
                rows.iter()
                    .map(|row| FailedMessage::decode(row, shard))
                    .collect()
            })
            .await?;
        all.sort_by_key(|f| std::cmp::Reverse(f.failed_at_ms));
        Ok(all)
    }
}

/// A sender's failures after a time in the conversations given ($4), newest first.
const FAILURES_IN: &str = "SELECT conversation, sender, recipient, client_message_id,
            message_id, code, reason, failed_at_ms
     FROM failed_messages
     WHERE sender = $1 AND failed_at_ms > $2 AND conversation = ANY($4::text[])
     ORDER BY failed_at_ms DESC
     LIMIT $3";

impl Shards {
    /// The messages of `sender` set aside after `after_ms` in `conversations` (those the user's
    /// index says hold a failure), newest first, at most `limit`: one query per shard among
    /// them.
    pub(crate) async fn failures_in(
        &self,
        sender: &UserId,
        conversations: Vec<ConversationKey>,
        after_ms: i64,
        limit: u32,
        queries: &crate::shards::QueryCount,
    ) -> Result<Vec<FailedMessage>, DbError> {
        let per_shard = self.group_by_shard(conversations, |c| c);
        let limit = i64::from(limit);
        let per_shard = try_join_all(per_shard.into_iter().map(|(shard, convs)| async move {
            let names: Vec<&str> = convs.iter().map(ConversationKey::as_str).collect();
            let client = self.client(shard).await?;
            queries.one();
            let statement = client
                .prepare_cached(FAILURES_IN)
                .await
                .map_err(DbError::pg(shard))?;
            let rows = client
                .query(&statement, &[&sender.as_str(), &after_ms, &limit, &names])
                .await
                .map_err(DbError::pg(shard))?;
            rows.iter()
                .map(|row| FailedMessage::decode(row, shard))
                .collect::<Result<Vec<_>, _>>()
        }))
        .await?;
        let mut all: Vec<FailedMessage> = per_shard.into_iter().flatten().collect();
        all.sort_by_key(|f| std::cmp::Reverse(f.failed_at_ms));
        all.truncate(limit as usize);
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_loses_only_nul() {
        assert_eq!(storable("a\0b ü"), "a\u{fffd}b ü");
    }
}
