//! Messages and their sequence numbers: idempotent batched writes.
//!
//! Writes are batched per shard, one transaction per shard per batch, and idempotent by the
//! message's send key (conversation, sender, client message id): a record seen twice (a replay,
//! a rebalance, a client retry, even one whose message id an earlier id scheme derived) finds its
//! row and changes nothing. Sequence numbers are assigned inside the transaction while the
//! conversation's counter row is locked, so they are dense and never given twice, even with a
//! zombie writer.
//!
//! The first attempt takes every message to be new and is one statement ([`store_new`]): it
//! takes the counters and inserts. If a message was already stored, it fails and writes nothing,
//! and the second attempt is one transaction that reads top to bottom in three steps
//! ([`write_on_shard`]): lock the counters and find the messages already stored, assign each new
//! message its seq ([`assign`], pure), insert.

use std::collections::{BTreeSet, HashMap, HashSet};

use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_common::message::Message;
use chat_common::seal::BodyKeyId;
use futures_util::future::try_join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Statement, Transaction};
use uuid::Uuid;

use crate::error::DbError;
use crate::rows::MessageRow;
use crate::shards::Shards;

/// A message after the write: its stored form (seq assigned) and whether this write created it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub message: Message,
    /// False when the row already existed (replay or client retry).
    pub created: bool,
    /// True when the recipient already acked it, or it expired (nothing left to deliver).
    pub acked: bool,
}

/// The statements of the store transaction.
mod sql {
    use crate::keys::sealed_key_id;
    use crate::rows::message_columns;

