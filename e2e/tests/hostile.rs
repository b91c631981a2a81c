//! Bad input and abuse: each gets a clear error or close code, nothing panics, and other users'
//! traffic goes on.

use std::time::{Duration, Instant};

use chat_client::{Client, Rest};
use chat_e2e::{close_code, connect, http_url, ws_url, TestEnv, WAIT};
use chat_proto::v1::{server_frame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

type Ws = chat_e2e::RawWs;

async fn raw(addr: std::net::SocketAddr, token: &str) -> Ws {
    let url = format!("{}/ws?access_token={token}", ws_url(addr));
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("connect");
    ws
}

/// The next server frame, binary or JSON (skipping pings and the like), with its text if it
/// came as JSON.
async fn next_frame(ws: &mut Ws) -> (ServerFrame, Option<String>) {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time");
        return match m.expect("open").expect("no socket error") {
            Message::Binary(b) => (
                ServerFrame::decode(b.as_ref()).expect("server frames decode"),
                None,
            ),
            Message::Text(t) => (
                serde_json::from_str(&t).expect("server JSON parses"),
                Some(t.to_string()),
            ),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        };
    }
}

/// The next server frame that is an error (skipping welcome, sync and the like): its code.
async fn next_error(ws: &mut Ws) -> String {
    loop {
        if let Some(server_frame::Kind::Error(e)) = next_frame(ws).await.0.kind {
            return e.code;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_errors_and_close_codes_and_others_are_unaffected(
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;

    let mut ws = raw(gw.addr, &env.token("mallory")).await;
    let binary_cases: Vec<Vec<u8>> = vec![
        vec![0x0a, 0x05, 0x01],                   // truncated
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], // huge length prefix
        vec![0xff; 64],                           // garbage
        vec![0xf8, 0x01, 0x01],                   // only an unknown field: an empty frame
        vec![],                                   // empty
    ];
    for case in binary_cases {
        ws.send(Message::Binary(case.into())).await?;
        assert_eq!(next_error(&mut ws).await, "bad_frame");
    }
    let deep = format!("{}{}", "[".repeat(2_000), "]".repeat(2_000)); // within the size limit
    let text_cases = [
        "{",
        "null",
        r#"{"send":"not an object"}"#,
        r#"{"send":{"clientMessageId":1}}"#,
        deep.as_str(),
    ];
    for case in text_cases {
        ws.send(Message::Text(case.into())).await?;
        assert_eq!(
            next_error(&mut ws).await,
            "bad_frame",
            "{}",
            &case[..case.len().min(40)]
        );
    }
    // Hostile ids: each refused by name, the socket stays open.
    for (recipient, cid) in [
        ("a\u{0}b", "c1"),
        ("../etc", "c2"),
        ("x'; DROP TABLE messages;--", "c3"),
        (&"z".repeat(65), "c4"),
        ("mallory", "c5"),
        ("bob", "id with spaces"),
        ("bob", &"k".repeat(65)),
    ] {
        let send = serde_json::json!({"send": {"clientMessageId": cid, "recipient": recipient, "body": "x"}});
        ws.send(Message::Text(send.to_string().into())).await?;
        let code = next_error(&mut ws).await;
        assert!(
            [
                "invalid_recipient",
                "self_message",
                "invalid_client_message_id"
            ]
            .contains(&code.as_str()),
            "{recipient:?}/{cid:?}: {code}"
        );
    }
    // Users a URL cannot name (clients turn `/messages/..` into `/`): refused as recipients.
    for (recipient, cid) in [(".", "c8"), ("..", "c9")] {
        let send = serde_json::json!({"send": {"clientMessageId": cid, "recipient": recipient, "body": "x"}});
        ws.send(Message::Text(send.to_string().into())).await?;
        assert_eq!(
            next_error(&mut ws).await,
            "invalid_recipient",
            "{recipient:?}"
        );
    }
    // Acks for nothing, out of order, for a bad peer: harmless.
    for ack in [
        r#"{"ack":{"peer":"bob","upToSeq":"999999"}}"#,
        r#"{"ack":{"peer":"bob","upToSeq":"0"}}"#,
        r#"{"ack":{"peer":"nobody-at-all","upToSeq":"3"}}"#,
    ] {
        ws.send(Message::Text(ack.into())).await?;
    }
    ws.send(Message::Text(
        r#"{"ack":{"peer":"b b","upToSeq":"1"}}"#.into(),
    ))
    .await?;
    assert_eq!(next_error(&mut ws).await, "invalid_recipient");

    // Invalid UTF-8 in a text frame: 1007.
    let bad_text = Frame::message(vec![0xc3, 0x28], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad_text)).await?;
    assert_eq!(close_code(&mut ws).await, Some(1007));

    // A frame over the limit: 1009.
    let mut ws = raw(gw.addr, &env.token("mallory")).await;
    ws.send(Message::Binary(vec![0u8; 64 * 1024].into()))
        .await?;
    assert_eq!(close_code(&mut ws).await, Some(1009));

    // Meanwhile alice and bob talk as usual.
    let a = alice.send("bob", "still fine").await?;
    assert_eq!(bob.next_message(WAIT).await?.message_id, a.message_id);

    alice.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

/// Waits until `gw` counts a websocket it closed with `code` (`gateway_closed_by_server_total`,
/// registered at 0 from the start: counted means above 0).
async fn closed_by_server(gw: &chat_e2e::Component, code: u16) -> anyhow::Result<()> {
    let ops = Rest::new(&http_url(gw.ops_addr));
    let series = format!("gateway_closed_by_server_total{{code=\"{code}\"}} ");
    chat_e2e::eventually(&format!("a {code} close counted"), || async {
        let metrics = ops.request("GET", "/metrics", None, None).await?;
        let text = metrics.body.as_str().unwrap_or_default().to_owned();
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(&series))
            .any(|v| v.trim().parse::<f64>().is_ok_and(|v| v > 0.0))
            .then_some(()))
    })
    .await
}

