//! The shards: two connection pools each (see [`Shards::generic_client`]), the locator over
//! them, and the two ways the store's concerns reach them (one shard per conversation, or every
//! shard for a user's reads).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use chat_common::ids::ConversationKey;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::try_join_all;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

use crate::error::DbError;
use crate::locator::Locator;

/// Session setting of a writer's shard connections (see `Shards::connect`).
const CUSTOM_PLANS: &str = "-c plan_cache_mode=force_custom_plan";

/// Session setting of the connections of [`Shards::generic_client`].
const GENERIC_PLANS: &str = "-c plan_cache_mode=force_generic_plan";

/// Shard layer configuration.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// One DSN per shard, in shard order. The order is part of the layout: it must not change
    /// without a reshard.
    pub dsns: Vec<String>,
    /// Connections per shard pool (each shard has two: see [`Shards::generic_client`]).
    pub pool_size: usize,
    /// How long to wait for a pooled connection before failing (and letting the caller retry).
    pub acquire_timeout: Duration,
    /// How the connections plan prepared statements (see [`Plans`]).
    pub plans: Plans,
}

/// How a process's shard connections plan their prepared statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plans {
    /// `plan_cache_mode=force_custom_plan`: each execution planned with its own arrays. For the
    /// writers (the multiplexer, a replay), whose lookups by array a generic plan made slow.
    Custom,
    /// Postgres's default: after five executions a statement may keep a generic plan. For the
    /// gateway, whose reads are probes by key (a user's index, a conversation's messages), where
    /// planning each execution cost more than running it.
    Auto,
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
            plans: Plans::Custom,
        })
    }

    /// The same shards, with connections that plan as `plans` says.
    pub fn with_plans(mut self, plans: Plans) -> Self {
        self.plans = plans;
        self
    }
}

/// The shards: two pools each, and the locator over them.
#[derive(Clone)]
pub struct Shards {
    pub(crate) pools: Vec<Pool>,
    /// Connections whose statements always run with their generic plans
    /// ([`Shards::generic_client`]).
    generic: Vec<Pool>,
    locator: Locator,
    /// Whether the user index can be read yet (see `user_index`).
    pub(crate) index_state: std::sync::Arc<IndexState>,
}

/// Whether the user index can be read (every shard built): `Shards::index_built` (in
/// `user_index`) keeps the answer here, for good once it is true, and asks the shards again at
/// most every 10 s until then. Kept here, with the pools, so that every clone of the shards
/// shares it.
#[derive(Debug, Default)]
pub(crate) struct IndexState {
    pub(crate) built: AtomicBool,
    pub(crate) checked_at_ms: AtomicI64,
}

impl IndexState {
    /// This process built the index (`rebuild_index`): no need to wait for the next check.
    pub(crate) fn mark_built(&self) {
        self.built.store(true, Ordering::Relaxed);
    }
}

/// How many shard queries a read cost, counted as it goes by the reads that make it up (a
/// sync's: the index's, then one per shard that held something).
#[derive(Default)]
pub(crate) struct QueryCount(AtomicUsize);