    /// The start of both message inserts: the columns they fill, in the order of their
    /// `unnest` (aliased `u`), with the seq's expression and the sealed body's (one of the three
    /// below); followed by the `FROM`.
    macro_rules! insert_messages {
        ($seq:literal, $sealed:expr) => {
            concat!(
                "INSERT INTO messages (conversation, seq, message_id, client_message_id, sender,
                                       recipient, body, sent_at_ms, sealed)
                 SELECT u.conversation, ",
                $seq,
                ", u.message_id, u.client_id, u.sender, u.recipient, u.body, u.sent_at_ms, ",
                $sealed
            )
        };
    }

    /// The sealed body of a batch that holds none (keep mode): NULL, as given.
    macro_rules! sealed_none {
        () => {
            "u.sealed"
        };
    }

    /// The sealed body kept only while its key exists (delete-on-ack mode): a record whose key
    /// an ack or the expiry destroyed (a replay of the log), or the store as a skipped copy's,
    /// rebuilds the row without content. For a batch whose sealed bodies all carry their key's
    /// id.
    ///
    /// The key is looked for by a scalar subquery on its primary key, not by `EXISTS`: the
    /// first attempt runs on its generic plan, kept for as long as the connection's plan is.
    /// `EXISTS` is planned for its first row, and on a new shard its plan scanned the key table
    /// per message up to a few thousand keys; a scalar subquery is planned for all its rows and
    /// probes the key's index once the table holds more than a page (e2e test
    /// `a_new_shards_store_probes_the_key_tables_by_index`).
    macro_rules! sealed_by_id {
        () => {
            concat!(
                "CASE WHEN (SELECT true FROM sealing_keys k WHERE k.id = ",
                sealed_key_id!("u.sealed"),
                ") THEN u.sealed END"
            )
        };
    }

    /// The same for a batch that also holds bodies sealed before keys were issued ahead (no
    /// id): their keys are held under the send key. Both keys are looked for by scalar
    /// subqueries, as in [`sealed_by_id!`].
    macro_rules! sealed_any {
        () => {
            concat!(
                "CASE WHEN u.sealed IS NULL THEN NULL
                      WHEN ",
                sealed_key_id!("u.sealed"),
                " IS NOT NULL
                      THEN CASE WHEN (SELECT true FROM sealing_keys k
                                      WHERE k.id = ",
                sealed_key_id!("u.sealed"),
                ") THEN u.sealed END
                      WHEN (SELECT true FROM body_keys k
                                   WHERE k.conversation = u.conversation
                                     AND k.sender = u.sender
                                     AND k.client_message_id = u.client_id)
                      THEN u.sealed END"
            )
        };
    }

    /// Creates the batch's missing counters and locks them all, in key order, returning each
    /// one's last seq. The update changes nothing but takes the row lock, as `FOR UPDATE` would.
    /// One statement in key order: a first attempt's upsert takes the same locks in the same
    /// order, where creating the missing counters first and then locking the others could
    /// deadlock with it (a new counter held, an older one wanted).
    pub(super) const LOCK_COUNTERS: &str = "INSERT INTO conversations AS c (conversation)
         SELECT unnest($1::text[]) ORDER BY 1
         ON CONFLICT (conversation) DO UPDATE SET last_seq = c.last_seq
         RETURNING c.conversation, c.last_seq";

    /// The messages of the batch already stored, found by send key (through the fingerprint
    /// index of migration 5), with whether their recipient has acked them or they expired.
    pub(super) const FIND_STORED: &str = concat!(
        "SELECT ",
        message_columns!(),
        ",
                m.seq <= coalesce(k.up_to_seq, 0) OR m.expired_at_ms IS NOT NULL
         FROM unnest($1::text[], $2::text[], $3::text[]) AS i(conversation, sender, client_id)
         JOIN messages m
           ON md5(m.conversation || E'\\n' || m.sender || E'\\n' || m.client_message_id)::uuid
            = md5(i.conversation || E'\\n' || i.sender || E'\\n' || i.client_id)::uuid
          AND m.conversation = i.conversation AND m.sender = i.sender
          AND m.client_message_id = i.client_id
         LEFT JOIN acks k ON k.conversation = m.conversation AND k.recipient = m.recipient"
    );

    /// A message already stored is skipped and counted out: see `write_on_shard`.
    macro_rules! insert_new_messages {
        ($sealed:expr) => {
            concat!(
                insert_messages!("u.seq", $sealed),
                "
         FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::bigint[], $9::bytea[])
             AS u(conversation, seq, message_id, client_id, sender, recipient, body, sent_at_ms,
                  sealed)
         ON CONFLICT ((md5(conversation || E'\\n' || sender || E'\\n' || client_message_id)::uuid))
         DO NOTHING"
            )
        };
    }

    /// [`insert_new_messages!`] for each form of the batch's bodies ([`super::Sealed`]).
    pub(super) const INSERT_MESSAGES: [&str; 3] = [
        insert_new_messages!(sealed_none!()),
        insert_new_messages!(sealed_by_id!()),
        insert_new_messages!(sealed_any!()),
    ];

    /// The ack watermark of each direction that received a message, created at 0.
    pub(super) const INSERT_WATERMARKS: &str = "INSERT INTO acks (conversation, recipient, sender)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
         ON CONFLICT DO NOTHING";

    /// Moves the counters past the batch's new messages (second pass).
    pub(super) const MOVE_COUNTERS: &str = "UPDATE conversations c SET last_seq = u.seq
         FROM unnest($1::text[], $2::bigint[]) AS u(conversation, seq)
         WHERE c.conversation = u.conversation AND c.last_seq < u.seq";

    /// The first attempt in one statement (its own transaction): creates the missing counters,
    /// locks them all in key order and moves each past the batch's messages of its conversation
    /// ($2 of them); inserts the messages, each at its conversation's new last seq plus its
    /// relative seq ($4: 0 for the conversation's last message of the batch, -1 for the one
    /// before, ...), and the watermarks of their directions. Returns each conversation's new
    /// last seq. Without `ON CONFLICT`, a message already stored (a replay, a client retry)
    /// fails the statement on `messages_send_key`, and nothing of it is written.
    macro_rules! store_new {
        ($sealed:expr) => {
            concat!(
        "WITH taken AS (
             INSERT INTO conversations AS c (conversation, last_seq)
             SELECT * FROM unnest($1::text[], $2::bigint[]) ORDER BY 1
             ON CONFLICT (conversation) DO UPDATE SET last_seq = c.last_seq + excluded.last_seq
             RETURNING c.conversation, c.last_seq
         ), new_messages AS (",
        insert_messages!("t.last_seq + u.seq", $sealed),
        "
             FROM unnest($3::text[], $4::bigint[], $5::uuid[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::bigint[], $11::bytea[])
                 AS u(conversation, seq, message_id, client_id, sender, recipient, body,
                      sent_at_ms, sealed)
             JOIN taken t ON t.conversation = u.conversation
         ), directions AS (
             INSERT INTO acks (conversation, recipient, sender)
             SELECT * FROM unnest($12::text[], $13::text[], $14::text[])
             ON CONFLICT DO NOTHING
         )
         SELECT conversation, last_seq FROM taken"
            )
        };
    }

    /// [`store_new!`] for each form of the batch's bodies ([`super::Sealed`]).
    pub(super) const STORE_NEW: [&str; 3] = [
        store_new!(sealed_none!()),
        store_new!(sealed_by_id!()),
        store_new!(sealed_any!()),
    ];

    /// The index whose conflict fails [`STORE_NEW`] when the batch holds a stored message.
    pub(super) const SEND_KEY: &str = "messages_send_key";
}

