//! HTTP surface: `/ws` (websocket), `PUT|GET /messages/{user_id}`, `GET /dev/token/{user}` (local
//! stack only) on the public listener ([`routes`]), and the operational routes on their own
//! ([`ops_routes`]). Authentication happens here, before any upgrade: a request without a valid
//! token gets 401 and never becomes a websocket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use chat_common::http::ReadyCheck;
use chat_common::ids::{ConversationKey, UserId};
use db_writer::{ConversationSummary, ListCursor};
use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::app::{AddrSlot, App, ConversationPage, History};
use crate::error::ApiError;
use crate::server::ConnectionSlot;
use crate::upgrade::{self, Handshake, SocketConfig};
use crate::ws::{self, Format};

/// A refusal with `status`, `code` and `message` (see [`ApiError`]).
fn reject(status: StatusCode, code: &'static str, message: impl Into<String>) -> Rejection {
    ApiError::new(status, code, message).into()
}

/// The caller's user id, from `Authorization: Bearer <token>` or the `access_token` query
/// parameter (browsers cannot set headers on a websocket). Tokens are never logged.
fn authenticated(app: Arc<App>) -> impl Filter<Extract = (UserId,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(query_map())
        .and_then(
            move |header: Option<String>, query: HashMap<String, String>| {
                let app = app.clone();
                async move {
                    let token = header
                        .as_deref()
                        .and_then(|h| {
                            h.strip_prefix("Bearer ")
                                .or_else(|| h.strip_prefix("bearer "))
                        })
                        .map(str::to_owned)
                        .or_else(|| query.get("access_token").cloned());
                    let Some(token) = token else {
                        metrics::counter!("gateway_auth_refused_total").increment(1);
                        return Err(reject(
                            StatusCode::UNAUTHORIZED,
                            "unauthorized",
                            "missing token",
                        ));
                    };
                    app.config().verifier.verify(&token).map_err(|e| {
                        metrics::counter!("gateway_auth_refused_total").increment(1);
                        reject(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
                    })
                }
            },
        )
}

/// Refuses (403) a browser whose Origin is not allowed: the defence against cross-site
/// websocket hijacking. Clients that send no Origin (not browsers) pass.
fn origin_allowed(app: Arc<App>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("origin")
        .and(warp::header::optional::<String>("host"))
        .and_then(move |origin: Option<String>, host: Option<String>| {
            let app = app.clone();
            async move {
                let Some(origin) = origin else { return Ok(()) };
                let allowed = if app.config().allowed_origins.is_empty() {
                    let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
                    host.as_deref() == Some(authority)
                } else {
                    app.config().allowed_origins.contains(&origin)
                };
                if allowed {
                    Ok(())
                } else {
                    metrics::counter!("gateway_origin_refused_total").increment(1);
                    Err(reject(
                        StatusCode::FORBIDDEN,
                        "origin_not_allowed",
                        "this origin may not open a websocket here",
                    ))
                }
            }
        })
        .untuple_one()
}

/// The address slot the connection took when it was accepted, handed over to the websocket it
/// becomes (the per-address limit itself is applied at accept, see [`crate::server`]). Last
/// in the route, after every check that can refuse: a refused upgrade leaves the slot with
/// its connection.
fn connection_slot() -> impl Filter<Extract = (AddrSlot,), Error = Rejection> + Clone {
    warp::ext::optional::<ConnectionSlot>().and_then(|slot: Option<ConnectionSlot>| async move {
        slot.and_then(|s| s.take()).ok_or_else(|| {
            reject(
                StatusCode::BAD_REQUEST,
                "not_websocket",
                "this connection cannot be upgraded",
            )
        })
    })
}

/// A JSON request body, read within `timeout`: 413 over `limit` (from `Content-Length`, before
/// reading), 411 without a `Content-Length`, 415 for a content type other than JSON (none is
/// taken as JSON), 408 when the body is not all there in time (the connection is closed then,
/// see [`recover`]), 400 when it does not parse as `T`.
fn json_body<T: serde::de::DeserializeOwned + Send>(
    limit: u64,
    timeout: std::time::Duration,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(limit)
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::stream())
        .and_then(move |content_type: Option<String>, body| async move {
            if !content_type.as_deref().is_none_or(is_json) {
                return Err(reject(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send application/json",
                ));
            }
            let bytes = tokio::time::timeout(timeout, read_all(body))
                .await
                .map_err(|_| {
                    metrics::counter!("gateway_http_closed_total", "reason" => "body_timeout")
                        .increment(1);
                    reject(
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        "the request body did not arrive in time",
                    )
                })?
                .map_err(|e| reject(StatusCode::BAD_REQUEST, "bad_body", e.to_string()))?;
            serde_json::from_slice::<T>(&bytes)
                .map_err(|e| reject(StatusCode::BAD_REQUEST, "bad_body", e.to_string()))
        })
}

