//! The per-user conversation index: for each user, each conversation they take part in, kept in
//! the user's home shard ([`Locator::home_of`](crate::Locator::home_of)).
//!
//! The store is laid out by conversation (key, partition, shard, seq); what a user does across
//! conversations (connect, list their conversations) would otherwise read every shard and every
//! conversation in it. The index answers it from one shard: which conversations hold something
//! pending for the user, the receipts of their own messages, their failed sends, the list.
//!
//! **Writes** ([`Shards::update_index`]) come from the multiplexer (and a replay), once per
//! batch, after the batch's messages and acks are committed (beside the batch's first routing,
//! and before the presence read that decides its second; see the multiplexer's pipeline).
//! Every column only moves forward (the greatest value seen wins; the receipt time goes with the
//! greatest peer watermark), so a write repeated by a replay, a retry or a zombie writer changes
//! nothing, and writes applied in any order end in the same row.
//!
//! **The invariant** the sync relies on: when the multiplexer reads the presence log's end to
//! route a batch a second time (to the sessions announced since its first routing), the index
//! row of each of its messages' recipients has `last_in_seq` at or above the message's seq. A
//! session announced after that read runs its sync after the index moved, and finds the
//! message. It holds because the index write of a batch completes before that read and before
//! the batch's offsets are stored: a crash in between replays the batch, and the replay writes
//! the index again. [`Shards::check_index`] verifies it.
//!
//! **Reads**: [`Shards::sync_read`] (what a connect sends) and [`Shards::conversations`] (the
//! list) read the index first, then only the shards of the conversations that hold something.
//!
//! **Building it**: a shard created empty starts with its index built; one that held messages
//! before the index existed waits for [`Shards::rebuild_index`] (`db-writer rebuild-index`), and
//! until every shard says built, syncs read every shard the way they did before the index.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use chat_common::ids::{ConversationKey, UserId};
use chat_common::message::{Message, Receipt};
use futures_util::future::{join_all, try_join_all};

use crate::acks::Watermark;
use crate::error::DbError;
use crate::failures::FailedMessage;
use crate::messages::Stored;
use crate::rows::{bigint, message_columns, MessageRow};
use crate::shards::{QueryCount, Shards};

/// One user's row of one conversation, as a write moves it: every field is the greatest value
/// this write knows (0 or `None` for what it does not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct IndexRow {
    peer: String,
    last_seq: i64,
    last_activity_ms: i64,
    last_in_seq: i64,
    read_up_to: i64,
    peer_read_up_to: i64,
    peer_read_at_ms: Option<i64>,
    failed_at_ms: Option<i64>,
}

impl IndexRow {
    /// Takes the greater of each column (the receipt time with the greater peer watermark): the
    /// same merge the upsert does, so merging first changes nothing but the row count.
    fn merge(&mut self, other: &IndexRow) {
        self.last_seq = self.last_seq.max(other.last_seq);
        self.last_activity_ms = self.last_activity_ms.max(other.last_activity_ms);
        self.last_in_seq = self.last_in_seq.max(other.last_in_seq);
        self.read_up_to = self.read_up_to.max(other.read_up_to);
        if other.peer_read_up_to > self.peer_read_up_to {
            self.peer_read_up_to = other.peer_read_up_to;
            self.peer_read_at_ms = other.peer_read_at_ms;
        }
        self.failed_at_ms = self.failed_at_ms.max(other.failed_at_ms);
    }
}

/// What a batch changes in the index: rows by (user, conversation), merged as they are added.
#[derive(Debug, Default)]
pub struct IndexUpdates {
    rows: BTreeMap<(UserId, ConversationKey), IndexRow>,
}