impl QueryCount {
    pub(crate) fn one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Shards {
    /// Builds the pools (connections are opened lazily).
    pub fn connect(config: &ShardConfig) -> Result<Self, DbError> {
        let mut pools = Vec::with_capacity(config.dsns.len());
        let mut generic = Vec::with_capacity(config.dsns.len());
        for (i, dsn) in config.dsns.iter().enumerate() {
            // Statements are prepared once per connection, but planned with each execution's
            // arrays: a generic plan, which Postgres would otherwise switch to after five runs,
            // is fixed by the table sizes of that moment (a new shard is empty) and was measured
            // 10 to 30 times slower for the store's lookups (docs/design.md).
            let plans = (config.plans == Plans::Custom).then_some(CUSTOM_PLANS);
            pools.push(pool(i, dsn, plans, config)?);
            generic.push(pool(i, dsn, Some(GENERIC_PLANS), config)?);
        }
        Ok(Self {
            locator: Locator::new(pools.len() as u32),
            pools,
            generic,
            index_state: Default::default(),
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

    /// A connection to `shard` that plans as the process's [`Plans`] say: for a writer, each
    /// execution with its own arrays.
    pub async fn client(&self, shard: usize) -> Result<deadpool_postgres::Object, DbError> {
        take(&self.pools, shard).await
    }

    /// A connection to `shard` on which every statement runs with its generic plan, made once
    /// per connection and kept: for the statements whose plan does not depend on their arrays
    /// (a probe by key per element), where planning each execution cost as much as running
    /// it: the store's first attempt, the ack and the user index's upsert (docs/design.md,
    /// "Idempotency and sequences"). A pool of its own, of up to the same size as the other, so
    /// that these statements need no statements around them to change the plan mode: at 500
    /// msg/s those were 9 a message, and without them Postgres's CPU a message fell to 0.82-0.86
    /// (docs/performance-log.md, 2026-12-06).
    ///
    /// Such a plan is chosen with the table sizes of the moment it is made, so a statement run
    /// here must not leave the planner a choice that a small table decides.
    pub async fn generic_client(&self, shard: usize) -> Result<deadpool_postgres::Object, DbError> {
        take(&self.generic, shard).await
    }

    /// Splits `items` by the shard of their conversation: the groups in shard order, each in
    /// the order of `items`.
    pub(crate) fn group_by_shard<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        conversation: impl Fn(&T) -> &ConversationKey,
    ) -> BTreeMap<usize, Vec<T>> {
        let mut groups: BTreeMap<usize, Vec<T>> = BTreeMap::new();
        for item in items {
            let shard = self.locator.shard_of(conversation(&item));
            groups.entry(shard).or_default().push(item);
        }
        groups
    }

    /// Runs `read` on every shard at once, each with a connection of its own, and gathers what
    /// they return (shard by shard): for reads by user, whose conversations are on every shard.
    pub(crate) async fn on_every_shard<T, F, Fut>(&self, read: F) -> Result<Vec<T>, DbError>
    where
        F: Fn(usize, deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<Vec<T>, DbError>>,
    {
        let read = &read;
        let per_shard = try_join_all((0..self.len()).map(|shard| async move {
            let client = self.client(shard).await?;
            read(shard, client).await
        }))
        .await?;
        Ok(per_shard.into_iter().flatten().collect())
    }

    /// The shards that do not answer `SELECT 1` within `within`, asked all at once (for
    /// `/readyz` and its per-shard gauge: a server stopped answers at once with a refused
    /// connection, a link cut only with the timeout).
    pub async fn down_shards(&self, within: Duration) -> Vec<ShardDown> {
        let answers = futures_util::future::join_all((0..self.len()).map(|shard| async move {
            match tokio::time::timeout(within, self.ping_one(shard)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(ShardDown {
                    shard,
                    reason: e.to_string(),
                }),
                Err(_) => Some(ShardDown {
                    shard,
                    reason: format!("shard {shard}: no answer within {within:?}"),
                }),
            }
        }))
        .await;
        answers.into_iter().flatten().collect()
    }

    /// Whether `shard` answers `SELECT 1` within `within`.
    pub async fn answers(&self, shard: usize, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.ping_one(shard)).await,
            Ok(Ok(()))
        )
    }

    async fn ping_one(&self, shard: usize) -> Result<(), DbError> {
        let client = self.client(shard).await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|source| DbError::Postgres { shard, source })?;
        Ok(())
    }
}

/// A pool of up to `config.pool_size` connections to shard `i` at `dsn`, each started with the
/// session `options` given (the plan mode) besides the DSN's own.
fn pool(i: usize, dsn: &str, options: Option<&str>, config: &ShardConfig) -> Result<Pool, DbError> {
    // libpq's sslmode and sslrootcert, which tokio-postgres does not take (see `tls`).
    let crate::tls::Target {
        config: mut pg,
        verify,
    } = crate::tls::parse(dsn).map_err(|e| DbError::Config(format!("shard {i}: {e}")))?;
    if let Some(extra) = options {
        let options = match pg.get_options() {
            Some(o) => format!("{o} {extra}"),
            None => extra.to_owned(),
        };
        pg.options(&options);
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    // TLS when the DSN requires it (a server that only offers it is used in plaintext, as
    // before: sslmode=prefer, the default, asks for nothing).
    let mgr = if pg.get_ssl_mode() == SslMode::Require {
        let tls = crate::tls::connector(&verify)
            .map_err(|e| DbError::Config(format!("shard {i}: {e}")))?;
        Manager::from_config(pg, tls, manager_config)
    } else {
        Manager::from_config(pg, NoTls, manager_config)
    };
    Pool::builder(mgr)
        .max_size(config.pool_size.max(1))
        .wait_timeout(Some(config.acquire_timeout))
        .create_timeout(Some(config.acquire_timeout))
        .recycle_timeout(Some(config.acquire_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Config(format!("shard {i}: {e}")))
}

/// A connection from `pools[shard]`, the wait for it recorded.
async fn take(pools: &[Pool], shard: usize) -> Result<deadpool_postgres::Object, DbError> {
    let started = std::time::Instant::now();
    let result = pools[shard]
        .get()
        .await
        .map_err(|source| DbError::Pool { shard, source });
    metrics::histogram!("db_pool_wait_seconds", "shard" => shard.to_string())
        .record(started.elapsed());
    result
}

/// A shard that did not answer a ping, and what the attempt said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardDown {
    pub shard: usize,
    pub reason: String,
}

impl std::fmt::Display for ShardDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The reason already names the shard ("shard 1: ...").
        f.write_str(&self.reason)
    }
}

impl ShardDown {
    /// The shards down, as one line for a readiness answer ("shard 1: ...; shard 3: ...").
    pub fn list(down: &[ShardDown]) -> String {
        down.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}
