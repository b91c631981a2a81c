//! Building the user index from the shards (a deployment upgrading, or an index in doubt), and
//! checking it against them.
//!
//! Both read each shard's directions (`acks`: one row per direction of a conversation that
//! received a message) page by page. The build writes what they say through the index's own
//! forward-only upsert, so it can run while multiplexers write: whichever write comes last, each
//! column ends at the greatest value either knew.

use chat_common::ids::{ConversationKey, UserId};

use crate::error::DbError;
use crate::shards::Shards;
use crate::user_index::{DirectionState, IndexUpdates, IndexedRow};

/// Directions read per page.
const PAGE: i64 = 5_000;

/// A page of one shard's directions after ($1, $2), with what the index needs of each: the
/// watermark, the conversation's last seq and its time, the last seq sent that way.
const DIRECTIONS: &str = "SELECT k.conversation, k.recipient, k.sender, k.up_to_seq, k.acked_at_ms,
            c.last_seq,
            coalesce((SELECT m.sent_at_ms FROM messages m
                      WHERE m.conversation = k.conversation
                      ORDER BY m.seq DESC LIMIT 1), 0),
            coalesce((SELECT m.seq FROM messages m
                      WHERE m.conversation = k.conversation AND m.recipient = k.recipient
                      ORDER BY m.seq DESC LIMIT 1), 0),
            coalesce((SELECT max(m.seq) FROM messages m
                      WHERE m.conversation = k.conversation AND m.recipient = k.recipient
                        AND m.expired_at_ms IS NULL AND m.seq > k.up_to_seq), 0)
     FROM acks k JOIN conversations c ON c.conversation = k.conversation
     WHERE (k.conversation, k.recipient) > ($1, $2)
     ORDER BY k.conversation, k.recipient
     LIMIT $3";

/// The latest failure per conversation and sender.
const FAILURES: &str = "SELECT conversation, sender, recipient, max(failed_at_ms)
     FROM failed_messages GROUP BY conversation, sender, recipient";

/// One direction of a conversation, as [`DIRECTIONS`] reads it.
#[derive(Debug)]
struct Direction {
    conversation: ConversationKey,
    reader: UserId,
    writer: UserId,
    up_to_seq: u64,
    acked_at_ms: Option<i64>,
    last_seq: u64,
    last_activity_ms: i64,
    last_in_seq: u64,
    /// The highest seq still pending that way (0: nothing).
    last_pending_seq: u64,
}

impl Direction {
    fn decode(row: &tokio_postgres::Row, shard: usize) -> Result<Self, DbError> {
        let bad = |reason: String| DbError::BadRow { shard, reason };
        let seq = |i: usize| {
            u64::try_from(row.get::<_, i64>(i)).map_err(|e| bad(format!("column {i}: {e}")))
        };
        Ok(Self {
            conversation: ConversationKey::parse(row.get(0))
                .map_err(|e| bad(format!("conversation: {e}")))?,
            reader: UserId::parse(row.get(1)).map_err(|e| bad(format!("recipient: {e}")))?,
            writer: UserId::parse(row.get(2)).map_err(|e| bad(format!("sender: {e}")))?,
            up_to_seq: seq(3)?,
            acked_at_ms: row.get(4),
            last_seq: seq(5)?,
            last_activity_ms: row.get(6),
            last_in_seq: seq(7)?,
            last_pending_seq: seq(8)?,
        })
    }
}

/// What [`Shards::rebuild_index`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Directions of conversations read.
    pub directions: u64,
    /// Index rows written (each user of each direction, merged per page).
    pub rows: u64,
}

/// An index row that breaks the invariant (or runs ahead of the shards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexViolation {
    pub user: UserId,
    pub conversation: ConversationKey,
    pub what: String,
}

impl std::fmt::Display for IndexViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in {}: {}", self.user, self.conversation, self.what)
    }
}

impl Shards {
    /// A page of `shard`'s directions after `after` (conversation, reader), in key order.
    async fn directions(
        &self,
        shard: usize,
        after: &(String, String),
    ) -> Result<Vec<Direction>, DbError> {
        let rows = self
            .client(shard)
            .await?
            .query(DIRECTIONS, &[&after.0, &after.1, &PAGE])
            .await
            .map_err(DbError::pg(shard))?;
        rows.iter()
            .map(|row| Direction::decode(row, shard))
            .collect()
    }

