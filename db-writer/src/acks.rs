//! Acks and receipts: a watermark per direction of a conversation.
//!
//! An ack moves the watermark of its direction (never past the conversation's last seq, never
//! back); in delete-on-ack mode the same statement destroys the keys of the bodies it passed. Each watermark
//! that moved becomes a receipt for the sender of the acknowledged messages, and the sender's
//! next sync reads the receipts it may have missed ([`Shards::receipts_since`]).

use std::collections::{BTreeMap, HashMap};

use chat_common::ids::{ConversationKey, UserId};
use chat_common::message::{Ack, Receipt};
use futures_util::future::try_join_all;

use crate::error::DbError;
use crate::keys::sealed_key_id;
use crate::retention::Retention;
use crate::rows::bigint;
use crate::shards::Shards;

/// The ack statement of both modes, up to `moved` (the watermarks moved, never past the
/// conversation's last seq and never back). `a` holds each ack with its direction's row as it
/// was before the statement (every part of a statement reads one snapshot): `before`,
/// `before_at` and `sender`, NULL when no message was ever sent that way. Each lookup is a
/// subquery, so that it stays an index probe per ack: joined, the planner hashes the whole
/// conversations table instead.
macro_rules! ack_moved {
    () => {
        "WITH a AS (
             SELECT u.conversation, u.recipient, u.acked_at,
                    least(u.up_to, (SELECT c.last_seq FROM conversations c
                                    WHERE c.conversation = u.conversation)) AS up_to,
                    k.up_to_seq AS before, k.acked_at_ms AS before_at, k.sender
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                 AS u(conversation, recipient, up_to, acked_at)
             LEFT JOIN LATERAL (
                 SELECT k.up_to_seq, k.acked_at_ms, k.sender FROM acks k
                 WHERE k.conversation = u.conversation AND k.recipient = u.recipient) k ON true),
         moved AS (
             UPDATE acks k SET up_to_seq = a.up_to, acked_at_ms = a.acked_at
             FROM a
             WHERE k.conversation = a.conversation AND k.recipient = a.recipient
               AND k.up_to_seq < a.up_to
             RETURNING k.conversation, k.recipient, k.up_to_seq, k.acked_at_ms)"
    };
}

/// What both statements return: every acked direction's watermark after the statement (columns
/// as [`Watermark`] reads them), and whether this statement moved it.
macro_rules! ack_result {
    () => {
        "
         SELECT a.conversation, a.recipient, a.sender,
                coalesce(moved.up_to_seq, a.before), coalesce(moved.acked_at_ms, a.before_at),
                moved.conversation IS NOT NULL
         FROM a LEFT JOIN moved
           ON moved.conversation = a.conversation AND moved.recipient = a.recipient
         WHERE a.sender IS NOT NULL"
    };
}

/// The ack statement of keep mode.
const ACK_KEEP: &str = concat!(ack_moved!(), ack_result!());

/// The ack statement of delete-on-ack mode: the keys of the messages the watermark passed
/// (above `before`) are destroyed in the same statement (`crate::keys`: by the id each sealed
/// body carries, or under the send key for a body sealed before keys were issued ahead, which
/// has none), which leaves every copy
/// of their bodies unreadable at once: the sealed bytes in the row, and every record in Kafka.
/// Sealed rows are not rewritten: a row without its key holds nothing a reader can open, and
/// rewriting it (a new row version, four index entries, and later its vacuum) cost more than
/// the whole ack of keep mode. The metadata window deletes the row later
/// ([`Shards::purge_erased`]). A row that holds its body as text (a record from an older gateway,
/// or from `loadgen raw`) is erased here and marked (`expired_at_ms`, the ack's time).
const ACK_ERASE: &str = concat!(
    ack_moved!(),
    ",
     passed AS (
         SELECT m.conversation, m.seq, m.sender, m.client_message_id,
                m.body IS NOT NULL AS plain, a.acked_at, ",
    sealed_key_id!("m.sealed"),
    " AS key_id
         FROM moved
         JOIN a ON a.conversation = moved.conversation AND a.recipient = moved.recipient
         JOIN messages m ON m.conversation = moved.conversation
                        AND m.recipient = moved.recipient
                        AND m.seq > a.before AND m.seq <= moved.up_to_seq
                        AND m.expired_at_ms IS NULL),
     shredded AS (
         DELETE FROM sealing_keys k USING passed p WHERE k.id = p.key_id),
     shredded_v1 AS (
         DELETE FROM body_keys k USING passed p
         WHERE p.key_id IS NULL
           AND k.conversation = p.conversation AND k.sender = p.sender
           AND k.client_message_id = p.client_message_id),
     erased AS (
         UPDATE messages m SET body = NULL, sealed = NULL, expired_at_ms = p.acked_at
         FROM passed p
         WHERE p.plain AND m.conversation = p.conversation AND m.seq = p.seq)",
    ack_result!()
);