/// `application/json` or a `+json` type, any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
        _ => false,
    }
}

/// The whole body (its size is bounded by the `Content-Length` limit checked before).
async fn read_all<S, B>(body: S) -> Result<Vec<u8>, warp::Error>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use futures_util::StreamExt;
    let mut body = std::pin::pin!(body);
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk?;
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out)
}

fn query_map() -> impl Filter<Extract = (HashMap<String, String>,), Error = Infallible> + Clone {
    warp::query::<HashMap<String, String>>()
        .or(warp::any().map(HashMap::new))
        .unify()
}

fn with_app(app: Arc<App>) -> impl Filter<Extract = (Arc<App>,), Error = Infallible> + Clone {
    warp::any().map(move || app.clone())
}

/// Body of `PUT /messages/{user_id}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendBody {
    body: String,
    /// Optional; with it a retry is idempotent. Without it each request is a new message.
    client_message_id: Option<String>,
}

/// Query of `GET /messages/{user_id}`.
struct HistoryQuery {
    before: Option<u64>,
    limit: Option<u32>,
}

/// Answer of `GET /messages/{user_id}`.
#[derive(Serialize)]
struct HistoryPage {
    messages: Vec<chat_proto::v1::ChatMessage>,
    /// Pass as `before` to get the previous page; absent at the beginning of the conversation.
    #[serde(rename = "nextBefore", skip_serializing_if = "Option::is_none")]
    next_before: Option<u64>,
}

/// Answer of `GET /conversations`.
#[derive(Serialize)]
struct ConversationList {
    conversations: Vec<ConversationItem>,
    /// Pass as `before` to get the next page; absent on the last page.
    #[serde(rename = "nextBefore", skip_serializing_if = "Option::is_none")]
    next_before: Option<String>,
}

/// One conversation of `GET /conversations` (numbers as JSON numbers, like `nextBefore`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConversationItem {
    peer: String,
    conversation: String,
    last_seq: u64,
    last_activity_ms: i64,
    unread: u64,
    read_up_to: u64,
    peer_read_up_to: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    preview: Option<PreviewItem>,
    /// Present (true) when the conversation's shard did not answer: `unread` is then 1 while
    /// something may be unread (0 otherwise), and there is no preview; ask again later.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    unavailable: bool,
}

#[derive(Serialize)]
struct PreviewItem {
    sender: String,
    seq: u64,
    body: String,
}

impl From<ConversationSummary> for ConversationItem {
    fn from(c: ConversationSummary) -> Self {
        Self {
            peer: c.peer.as_str().to_owned(),
            conversation: c.conversation.as_str().to_owned(),
            last_seq: c.last_seq,
            last_activity_ms: c.last_activity_ms,
            unread: c.unread,
            read_up_to: c.read_up_to,
            peer_read_up_to: c.peer_read_up_to,
            preview: c.preview.map(|p| PreviewItem {
                sender: p.sender.as_str().to_owned(),
                seq: p.seq,
                body: p.body,
            }),
            unavailable: c.details_unavailable,
        }
    }
}

/// The `before` cursor of the conversation list: the last activity (ms) and the key of the
/// previous page's last conversation, joined by '.' (opaque to clients).
fn list_cursor(c: &ListCursor) -> String {
    format!("{}.{}", c.last_activity_ms, c.conversation)
}

