//! A reconnect storm at a small size: 300 users with messages waiting connect to one gateway at
//! once, through only four sync slots (`MAX_CONCURRENT_SYNCS`), while more messages are sent to
//! them. Each gets everything meant for it exactly once, whether in its sync or live after it.

use std::collections::BTreeMap;
use std::time::Duration;

use chat_client::{Client, Rest};
use chat_e2e::{http_url, ws_url, TestEnv, WAIT};
use futures_util::stream::{self, StreamExt};
use serde_json::json;

const USERS: usize = 300;
const SENDERS: usize = 10;

/// Sends `body` from `from` to `to` over REST, as a real client does: with a client message id,
/// so that a request lost to the network (a reset connection, during the storm) is sent again
/// without the risk of a second copy. Exactly once is then the server's to keep.
async fn send(
    env: &TestEnv,
    rest: &Rest,
    from: &str,
    to: &str,
    body: String,
) -> anyhow::Result<()> {
    let request = json!({ "body": body, "client_message_id": format!("{from}->{to}:{body}") });
    let mut attempt = 1;
    let r = loop {
        match rest
            .request(
                "PUT",
                &format!("/messages/{to}"),
                Some(&env.token(from)),
                Some(request.clone()),
            )
            .await
        {
            Ok(r) => break r,
            Err(e @ chat_client::ClientError::Http(_)) if attempt < 5 => {
                eprintln!("send {body:?} (attempt {attempt}): {e}; sending it again");
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    };
    anyhow::ensure!(r.status == 202, "send: {} {}", r.status, r.body);
    Ok(())
}

/// Sends every (from, to, body), 16 at a time.
async fn send_all(
    env: &TestEnv,
    rest: &Rest,
    messages: Vec<(String, String, String)>,
) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<()>> = stream::iter(messages)
        .map(|(from, to, body)| async move { send(env, rest, &from, &to, body).await })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_reconnects_gets_everything_exactly_once() -> anyhow::Result<()> {
    let env = TestEnv::new(4, &["gw1"]).await?;
    let gw = env
        .start_gateway_with("gw1", |c| c.max_concurrent_syncs = 4)
        .await?;
    let mux = env.start_multiplexer().await?;
    let rest = Rest::new(&http_url(gw.addr));
    let user = |i: usize| format!("r{i}");
    let sender = |i: usize| format!("s{}", i % SENDERS);

    // Before the storm: one message waits for each user.
    send_all(
        &env,
        &rest,
        (0..USERS)
            .map(|i| (sender(i), user(i), format!("waiting {i}")))
            .collect(),
    )
    .await?;
    let group = format!("{}multiplexer", env.topics.prefix());
    let deadline = tokio::time::Instant::now() + WAIT;
    while !env.group_caught_up(&group, &env.topics.inbound()).await? {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The storm: every user connects at once and reads until its marker.
    let url = ws_url(gw.addr);
    let readers: Vec<_> = (0..USERS)
        .map(|i| {
            let (url, token) = (url.clone(), env.token(&user(i)));
            tokio::spawn(async move {
                let mut c = Client::connect(&url, &token).await?;
                let mut bodies: Vec<String> = c
                    .until_sync_done(WAIT * 3)
                    .await?
                    .into_iter()
                    .map(|m| m.body)
                    .collect();
                let marker = format!("marker {i}");
                while !bodies.contains(&marker) {
                    bodies.push(c.next_message(WAIT * 3).await?.body);
                }
                let duplicates = c.wire_duplicates();
                c.close();
                Ok::<_, anyhow::Error>((bodies, duplicates))
            })
        })
        .collect();
    // During it: a live message for every other user, then a marker for each (after the live
    // one in its conversation, so a repeat of anything before it would arrive before it).
    send_all(
        &env,
        &rest,
        (0..USERS)
            .step_by(2)
            .map(|i| (sender(i), user(i), format!("live {i}")))
            .collect(),
    )
    .await?;
    send_all(
        &env,
        &rest,
        (0..USERS)
            .map(|i| (sender(i), user(i), format!("marker {i}")))
            .collect(),
    )
    .await?;

    let mut wrong = BTreeMap::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let (mut got, duplicates) = reader.await??;
        let mut want = vec![format!("waiting {i}"), format!("marker {i}")];
        if i % 2 == 0 {
            want.push(format!("live {i}"));
        }
        got.sort();
        want.sort();
        if got != want || duplicates != 0 {
            wrong.insert(i, (got, want, duplicates));
        }
    }
    assert!(wrong.is_empty(), "users with a wrong stream: {wrong:?}");

    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}