/// A direction's ack watermark after a batch of acks: `reader` has acknowledged every message
/// `writer` sent them in `conversation` up to `up_to_seq`. Returned for every ack whose
/// direction exists, moved or not, so that a replayed ack still reaches the user index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watermark {
    pub conversation: ConversationKey,
    pub reader: UserId,
    pub writer: UserId,
    pub up_to_seq: u64,
    /// When it last moved; `None` while nothing was acknowledged.
    pub acked_at_ms: Option<i64>,
}

/// What a batch of acks did: the receipts to send (watermarks that moved), and every acked
/// direction's watermark (for the user index).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acked {
    pub receipts: Vec<ReceiptFor>,
    pub watermarks: Vec<Watermark>,
}

/// A receipt, and the sender it is for (whose messages were acknowledged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptFor {
    pub sender: UserId,
    pub receipt: Receipt,
}

impl Shards {
    /// Applies a batch of acks: one statement per shard, after keeping only the highest seq per
    /// conversation and user. Returns a receipt for each sender whose messages were newly acked,
    /// and every acked direction's watermark.
    pub async fn apply_acks(&self, acks: &[Ack], retention: Retention) -> Result<Acked, DbError> {
        // The highest ack per (conversation, user).
        let mut latest: BTreeMap<(&str, &str), &Ack> = BTreeMap::new();
        for a in acks {
            let e = latest
                .entry((a.conversation.as_str(), a.user.as_str()))
                .or_insert(a);
            if a.up_to_seq > e.up_to_seq {
                *e = a;
            }
        }
        let per_shard = self.group_by_shard(latest.into_values(), |a| &a.conversation);
        let per_shard = try_join_all(
            per_shard
                .into_iter()
                .map(|(shard, acks)| self.ack_on_shard(shard, acks, retention)),
        )
        .await?;
        let mut all = Acked::default();
        for acked in per_shard {
            all.receipts.extend(acked.receipts);
            all.watermarks.extend(acked.watermarks);
        }
        Ok(all)
    }

    /// Records acks on one shard in one statement: each acknowledges every message sent to its
    /// user in its conversation up to its seq by moving the watermark of that direction. In
    /// delete-on-ack mode the same statement destroys the keys of the bodies the watermark
    /// passed.
    /// Idempotent: acking again (or out of order) changes nothing. Expects at most one ack per
    /// conversation and user (`apply_acks` keeps the highest).
    async fn ack_on_shard(
        &self,
        shard: usize,
        acks: Vec<&Ack>,
        retention: Retention,
    ) -> Result<Acked, DbError> {
        let pg = DbError::pg(shard);
        // With its generic plan (`Shards::generic_client`): planning it cost more than running
        // it at the batch sizes of a moderate load (0.34 ms a statement in keep mode, 0.66 in
        // delete-on-ack mode), and its plan does not depend on the arrays: one probe by key per
        // ack into each table.
        let client = self.generic_client(shard).await?;
        let (mut conversations, mut users, mut seqs, mut ats) = (vec![], vec![], vec![], vec![]);
        for a in &acks {
            conversations.push(a.conversation.as_str());
            users.push(a.user.as_str());
            seqs.push(bigint(a.up_to_seq));
            ats.push(a.acked_at_ms);
        }
        // Prepared once per connection. Keep mode has a statement of its own, without the
        // erasing part.
        let statement = client
            .prepare_cached(match retention {
                Retention::Keep => ACK_KEEP,
                Retention::DeleteOnAck => ACK_ERASE,
            })
            .await
            .map_err(pg)?;
        let started = std::time::Instant::now();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&conversations, &users, &seqs, &ats];
        let rows = client.query(&statement, &params).await.map_err(pg)?;
        metrics::histogram!("db_ack_seconds").record(started.elapsed());
        let by_direction: HashMap<(&str, &str), &Ack> = acks
            .iter()
            .map(|a| ((a.conversation.as_str(), a.user.as_str()), *a))
            .collect();
        let mut acked = Acked::default();
        for row in &rows {
            let watermark = Watermark::decode(row, shard)?;
            let moved: bool = row.get(5);
            if !moved {
                acked.watermarks.push(watermark);
                continue;
            }
            let Some(ack) =
                by_direction.get(&(watermark.conversation.as_str(), watermark.reader.as_str()))
            else {
                return Err(DbError::Invariant {
                    shard,
                    reason: format!(
                        "a watermark moved that no ack asked for ({} {})",
                        watermark.conversation, watermark.reader
                    ),
                });
            };
            acked.receipts.push(ReceiptFor {
                sender: ack.peer.clone(),
                receipt: Receipt {
                    conversation: ack.conversation.clone(),
                    peer: ack.user.clone(),
                    up_to_seq: watermark.up_to_seq,
                    acked_at_ms: ack.acked_at_ms,
                },
            });
            acked.watermarks.push(watermark);
        }
        Ok(acked)
    }
}

