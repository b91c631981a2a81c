//! Body keys (delete-on-ack mode): one per message, kept in the conversation's shard under the
//! message's send key (conversation, sender, client message id). A gateway issues the key before
//! the message enters `inbound` and seals the body under it (`chat_common::seal`); a gateway
//! reads it back to open what it pushes or a read returns. The ack statement and the expiry
//! sweep delete it ([`crate::acks`], [`crate::retention`]): from then on no copy of the body
//! opens. See docs/design.md, "Crypto-shredding".

use std::collections::HashMap;

use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_common::seal::BodyKey;

use crate::error::DbError;
use crate::shards::Shards;

/// A message's send key: what its body key is kept under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub conversation: ConversationKey,
    pub sender: UserId,
    pub client_id: ClientMessageId,
}

/// Issues a key per send, or hands back the one a send of the same key holds already (a
/// client's retry is sealed under its first key). `UPDATE` of a key to itself, so that
/// `RETURNING` gives a row either way, in one statement.
const ISSUE: &str = "INSERT INTO body_keys AS k (conversation, sender, client_message_id, key,
                                     created_at_ms)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bigint[])
     ON CONFLICT (conversation, sender, client_message_id) DO UPDATE SET key = k.key
     RETURNING k.conversation, k.sender, k.client_message_id, k.key";

/// The keys of messages, where they still exist.
const FIND: &str = "SELECT k.conversation, k.sender, k.client_message_id, k.key
     FROM unnest($1::text[], $2::text[], $3::text[]) AS i(conversation, sender, client_id)
     JOIN body_keys k ON k.conversation = i.conversation AND k.sender = i.sender
                     AND k.client_message_id = i.client_id";

impl Shards {
    /// The body key of each of `ids`, all of one shard (`shard`), made where missing: in the
    /// order of `ids`. Distinct ids expected (a repeated one is issued once and answered twice).
    pub async fn issue_body_keys(
        &self,
        shard: usize,
        ids: &[KeyId],
        now_ms: i64,
    ) -> Result<Vec<BodyKey>, DbError> {
        let client = self.client(shard).await?;
        let (mut conversations, mut senders, mut client_ids, mut keys, mut ats) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            conversations.push(id.conversation.as_str());
            senders.push(id.sender.as_str());
            client_ids.push(id.client_id.as_str());
            let key = BodyKey::generate().map_err(|e| DbError::Invariant {
                shard,
                reason: e.to_string(),
            })?;
            keys.push(key.as_bytes().to_vec());
            ats.push(now_ms);
        }
        let statement = client
            .prepare_cached(ISSUE)
            .await
            .map_err(DbError::pg(shard))?;
        let rows = client
            .query(
                &statement,
                &[&conversations, &senders, &client_ids, &keys, &ats],
            )
            .await
            .map_err(DbError::pg(shard))?;
        let found = decode_keys(&rows, shard)?;
        ids.iter()
            .map(|id| {
                found.get(id).cloned().ok_or_else(|| DbError::Invariant {
                    shard,
                    reason: "a body key was issued but not returned".into(),
                })
            })
            .collect()
    }

    /// The body keys of `ids` that still exist (the others were destroyed by an ack or the
    /// expiry), read from each shard at once. A shard that does not answer costs only its own
    /// keys: it is listed in [`BodyKeys::failed`] and the others' keys come back.
    pub async fn body_keys<'a>(&self, ids: impl IntoIterator<Item = &'a KeyId>) -> BodyKeys {
        let per_shard = self.group_by_shard(ids, |id| &id.conversation);
        let answers = futures_util::future::join_all(
            per_shard
                .into_iter()
                .map(|(shard, ids)| async move { (shard, self.body_keys_on(shard, ids).await) }),
        )
        .await;
        let mut found = BodyKeys::default();
        for (shard, answer) in answers {
            match answer {
                Ok(keys) => found.keys.extend(keys),
                Err(e) => found.failed.push((shard, e)),
            }
        }
        found
    }

    /// [`Shards::body_keys`] of one shard.
    async fn body_keys_on(
        &self,
        shard: usize,
        ids: Vec<&KeyId>,
    ) -> Result<HashMap<KeyId, BodyKey>, DbError> {
        let client = self.client(shard).await?;
        let (mut conversations, mut senders, mut client_ids) = (vec![], vec![], vec![]);
        for id in ids {
            conversations.push(id.conversation.as_str());
            senders.push(id.sender.as_str());
            client_ids.push(id.client_id.as_str());
        }
        let statement = client
            .prepare_cached(FIND)
            .await
            .map_err(DbError::pg(shard))?;
        let rows = client
            .query(&statement, &[&conversations, &senders, &client_ids])
            .await
            .map_err(DbError::pg(shard))?;
        decode_keys(&rows, shard)
    }
}

/// What [`Shards::body_keys`] found: the keys that exist on the shards that answered, and the
/// shards that did not.
#[derive(Debug, Default)]
pub struct BodyKeys {
    pub keys: HashMap<KeyId, BodyKey>,
    pub failed: Vec<(usize, DbError)>,
}

/// Rows of (conversation, sender, client message id, key).
fn decode_keys(
    rows: &[tokio_postgres::Row],
    shard: usize,
) -> Result<HashMap<KeyId, BodyKey>, DbError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| DbError::BadRow {
        shard,
        reason: format!("body key {what}: {e}"),
    };
    rows.iter()
        .map(|row| {
            let id = KeyId {
                conversation: ConversationKey::parse(row.get(0))
                    .map_err(|e| bad("conversation", &e))?,
                sender: UserId::parse(row.get(1)).map_err(|e| bad("sender", &e))?,
                client_id: ClientMessageId::parse(row.get(2))
                    .map_err(|e| bad("client message id", &e))?,
            };
            let key = BodyKey::from_bytes(row.get(3)).map_err(|e| bad("key", &e))?;
            Ok((id, key))
        })
        .collect()
}
