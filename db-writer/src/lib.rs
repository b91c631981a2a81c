//! The store of the chat pipeline: the shards, and everything read from or written to them.
//!
//! Every service uses it: the multiplexer writes through it, the gateway reads through it, and
//! the `db-writer` binary exposes it to operators (migrations, replay, export). One module per
//! concern, each owning its SQL and its part of [`Shards`]:
//!
//! - [`locator`]: which shard holds a conversation (jump consistent hash of its key).
//! - [`shards`]: the pools to the shards, and the two ways a concern reaches them (one shard per
//!   conversation, every shard for a user's reads).
//! - [`schema`]: the migrations.
//! - [`roles`]: the roles the processes sign in as (owner, writer, reader), and their grants.
//! - [`messages`]: idempotent batched writes with gap-free per-conversation sequences.
//! - [`acks`]: acks as watermarks (with erasure in delete-on-ack mode), and receipts.
//! - [`keys`]: the body keys of delete-on-ack mode (crypto-shredding).
//! - [`queries`]: history pages, and the sync query of the time before the user index.
//! - [`user_index`]: each user's conversations in their home shard: what a connect reads first,
//!   and the conversation list; [`index_build`]: building it from the shards, and checking it.
//! - [`retention`]: the retention mode, and the expiry of unacknowledged messages.
//! - [`failures`]: messages set aside for good, remembered for their sender's next sync.
//! - [`inbound`]: the `inbound` log's edge: records decoded once into domain types.
//! - [`replay`]: rebuilding or resharding the stores from the `inbound` log.
//! - [`export`]: messages for data teams, as JSON lines or Parquet, by time range or incrementally
//!   (a cursor of per-shard snapshots).
//! - [`catalogue`]: the store's metric families, for the services to register at start.
//!
//! Past [`inbound`] and the row decoding of `rows`, only validated types travel
//! (`chat_common::message`): the store never parses an id it was given.

pub mod acks;
pub mod catalogue;
pub mod error;
pub mod export;
pub mod failures;
pub mod inbound;
pub mod index_build;
pub mod keys;
pub mod locator;
pub mod messages;
pub mod queries;
pub mod replay;
pub mod retention;
pub mod roles;
mod rows;
pub mod schema;
pub mod shards;
mod tls;
pub mod user_index;

pub use acks::{Acked, ReceiptFor, Watermark};
pub use error::DbError;
pub use export::ExportError;
pub use failures::FailedMessage;
pub use index_build::{IndexViolation, Rebuilt};
pub use locator::Locator;
pub use messages::Stored;
pub use retention::{Retention, SweepIndexError, UnknownRetention};
pub use shards::{Plans, ShardConfig, ShardDown, Shards};
pub use tls::{connect, redacted};
pub use user_index::{ConversationSummary, IndexUpdates, ListCursor, Preview, SyncRead};
