//! Writes and reads of messages on the shards.
//!
//! Writes are batched per shard, one transaction per shard per batch, and idempotent by the
//! message's (conversation, sender, client message id): a record seen twice (a replay, a
//! rebalance, a client retry, even one whose message id an earlier id scheme derived) finds its
//! row and changes nothing. Sequence numbers are assigned inside the transaction while the conversation's
//! counter row is locked, so they are dense and never given twice, even with a zombie writer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chat_common::ids::{ConversationKey, UserId};
use chat_proto::v1::ChatMessage;
use futures_util::future::try_join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;
use uuid::Uuid;

use crate::error::DbError;
use crate::shards::Shards;

/// What happens to a message's content once its recipient acknowledges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Keep forever (history can be paged).
    Keep,
    /// Erase the body when the recipient acks (the row, without content, stays as a tombstone).
    DeleteOnAck,
}

impl std::str::FromStr for Retention {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keep" => Ok(Self::Keep),
            "delete-on-ack" => Ok(Self::DeleteOnAck),
            other => Err(format!(
                "unknown retention mode {other:?} (keep | delete-on-ack)"
            )),
        }
    }
}

/// A message after the write: its stored form (seq assigned) and whether this write created it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub message: ChatMessage,
    /// False when the row already existed (replay or client retry).
    pub created: bool,
    /// True when the recipient already acked it, or it expired (nothing left to deliver).
    pub acked: bool,
}

fn conversation_of(m: &ChatMessage) -> Result<ConversationKey, DbError> {
    ConversationKey::parse(&m.conversation).map_err(|e| DbError::BadRow {
        shard: usize::MAX,
        reason: format!("message {}: {e}", m.message_id),
    })
}

/// The statements of the store transaction, in the order `store_on_shard` names them.
const STORE_STATEMENTS: [&str; 7] = [
    // Counters of conversations seen for the first time.
    "INSERT INTO conversations (conversation)
     SELECT unnest($1::text[]) ORDER BY 1
     ON CONFLICT DO NOTHING",
    // Lookups join the unnested array rather than test `= ANY($1)`: planning `= ANY` with the
    // array's values estimates each element, which cost more than running the statement.
    "SELECT c.conversation, c.last_seq
     FROM unnest($1::text[]) AS i(conversation) JOIN conversations c USING (conversation)
     ORDER BY c.conversation FOR UPDATE OF c",
    "SELECT m.message_id, m.client_message_id, m.sender, m.recipient, m.body,
            m.sent_at_ms, m.seq, m.conversation,
            m.seq <= coalesce(k.up_to_seq, 0) OR m.expired_at_ms IS NOT NULL
     FROM unnest($1::text[], $2::text[], $3::text[]) AS i(conversation, sender, client_id)
     JOIN messages m
       ON md5(m.conversation || E'\\n' || m.sender || E'\\n' || m.client_message_id)::uuid
        = md5(i.conversation || E'\\n' || i.sender || E'\\n' || i.client_id)::uuid
      AND m.conversation = i.conversation AND m.sender = i.sender
      AND m.client_message_id = i.client_id
     LEFT JOIN acks k ON k.conversation = m.conversation AND k.recipient = m.recipient",
    // A message already stored is skipped and counted out: see `store_on_shard`.
    "INSERT INTO messages (conversation, seq, message_id, client_message_id, sender,
                           recipient, body, sent_at_ms)
     SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[],
                          $5::text[], $6::text[], $7::text[], $8::bigint[])
     ON CONFLICT ((md5(conversation || E'\\n' || sender || E'\\n' || client_message_id)::uuid))
     DO NOTHING",
    "INSERT INTO acks (conversation, recipient, sender)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
     ON CONFLICT DO NOTHING",
    "UPDATE conversations c SET last_seq = u.seq
     FROM unnest($1::text[], $2::bigint[]) AS u(conversation, seq)
     WHERE c.conversation = u.conversation AND c.last_seq < u.seq",
    // The first attempt's counters in one statement: creates the missing ones, locks them all in
    // key order and moves each past the batch's messages of its conversation ($2 of them),
    // returning the new last seq.
    "INSERT INTO conversations AS c (conversation, last_seq)
     SELECT * FROM unnest($1::text[], $2::bigint[]) ORDER BY 1
     ON CONFLICT (conversation) DO UPDATE SET last_seq = c.last_seq + excluded.last_seq
     RETURNING c.conversation, c.last_seq",
];