/// The next answer to a send (`accepted` or an error), skipping every other frame, with the
/// text it came in (the tests that call it write JSON frames, so the answers are JSON).
async fn next_answer(ws: &mut Ws) -> (server_frame::Kind, String) {
    loop {
        let (frame, text) = next_frame(ws).await;
        if let Some(k @ (server_frame::Kind::Accepted(_) | server_frame::Kind::Error(_))) =
            frame.kind
        {
            return (k, text.expect("an answer to a JSON frame is JSON"));
        }
    }
}

/// A JSON send frame from the caller to bob.
fn json_send(client_message_id: &str) -> Message {
    Message::Text(
        format!(r#"{{"send":{{"clientMessageId":"{client_message_id}","recipient":"bob","body":"hi"}}}}"#)
            .into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_the_user_rate_say_when_to_retry_and_a_retry_then_passes() -> anyhow::Result<()>
{
    let env = TestEnv::new(1, &["gw1"]).await?;
    // 1 send a second, bursts of 2: of five pipelined sends, the last three are over (unless the
    // gateway took a second between them).
    let gw = env
        .start_gateway_with("gw1", |c| c.user_rate = (1, 2))
        .await?;
    let mut ws = raw(gw.addr, &env.token("alice")).await;
    for i in 0..5 {
        ws.send(json_send(&format!("m{i}"))).await?;
    }
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    while accepted.len() + refused.len() < 5 {
        match next_answer(&mut ws).await {
            (server_frame::Kind::Accepted(a), _) => accepted.push(a.client_message_id),
            (server_frame::Kind::Error(e), text) => {
                assert_eq!(e.code, "rate_limited", "{text}");
                assert!(
                    (1..=1000).contains(&e.retry_after_ms),
                    "a wait within the second the bucket takes to refill: {text}"
                );
                assert!(text.contains("\"retryAfterMs\""), "{text}");
                refused.push((e.client_message_id, e.retry_after_ms, Instant::now()));
            }
            _ => unreachable!(),
        }
    }
    // Each `accepted` is written when its delivery report comes, from a task of its own, so two
    // in flight may be answered in either order.
    let mut burst = accepted.iter().take(2).cloned().collect::<Vec<_>>();
    burst.sort();
    assert_eq!(burst, ["m0", "m1"], "the burst passes: {accepted:?}");
    let (first, wait_ms, told_at) = refused.first().cloned().expect("some sends were over");

    // The first refused send, written again once the wait it was told has passed, goes through.
    let wait = Duration::from_millis(u64::from(wait_ms)).saturating_sub(told_at.elapsed());
    tokio::time::sleep(wait).await; // the wait the server asked for is what is under test
    ws.send(json_send(&first)).await?;
    match next_answer(&mut ws).await {
        (server_frame::Kind::Accepted(a), _) => assert_eq!(a.client_message_id, first),
        (_, text) => panic!("the retry after retryAfterMs was refused: {text}"),
    }

    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_origins_silent_peers_and_bad_rest_bodies_are_refused() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env
        .start_gateway_with("gw1", |c| {
            c.conn_rate = (5, 10);
            c.user_rate = (1000, 1000);
            c.ping_interval = Duration::from_millis(300);
            c.max_conns_per_addr = 3;
            c.handshake_timeout = Duration::from_secs(1);
        })
        .await?;

    // A flood: rate-limit errors, then 1008.
    let mut ws = raw(gw.addr, &env.token("mallory")).await;
    let mut limited = 0;
    let mut closed = None;
    for _ in 0..200 {
        if ws
            .send(Message::Text(r#"{"sync":{}}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    while let Ok(Some(m)) = tokio::time::timeout(WAIT, ws.next()).await {
        match m {
            Ok(Message::Text(t)) if t.contains("rate_limited") => {
                // The connection's limiter says when it lets the next frame through.
                assert!(t.contains("\"retryAfterMs\""), "{t}");
                limited += 1
            }
            Ok(Message::Binary(b)) => {
                if let Ok(ServerFrame {
                    kind: Some(server_frame::Kind::Error(e)),
                }) = ServerFrame::decode(b.as_ref())
                {
                    if e.code == "rate_limited" {
                        limited += 1;
                    }
                }
            }
            Ok(Message::Close(f)) => {
                closed = f.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(limited > 0, "rate-limit errors came first");
    // The close frame, or the reset that may overtake it: the server closes while frames of the
    // flood are still arriving, and a reset from the server's side discards what the client had
    // not read yet. Either way the server counts the 1008 close.
    assert!(matches!(closed, Some(1008) | None), "{closed:?}");
    closed_by_server(&gw, 1008).await?;

    // A peer that never answers pings (never reads): closed with 4002.
    let mut silent = raw(gw.addr, &env.token("quiet")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the silence under test
                                                           // Reading now may hit the close frame, or the reset that follows it (the client's queued
                                                           // pong meets a closed socket); either way the server counted a 4002 close.
    let code = close_code(&mut silent).await;
    assert!(matches!(code, Some(4002) | None), "{code:?}");
    let rest = Rest::new(&http_url(gw.addr));
    closed_by_server(&gw, 4002).await?;

    // Connections per address: the fourth is refused before the upgrade.
    // The earlier sockets give their slots back once their sessions are wound up (offline
    // presence published): retry a refused connect until then.
    let mut keep: Vec<Client> = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    for u in ["u1", "u2", "u3"] {
        loop {
            match Client::connect(&ws_url(gw.addr), &env.token(u)).await {
                Ok(c) => break keep.push(c),
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "{u}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let fourth = tokio_tungstenite::connect_async(format!(
        "{}/ws?access_token={}",
        ws_url(gw.addr),
        env.token("u4")
    ))
    .await;
    match fourth {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    for c in keep {
        c.close();
    }
    // Every open connection holds one of the address's slots: wait until the closed sockets have
    // given theirs back before the next requests.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut tcp = tokio::net::TcpStream::connect(gw.addr).await?;
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut r = Vec::new();
            let _ = tcp.read_to_end(&mut r).await;
            if r.starts_with(b"HTTP/1.1 200") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "slots not given back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Slowloris: a request whose headers never end is cut off after the handshake timeout.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await?;
        tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await?;
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        let closed = loop {
            match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue, // an error response, then the close
                Err(_) => break false,
            }
        };
        assert!(closed, "a never-ending request is closed");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    // Cross-site websocket hijacking: a foreign Origin is refused with 403.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("{}/ws?access_token={}", ws_url(gw.addr), env.token("alice"))
        .into_client_request()?;
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse()?);
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }

    // REST bodies.
    let t = env.token("alice");
    let r = rest
        .request(
            "PUT",
            "/messages/bob",
            Some(&t),
            Some(serde_json::json!("just a string")),
        )
        .await?;
    assert_eq!((r.status, r.body["code"].as_str()), (400, Some("bad_body")));
    // A body over the limit is refused from its Content-Length, before it is read. The request
    // goes out by hand: the server answers and closes while the body is still unsent, and a
    // client writing the body can hit the reset before it reads the 413.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await?;
        let head = format!(
            "PUT /messages/bob HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"body\":\""
        );
        tcp.write_all(head.as_bytes()).await?;
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while !response.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => response.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let status = String::from_utf8_lossy(&response);
        assert!(
            status.starts_with("HTTP/1.1 413"),
            "an oversized body gets 413, got {status:?}"
        );
    }
    for path in [
        "/messages/a%00b",
        "/messages/..%2Fetc",
        "/messages/x'%20OR%201=1",
    ] {
        let r = rest.request("GET", path, Some(&t), None).await?;
        assert_eq!(r.status, 400, "{path}");
    }
    let r = rest.request("GET", "/nope", None, None).await?;
    assert_eq!(r.status, 404);
    let r = Rest::new(&http_url(gw.ops_addr))
        .request("GET", "/readyz", None, None)
        .await?;
    assert_eq!(r.status, 200, "the gateway is fine after all that");

    gw.stop().await;
    env.teardown().await
}