impl Watermark {
    /// A row of the ack statements' result (see `ack_result!`).
    fn decode(row: &tokio_postgres::Row, shard: usize) -> Result<Self, DbError> {
        let bad = |reason: String| DbError::BadRow { shard, reason };
        Ok(Self {
            conversation: ConversationKey::parse(row.get(0))
                .map_err(|e| bad(format!("conversation: {e}")))?,
            reader: UserId::parse(row.get(1)).map_err(|e| bad(format!("recipient: {e}")))?,
            writer: UserId::parse(row.get(2)).map_err(|e| bad(format!("sender: {e}")))?,
            up_to_seq: u64::try_from(row.get::<_, i64>(3))
                .map_err(|e| bad(format!("up_to_seq: {e}")))?,
            acked_at_ms: row.get(4),
        })
    }
}

/// The watermarks of a sender's directions that moved after a time, newest first (columns as
/// [`ReceiptRow`] reads them).
const RECEIPTS_SINCE: &str = "SELECT conversation, recipient, up_to_seq, acked_at_ms
     FROM acks
     WHERE sender = $1 AND acked_at_ms > $2
     ORDER BY acked_at_ms DESC
     LIMIT $3";

impl Shards {
    /// Receipts for `sender`: per conversation, the highest seq of the sender's messages acked
    /// after `after_ms` (the receipts a sender may have missed). Reads every shard; at most
    /// `limit` conversations per shard.
    pub async fn receipts_since(
        &self,
        sender: &UserId,
        after_ms: i64,
        limit: u32,
    ) -> Result<Vec<Receipt>, DbError> {
        let limit = i64::from(limit);
        self.on_every_shard(|shard, client| async move {
            let rows = client
                .query(RECEIPTS_SINCE, &[&sender.as_str(), &after_ms, &limit])
                .await
                .map_err(DbError::pg(shard))?;
            rows.iter()
                .map(|row| ReceiptRow::decode(row, shard))
                .collect()
        })
        .await
    }
}

/// A row of [`RECEIPTS_SINCE`]: a direction's watermark, as the receipt its sender gets.
struct ReceiptRow;

impl ReceiptRow {
    fn decode(row: &tokio_postgres::Row, shard: usize) -> Result<Receipt, DbError> {
        let bad = |reason: String| DbError::BadRow { shard, reason };
        Ok(Receipt {
            conversation: ConversationKey::parse(row.get(0))
                .map_err(|e| bad(format!("conversation: {e}")))?,
            peer: UserId::parse(row.get(1)).map_err(|e| bad(format!("recipient: {e}")))?,
            up_to_seq: u64::try_from(row.get::<_, i64>(2))
                .map_err(|e| bad(format!("up_to_seq: {e}")))?,
            acked_at_ms: row.get(3),
        })
    }
}