/// The ack statement of both modes, up to `moved` (the watermarks moved, never past the
/// conversation's last seq and never back); `$extra` adds columns to `a`. Each lookup is a
/// subquery, so that it stays an index probe per ack: joined, the planner hashes the whole
/// conversations table instead.
macro_rules! ack_moved {
    ($extra:literal) => {
        concat!(
            "WITH a AS (
                 SELECT u.conversation, u.recipient, u.acked_at,
                        least(u.up_to, (SELECT c.last_seq FROM conversations c
                                        WHERE c.conversation = u.conversation)) AS up_to",
            $extra,
            "
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                     AS u(conversation, recipient, up_to, acked_at)),
             moved AS (
                 UPDATE acks k SET up_to_seq = a.up_to, acked_at_ms = a.acked_at
                 FROM a
                 WHERE k.conversation = a.conversation AND k.recipient = a.recipient
                   AND k.up_to_seq < a.up_to
                 RETURNING k.conversation, k.recipient, k.up_to_seq)"
        )
    };
}

/// The ack statement of keep mode.
const ACK_KEEP: &str = concat!(
    ack_moved!(""),
    "
     SELECT conversation, recipient, up_to_seq FROM moved"
);

/// The ack statement of delete-on-ack mode: the bodies the watermark passed are erased in the
/// same statement.
const ACK_ERASE: &str = concat!(
    ack_moved!(
        ",
                -- The watermark before this statement (every part of a statement reads one
                -- snapshot): the bodies to erase are above it.
                (SELECT k.up_to_seq FROM acks k
                 WHERE k.conversation = u.conversation AND k.recipient = u.recipient) AS before"
    ),
    ",
     erased AS (
         UPDATE messages m SET body = NULL
         FROM moved JOIN a ON a.conversation = moved.conversation
                          AND a.recipient = moved.recipient
         WHERE m.conversation = moved.conversation
           AND m.recipient = moved.recipient
           AND m.seq > a.before AND m.seq <= moved.up_to_seq
           AND m.expired_at_ms IS NULL AND m.body IS NOT NULL)
     SELECT conversation, recipient, up_to_seq FROM moved"
);