impl IndexUpdates {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows written (after merging).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The conversations with a row of a user that `user` selects.
    pub fn conversations_of(&self, user: impl Fn(&UserId) -> bool) -> BTreeSet<ConversationKey> {
        self.rows
            .keys()
            .filter(|(u, _)| user(u))
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Keeps only the rows of the conversations `keep` selects.
    pub fn retain_conversations(&mut self, keep: impl Fn(&ConversationKey) -> bool) {
        self.rows.retain(|(_, c), _| keep(c));
    }

    fn add(&mut self, user: &UserId, conversation: &ConversationKey, row: IndexRow) {
        self.rows
            .entry((user.clone(), conversation.clone()))
            .and_modify(|r| r.merge(&row))
            .or_insert(row);
    }

    /// A stored message: the conversation moves on for both users, and the recipient has it
    /// to read. Messages the write did not create (a replay) are added too: the index may have
    /// missed them if the batch that created them crashed before its index write.
    pub fn message(&mut self, m: &Message) {
        let moved = |peer: &UserId, last_in_seq| IndexRow {
            peer: peer.as_str().to_owned(),
            last_seq: bigint(m.seq),
            last_activity_ms: m.sent_at_ms,
            last_in_seq,
            ..IndexRow::default()
        };
        self.add(&m.sender, &m.conversation, moved(&m.recipient, 0));
        self.add(
            &m.recipient,
            &m.conversation,
            moved(&m.sender, bigint(m.seq)),
        );
    }

    pub fn stored(&mut self, stored: &[Stored]) {
        for s in stored {
            self.message(&s.message);
        }
    }

    /// A direction's ack watermark: the reader's own, and the writer's receipt.
    pub fn watermark(&mut self, w: &Watermark) {
        if w.up_to_seq == 0 {
            return;
        }
        let up_to = bigint(w.up_to_seq);
        self.add(
            &w.reader,
            &w.conversation,
            IndexRow {
                peer: w.writer.as_str().to_owned(),
                read_up_to: up_to,
                ..IndexRow::default()
            },
        );
        self.add(
            &w.writer,
            &w.conversation,
            IndexRow {
                peer: w.reader.as_str().to_owned(),
                peer_read_up_to: up_to,
                peer_read_at_ms: w.acked_at_ms,
                ..IndexRow::default()
            },
        );
    }

    /// A message set aside: its sender's next sync looks for the failure in its shard.
    pub fn failure(&mut self, f: &FailedMessage) {
        self.add(
            &f.sender,
            &f.conversation,
            IndexRow {
                peer: f.recipient.as_str().to_owned(),
                failed_at_ms: Some(f.failed_at_ms),
                ..IndexRow::default()
            },
        );
    }
}

/// A direction of a conversation as the shards hold it (for a rebuild).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirectionState {
    pub(crate) last_seq: u64,
    pub(crate) last_activity_ms: i64,
    /// The last seq sent that way.
    pub(crate) last_in_seq: u64,
    pub(crate) up_to_seq: u64,
    pub(crate) acked_at_ms: Option<i64>,
}

impl IndexUpdates {
    /// A direction (`writer` to `reader`) of a conversation as its shard holds it: both users'
    /// rows as the messages and the watermark would have made them.
    pub(crate) fn direction(
        &mut self,
        conversation: &ConversationKey,
        reader: &UserId,
        writer: &UserId,
        d: DirectionState,
    ) {
        let common = |peer: &UserId| IndexRow {
            peer: peer.as_str().to_owned(),
            last_seq: bigint(d.last_seq),
            last_activity_ms: d.last_activity_ms,
            ..IndexRow::default()
        };
        let up_to = bigint(d.up_to_seq);
        self.add(
            reader,
            conversation,
            IndexRow {
                last_in_seq: bigint(d.last_in_seq),
                read_up_to: up_to,
                ..common(writer)
            },
        );
        self.add(
            writer,
            conversation,
            IndexRow {
                peer_read_up_to: up_to,
                peer_read_at_ms: d.acked_at_ms.filter(|_| up_to > 0),
                ..common(reader)
            },
        );
    }

    /// The latest failure of `sender`'s messages to `recipient` (for a rebuild).
    pub(crate) fn failed_at(
        &mut self,
        sender: &UserId,
        conversation: &ConversationKey,
        recipient: &UserId,
        at_ms: i64,
    ) {
        self.add(
            sender,
            conversation,
            IndexRow {
                peer: recipient.as_str().to_owned(),
                failed_at_ms: Some(at_ms),
                ..IndexRow::default()
            },
        );
    }
}

/// What [`Shards::index_rows`] reads of a row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexedRow {
    pub(crate) last_in_seq: u64,
    pub(crate) read_up_to: u64,
}

/// Rows of the index by key.
const ROWS: &str = "SELECT u.user_id, u.conversation, u.last_in_seq, u.read_up_to
     FROM unnest($1::text[], $2::text[]) AS h(user_id, conversation)
     JOIN user_conversations u ON u.user_id = h.user_id AND u.conversation = h.conversation";

