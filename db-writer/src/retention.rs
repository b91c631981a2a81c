//! Retention: what happens to a message's content once its recipient acknowledges it, and the
//! expiry of what is never acknowledged (delete-on-ack mode).
//!
//! The erasure on ack itself is part of the ack statement ([`crate::acks`]); this module owns
//! the mode, the expiry sweep and the index the sweep reads.

use thiserror::Error;

use crate::error::DbError;
use crate::keys::{self, sealed_key_id};
use crate::shards::Shards;

/// What happens to a message's content once its recipient acknowledges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Keep forever (history can be paged).
    Keep,
    /// Destroy the body's key when the recipient acks (the row, whose sealed bytes nothing can
    /// open any more, stays for the metadata window).
    DeleteOnAck,
}

/// A retention mode that is neither `keep` nor `delete-on-ack`.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("unknown retention mode {0:?} (keep | delete-on-ack)")]
pub struct UnknownRetention(pub String);

impl std::str::FromStr for Retention {
    type Err = UnknownRetention;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keep" => Ok(Self::Keep),
            "delete-on-ack" => Ok(Self::DeleteOnAck),
            other => Err(UnknownRetention(other.to_owned())),
        }
    }
}

/// Why the expiry sweep's index could not be made ready ([`Shards::ensure_sweep_index`]).
#[derive(Debug, Error)]
pub enum SweepIndexError {
    /// The index is missing (or left invalid) and this role may not build it: only the owner of
    /// the `messages` table may. A multiplexer running as the writer role meets this when the
    /// shards were not migrated in delete-on-ack mode; the fix is an operator's, so a caller
    /// reports it and tries again later.
    #[error(
        "shard {shard}: the expiry sweep's indexes (messages_unexpired_age, messages_erased_age) are \
         missing and this role \
         may not build it (only the owner of the messages table may): run `db-writer migrate \
         --retention delete-on-ack` as the shards' owner (chat_owner)"
    )]
    NotOwner { shard: usize },
    /// Anything else: a shard down, a lost connection, ...
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Advisory lock key that serialises builds of the sweep index (`Shards::ensure_sweep_index`).
const SWEEP_INDEX_LOCK: i64 = 0x0063_6861_7473_7769;

/// SQLSTATE 42501, insufficient_privilege: what Postgres answers a role that does not own the
/// table it would index.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

impl Shards {
    /// Builds the expiry sweep's index where it is missing (delete-on-ack mode; see migration
    /// 4). `CREATE INDEX CONCURRENTLY` does not block writes. Builds are serialised per shard by
    /// an advisory lock, so an invalid index found while holding it is what a build that failed
    /// or was interrupted left behind: it is dropped and built again.
    ///
    /// Only the owner of the tables may build it: `db-writer migrate --retention delete-on-ack`
    /// does ([`Shards::migrate_for`]). Any role finds a valid index ready; a role that may not
    /// build a missing one gets [`SweepIndexError::NotOwner`].
    pub async fn ensure_sweep_index(&self) -> Result<(), SweepIndexError> {
        for shard in 0..self.pools.len() {
            let client = self.client(shard).await?;
            let pg = |source| DbError::Postgres { shard, source };
            client
                .execute("SELECT pg_advisory_lock($1)", &[&SWEEP_INDEX_LOCK])
                .await
                .map_err(pg)?;
            let built = ensure_sweep_index_on(&client, shard).await;
            // A broken connection has released the lock already.
            let _ = client
                .execute("SELECT pg_advisory_unlock($1)", &[&SWEEP_INDEX_LOCK])
                .await;
            built.map_err(|e| match e.sqlstate() {
                Some(INSUFFICIENT_PRIVILEGE) => SweepIndexError::NotOwner { shard },
                _ => SweepIndexError::Db(e),
            })?;
        }
        Ok(())
    }

