//! Retention: what happens to a message's content once its recipient acknowledges it, and the
//! expiry of what is never acknowledged (delete-on-ack mode).
//!
//! The erasure on ack itself is part of the ack statement ([`crate::acks`]); this module owns
//! the mode, the expiry sweep and the index the sweep reads.

use thiserror::Error;

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
        "shard {shard}: the expiry sweep's index (messages_unexpired_age) is missing and this role \
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
                    .map_err(DbError::pg(shard))?;
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

/// One shard's part of [`Shards::ensure_sweep_index`], under its lock.
async fn ensure_sweep_index_on(
    client: &tokio_postgres::Client,
    shard: usize,
) -> Result<(), DbError> {
    let pg = |source| DbError::Postgres { shard, source };
    let valid: Option<bool> = client
        .query_opt(
            "SELECT indisvalid FROM pg_index
             WHERE indexrelid = to_regclass('messages_unexpired_age')",
            &[],
        )
        .await
        .map_err(pg)?
        .map(|r| r.get(0));
    match valid {
        Some(true) => return Ok(()),
        Some(false) => {
            tracing::warn!(
                shard,
                "sweep index left invalid by an earlier build: rebuilding"
            );
            client
                .batch_execute("DROP INDEX CONCURRENTLY IF EXISTS messages_unexpired_age")
                .await
                .map_err(pg)?;
        }
        None => {}
    }
    tracing::info!(shard, "building the sweep index (messages_unexpired_age)");
    client
        .batch_execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_unexpired_age
             ON messages (sent_at_ms) WHERE expired_at_ms IS NULL",
        )
        .await
        .map_err(pg)?;
    tracing::info!(shard, "sweep index built");
    Ok(())
}
