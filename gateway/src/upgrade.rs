//! The websocket upgrade, done here rather than by warp so the socket can be set up for density.
//!
//! warp 0.3 fixes tokio-tungstenite 0.21, whose read buffers cost about 8 KiB per connection
//! whether or not it ever receives anything. Idle sockets are most of what a gateway holds, so
//! this module answers the handshake itself (RFC 6455 section 4.2), takes the stream (plain TCP,
//! or TLS over it) back from hyper once the 101 is written (dropping hyper's buffers), and wraps it in a
//! tokio-tungstenite stream with a small read buffer and a small write buffer. A frame larger
//! than the read buffer still arrives whole: the buffer grows to fit the frame being read.

use std::sync::{Arc, Mutex};

use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::{Filter, Rejection};

use crate::error::ApiError;
use crate::tls::ServerStream;

/// Bytes of frames gathered before a write to the socket (a flush writes them sooner).
pub(crate) const WRITE_BUFFER_BYTES: usize = 4096;

/// A server-side websocket over the connection's stream (plain TCP, or TLS over it).
pub(crate) type Socket = WebSocketStream<ServerStream>;

/// The request's pending upgrade, put in its extensions by the server before warp sees it
/// (warp extracts only `Clone` extensions; hyper's `OnUpgrade` is not).
#[derive(Clone, Default)]
pub(crate) struct UpgradeSlot(Arc<Mutex<Option<OnUpgrade>>>);

impl UpgradeSlot {
    /// Moves the upgrade out of `req` into a slot warp can extract.
    pub(crate) fn take_from(req: &mut hyper::Request<hyper::Body>) -> Self {
        Self(Arc::new(Mutex::new(Some(hyper::upgrade::on(req)))))
    }
}

/// A valid websocket handshake request, ready to be answered.
pub(crate) struct Handshake {
    accept: String,
    on_upgrade: OnUpgrade,
}

/// Limits and buffer sizes of one socket.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SocketConfig {
    /// Largest frame and message accepted (larger ones close the socket with 1009).
    pub(crate) max_message_bytes: usize,
    /// Initial read buffer; grows to the frame being read.
    pub(crate) read_buffer_bytes: usize,
}

/// Why a request is not a websocket handshake this server accepts.
fn check(headers: &HeaderMap) -> Result<String, (StatusCode, &'static str, &'static str)> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err((
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a websocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        ));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_version",
            "only websocket version 13 is supported",
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if !key.is_empty() => Ok(derive_accept_key(key.as_bytes())),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "missing Sec-WebSocket-Key",
        )),
    }
}

/// Extracts a websocket handshake; anything else is refused with 400 (426 for a version other
/// than 13), with the same JSON error body as every other refusal.
pub(crate) fn handshake() -> impl Filter<Extract = (Handshake,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<UpgradeSlot>())
        .and_then(|headers: HeaderMap, slot: Option<UpgradeSlot>| async move {
            let accept = check(&headers)
                .map_err(|(status, code, message)| ApiError::new(status, code, message))?;
            let on_upgrade = slot
                .and_then(|s| s.0.lock().ok().and_then(|mut o| o.take()))
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "not_websocket",
                        "this connection cannot be upgraded",
                    )
                })?;
            Ok::<_, Rejection>(Handshake { accept, on_upgrade })
        })
}

impl Handshake {
    /// Answers 101 and, once hyper has written it, runs `serve` on the socket (in a task).
    pub(crate) fn accept<F, Fut>(self, config: SocketConfig, serve: F) -> warp::reply::Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Handshake { accept, on_upgrade } = self;
        tokio::spawn(async move {
            match into_socket(on_upgrade, config).await {
                // A task of its own: awaited here, the connection's future would be laid out
                // beside this one's upgrade state for the life of the connection.
                Ok(socket) => drop(tokio::spawn(serve(socket))),
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        let mut response = warp::reply::Response::default();
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        response
    }
}

/// The upgraded connection as a websocket on the bare stream.
async fn into_socket(on_upgrade: OnUpgrade, config: SocketConfig) -> anyhow::Result<Socket> {
    let upgraded = on_upgrade.await?;
    let parts = upgraded
        .downcast::<ServerStream>()
        .map_err(|_| anyhow::anyhow!("upgraded connection is not the server's stream"))?;
    let stream = parts.io;
    let mut ws_config = WebSocketConfig::default();
    ws_config.read_buffer_size = config.read_buffer_bytes;
    // Frames queued together go out in one write (every write path ends with a flush); the
    // buffer keeps its capacity, so it is capped well below tungstenite's 128 KiB default.
    ws_config.write_buffer_size = WRITE_BUFFER_BYTES;
    ws_config.max_message_size = Some(config.max_message_bytes);
    ws_config.max_frame_size = Some(config.max_message_bytes);
    Ok(if parts.read_buf.is_empty() {
        WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config)).await
    } else {
        // Bytes the client sent right behind its handshake are the first frames.
        WebSocketStream::from_partially_read(
            stream,
            parts.read_buf.to_vec(),
            Role::Server,
            Some(ws_config),
        )
        .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn accepts_a_valid_handshake_with_the_rfc_accept_key() {
        let h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        // The example of RFC 6455 section 1.3.
        assert_eq!(
            check(&h).ok().as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }

    #[test]
    fn refuses_what_is_not_a_version_13_upgrade() {
        let plain = headers(&[("sec-websocket-version", "13")]);
        assert!(matches!(
            check(&plain),
            Err((StatusCode::BAD_REQUEST, _, _))
        ));
        let old = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "8"),
            ("sec-websocket-key", "x"),
        ]);
        assert!(matches!(
            check(&old),
            Err((StatusCode::UPGRADE_REQUIRED, _, _))
        ));
        let keyless = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
        ]);
        assert!(matches!(check(&keyless), Err((_, "not_websocket", _))));
    }
}