impl Shards {
    /// The index rows of these (user, conversation) keys that exist.
    pub(crate) async fn index_rows(
        &self,
        keys: &[(&UserId, &ConversationKey)],
    ) -> Result<HashMap<(UserId, ConversationKey), IndexedRow>, DbError> {
        let mut per_shard: BTreeMap<usize, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
        for (user, conversation) in keys {
            let e = per_shard.entry(self.locator().home_of(user)).or_default();
            e.0.push(user.as_str());
            e.1.push(conversation.as_str());
        }
        let mut found = HashMap::new();
        for (shard, (users, conversations)) in per_shard {
            let rows = self
                .client(shard)
                .await?
                .query(ROWS, &[&users, &conversations])
                .await
                .map_err(DbError::pg(shard))?;
            for row in &rows {
                let bad = |reason: String| DbError::BadRow { shard, reason };
                let seq =
                    |i: usize| u64::try_from(row.get::<_, i64>(i)).map_err(|e| bad(format!("{e}")));
                found.insert(
                    (
                        UserId::parse(row.get(0)).map_err(|e| bad(format!("user: {e}")))?,
                        ConversationKey::parse(row.get(1))
                            .map_err(|e| bad(format!("conversation: {e}")))?,
                    ),
                    IndexedRow {
                        last_in_seq: seq(2)?,
                        read_up_to: seq(3)?,
                    },
                );
            }
        }
        Ok(found)
    }
}

/// The index upsert: each column moves only forward, and a row that would not change is not
/// written (a replay costs no new row versions). Rows go in key order, so two writers of the
/// same rows (a zombie) lock them in the same order.
const UPSERT: &str = "INSERT INTO user_conversations AS u
         (user_id, conversation, peer, last_seq, last_activity_ms, last_in_seq, read_up_to,
          peer_read_up_to, peer_read_at_ms, failed_at_ms)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                          $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
     ORDER BY 1, 2
     ON CONFLICT (user_id, conversation) DO UPDATE SET
         last_seq = greatest(u.last_seq, excluded.last_seq),
         last_activity_ms = greatest(u.last_activity_ms, excluded.last_activity_ms),
         last_in_seq = greatest(u.last_in_seq, excluded.last_in_seq),
         read_up_to = greatest(u.read_up_to, excluded.read_up_to),
         peer_read_up_to = greatest(u.peer_read_up_to, excluded.peer_read_up_to),
         peer_read_at_ms = CASE WHEN excluded.peer_read_up_to > u.peer_read_up_to
                                THEN excluded.peer_read_at_ms ELSE u.peer_read_at_ms END,
         failed_at_ms = greatest(u.failed_at_ms, excluded.failed_at_ms)
     WHERE excluded.last_seq > u.last_seq
        OR excluded.last_activity_ms > u.last_activity_ms
        OR excluded.last_in_seq > u.last_in_seq
        OR excluded.read_up_to > u.read_up_to
        OR excluded.peer_read_up_to > u.peer_read_up_to
        OR excluded.failed_at_ms > coalesce(u.failed_at_ms, 0)";

impl Shards {
    /// Writes a batch's index rows: one statement per home shard, all shards at once.
    /// Idempotent, and commutative with any other write of the same rows.
    pub async fn update_index(&self, updates: &IndexUpdates) -> Result<(), DbError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut per_shard: BTreeMap<usize, Vec<(&UserId, &ConversationKey, &IndexRow)>> =
            BTreeMap::new();
        for ((user, conversation), row) in &updates.rows {
            per_shard
                .entry(self.locator().home_of(user))
                .or_default()
                .push((user, conversation, row));
        }
        try_join_all(per_shard.into_iter().map(|(shard, rows)| async move {
            // With its generic plan (`Shards::generic_client`): one probe by key per row
            // whatever the arrays hold, and planning it per execution took 12-16% of its time
            // (performance log, 2026-12-04).
            let client = self.generic_client(shard).await?;
            let mut c = UpsertColumns::default();
            for (user, conversation, row) in rows {
                c.push(user, conversation, row);
            }
            let statement = client
                .prepare_cached(UPSERT)
                .await
                .map_err(DbError::pg(shard))?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
                &c.user,
                &c.conversation,
                &c.peer,
                &c.last_seq,
                &c.last_activity_ms,
                &c.last_in_seq,
                &c.read_up_to,
                &c.peer_read_up_to,
                &c.peer_read_at_ms,
                &c.failed_at_ms,
            ];
            client
                .execute(&statement, &params)
                .await
                .map_err(DbError::pg(shard))?;
            Ok::<_, DbError>(())
        }))
        .await?;
        Ok(())
    }
}

