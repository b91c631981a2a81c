//! What every process of the chat pipeline shares.
//!
//! - [`ids`]: validated user, gateway, client-message and conversation ids; message id derivation.
//! - [`message`]: a message, an ack and a receipt made of validated ids (what travels past the
//!   edge), and their conversions to and from the wire types.
//! - [`body`]: the rule for a message body (size, no U+0000), checked at the edge and the store.
//! - [`auth`]: JWT verification (and minting for the local stack).
//! - [`kafka`]: producer and consumer factories with the project's durability settings.
//! - [`producer`]: the Kafka producer they build (sends that return futures of their reports).
//! - [`presence`]: the routing table read from the compacted `presence` topic.
//! - [`rate`]: a switch thrown by a rate (linger, or wait for a batch, only under load).
//! - [`topics`]: topic names and settings (from `infra/topics.json`), explicit creation.
//! - [`config`]: typed environment configuration helpers and local-stack defaults.
//! - [`telemetry`]: tracing and the Prometheus recorder; [`http`]: health, readiness, metrics routes.
//! - [`shutdown`]: the SIGTERM cancellation token.

pub mod auth;
pub mod body;
pub mod config;
pub mod http;
pub mod ids;
pub mod kafka;
pub mod message;
pub mod presence;
pub mod producer;
pub mod rate;
pub mod seal;
pub mod shutdown;
pub mod telemetry;
pub mod topics;

/// Milliseconds since the Unix epoch, the time unit of every timestamp on the wire.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
