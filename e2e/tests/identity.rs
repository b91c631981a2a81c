//! Identity: tokens are checked before the upgrade; the user is the token's subject.

use chat_client::{Client, ClientError, Rest};
use chat_common::auth::TokenIssuer;
use chat_common::ids::UserId;
use chat_e2e::{connect, http_url, ws_url, TestEnv, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_the_upgrade() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let alice = UserId::parse("alice")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let good = env.token("alice");
    let payload = good
        .split('.')
        .nth(1)
        .expect("jwt has a payload")
        .to_owned();
    let cases = [
        ("missing", String::new()),
        ("garbage", "not-a-token".to_owned()),
        (
            "wrong secret",
            TokenIssuer::hs256(b"other-secret", "chat-test", "chat").issue(&alice, 600)?,
        ),
        (
            "wrong issuer",
            TokenIssuer::hs256(b"test-secret", "someone-else", "chat").issue(&alice, 600)?,
        ),
        (
            "wrong audience",
            TokenIssuer::hs256(b"test-secret", "chat-test", "other").issue(&alice, 600)?,
        ),
        (
            "expired",
            TokenIssuer::hs256(b"test-secret", "chat-test", "chat").issue_at(
                &alice,
                now - 7200,
                now - 3600,
            )?,
        ),
        // Signed, but for a user a URL cannot name (`/messages/..` is `/`).
        ("subject ..", env.token("..")),
        ("subject .", env.token(".")),
        // {"alg":"none","typ":"JWT"} with valid claims and no signature.
        (
            "alg none",
            format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}."),
        ),
        // {"alg":"HS512"} header on an HS256 signature: algorithm confusion.
        (
            "alg swapped",
            format!(
                "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.{payload}.{}",
                good.split('.').nth(2).expect("signature")
            ),
        ),
    ];
    let rest = Rest::new(&http_url(gw.addr));
    for (what, token) in &cases {
        let ws = Client::connect(&ws_url(gw.addr), token).await;
        assert!(
            matches!(ws, Err(ClientError::Unauthorized)),
            "{what}: websocket was not refused with 401"
        );
        let tok = (!token.is_empty()).then_some(token.as_str());
        let r = rest.request("GET", "/messages/bob", tok, None).await?;
        assert_eq!(r.status, 401, "{what}: GET history");
        let r = rest
            .request(
                "PUT",
                "/messages/bob",
                tok,
                Some(serde_json::json!({"body": "x"})),
            )
            .await?;
        assert_eq!(r.status, 401, "{what}: PUT message");
        let r = rest.request("GET", "/me", tok, None).await?;
        assert_eq!(r.status, 401, "{what}: GET /me");
    }
    let r = rest.request("GET", "/me", Some(&good), None).await?;
    assert_eq!((r.status, r.body["user"].as_str()), (200, Some("alice")));
    // The good token works, over the header and the query parameter alike.
    let c = connect(&ws_url(gw.addr), &good).await;
    assert_eq!(c.user(), "alice");
    let r = rest
        .request("GET", "/messages/bob", Some(&good), None)
        .await?;
    assert_eq!(r.status, 200);
    c.close();
    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_send_validates_and_is_idempotent() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let rest = Rest::new(&http_url(gw.addr));
    let alice = env.token("alice");

    let body = serde_json::json!({"body": "over rest", "clientMessageId": "r1"});
    let first = rest
        .request("PUT", "/messages/bob", Some(&alice), Some(body.clone()))
        .await?;
    assert_eq!(first.status, 202, "{}", first.body);
    let id = first.body["messageId"]
        .as_str()
        .expect("messageId")
        .to_owned();
    assert_eq!(first.body["clientMessageId"], "r1");
    assert_eq!(first.body["conversation"], "alice:bob");
    assert!(first.body["sentAtMs"].as_str().is_some());
    let again = rest
        .request("PUT", "/messages/bob", Some(&alice), Some(body.clone()))
        .await?;
    assert_eq!(again.status, 202);
    assert_eq!(
        again.body["messageId"].as_str(),
        Some(id.as_str()),
        "retry returns the original id"
    );
    // A user id in the path is percent-decoded (`%6F` is `o`): the same retry, to bob.
    let encoded = rest
        .request("PUT", "/messages/b%6Fb", Some(&alice), Some(body))
        .await?;
    assert_eq!(
        (encoded.status, encoded.body["messageId"].as_str()),
        (202, Some(id.as_str())),
        "{}",
        encoded.body
    );

    // Bad input: each a clear status and code.
    let bad = [
        (
            "/messages/bob",
            serde_json::json!({"body": ""}),
            400,
            "empty_body",
        ),
        (
            "/messages/alice",
            serde_json::json!({"body": "me"}),
            400,
            "self_message",
        ),
        (
            "/messages/b%20b",
            serde_json::json!({"body": "x"}),
            400,
            "invalid_recipient",
        ),
        (
            "/messages/bob",
            serde_json::json!({"body": "x".repeat(5000)}),
            413,
            "body_too_large",
        ),
        (
            "/messages/bob",
            serde_json::json!({"nobody": 1}),
            400,
            "bad_body",
        ),
        (
            "/messages/bob",
            serde_json::json!({"body": "x", "clientMessageId": "a b"}),
            400,
            "invalid_client_message_id",
        ),
    ];
    for (path, body, status, code) in bad {
        let r = rest.request("PUT", path, Some(&alice), Some(body)).await?;
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (status, Some(code)),
            "{path}: {}",
            r.body
        );
    }

    // Stored once: bob's sync holds exactly one message.
    let mut bob = Client::connect(&ws_url(gw.addr), &env.token("bob")).await?;
    let synced = bob.until_sync_done(WAIT).await?;
    let ids: Vec<&str> = synced.iter().map(|m| m.message_id.as_str()).collect();
    if ids.is_empty() {
        // Not stored yet when bob connected: it arrives live.
        let m = bob.next_message(WAIT).await?;
        assert_eq!(m.message_id, id);
    } else {
        assert_eq!(ids, vec![id.as_str()]);
    }
    bob.close();
    // History names the peer the same way, encoded or not: bob's page with alice.
    let page = rest
        .request("GET", "/messages/al%69ce", Some(&env.token("bob")), None)
        .await?;
    assert_eq!(page.status, 200, "{}", page.body);
    let ids: Vec<&str> = page.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["messageId"].as_str())
        .collect();
    assert_eq!(ids, vec![id.as_str()]);
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_can_read_or_ack_another_users_conversation() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let secret = alice.send("bob", "for bob only").await?;

    // carol reads "her" conversation with bob: alice's message is not in it.
    let rest = Rest::new(&http_url(gw.addr));
    let r = rest
        .request("GET", "/messages/bob", Some(&env.token("carol")), None)
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["messages"].as_array().map(Vec::len), Some(0));
    // carol acks "bob" as far as it goes: that can only touch carol:bob.
    let carol = connect(&ws_url(gw.addr), &env.token("carol")).await;
    carol.ack("bob", 1_000_000)?;
    carol.ack("alice", 1_000_000)?;
    // A frame naming another sender has no such field to abuse: the sender is the token's user.
    let sent_as_carol = carol.send("bob", "from carol").await?;
    assert_eq!(sent_as_carol.conversation, "bob:carol");

    // bob still gets alice's message (not acked by anyone else), and carol's, each from its sender.
    let mut bob = chat_client::Client::connect(&ws_url(gw.addr), &env.token("bob")).await?;
    let mut got = bob.until_sync_done(WAIT).await?;
    while got.len() < 2 {
        got.push(bob.next_message(WAIT).await?);
    }
    got.sort_by(|a, b| a.sender.cmp(&b.sender));
    assert_eq!(
        got.iter()
            .map(|m| (m.sender.as_str(), m.message_id.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("alice", secret.message_id.as_str()),
            ("carol", sent_as_carol.message_id.as_str())
        ]
    );
    alice.close();
    carol.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}
