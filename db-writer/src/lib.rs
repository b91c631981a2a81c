//! The shard layer of the chat pipeline.
//!
//! - [`locator`]: which shard holds a conversation (jump consistent hash of its key).
//! - [`shards`]: the pools to the shards, and the schema migrations this crate owns.
//! - [`inbound`]: decoding `inbound` records and applying acks (shared by the multiplexer and replay).
//! - [`failures`]: messages set aside for good, remembered for their sender's next sync.
//! - [`replay`]: rebuilding or resharding the stores from the `inbound` log.
//! - [`store`]: idempotent batched writes with gap-free per-conversation sequences, acks
//!   (with erasure in delete-on-ack mode), history pages and the sync query.
//!
//! The multiplexer writes through it, the gateway reads through it, and the `db-writer` binary
//! exposes it to operators (migrations, and later replay from the `inbound` log).

pub mod error;
pub mod failures;
pub mod inbound;
pub mod locator;
pub mod replay;
pub mod shards;
pub mod store;

pub use error::DbError;
pub use failures::FailedMessage;
pub use locator::Locator;
pub use shards::{ShardConfig, Shards};
pub use store::{AckedUpTo, Retention, Stored};
