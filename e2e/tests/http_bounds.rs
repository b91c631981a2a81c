//! The gateway's HTTP layer as a raw TCP client sees it: every connection is bounded in time
//! (idle keep-alive, body read, whole request), counted toward its address's limit from accept
//! until it closes (upgraded or not), and answered with the right status: 415, 411, and a
//! closed connection after a request whose length is ambiguous.
//!
//! Requests are written by hand so the tests control exactly what is sent and when, and see
//! exactly what comes back, including whether the server closed the socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_e2e::{close_code, ws_url, Component, TestEnv, WAIT};
use db_writer::ShardConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The pause between attempts to connect while the server releases a slot: it has no event a
/// client could await, so the client polls (within [`WAIT`]).
const RETRY: Duration = Duration::from_millis(20);

/// Timers start on the server a moment before the client's clock: the slack allowed for that.
const SLACK: Duration = Duration::from_millis(100);

/// The token settings of the e2e harness (`e2e/src/lib.rs`), so `TestEnv::token` verifies.
/// Bounds long enough never to fire in a test that does not test them.
fn relaxed() -> gateway::HttpBounds {
    gateway::HttpBounds {
        idle_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(60),
    }
}

/// Starts gw1 on the harness's configuration with `bounds`, adjusted by `adjust`.
async fn start(
    env: &TestEnv,
    bounds: gateway::HttpBounds,
    adjust: impl FnOnce(&mut gateway::Config),
) -> anyhow::Result<Component> {
    env.start_gateway_with("gw1", |config| {
        config.http = bounds;
        adjust(config);
    })
    .await
}

