//! The schema: ordered migrations, applied to every shard under an advisory lock, and what a
//! retention mode needs beyond them.

use crate::error::DbError;
use crate::retention::{Retention, SweepIndexError};
use crate::shards::Shards;

/// The schema, as ordered migrations. Applied by [`Shards::migrate`] under an advisory lock, so
/// several processes starting at once apply each migration exactly once.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_messages.sql")),
    (2, include_str!("../migrations/0002_sent_at_index.sql")),
    (3, include_str!("../migrations/0003_ack_watermarks.sql")),
    (
        4,
        include_str!("../migrations/0004_sweep_index_on_demand.sql"),
    ),
    (
        5,
        include_str!("../migrations/0005_client_id_scope_and_failures.sql"),
    ),
    (6, include_str!("../migrations/0006_user_conversations.sql")),
    (7, include_str!("../migrations/0007_export_cursor.sql")),
    (8, include_str!("../migrations/0008_body_keys.sql")),
    (
        9,
        include_str!("../migrations/0009_user_conversations_hot_updates.sql"),
    ),
    (10, include_str!("../migrations/0010_sealing_keys.sql")),
    (
        11,
        include_str!("../migrations/0011_messages_statistics_sample.sql"),
    ),
];

/// Advisory lock key that serialises migrations (any constant shared by all processes).
const MIGRATION_LOCK: i64 = 0x0063_6861_746d_6967;

impl Shards {
    /// Applies missing migrations to every shard.
    pub async fn migrate(&self) -> Result<(), DbError> {
        self.migrate_to(i32::MAX).await
    }

    /// Applies missing migrations, then what `retention` needs on top: in delete-on-ack mode the
    /// expiry sweep's index (migration 4 left it to be built on demand, since keep mode would
    /// pay for it on every insert and never read it). What `db-writer migrate` runs, as the
    /// shards' owner, so that multiplexers running as the writer role, which may not build an
    /// index, find it ready.
    pub async fn migrate_for(&self, retention: Retention) -> Result<(), SweepIndexError> {
        self.migrate().await?;
        if retention == Retention::DeleteOnAck {
            self.ensure_sweep_index().await?;
        }
        Ok(())
    }

    /// The migrations each shard lacks, for the shards that lack any: (shard, versions).
    pub async fn missing_migrations(&self) -> Result<Vec<(usize, Vec<i32>)>, DbError> {
        let mut behind = Vec::new();
        for shard in 0..self.pools.len() {
            let missing = self.missing_migrations_on(shard).await?;
            if !missing.is_empty() {
                behind.push((shard, missing));
            }
        }
        Ok(behind)
    }

    /// [`Shards::missing_migrations`] of one shard.
    pub async fn missing_migrations_on(&self, shard: usize) -> Result<Vec<i32>, DbError> {
        let client = self.client(shard).await?;
        let pg = |source| DbError::Postgres { shard, source };
        let applied: Vec<i32> = client
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .or_else(|e| match e.code() {
                // A shard never migrated has no table at all.
                Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(Vec::new()),
                _ => Err(e),
            })
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(MIGRATIONS
            .iter()
            .map(|(v, _)| *v)
            .filter(|v| !applied.contains(v))
            .collect())
    }

    /// Applies missing migrations up to and including `last` to every shard (tests of a
    /// migration start from the schema before it).
    pub async fn migrate_to(&self, last: i32) -> Result<(), DbError> {
        for shard in 0..self.pools.len() {
            self.migrate_shard_to(shard, last).await?;
        }
        Ok(())
    }

    /// Applies every migration to one shard (a multiplexer that started while it was down).
    pub async fn migrate_shard(&self, shard: usize) -> Result<(), DbError> {
        self.migrate_shard_to(shard, i32::MAX).await
    }

    async fn migrate_shard_to(&self, shard: usize, last: i32) -> Result<(), DbError> {
        let mut client = self.client(shard).await?;
        let pg = |source| DbError::Postgres { shard, source };
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version int PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg)?;
        let applied: Vec<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (version, sql) in MIGRATIONS {
            if applied.contains(version) || *version > last {
                continue;
            }
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(pg)?;
            tracing::info!(shard, version, "applied migration");
        }
        tx.commit().await.map_err(pg)?;
        Ok(())
    }
}
