//! The gateway's errors, one type per boundary, and what each becomes for the client: an error
//! frame's `code`, an HTTP status with a JSON body ([`ApiError`]), or a websocket close code
//! ([`Close`]). Statuses and close codes are chosen here from the variants, never from text.

use chat_common::body::BodyError;
use thiserror::Error;
use tokio_tungstenite::tungstenite::Error as WsError;
use warp::http::StatusCode;
use warp::Reply;

/// Why a send or ack was refused. `code()` is the machine-readable reason clients see.
#[derive(Debug, Error)]
pub(crate) enum SendError {
    #[error("invalid recipient: {0}")]
    InvalidRecipient(String),
    #[error("cannot send a message to yourself")]
    SelfMessage,
    #[error("invalid client message id: {0}")]
    InvalidClientId(String),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("too many sends awaiting acknowledgement on this connection")]
    TooManyInFlight,
    /// Over the user's send rate; `retry_after` is when the next send would pass.
    #[error("sending too fast; slow down")]
    RateLimited { retry_after: std::time::Duration },
    #[error("kafka did not accept the record: {0}")]
    ProduceFailed(String),
    /// Delete-on-ack mode: the conversation's shard, which must hold the body's key before the
    /// message is sent on, does not answer. Nothing was sent; the send may be retried.
    #[error("the body could not be sealed (shard {shard}, which holds the conversation, is unavailable); retry later")]
    SealFailed { shard: usize },
}

impl SendError {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            SendError::InvalidRecipient(_) => "invalid_recipient",
            SendError::SelfMessage => "self_message",
            SendError::InvalidClientId(_) => "invalid_client_message_id",
            SendError::Body(e) => e.code(),
            SendError::TooManyInFlight => "too_many_in_flight",
            SendError::RateLimited { .. } => "rate_limited",
            SendError::ProduceFailed(_) => "produce_failed",
            SendError::SealFailed { .. } => "store_unavailable",
        }
    }
}

