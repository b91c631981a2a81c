//! Connection pools to the shards and schema migrations.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::error::DbError;
use crate::locator::Locator;

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
];

/// Advisory lock key that serialises migrations (any constant shared by all processes).
const MIGRATION_LOCK: i64 = 0x0063_6861_746d_6967;

/// Advisory lock key that serialises builds of the sweep index (`Shards::ensure_sweep_index`).
const SWEEP_INDEX_LOCK: i64 = 0x0063_6861_7473_7769;

/// Session setting of every shard connection (see `Shards::connect`).
const CUSTOM_PLANS: &str = "-c plan_cache_mode=force_custom_plan";

/// Shard layer configuration.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// One DSN per shard, in shard order. The order is part of the layout: it must not change
    /// without a reshard.
    pub dsns: Vec<String>,
    /// Connections per shard pool.
    pub pool_size: usize,
    /// How long to wait for a pooled connection before failing (and letting the caller retry).
    pub acquire_timeout: Duration,
}

impl ShardConfig {
    /// Parses a comma-separated DSN list.
    pub fn from_list(list: &str, pool_size: usize) -> Result<Self, DbError> {
        let dsns: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if dsns.is_empty() {
            return Err(DbError::Config("no shard DSN given".into()));
        }
        Ok(Self {
            dsns,
            pool_size,
            acquire_timeout: Duration::from_secs(5),
        })
    }
}

/// The shards: one pool each, and the locator over them.
#[derive(Clone)]
pub struct Shards {
    pub(crate) pools: Vec<Pool>,
    locator: Locator,
}

impl Shards {
    /// Builds the pools (connections are opened lazily).
    pub fn connect(config: &ShardConfig) -> Result<Self, DbError> {
        let mut pools = Vec::with_capacity(config.dsns.len());
        for (i, dsn) in config.dsns.iter().enumerate() {
            let mut pg = tokio_postgres::Config::from_str(dsn)
                .map_err(|e| DbError::Config(format!("shard {i}: {e}")))?;
            // Statements are prepared once per connection, but planned with each execution's
            // arrays: a generic plan, which Postgres would otherwise switch to after five runs,
            // is fixed by the table sizes of that moment (a new shard is empty) and was measured
            // 10 to 30 times slower for the store's lookups (docs/design.md).
            let options = match pg.get_options() {
                Some(o) => format!("{o} {CUSTOM_PLANS}"),
                None => CUSTOM_PLANS.to_owned(),
            };
            pg.options(&options);
            let mgr = Manager::from_config(
                pg,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(mgr)
                .max_size(config.pool_size.max(1))
                .wait_timeout(Some(config.acquire_timeout))
                .create_timeout(Some(config.acquire_timeout))
                .recycle_timeout(Some(config.acquire_timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| DbError::Config(format!("shard {i}: {e}")))?;
            pools.push(pool);
        }
        Ok(Self {
            locator: Locator::new(pools.len() as u32),
            pools,
        })
    }

    pub fn locator(&self) -> &Locator {
        &self.locator
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    pub(crate) async fn client(&self, shard: usize) -> Result<deadpool_postgres::Object, DbError> {
        let started = std::time::Instant::now();
        let result = self.pools[shard]
            .get()
            .await
            .map_err(|source| DbError::Pool { shard, source });
        metrics::histogram!("db_pool_wait_seconds", "shard" => shard.to_string())
            .record(started.elapsed());
        result
    }

    /// Applies missing migrations to every shard.
    pub async fn migrate(&self) -> Result<(), DbError> {
        self.migrate_to(i32::MAX).await
    }

    /// Applies missing migrations up to and including `last` to every shard (tests of a
    /// migration start from the schema before it).
    pub async fn migrate_to(&self, last: i32) -> Result<(), DbError> {
        for shard in 0..self.pools.len() {
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
        }
        Ok(())
    }

    /// Builds the expiry sweep's index where it is missing (delete-on-ack mode; see migration
    /// 4). `CREATE INDEX CONCURRENTLY` does not block writes. Builds are serialised per shard by
    /// an advisory lock, so an invalid index found while holding it is what a build that failed
    /// or was interrupted left behind: it is dropped and built again.
    pub async fn ensure_sweep_index(&self) -> Result<(), DbError> {
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
            built?;
        }
        Ok(())
    }

    /// Checks that every shard answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), DbError> {
        for shard in 0..self.pools.len() {
            let client = self.client(shard).await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|source| DbError::Postgres { shard, source })?;
        }
        Ok(())
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