fn parse_list_cursor(s: &str) -> Option<ListCursor> {
    let (ms, key) = s.split_once('.')?;
    Some(ListCursor {
        last_activity_ms: ms.parse().ok()?,
        conversation: ConversationKey::parse(key).ok()?,
    })
}

/// The operations listener's routes: `/metrics`, `/healthz`, `/readyz`.
pub(crate) fn ops_routes(
    app: Arc<App>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    chat_common::http::ops_routes(readiness(app)).recover(recover)
}

/// Every route of the public listener, each with its handler below. `/healthz` stays here as
/// well (it says only "ok"), for probes that can reach only the public port; `/metrics` and
/// `/readyz` are on the operations listener alone.
pub(crate) fn routes(
    app: Arc<App>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let config = app.config();
    let max_body = (config.max_body_bytes as u64) * 6 + 1024; // JSON escaping headroom
    let websocket = warp::path!("ws")
        .and(warp::get())
        .and(origin_allowed(app.clone()))
        .and(authenticated(app.clone()))
        .and(query_map())
        .and(upgrade::handshake())
        .and(connection_slot())
        .and(with_app(app.clone()))
        .map(open_websocket);
    let send = warp::path!("messages" / PathUser)
        .and(warp::put())
        .and(authenticated(app.clone()))
        .and(json_body::<SendBody>(max_body, config.http.body_timeout))
        .and(with_app(app.clone()))
        .and_then(send_message);
    let history = warp::path!("messages" / PathUser)
        .and(warp::get())
        .and(authenticated(app.clone()))
        .and(history_query())
        .and(with_app(app.clone()))
        .and_then(history_page);
    let conversations = warp::path!("conversations")
        .and(warp::get())
        .and(authenticated(app.clone()))
        .and(query_map())
        .and(with_app(app.clone()))
        .and_then(conversation_list);
    let me = warp::path!("me")
        .and(warp::get())
        .and(authenticated(app.clone()))
        .map(whoami);
    let dev_token = warp::path!("dev" / "token" / PathUser)
        .and(warp::get())
        .and(with_app(app.clone()))
        .and_then(dev_token);
    websocket
        .or(send)
        .or(history)
        .or(conversations)
        .or(me)
        .or(dev_token)
        .or(warp::path!("healthz")
            .and(warp::get())
            .map(|| warp::reply::with_status("ok", StatusCode::OK)))
        .or(web_client(&app))
        .recover(recover)
}

/// `GET /ws`: answers the upgrade (`format=json` for JSON text frames, `sync=manual` to resume
/// with the client's own `sync` frame) and serves the socket in a tracked task.
fn open_websocket(
    user: UserId,
    query: HashMap<String, String>,
    handshake: Handshake,
    slot: AddrSlot,
    app: Arc<App>,
) -> warp::reply::Response {
    let format = match query.get("format").map(String::as_str) {
        Some("json") => Format::Json,
        _ => Format::Binary,
    };
    // `sync=manual`: the client resumes with its own `sync` frame (last seq per peer).
    let auto_sync = query.get("sync").map(String::as_str) != Some("manual");
    // Frames larger than a body JSON-escaped at its worst plus envelope are refused by the
    // websocket layer with close code 1009 (binary frames get a tighter bound).
    let config = SocketConfig {
        max_message_bytes: ws::frame_limit(app.config().max_body_bytes),
        read_buffer_bytes: app.config().ws_read_buffer_bytes,
    };
    handshake.accept(config, move |socket| {
        let service = app.clone();
        let start = ws::Start {
            app,
            user,
            socket,
            format,
            auto_sync,
            address_slot: slot,
        };
        service.track(ws::serve(Box::new(start)))
    })
}

/// A path segment that names a user, percent-decoded: `%2E` and `.` are the same character in
/// a URL (RFC 3986), so `/messages/a%2Eb` names `a.b`, and `/dev/token/%2E%2E` names `..`, which
/// the id check then refuses for what it is. A segment that does not decode to UTF-8 stays as
/// sent, and the id check refuses its `%`.
struct PathUser(String);

