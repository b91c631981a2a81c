//! The `inbound` log's edge: a record value decoded once into a domain [`Message`] or [`Ack`],
//! or refused with its reason.
//!
//! Shared by the multiplexer (live, followed by routing) and `db-writer replay` (rebuilding or
//! resharding the stores from the log), so both interpret the log identically.

use chat_common::body::BodyError;
use chat_common::message::{Ack, Message};
use chat_proto::v1::{inbound_record, ChatMessage, InboundRecord};
use prost::Message as _;

use crate::failures::FailedMessage;

/// One decoded `inbound` record.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    Message(Message),
    Ack(Ack),
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
    #[error(
        "message has a sealed body that is not one (wrong version or size, or a body beside it)"
    )]
    BadSealed,
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
            InvalidRecord::BadSealed => "invalid_sealed_body",
        }
    }
}

/// The failure to remember and tell the sender about, for a message whose record was refused
/// before the store (its body, say): `None` when its ids are not valid (nobody to tell, or no
/// conversation to file it under).
pub fn failed_message(
    m: &ChatMessage,
    code: &str,
    reason: &str,
    at_ms: i64,
) -> Option<FailedMessage> {
    let message = Message::try_from(ChatMessage {
        body: String::new(),
        ..m.clone()
    })
    .ok()?;
    Some(FailedMessage::of(&message, code, reason, at_ms))
}

/// The message of a record value, if it decodes as one (valid or not).
pub fn message_of(payload: Option<&[u8]>) -> Option<ChatMessage> {
    match InboundRecord::decode(payload?).ok()?.kind? {
        inbound_record::Kind::Message(m) => Some(m),
        inbound_record::Kind::Ack(_) => None,
    }
}

/// Decodes and validates one record value into the domain types the store takes.
pub fn decode(payload: Option<&[u8]>) -> Result<Inbound, InvalidRecord> {
    let payload = payload.ok_or(InvalidRecord::Empty)?;
    let record = InboundRecord::decode(payload).map_err(|_| InvalidRecord::Undecodable)?;
    match record.kind {
        Some(inbound_record::Kind::Message(m)) => {
            // The body rule of the edge (chat_common::body), with the size any push can carry
            // rather than the gateway's configured limit. An empty body is stored as it is
            // (records of earlier gateways may hold one).
            let body = chat_common::body::check(&m.body, MAX_BODY_BYTES);
            let sealed = (!m.sealed_body.is_empty()).then(|| {
                chat_common::seal::check_form(&m.sealed_body, MAX_BODY_BYTES).is_ok()
                    && m.body.is_empty()
            });
            let message = Message::try_from(m).map_err(|_| InvalidRecord::BadMessage)?;
            // A sealed body (delete-on-ack mode) is checked for its form only: nothing past the
            // gateway opens it.
            match sealed {
                Some(true) => return Ok(Inbound::Message(message)),
                Some(false) => return Err(InvalidRecord::BadSealed),
                None => {}
            }
            match body {
                Err(BodyError::Nul { .. }) => Err(InvalidRecord::NulBody),
                Err(BodyError::TooLarge { size, .. }) => Err(InvalidRecord::BodyTooLarge { size }),
                Ok(()) | Err(BodyError::Empty) => Ok(Inbound::Message(message)),
            }
        }
        Some(inbound_record::Kind::Ack(a)) => Ack::try_from(a)
            .map(Inbound::Ack)
            .map_err(|_| InvalidRecord::BadAck),
        None => Err(InvalidRecord::Undecodable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_proto::v1::AckRecord;

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
