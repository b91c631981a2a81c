//! The multiplexer's metric families: name, type, HELP text and the label values known at start.
//! [`start`](crate::start) registers them (with those of the store and the presence view), so
//! every series below exists from the first scrape. A family recorded anywhere in this crate is
//! listed here, and in `infra/observability/metrics.json` for the dashboard and the alerts.

use chat_common::telemetry::Family;

use crate::pipeline::DEAD_LETTER_CODES;

/// Kinds of `multiplexer_errors_total`.
const ERROR_KINDS: &[&str] = &[
    "consume",
    "failure_rows",
    "index",
    "invalid_record",
    "produce",
    "shard",
    "sweep_index",
];

/// The families this crate records.
pub(crate) const FAMILIES: &[Family] = &[
    Family::gauge(
        "multiplexer_consumer_lag",
        "Records of an inbound partition this multiplexer owns that its group has not committed yet: the partition's high watermark minus the group's committed offset (0 once the partition is revoked).",
    )
    .open("partition"),
    Family::gauge(
        "multiplexer_held_records",
        "Inbound records held aside because a shard they need is down (their conversation's, or a user's home shard), tried again once it answers; the stored offsets stay below the oldest.",
    ),
    Family::seconds(
        "multiplexer_inbound_wait_seconds",
        "Time from an inbound record's timestamp (the producing gateway's clock) to its consumption.",
    ),
    Family::seconds(
        "multiplexer_batch_wait_seconds",
        "Time from an inbound record's consumption to the close of the batch it joins (a batch closes MULTIPLEXER_BATCH_WAIT_MS after its first record, or full).",
    ),
    Family::seconds(
        "multiplexer_batch_seconds",
        "Time to store and route one batch, from taking it to storing its offsets.",
    ),
    Family::histogram(
        "multiplexer_batch_size",
        "Messages and acks of one batch.",
    ),
    Family::seconds(
        "multiplexer_store_seconds",
        "Time to store a batch's messages and apply its acks in the shards.",
    ),
    Family::seconds(
        "multiplexer_stage_wait_seconds",
        "Time a stored batch waits for the second stage (its index write) to take it.",
    ),
    Family::seconds(
        "multiplexer_index_seconds",
        "Time to write a batch's moves of the users' conversation index.",
    ),
    Family::counter(
        "multiplexer_index_rows_total",
        "Rows of the users' conversation index written.",
    ),
    Family::seconds(
        "multiplexer_presence_catch_up_seconds",
        "Time to read the presence log's end and catch up with it, after a batch's index write and before it is routed (with MULTIPLEXER_EARLY_PUSH, routed again).",
    ),
    Family::seconds(
        "multiplexer_route_seconds",
        "Time from producing a batch's outbound records until every delivery report.",
    ),
    Family::counter(
        "multiplexer_messages_stored_total",
        "Messages stored for the first time.",
    ),
    Family::counter(
        "multiplexer_messages_duplicate_total",
        "Messages found already stored (a replay or a client retry), stored nothing new.",
    ),
    Family::counter(
        "multiplexer_routed_total",
        "Pushes routed, by destination (a gateway's outbound topic; offline: the recipient is on no gateway; no_topic: the presence log names a gateway whose outbound topic does not exist).",
    )
    .known("to", &["gateway", "offline", "no_topic"]),
    Family::counter(
        "multiplexer_routed_again_total",
        "With MULTIPLEXER_EARLY_PUSH: pushes routed a second time, after the index write, to a user whose session changed since the batch was first routed.",
    ),
    Family::counter(
        "multiplexer_outbound_records_total",
        "Kafka records produced to outbound topics (one record may batch many pushes).",
    ),
    Family::counter(
        "multiplexer_dead_letters_total",
        "Inbound records set aside on inbound-dlq, by code.",
    )
    .known("code", &DEAD_LETTER_CODES),
    Family::counter(
        "multiplexer_errors_total",
        "Errors by kind (shard: a store retried in place; produce: an outbound produce retried; consume, invalid_record: inbound; index, failure_rows, sweep_index: other writes).",
    )
    .known("kind", ERROR_KINDS),
    Family::counter(
        "multiplexer_messages_expired_total",
        "Unacknowledged messages erased by the delete-on-ack expiry sweep.",
    ),
    Family::counter(
        "multiplexer_rows_purged_total",
        "Delete-on-ack mode: rows of erased messages (acked or expired) and records of messages set aside, deleted once the metadata window (ERASED_ROW_TTL_SECS) passed.",
    ),
];
