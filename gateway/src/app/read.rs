//! Reads of the store: what a connection's sync sends, and pages of history. The store's rows
//! become the protocol's messages, receipts and failures here.

use std::collections::HashMap;

use chat_common::ids::{ConversationKey, UserId};
use chat_proto::v1::{ChatMessage, Receipt};

use super::App;
use crate::error::{HistoryError, SyncIncomplete};
use crate::sessions::SyncAnswer;

/// Most pending messages one sync sends; the client syncs again for the rest.
const SYNC_LIMIT: u32 = 10_000;
/// Most receipts, and most failures, one sync sends.
const SYNC_NOTICES_LIMIT: u32 = 1000;
/// How far back a sync looks for receipts and failures the sender may have missed.
const RECEIPT_LOOKBACK_MS: i64 = 30 * 24 * 3600 * 1000;
/// Messages in a page of history when the request does not say, and the most it may ask for.
const HISTORY_PAGE: u32 = 50;
const HISTORY_PAGE_MAX: u32 = 500;

/// Where a sync starts: the last seq the client has per conversation (absent: from the
/// beginning of what is pending), and the time after which it wants the receipts and failures of
/// its own messages.
#[derive(Debug, Default)]
pub(crate) struct SyncCursor {
    pub(crate) after: HashMap<ConversationKey, u64>,
    pub(crate) receipts_after_ms: i64,
}

/// A page of a conversation, oldest first.
#[derive(Debug)]
pub(crate) struct History {
    pub(crate) messages: Vec<ChatMessage>,
    /// Where the previous page ends; `None` at the beginning of the conversation.
    pub(crate) next_before: Option<u64>,
}

impl App {
    /// What `user` has pending after `cursor`, and the receipts and failures of their own
    /// messages since then (at most 30 days back). A query that fails leaves its part empty; when
    /// it is the pending messages, the answer says so (the client should sync again).
    pub(crate) async fn sync(&self, user: &UserId, cursor: &SyncCursor) -> SyncAnswer {
        let since = cursor
            .receipts_after_ms
            .max(chat_common::now_ms() - RECEIPT_LOOKBACK_MS);
        let receipts = match self
            .shards
            .receipts_since(user, since, SYNC_NOTICES_LIMIT)
            .await
        {
            Ok(r) => r.iter().map(Receipt::from).collect(),
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "receipt query failed");
                Vec::new()
            }
        };
        // The user's own messages that were accepted and then set aside (dead letters): a
        // client that was offline when the `failed` notice was pushed learns of them here.
        let failures = match self
            .shards
            .failures_since(user, since, SYNC_NOTICES_LIMIT)
            .await
        {
            Ok(f) => f.iter().map(db_writer::FailedMessage::to_proto).collect(),
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "failure query failed");
                Vec::new()
            }
        };
        let pending = self.shards.pending(user, &cursor.after, SYNC_LIMIT).await;
        let (messages, incomplete) = match pending {
            Ok(m) => (
                m.into_iter().map(ChatMessage::from).collect::<Vec<_>>(),
                None,
            ),
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "sync query failed");
                metrics::counter!("gateway_errors_total", "kind" => "sync").increment(1);
                (Vec::new(), Some(SyncIncomplete))
            }
        };
        metrics::counter!("gateway_synced_messages_total").increment(messages.len() as u64);
        SyncAnswer {
            incomplete,
            messages,
            receipts,
            failures,
        }
    }

    /// A page of `user`'s conversation with `peer`: up to `limit` messages (50 by default, at
    /// most 500) before seq `before` (from the newest without it).
    pub(crate) async fn history(
        &self,
        user: &UserId,
        peer: &UserId,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<History, HistoryError> {
        let conversation = ConversationKey::of(user, peer).ok_or(HistoryError::OwnConversation)?;
        let limit = limit.unwrap_or(HISTORY_PAGE).clamp(1, HISTORY_PAGE_MAX);
        let messages = self
            .shards
            .history(&conversation, before, limit)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "history query failed");
                HistoryError::Unavailable
            })?;
        let messages: Vec<ChatMessage> = messages.into_iter().map(ChatMessage::from).collect();
        let next_before = messages
            .first()
            .filter(|m| m.seq > 1 && messages.len() as u32 == limit)
            .map(|m| m.seq);
        Ok(History {
            messages,
            next_before,
        })
    }
}