/// A request refused with a status, a machine-readable code and a message; rendered as
/// `{"code": ..., "message": ...}` with the status, like every refusal of the HTTP surface.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    /// Seconds to wait before retrying (`Retry-After`), for a refusal that a retry may cure.
    pub(crate) retry_after_secs: Option<u32>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// The JSON error answer.
    pub(crate) fn response(&self) -> warp::reply::Response {
        #[derive(serde::Serialize)]
        struct ErrorBody<'a> {
            code: &'a str,
            message: &'a str,
        }
        let body = ErrorBody {
            code: self.code,
            message: &self.message,
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(
                warp::http::header::RETRY_AFTER,
                warp::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

/// warp turns any `Reject` into a `Rejection` (`?` and `.into()` work); `http::recover` renders it.
impl warp::reject::Reject for ApiError {}

/// A refused send or ack on the REST path: its status by kind, its code and message as on the
/// websocket.
impl From<SendError> for ApiError {
    fn from(e: SendError) -> Self {
        let status = match &e {
            SendError::Body(BodyError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            SendError::TooManyInFlight | SendError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            SendError::ProduceFailed(_) | SendError::SealFailed { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        let mut api = ApiError::new(status, e.code(), e.to_string());
        if let SendError::RateLimited { retry_after } = e {
            // `Retry-After` counts whole seconds.
            api.retry_after_secs =
                Some(whole_units(retry_after, std::time::Duration::from_secs(1)));
        }
        api
    }
}

/// A wait told to a client, in whole `unit`s: rounded up, and at least 1 (a client told 0 would
/// retry at once and be refused again).
pub(crate) fn whole_units(wait: std::time::Duration, unit: std::time::Duration) -> u32 {
    let units = wait.as_nanos().div_ceil(unit.as_nanos().max(1));
    u32::try_from(units.max(1)).unwrap_or(u32::MAX)
}

/// Why a page of history or of the conversation list could not be read.
#[derive(Debug, Error)]
pub(crate) enum HistoryError {
    #[error("that is your own user id")]
    OwnConversation,
    /// The shard that holds what was asked for (the conversation's, or for the list the
    /// user's home shard) does not answer; other conversations are not affected, and this one
    /// can be retried later.
    #[error("shard {shard}, which holds this data, is unavailable; retry later")]
    ShardUnavailable { shard: usize },
    /// The store failed otherwise; the request may be retried.
    #[error("history is unavailable; retry")]
    Unavailable,
}

/// Seconds a client is told to wait (`Retry-After`) before asking an unavailable shard again.
const SHARD_RETRY_AFTER_SECS: u32 = 5;

impl From<HistoryError> for ApiError {
    fn from(e: HistoryError) -> Self {
        let (status, code) = match e {
            HistoryError::OwnConversation => (StatusCode::BAD_REQUEST, "self_message"),
            HistoryError::ShardUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "shard_unavailable")
            }
            HistoryError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "history_unavailable"),
        };
        let mut api = ApiError::new(status, code, e.to_string());
        if matches!(e, HistoryError::ShardUnavailable { .. }) {
            api.retry_after_secs = Some(SHARD_RETRY_AFTER_SECS);
        }
        api
    }
}

impl HistoryError {
    /// The error a failed read of the store becomes: an unavailable shard, named, or a failure
    /// of another kind.
    pub(crate) fn from_store(e: &db_writer::DbError) -> Self {
        match e.shard() {
            Some(shard) if e.is_unavailable() => HistoryError::ShardUnavailable { shard },
            _ => HistoryError::Unavailable,
        }
    }
}

/// A sync answered without all it should hold; the client should sync again later.
#[derive(Debug, Error)]
pub(crate) enum SyncIncomplete {
    /// The user's index could not be read (their home shard did not answer, or the store
    /// failed otherwise): nothing pending was sent (receipts and failures neither).
    #[error("your conversations cannot be read now ({0}); retry the sync later")]
    Failed(String),
    /// The shards of these conversations did not answer: everything else was sent, and the
    /// sync-done frame lists their peers.
    #[error("conversations with {} could not be synced (their shard is unavailable); sync again later", .peers.join(", "))]
    Partial {
        peers: Vec<String>,
        /// Their conversation keys: the connection pushes nothing live in them until a sync
        /// has read them (a live message there would come after a gap).
        conversations: Vec<String>,
    },
}

impl SyncIncomplete {
    /// The code of the error frame sent before the sync-done frame. Both kinds share it: a
    /// client that sees it syncs again later (as clients did before partial syncs existed);
    /// the sync-done frame's `unavailable_peers` tells a partial sync from a failed one.
    pub(crate) fn code(&self) -> &'static str {
        "sync_failed"
    }

    /// The peers whose conversations were left out (empty when the whole sync failed).
    pub(crate) fn unavailable_peers(&self) -> &[String] {
        match self {
            SyncIncomplete::Failed(_) => &[],
            SyncIncomplete::Partial { peers, .. } => peers,
        }
    }

    /// The conversations left out (empty when the whole sync failed).
    pub(crate) fn unavailable_conversations(&self) -> &[String] {
        match self {
            SyncIncomplete::Failed(_) => &[],
            SyncIncomplete::Partial { conversations, .. } => conversations,
        }
    }
}

/// Why a data frame from a client is not a `ClientFrame`.
#[derive(Debug, Error)]
pub(crate) enum FrameError {
    /// A protobuf frame larger than any body allows (a JSON frame is capped by the socket).
    #[error("frame too big")]
    TooBig,
    #[error("cannot decode frame: {0}")]
    Undecodable(String),
    #[error("unexpected frame type")]
    UnexpectedType,
}

impl FrameError {
    /// The close this frame calls for, if any; otherwise it is answered with a `bad_frame`.
    pub(crate) fn close(&self) -> Option<Close> {
        match self {
            FrameError::TooBig => Some(Close::TooBig),
            FrameError::Undecodable(_) | FrameError::UnexpectedType => None,
        }
    }
}

/// Why the server closes a websocket. Each reason has its close code (4000-4999 are
/// application-defined, the others standard) and the reason text sent with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Close {
    /// Another connection of the same user replaced this one, here or on another gateway.
    Replaced,
    /// The socket did not drain its queue; reconnect and sync.
    SlowConsumer,
    /// More live messages arrived during a sync than a connection holds back.
    TooManyHeld,
    /// The peer did not answer pings for two intervals.
    PingTimeout,
    /// A flood past the rate limit (standard "policy violation").
    RateLimited,
    /// The server is shutting down (standard "going away").
    GoingAway,
    /// A frame or message over the size limit (standard "message too big").
    TooBig,
    /// A violation of the websocket protocol (standard "protocol error").
    Protocol,
    /// Invalid UTF-8 in a text frame (standard "invalid frame payload data").
    BadUtf8,
    /// The connection's presence could not be published (standard "internal error").
    PresenceUnavailable,
}