impl Shards {
    /// Stores a batch of messages (in log order) and returns each one's stored form, in input order.
    /// Messages repeated in the batch or already stored come back with `created = false`.
    pub async fn store_batch(&self, batch: &[ChatMessage]) -> Result<Vec<Stored>, DbError> {
        let mut per_shard: BTreeMap<usize, Vec<(usize, &ChatMessage)>> = BTreeMap::new();
        for (i, m) in batch.iter().enumerate() {
            let key = conversation_of(m)?;
            per_shard
                .entry(self.locator().shard_of(&key))
                .or_default()
                .push((i, m));
        }
        let results = try_join_all(
            per_shard
                .into_iter()
                .map(|(shard, msgs)| self.store_on_shard(shard, msgs)),
        )
        .await?;
        let by_key: HashMap<MessageKey<'_>, Stored> = results
            .into_iter()
            .flatten()
            .filter_map(|(i, s)| batch.get(i).map(|m| (MessageKey::of(m), s)))
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        let mut seen = HashSet::new();
        for m in batch {
            let key = MessageKey::of(m);
            if let Some(s) = by_key.get(&key) {
                let mut s = s.clone();
                if !seen.insert(key) {
                    s.created = false;
                }
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Stores one shard's part of a batch; returns each distinct message's stored form with its
    /// index in the batch (the first occurrence of a message repeated in the batch).
    async fn store_on_shard(
        &self,
        shard: usize,
        msgs: Vec<(usize, &ChatMessage)>,
    ) -> Result<Vec<(usize, Stored)>, DbError> {
        let pg = |source| DbError::Postgres { shard, source };
        let bad = |reason: String| DbError::BadRow { shard, reason };
        let broken = |reason: String| DbError::Invariant { shard, reason };

        // Distinct messages in log order (a retry inside one batch counts once, whatever its
        // message id).
        let mut ids = Vec::with_capacity(msgs.len());
        let mut unique: Vec<&ChatMessage> = Vec::with_capacity(msgs.len());
        let mut positions = Vec::with_capacity(msgs.len());
        let mut seen = HashSet::new();
        for (i, m) in msgs {
            let id = Uuid::parse_str(&m.message_id)
                .map_err(|e| bad(format!("message id {:?}: {e}", m.message_id)))?;
            if seen.insert(MessageKey::of(m)) {
                ids.push(id);
                unique.push(m);
                positions.push(i);
            }
        }
        let mut conversations: Vec<String> =
            unique.iter().map(|m| m.conversation.clone()).collect();
        conversations.sort();
        conversations.dedup();

        let mut client = self.client(shard).await?;
        // Prepared once per connection; each group of statements below goes out in one write
        // (tokio-postgres pipelines the queries of one client that are awaited together), so a
        // batch costs four round trips: BEGIN, counters (and the lookup), write, COMMIT.
        let statements: [Statement; 7] = try_join_all(
            STORE_STATEMENTS
                .iter()
                .map(|sql| client.prepare_cached(sql)),
        )
        .await
        .map_err(pg)?
        .try_into()
        .map_err(|_| broken("statement count".into()))?;
        let batch = ShardBatch {
            shard,
            messages: &unique,
            ids: &ids,
            conversations: &conversations,
        };
        // Almost every batch holds only new messages, so the first attempt does not look for
        // stored copies: the insert skips a message whose id is taken, and if it skipped any
        // (a replay, a client retry), that attempt is rolled back and the batch is written again
        // after the lookup. Looking up every batch's ids cost a third of Postgres's planning.
        if let Some(out) = write_on_shard(&mut client, &statements, &batch, false).await? {
            return Ok(positions.into_iter().zip(out).collect());
        }
        metrics::counter!("db_store_lookups_total").increment(1);
        let out = write_on_shard(&mut client, &statements, &batch, true)
            .await?
            .ok_or_else(|| {
                // Under the locks, the lookup found every stored message of the batch, so the
                // insert skipped one whose send key another message holds: a fingerprint
                // collision (see migration 5), never resolved by retrying. Refused as data, so
                // the batch is bisected and only that message is set aside.
                bad("the message's send key is taken by another message".into())
            })?;
        Ok(positions.into_iter().zip(out).collect())
    }

    /// Records acks on one shard in one statement: each `(conversation, user, up_to_seq,
    /// acked_at_ms)` acknowledges every message sent to `user` in `conversation` up to that seq
    /// by moving the watermark of that direction (never past the conversation's last seq, never
    /// back). In delete-on-ack mode the same statement erases the bodies the watermark passed.
    /// Idempotent: acking again (or out of order) changes nothing. Returns, per conversation and
    /// user whose watermark moved, the new watermark. Expects at most one ack per conversation
    /// and user (`apply_acks` keeps the highest).
    pub async fn ack_on_shard(
        &self,
        shard: usize,
        acks: &[(String, String, u64, i64)],
        retention: Retention,
    ) -> Result<Vec<(String, String, u64)>, DbError> {
        let pg = |source| DbError::Postgres { shard, source };
        let client = self.client(shard).await?;
        let erase = retention == Retention::DeleteOnAck;
        let (mut convs, mut users, mut seqs, mut ats) = (vec![], vec![], vec![], vec![]);
        for (c, u, seq, at) in acks {
            convs.push(c.as_str());
            users.push(u.as_str());
            seqs.push(i64::try_from(*seq).unwrap_or(i64::MAX));
            ats.push(*at);
        }
        // Prepared once per connection. Keep mode has a statement of its own, without the
        // erasing part: planning the statement is most of its cost at small batches.
        let statement = client
            .prepare_cached(if erase { ACK_ERASE } else { ACK_KEEP })
            .await
            .map_err(pg)?;
        let started = std::time::Instant::now();
        let rows = client
            .query(&statement, &[&convs, &users, &seqs, &ats])
            .await
            .map_err(pg)?;
        metrics::histogram!("db_ack_seconds").record(started.elapsed());
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
            .collect())
    }

    /// A page of a conversation's history, oldest first: the `limit` messages before `before`
    /// (or the latest `limit` when `before` is `None`). Erased bodies come back empty.
    pub async fn history(
        &self,
        conversation: &ConversationKey,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, DbError> {
        let shard = self.locator().shard_of(conversation);
        let client = self.client(shard).await?;
        let before = before
            .map(|b| i64::try_from(b).unwrap_or(i64::MAX))
            .unwrap_or(i64::MAX);
        let limit = i64::from(limit);
        let rows = client
            .query(
                "SELECT message_id, client_message_id, sender, recipient, body, sent_at_ms,
                        seq, conversation
                 FROM messages WHERE conversation = $1 AND seq < $2
                 ORDER BY seq DESC LIMIT $3",
                &[&conversation.as_str(), &before, &limit],
            )
            .await
            .map_err(|source| DbError::Postgres { shard, source })?;
        let mut out: Vec<ChatMessage> = rows.iter().map(row_to_message).collect();
        out.reverse();
        Ok(out)
    }

    /// Every message to `user` not yet acknowledged, ordered by conversation then sequence,
    /// skipping what the client says it holds (`after[conversation]` = last seq held).
    /// Reads every shard: a user's conversations are spread over all of them.
    pub async fn pending(
        &self,
        user: &UserId,
        after: &HashMap<String, u64>,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, DbError> {
        let (convs, seqs): (Vec<String>, Vec<i64>) = after
            .iter()
            .map(|(c, s)| (c.clone(), i64::try_from(*s).unwrap_or(i64::MAX)))
            .unzip();
        let limit = i64::from(limit);
        let per_shard = try_join_all((0..self.len()).map(|shard| {
            let (convs, seqs) = (&convs, &seqs);
            async move {
                let client = self.client(shard).await?;
                let rows = client
                    .query(
                        "SELECT m.message_id, m.client_message_id, m.sender, m.recipient, m.body,
                                m.sent_at_ms, m.seq, m.conversation
                         FROM acks k
                         LEFT JOIN unnest($2::text[], $3::bigint[]) AS h(conversation, seq)
                                ON h.conversation = k.conversation
                         CROSS JOIN LATERAL (
                             SELECT * FROM messages m
                             WHERE m.conversation = k.conversation AND m.recipient = k.recipient
                               AND m.expired_at_ms IS NULL
                               AND m.seq > greatest(k.up_to_seq, coalesce(h.seq, 0))
                             ORDER BY m.seq
                             LIMIT $4) m
                         WHERE k.recipient = $1
                         ORDER BY m.conversation, m.seq
                         LIMIT $4",
                        &[&user.as_str(), convs, seqs, &limit],
                    )
                    .await
                    .map_err(|source| DbError::Postgres { shard, source })?;
                Ok::<_, DbError>(rows.iter().map(row_to_message).collect::<Vec<_>>())
            }
        }))
        .await?;
        let mut all: Vec<ChatMessage> = per_shard.into_iter().flatten().collect();
        all.sort_by(|a, b| (&a.conversation, a.seq).cmp(&(&b.conversation, b.seq)));
        Ok(all)
    }
}

/// What makes a message the same message: the store keeps one row per (conversation, sender,
/// client message id), whatever message id a gateway derived for it (docs/design.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MessageKey<'a> {
    conversation: &'a str,
    sender: &'a str,
    client_message_id: &'a str,
}

impl<'a> MessageKey<'a> {
    fn of(m: &'a ChatMessage) -> Self {
        Self {
            conversation: &m.conversation,
            sender: &m.sender,
            client_message_id: &m.client_message_id,
        }
    }
}

/// The messages of one batch for one shard, distinct, in log order.
struct ShardBatch<'a> {
    shard: usize,
    messages: &'a [&'a ChatMessage],
    ids: &'a [Uuid],
    /// The batch's conversations, sorted and distinct (the lock order).
    conversations: &'a [String],
}

/// One attempt at the store transaction. With `lookup`, messages already stored are read first
/// and returned as they are; without it, the attempt is rolled back and `None` returned as soon
/// as the insert finds a message id already taken.
async fn write_on_shard(
    client: &mut deadpool_postgres::Object,
    statements: &[Statement; 7],
    batch: &ShardBatch<'_>,
    lookup: bool,
) -> Result<Option<Vec<Stored>>, DbError> {
    let shard = batch.shard;
    let pg = |source| DbError::Postgres { shard, source };
    let broken = |reason: String| DbError::Invariant { shard, reason };
    let [create_counters, lock_counters, find_existing, insert_messages, insert_watermarks, move_counters, take_seqs] =
        statements;
    let tx = client.transaction().await.map_err(pg)?;

    let conversations = batch.conversations;
    let (mut last_seq, found): (HashMap<String, i64>, _) = if lookup {
        // Lock the counters of every conversation in the batch, in key order (no deadlock
        // between two writers of overlapping batches), then read which messages are already
        // stored: the server runs the statements in this order, so the read sees every write of
        // another writer that held these locks before us. The counters move once the new
        // messages are known.
        let (mut k_conv, mut k_from, mut k_cid) = (vec![], vec![], vec![]);
        for m in batch.messages {
            k_conv.push(m.conversation.as_str());
            k_from.push(m.sender.as_str());
            k_cid.push(m.client_message_id.as_str());
        }
        let by_conversation: [&(dyn ToSql + Sync); 1] = [&conversations];
        let by_key: [&(dyn ToSql + Sync); 3] = [&k_conv, &k_from, &k_cid];
        let (_, locked, found) = futures_util::try_join!(
            tx.execute(create_counters, &by_conversation),
            tx.query(lock_counters, &by_conversation),
            tx.query(find_existing, &by_key),
        )
        .map_err(pg)?;
        (locked.iter().map(|r| (r.get(0), r.get(1))).collect(), found)
    } else {
        // Every message is taken to be new: the counters are created, locked in key order and
        // moved past all of them in one statement.
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for m in batch.messages {
            *counts.entry(m.conversation.as_str()).or_default() += 1;
        }
        let n: Vec<i64> = conversations
            .iter()
            .map(|c| counts.get(c.as_str()).copied().unwrap_or(0))
            .collect();
        let moved = tx
            .query(take_seqs, &[&conversations, &n])
            .await
            .map_err(pg)?;
        let mut before = HashMap::with_capacity(moved.len());
        for r in &moved {
            let (conversation, last): (String, i64) = (r.get(0), r.get(1));
            let taken = counts.get(conversation.as_str()).copied().unwrap_or(0);
            before.insert(conversation, last - taken);
        }
        (before, Vec::new())
    };

    // Rows already present (replay, retry): returned as stored, not written again.
    let mut existing: HashMap<(String, String, String), Stored> = HashMap::new();
    for r in found {
        let message = row_to_message(&r);
        existing.insert(
            (
                message.conversation.clone(),
                message.sender.clone(),
                message.client_message_id.clone(),
            ),
            Stored {
                message,
                created: false,
                acked: r.get(8),
            },
        );
    }

    let mut out = Vec::with_capacity(batch.messages.len());
    let (mut c_conv, mut c_seq, mut c_id, mut c_cid, mut c_from, mut c_to, mut c_body, mut c_at) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    for (&m, &id) in batch.messages.iter().zip(batch.ids) {
        if !existing.is_empty() {
            let key = (
                m.conversation.clone(),
                m.sender.clone(),
                m.client_message_id.clone(),
            );
            if let Some(s) = existing.remove(&key) {
                out.push(s);
                continue;
            }
        }
        let seq = last_seq
            .get_mut(&m.conversation)
            .ok_or_else(|| broken(format!("no counter for {}", m.conversation)))?;
        *seq += 1;
        let mut stored = m.clone();
        stored.seq = *seq as u64;
        c_conv.push(m.conversation.as_str());
        c_seq.push(*seq);
        c_id.push(id);
        c_cid.push(m.client_message_id.as_str());
        c_from.push(m.sender.as_str());
        c_to.push(m.recipient.as_str());
        c_body.push(m.body.as_str());
        c_at.push(m.sent_at_ms);
        out.push(Stored {
            message: stored,
            created: true,
            acked: false,
        });
    }
    if !c_id.is_empty() {
        // The ack watermark of each direction that received a message, created at 0 the first
        // time: the sync query finds a user's conversations through these rows. Distinct and
        // sorted, so concurrent writers insert them in one order.
        let directions: BTreeSet<(&str, &str, &str)> = c_conv
            .iter()
            .zip(&c_to)
            .zip(&c_from)
            .map(|((c, to), from)| (*c, *to, *from))
            .collect();
        let (mut d_conv, mut d_to, mut d_from) = (vec![], vec![], vec![]);
        for (c, to, from) in directions {
            d_conv.push(c);
            d_to.push(to);
            d_from.push(from);
        }
        let rows: [&(dyn ToSql + Sync); 8] = [
            &c_conv, &c_seq, &c_id, &c_cid, &c_from, &c_to, &c_body, &c_at,
        ];
        let watermarks: [&(dyn ToSql + Sync); 3] = [&d_conv, &d_to, &d_from];
        // The first attempt moved its counters already.
        let move_counters = async {
            if lookup {
                let (convs, seqs): (Vec<String>, Vec<i64>) = last_seq.into_iter().unzip();
                tx.execute(move_counters, &[&convs, &seqs]).await
            } else {
                Ok(0)
            }
        };
        let (inserted, _, _) = futures_util::try_join!(
            tx.execute(insert_messages, &rows),
            tx.execute(insert_watermarks, &watermarks),
            move_counters,
        )
        .map_err(pg)?;
        if inserted != c_id.len() as u64 {
            tx.rollback().await.map_err(pg)?;
            return Ok(None);
        }
    }
    let commit = std::time::Instant::now();
    tx.commit().await.map_err(pg)?;
    metrics::histogram!("db_commit_seconds").record(commit.elapsed());
    metrics::counter!("db_messages_written_total").increment(c_id.len() as u64);
    Ok(Some(out))
}

fn row_to_message(r: &tokio_postgres::Row) -> ChatMessage {
    let id: Uuid = r.get(0);
    let body: Option<String> = r.get(4);
    let seq: i64 = r.get(6);
    ChatMessage {
        message_id: id.to_string(),
        client_message_id: r.get(1),
        sender: r.get(2),
        recipient: r.get(3),
        body: body.unwrap_or_default(),
        sent_at_ms: r.get(5),
        seq: seq as u64,
        conversation: r.get(7),
    }
}

/// The latest ack a sender has not necessarily seen: per conversation, the highest acked seq of
/// the sender's messages and when it was acked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckedUpTo {
    pub conversation: String,
    pub peer: String,
    pub up_to_seq: u64,
    pub acked_at_ms: i64,
}

