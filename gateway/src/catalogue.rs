//! The gateway's metric families: name, type, HELP text and the label values known at start.
//! [`start`](crate::start) registers them (with those of the store and the presence view), so
//! every series below exists from the first scrape. A family recorded anywhere in this crate is
//! listed here, and in `infra/observability/metrics.json` for the dashboard and the alerts.

use chat_common::telemetry::Family;

/// Kinds of `gateway_errors_total`.
const ERROR_KINDS: &[&str] = &[
    "accept",
    "bad_frame",
    "consume",
    "invalid_record",
    "misrouted_record",
    "open",
    "produce",
    "seal",
    "sync",
];

/// Reasons of `gateway_http_closed_total` (see `server` and `http`).
const HTTP_CLOSE_REASONS: &[&str] = &[
    "body_timeout",
    "close_overdue",
    "idle",
    "request_timeout",
    "transfer_encoding",
];

/// Every websocket close code the server sends (`error::Close::code`).
const CLOSE_CODES: &[&str] = &[
    "1001", "1002", "1007", "1008", "1009", "1011", "4001", "4002", "4008",
];

/// The families this crate records.
pub(crate) const FAMILIES: &[Family] = &[
    Family::gauge("gateway_connections", "Websocket connections held now."),
    Family::counter(
        "gateway_connections_opened_total",
        "Websocket sessions opened (after authentication and the upgrade).",
    ),
    Family::counter(
        "gateway_connections_closed_total",
        "Websocket sessions ended, whoever closed them.",
    ),
    Family::counter(
        "gateway_connections_refused_total",
        "TCP connections refused at accept, by reason (per_address: the address holds MAX_CONNS_PER_ADDR).",
    )
    .known("reason", &["per_address"]),
    Family::counter(
        "gateway_closed_by_server_total",
        "Websocket sessions the gateway closed, by close code.",
    )
    .known("code", CLOSE_CODES),
    Family::counter(
        "gateway_slow_consumer_closed_total",
        "Sessions closed because their socket did not drain its bounded queue.",
    ),
    Family::counter(
        "gateway_http_closed_total",
        "HTTP connections the gateway closed for a time bound or a framing rule, by reason.",
    )
    .known("reason", HTTP_CLOSE_REASONS),
    Family::counter(
        "gateway_auth_refused_total",
        "Requests refused for a missing, invalid or expired token.",
    ),
    Family::counter(
        "gateway_origin_refused_total",
        "Websocket upgrades refused for an Origin not in ALLOWED_ORIGINS.",
    ),
    Family::counter(
        "gateway_rate_limited_total",
        "Sends refused by a rate limit, by scope (user across connections, or one connection).",
    )
    .known("scope", &["connection", "user"]),
    Family::counter(
        "gateway_errors_total",
        "Errors by kind (produce: a send Kafka did not acknowledge; consume, invalid_record, misrouted_record: the outbound topic; bad_frame: a client frame; sync: a sync query; accept: the listener; seal, open: the body keys of delete-on-ack mode, not issued or not read).",
    )
    .known("kind", ERROR_KINDS),
    Family::counter(
        "gateway_messages_accepted_total",
        "Messages produced to inbound and acknowledged by Kafka (the sender is told accepted).",
    ),
    Family::counter(
        "gateway_produce_queue_full_total",
        "Sends that waited for room in the ordered produce queue (MAX_IN_FLIGHT reached).",
    ),
    Family::seconds(
        "gateway_produce_seconds",
        "Time from producing a message to inbound until Kafka's delivery report.",
    ),
    Family::seconds(
        "gateway_seal_seconds",
        "Delete-on-ack mode: time to seal a send's body, with the wait for its key when the conversation's shard's pool of keys issued ahead was empty.",
    ),
    Family::seconds(
        "gateway_key_issue_seconds",
        "Delete-on-ack mode: time of one statement issuing body keys (for the pool, and for the sends waiting).",
    ),
    Family::histogram(
        "gateway_key_issue_batch",
        "Delete-on-ack mode: body keys issued by one statement.",
    ),
    Family::counter(
        "gateway_key_waits_total",
        "Delete-on-ack mode: sends that found their shard's pool of keys empty and waited for the next statement.",
    ),
    Family::counter(
        "gateway_keys_unused_total",
        "Delete-on-ack mode: keys issued ahead and left unused, older than a pool keeps them (the expiry sweep destroys them).",
    ),
    Family::counter(
        "gateway_outbound_total",
        "Records of the outbound topic handled, by outcome (pushed to a socket, its user not connected here, or in delete-on-ack mode a deliver whose key an ack or the expiry destroyed meanwhile).",
    )
    .known("outcome", &["not_connected", "pushed", "shredded"]),
    Family::seconds(
        "gateway_outbound_open_seconds",
        "Time from taking outbound records to pushing them: in delete-on-ack mode the read of their body keys and the opening, and the wait for the records before them (per chunk of records taken at once).",
    ),
    Family::seconds(
        "gateway_outbound_wait_seconds",
        "Time from an outbound record's timestamp (the multiplexer's clock) to its consumption here.",
    ),
    Family::seconds(
        "gateway_socket_write_seconds",
        "Time to write and flush frames to one socket.",
    ),
    Family::seconds(
        "chat_e2e_latency_seconds",
        "Accept-to-push latency: from the gateway accepting a message to its push to the recipient's socket.",
    ),
    Family::counter(
        "gateway_duplicates_suppressed_total",
        "Live pushes dropped because the session had already sent that message (sync and live overlap).",
    ),
    Family::counter(
        "gateway_synced_messages_total",
        "Messages sent to clients by syncs.",
    ),
    Family::seconds(
        "gateway_sync_wait_seconds",
        "Time a sync waited for one of the MAX_CONCURRENT_SYNCS slots.",
    ),
    Family::counter(
        "gateway_tls_reloads_total",
        "Changes of TLS_CERT_FILE / TLS_KEY_FILE seen, by result (ok: the new pair is served; error: it is not, and the previous one stays).",
    )
    .known("result", &["error", "ok"]),
    Family::counter(
        "gateway_tls_handshakes_failed_total",
        "TLS handshakes on the public listener that failed or did not finish within HANDSHAKE_TIMEOUT_SECS.",
    ),
    Family::histogram(
        "gateway_sync_shard_queries",
        "Shard queries of one sync (1 for a user with nothing pending).",
    ),
    Family::gauge(
        "gateway_shard_up",
        "1 when the shard answered this gateway's last readiness check, 0 when it did not (the gateway stays ready while one shard answers).",
    )
    .open("shard"),
];
