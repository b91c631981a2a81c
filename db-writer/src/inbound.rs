//! The `inbound` log as the shards see it: decoding records and applying them.
//!
//! Shared by the multiplexer (live, followed by routing) and `db-writer replay` (rebuilding or
//! resharding the stores from the log), so both interpret the log identically.

use std::collections::BTreeMap;

use chat_common::ids::{ConversationKey, UserId};
use chat_proto::v1::{inbound_record, AckRecord, ChatMessage, InboundRecord, Receipt};
use prost::Message as _;

use crate::error::DbError;
use crate::shards::Shards;
use crate::store::Retention;

/// One decoded `inbound` record.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    Message(ChatMessage),
    Ack(AckRecord),
}

/// Why a record was skipped (counted by the caller; a bad record never stops the log).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("record has no value")]
    Empty,
    #[error("value does not decode as chat.v1.InboundRecord")]
    Undecodable,
    #[error("message has an invalid conversation, sender or recipient")]
    BadMessage,
    #[error("ack has an invalid user, peer or conversation")]
    BadAck,
}

/// Decodes and validates one record value.
pub fn decode(payload: Option<&[u8]>) -> Result<Inbound, InvalidRecord> {
    let payload = payload.ok_or(InvalidRecord::Empty)?;
    let record = InboundRecord::decode(payload).map_err(|_| InvalidRecord::Undecodable)?;
    match record.kind {
        Some(inbound_record::Kind::Message(m)) => {
            let ok = match (
                ConversationKey::parse(&m.conversation),
                UserId::parse(&m.sender),
                UserId::parse(&m.recipient),
            ) {
                (Ok(c), Ok(s), Ok(r)) => ConversationKey::of(&s, &r).as_ref() == Some(&c),
                _ => false,
            };
            if ok {
                Ok(Inbound::Message(m))
            } else {
                Err(InvalidRecord::BadMessage)
            }
        }
        Some(inbound_record::Kind::Ack(a)) => {
            let ok = match (
                UserId::parse(&a.user),
                ConversationKey::parse(&a.conversation),
            ) {
                (Ok(u), Ok(c)) => c.peer_of(&u).is_some(),
                _ => false,
            };
            if ok {
                Ok(Inbound::Ack(a))
            } else {
                Err(InvalidRecord::BadAck)
            }
        }
        None => Err(InvalidRecord::Undecodable),
    }
}

impl Shards {
    /// Applies a batch of (decoded, valid) acks: one statement per shard, after keeping only the
    /// highest seq per conversation and user. Returns a receipt for each sender whose messages
    /// were newly acked, addressed to that sender.
    pub async fn apply_acks(
        &self,
        acks: &[AckRecord],
        retention: Retention,
    ) -> Result<Vec<(String, Receipt)>, DbError> {
        // (conversation, user) -> (up_to_seq, acked_at_ms), the highest seq winning.
        let mut latest: BTreeMap<(String, String), (u64, i64)> = BTreeMap::new();
        for a in acks {
            let (Ok(user), Ok(conversation)) = (
                UserId::parse(&a.user),
                ConversationKey::parse(&a.conversation),
            ) else {
                continue;
            };
            if conversation.peer_of(&user).is_none() {
                continue;
            }
            let e = latest
                .entry((a.conversation.clone(), a.user.clone()))
                .or_insert((a.up_to_seq, a.acked_at_ms));
            if a.up_to_seq > e.0 {
                *e = (a.up_to_seq, a.acked_at_ms);
            }
        }
        let mut per_shard: BTreeMap<usize, Vec<(String, String, u64, i64)>> = BTreeMap::new();
        for ((conversation, user), (seq, at)) in &latest {
            let key = ConversationKey::parse(conversation).map_err(|e| DbError::BadRow {
                shard: usize::MAX,
                reason: e.to_string(),
            })?;
            per_shard
                .entry(self.locator().shard_of(&key))
                .or_default()
                .push((conversation.clone(), user.clone(), *seq, *at));
        }
        let results = futures_util::future::try_join_all(
            per_shard
                .iter()
                .map(|(shard, rows)| self.ack_on_shard(*shard, rows, retention)),
        )
        .await?;
        let mut receipts = Vec::new();
        for (conversation, user, up_to_seq) in results.into_iter().flatten() {
            let (Ok(u), Ok(c)) = (UserId::parse(&user), ConversationKey::parse(&conversation))
            else {
                continue;
            };
            let Some(peer) = c.peer_of(&u) else { continue };
            let acked_at_ms = latest
                .get(&(conversation.clone(), user.clone()))
                .map(|(_, at)| *at)
                .unwrap_or_default();
            receipts.push((
                peer.to_string(),
                Receipt {
                    peer: user,
                    conversation,
                    up_to_seq,
                    acked_at_ms,
                },
            ));
        }
        Ok(receipts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(conversation: &str, sender: &str, recipient: &str) -> Vec<u8> {
        InboundRecord {
            kind: Some(inbound_record::Kind::Message(ChatMessage {
                message_id: "m".into(),
                conversation: conversation.into(),
                sender: sender.into(),
                recipient: recipient.into(),
                ..Default::default()
            })),
            gateway_id: "gw1".into(),
        }
        .encode_to_vec()
    }

    #[test]
    fn decodes_valid_records_and_refuses_inconsistent_ones() {
        assert!(matches!(
            decode(Some(&msg("alice:bob", "alice", "bob"))),
            Ok(Inbound::Message(_))
        ));
        // Conversation that does not match the pair: never stored under the wrong key.
        assert_eq!(
            decode(Some(&msg("alice:carol", "alice", "bob"))),
            Err(InvalidRecord::BadMessage)
        );
        assert_eq!(
            decode(Some(&msg("alice:bob", "al ice", "bob"))),
            Err(InvalidRecord::BadMessage)
        );
        assert_eq!(decode(None), Err(InvalidRecord::Empty));
        assert_eq!(
            decode(Some(b"\xff\xff\xff\xff")),
            Err(InvalidRecord::Undecodable)
        );
        assert_eq!(decode(Some(b"")), Err(InvalidRecord::Undecodable));
        let ack = |user: &str, conv: &str| {
            InboundRecord {
                kind: Some(inbound_record::Kind::Ack(AckRecord {
                    user: user.into(),
                    conversation: conv.into(),
                    ..Default::default()
                })),
                gateway_id: String::new(),
            }
            .encode_to_vec()
        };
        assert!(matches!(
            decode(Some(&ack("bob", "alice:bob"))),
            Ok(Inbound::Ack(_))
        ));
        assert_eq!(
            decode(Some(&ack("carol", "alice:bob"))),
            Err(InvalidRecord::BadAck)
        );
    }
}
