//! What independent clients found at the edge, one regression test each: pipelined sends keep
//! their order, a body the store cannot hold is refused at the gateway (and the pipeline goes
//! on), every body within `MAX_BODY_BYTES` fits a frame in both formats while hostile frames are
//! still capped, and a websocket protocol violation closes with 1002.

use std::time::Duration;

use chat_client::Rest;
use chat_e2e::{close_code, connect, http_url, ws_url, RawWs, TestEnv, WAIT};
use chat_proto::v1::{client_frame, server_frame, ClientFrame, Send, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

async fn raw(addr: std::net::SocketAddr, token: &str, json: bool) -> RawWs {
    let format = if json { "&format=json" } else { "" };
    let url = format!("{}/ws?access_token={token}{format}", ws_url(addr));
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("connect");
    ws
}

fn send_frame(cid: &str, to: &str, body: &str, json: bool) -> Message {
    let frame = ClientFrame {
        kind: Some(client_frame::Kind::Send(Send {
            client_message_id: cid.into(),
            recipient: to.into(),
            body: body.into(),
        })),
    };
    if json {
        Message::Text(serde_json::to_string(&frame).expect("serialise").into())
    } else {
        Message::Binary(frame.encode_to_vec().into())
    }
}

/// The answer to each of `cids` (accepted, or the error's code), read off `ws` in any order.
async fn answers(ws: &mut RawWs, cids: &[String]) -> Vec<Result<String, String>> {
    let mut got: std::collections::HashMap<String, Result<String, String>> = Default::default();
    while got.len() < cids.len() {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an answer in time")
            .expect("open")
            .expect("no socket error");
        let frame: ServerFrame = match m {
            Message::Binary(b) => ServerFrame::decode(b.as_ref()).expect("server frames decode"),
            Message::Text(t) => serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        };
        match frame.kind {
            Some(server_frame::Kind::Accepted(a)) => {
                got.insert(a.client_message_id, Ok(a.message_id));
            }
            Some(server_frame::Kind::Error(e)) if !e.client_message_id.is_empty() => {
                got.insert(e.client_message_id, Err(e.code));
            }
            _ => {}
        }
    }
    cids.iter()
        .map(|c| got.remove(c).expect("answered"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_get_seqs_in_send_order_in_both_formats() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    let gw = env
        .start_gateway_with("gw1", |c| {
            c.conn_rate = (10_000, 10_000);
            c.user_rate = (10_000, 10_000);
        })
        .await?;
    let mux = env.start_multiplexer().await?;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;
    const N: usize = 150;
    for (sender, json) in [("alice", false), ("carol", true)] {
        let mut ws = raw(gw.addr, &env.token(sender), json).await;
        let cids: Vec<String> = (0..N).map(|i| format!("{sender}-{i}")).collect();
        // Every frame written before any answer is read: a client flushing its outbox.
        for cid in &cids {
            ws.feed(send_frame(cid, "bob", cid, json)).await?;
        }
        ws.flush().await?;
        for (cid, answer) in cids.iter().zip(answers(&mut ws, &cids).await) {
            assert!(answer.is_ok(), "{cid}: {answer:?}");
        }
        let mut shown = Vec::new();
        while shown.len() < N {
            let m = bob.next_message(WAIT).await?;
            assert_eq!(m.sender, sender);
            shown.push((m.seq, m.client_message_id));
        }
        let order: Vec<&str> = shown.iter().map(|(_, c)| c.as_str()).collect();
        let sent: Vec<&str> = cids.iter().map(String::as_str).collect();
        assert_eq!(order, sent, "{sender}: seqs follow the send order");
        let seqs: Vec<u64> = shown.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=N as u64).collect::<Vec<_>>(), "{sender}");
    }
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_store_cannot_hold_is_refused_at_the_edge_and_the_rest_flows(
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;

    // The exact frame a Python client sent: U+0000 as a JSON escape.
    let mut ws = raw(gw.addr, &env.token("alice"), true).await;
    ws.send(Message::Text(
        r#"{"send":{"clientMessageId":"n1","recipient":"bob","body":"x\u0000y"}}"#.into(),
    ))
    .await?;
    // The same in protobuf, and alone (another user: a user holds one session).
    let mut pb = raw(gw.addr, &env.token("dave"), false).await;
    let cids = ["n2".to_owned(), "n3".to_owned()];
    pb.send(send_frame("n2", "bob", "x\0y", false)).await?;
    pb.send(send_frame("n3", "bob", "\0", false)).await?;
    assert_eq!(
        answers(&mut pb, &cids).await,
        vec![Err("invalid_body".into()), Err("invalid_body".into())]
    );
    assert_eq!(
        answers(&mut ws, &["n1".to_owned()]).await,
        vec![Err("invalid_body".into())]
    );
    // REST says the same with a 400.
    let rest = Rest::new(&http_url(gw.addr));
    let r = rest
        .request(
            "PUT",
            "/messages/bob",
            Some(&env.token("alice")),
            Some(serde_json::json!({"body": "a\u{0}b", "clientMessageId": "n4"})),
        )
        .await?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (400, Some("invalid_body"))
    );

    // Nothing was stored, and every later message, in any conversation, is.
    let carol = connect(&ws_url(gw.addr), &env.token("carol")).await;
    let a = carol.send("bob", "after the NUL").await?;
    let m = bob.next_message(WAIT).await?;
    assert_eq!((m.message_id, m.seq), (a.message_id, 1));
    let a = send_ok(
        &mut pb,
        "n5",
        "bob",
        "control \u{1}\u{1f}\u{7f} is fine",
        false,
    )
    .await;
    let m = bob.next_message(WAIT).await?;
    assert_eq!(m.message_id, a);
    assert_eq!(m.body, "control \u{1}\u{1f}\u{7f} is fine");
    assert_eq!(m.seq, 1, "bob:dave holds only the valid message");

    carol.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

/// Sends one message and returns its message id; panics if it is refused.
async fn send_ok(ws: &mut RawWs, cid: &str, to: &str, body: &str, json: bool) -> String {
    ws.send(send_frame(cid, to, body, json))
        .await
        .expect("written");
    match answers(ws, &[cid.to_owned()]).await.remove(0) {
        Ok(id) => id,
        Err(code) => panic!("{cid} refused: {code}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_within_the_limit_fits_a_frame_and_hostile_frames_are_capped(
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;
    let max = 4096; // MAX_BODY_BYTES's default, which the test gateway keeps

    let bodies = [
        "\n".repeat(max),         // 2 bytes each in JSON: the frame an outside client sent
        "\u{1}".repeat(max),      // 6 bytes each: the worst case
        "\u{e9}".repeat(max / 2), // two-byte characters up to the limit
        "😀".repeat(max / 4),     // four-byte characters up to the limit
        "\"\\".repeat(max / 2),   // quotes and backslashes, escaped
        "e\u{301}\u{5e9}".repeat(max / 5), // combining marks and right-to-left text
    ];
    for json in [true, false] {
        let mut ws = raw(gw.addr, &env.token("alice"), json).await;
        for (i, body) in bodies.iter().enumerate() {
            assert!(body.len() <= max && body.len() > max - 8, "{i}");
            let cid = format!("big-{json}-{i}");
            let id = send_ok(&mut ws, &cid, "bob", body, json).await;
            let m = bob.next_message(WAIT).await?;
            assert_eq!((&m.message_id, &m.body), (&id, body), "{cid}");
        }
        // One byte over is refused by name, and the socket stays open.
        let over = "a".repeat(max + 1);
        ws.send(send_frame("over", "bob", &over, json)).await?;
        assert_eq!(
            answers(&mut ws, &["over".to_owned()]).await,
            vec![Err("body_too_large".into())]
        );
    }
    // Hostile frames are still capped: a JSON frame beyond the worst escaping, a protobuf frame
    // beyond the body limit.
    let mut ws = raw(gw.addr, &env.token("mallory"), true).await;
    let huge = format!(
        r#"{{"send":{{"clientMessageId":"h","recipient":"bob","body":"{}"}}}}"#,
        "a".repeat(max * 6 + 2048)
    );
    ws.send(Message::Text(huge.into())).await?;
    assert_eq!(close_code(&mut ws).await, Some(1009));
    let mut ws = raw(gw.addr, &env.token("mallory"), false).await;
    ws.send(send_frame("h", "bob", &"a".repeat(max + 2048), false))
        .await?;
    assert_eq!(close_code(&mut ws).await, Some(1009));

    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_protocol_violation_closes_with_1002() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    // A reserved bit set without an extension that defines it (RFC 6455 5.2).
    let mut ws = raw(gw.addr, &env.token("mallory"), false).await;
    let mut frame = Frame::message(vec![1, 2, 3], OpCode::Data(Data::Binary), true);
    frame.header_mut().rsv1 = true;
    ws.send(Message::Frame(frame)).await?;
    assert_eq!(close_code(&mut ws).await, Some(1002));
    // A continuation frame with nothing to continue.
    let mut ws = raw(gw.addr, &env.token("mallory"), false).await;
    let frame = Frame::message(vec![1], OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(frame)).await?;
    assert_eq!(close_code(&mut ws).await, Some(1002));
    // The gateway serves on.
    let rest = Rest::new(&http_url(gw.addr));
    tokio::time::timeout(Duration::from_secs(5), async {
        assert_eq!(
            rest.request("GET", "/healthz", None, None)
                .await
                .map(|r| r.status)
                .ok(),
            Some(200)
        );
    })
    .await?;
    gw.stop().await;
    env.teardown().await
}