/// The upsert's parameters, one array per column.
#[derive(Default)]
struct UpsertColumns<'a> {
    user: Vec<&'a str>,
    conversation: Vec<&'a str>,
    peer: Vec<&'a str>,
    last_seq: Vec<i64>,
    last_activity_ms: Vec<i64>,
    last_in_seq: Vec<i64>,
    read_up_to: Vec<i64>,
    peer_read_up_to: Vec<i64>,
    peer_read_at_ms: Vec<Option<i64>>,
    failed_at_ms: Vec<Option<i64>>,
}

impl<'a> UpsertColumns<'a> {
    fn push(&mut self, user: &'a UserId, conversation: &'a ConversationKey, row: &'a IndexRow) {
        self.user.push(user.as_str());
        self.conversation.push(conversation.as_str());
        self.peer.push(&row.peer);
        self.last_seq.push(row.last_seq);
        self.last_activity_ms.push(row.last_activity_ms);
        self.last_in_seq.push(row.last_in_seq);
        self.read_up_to.push(row.read_up_to);
        self.peer_read_up_to.push(row.peer_read_up_to);
        self.peer_read_at_ms.push(row.peer_read_at_ms);
        self.failed_at_ms.push(row.failed_at_ms);
    }
}

// ---------------------------------------------------------------------------------------------
// The sync read.

/// A user's rows that a connect needs: something pending, or a receipt or a failure after $2.
const SYNC_ROWS: &str = "SELECT conversation, peer, last_in_seq, peer_read_up_to,
            peer_read_at_ms, failed_at_ms, read_up_to
     FROM user_conversations
     WHERE user_id = $1
       AND (last_in_seq > read_up_to OR peer_read_at_ms > $2 OR failed_at_ms > $2)";

/// What a user has not acknowledged in the conversations given ($2), above the direction's
/// watermark and what the client holds ($3). At most $4 per conversation and $4 in all.
const PENDING_IN: &str = concat!(
    "SELECT ",
    message_columns!(),
    "
     FROM unnest($2::text[], $3::bigint[]) AS h(conversation, held)
     JOIN acks k ON k.conversation = h.conversation AND k.recipient = $1
     CROSS JOIN LATERAL (
         SELECT * FROM messages m
         WHERE m.conversation = k.conversation AND m.recipient = k.recipient
           AND m.expired_at_ms IS NULL
           AND m.seq > greatest(k.up_to_seq, h.held)
         ORDER BY m.seq
         LIMIT $4) m
     ORDER BY m.conversation, m.seq
     LIMIT $4"
);

/// What a connect sends: the messages pending for the user after what the client holds, the
/// receipts of their own messages and their failed sends after a time.
#[derive(Debug, Default)]
pub struct SyncRead {
    /// Ordered by conversation, then seq.
    pub messages: Vec<Message>,
    /// Newest first.
    pub receipts: Vec<Receipt>,
    /// Newest first.
    pub failures: Vec<FailedMessage>,
    /// Conversations with something for this sync (pending messages or a failure) on a shard
    /// that did not answer: nothing of theirs is in this read, the rest is. Sorted, distinct.
    /// The client syncs again later for them.
    pub unavailable: Vec<ConversationKey>,
    /// Shard queries this read cost (the index's, then one per shard that held something).
    pub shard_queries: usize,
}

/// How long a "not built" answer of [`Shards::index_built`] holds before the shards are asked
/// again.
const INDEX_STATE_RECHECK_MS: i64 = 10_000;

