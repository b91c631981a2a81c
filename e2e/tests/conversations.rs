//! `GET /conversations` from a client's side: a new device lists every conversation (paged by
//! last activity), with exact unread counts that follow acks made on another device, previews
//! in keep mode and none in delete-on-ack mode; bad queries get 400.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chat_client::Rest;
use chat_e2e::{http_url, ws_url, TestEnv, WAIT};
use db_writer::Retention;
use serde_json::{json, Value};

/// Every page of `GET /conversations?limit=` as the owner of `token`.
async fn all_pages(rest: &Rest, token: &str, limit: u32) -> anyhow::Result<Vec<Vec<Value>>> {
    let mut pages = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let path = match &before {
            Some(b) => format!("/conversations?limit={limit}&before={b}"),
            None => format!("/conversations?limit={limit}"),
        };
        let r = rest.request("GET", &path, Some(token), None).await?;
        anyhow::ensure!(r.status == 200, "{path}: {} {}", r.status, r.body);
        let page = r.body["conversations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        pages.push(page);
        match r.body["nextBefore"].as_str() {
            Some(next) => before = Some(next.to_owned()),
            None => return Ok(pages),
        }
    }
}

/// Polls the list until `done` holds for it (the multiplexer writes the index asynchronously).
async fn list_until(
    rest: &Rest,
    token: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list: Vec<Value> = all_pages(rest, token, 200).await?.concat();
        if done(&list) {
            return Ok(list);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: list never got there: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn by_peer(list: &[Value]) -> BTreeMap<String, Value> {
    list.iter()
        .map(|c| (c["peer"].as_str().unwrap_or_default().to_owned(), c.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_lists_every_conversation_with_exact_unread_counts() -> anyhow::Result<()> {
    let env = TestEnv::new(4, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let rest = Rest::new(&http_url(gw.addr));
    let me = env.token("lister");

    // 60 peers write to "lister"; peer p0 three times; lister answers p1 (so p1's conversation
    // has lister's message last).
    let peers: Vec<String> = (0..60).map(|i| format!("p{i}")).collect();
    for (i, p) in peers.iter().enumerate() {
        let times = if i == 0 { 3 } else { 1 };
        for n in 0..times {
            let r = rest
                .request(
                    "PUT",
                    "/messages/lister",
                    Some(&env.token(p)),
                    Some(json!({"body": format!("from {p} #{n} ü\u{1F600}\"<>")})),
                )
                .await?;
            anyhow::ensure!(r.status == 202, "send: {} {}", r.status, r.body);
        }
    }
    let r = rest
        .request(
            "PUT",
            "/messages/p1",
            Some(&me),
            Some(json!({"body": "answer"})),
        )
        .await?;
    anyhow::ensure!(r.status == 202, "send: {} {}", r.status, r.body);

    let list = list_until(&rest, &me, "all 60", |l| {
        l.len() == 60 && by_peer(l).get("p1").is_some_and(|c| c["lastSeq"] == 2)
    })
    .await?;
    let peers_listed: BTreeSet<&str> = list.iter().filter_map(|c| c["peer"].as_str()).collect();
    assert_eq!(peers_listed.len(), 60, "each conversation once");
    let conversations = by_peer(&list);
    let p0 = &conversations["p0"];
    assert_eq!(p0["unread"], 3);
    assert_eq!(p0["lastSeq"], 3);
    assert_eq!(p0["readUpTo"], 0);
    assert_eq!(p0["conversation"], "lister:p0");
    assert_eq!(p0["preview"]["body"], "from p0 #2 ü\u{1F600}\"<>");
    assert_eq!(p0["preview"]["sender"], "p0");
    assert_eq!(
        conversations["p1"]["unread"], 1,
        "lister's own message is not unread"
    );
    assert_eq!(conversations["p1"]["preview"]["body"], "answer");
    assert_eq!(conversations["p1"]["preview"]["sender"], "lister");
    assert_eq!(conversations["p2"]["unread"], 1);

    // Paged by last activity: pages of 25, 25 and 10, newest first throughout, nothing twice.
    let pages = all_pages(&rest, &me, 25).await?;
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [25, 25, 10]);
    let flat: Vec<Value> = pages.concat();
    let order: Vec<(i64, String)> = flat
        .iter()
        .map(|c| {
            (
                c["lastActivityMs"].as_i64().unwrap_or_default(),
                c["conversation"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(order, sorted, "newest activity first, then key");
    assert_eq!(flat.len(), 60);

    // Another device acks p0 up to 2 and p2 entirely: the list follows, exactly.
    let mut phone = chat_client::Client::connect(&ws_url(gw.addr), &me).await?;
    let synced = phone.until_sync_done(WAIT).await?;
    assert_eq!(synced.len(), 62, "everything unread was synced");
    phone.ack("p0", 2)?;
    phone.ack("p2", 1)?;
    let list = list_until(&rest, &me, "acks", |l| {
        let c = by_peer(l);
        c["p0"]["unread"] == 1 && c["p2"]["unread"] == 0
    })
    .await?;
    let c = by_peer(&list);
    assert_eq!(c["p0"]["readUpTo"], 2);
    assert_eq!(c["p2"]["readUpTo"], 1);
    assert_eq!(c["p3"]["unread"], 1, "other conversations unchanged");
    // The peer's side: its message was read (a receipt), and nothing is unread for it.
    let p2_list = list_until(&rest, &env.token("p2"), "p2's receipt", |l| {
        l.first().is_some_and(|c| c["peerReadUpTo"] == 1)
    })
    .await?;
    assert_eq!(p2_list.len(), 1);
    assert_eq!(p2_list[0]["unread"], 0);
    assert_eq!(p2_list[0]["peer"], "lister");

    // Bad queries are refused with a clear error.
    for path in [
        "/conversations?limit=abc",
        "/conversations?limit=-1",
        "/conversations?before=nonsense",
        "/conversations?before=12.notakey",
    ] {
        let r = rest.request("GET", path, Some(&me), None).await?;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(r.body["code"], "bad_query", "{path}: {}", r.body);
    }
    let r = rest.request("GET", "/conversations", None, None).await?;
    assert_eq!(r.status, 401);

    phone.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_ack_lists_conversations_without_content() -> anyhow::Result<()> {
    let mut env = TestEnv::new(2, &["gw1"]).await?;
    env.retention = Retention::DeleteOnAck;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let rest = Rest::new(&http_url(gw.addr));
    for (from, body) in [
        ("ann", "secret one"),
        ("ann", "secret two"),
        ("ben", "hush"),
    ] {
        let r = rest
            .request(
                "PUT",
                "/messages/reader",
                Some(&env.token(from)),
                Some(json!({ "body": body })),
            )
            .await?;
        anyhow::ensure!(r.status == 202, "send: {} {}", r.status, r.body);
    }
    let me = env.token("reader");
    let list = list_until(&rest, &me, "both", |l| {
        l.len() == 2 && by_peer(l).get("ann").is_some_and(|c| c["unread"] == 2)
    })
    .await?;
    for c in &list {
        assert!(c.get("preview").is_none(), "no content in this mode: {c}");
    }
    assert_eq!(by_peer(&list)["ben"]["unread"], 1);
    let text = serde_json::to_string(&list)?;
    assert!(!text.contains("secret") && !text.contains("hush"));

    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}
