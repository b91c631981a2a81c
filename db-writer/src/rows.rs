//! The `messages` row as the store's statements read it, decoded into a domain [`Message`].
//!
//! A shard is an edge like any other: what comes back from it is validated once, here, so a
//! row that does not hold together is reported with its shard instead of travelling on.

use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_common::message::Message;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::DbError;

/// The columns every message read selects, in this order, from `messages m` (a macro, so that
/// statements can be `concat!`ed at compile time). Statements may select more after them (see
/// [`MessageRow::EXTRA`]).
macro_rules! message_columns {
    () => {
        "m.message_id, m.client_message_id, m.sender, m.recipient, m.body, m.sent_at_ms, m.seq, \
         m.conversation, m.sealed"
    };
}
pub(crate) use message_columns;

/// Positions of [`message_columns!`] in a row.
pub(crate) struct MessageRow;

impl MessageRow {
    pub(crate) const MESSAGE_ID: usize = 0;
    const CLIENT_MESSAGE_ID: usize = 1;
    const SENDER: usize = 2;
    const RECIPIENT: usize = 3;
    const BODY: usize = 4;
    pub(crate) const SENT_AT_MS: usize = 5;
    const SEQ: usize = 6;
    const CONVERSATION: usize = 7;
    const SEALED: usize = 8;
    /// The first column after the message's own.
    pub(crate) const EXTRA: usize = 9;

    /// The message of a row of `shard`. An erased body (NULL) comes back empty; a sealed one
    /// (delete-on-ack mode) comes back sealed, for a gateway to open.
    pub(crate) fn decode(row: &Row, shard: usize) -> Result<Message, DbError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| DbError::BadRow {
            shard,
            reason: format!("{what}: {e}"),
        };
        let body: Option<String> = row.get(Self::BODY);
        let seq: i64 = row.get(Self::SEQ);
        let sender = UserId::parse(row.get(Self::SENDER)).map_err(|e| bad("sender", &e))?;
        let recipient =
            UserId::parse(row.get(Self::RECIPIENT)).map_err(|e| bad("recipient", &e))?;
        let conversation = ConversationKey::parse(row.get(Self::CONVERSATION))
            .map_err(|e| bad("conversation", &e))?;
        let client_id = ClientMessageId::parse(row.get(Self::CLIENT_MESSAGE_ID))
            .map_err(|e| bad("client message id", &e))?;
        Ok(Message {
            id: row.get::<_, Uuid>(Self::MESSAGE_ID),
            client_id,
            conversation,
            sender,
            recipient,
            body: body.unwrap_or_default(),
            sealed: row.get(Self::SEALED),
            sent_at_ms: row.get(Self::SENT_AT_MS),
            seq: u64::try_from(seq).map_err(|e| bad("seq", &e))?,
        })
    }
}

/// A seq or limit as Postgres's `bigint` (values above `i64::MAX` saturate: no seq gets there).
pub(crate) fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