impl Shards {
    /// Whether every shard's index is built (cached once true; rechecked every 10 s until then).
    /// A shard that cannot say (not migrated yet, or down) counts as not built.
    pub async fn index_built(&self) -> bool {
        let state = &self.index_state;
        if state.built.load(Ordering::Relaxed) {
            return true;
        }
        let now = chat_common::now_ms();
        let last = state.checked_at_ms.load(Ordering::Relaxed);
        if last != 0 && now - last < INDEX_STATE_RECHECK_MS {
            return false;
        }
        let answers = self
            .on_every_shard(|shard, client| async move {
                let row = client
                    .query_opt("SELECT built FROM index_state", &[])
                    .await
                    .map_err(DbError::pg(shard))?;
                Ok(vec![row.is_some_and(|r| r.get::<_, bool>(0))])
            })
            .await;
        // A shard not migrated yet (no `index_state`) or not answering: not built, for now.
        let built = match answers {
            Ok(answers) => answers.into_iter().all(|b| b),
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell whether the user index is built; reading every shard");
                false
            }
        };
        state.checked_at_ms.store(now, Ordering::Relaxed);
        state.built.store(built, Ordering::Relaxed);
        built
    }

    /// What a connect of `user` sends: every message not yet acknowledged after what the client
    /// holds (`held[conversation]` = last seq it has; at most `limit`), and the receipts and
    /// failures of the user's own messages after `since_ms` (at most `notices_limit` each).
    ///
    /// Reads the user's index (one query on their home shard), then only the shards of the
    /// conversations that hold something: a user with nothing pending costs one query whatever
    /// the number of shards and conversations. Until the index is built, reads every shard.
    ///
    /// One shard down does not fail the whole read: the conversations it holds come back in
    /// [`SyncRead::unavailable`] and the rest is read. The home shard down fails it (the index
    /// says what to read), as does any error other than an unavailable shard.
    pub async fn sync_read(
        &self,
        user: &UserId,
        held: &HashMap<ConversationKey, u64>,
        since_ms: i64,
        limit: u32,
        notices_limit: u32,
    ) -> Result<SyncRead, DbError> {
        if !self.index_built().await {
            return self
                .sync_read_every_shard(user, held, since_ms, limit, notices_limit)
                .await;
        }
        let queries = QueryCount::default();
        let home = self.locator().home_of(user);
        let rows = {
            let client = self.client(home).await?;
            queries.one();
            let statement = client
                .prepare_cached(SYNC_ROWS)
                .await
                .map_err(DbError::pg(home))?;
            client
                .query(&statement, &[&user.as_str(), &since_ms])
                .await
                .map_err(DbError::pg(home))?
        };
        let mut pending: Vec<(ConversationKey, u64)> = Vec::new();
        let mut failed: Vec<ConversationKey> = Vec::new();
        let mut receipts = Vec::new();
        for row in &rows {
            let entry = SyncRow::decode(row, home)?;
            let held_here = held.get(&entry.conversation).copied().unwrap_or(0);
            if entry.last_in_seq > held_here && entry.pending {
                pending.push((entry.conversation.clone(), held_here));
            }
            if entry.failed_at_ms.is_some_and(|at| at > since_ms) {
                failed.push(entry.conversation.clone());
            }
            if let Some(at) = entry.peer_read_at_ms.filter(|at| *at > since_ms) {
                receipts.push(Receipt {
                    conversation: entry.conversation,
                    peer: entry.peer,
                    up_to_seq: entry.peer_read_up_to,
                    acked_at_ms: at,
                });
            }
        }
        receipts.sort_by_key(|r| std::cmp::Reverse(r.acked_at_ms));
        receipts.truncate(notices_limit as usize);
        let (pending, failures) = futures_util::join!(
            self.pending_in(user, pending, limit, &queries),
            self.failures_per_shard(user, failed, since_ms, notices_limit, &queries),
        );
        let (messages, mut unavailable) = pending?;
        let (failures, failures_unavailable) = failures?;
        unavailable.extend(failures_unavailable);
        unavailable.sort();
        unavailable.dedup();
        Ok(SyncRead {
            messages,
            receipts,
            failures,
            unavailable,
            shard_queries: queries.get(),
        })
    }

    /// The pending messages of `conversations` (each with what the client holds), one query per
    /// shard among them; and the conversations of the shards that did not answer.
    async fn pending_in(
        &self,
        user: &UserId,
        conversations: Vec<(ConversationKey, u64)>,
        limit: u32,
        queries: &QueryCount,
    ) -> Result<(Vec<Message>, Vec<ConversationKey>), DbError> {
        let per_shard = self.group_by_shard(conversations, |(c, _)| c);
        let limit = i64::from(limit);
        let per_shard = join_all(per_shard.into_iter().map(|(shard, convs)| async move {
            let keys: Vec<ConversationKey> = convs.iter().map(|(c, _)| c.clone()).collect();
            let (names, held): (Vec<&str>, Vec<i64>) =
                convs.iter().map(|(c, h)| (c.as_str(), bigint(*h))).unzip();
            let read = async {
                let client = self.client(shard).await?;
                queries.one();
                let statement = client
                    .prepare_cached(PENDING_IN)
                    .await
                    .map_err(DbError::pg(shard))?;
                let rows = client
                    .query(&statement, &[&user.as_str(), &names, &held, &limit])
                    .await
                    .map_err(DbError::pg(shard))?;
                rows.iter()
                    .map(|row| MessageRow::decode(row, shard))
                    .collect::<Result<Vec<_>, _>>()
            };
            (read.await, keys)
        }))
        .await;
        let (mut all, unavailable) = partial(per_shard, "pending messages")?;
        all.sort_by(|a, b| (&a.conversation, a.seq).cmp(&(&b.conversation, b.seq)));
        all.truncate(limit as usize);
        Ok((all, unavailable))
    }

    /// The failures of `conversations` since `since_ms`, one query per shard among them (at
    /// most `limit`, newest first); and the conversations of the shards that did not answer.
    async fn failures_per_shard(
        &self,
        user: &UserId,
        conversations: Vec<ConversationKey>,
        since_ms: i64,
        limit: u32,
        queries: &QueryCount,
    ) -> Result<(Vec<FailedMessage>, Vec<ConversationKey>), DbError> {
        let per_shard = self.group_by_shard(conversations, |c| c);
        let per_shard = join_all(per_shard.into_values().map(|convs| async move {
            let read = self
                .failures_in(user, convs.clone(), since_ms, limit, queries)
                .await;
            (read, convs)
        }))
        .await;
        let (mut all, unavailable) = partial(per_shard, "failures")?;
        all.sort_by_key(|f| std::cmp::Reverse(f.failed_at_ms));
        all.truncate(limit as usize);
        Ok((all, unavailable))
    }

    /// The sync of the time before the index: every shard, every conversation. Also the
    /// reference the index is tested against.
    pub async fn sync_read_every_shard(
        &self,
        user: &UserId,
        held: &HashMap<ConversationKey, u64>,
        since_ms: i64,
        limit: u32,
        notices_limit: u32,
    ) -> Result<SyncRead, DbError> {
        let (messages, receipts, failures) = futures_util::try_join!(
            self.pending(user, held, limit),
            self.receipts_since(user, since_ms, notices_limit),
            self.failures_since(user, since_ms, notices_limit),
        )?;
        Ok(SyncRead {
            messages,
            receipts,
            failures,
            unavailable: Vec::new(),
            shard_queries: 3 * self.len(),
        })
    }
}