/// What the sealed bodies of a batch are, which picks the form of its insert: the check that a
/// body's key exists costs its planning in every statement, so a batch plans only the check its
/// bodies need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sealed {
    /// No sealed body (keep mode).
    None = 0,
    /// Every sealed body carries its key's id (delete-on-ack mode).
    ById = 1,
    /// Some sealed body carries no key id (sealed before keys were issued ahead).
    Any = 2,
}

impl Sealed {
    fn of<'a>(messages: impl IntoIterator<Item = &'a &'a Message>) -> Self {
        let mut form = Sealed::None;
        for m in messages {
            match m.sealed.as_deref().map(BodyKeyId::of) {
                None => {}
                Some(Some(_)) => form = Sealed::ById,
                Some(None) => return Sealed::Any,
            }
        }
        form
    }
}

/// The second attempt's statements, prepared once per connection.
struct Statements {
    lock_counters: Statement,
    find_stored: Statement,
    insert_messages: Statement,
    insert_watermarks: Statement,
    move_counters: Statement,
}

impl Statements {
    /// Prepares (or takes from the connection's cache) every statement, in one round trip, with
    /// the inserts of the form `sealed`.
    async fn prepare(
        client: &deadpool_postgres::Object,
        sealed: Sealed,
    ) -> Result<Self, tokio_postgres::Error> {
        let (lock_counters, find_stored, insert_messages, insert_watermarks, move_counters) = futures_util::try_join!(
            client.prepare_cached(sql::LOCK_COUNTERS),
            client.prepare_cached(sql::FIND_STORED),
            client.prepare_cached(sql::INSERT_MESSAGES[sealed as usize]),
            client.prepare_cached(sql::INSERT_WATERMARKS),
            client.prepare_cached(sql::MOVE_COUNTERS),
        )?;
        Ok(Self {
            lock_counters,
            find_stored,
            insert_messages,
            insert_watermarks,
            move_counters,
        })
    }
}

/// What makes a message the same message: the store keeps one row per (conversation, sender,
/// client message id), whatever message id a gateway derived for it (docs/design.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SendKey<'a> {
    conversation: &'a ConversationKey,
    sender: &'a UserId,
    client_id: &'a ClientMessageId,
}

impl<'a> SendKey<'a> {
    fn of(m: &'a Message) -> Self {
        Self {
            conversation: &m.conversation,
            sender: &m.sender,
            client_id: &m.client_id,
        }
    }
}