impl Close {
    pub(crate) fn code(self) -> u16 {
        match self {
            Close::Replaced => 4001,
            Close::PingTimeout => 4002,
            Close::SlowConsumer | Close::TooManyHeld => 4008,
            Close::GoingAway => 1001,
            Close::Protocol => 1002,
            Close::BadUtf8 => 1007,
            Close::RateLimited => 1008,
            Close::TooBig => 1009,
            Close::PresenceUnavailable => 1011,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Close::Replaced => "replaced by a newer connection of the same user",
            Close::SlowConsumer => "socket not draining; reconnect to sync",
            Close::TooManyHeld => "too many messages during sync",
            Close::PingTimeout => "no answer to pings",
            Close::RateLimited => "rate limit exceeded",
            Close::GoingAway => "server shutting down",
            Close::TooBig => "frame or message too big",
            Close::Protocol => "websocket protocol violation",
            Close::BadUtf8 => "text frame is not UTF-8",
            Close::PresenceUnavailable => "presence unavailable; retry later",
        }
    }

    /// The close for an error the websocket layer reported while reading, by its variant: a
    /// violation of the protocol is 1002, invalid UTF-8 in a text frame 1007, an oversized frame
    /// or message 1009; a failed connection gets no close frame (`None`).
    pub(crate) fn for_socket_error(error: &WsError) -> Option<Close> {
        match error {
            WsError::Protocol(_) => Some(Close::Protocol),
            WsError::Utf8(_) => Some(Close::BadUtf8),
            WsError::Capacity(_) => Some(Close::TooBig),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refused_sends_keep_their_rest_statuses() {
        let status = |e: SendError| ApiError::from(e).status.as_u16();
        assert_eq!(
            status(SendError::Body(BodyError::TooLarge { size: 2, limit: 1 })),
            413
        );
        assert_eq!(status(SendError::Body(BodyError::Empty)), 400);
        let limited = || SendError::RateLimited {
            retry_after: Duration::ZERO,
        };
        assert_eq!(status(limited()), 429);
        assert_eq!(status(SendError::TooManyInFlight), 429);
        assert_eq!(status(SendError::ProduceFailed(String::new())), 503);
        assert_eq!(status(SendError::SelfMessage), 400);
    }

    #[test]
    fn a_send_over_the_user_rate_says_when_to_retry_in_whole_seconds() {
        let retry_after = |wait: Duration| {
            let api = ApiError::from(SendError::RateLimited { retry_after: wait });
            assert_eq!((api.status.as_u16(), api.code), (429, "rate_limited"));
            api.response().headers()[warp::http::header::RETRY_AFTER]
                .to_str()
                .expect("ascii")
                .to_owned()
        };
        assert_eq!(retry_after(Duration::ZERO), "1");
        assert_eq!(retry_after(Duration::from_millis(10)), "1");
        assert_eq!(retry_after(Duration::from_secs(1)), "1");
        assert_eq!(retry_after(Duration::from_millis(1001)), "2");
        assert_eq!(retry_after(Duration::from_secs(90)), "90");
        assert!(ApiError::from(SendError::TooManyInFlight)
            .response()
            .headers()
            .get("retry-after")
            .is_none());
    }

    #[test]
    fn an_unavailable_shard_is_a_503_naming_it_with_a_retry_after() {
        let api = ApiError::from(HistoryError::ShardUnavailable { shard: 1 });
        assert_eq!((api.status.as_u16(), api.code), (503, "shard_unavailable"));
        assert!(api.message.contains("shard 1"), "{}", api.message);
        let response = api.response();
        assert_eq!(response.headers()[warp::http::header::RETRY_AFTER], "5");
        let api = ApiError::from(HistoryError::Unavailable);
        assert_eq!(
            (api.status.as_u16(), api.code),
            (503, "history_unavailable")
        );
        assert!(api.response().headers().get("retry-after").is_none());
    }

    #[test]
    fn a_store_error_that_is_not_an_unavailable_shard_names_no_shard() {
        // (An unavailable shard is told apart by `DbError::is_unavailable`, tested in db-writer,
        // and end to end in e2e/tests/shard_outage.rs.)
        let bad = db_writer::DbError::BadRow {
            shard: 2,
            reason: "x".into(),
        };
        assert!(matches!(
            HistoryError::from_store(&bad),
            HistoryError::Unavailable
        ));
    }
}