/// What one shard answered a read spread over shards, with the conversations it was for.
type ShardAnswer<T> = (Result<Vec<T>, DbError>, Vec<ConversationKey>);

/// Gathers the answers of a read spread over shards (each with the conversations it was
/// for): what the shards that answered returned, and the conversations of those that were
/// unavailable. Any other error fails the read: it is not the shard's absence, and retrying
/// does not cure it.
fn partial<T>(
    per_shard: Vec<ShardAnswer<T>>,
    what: &str,
) -> Result<(Vec<T>, Vec<ConversationKey>), DbError> {
    let mut read = Vec::new();
    let mut unavailable = Vec::new();
    for (answer, conversations) in per_shard {
        match answer {
            Ok(rows) => read.extend(rows),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, conversations = conversations.len(), "{what} of a shard that does not answer left out");
                unavailable.extend(conversations);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((read, unavailable))
}

/// A row of [`SYNC_ROWS`].
struct SyncRow {
    conversation: ConversationKey,
    peer: UserId,
    last_in_seq: u64,
    /// Something above the user's watermark (the query's own test, kept per row).
    pending: bool,
    peer_read_up_to: u64,
    peer_read_at_ms: Option<i64>,
    failed_at_ms: Option<i64>,
}

/// A user's index row as the listing reads it, with the details read from the conversation's
/// shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conversation: ConversationKey,
    pub peer: UserId,
    pub last_seq: u64,
    pub last_activity_ms: i64,
    /// Messages to the user above their watermark (not expired).
    pub unread: u64,
    /// The user's ack watermark.
    pub read_up_to: u64,
    /// The peer's watermark of the user's messages.
    pub peer_read_up_to: u64,
    /// The last message, when asked for and its body is still there.
    pub preview: Option<Preview>,
    /// The conversation's shard did not answer: `unread` is the index's estimate (1 while
    /// something may be unread, 0 otherwise) and there is no preview.
    pub details_unavailable: bool,
}