    /// Delete-on-ack retention: erases the bodies of messages sent before `cutoff_ms`, destroys
    /// their keys (and every other key issued before it), and marks them expired, which takes
    /// the unacked ones out of the pending set. Acknowledged rows still there (their keys are
    /// destroyed already; the metadata window normally deletes them first) are marked too, so
    /// the sweep's index holds only the retention window. Returns how many unacked messages
    /// expired. Works in bounded chunks.
    pub async fn expire_unacked(&self, cutoff_ms: i64, now_ms: i64) -> Result<u64, DbError> {
        const CHUNK: i64 = 1000;
        let mut total = 0;
        for shard in 0..self.len() {
            let client = self.client(shard).await?;
            loop {
                let row = client
                    .query_one(
                        concat!(
                            "WITH old AS (
                                 SELECT conversation, seq, ",
                            sealed_key_id!("sealed"),
                            " AS key_id
                                 FROM messages
                                 WHERE expired_at_ms IS NULL AND sent_at_ms < $1
                                 LIMIT $3),
                             swept AS (
                                 UPDATE messages m
                                 SET body = NULL, sealed = NULL, expired_at_ms = $2
                                 FROM old o
                                 WHERE m.conversation = o.conversation AND m.seq = o.seq
                                   AND m.expired_at_ms IS NULL
                                 RETURNING m.conversation, m.recipient, m.seq, m.sender,
                                           m.client_message_id, o.key_id),
                             shredded AS (
                                 DELETE FROM sealing_keys k USING swept s
                                 WHERE k.id = s.key_id),
                             shredded_v1 AS (
                                 DELETE FROM body_keys k USING swept s
                                 WHERE s.key_id IS NULL
                                   AND k.conversation = s.conversation AND k.sender = s.sender
                                   AND k.client_message_id = s.client_message_id)
                             SELECT count(*),
                                    count(*) FILTER (WHERE s.seq > coalesce(k.up_to_seq, 0))
                             FROM swept s
                             LEFT JOIN acks k ON k.conversation = s.conversation
                                             AND k.recipient = s.recipient"
                        ),
                        &[&cutoff_ms, &now_ms, &CHUNK],
                    )
                    .await
                    .map_err(DbError::pg(shard))?;
                let (swept, unacked): (i64, i64) = (row.get(0), row.get(1));
                total += unacked as u64;
                if swept < CHUNK {
                    break;
                }
            }
            // Keys as old as the expired messages whose message never reached the shard (the
            // gateway's produce failed after it issued the key) or reached it after its expiry;
            // and keys issued ahead that no send took (a pool's leftovers). A key issued ahead
            // seals a send at most `keys::POOL_KEY_MAX_AGE_MS` after it was issued, so its
            // message is older than the cutoff once the key is older than the cutoff less
            // [`keys::UNUSED_KEY_MARGIN_MS`] (which also covers skew between the gateways' clocks
            // and this one).
            let unused_cutoff_ms = cutoff_ms.saturating_sub(keys::UNUSED_KEY_MARGIN_MS);
            let sweeps = [
                (
                    "DELETE FROM sealing_keys
                     WHERE id IN (SELECT id FROM sealing_keys WHERE created_at_ms < $1 LIMIT $2)",
                    unused_cutoff_ms,
                ),
                (
                    "DELETE FROM body_keys
                     WHERE (conversation, sender, client_message_id) IN (
                         SELECT conversation, sender, client_message_id FROM body_keys
                         WHERE created_at_ms < $1 LIMIT $2)",
                    cutoff_ms,
                ),
            ];
            for (sweep, before) in sweeps {
                loop {
                    let destroyed = client
                        .execute(sweep, &[&before, &CHUNK])
                        .await
                        .map_err(DbError::pg(shard))?;
                    if destroyed < CHUNK as u64 {
                        break;
                    }
                }
            }
        }
        Ok(total)
    }
}

/// The indexes of delete-on-ack mode, built on demand (keep mode would pay for them on every
/// insert and never read them): name, and what it indexes.
const SWEEP_INDEXES: &[(&str, &str)] = &[
    // The expiry sweep: messages not yet erased, by age.
    (
        "messages_unexpired_age",
        "ON messages (sent_at_ms) WHERE expired_at_ms IS NULL",
    ),
    // The metadata window: erased rows (acked, or expired), by when.
    (
        "messages_erased_age",
        "ON messages (expired_at_ms) WHERE expired_at_ms IS NOT NULL",
    ),
];

