//! The store's metric families: name, type and HELP text. The services that use the store
//! register them at start with their own (see `chat_common::telemetry::register_metrics`).

use chat_common::telemetry::Family;

/// What every user of the shards records: the wait for a pooled connection.
pub const POOL_FAMILIES: &[Family] = &[Family::seconds(
    "db_pool_wait_seconds",
    "Time waiting for a connection of a shard's pool, by shard index (its series appear with the first wait).",
)
.open("shard")];

/// What the writer of messages and acks records (the multiplexer).
pub const WRITE_FAMILIES: &[Family] = &[
    Family::seconds(
        "db_commit_seconds",
        "Time to store one shard's part of a message batch: its first attempt, and its second when the first found a message already stored.",
    ),
    Family::counter(
        "db_messages_written_total",
        "Messages written to the shards (first copies; retries and replays write nothing).",
    ),
    Family::counter(
        "db_store_lookups_total",
        "Batches written again after looking up stored copies (the batch held a replay or a retry).",
    ),
    Family::counter(
        "db_skipped_copy_keys_destroyed_total",
        "Delete-on-ack mode: body keys destroyed by the store because their copy was not stored (a client's retry, sealed under a key of its own, of a message stored already).",
    ),
    Family::seconds(
        "db_ack_seconds",
        "Time of one shard's ack statement for a batch.",
    ),
];