/// The last message of a conversation, as the list shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preview {
    pub sender: UserId,
    pub seq: u64,
    /// At most [`PREVIEW_CHARS`] characters of the body.
    pub body: String,
}

/// Most characters of a body a preview carries.
pub const PREVIEW_CHARS: i32 = 200;

/// Where a page of the list starts: after the conversation with this last activity and key
/// (the previous page's last).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListCursor {
    pub last_activity_ms: i64,
    pub conversation: ConversationKey,
}

/// A page of a user's conversations, newest activity first.
const LIST: &str = "SELECT conversation, peer, last_seq, last_activity_ms, read_up_to,
            peer_read_up_to, last_in_seq
     FROM user_conversations
     WHERE user_id = $1 AND last_seq > 0
       AND (last_activity_ms, conversation) < ($2, $3)
     ORDER BY last_activity_ms DESC, conversation DESC
     LIMIT $4";

/// The details of a page's conversations on one shard: the unread count above the user's
/// watermark, and (when $3) the last message with at most $4 characters of its body.
const DETAILS: &str = "SELECT h.conversation, coalesce(k.up_to_seq, 0),
            (SELECT count(*) FROM messages m
             WHERE m.conversation = h.conversation AND m.recipient = $1
               AND m.seq > coalesce(k.up_to_seq, 0) AND m.expired_at_ms IS NULL),
            last.sender, last.seq, left(last.body, $4)
     FROM unnest($2::text[]) AS h(conversation)
     LEFT JOIN LATERAL (
         SELECT k.up_to_seq FROM acks k
         WHERE k.conversation = h.conversation AND k.recipient = $1) k ON true
     LEFT JOIN LATERAL (
         SELECT m.sender, m.seq, m.body FROM messages m
         WHERE $3 AND m.conversation = h.conversation
         ORDER BY m.seq DESC LIMIT 1) last ON true";

impl Shards {
    /// A page of `user`'s conversations, newest activity first, after `before` (from the newest
    /// without it): at most `limit`. One query on the user's home shard, then one per shard
    /// among the page's conversations for the unread counts (exact: counted above the
    /// watermark in the conversation's shard) and, with `previews`, the last message. A shard
    /// that does not answer leaves its conversations without details
    /// ([`ConversationSummary::details_unavailable`]); the home shard down fails the page.
    pub async fn conversations(
        &self,
        user: &UserId,
        before: Option<&ListCursor>,
        limit: u32,
        previews: bool,
    ) -> Result<Vec<ConversationSummary>, DbError> {
        let home = self.locator().home_of(user);
        let (before_ms, before_key) = match before {
            Some(c) => (c.last_activity_ms, c.conversation.as_str()),
            None => (i64::MAX, ""),
        };
        let client = self.client(home).await?;
        let statement = client
            .prepare_cached(LIST)
            .await
            .map_err(DbError::pg(home))?;
        let rows = client
            .query(
                &statement,
                &[&user.as_str(), &before_ms, &before_key, &i64::from(limit)],
            )
            .await
            .map_err(DbError::pg(home))?;
        let mut page = rows
            .iter()
            .map(|row| ListRow::decode(row, home))
            .collect::<Result<Vec<_>, _>>()?;
        let needs_details: Vec<ConversationKey> = page
            .iter()
            .filter(|s| previews || s.unread > 0)
            .map(|s| s.conversation.clone())
            .collect();
        let per_shard = self.group_by_shard(needs_details, |c| c);
        let details = join_all(per_shard.into_iter().map(|(shard, convs)| async move {
            let names: Vec<&str> = convs.iter().map(ConversationKey::as_str).collect();
            let keys = convs.clone();
            let read = async {
                let client = self.client(shard).await?;
                let statement = client
                    .prepare_cached(DETAILS)
                    .await
                    .map_err(DbError::pg(shard))?;
                let rows = client
                    .query(
                        &statement,
                        &[&user.as_str(), &names, &previews, &PREVIEW_CHARS],
                    )
                    .await
                    .map_err(DbError::pg(shard))?;
                rows.iter()
                    .map(|row| Details::decode(row, shard))
                    .collect::<Result<Vec<_>, _>>()
            };
            (read.await, keys)
        }))
        .await;
        let (details, unavailable) = partial(details, "conversation details")?;
        let details: HashMap<ConversationKey, Details> = details
            .into_iter()
            .map(|d| (d.conversation.clone(), d))
            .collect();
        for summary in &mut page {
            if unavailable.contains(&summary.conversation) {
                // The index's estimate stays; the shard could not say more.
                summary.details_unavailable = true;
                continue;
            }
            match details.get(&summary.conversation) {
                Some(d) => {
                    summary.unread = d.unread;
                    summary.read_up_to = summary.read_up_to.max(d.read_up_to);
                    summary.preview = d.preview.clone();
                }
                None => summary.unread = 0,
            }
        }
        Ok(page)
    }
}