impl Shards {
    /// Receipts for `sender`: per conversation, the highest seq of the sender's messages acked
    /// after `after_ms`. Reads every shard; at most `limit` conversations per shard.
    pub async fn receipts_since(
        &self,
        sender: &UserId,
        after_ms: i64,
        limit: u32,
    ) -> Result<Vec<AckedUpTo>, DbError> {
        let limit = i64::from(limit);
        let per_shard = try_join_all((0..self.len()).map(|shard| async move {
            let client = self.client(shard).await?;
            let rows = client
                .query(
                    "SELECT conversation, up_to_seq, acked_at_ms, recipient
                     FROM acks
                     WHERE sender = $1 AND acked_at_ms > $2
                     ORDER BY acked_at_ms DESC
                     LIMIT $3",
                    &[&sender.as_str(), &after_ms, &limit],
                )
                .await
                .map_err(|source| DbError::Postgres { shard, source })?;
            Ok::<_, DbError>(
                rows.iter()
                    .map(|r| {
                        let seq: i64 = r.get(1);
                        AckedUpTo {
                            conversation: r.get(0),
                            up_to_seq: seq as u64,
                            acked_at_ms: r.get(2),
                            peer: r.get(3),
                        }
                    })
                    .collect::<Vec<_>>(),
            )
        }))
        .await?;
        Ok(per_shard.into_iter().flatten().collect())
    }

