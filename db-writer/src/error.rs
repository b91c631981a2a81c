use thiserror::Error;

/// Errors at the shard boundary. [`DbError::is_retryable`] separates what a caller should retry
/// (a shard briefly down, a pool timeout, a serialisation conflict) from what it should not.
#[derive(Debug, Error)]
pub enum DbError {
    #[error("shard {shard}: no connection available: {source}")]
    Pool {
        shard: usize,
        source: deadpool_postgres::PoolError,
    },
    #[error("shard {shard}: {source}")]
    Postgres {
        shard: usize,
        source: tokio_postgres::Error,
    },
    #[error("invalid shard configuration: {0}")]
    Config(String),
    #[error("shard {shard}: stored row is invalid: {reason}")]
    BadRow { shard: usize, reason: String },
}

impl DbError {
    /// True when the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            DbError::Pool { .. } => true,
            DbError::Postgres { source, .. } => {
                // Connection loss has no SQLSTATE; constraint violations and syntax errors do and
                // would fail again. Class 40 (serialization/deadlock), 53 (resources), 57 (admin
                // shutdown) and 08 (connection) are transient.
                match source.code() {
                    None => true,
                    Some(code) => {
                        let c = code.code();
                        c.starts_with("40")
                            || c.starts_with("53")
                            || c.starts_with("57")
                            || c.starts_with("08")
                    }
                }
            }
            DbError::Config(_) | DbError::BadRow { .. } => false,
        }
    }
}