/// A row of [`LIST`]; `unread` holds 1 while something may be unread (the index says the
/// user's watermark is below the last message to them), until [`DETAILS`] counts it.
struct ListRow;

impl ListRow {
    fn decode(row: &tokio_postgres::Row, shard: usize) -> Result<ConversationSummary, DbError> {
        let bad = |reason: String| DbError::BadRow { shard, reason };
        let seq = |i: usize, what: &str| {
            u64::try_from(row.get::<_, i64>(i)).map_err(|e| bad(format!("{what}: {e}")))
        };
        let read_up_to = seq(4, "read_up_to")?;
        let last_in_seq = seq(6, "last_in_seq")?;
        Ok(ConversationSummary {
            conversation: ConversationKey::parse(row.get(0))
                .map_err(|e| bad(format!("conversation: {e}")))?,
            peer: UserId::parse(row.get(1)).map_err(|e| bad(format!("peer: {e}")))?,
            last_seq: seq(2, "last_seq")?,
            last_activity_ms: row.get(3),
            unread: u64::from(last_in_seq > read_up_to),
            read_up_to,
            peer_read_up_to: seq(5, "peer_read_up_to")?,
            preview: None,
            details_unavailable: false,
        })
    }
}

/// A row of [`DETAILS`].
struct Details {
    conversation: ConversationKey,
    read_up_to: u64,
    unread: u64,
    preview: Option<Preview>,
}

impl Details {
    fn decode(row: &tokio_postgres::Row, shard: usize) -> Result<Self, DbError> {
        let bad = |reason: String| DbError::BadRow { shard, reason };
        let preview = match (
            row.get::<_, Option<&str>>(3),
            row.get::<_, Option<i64>>(4),
            row.get::<_, Option<String>>(5),
        ) {
            (Some(sender), Some(seq), Some(body)) => Some(Preview {
                sender: UserId::parse(sender).map_err(|e| bad(format!("sender: {e}")))?,
                seq: u64::try_from(seq).map_err(|e| bad(format!("seq: {e}")))?,
                body,
            }),
            _ => None,
        };
        Ok(Self {
            conversation: ConversationKey::parse(row.get(0))
                .map_err(|e| bad(format!("conversation: {e}")))?,
            read_up_to: u64::try_from(row.get::<_, i64>(1))
                .map_err(|e| bad(format!("read_up_to: {e}")))?,
            unread: u64::try_from(row.get::<_, i64>(2)).map_err(|e| bad(format!("unread: {e}")))?,
            preview,
        })
    }
}

impl SyncRow {
    fn decode(row: &tokio_postgres::Row, shard: usize) -> Result<Self, DbError> {
        let bad = |reason: String| DbError::BadRow { shard, reason };
        let seq = |i: usize, what: &str| {
            u64::try_from(row.get::<_, i64>(i)).map_err(|e| bad(format!("{what}: {e}")))
        };
        let last_in_seq = seq(2, "last_in_seq")?;
        Ok(Self {
            conversation: ConversationKey::parse(row.get(0))
                .map_err(|e| bad(format!("conversation: {e}")))?,
            peer: UserId::parse(row.get(1)).map_err(|e| bad(format!("peer: {e}")))?,
            last_in_seq,
            pending: last_in_seq > seq(6, "read_up_to")?,
            peer_read_up_to: seq(3, "peer_read_up_to")?,
            peer_read_at_ms: row.get(4),
            failed_at_ms: row.get(5),
        })
    }
}
