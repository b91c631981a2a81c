//! The HTTP server: accepts TCP connections itself so that every connection is counted and
//! bounded in time from the moment it is accepted.
//!
//! - **Counted:** each accepted connection takes one of its source address's slots
//!   ([`crate::app::AddrSlot`]) before a byte is read; over the limit it is answered 429 and
//!   closed. The slot lives with the connection, and a websocket upgrade takes it over
//!   ([`ConnectionSlot`]), so one connection holds exactly one slot whatever it becomes.
//! - **Bounded:** request headers must arrive within `handshake_timeout` (hyper's header-read
//!   timeout); a connection with no request in flight (between keep-alive requests, or never
//!   used) is closed after `idle_timeout`; each request is answered within `request_timeout` or gets 408 and its
//!   connection closed; the body read has its own, shorter bound (in the route that reads one,
//!   see [`crate::http`]). A connection asked to close that does not finish its last request in
//!   time is dropped.
//! - **Framing:** a request with `Transfer-Encoding` is refused (411) and its connection closed.
//!   No route takes a body without a length, and with both length headers (RFC 9112 section
//!   6.3) closing is the only safe answer; hyper drops the `Content-Length` it sees after a
//!   `Transfer-Encoding`, so refusing every `Transfer-Encoding` is also the only reliable test.
//! - **TLS:** with a certificate configured ([`crate::tls`]), each connection's TLS handshake
//!   runs in its own task, bounded by `handshake_timeout` like the request headers that follow;
//!   a failed one is counted (`gateway_tls_handshakes_failed_total`) and the connection dropped.
//! - **Shutdown:** on the cancellation token accepting stops, connections between requests close
//!   at once and the others after the request they carry; upgraded connections are websockets
//!   by then, closed with 1001 by their sessions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::http::{header, HeaderValue, StatusCode};

use crate::app::{AddrSlot, App};
use crate::config::HttpBounds;
use crate::error::ApiError;
use crate::tls::ServerStream;
use crate::upgrade::UpgradeSlot;

/// The connection's address slot, put in a `/ws` request's extensions: the websocket route
/// takes it when it accepts the upgrade, so the socket keeps the slot the connection held.
#[derive(Clone)]
pub(crate) struct ConnectionSlot(Arc<Mutex<Option<AddrSlot>>>);

impl ConnectionSlot {
    fn new(slot: Option<AddrSlot>) -> Self {
        Self(Arc::new(Mutex::new(slot)))
    }

