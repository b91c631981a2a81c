//! The pipeline's data past the edge: a message, an ack and a receipt, made of validated ids.
//!
//! Records and frames arrive as `chat.v1` protobuf values whose ids are free text. They are
//! decoded once, where they enter a process (a Kafka consumer, a store row, a client frame),
//! into these types; the store and the multiplexer take nothing else, so nothing past the edge
//! parses an id again. The conversions to and from the wire types live here, beside the types,
//! and are only called at those edges.

use chat_proto::v1::{AckRecord, ChatMessage};
use thiserror::Error;
use uuid::Uuid;

use crate::ids::{ClientMessageId, ConversationKey, IdError, UserId};

/// Why a wire value is not a valid message or ack.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum InvalidData {
    #[error("{field}: {source}")]
    Id {
        field: &'static str,
        source: IdError,
    },
    #[error("message id is not a UUID")]
    MessageId,
    #[error("the conversation is not the one of its two users")]
    Conversation,
}

fn id<T>(field: &'static str, parsed: Result<T, IdError>) -> Result<T, InvalidData> {
    parsed.map_err(|source| InvalidData::Id { field, source })
}

/// One message of a conversation. `conversation` is always the key of `sender` and `recipient`
/// (checked by every constructor that reads outside data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The server's id (`ids::message_id` of sender, recipient and client id).
    pub id: Uuid,
    /// The sender's own id for it: with the conversation and the sender, what makes a message
    /// the same message (retries, replays).
    pub client_id: ClientMessageId,
    pub conversation: ConversationKey,
    pub sender: UserId,
    pub recipient: UserId,
    /// The text; empty once erased (delete-on-ack) or expired, and empty while sealed.
    pub body: String,
    /// Delete-on-ack mode: the body sealed under the message's key ([`crate::seal`]), which only
    /// the gateways open; `body` is empty meanwhile.
    pub sealed: Option<Vec<u8>>,
    /// When the gateway accepted it, ms since the Unix epoch.
    pub sent_at_ms: i64,
    /// Its place in the conversation (1, 2, 3, ...); 0 until stored.
    pub seq: u64,
}

impl TryFrom<ChatMessage> for Message {
    type Error = InvalidData;

    fn try_from(m: ChatMessage) -> Result<Self, InvalidData> {
        let sender = id("sender", UserId::parse(&m.sender))?;
        let recipient = id("recipient", UserId::parse(&m.recipient))?;
        let conversation = id("conversation", ConversationKey::parse(&m.conversation))?;
        if ConversationKey::of(&sender, &recipient).as_ref() != Some(&conversation) {
            return Err(InvalidData::Conversation);
        }
        Ok(Self {
            id: Uuid::parse_str(&m.message_id).map_err(|_| InvalidData::MessageId)?,
            client_id: id(
                "client message id",
                ClientMessageId::parse(&m.client_message_id),
            )?,
            conversation,
            sender,
            recipient,
            body: m.body,
            sealed: (!m.sealed_body.is_empty()).then_some(m.sealed_body),
            sent_at_ms: m.sent_at_ms,
            seq: m.seq,
        })
    }
}

impl From<Message> for ChatMessage {
    /// Moves the message's text and ids into the wire value (no copy of the body).
    fn from(m: Message) -> Self {
        ChatMessage {
            message_id: m.id.to_string(),
            client_message_id: m.client_id.as_str().to_owned(),
            sender: m.sender.as_str().to_owned(),
            recipient: m.recipient.as_str().to_owned(),
            body: m.body,
            sent_at_ms: m.sent_at_ms,
            seq: m.seq,
            conversation: m.conversation.as_str().to_owned(),
            sealed_body: m.sealed.unwrap_or_default(),
        }
    }
}

impl From<&Message> for ChatMessage {
    fn from(m: &Message) -> Self {
        m.clone().into()
    }
}

