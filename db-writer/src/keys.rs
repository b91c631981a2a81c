//! Body keys (delete-on-ack mode): one per message, kept in the conversation's shard. A gateway
//! takes each send's key from a pool the shard issued ahead ([`Shards::issue_sealing_keys`]: many
//! keys in one statement, each under a random id) and seals the body under it; the sealed body
//! carries the id (`chat_common::seal`). A gateway reads the key back by that id to open what it
//! pushes or a read returns. The ack statement and the expiry sweep delete it
//! ([`crate::acks`], [`crate::retention`]), and the store deletes the key of a copy it skips
//! ([`crate::messages`]): from then on no copy of the body opens. See docs/design.md,
//! "Crypto-shredding".
//!
//! Bodies sealed before keys were issued ahead (version 1 of the form, no id) have their keys in
//! `body_keys` under the message's send key; they are read there.

use std::collections::HashMap;

use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_common::seal::{BodyKey, BodyKeyId};

use crate::error::DbError;
use crate::shards::Shards;

/// Where a sealed body's key is: its message's send key, and the key's id when the body carries
/// one (version 2; without it, the key is held under the send key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    pub conversation: ConversationKey,
    pub sender: UserId,
    pub client_id: ClientMessageId,
    pub key_id: Option<BodyKeyId>,
}

/// The SQL expression of the key id a sealed body (the bytea column or expression given)
/// carries: its bytes 2 to 9 when it has version 2's form (`chat_common::seal`, whose length is
/// at least its 37 bytes of overhead), NULL otherwise (version 1, text, NULL).
macro_rules! sealed_key_id {
    ($sealed:literal) => {
        concat!(
            "(CASE WHEN substring(",
            $sealed,
            " for 1) = '\\x02'::bytea AND length(",
            $sealed,
            ") >= 37 THEN substring(",
            $sealed,
            " from 2 for 8) END)"
        )
    };
}
pub(crate) use sealed_key_id;

/// SQL: whether the key of the `messages` row aliased `m` still exists, in either table (for
/// checks of the whole store: the chaos suite's, the tests').
pub const MESSAGE_KEY_EXISTS: &str = concat!(
    "(EXISTS (SELECT 1 FROM sealing_keys k WHERE k.id = ",
    sealed_key_id!("m.sealed"),
    ") OR (",
    sealed_key_id!("m.sealed"),
    " IS NULL AND EXISTS (SELECT 1 FROM body_keys k WHERE k.conversation = m.conversation
                           AND k.sender = m.sender
                           AND k.client_message_id = m.client_message_id)))"
);

/// The oldest a key issued ahead may be when a gateway seals a send under it: older ones are
/// left unused (the expiry sweep destroys them).
pub const POOL_KEY_MAX_AGE_MS: i64 = 60_000;

/// How much older than the expiry's cutoff a key no message took must be before the sweep
/// destroys it: more than [`POOL_KEY_MAX_AGE_MS`], with room for the clocks of the gateway that
/// issued it and of the sweeper to differ.
pub const UNUSED_KEY_MARGIN_MS: i64 = 10 * 60_000;

/// Destroys the keys of copies the store skipped (see [`crate::messages`]).
pub(crate) const DESTROY: &str = "DELETE FROM sealing_keys WHERE id = ANY($1::bytea[])";

/// Issues keys ahead: ids and keys made here, inserted in one statement.
const ISSUE: &str = "INSERT INTO sealing_keys (id, key, created_at_ms)
     SELECT id, key, $3 FROM unnest($1::bytea[], $2::bytea[]) AS u(id, key)";

/// How many times an issue is made, each under new ids, while its ids meet others'
/// (`BodyKeyId::issued_at`: two issues in one millisecond can draw the same ids). Not `ON
/// CONFLICT DO NOTHING`: its speculative insertion logs one more WAL record for every key, to
/// spare a retry that almost never happens.
const ISSUE_ATTEMPTS: usize = 8;

/// The keys of these ids, where they still exist.
const FIND: &str = "SELECT id, key FROM sealing_keys WHERE id = ANY($1::bytea[])";

/// The keys of version 1 bodies, under their messages' send keys, where they still exist.
const FIND_BY_SEND_KEY: &str = "SELECT k.conversation, k.sender, k.client_message_id, k.key
     FROM unnest($1::text[], $2::text[], $3::text[]) AS i(conversation, sender, client_id)
     JOIN body_keys k ON k.conversation = i.conversation AND k.sender = i.sender
                     AND k.client_message_id = i.client_id";