/// A response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `code` of the JSON error body.
    fn code(&self) -> String {
        let v: serde_json::Value =
            serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null);
        v["code"].as_str().unwrap_or_default().to_owned()
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// One client connection, written and read by hand.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        Self {
            tcp: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write");
    }

    /// Reads more bytes (within [`WAIT`]); false at the end of the stream or on an error.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, self.tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => false,
            Err(_) => panic!("no answer within {WAIT:?}"),
        }
    }

    /// The next response (its body framed by `Content-Length`), or `None` if the server closed
    /// the connection before a whole one.
    async fn response(&mut self) -> Option<Response> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while self.buf.len() < head_end + 4 + length {
            if !self.fill().await {
                return None;
            }
        }
        let body = self.buf[head_end + 4..head_end + 4 + length].to_vec();
        self.buf.drain(..head_end + 4 + length);
        Some(Response {
            status,
            headers,
            body,
        })
    }

    /// Sends `request` and reads its response.
    async fn exchange(&mut self, request: &str) -> Response {
        self.send(request.as_bytes()).await;
        self.response().await.expect("a response")
    }

    /// Whether the server closes the connection within `within` (nothing more may arrive).
    async fn closed_within(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(within, self.tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(n)) => panic!(
                "unexpected bytes before the close: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(_) => false,
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n")
}

/// A `PUT /messages/bob` head with `headers` (each ending in CRLF) and the token of `alice`.
fn put_head(env: &TestEnv, headers: &str) -> String {
    format!(
        "PUT /messages/bob HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n{headers}\r\n",
        env.token("alice")
    )
}

/// The value of a counter in the gateway's `/metrics` (0 when absent), read on `c` (a connection
/// to its operations listener). Counters
/// are process-wide: other tests of this file add to them too, so tests assert lower bounds.
async fn counter(c: &mut Conn, series: &str) -> f64 {
    let r = c.exchange(&get("/metrics")).await;
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_a_sequence_then_closes_when_idle() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let idle = Duration::from_secs(1);
    let gw = start(
        &env,
        gateway::HttpBounds {
            idle_timeout: idle,
            ..relaxed()
        },
        |_| {},
    )
    .await?;

    // A sequence of requests on one connection, each answered, the connection kept.
    let mut c = Conn::open(gw.addr).await;
    for path in ["/healthz", "/nope", "/healthz"] {
        let r = c.exchange(&get(path)).await;
        assert_eq!(r.status, if path == "/nope" { 404 } else { 200 }, "{path}");
        assert!(!r.closes(), "{path}: keep-alive");
    }
    // Then silence: closed after the idle timeout (and not before), well inside the header
    // timeout (10 s), so it is the idle bound that closed it.
    let silent = Instant::now();
    assert!(
        !c.closed_within(idle / 2).await,
        "closed before the idle timeout"
    );
    assert!(
        c.closed_within(WAIT).await,
        "an idle keep-alive connection is closed"
    );
    let after = silent.elapsed();
    assert!(
        after + SLACK >= idle && after < Duration::from_secs(5),
        "closed after {after:?}"
    );

    // A connection that never sends a request is idle from accept (and closed by the idle
    // bound, not the header timeout).
    let mut quiet = Conn::open(gw.addr).await;
    let opened = Instant::now();
    assert!(
        quiet.closed_within(WAIT).await,
        "a silent connection is closed"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(5),
        "{:?}",
        opened.elapsed()
    );

    let mut c = Conn::open(gw.ops_addr).await;
    assert!(counter(&mut c, "gateway_http_closed_total{reason=\"idle\"}").await >= 2.0);
    gw.stop().await;
    env.teardown().await
}

/// The header timeout bounds a request's headers once they start, not the wait for the next
/// request: a keep-alive connection is kept for the idle bound even when that is longer. (A
/// client reusing its pooled connection must not meet a close it could not expect: a request
/// written into a socket the server has just closed is lost to a reset.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let header = Duration::from_secs(1);
    let gw = start(&env, relaxed(), |config| config.handshake_timeout = header).await?;

    let mut c = Conn::open(gw.addr).await;
    assert_eq!(c.exchange(&get("/healthz")).await.status, 200);
    assert!(
        !c.closed_within(header * 3).await,
        "an idle keep-alive connection was closed by the header timeout"
    );
    let r = c.exchange(&get("/healthz")).await;
    assert_eq!(r.status, 200);
    assert!(!r.closes(), "keep-alive");

    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_whose_headers_never_end_is_cut_off() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = start(
        &env,
        gateway::HttpBounds {
            idle_timeout: Duration::from_secs(1),
            ..relaxed()
        },
        |config| config.handshake_timeout = Duration::from_secs(1),
    )
    .await?;

    // Slowloris on a connection that has already served a request: bounded like the first
    // request's headers (the idle bound asks the connection to close, the header bound ends it).
    let mut c = Conn::open(gw.addr).await;
    assert_eq!(c.exchange(&get("/healthz")).await.status, 200);
    c.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n").await;
    let started = Instant::now();
    // hyper may answer the cut request (408) before it closes; it must not serve it.
    while let Some(r) = c.response().await {
        assert_ne!(r.status, 200, "the unfinished request was not served");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");

    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_gets_408_and_a_closed_connection() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let body_timeout = Duration::from_secs(1);
    let gw = start(
        &env,
        gateway::HttpBounds {
            body_timeout,
            ..relaxed()
        },
        |_| {},
    )
    .await?;

    // Declares 100 bytes, sends 4, then nothing.
    let mut c = Conn::open(gw.addr).await;
    c.send(
        put_head(
            &env,
            "Content-Type: application/json\r\nContent-Length: 100\r\n",
        )
        .as_bytes(),
    )
    .await;
    c.send(b"{\"bo").await;
    let sent = Instant::now();
    let r = c.response().await.expect("an answer");
    assert_eq!((r.status, r.code().as_str()), (408, "body_timeout"));
    assert!(r.closes(), "408 says Connection: close");
    assert!(
        sent.elapsed() + SLACK >= body_timeout,
        "not before the body timeout"
    );
    assert!(c.closed_within(WAIT).await, "and the socket is closed");

    // A body that arrives in time is read as usual.
    let mut c = Conn::open(gw.addr).await;
    let body = r#"{"body":"hello","clientMessageId":"m1"}"#;
    let head = put_head(
        &env,
        &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ),
    );
    let r = c.exchange(&format!("{head}{body}")).await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));

    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_answered_in_time_gets_408_and_a_closed_connection() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    // A "shard" that accepts connections and never answers: the history query hangs.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hole = blackhole.local_addr()?;
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = blackhole.accept().await {
            held.push(s);
        }
    });
    let mut shards = ShardConfig::from_list(&format!("postgres://chat@{hole}/none"), 1)?;
    shards.acquire_timeout = Duration::from_secs(120);
    let request_timeout = Duration::from_secs(1);
    let gw = start(
        &env,
        gateway::HttpBounds {
            request_timeout,
            ..relaxed()
        },
        |config| config.shards = shards,
    )
    .await?;

    let mut c = Conn::open(gw.addr).await;
    let started = Instant::now();
    let r = c
        .exchange(&format!(
            "GET /messages/bob HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
            env.token("alice")
        ))
        .await;
    assert_eq!((r.status, r.code().as_str()), (408, "request_timeout"));
    assert!(r.closes(), "408 says Connection: close");
    let took = started.elapsed();
    assert!(
        took >= request_timeout && took < Duration::from_secs(10),
        "answered after {took:?}"
    );
    assert!(c.closed_within(WAIT).await, "and the socket is closed");

    gw.stop().await;
    held.abort();
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_open_connection_counts_toward_the_per_address_limit() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = start(&env, relaxed(), |config| config.max_conns_per_addr = 2).await?;

    /// Opens connections until one is served (the server frees a slot when it has seen the
    /// previous holder's close, a moment after the client closed).
    async fn served(addr: SocketAddr) -> Conn {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut c = Conn::open(addr).await;
            match c.exchange(&get("/healthz")).await.status {
                200 => return c,
                status => {
                    assert_eq!(status, 429);
                    assert!(Instant::now() < deadline, "no slot came free");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    // Two connections, one that has sent nothing and one idle after a request, fill the limit.
    let silent = Conn::open(gw.addr).await;
    let mut kept = Conn::open(gw.addr).await;
    assert_eq!(kept.exchange(&get("/healthz")).await.status, 200);
    let mut third = Conn::open(gw.addr).await;
    let r = third.exchange(&get("/healthz")).await;
    assert_eq!((r.status, r.code().as_str()), (429, "too_many_connections"));
    assert!(third.closed_within(WAIT).await, "refused and closed");

    // Closing one frees its slot.
    drop(silent);
    let _again = served(gw.addr).await;
    drop(kept);
    drop(_again);

    // A websocket holds exactly the one slot its connection took: with it open, one more
    // connection fits and the next is refused.
    let (mut ws, _) = {
        let deadline = Instant::now() + WAIT;
        loop {
            let url = format!("{}/ws?access_token={}", ws_url(gw.addr), env.token("alice"));
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok(ws) => break ws,
                Err(e) => {
                    assert!(Instant::now() < deadline, "websocket: {e}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    };
    let other = served(gw.addr).await;
    let mut over = Conn::open(gw.addr).await;
    assert_eq!(over.exchange(&get("/healthz")).await.status, 429);
    drop(other);

    // Closing the websocket frees its slot.
    ws.close(None).await?;
    drop(ws);
    // Held while the counter is read: the address is full, the operations listener answers.
    let _a = served(gw.addr).await;
    let b = served(gw.addr).await;
    drop(b);

    let refused = counter(
        &mut Conn::open(gw.ops_addr).await,
        "gateway_connections_refused_total{reason=\"per_address\"}",
    )
    .await;
    assert!(refused >= 2.0, "{refused}");
    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_and_length_problems_get_their_own_status() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = start(&env, relaxed(), |_| {}).await?;
    let body = r#"{"body":"hello"}"#;

    // A body that is not JSON: 415, and the connection goes on.
    let mut c = Conn::open(gw.addr).await;
    let head = put_head(
        &env,
        &format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n",
            body.len()
        ),
    );
    let r = c.exchange(&format!("{head}{body}")).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );
    assert!(!r.closes());
    // A PUT with no body at all: 411, and the connection goes on.
    let r = c.exchange(&put_head(&env, "")).await;
    assert_eq!((r.status, r.code().as_str()), (411, "length_required"));
    // JSON that is not a send: 400.
    let r = c
        .exchange(&format!(
            "{}[1]",
            put_head(
                &env,
                "Content-Type: application/json\r\nContent-Length: 3\r\n"
            )
        ))
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_body"));
    let r = c.exchange(&get("/healthz")).await;
    assert_eq!(r.status, 200, "the connection is still usable");

    // A chunked body, and both length headers in either order: 411, then the connection is
    // closed (its framing cannot be trusted for a next request).
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    for headers in [
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n".to_owned(),
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ),
        format!(
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n",
            body.len()
        ),
    ] {
        let mut c = Conn::open(gw.addr).await;
        // A request smuggled behind the body must not be served.
        c.send(format!("{}{chunked}{}", put_head(&env, &headers), get("/healthz")).as_bytes())
            .await;
        let r = c.response().await.expect("an answer");
        assert_eq!(
            (r.status, r.code().as_str()),
            (411, "length_required"),
            "{headers:?}"
        );
        assert!(r.closes(), "{headers:?}: Connection: close");
        assert!(c.closed_within(WAIT).await, "{headers:?}: socket closed");
    }

    gw.stop().await;
    env.teardown().await
}

/// A REST send to bob from `sender` with `client_message_id`.
fn send_request(env: &TestEnv, sender: &str, client_message_id: &str) -> String {
    let body = format!(r#"{{"body":"hello","clientMessageId":"{client_message_id}"}}"#);
    format!(
        "PUT /messages/bob HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        env.token(sender),
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_over_the_user_rate_gets_429_with_a_retry_after_that_lets_the_retry_through(
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    // 1 send a second, bursts of 3: the fourth send at once is over, and the bucket has room
    // again a second after the first.
    let gw = start(&env, relaxed(), |c| c.user_rate = (1, 3)).await?;
    let mut c = Conn::open(gw.addr).await;
    // Another user's send first, so the producer's first connection to Kafka is not inside
    // alice's burst (the burst must take well under the second it has).
    let r = c.exchange(&send_request(&env, "carol", "warm-up")).await;
    assert_eq!(r.status, 202, "{r:?}");
    for i in 0..3 {
        let r = c
            .exchange(&send_request(&env, "alice", &format!("burst-{i}")))
            .await;
        assert_eq!(r.status, 202, "send {i} of the burst: {r:?}");
    }
    let r = c.exchange(&send_request(&env, "alice", "over")).await;
    let refused_at = Instant::now();
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "rate_limited"),
        "{r:?}"
    );
    let retry_after: u64 = r
        .header("retry-after")
        .expect("a 429 for the rate says when to retry")
        .parse()
        .expect("Retry-After in whole seconds");
    assert_eq!(retry_after, 1, "the bucket refills within a second");
    assert!(!r.closes(), "the connection goes on");

    // A client that waits as told is let through, with the same client message id.
    let wait = Duration::from_secs(retry_after).saturating_sub(refused_at.elapsed());
    tokio::time::sleep(wait).await; // the wait the server asked for is what is under test
    let r = c.exchange(&send_request(&env, "alice", "over")).await;
    assert_eq!(r.status, 202, "the retry after Retry-After: {r:?}");

    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_upgrade_and_shutdown_drains_every_connection() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = start(&env, relaxed(), |_| {}).await?;

    let client = chat_e2e::connect(&ws_url(gw.addr), &env.token("alice")).await;
    let url = format!("{}/ws?access_token={}", ws_url(gw.addr), env.token("bob"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let mut idle = Conn::open(gw.addr).await;
    assert_eq!(idle.exchange(&get("/healthz")).await.status, 200);
    let mut unused = Conn::open(gw.addr).await;

    let shutdown_began = Instant::now();
    let stopping = tokio::spawn(gw.stop());
    assert_eq!(
        close_code(&mut ws).await,
        Some(1001),
        "websockets close with 1001"
    );
    assert!(
        idle.closed_within(WAIT).await,
        "an idle keep-alive connection is closed"
    );
    assert!(
        unused.closed_within(WAIT).await,
        "a connection that sent nothing is closed"
    );
    tokio::time::timeout(WAIT, stopping).await??;
    // Well within the header timeout (10 s) that would otherwise have closed `unused`.
    let took = shutdown_began.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    drop(client);
    env.teardown().await
}
