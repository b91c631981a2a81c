//! Reading typed configuration from environment variables, with defaults that run the local stack.

use std::str::FromStr;

use thiserror::Error;

/// A variable was set to something that does not parse.
#[derive(Debug, Error)]
#[error("environment variable {name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    /// Variable `name`, set to `value`, is refused for `reason`.
    pub fn new(name: &str, value: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            name: name.to_owned(),
            value: value.into(),
            reason: reason.to_string(),
        }
    }
}

/// The variable's value, or `default` when it is unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => default.to_owned(),
    }
}

/// The variable parsed as `T`, or `default` when unset or empty.
pub fn env_parse<T: FromStr>(name: &str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().map_err(|e: T::Err| ConfigError {
            name: name.to_owned(),
            value: v,
            reason: e.to_string(),
        }),
        _ => Ok(default),
    }
}

/// Default Kafka bootstrap servers of the local stack.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// Default shard DSNs of the local stack (4 databases on one Postgres server).
pub const DEFAULT_SHARD_DSNS: &str = "postgres://chat@127.0.0.1:54320/chat_shard_0,postgres://chat@127.0.0.1:54320/chat_shard_1,postgres://chat@127.0.0.1:54320/chat_shard_2,postgres://chat@127.0.0.1:54320/chat_shard_3";
/// Default HS256 secret of the local stack. Production must set `JWT_SECRET` or `JWT_PUBLIC_KEY`.
pub const DEV_JWT_SECRET: &str = "dev-only-secret-change-me";