impl Shards {
    /// Stores a batch of messages (in log order) and returns each one's stored form, in input
    /// order. Messages repeated in the batch or already stored come back with `created = false`.
    pub async fn store_batch(&self, batch: &[Message]) -> Result<Vec<Stored>, DbError> {
        let per_shard = self.group_by_shard(batch.iter().enumerate(), |(_, m)| &m.conversation);
        let results = try_join_all(
            per_shard
                .into_iter()
                .map(|(shard, msgs)| self.store_on_shard(shard, msgs)),
        )
        .await?;
        let by_key: HashMap<SendKey<'_>, Stored> = results
            .into_iter()
            .flatten()
            .map(|(i, s)| (SendKey::of(&batch[i]), s))
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        let mut seen = HashSet::new();
        for m in batch {
            let key = SendKey::of(m);
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
        msgs: Vec<(usize, &Message)>,
    ) -> Result<Vec<(usize, Stored)>, DbError> {
        let batch = ShardBatch::new(shard, msgs);
        let sealed = Sealed::of(&batch.messages);
        // Almost every batch holds only new messages, so the first attempt does not look for
        // stored copies: it is one statement, one round trip, that fails on the send key's
        // index if a message is already stored (a replay, a client retry). Then nothing of it
        // was written, and the second attempt looks them up first. Looking up every batch's
        // keys cost a third of Postgres's planning.
        // A batch that repeats a message takes the second attempt at once: the repeat's key, if
        // it has one of its own, is destroyed there.
        let started = std::time::Instant::now();
        let first = match batch.repeats.is_empty() {
            true => store_new(self, sealed, &batch).await?,
            false => None,
        };
        let out = match first {
            Some(out) => out,
            None => {
                metrics::counter!("db_store_lookups_total").increment(1);
                // On the writer's own connection, which plans each execution: the lookup's plan
                // depends on the table sizes (docs/design.md).
                let mut client = self.client(shard).await?;
                let statements = Statements::prepare(&client, sealed)
                    .await
                    .map_err(DbError::pg(shard))?;
                write_on_shard(&mut client, &statements, &batch)
                    .await?
                    .ok_or_else(|| DbError::BadRow {
                        // Under the locks, the lookup found every stored message of the batch,
                        // so the insert skipped one whose send key another message holds: a
                        // fingerprint collision (see migration 5), never resolved by retrying.
                        // Refused as data, so the batch is bisected and only that message is
                        // set aside.
                        shard,
                        reason: "the message's send key is taken by another message".into(),
                    })?
            }
        };
        metrics::histogram!("db_commit_seconds").record(started.elapsed());
        let created = out.iter().filter(|s| s.created).count();
        metrics::counter!("db_messages_written_total").increment(created as u64);
        Ok(batch.positions.into_iter().zip(out).collect())
    }
}

/// The messages of one batch for one shard, distinct, in log order.
struct ShardBatch<'a> {
    shard: usize,
    messages: Vec<&'a Message>,
    /// Each message's index in the whole batch.
    positions: Vec<usize>,
    /// The batch's conversations, sorted and distinct (the lock order).
    conversations: Vec<&'a str>,
    /// Messages repeated in the batch after their first occurrence (a client's retry in the
    /// same batch): not stored, but each may be sealed under a key of its own to destroy.
    repeats: Vec<&'a Message>,
}

impl<'a> ShardBatch<'a> {
    /// Keeps the first of messages repeated in the batch (a retry inside one batch counts once,
    /// whatever its message id).
    fn new(shard: usize, msgs: Vec<(usize, &'a Message)>) -> Self {
        let mut seen = HashSet::new();
        let mut repeats = Vec::new();
        let (positions, messages): (Vec<usize>, Vec<&Message>) = msgs
            .into_iter()
            .filter(|(_, m)| {
                let first = seen.insert(SendKey::of(m));
                if !first {
                    repeats.push(*m);
                }
                first
            })
            .unzip();
        let conversations: BTreeSet<&str> =
            messages.iter().map(|m| m.conversation.as_str()).collect();
        Self {
            shard,
            messages,
            positions,
            conversations: conversations.into_iter().collect(),
            repeats,
        }
    }

    /// The batch's own copy of a conversation key read back from the shard.
    fn conversation(&self, key: &str) -> Option<&'a str> {
        self.conversations
            .binary_search(&key)
            .ok()
            .map(|i| self.conversations[i])
    }
}

/// Per conversation of the batch, the last seq given before its new messages.
type Counters<'a> = HashMap<&'a str, i64>;

/// The first attempt: every message taken to be new, in one statement ([`sql::STORE_NEW`]).
/// `None` when a message of the batch is already stored: the statement failed on the send
/// key, and wrote nothing.
async fn store_new(
    shards: &Shards,
    sealed: Sealed,
    batch: &ShardBatch<'_>,
) -> Result<Option<Vec<Stored>>, DbError> {
    let pg = DbError::pg(batch.shard);
    // With its generic plan (`Shards::generic_client`): the counters' upsert and the inserts
    // probe by key per element whatever the arrays hold, and planning this statement per
    // execution took 17-20% of its time (performance log, 2026-12-04).
    let client = shards.generic_client(batch.shard).await?;
    let statement = client
        .prepare_cached(sql::STORE_NEW[sealed as usize])
        .await
        .map_err(pg)?;
    let (mut counts, rows) = relative_rows(batch);
    let n: Vec<i64> = batch.conversations.iter().map(|c| counts[c]).collect();
    let [conversation, recipient, sender] = rows.directions();
    let params: [&(dyn ToSql + Sync); 14] = [
        &batch.conversations,
        &n,
        &rows.conversation,
        &rows.seq,
        &rows.message_id,
        &rows.client_id,
        &rows.sender,
        &rows.recipient,
        &rows.body,
        &rows.sent_at_ms,
        &rows.sealed,
        &conversation,
        &recipient,
        &sender,
    ];
    let taken = match client.query(&statement, &params).await {
        Ok(taken) => taken,
        Err(e) if conflicts_on_send_key(&e) => return Ok(None),
        Err(e) => return Err(pg(e)),
    };
    for row in &taken {
        let (conversation, last): (&str, i64) = (row.get(0), row.get(1));
        if let Some(count) = counts.get_mut(conversation) {
            *count = last - *count;
        }
    }
    Ok(Some(assign(batch, counts, Vec::new())?.out))
}

