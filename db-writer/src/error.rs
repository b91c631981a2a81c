use thiserror::Error;

/// Errors at the shard boundary, in three classes a caller acts on differently:
/// - retryable ([`DbError::is_retryable`]): the same operation may succeed later (a shard down,
///   a pool timeout, a lost connection, a serialisation failure or deadlock);
/// - refused data ([`DbError::is_data_error`]): the data itself breaks a rule of the store (a
///   value Postgres cannot hold, a constraint, a program limit, an invalid row); it fails again
///   whoever tries, so a writer sets the record aside instead of retrying it;
/// - anything else (a schema or configuration problem, a broken invariant): neither the data's
///   fault nor transient; a writer keeps retrying, slowly, until an operator fixes the cause,
///   since setting the records aside would lose every message behind the fault.
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
    /// A row or record that the store cannot take as it is (an invalid id or key).
    #[error("shard {shard}: stored row is invalid: {reason}")]
    BadRow { shard: usize, reason: String },
    /// Something the store's own logic rules out happened (a bug, not the data's fault).
    #[error("shard {shard}: invariant broken: {reason}")]
    Invariant { shard: usize, reason: String },
}

impl DbError {
    /// Wraps a Postgres error of `shard` (for `map_err`).
    pub(crate) fn pg(shard: usize) -> impl Fn(tokio_postgres::Error) -> DbError + Copy {
        move |source| DbError::Postgres { shard, source }
    }

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
            DbError::Config(_) | DbError::BadRow { .. } | DbError::Invariant { .. } => false,
        }
    }

    /// True when the data written is at fault and no retry can succeed: SQLSTATE class 22 (data
    /// exception, e.g. 22021 for U+0000 in text), 23 (integrity constraint) or 54 (program limit,
    /// e.g. a value too large for an index), or a [`DbError::BadRow`].
    pub fn is_data_error(&self) -> bool {
        match self {
            DbError::BadRow { .. } => true,
            DbError::Postgres { source, .. } => source.code().is_some_and(|code| {
                let c = code.code();
                c.starts_with("22") || c.starts_with("23") || c.starts_with("54")
            }),
            DbError::Pool { .. } | DbError::Config(_) | DbError::Invariant { .. } => false,
        }
    }

    /// The shard the error came from, when it came from one.
    pub fn shard(&self) -> Option<usize> {
        match self {
            DbError::Pool { shard, .. }
            | DbError::Postgres { shard, .. }
            | DbError::BadRow { shard, .. }
            | DbError::Invariant { shard, .. } => Some(*shard),
            DbError::Config(_) => None,
        }
    }

    /// True when the shard did not answer: no connection could be had from its pool, or the
    /// connection failed (no SQLSTATE: refused, reset, closed; class 08, connection; 57, the
    /// server shutting down or starting; 53, out of connections). What a reader tells its
    /// client as "that shard is unavailable, retry later", as opposed to a fault of the query
    /// or of the data, which retrying does not cure.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Pool { .. } => true,
            DbError::Postgres { source, .. } => source.code().is_none_or(|code| {
                let c = code.code();
                c.starts_with("08") || c.starts_with("57") || c.starts_with("53")
            }),
            DbError::Config(_) | DbError::BadRow { .. } | DbError::Invariant { .. } => false,
        }
    }

    /// A one-line reason without the values involved: Postgres's primary message and SQLSTATE,
    /// without its DETAIL (which quotes the failing row, body included). For a message's sender
    /// and the failure row kept for its sync.
    pub fn summary(&self) -> String {
        match self {
            DbError::Postgres { source, .. } => match source.as_db_error() {
                Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                None => self.to_string(),
            },
            _ => self.to_string(),
        }
    }

    /// The SQLSTATE, when Postgres answered with one (for logs and dead-letter reasons).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Postgres { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_rows_are_data_errors_and_invariants_are_not() {
        let bad = DbError::BadRow {
            shard: 0,
            reason: "x".into(),
        };
        assert!(bad.is_data_error() && !bad.is_retryable());
        let invariant = DbError::Invariant {
            shard: 0,
            reason: "x".into(),
        };
        assert!(!invariant.is_data_error() && !invariant.is_retryable());
        let config = DbError::Config("x".into());
        assert!(!config.is_data_error() && !config.is_retryable());
        assert!(!bad.is_unavailable() && !invariant.is_unavailable() && !config.is_unavailable());
        assert_eq!((bad.shard(), config.shard()), (Some(0), None));
    }

    #[test]
    fn an_empty_pool_is_an_unavailable_shard() {
        let e = DbError::Pool {
            shard: 3,
            source: deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait),
        };
        assert!(e.is_unavailable() && e.is_retryable());
        assert_eq!(e.shard(), Some(3));
    }
}
