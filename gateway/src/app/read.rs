//! Reads of the store: what a connection's sync sends, the conversation list, and pages of
//! history. The store's rows
//! become the protocol's messages, receipts and failures here.

use std::collections::HashMap;

use chat_common::ids::{ConversationKey, UserId};
use chat_proto::v1::{ChatMessage, Receipt};
use db_writer::{ConversationSummary, ListCursor};

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
/// Conversations in a page of the list when the request does not say, and the most it may ask
/// for.
const LIST_PAGE: u32 = 50;
const LIST_PAGE_MAX: u32 = 200;

/// Where a sync starts: the last seq the client has per conversation (absent: from the
/// beginning of what is pending), and the time after which it wants the receipts and failures of
/// its own messages.
#[derive(Debug, Default)]
pub(crate) struct SyncCursor {
    pub(crate) after: HashMap<ConversationKey, u64>,
    pub(crate) receipts_after_ms: i64,
}

/// A page of a user's conversations, newest activity first.
#[derive(Debug)]
pub(crate) struct ConversationPage {
    pub(crate) conversations: Vec<ConversationSummary>,
    /// Where the next page starts; `None` on the last page.
    pub(crate) next_before: Option<ListCursor>,
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
    /// messages since then (at most 30 days back). Waits for one of the gateway's sync slots
    /// first (`MAX_CONCURRENT_SYNCS`): a reconnect storm queues here instead of on the shards.
    /// When the store does not answer, the answer says so (the client should sync again): with
    /// the peers of the conversations left out when only some shards did not answer (the rest
    /// is sent), or as a failed sync when the user's index (their home shard) cannot be read.
    pub(crate) async fn sync(&self, user: &UserId, cursor: &SyncCursor) -> SyncAnswer {
        let waited = std::time::Instant::now();
        let _slot = self.sync_slots.acquire().await;
        metrics::histogram!("gateway_sync_wait_seconds").record(waited.elapsed());
        let since = cursor
            .receipts_after_ms
            .max(chat_common::now_ms() - RECEIPT_LOOKBACK_MS);
        let read = self
            .shards
            .sync_read(user, &cursor.after, since, SYNC_LIMIT, SYNC_NOTICES_LIMIT)
            .await;
        let answer = match read {
            Ok(mut read) => {
                metrics::histogram!("gateway_sync_shard_queries").record(read.shard_queries as f64);
                let mut messages: Vec<ChatMessage> =
                    read.messages.into_iter().map(ChatMessage::from).collect();
                // Delete-on-ack mode: a message acknowledged meanwhile has nothing left to
                // send; the conversations whose keys could not be read are left out, as if
                // their shard had not answered (the client syncs them again).
                let opened = self.open_bodies(&mut messages).await;
                let mut left_out = Vec::new();
                for &i in &opened.unavailable {
                    if let Ok(c) = ConversationKey::parse(&messages[i].conversation) {
                        if !read.unavailable.contains(&c) {
                            read.unavailable.push(c.clone());
                        }
                        left_out.push(c);
                    }
                }
                drop_positions(&mut messages, &opened.gone);
                messages.retain(|m| !left_out.iter().any(|c| c.as_str() == m.conversation));
                let incomplete = (!read.unavailable.is_empty()).then(|| {
                    tracing::warn!(user = %user, conversations = read.unavailable.len(), "sync left out conversations of a shard that does not answer");
                    metrics::counter!("gateway_errors_total", "kind" => "sync").increment(1);
                    SyncIncomplete::Partial {
                        peers: read
                            .unavailable
                            .iter()
                            .filter_map(|c| c.peer_of(user))
                            .map(|p| p.as_str().to_owned())
                            .collect(),
                        conversations: read
                            .unavailable
                            .iter()
                            .map(|c| c.as_str().to_owned())
                            .collect(),
                    }
                });
                SyncAnswer {
                    incomplete,
                    messages,
                    receipts: read.receipts.iter().map(Receipt::from).collect(),
                    failures: read
                        .failures
                        .iter()
                        .map(db_writer::FailedMessage::to_proto)
                        .collect(),
                }
            }
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "sync query failed");
                metrics::counter!("gateway_errors_total", "kind" => "sync").increment(1);
                let cause = match e.shard() {
                    Some(shard) if e.is_unavailable() => format!("shard {shard} is unavailable"),
                    _ => "the store did not answer".to_owned(),
                };
                SyncAnswer {
                    incomplete: Some(SyncIncomplete::Failed(cause)),
                    ..SyncAnswer::default()
                }
            }
        };
        metrics::counter!("gateway_synced_messages_total").increment(answer.messages.len() as u64);
        answer
    }

    /// A page of `user`'s conversations, newest activity first: up to `limit` (50 by default,
    /// at most 200) after `before`. Previews only in keep mode: in delete-on-ack mode the list
    /// shows no content. A conversation whose shard does not answer is listed from the index
    /// alone (marked so); the user's home shard down fails the page.
    pub(crate) async fn conversations(
        &self,
        user: &UserId,
        before: Option<&ListCursor>,
        limit: Option<u32>,
    ) -> Result<ConversationPage, HistoryError> {
        let limit = limit.unwrap_or(LIST_PAGE).clamp(1, LIST_PAGE_MAX);
        let previews = self.config.retention == db_writer::Retention::Keep;
        let conversations = self
            .shards
            .conversations(user, before, limit, previews)
            .await
            .map_err(|e| {
                tracing::warn!(user = %user, error = %e, "conversation list query failed");
                HistoryError::from_store(&e)
            })?;
        let next_before = conversations
            .last()
            .filter(|_| conversations.len() as u32 == limit)
            .map(|c| ListCursor {
                last_activity_ms: c.last_activity_ms,
                conversation: c.conversation.clone(),
            });
        Ok(ConversationPage {
            conversations,
            next_before,
        })
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
                tracing::warn!(conversation = %conversation, error = %e, "history query failed");
                HistoryError::from_store(&e)
            })?;
        let mut messages: Vec<ChatMessage> = messages.into_iter().map(ChatMessage::from).collect();
        // Delete-on-ack mode: a body whose key is gone shows as erased (empty), as an
        // acknowledged message does; a shard that did not give the keys fails the page.
        if !self.open_bodies(&mut messages).await.unavailable.is_empty() {
            return Err(HistoryError::ShardUnavailable {
                shard: self.shards.locator().shard_of(&conversation),
            });
        }
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

/// Removes the messages at `positions` (ascending).
fn drop_positions(messages: &mut Vec<ChatMessage>, positions: &[usize]) {
    if positions.is_empty() {
        return;
    }
    let mut i = 0;
    messages.retain(|_| {
        let keep = positions.binary_search(&i).is_err();
        i += 1;
        keep
    });
}