impl std::str::FromStr for PathUser {
    type Err = Infallible;

    fn from_str(segment: &str) -> Result<Self, Infallible> {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8();
        Ok(PathUser(
            decoded.map_or_else(|_| segment.to_owned(), |d| d.into_owned()),
        ))
    }
}

/// `PUT /messages/{user_id}`: sends to that user; 202 with the `Accepted` answer once Kafka
/// has the message.
async fn send_message(
    PathUser(peer): PathUser,
    user: UserId,
    body: SendBody,
    app: Arc<App>,
) -> Result<impl Reply, Rejection> {
    let client_id = body
        .client_message_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let accepted = app
        .send(&user, &client_id, &peer, body.body)
        .await
        .map_err(ApiError::from)?;
    Ok(warp::reply::with_status(
        warp::reply::json(&accepted),
        StatusCode::ACCEPTED,
    ))
}

/// `before` and `limit` of a history request, non-negative integers when present.
fn history_query() -> impl Filter<Extract = (HistoryQuery,), Error = Rejection> + Clone {
    query_map().and_then(|q: HashMap<String, String>| async move {
        let num = |k: &str| -> Result<Option<u64>, Rejection> {
            q.get(k)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        reject(
                            StatusCode::BAD_REQUEST,
                            "bad_query",
                            format!("{k} must be a non-negative integer"),
                        )
                    })
                })
                .transpose()
        };
        Ok::<_, Rejection>(HistoryQuery {
            before: num("before")?,
            limit: num("limit")?.map(|l| l.min(u64::from(u32::MAX)) as u32),
        })
    })
}

/// `GET /messages/{user_id}`: a page of the caller's conversation with that user; 503
/// `shard_unavailable` (with `Retry-After`) while the conversation's shard does not answer.
async fn history_page(
    PathUser(peer): PathUser,
    user: UserId,
    query: HistoryQuery,
    app: Arc<App>,
) -> Result<impl Reply, Rejection> {
    let peer = UserId::parse(&peer)
        .map_err(|e| reject(StatusCode::BAD_REQUEST, "invalid_user", e.to_string()))?;
    let History {
        messages,
        next_before,
    } = app
        .history(&user, &peer, query.before, query.limit)
        .await
        .map_err(ApiError::from)?;
    Ok(warp::reply::json(&HistoryPage {
        messages,
        next_before,
    }))
}

/// `GET /conversations?limit=&before=`: a page of the caller's conversations, newest activity
/// first; conversations whose shard does not answer are marked `unavailable`, and the caller's
/// home shard down is a 503 `shard_unavailable`.
async fn conversation_list(
    user: UserId,
    query: HashMap<String, String>,
    app: Arc<App>,
) -> Result<impl Reply, Rejection> {
    let bad = |message: &str| reject(StatusCode::BAD_REQUEST, "bad_query", message.to_owned());
    let limit = query
        .get("limit")
        .map(|v| {
            v.parse::<u64>()
                .map(|l| l.min(u64::from(u32::MAX)) as u32)
                .map_err(|_| bad("limit must be a non-negative integer"))
        })
        .transpose()?;
    let before = query
        .get("before")
        .map(|v| parse_list_cursor(v).ok_or_else(|| bad("before must be a nextBefore value")))
        .transpose()?;
    let ConversationPage {
        conversations,
        next_before,
    } = app
        .conversations(&user, before.as_ref(), limit)
        .await
        .map_err(ApiError::from)?;
    Ok(warp::reply::json(&ConversationList {
        conversations: conversations.into_iter().map(Into::into).collect(),
        next_before: next_before.as_ref().map(list_cursor),
    }))
}

/// `GET /me`: who the token names, so a browser can check a token (a refused upgrade is
/// invisible to it).
fn whoami(user: UserId) -> impl Reply {
    warp::reply::json(&serde_json::json!({ "user": user.as_str() }))
}