    /// Delete-on-ack retention: erases the bodies of messages sent before `cutoff_ms` and marks
    /// them expired, which takes the unacked ones out of the pending set. Acked messages (their
    /// bodies already erased) are marked too, so the sweep's index holds only the retention
    /// window. Returns how many unacked messages expired. Works in bounded chunks.
    pub async fn expire_unacked(&self, cutoff_ms: i64, now_ms: i64) -> Result<u64, DbError> {
        const CHUNK: i64 = 1000;
        let mut total = 0;
        for shard in 0..self.len() {
            let client = self.client(shard).await?;
            loop {
                let row = client
                    .query_one(
                        "WITH swept AS (
                             UPDATE messages m SET body = NULL, expired_at_ms = $2
                             WHERE (m.conversation, m.seq) IN (
                                 SELECT conversation, seq FROM messages
                                 WHERE expired_at_ms IS NULL AND sent_at_ms < $1
                                 LIMIT $3)
                             RETURNING m.conversation, m.recipient, m.seq)
                         SELECT count(*),
                                count(*) FILTER (WHERE s.seq > coalesce(k.up_to_seq, 0))
                         FROM swept s
                         LEFT JOIN acks k ON k.conversation = s.conversation
                                         AND k.recipient = s.recipient",
                        &[&cutoff_ms, &now_ms, &CHUNK],
                    )
                    .await
                    .map_err(|source| DbError::Postgres { shard, source })?;
                let (swept, unacked): (i64, i64) = (row.get(0), row.get(1));
                total += unacked as u64;
                if swept < CHUNK {
                    break;
                }
            }
        }
        Ok(total)
    }
}

