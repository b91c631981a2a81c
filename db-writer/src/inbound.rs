//! The `inbound` log as the shards see it: decoding records and applying them.
//!
//! Shared by the multiplexer (live, followed by routing) and `db-writer replay` (rebuilding or
//! resharding the stores from the log), so both interpret the log identically.

use std::collections::BTreeMap;

use chat_common::body::BodyError;
use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_proto::v1::{inbound_record, AckRecord, ChatMessage, InboundRecord, Receipt};
use prost::Message as _;

use crate::error::DbError;
use crate::failures::FailedMessage;
use crate::shards::Shards;
use crate::store::Retention;

/// One decoded `inbound` record.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    Message(ChatMessage),
    Ack(AckRecord),
}

/// Largest body a record may carry: its push (`OutboundRecord.deliver`) must stay within what a
/// producer sends (`message.max.bytes`, 1,000,000 by default), or it could never be routed and
/// would hold its partition. Far above any gateway's `MAX_BODY_BYTES` (4 KiB by default), which
/// must stay below it.
pub const MAX_BODY_BYTES: usize = 512 * 1024;

/// Why a record was refused (the caller sets it aside; a bad record never stops the log).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("record has no value")]
    Empty,
    #[error("value does not decode as chat.v1.InboundRecord")]
    Undecodable,
    #[error(
        "message has an invalid conversation, sender, recipient, client message id or message id"
    )]
    BadMessage,
    #[error("message body contains U+0000 (NUL), which the store cannot hold")]
    NulBody,
    #[error("message body is {size} bytes; at most {MAX_BODY_BYTES} can be delivered")]
    BodyTooLarge { size: usize },
    #[error("ack has an invalid user, peer or conversation")]
    BadAck,
}

impl InvalidRecord {
    /// The machine-readable reason of the dead letter (`chat.v1.DeadLetter.code`).
    pub fn code(&self) -> &'static str {
        match self {
            InvalidRecord::Empty => "empty",
            InvalidRecord::Undecodable => "undecodable",
            InvalidRecord::BadMessage => "bad_message",
            InvalidRecord::NulBody => "invalid_body",
            InvalidRecord::BodyTooLarge { .. } => "body_too_large",
            InvalidRecord::BadAck => "bad_ack",
        }
    }
}

/// A message's ids, validated: what a failure notice and a failure row are made of.
fn message_ids(m: &ChatMessage) -> Option<(ConversationKey, UserId, UserId, ClientMessageId)> {
    let (c, s, r) = (
        ConversationKey::parse(&m.conversation).ok()?,
        UserId::parse(&m.sender).ok()?,
        UserId::parse(&m.recipient).ok()?,
    );
    if ConversationKey::of(&s, &r).as_ref() != Some(&c) {
        return None;
    }
    let cid = ClientMessageId::parse(&m.client_message_id).ok()?;
    uuid::Uuid::parse_str(&m.message_id).ok()?;
    Some((c, s, r, cid))
}

/// The failure to remember and tell the sender about, for a message that will never be stored:
/// `None` when its ids are not valid (nobody to tell, or no conversation to file it under).
pub fn failed_message(
    m: &ChatMessage,
    code: &str,
    reason: &str,
    at_ms: i64,
) -> Option<FailedMessage> {
    let (conversation, sender, recipient, client_message_id) = message_ids(m)?;
    Some(FailedMessage {
        conversation,
        sender,
        recipient,
        client_message_id,
        message_id: m.message_id.clone(),
        code: code.to_owned(),
        reason: reason.to_owned(),
        failed_at_ms: at_ms,
    })
}

/// The message of a record value, if it decodes as one (valid or not).
pub fn message_of(payload: Option<&[u8]>) -> Option<ChatMessage> {
    match InboundRecord::decode(payload?).ok()?.kind? {
        inbound_record::Kind::Message(m) => Some(m),
        inbound_record::Kind::Ack(_) => None,
    }
}

/// Decodes and validates one record value.
pub fn decode(payload: Option<&[u8]>) -> Result<Inbound, InvalidRecord> {
    let payload = payload.ok_or(InvalidRecord::Empty)?;
    let record = InboundRecord::decode(payload).map_err(|_| InvalidRecord::Undecodable)?;
    match record.kind {
        Some(inbound_record::Kind::Message(m)) => {
            if message_ids(&m).is_none() {
                return Err(InvalidRecord::BadMessage);
            }
            // The body rule of the edge (chat_common::body), with the size any push can carry
            // rather than the gateway's configured limit. An empty body is stored as it is
            // (records of earlier gateways may hold one).
            match chat_common::body::check(&m.body, MAX_BODY_BYTES) {
                Err(BodyError::Nul { .. }) => Err(InvalidRecord::NulBody),
                Err(BodyError::TooLarge { size, .. }) => Err(InvalidRecord::BodyTooLarge { size }),
                Ok(()) | Err(BodyError::Empty) => Ok(Inbound::Message(m)),
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

    fn msg_with(conversation: &str, sender: &str, recipient: &str, body: &str) -> Vec<u8> {
        InboundRecord {
            kind: Some(inbound_record::Kind::Message(ChatMessage {
                message_id: "6c1f3a52-9d0e-4b7a-8e21-5f4c0b9d7a13".into(),
                client_message_id: "c1".into(),
                conversation: conversation.into(),
                sender: sender.into(),
                recipient: recipient.into(),
                body: body.into(),
                ..Default::default()
            })),
            gateway_id: "gw1".into(),
        }
        .encode_to_vec()
    }

    fn msg(conversation: &str, sender: &str, recipient: &str) -> Vec<u8> {
        msg_with(conversation, sender, recipient, "hi")
    }

    #[test]
    fn refuses_nul_bodies_and_invalid_ids_and_files_their_failure() {
        let nul = msg_with("alice:bob", "alice", "bob", "x\0y");
        let e = decode(Some(&nul)).expect_err("a NUL body is refused");
        assert_eq!(
            (e.clone(), e.code()),
            (InvalidRecord::NulBody, "invalid_body")
        );
        let m = message_of(Some(&nul)).expect("a message");
        let f = failed_message(&m, e.code(), &e.to_string(), 7).expect("valid ids");
        assert_eq!(
            (
                f.sender.as_str(),
                f.recipient.as_str(),
                f.client_message_id.as_str()
            ),
            ("alice", "bob", "c1")
        );
        assert_eq!(f.to_proto().peer, "bob");
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        let e = decode(Some(&msg_with("alice:bob", "alice", "bob", &big))).expect_err("too big");
        assert_eq!(e.code(), "body_too_large");
        let most = "x".repeat(MAX_BODY_BYTES);
        assert!(decode(Some(&msg_with("alice:bob", "alice", "bob", &most))).is_ok());
        // Other control characters are stored.
        assert!(decode(Some(&msg_with("alice:bob", "alice", "bob", "\u{1}\t"))).is_ok());
        let mut m = m;
        for bad in [
            |m: &mut ChatMessage| m.client_message_id = "c".repeat(100_000),
            |m: &mut ChatMessage| m.client_message_id = String::new(),
            |m: &mut ChatMessage| m.message_id = "not-a-uuid".into(),
        ] {
            m.body = "ok".into();
            bad(&mut m);
            let value = InboundRecord {
                kind: Some(inbound_record::Kind::Message(m.clone())),
                gateway_id: String::new(),
            }
            .encode_to_vec();
            assert_eq!(decode(Some(&value)), Err(InvalidRecord::BadMessage));
            assert!(failed_message(&m, "bad_message", "", 0).is_none());
        }
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