/// The first attempt's rows: the number of messages per conversation, and every message with
/// its seq relative to its conversation's last seq after the batch (how many of the
/// conversation's messages follow it in the batch, negated).
fn relative_rows<'a>(batch: &ShardBatch<'a>) -> (Counters<'a>, NewRows<'a>) {
    let mut counts: Counters<'a> = HashMap::with_capacity(batch.conversations.len());
    for m in &batch.messages {
        *counts.entry(m.conversation.as_str()).or_default() += 1;
    }
    let mut following = counts.clone();
    let mut rows = NewRows::default();
    for &m in &batch.messages {
        let after = following.entry(m.conversation.as_str()).or_default();
        *after -= 1;
        rows.push(m, -*after);
    }
    (counts, rows)
}

/// Whether a statement failed because a message's send key is taken.
fn conflicts_on_send_key(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.constraint() == Some(sql::SEND_KEY)
    })
}

/// The second attempt, in one transaction: lock the counters and find the messages already
/// stored, assign seqs to the rest, insert them, commit.
async fn write_on_shard(
    client: &mut deadpool_postgres::Object,
    statements: &Statements,
    batch: &ShardBatch<'_>,
) -> Result<Option<Vec<Stored>>, DbError> {
    let pg = DbError::pg(batch.shard);
    let tx = client.transaction().await.map_err(pg)?;
    let (counters, stored) = lock_and_find_stored(&tx, statements, batch).await?;
    let plan = assign(batch, counters, stored)?;
    if !plan.rows.is_empty() {
        let inserted = insert(&tx, statements, &plan).await.map_err(pg)?;
        if inserted != plan.rows.len() as u64 {
            tx.rollback().await.map_err(pg)?;
            return Ok(None);
        }
    }
    let skipped = skipped_keys(batch, &plan.out);
    if !skipped.is_empty() {
        let ids: Vec<&[u8]> = skipped.iter().map(BodyKeyId::as_bytes).collect();
        let destroy = tx.prepare_cached(crate::keys::DESTROY).await.map_err(pg)?;
        tx.execute(&destroy, &[&ids]).await.map_err(pg)?;
        metrics::counter!("db_skipped_copy_keys_destroyed_total").increment(ids.len() as u64);
    }
    tx.commit().await.map_err(pg)?;
    Ok(Some(plan.out))
}

/// The keys of the batch's copies that were not stored (a message found stored already, a
/// repeat in the batch) and are not the stored message's own key: a client's retry is sealed
/// under a key of its own, and its copy in Kafka would open while that key exists, after the
/// stored message's ack or expiry. `out` is [`assign`]'s, in the order of `batch.messages`.
fn skipped_keys(batch: &ShardBatch<'_>, out: &[Stored]) -> BTreeSet<BodyKeyId> {
    let key_of = |m: &Message| m.sealed.as_deref().and_then(BodyKeyId::of);
    let kept: HashMap<SendKey<'_>, Option<BodyKeyId>> = batch
        .messages
        .iter()
        .zip(out)
        .map(|(m, s)| (SendKey::of(m), key_of(&s.message)))
        .collect();
    batch
        .messages
        .iter()
        .chain(&batch.repeats)
        .filter_map(|m| {
            let key = key_of(m)?;
            (kept.get(&SendKey::of(m)) != Some(&Some(key))).then_some(key)
        })
        .collect()
}