impl Shards {
    /// Issues `n` new keys on `shard`, each under a new id ([`BodyKeyId::issued_at`]), for sends
    /// to come.
    pub async fn issue_sealing_keys(
        &self,
        shard: usize,
        n: usize,
        now_ms: i64,
    ) -> Result<Vec<(BodyKeyId, BodyKey)>, DbError> {
        let invariant = |e: chat_common::seal::SealError| DbError::Invariant {
            shard,
            reason: e.to_string(),
        };
        let client = self.client(shard).await?;
        let statement = client
            .prepare_cached(ISSUE)
            .await
            .map_err(DbError::pg(shard))?;
        // The keys are made once; an issue made again takes new ids only.
        let keys = (0..n)
            .map(|_| BodyKey::generate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(invariant)?;
        let key_bytes: Vec<&[u8]> = keys.iter().map(BodyKey::as_bytes).collect();
        let mut attempt = 1;
        loop {
            let ids = BodyKeyId::issued_at(now_ms, n).map_err(invariant)?;
            let id_bytes: Vec<&[u8]> = ids.iter().map(BodyKeyId::as_bytes).collect();
            match client
                .execute(&statement, &[&id_bytes, &key_bytes, &now_ms])
                .await
            {
                Ok(_) => return Ok(ids.into_iter().zip(keys).collect()),
                Err(e)
                    if attempt < ISSUE_ATTEMPTS
                        && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(DbError::pg(shard)(e)),
            }
        }
    }

    /// The body keys of `ids` that still exist (the others were destroyed by an ack, the
    /// expiry, or the store as a skipped copy's), read from each shard at once. A shard that
    /// does not answer costs only its own keys: it is listed in [`BodyKeys::failed`] and the
    /// others' keys come back.
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

    /// [`Shards::body_keys`] of one shard: by id, and by send key for version 1 bodies, at once.
    async fn body_keys_on(
        &self,
        shard: usize,
        ids: Vec<&KeyId>,
    ) -> Result<HashMap<KeyId, BodyKey>, DbError> {
        let client = self.client(shard).await?;
        let pg = DbError::pg(shard);
        let (by_id, by_send_key): (Vec<&KeyId>, Vec<&KeyId>) =
            ids.into_iter().partition(|id| id.key_id.is_some());
        let key_ids: Vec<&[u8]> = by_id
            .iter()
            .filter_map(|id| id.key_id.as_ref().map(BodyKeyId::as_bytes))
            .collect();
        let (mut conversations, mut senders, mut client_ids) = (vec![], vec![], vec![]);
        for id in &by_send_key {
            conversations.push(id.conversation.as_str());
            senders.push(id.sender.as_str());
            client_ids.push(id.client_id.as_str());
        }
        let find = async {
            if key_ids.is_empty() {
                return Ok(vec![]);
            }
            let statement = client.prepare_cached(FIND).await?;
            client.query(&statement, &[&key_ids]).await
        };
        let find_v1 = async {
            if conversations.is_empty() {
                return Ok(vec![]);
            }
            let statement = client.prepare_cached(FIND_BY_SEND_KEY).await?;
            client
                .query(&statement, &[&conversations, &senders, &client_ids])
                .await
        };
        let (rows, rows_v1) = futures_util::try_join!(find, find_v1).map_err(pg)?;
        let mut out = decode_keys_v1(&rows_v1, shard)?;
        let bad = |e: &dyn std::fmt::Display| DbError::BadRow {
            shard,
            reason: format!("sealing key: {e}"),
        };
        let mut by_key_id = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id = BodyKeyId::from_bytes(row.get(0)).map_err(|e| bad(&e))?;
            let key = BodyKey::from_bytes(row.get(1)).map_err(|e| bad(&e))?;
            by_key_id.insert(id, key);
        }
        for id in by_id {
            if let Some(key) = id.key_id.and_then(|k| by_key_id.get(&k)) {
                out.insert(id.clone(), key.clone());
            }
        }
        Ok(out)
    }
}

/// What [`Shards::body_keys`] found: the keys that exist on the shards that answered, and the
/// shards that did not.
#[derive(Debug, Default)]
pub struct BodyKeys {
    pub keys: HashMap<KeyId, BodyKey>,
    pub failed: Vec<(usize, DbError)>,
}

/// Rows of (conversation, sender, client message id, key) of `body_keys` (version 1 bodies).
fn decode_keys_v1(
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
                key_id: None,
            };
            let key = BodyKey::from_bytes(row.get(3)).map_err(|e| bad("key", &e))?;
            Ok((id, key))
        })
        .collect()
}