    /// The slot, once: `None` if it was already taken (a second upgrade cannot happen on one
    /// connection, so this means the request did not come through this server).
    pub(crate) fn take(&self) -> Option<AddrSlot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What a connection is doing, as its watchdog needs to know: whether a request is in flight,
/// since when none has been, and whether it ever carried one.
struct Activity(Mutex<ActivityState>);

struct ActivityState {
    in_flight: usize,
    requests: u64,
    idle_since: Instant,
}

/// What the watchdog sees when it looks.
enum Seen {
    /// A request is being served.
    Busy,
    /// No request has come since the connection was accepted.
    Unused { since: Instant },
    /// Between requests since `since`.
    Idle { since: Instant },
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(ActivityState {
            in_flight: 0,
            requests: 0,
            idle_since: Instant::now(),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a request in flight until the guard is dropped (answered, or timed out).
    fn begin(self: &Arc<Self>) -> Busy {
        let mut s = self.state();
        s.in_flight += 1;
        s.requests += 1;
        Busy(self.clone())
    }

    fn seen(&self) -> Seen {
        let s = self.state();
        match (s.in_flight, s.requests) {
            (0, 0) => Seen::Unused {
                since: s.idle_since,
            },
            (0, _) => Seen::Idle {
                since: s.idle_since,
            },
            _ => Seen::Busy,
        }
    }
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.in_flight = s.in_flight.saturating_sub(1);
        s.idle_since = Instant::now();
    }
}

/// Which of the gateway's listeners a server is.
pub(crate) enum Role {
    /// The clients' listener: every connection takes one of its address's slots, and is a TLS
    /// connection when `tls` is set.
    Public {
        tls: Option<tokio_rustls::TlsAcceptor>,
    },
    /// The operations listener (`/metrics`, `/healthz`, `/readyz`): plain, and not counted
    /// per address (its clients are the monitoring network's, and a full address must not
    /// hide the gateway's state from them).
    Operations,
}

/// Serves `routes` on `listener` until `shutdown`, then lets open connections finish their
/// request (each closes after it) and returns once all have closed.
pub(crate) async fn serve<S>(
    app: Arc<App>,
    listener: TcpListener,
    role: Role,
    routes: S,
    bounds: HttpBounds,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::Body>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connections = TaskTracker::new();
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING_REFUSALS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: nothing to do but wait for some to close.
                    metrics::counter!("gateway_errors_total", "kind" => "accept").increment(1);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let (slot, tls) = match &role {
            Role::Operations => (None, None),
            Role::Public { tls } => match app.addr_slot(peer.ip()) {
                Some(slot) => (Some(slot), tls.clone()),
                None => {
                    metrics::counter!("gateway_connections_refused_total", "reason" => "per_address")
                        .increment(1);
                    // Under a flood of them, the rest are closed without an answer.
                    if let Ok(permit) = refusals.clone().try_acquire_owned() {
                        connections.spawn(async move {
                            refuse_over_limit(stream).await;
                            drop(permit);
                        });
                    }
                    continue;
                }
            },
        };
        // Pushes are small frames, often several in a row: Nagle would hold the second until the
        // first is acknowledged (up to the client's delayed-ACK time).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        connections.spawn(serve_connection(
            app.clone(),
            stream,
            tls,
            peer,
            ConnectionSlot::new(slot),
            routes.clone(),
            bounds,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Connections over their address's limit being answered at once (each for at most a second).
const MAX_LINGERING_REFUSALS: usize = 1024;

/// The answer to a connection over its address's limit: 429 with the usual JSON body, written
/// before the request is read (a client reads it after sending its request), then a lingering
/// close: the write side is shut and what the client sent is read and dropped for a moment, so
/// the close is a FIN the client reads after the 429 rather than a reset that can destroy it.
async fn refuse_over_limit(mut stream: TcpStream) {
    const LINGER: Duration = Duration::from_secs(1);
    let body =
        r#"{"code":"too_many_connections","message":"too many connections from this address"}"#;
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let linger = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(LINGER, linger).await;
}

/// One HTTP connection, from accept to close (or to its upgrade, when the websocket takes over
/// the stream and the slot). A TLS connection first completes its handshake.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<S>(
    app: Arc<App>,
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer: SocketAddr,
    slot: ConnectionSlot,
    routes: S,
    bounds: HttpBounds,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::Body>,
            Response = warp::reply::Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let handshake_timeout = app.config().handshake_timeout;
    let stream = match tls {
        None => ServerStream::Plain(stream),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
            let outcome = tokio::select! {
                // Nothing was asked of this connection yet: nothing to finish.
                _ = shutdown.cancelled() => return,
                outcome = handshake => outcome,
            };
            match outcome {
                Ok(Ok(s)) => ServerStream::Tls(Box::new(s)),
                Ok(Err(e)) => {
                    metrics::counter!("gateway_tls_handshakes_failed_total").increment(1);
                    tracing::debug!(error = %e, %peer, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics::counter!("gateway_tls_handshakes_failed_total").increment(1);
                    tracing::debug!(%peer, "TLS handshake not done in time");
                    return;
                }
            }
        }
    };
    let activity = Activity::new();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            answer(
                req,
                &activity,
                &slot,
                routes.clone(),
                bounds.request_timeout,
            )
        })
    };
    let conn = hyper::server::conn::Http::new()
        .http1_only(true)
        .http1_header_read_timeout(handshake_timeout)
        .serve_connection(stream, service)
        .with_upgrades();
    tokio::pin!(conn);

    let mut watchdog = Watchdog {
        peer,
        bounds,
        handshake_timeout,
        closing: false,
    };
    let check = tokio::time::sleep(bounds.idle_timeout);
    tokio::pin!(check);
    loop {
        let verdict = tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "http connection ended with an error");
                }
                break;
            }
            _ = shutdown.cancelled(), if !watchdog.closing => watchdog.on_shutdown(activity.seen()),
            _ = check.as_mut() => watchdog.on_check(activity.seen()),
        };
        match verdict {
            Verdict::LookAgainAt(at) => check.as_mut().reset(at),
            Verdict::AskToClose { look_again_at } => {
                conn.as_mut().graceful_shutdown();
                check.as_mut().reset(look_again_at);
            }
            Verdict::Drop => break,
        }
    }
}

/// Serves one request of the connection: marks it in flight, hands a `/ws` request the
/// connection's upgrade and slot, refuses a `Transfer-Encoding` (411, then the connection
/// closes), and answers 408 (then closes) when the routes take longer than `deadline`.
fn answer<S>(
    mut req: hyper::Request<hyper::Body>,
    activity: &Arc<Activity>,
    slot: &ConnectionSlot,
    mut routes: S,
    deadline: Duration,
) -> impl std::future::Future<Output = Result<warp::reply::Response, Infallible>>
where
    S: hyper::service::Service<
        hyper::Request<hyper::Body>,
        Response = warp::reply::Response,
        Error = Infallible,
    >,
{
    let busy = activity.begin();
    if req.uri().path() == "/ws" {
        let upgrade = UpgradeSlot::take_from(&mut req);
        req.extensions_mut().insert(upgrade);
        req.extensions_mut().insert(slot.clone());
    }
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    async move {
        let _busy = busy;
        if chunked {
            metrics::counter!("gateway_http_closed_total", "reason" => "transfer_encoding")
                .increment(1);
            return Ok(closing(
                ApiError::new(
                    StatusCode::LENGTH_REQUIRED,
                    "length_required",
                    "send the body with a Content-Length (Transfer-Encoding is not accepted)",
                )
                .response(),
            ));
        }
        match tokio::time::timeout(deadline, routes.call(req)).await {
            Ok(answer) => answer,
            Err(_) => {
                metrics::counter!("gateway_http_closed_total", "reason" => "request_timeout")
                    .increment(1);
                Ok(closing(
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "the request took too long",
                    )
                    .response(),
                ))
            }
        }
    }
}

