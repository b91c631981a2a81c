//! Reading typed configuration, with defaults that run the local stack.
//!
//! The services declare their settings once, as clap structs whose every field is a flag with an
//! environment variable behind it (`--shard-dsns` / `SHARD_DSNS`): `--help` lists each setting
//! with its variable and default, and `docs/configuration.md` is checked against the same
//! declaration. [`parse_args`] reads such a struct the way the services always read their
//! environment: a variable set to the empty string counts as unset. The settings shared by the
//! services are declared here ([`ShardArgs`]) and in [`crate::kafka::KafkaArgs`].

use std::str::FromStr;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, Command, Parser};
use thiserror::Error;

/// Re-exported so that code which introspects a service's declaration (the configuration page's
/// test) uses the same clap as the declaration.
pub use clap;

/// A variable was set to something that does not parse, or one that must be set is not (its
/// value empty: an empty variable counts as unset).
#[derive(Debug, Error)]
#[error("{}", self.describe())]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    fn describe(&self) -> String {
        let (name, value, reason) = (&self.name, &self.value, &self.reason);
        if value.is_empty() {
            format!("environment variable {name} is not set: {reason}")
        } else {
            format!("environment variable {name}={value:?} is invalid: {reason}")
        }
    }

    /// Variable `name`, set to `value`, is refused for `reason`.
    pub fn new(name: &str, value: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            name: name.to_owned(),
            value: value.into(),
            reason: reason.to_string(),
        }
    }
}

/// The flag for the environment variable `name`: lower case, dashes for underscores
/// (`SHARD_DSNS` is `--shard-dsns`). Every service setting follows it.
pub fn flag_for(name: &str) -> String {
    format!("--{}", name.to_ascii_lowercase().replace('_', "-"))
}

/// Parses the process's arguments and environment into `T`. On `--help` and `--version` it
/// prints and exits 0; on a value that does not parse it prints what is wrong (naming the flag,
/// and the variable when the value came from one) and exits 2. Nothing else happens first: no
/// log line, no connection.
pub fn parse_args<T: Parser>() -> T {
    try_parse_args_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse_args`] over the given arguments (the first is the program name), returning the error.
pub fn try_parse_args_from<T, I, A>(args: I) -> Result<T, clap::Error>
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    try_parse_matches_from(args).map(|(parsed, _)| parsed)
}

/// [`try_parse_args_from`], with the matches too: they tell where each value came from (the
/// command line, a variable, the default).
pub fn try_parse_matches_from<T, I, A>(args: I) -> Result<(T, clap::ArgMatches), clap::Error>
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    let mut cmd = T::command().mut_args(empty_variable_is_unset);
    let matches = match cmd.try_get_matches_from_mut(args) {
        Ok(matches) => matches,
        Err(mut e) => {
            name_the_variable(&cmd, &mut e);
            return Err(e);
        }
    };
    let parsed = T::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    Ok((parsed, matches))
}

/// A variable set to the empty string counts as unset (the services always read it so): the
/// argument forgets it, and its default applies. clap would otherwise parse the empty string.
fn empty_variable_is_unset(arg: Arg) -> Arg {
    let empty = arg
        .get_env()
        .and_then(std::env::var_os)
        .is_some_and(|v| v.is_empty());
    if empty {
        arg.env(clap::builder::Resettable::Reset)
    } else {
        arg
    }
}

/// The argument of `cmd` that a clap error's `InvalidArg` names (`--name <VALUE>`).
fn invalid_arg<'a>(cmd: &'a Command, e: &clap::Error) -> Option<&'a Arg> {
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = shown.split_whitespace().next()?.strip_prefix("--")?;
    cmd.get_arguments().find(|a| a.get_long() == Some(long))
}

/// When a bad value came from an environment variable, says so: clap's message names only the
/// flag, and an operator who set the variable would look for the variable.
fn name_the_variable(cmd: &Command, e: &mut clap::Error) {
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return;
    }
    let (Some(arg), Some(ContextValue::String(value))) =
        (invalid_arg(cmd, e), e.get(ContextKind::InvalidValue))
    else {
        return;
    };
    let Some(name) = arg.get_env() else { return };
    if std::env::var_os(name).is_some_and(|v| v.as_os_str() == value.as_str()) {
        let tip = format!(
            "the value comes from the environment variable {}",
            name.to_string_lossy()
        );
        e.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![tip.into()]),
        );
    }
}

/// A [`try_parse_args_from`] error as a [`ConfigError`] naming the variable, for settings read
/// from the environment alone (no command line of their own).
pub fn config_error<T: Parser>(e: &clap::Error) -> ConfigError {
    let cmd = T::command();
    let name = invalid_arg(&cmd, e)
        .and_then(Arg::get_env)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    let text = e.to_string();
    let reason = text.lines().next().unwrap_or_default();
    let reason = reason.strip_prefix("error: ").unwrap_or(reason);
    ConfigError::new(&name, value, reason)
}

/// The shards a service reads or writes. Turned into a `db_writer::ShardConfig` by the service
/// (this crate does not depend on the store).
#[derive(Clone, Debug, clap::Args)]
pub struct ShardArgs {
    /// Shard DSNs, comma separated, in shard order: the order is the layout (the locator maps a
    /// conversation to a position in this list).
    #[arg(
        long,
        env = "SHARD_DSNS",
        default_value = DEFAULT_SHARD_DSNS,
        value_name = "DSN,...",
        hide_env_values = true
    )]
    pub shard_dsns: String,
    /// Connections per shard pool. Mind Postgres's max_connections: (gateways + multiplexers) x
    /// pool size per shard.
    #[arg(long, env = "SHARD_POOL_SIZE", default_value_t = 8, value_name = "N")]
    pub shard_pool_size: usize,
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
/// Default HS256 secret of the local stack. A gateway uses it only with `DEV_TOKENS=true`;
/// otherwise it refuses to start without `JWT_SECRET` or `JWT_PUBLIC_KEY_FILE`.
pub const DEV_JWT_SECRET: &str = "dev-only-secret-change-me";