impl Shards {
    /// Every message sent in `[from_ms, until_ms)`, shard by shard, each shard in send order,
    /// handed to `out` page by page (bounded memory). Returns how many were exported.
    pub async fn export_range(
        &self,
        from_ms: i64,
        until_ms: i64,
        out: &mut (dyn FnMut(&ChatMessage) -> std::io::Result<()> + Send),
    ) -> Result<u64, DbError> {
        const PAGE: i64 = 5000;
        let mut total = 0;
        for shard in 0..self.len() {
            let client = self.client(shard).await?;
            let mut cursor: (i64, Uuid) = (from_ms, Uuid::nil());
            loop {
                let rows = client
                    .query(
                        "SELECT message_id, client_message_id, sender, recipient, body, sent_at_ms,
                                seq, conversation
                         FROM messages
                         WHERE (sent_at_ms, message_id) > ($1, $2) AND sent_at_ms < $3
                         ORDER BY sent_at_ms, message_id
                         LIMIT $4",
                        &[&cursor.0, &cursor.1, &until_ms, &PAGE],
                    )
                    .await
                    .map_err(|source| DbError::Postgres { shard, source })?;
                for r in &rows {
                    out(&row_to_message(r))
                        .map_err(|e| DbError::Config(format!("writing the export: {e}")))?;
                    total += 1;
                }
                match rows.last() {
                    Some(r) if rows.len() as i64 == PAGE => cursor = (r.get(5), r.get(0)),
                    _ => break,
                }
            }
        }
        Ok(total)
    }
}