/// Closes a connection that holds the server's resources without progress. Idle past
/// `idle_timeout`, or at shutdown, the connection is asked to close: hyper closes it at once
/// between requests, or after the request it is reading (headers bounded by
/// `handshake_timeout`) or serving (bounded by `request_timeout`). One that has carried no
/// request has nothing to finish and is dropped (hyper would wait for one). One still open when
/// those bounds have passed is dropped.
struct Watchdog {
    peer: SocketAddr,
    bounds: HttpBounds,
    handshake_timeout: Duration,
    /// The connection was asked to close.
    closing: bool,
}

/// What the watchdog does with its connection.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    LookAgainAt(Instant),
    /// Ask it to close (after the request it carries), and look again then.
    AskToClose {
        look_again_at: Instant,
    },
    /// Drop it now.
    Drop,
}

impl Watchdog {
    /// At shutdown: drop a connection that never carried a request, ask the others to close.
    fn on_shutdown(&mut self, seen: Seen) -> Verdict {
        if let Seen::Unused { .. } = seen {
            return Verdict::Drop;
        }
        self.ask_to_close(Instant::now())
    }

    /// When the timer fires.
    fn on_check(&mut self, seen: Seen) -> Verdict {
        let now = Instant::now();
        let idle_timeout = self.bounds.idle_timeout;
        match (self.closing, seen) {
            (_, Seen::Busy) => {
                let bound = if self.closing {
                    self.bounds.request_timeout
                } else {
                    idle_timeout
                };
                Verdict::LookAgainAt(now + bound)
            }
            (true, _) => {
                metrics::counter!("gateway_http_closed_total", "reason" => "close_overdue")
                    .increment(1);
                tracing::debug!(peer = %self.peer, "connection still open after being asked to close; dropped");
                Verdict::Drop
            }
            (false, Seen::Unused { since } | Seen::Idle { since })
                if now < since + idle_timeout =>
            {
                Verdict::LookAgainAt(since + idle_timeout)
            }
            (false, Seen::Unused { .. }) => {
                metrics::counter!("gateway_http_closed_total", "reason" => "idle").increment(1);
                Verdict::Drop
            }
            (false, Seen::Idle { .. }) => {
                metrics::counter!("gateway_http_closed_total", "reason" => "idle").increment(1);
                self.ask_to_close(now)
            }
        }
    }

    fn ask_to_close(&mut self, now: Instant) -> Verdict {
        self.closing = true;
        Verdict::AskToClose {
            look_again_at: now + self.handshake_timeout,
        }
    }
}

/// `response`, marked so that hyper closes the connection once it is written.
fn closing(mut response: warp::reply::Response) -> warp::reply::Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_unused_then_busy_then_idle_from_the_end_of_the_request() {
        let activity = Activity::new();
        assert!(matches!(activity.seen(), Seen::Unused { .. }));
        let busy = activity.begin();
        assert!(matches!(activity.seen(), Seen::Busy));
        let before_end = Instant::now();
        drop(busy);
        match activity.seen() {
            Seen::Idle { since } => assert!(since >= before_end),
            _ => panic!("idle after its request"),
        }
        let second = activity.begin();
        assert!(matches!(activity.seen(), Seen::Busy));
        drop(second);
        assert!(matches!(activity.seen(), Seen::Idle { .. }));
    }

    #[test]
    fn the_watchdog_asks_an_idle_connection_to_close_then_drops_it_when_overdue() {
        let bounds = HttpBounds {
            idle_timeout: Duration::from_millis(1),
            ..HttpBounds::default()
        };
        let mut watchdog = Watchdog {
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            bounds,
            handshake_timeout: Duration::from_secs(10),
            closing: false,
        };
        let activity = Activity::new();
        drop(activity.begin());
        assert!(matches!(
            watchdog.on_check(Seen::Busy),
            Verdict::LookAgainAt(_)
        ));
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(
            watchdog.on_check(activity.seen()),
            Verdict::AskToClose { .. }
        ));
        assert_eq!(watchdog.on_check(activity.seen()), Verdict::Drop);
        assert_eq!(
            watchdog.on_shutdown(Activity::new().seen()),
            Verdict::Drop,
            "a connection that carried no request has nothing to finish"
        );
    }
}