    /// Builds the user index from what every shard holds (for a deployment upgrading, or after
    /// restoring shards), then marks it built on every shard. Safe while multiplexers run.
    pub async fn rebuild_index(&self) -> Result<Rebuilt, DbError> {
        let mut done = Rebuilt::default();
        for shard in 0..self.len() {
            let mut after = (String::new(), String::new());
            loop {
                let page = self.directions(shard, &after).await?;
                let Some(last) = page.last() else { break };
                after = (last.conversation.to_string(), last.reader.to_string());
                let mut updates = IndexUpdates::new();
                for d in &page {
                    updates.direction(
                        &d.conversation,
                        &d.reader,
                        &d.writer,
                        DirectionState {
                            last_seq: d.last_seq,
                            last_activity_ms: d.last_activity_ms,
                            last_in_seq: d.last_in_seq,
                            up_to_seq: d.up_to_seq,
                            acked_at_ms: d.acked_at_ms,
                        },
                    );
                }
                done.directions += page.len() as u64;
                done.rows += updates.len() as u64;
                self.update_index(&updates).await?;
            }
            let rows = self
                .client(shard)
                .await?
                .query(FAILURES, &[])
                .await
                .map_err(DbError::pg(shard))?;
            let mut updates = IndexUpdates::new();
            for row in &rows {
                let bad = |reason: String| DbError::BadRow { shard, reason };
                let conversation = ConversationKey::parse(row.get(0))
                    .map_err(|e| bad(format!("conversation: {e}")))?;
                let sender = UserId::parse(row.get(1)).map_err(|e| bad(format!("sender: {e}")))?;
                let recipient =
                    UserId::parse(row.get(2)).map_err(|e| bad(format!("recipient: {e}")))?;
                updates.failed_at(&sender, &conversation, &recipient, row.get(3));
            }
            done.rows += updates.len() as u64;
            self.update_index(&updates).await?;
        }
        for shard in 0..self.len() {
            self.client(shard)
                .await?
                .execute("UPDATE index_state SET built = true", &[])
                .await
                .map_err(DbError::pg(shard))?;
        }
        self.index_state.mark_built();
        tracing::info!(
            directions = done.directions,
            rows = done.rows,
            "user index rebuilt"
        );
        Ok(done)
    }

    /// Checks the user index against every shard: each direction with a message pending must
    /// have its reader's row with `last_in_seq` at or above it (the invariant), and no row may
    /// be ahead of its shard (a `read_up_to` above the watermark, a `last_in_seq` above the
    /// last message sent that way). Returns the violations, at most `max`.
    pub async fn check_index(&self, max: usize) -> Result<Vec<IndexViolation>, DbError> {
        let mut found = Vec::new();
        for shard in 0..self.len() {
            let mut after = (String::new(), String::new());
            loop {
                let page = self.directions(shard, &after).await?;
                let Some(last) = page.last() else { break };
                after = (last.conversation.to_string(), last.reader.to_string());
                let keys: Vec<(&UserId, &ConversationKey)> =
                    page.iter().map(|d| (&d.reader, &d.conversation)).collect();
                let rows = self.index_rows(&keys).await?;
                for d in &page {
                    let row = rows.get(&(d.reader.clone(), d.conversation.clone()));
                    found.extend(violations(d, row).into_iter().map(|what| IndexViolation {
                        user: d.reader.clone(),
                        conversation: d.conversation.clone(),
                        what,
                    }));
                }
                if found.len() >= max {
                    found.truncate(max);
                    return Ok(found);
                }
            }
        }
        Ok(found)
    }
}

/// What is wrong with the index row of a direction's reader (`None`: no row).
fn violations(d: &Direction, row: Option<&IndexedRow>) -> Vec<String> {
    let Some(r) = row else {
        return if d.last_pending_seq > 0 {
            vec![format!(
                "no index row, with seq {} pending",
                d.last_pending_seq
            )]
        } else {
            Vec::new()
        };
    };
    let mut found = Vec::new();
    if r.last_in_seq < d.last_pending_seq {
        found.push(format!(
            "last_in_seq {} below the pending seq {}",
            r.last_in_seq, d.last_pending_seq
        ));
    }
    if r.last_in_seq > d.last_in_seq {
        found.push(format!(
            "last_in_seq {} above the last seq sent this way ({})",
            r.last_in_seq, d.last_in_seq
        ));
    }
    if r.read_up_to > d.up_to_seq {
        found.push(format!(
            "read_up_to {} above the watermark {}",
            r.read_up_to, d.up_to_seq
        ));
    }
    found
}