/// `GET /dev/token/{user}` (only with dev tokens enabled, on the local stack): a token for that
/// user, valid for a day.
async fn dev_token(PathUser(user): PathUser, app: Arc<App>) -> Result<impl Reply, Rejection> {
    let Some(issuer) = &app.config().dev_issuer else {
        return Err(reject(
            StatusCode::NOT_FOUND,
            "not_found",
            "dev tokens are disabled",
        ));
    };
    let user = UserId::parse_addressable(&user)
        .map_err(|e| reject(StatusCode::BAD_REQUEST, "invalid_user", e.to_string()))?;
    let token = issuer
        .issue(&user, 24 * 3600)
        .map_err(|e| reject(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(warp::reply::json(
        &serde_json::json!({ "user": user.as_str(), "token": token }),
    ))
}

/// `/readyz`: the service's readiness (see `App::ready`: Kafka and at least one shard).
fn readiness(app: Arc<App>) -> ReadyCheck {
    Arc::new(move || {
        let app = app.clone();
        Box::pin(async move { app.ready().await })
    })
}

/// `GET /*`: the web client's static files, when its directory exists.
fn web_client(app: &App) -> BoxedFilter<(warp::fs::File,)> {
    match app.config().web_dir.clone().filter(|d| d.is_dir()) {
        Some(dir) => warp::get().and(warp::fs::dir(dir)).boxed(),
        None => warp::any()
            .and_then(|| async { Err::<warp::fs::File, _>(warp::reject::not_found()) })
            .boxed(),
    }
}

/// Renders a rejection. warp offers every route the request and combines their rejections, so
/// a request refused by the route it was meant for also carries the 404s and 405s of the
/// others: the specific reasons (the route's own errors, then body and content problems) are
/// looked for before "method not allowed", which only says some other route wanted another
/// method.
async fn recover(err: Rejection) -> Result<warp::reply::Response, Infallible> {
    let mut response = match err.find::<ApiError>() {
        // The route's own refusal, whole: its `Retry-After` too.
        Some(e) => e.response(),
        None => generic_refusal(&err).response(),
    };
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body may still arrive: the connection cannot carry another request.
        response.headers_mut().insert(
            warp::http::header::CONNECTION,
            warp::http::HeaderValue::from_static("close"),
        );
    }
    Ok(response)
}

/// What a rejection that is not one of the routes' own refusals says.
fn generic_refusal(err: &Rejection) -> ApiError {
    let (status, code, message) = if err.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route".to_owned(),
        )
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body too large".to_owned(),
        )
    } else if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json".to_owned(),
        )
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "content-length required".to_owned(),
        )
    } else if let Some(e) = err.find::<warp::filters::body::BodyDeserializeError>() {
        (StatusCode::BAD_REQUEST, "bad_body", e.to_string())
    } else if err.find::<warp::reject::InvalidQuery>().is_some() {
        (
            StatusCode::BAD_REQUEST,
            "bad_query",
            "invalid query string".to_owned(),
        )
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed".to_owned(),
        )
    } else {
        (StatusCode::BAD_REQUEST, "bad_request", format!("{err:?}"))
    };
    ApiError::new(status, code, message)
}

#[cfg(test)]
mod tests {
    use super::{is_json, PathUser};

    #[test]
    fn user_ids_in_paths_are_percent_decoded() {
        let user = |s: &str| s.parse::<PathUser>().expect("never refused").0;
        assert_eq!(user("bob"), "bob");
        assert_eq!(user("a%2Eb"), "a.b");
        assert_eq!(user("%62%6f%62"), "bob");
        // Decoded, then refused by the id check for what they are.
        assert_eq!(user("%2E%2E"), "..");
        assert_eq!(user("a%2Fb"), "a/b");
        assert_eq!(user("b%20b"), "b b");
        // Not UTF-8 once decoded, or not an escape: kept as sent (the id check refuses the `%`).
        assert_eq!(user("%FF"), "%FF");
        assert_eq!(user("a%2"), "a%2");
        assert_eq!(user("a%zz"), "a%zz");
    }

    #[test]
    fn json_content_types_are_recognised_with_any_parameters_and_case() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
        ] {
            assert!(is_json(ct), "{ct}");
        }
        for ct in [
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "",
        ] {
            assert!(!is_json(ct), "{ct}");
        }
    }
}