/// `user` acknowledges every message `peer` sent them in `conversation` up to `up_to_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub user: UserId,
    /// The sender of the acknowledged messages: the other user of the conversation.
    pub peer: UserId,
    pub conversation: ConversationKey,
    pub up_to_seq: u64,
    pub acked_at_ms: i64,
}

impl TryFrom<AckRecord> for Ack {
    type Error = InvalidData;

    /// The peer is taken from the conversation, not from the record's own `peer` field.
    fn try_from(a: AckRecord) -> Result<Self, InvalidData> {
        let user = id("user", UserId::parse(&a.user))?;
        let conversation = id("conversation", ConversationKey::parse(&a.conversation))?;
        let peer = conversation
            .peer_of(&user)
            .ok_or(InvalidData::Conversation)?;
        Ok(Self {
            user,
            peer,
            conversation,
            up_to_seq: a.up_to_seq,
            acked_at_ms: a.acked_at_ms,
        })
    }
}

impl From<&Ack> for AckRecord {
    fn from(a: &Ack) -> Self {
        AckRecord {
            user: a.user.as_str().to_owned(),
            peer: a.peer.as_str().to_owned(),
            conversation: a.conversation.as_str().to_owned(),
            up_to_seq: a.up_to_seq,
            acked_at_ms: a.acked_at_ms,
        }
    }
}

/// What a sender learns of an ack: `peer` has every message of `conversation` up to
/// `up_to_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub conversation: ConversationKey,
    /// Who acknowledged (the recipient of the messages).
    pub peer: UserId,
    pub up_to_seq: u64,
    pub acked_at_ms: i64,
}

impl From<&Receipt> for chat_proto::v1::Receipt {
    fn from(r: &Receipt) -> Self {
        chat_proto::v1::Receipt {
            peer: r.peer.as_str().to_owned(),
            conversation: r.conversation.as_str().to_owned(),
            up_to_seq: r.up_to_seq,
            acked_at_ms: r.acked_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> ChatMessage {
        ChatMessage {
            message_id: "6c1f3a52-9d0e-4b7a-8e21-5f4c0b9d7a13".into(),
            client_message_id: "c1".into(),
            sender: "bob".into(),
            recipient: "alice".into(),
            body: "hi".into(),
            sent_at_ms: 7,
            seq: 3,
            conversation: "alice:bob".into(),
            sealed_body: Vec::new(),
        }
    }

    #[test]
    fn a_message_round_trips_and_refuses_what_does_not_hold_together() {
        let m = Message::try_from(wire()).expect("valid");
        assert_eq!(m.conversation.as_str(), "alice:bob");
        assert_eq!(ChatMessage::from(&m), wire());
        let refused = |f: fn(&mut ChatMessage)| {
            let mut w = wire();
            f(&mut w);
            Message::try_from(w).expect_err("refused")
        };
        assert_eq!(
            refused(|w| w.conversation = "alice:carol".into()),
            InvalidData::Conversation
        );
        assert_eq!(
            refused(|w| w.message_id = "m1".into()),
            InvalidData::MessageId
        );
        assert!(matches!(
            refused(|w| w.client_message_id = String::new()),
            InvalidData::Id {
                field: "client message id",
                ..
            }
        ));
        assert!(matches!(
            refused(|w| w.sender = "b ob".into()),
            InvalidData::Id {
                field: "sender",
                ..
            }
        ));
    }

    #[test]
    fn an_ack_takes_its_peer_from_the_conversation() {
        let record = AckRecord {
            user: "bob".into(),
            peer: "mallory".into(),
            conversation: "alice:bob".into(),
            up_to_seq: 4,
            acked_at_ms: 9,
        };
        let ack = Ack::try_from(record.clone()).expect("valid");
        assert_eq!(ack.peer.as_str(), "alice");
        assert_eq!(AckRecord::from(&ack).peer, "alice");
        let outsider = AckRecord {
            user: "carol".into(),
            ..record
        };
        assert_eq!(Ack::try_from(outsider), Err(InvalidData::Conversation));
    }
}