/// Second pass: creates and locks the counters of every conversation in the batch, in key
/// order (no deadlock between two writers of overlapping batches), then reads which messages
/// are already stored. The server runs the statements in this order, so the read sees every
/// write of another writer that held these locks before us. The counters move once the new
/// messages are known ([`insert`]).
async fn lock_and_find_stored<'a>(
    tx: &Transaction<'_>,
    statements: &Statements,
    batch: &ShardBatch<'a>,
) -> Result<(Counters<'a>, Vec<Stored>), DbError> {
    let shard = batch.shard;
    let (mut conversations, mut senders, mut client_ids) = (vec![], vec![], vec![]);
    for m in &batch.messages {
        conversations.push(m.conversation.as_str());
        senders.push(m.sender.as_str());
        client_ids.push(m.client_id.as_str());
    }
    let by_conversation: [&(dyn ToSql + Sync); 1] = [&batch.conversations];
    let by_key: [&(dyn ToSql + Sync); 3] = [&conversations, &senders, &client_ids];
    let (locked, found) = futures_util::try_join!(
        tx.query(&statements.lock_counters, &by_conversation),
        tx.query(&statements.find_stored, &by_key),
    )
    .map_err(DbError::pg(shard))?;
    let counters = locked
        .iter()
        .filter_map(|row| Some((batch.conversation(row.get(0))?, row.get(1))))
        .collect();
    let stored = found
        .iter()
        .map(|row| {
            Ok(Stored {
                message: MessageRow::decode(row, shard)?,
                created: false,
                acked: row.get(MessageRow::EXTRA),
            })
        })
        .collect::<Result<_, DbError>>()?;
    Ok((counters, stored))
}

/// The outcome of [`assign`]: every message's stored form, in batch order, the rows to insert,
/// and the counters after them.
struct Plan<'a> {
    out: Vec<Stored>,
    rows: NewRows<'a>,
    counters: Counters<'a>,
}

/// The columns of the messages to insert, one array each (the insert unnests them).
#[derive(Default)]
struct NewRows<'a> {
    conversation: Vec<&'a str>,
    seq: Vec<i64>,
    message_id: Vec<Uuid>,
    client_id: Vec<&'a str>,
    sender: Vec<&'a str>,
    recipient: Vec<&'a str>,
    /// NULL while sealed.
    body: Vec<Option<&'a str>>,
    sent_at_ms: Vec<i64>,
    sealed: Vec<Option<&'a [u8]>>,
}

impl<'a> NewRows<'a> {
    fn push(&mut self, m: &'a Message, seq: i64) {
        self.conversation.push(m.conversation.as_str());
        self.seq.push(seq);
        self.message_id.push(m.id);
        self.client_id.push(m.client_id.as_str());
        self.sender.push(m.sender.as_str());
        self.recipient.push(m.recipient.as_str());
        self.body
            .push(m.sealed.is_none().then_some(m.body.as_str()));
        self.sent_at_ms.push(m.sent_at_ms);
        self.sealed.push(m.sealed.as_deref());
    }

    fn len(&self) -> usize {
        self.seq.len()
    }

    fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    /// Each direction (conversation, recipient, sender) that receives a message, distinct and
    /// sorted, so concurrent writers insert their watermarks in one order.
    fn directions(&self) -> [Vec<&'a str>; 3] {
        let distinct: BTreeSet<(&str, &str, &str)> = (0..self.len())
            .map(|i| (self.conversation[i], self.recipient[i], self.sender[i]))
            .collect();
        let mut columns: [Vec<&str>; 3] = Default::default();
        for (conversation, recipient, sender) in distinct {
            columns[0].push(conversation);
            columns[1].push(recipient);
            columns[2].push(sender);
        }
        columns
    }
}