impl Shards {
    /// Delete-on-ack retention, the metadata window: deletes outright the rows of messages
    /// erased (expired, or held as text and acknowledged) before `before_ms`, and of messages
    /// acknowledged and sent before it (their keys are gone; the rows hold sealed bytes nothing
    /// can open), and the records of messages set aside before it (`failed_messages`: who sent
    /// whom what could not be stored, and when). What is left of such a conversation is its
    /// counters: the last seq, and each direction's ack watermark. Messages go in bounded
    /// chunks, failure records in one statement per shard; returns how many rows went, of both
    /// tables.
    ///
    /// The window must outlast the `inbound` topic's retention: a record replayed after its row
    /// is gone would be stored again, without content (its key is destroyed), under a new seq.
    /// An acknowledged row's window counts from its send, which is when its record entered the
    /// log.
    pub async fn purge_erased(&self, before_ms: i64) -> Result<u64, DbError> {
        const CHUNK: i64 = 1000;
        let mut total = 0;
        for shard in 0..self.len() {
            let client = self.client(shard).await?;
            let pg = DbError::pg(shard);
            loop {
                let purged = client
                    .execute(
                        "DELETE FROM messages
                         WHERE (conversation, seq) IN (
                             SELECT conversation, seq FROM messages
                             WHERE expired_at_ms < $1 LIMIT $2)",
                        &[&before_ms, &CHUNK],
                    )
                    .await
                    .map_err(pg)?;
                total += purged;
                if purged < CHUNK as u64 {
                    break;
                }
            }
            // Acknowledged rows, oldest first (the sweep's index). Each chunk goes on from the
            // send time the last one reached, so that messages still pending at that age (not
            // yet expired) are passed over once per sweep, not once per chunk.
            let mut from = i64::MIN;
            loop {
                let row = client
                    .query_one(
                        "WITH gone AS (
                             DELETE FROM messages
                             WHERE (conversation, seq) IN (
                                 SELECT m.conversation, m.seq FROM messages m
                                 JOIN acks k ON k.conversation = m.conversation
                                            AND k.recipient = m.recipient
                                 WHERE m.expired_at_ms IS NULL
                                   AND m.sent_at_ms >= $2 AND m.sent_at_ms < $1
                                   AND m.seq <= k.up_to_seq
                                 ORDER BY m.sent_at_ms
                                 LIMIT $3)
                             RETURNING sent_at_ms)
                         SELECT count(*), max(sent_at_ms) FROM gone",
                        &[&before_ms, &from, &CHUNK],
                    )
                    .await
                    .map_err(pg)?;
                let (purged, reached): (i64, Option<i64>) = (row.get(0), row.get(1));
                total += purged as u64;
                match reached {
                    Some(reached) if purged == CHUNK => from = reached,
                    _ => break,
                }
            }
            // The failure records, in one statement: the table holds only messages set aside,
            // which are rare. A sender offline for longer than the window is no longer told of
            // them at sync.
            total += client
                .execute(
                    "DELETE FROM failed_messages WHERE failed_at_ms < $1",
                    &[&before_ms],
                )
                .await
                .map_err(pg)?;
        }
        Ok(total)
    }
}

/// One shard's part of [`Shards::ensure_sweep_index`], under its lock.
async fn ensure_sweep_index_on(
    client: &tokio_postgres::Client,
    shard: usize,
) -> Result<(), DbError> {
    for (name, definition) in SWEEP_INDEXES {
        ensure_index_on(client, shard, name, definition).await?;
    }
    Ok(())
}

/// Builds one of [`SWEEP_INDEXES`] where it is missing or left invalid.
async fn ensure_index_on(
    client: &tokio_postgres::Client,
    shard: usize,
    name: &str,
    definition: &str,
) -> Result<(), DbError> {
    let pg = |source| DbError::Postgres { shard, source };
    let valid: Option<bool> = client
        .query_opt(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            &[&name],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    match valid {
        Some(true) => return Ok(()),
        Some(false) => {
            tracing::warn!(
                shard,
                index = name,
                "sweep index left invalid by an earlier build: rebuilding"
            );
            client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .await
                .map_err(pg)?;
        }
        None => {}
    }
    tracing::info!(shard, index = name, "building a sweep index");
    client
        .batch_execute(&format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {definition}"
        ))
        .await
        .map_err(pg)?;
    tracing::info!(shard, index = name, "sweep index built");
    Ok(())
}