/// Gives each new message of the batch the next seq of its conversation, in batch order, and
/// returns the messages found already stored as they are.
fn assign<'a>(
    batch: &ShardBatch<'a>,
    mut counters: Counters<'a>,
    stored: Vec<Stored>,
) -> Result<Plan<'a>, DbError> {
    let mut stored: HashMap<(ConversationKey, UserId, ClientMessageId), Stored> = stored
        .into_iter()
        .map(|s| {
            let m = &s.message;
            let key = (
                m.conversation.clone(),
                m.sender.clone(),
                m.client_id.clone(),
            );
            (key, s)
        })
        .collect();
    let mut out = Vec::with_capacity(batch.messages.len());
    let mut rows = NewRows::default();
    for &m in &batch.messages {
        if !stored.is_empty() {
            let key = (
                m.conversation.clone(),
                m.sender.clone(),
                m.client_id.clone(),
            );
            if let Some(s) = stored.remove(&key) {
                out.push(s);
                continue;
            }
        }
        let seq = counters
            .get_mut(m.conversation.as_str())
            .ok_or_else(|| DbError::Invariant {
                shard: batch.shard,
                reason: format!("no counter for {}", m.conversation),
            })?;
        *seq += 1;
        rows.push(m, *seq);
        let mut message = m.clone();
        message.seq = *seq as u64;
        out.push(Stored {
            message,
            created: true,
            acked: false,
        });
    }
    Ok(Plan {
        out,
        rows,
        counters,
    })
}

/// Inserts the new messages and their directions' watermarks and moves the counters, in one
/// round trip. Returns how many messages the insert wrote.
async fn insert(
    tx: &Transaction<'_>,
    statements: &Statements,
    plan: &Plan<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let r = &plan.rows;
    let messages: [&(dyn ToSql + Sync); 9] = [
        &r.conversation,
        &r.seq,
        &r.message_id,
        &r.client_id,
        &r.sender,
        &r.recipient,
        &r.body,
        &r.sent_at_ms,
        &r.sealed,
    ];
    let [conversation, recipient, sender] = r.directions();
    let watermarks: [&(dyn ToSql + Sync); 3] = [&conversation, &recipient, &sender];
    let (conversations, seqs): (Vec<&str>, Vec<i64>) =
        plan.counters.iter().map(|(c, s)| (*c, *s)).unzip();
    let counters: [&(dyn ToSql + Sync); 2] = [&conversations, &seqs];
    let (inserted, _, _) = futures_util::try_join!(
        tx.execute(&statements.insert_messages, &messages),
        tx.execute(&statements.insert_watermarks, &watermarks),
        tx.execute(&statements.move_counters, &counters),
    )?;
    Ok(inserted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(from: &str, to: &str, cid: &str) -> Message {
        let sender = UserId::parse(from).expect("valid id");
        let recipient = UserId::parse(to).expect("valid id");
        let client_id = ClientMessageId::parse(cid).expect("valid id");
        Message {
            sealed: None,
            id: chat_common::ids::message_id(&sender, &recipient, &client_id),
            conversation: ConversationKey::of(&sender, &recipient).expect("two users"),
            client_id,
            sender,
            recipient,
            body: "hi".into(),
            sent_at_ms: 1,
            seq: 0,
        }
    }

    /// `m` sealed under a new key of its own, and that key's id.
    fn sealed(mut m: Message) -> (Message, BodyKeyId) {
        let key = chat_common::seal::BodyKey::generate().expect("key");
        let id = BodyKeyId::generate().expect("key id");
        m.sealed = Some(key.seal(&id, &m.id, "hi").expect("seal"));
        (m, id)
    }

    #[test]
    fn a_batch_plans_only_the_key_check_its_bodies_need() {
        let plain = message("alice", "bob", "1");
        let (by_id, _) = sealed(message("alice", "bob", "2"));
        let mut older = message("alice", "bob", "3");
        older.sealed = Some(b"sealed before ids".to_vec());
        assert_eq!(Sealed::of(&[&plain, &plain]), Sealed::None);
        assert_eq!(Sealed::of(&[&plain, &by_id]), Sealed::ById);
        assert_eq!(Sealed::of(&[&by_id, &older, &plain]), Sealed::Any);
        for statements in [sql::STORE_NEW, sql::INSERT_MESSAGES] {
            let [none, by_id, any] = statements;
            assert!(!none.contains("_keys"), "{none}");
            assert!(by_id.contains("sealing_keys") && !by_id.contains("body_keys"));
            assert!(any.contains("sealing_keys") && any.contains("body_keys"));
        }
    }

    #[test]
    fn the_keys_of_skipped_copies_go_and_the_stored_ones_stay() {
        let (first, k1) = sealed(message("alice", "bob", "1"));
        let (retry_in_batch, k2) = sealed(message("alice", "bob", "1"));
        let (stored_before, k3) = sealed(message("carol", "dave", "7"));
        let (new_one, _) = sealed(message("bob", "alice", "2"));
        let replayed = first.clone(); // the same record again: the same key
        let mut older = message("erin", "fay", "3"); // version 1: no key id, nothing to do
        older.sealed = Some(
            chat_common::seal::BodyKey::generate()
                .expect("key")
                .seal_v1(&older.id, "hi")
                .expect("seal"),
        );
        let batch = [
            first.clone(),
            stored_before.clone(),
            retry_in_batch,
            new_one.clone(),
            replayed,
            older.clone(),
        ];
        let shard = ShardBatch::new(0, batch.iter().enumerate().collect());
        assert_eq!(shard.repeats.len(), 2);
        // carol -> dave "7" was stored before, sealed under another key (k0); the others are
        // new.
        let (mut kept, _k0) = sealed(message("carol", "dave", "7"));
        kept.seq = 4;
        let out: Vec<Stored> = [first, kept, new_one, older]
            .into_iter()
            .map(|message| Stored {
                created: message.seq == 0,
                message,
                acked: false,
            })
            .collect();
        assert_eq!(
            skipped_keys(&shard, &out),
            BTreeSet::from([k2, k3]),
            "the retry's key and the copy found stored; never k1, the stored message's"
        );
        // A stored row without its sealed body (its key gone): every copy's key goes.
        let mut gone = out.clone();
        gone[0].message.sealed = None;
        gone[0].created = false;
        assert_eq!(skipped_keys(&shard, &gone), BTreeSet::from([k1, k2, k3]));
    }

    #[test]
    fn seqs_are_dense_per_conversation_in_batch_order_and_stored_ones_are_kept() {
        let batch = [
            message("alice", "bob", "1"),
            message("carol", "dave", "1"),
            message("bob", "alice", "1"),
            message("alice", "bob", "1"), // repeated in the batch: counted once
            message("alice", "bob", "2"),
        ];
        let shard = ShardBatch::new(3, batch.iter().enumerate().collect());
        assert_eq!(shard.positions, vec![0, 1, 2, 4]);
        assert_eq!(shard.conversations, vec!["alice:bob", "carol:dave"]);
        // bob -> alice "1" is already stored with seq 7.
        let mut found = batch[2].clone();
        found.seq = 7;
        let stored = vec![Stored {
            message: found.clone(),
            created: false,
            acked: true,
        }];
        let counters = HashMap::from([("alice:bob", 7), ("carol:dave", 0)]);
        let plan = assign(&shard, counters, stored).expect("assigned");
        let seqs: Vec<(u64, bool)> = plan
            .out
            .iter()
            .map(|s| (s.message.seq, s.created))
            .collect();
        assert_eq!(seqs, vec![(8, true), (1, true), (7, false), (9, true)]);
        assert_eq!(plan.rows.seq, vec![8, 1, 9]);
        assert_eq!(plan.counters["alice:bob"], 9);
        assert_eq!(
            plan.rows.directions(),
            [
                vec!["alice:bob", "carol:dave"],
                vec!["bob", "dave"],
                vec!["alice", "carol"]
            ]
        );
        // The first attempt: the conversation's last message of the batch at 0, the ones
        // before it below, so that adding the counter after the batch gives the same seqs.
        let (counts, rows) = relative_rows(&shard);
        assert_eq!(counts, HashMap::from([("alice:bob", 3), ("carol:dave", 1)]));
        assert_eq!(rows.seq, vec![-2, 0, -1, 0]);
        assert_eq!(
            rows.conversation,
            vec!["alice:bob", "carol:dave", "alice:bob", "alice:bob"]
        );
        let after = HashMap::from([("alice:bob", 10), ("carol:dave", 1)]);
        let before = counts.iter().map(|(c, n)| (*c, after[c] - n)).collect();
        let seqs: Vec<u64> = assign(&shard, before, vec![])
            .expect("assigned")
            .out
            .iter()
            .map(|s| s.message.seq)
            .collect();
        let added: Vec<u64> = (0..rows.len())
            .map(|i| (after[rows.conversation[i]] + rows.seq[i]) as u64)
            .collect();
        assert_eq!(seqs, added);
        assert_eq!(seqs, vec![8, 1, 9, 10]);
        // A conversation without a counter is a broken invariant, not the data's fault.
        let e = assign(&shard, HashMap::new(), vec![])
            .err()
            .expect("refused");
        assert!(matches!(e, DbError::Invariant { shard: 3, .. }));
    }
}
