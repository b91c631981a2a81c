//! One shard down is not an outage, seen from the clients. Two shards, each behind a TCP proxy
//! the test cuts (every connection dropped, new ones refused: the shard is down for the gateway
//! and the multiplexer alike). With shard 1 cut:
//! - the gateway stays ready (`/readyz` 200, `ready, degraded: shards down: shard 1: …`) and
//!   `gateway_shard_up` says which shard is down;
//! - history and the conversation list answer for conversations on shard 0, and a conversation
//!   on shard 1 gets 503 `shard_unavailable`;
//! - a connect-time sync delivers what shard 0 holds, then a `sync_failed` error and a
//!   sync-done frame naming the peer it could not read (nothing of that conversation is pushed
//!   live until a sync reads it); a user whose home shard is 1 gets `sync_failed` with no peer
//!   named, at once, not a hang;
//! - sends are accepted, and a message whose conversation and users are all on shard 0 is
//!   delivered.
//!
//! Once shard 1 is back, what was sent meanwhile is stored, and a sync delivers the conversation
//! left out, in order. With every shard cut,
//! the gateway is not ready and its `/readyz` names both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_client::{Client, Event, Rest};
use chat_common::ids::{ConversationKey, UserId};
use chat_e2e::{connect, http_url, ws_url, TestEnv, WAIT};
use db_writer::{Locator, Plans, ShardConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy on loopback in front of one shard's Postgres, which the test can cut and
/// restore.
struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut cut_rx = cut_rx.clone();
                if *cut_rx.borrow() {
                    continue; // dropped: refused while cut
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Ok(Self { addr, cut })
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        let _ = self.cut.send(true);
    }

    fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

/// The parts of a DSN `postgres://user@host:port/db`: before the host, the address, after it.
fn dsn_parts(dsn: &str) -> anyhow::Result<(String, SocketAddr, String)> {
    let (scheme, rest) = dsn.split_once("://").context("a URL DSN")?;
    let (authority, db) = rest.split_once('/').context("a database")?;
    let (user, host) = authority.rsplit_once('@').context("a user")?;
    let addr = host.parse().context("host:port in the DSN")?;
    Ok((format!("{scheme}://{user}@"), addr, format!("/{db}")))
}

/// The first `prefix<n>` that `pick` accepts.
fn user(prefix: &str, pick: impl Fn(&UserId) -> bool) -> UserId {
    (0..10_000)
        .map(|n| UserId::parse(&format!("{prefix}{n}")).expect("valid user id"))
        .find(|u| pick(u))
        .expect("a user id with that placement")
}

fn key(a: &UserId, b: &UserId) -> ConversationKey {
    ConversationKey::of(a, b).expect("two users")
}

/// Events until the sync-done frame (within `WAIT`): the messages' bodies and the error codes.
async fn sync_events(c: &mut Client) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let (mut bodies, mut errors) = (Vec::new(), Vec::new());
    loop {
        match c.next_event_within(WAIT).await? {
            Event::Message(m) => bodies.push(m.body),
            Event::Error { code, .. } => errors.push(code),
            Event::SyncDone { .. } => return Ok((bodies, errors)),
            _ => {}
        }
    }
}

/// The body of the next message `c` is shown, within `within`.
async fn next_body(c: &mut Client, within: Duration) -> anyhow::Result<String> {
    Ok(c.next_message(within).await?.body)
}

/// The value of `gateway_shard_up{shard}` in a scrape of `ops`.
async fn shard_up(ops: &Rest, shard: usize) -> anyhow::Result<Option<f64>> {
    let r = ops.request("GET", "/metrics", None, None).await?;
    let text = r.body.as_str().unwrap_or_default().to_owned();
    let series = format!("gateway_shard_up{{shard=\"{shard}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_shard_down_degrades_only_what_it_holds() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    let mut proxies = Vec::new();
    let mut dsns = Vec::new();
    for dsn in &env.shard_dsns {
        let (before, upstream, after) = dsn_parts(dsn)?;
        let proxy = Proxy::start(upstream).await?;
        dsns.push(format!("{before}{}{after}", proxy.addr));
        proxies.push(proxy);
    }
    let shards = ShardConfig::from_list(&dsns.join(","), 4)?;
    let mux = env
        .start_multiplexer_with(|c| c.shards = shards.clone())
        .await?;
    let gw = env
        .start_gateway_with("gw1", |c| c.shards = shards.clone().with_plans(Plans::Auto))
        .await?;
    let (url, rest, ops) = (
        ws_url(gw.addr),
        Rest::new(&http_url(gw.addr)),
        Rest::new(&http_url(gw.ops_addr)),
    );

    // Placement: alice lives on shard 0; her conversation with b0 is on shard 0 (b0 lives there
    // too), with b1 on shard 1; carol lives on shard 1.
    let locator = Locator::new(2);
    let alice = user("alice", |u| locator.home_of(u) == 0);
    let b0 = user("bee", |u| {
        locator.home_of(u) == 0 && locator.shard_of(&key(&alice, u)) == 0
    });
    let b1 = user("bee", |u| locator.shard_of(&key(&alice, u)) == 1);
    let carol = user("carol", |u| locator.home_of(u) == 1);
    let token = |u: &UserId| env.token(u.as_str());

    // Before the fault: one message to alice in each conversation, stored and in the users'
    // indexes (a sender is told `stored` after the batch's index write). Connecting b0 and b1
    // also runs a sync with both shards up, so the gateway knows the user index is built.
    let mut from_b0 = connect(&url, &token(&b0)).await;
    let mut from_b1 = connect(&url, &token(&b1)).await;
    from_b0.send(alice.as_str(), "m0 on shard 0").await?;
    from_b1.send(alice.as_str(), "m1 on shard 1").await?;
    for sender in [&mut from_b0, &mut from_b1] {
        while !matches!(sender.next_event_within(WAIT).await?, Event::Stored(_)) {}
    }
    let r = ops.request("GET", "/readyz", None, None).await?;
    assert_eq!(r.status, 200, "{}", r.body);

    // Shard 1 goes down.
    proxies[1].cut();

    let r = ops.request("GET", "/readyz", None, None).await?;
    assert_eq!(
        r.status, 200,
        "one shard down leaves the gateway ready: {}",
        r.body
    );
    let text = r.body.as_str().unwrap_or_default();
    assert!(
        text.starts_with("ready, degraded: shards down: shard 1: ") && !text.contains("shard 0"),
        "the answer names the shard down: {text}"
    );
    assert_eq!(shard_up(&ops, 0).await?, Some(1.0));
    assert_eq!(shard_up(&ops, 1).await?, Some(0.0), "the gauge names it");

    let t = token(&alice);
    let r = rest
        .request("GET", &format!("/messages/{b0}"), Some(&t), None)
        .await?;
    assert_eq!(r.status, 200, "history on the healthy shard: {}", r.body);
    assert_eq!(r.body["messages"][0]["body"], "m0 on shard 0");
    let r = rest
        .request("GET", &format!("/messages/{b1}"), Some(&t), None)
        .await?;
    assert_eq!(r.status, 503, "history on the down shard: {}", r.body);
    assert_eq!(r.body["code"], "shard_unavailable", "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("shard 1"),
        "{}",
        r.body
    );

    let r = rest
        .request("GET", "/conversations", Some(&t), None)
        .await?;
    assert_eq!(r.status, 200, "alice's index is on shard 0: {}", r.body);
    let listed: HashMap<String, serde_json::Value> = r.body["conversations"]
        .as_array()
        .context("conversations")?
        .iter()
        .map(|c| (c["peer"].as_str().unwrap_or_default().to_owned(), c.clone()))
        .collect();
    assert_eq!(listed.len(), 2, "{}", r.body);
    assert_eq!(listed[b0.as_str()]["unread"], 1);
    assert_eq!(listed[b0.as_str()]["preview"]["body"], "m0 on shard 0");
    assert!(listed[b0.as_str()].get("unavailable").is_none());
    assert_eq!(listed[b1.as_str()]["unavailable"], true, "{}", r.body);
    assert_eq!(listed[b1.as_str()]["unread"], 1, "the index's estimate");

    // Alice connects: what shard 0 holds, then the peer left out.
    let started = Instant::now();
    let mut alice_ws = Client::connect(&url, &t).await?;
    let (bodies, errors) = sync_events(&mut alice_ws).await?;
    assert_eq!(bodies, ["m0 on shard 0"]);
    assert_eq!(errors, ["sync_failed"]);
    assert_eq!(alice_ws.unsynced_peers(), [b1.as_str()]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Carol's index is on shard 1: the sync fails at once, and says so.
    let started = Instant::now();
    let mut carol_ws = Client::connect(&url, &token(&carol)).await?;
    let (bodies, errors) = sync_events(&mut carol_ws).await?;
    assert!(bodies.is_empty());
    assert_eq!(errors, ["sync_failed"]);
    assert!(carol_ws.unsynced_peers().is_empty(), "nothing was read");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let r = rest
        .request("GET", "/conversations", Some(&token(&carol)), None)
        .await?;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["code"], "shard_unavailable");

    // Sends only need Kafka. A message whose conversation and users all live on shard 0 is
    // stored and delivered while shard 1 is down.
    from_b0.send(alice.as_str(), "m2 on shard 0").await?;
    assert_eq!(next_body(&mut alice_ws, WAIT).await?, "m2 on shard 0");
    let r = rest
        .request(
            "PUT",
            &format!("/messages/{alice}"),
            Some(&token(&b1)),
            Some(serde_json::json!({ "body": "m3 on shard 1" })),
        )
        .await?;
    assert_eq!(
        r.status, 202,
        "a send to the down shard is accepted: {}",
        r.body
    );
    // What a message on shard 0 sent now meets: the multiplexers hold m3's batch until shard 1
    // is back (docs/design.md, "One shard down"). Logged, not asserted: the test states what
    // the clients are promised, and this is the part not promised yet.
    from_b0.send(alice.as_str(), "m4 on shard 0").await?;
    let behind = next_body(&mut alice_ws, Duration::from_secs(3)).await;
    eprintln!("m4 (shard 0) while m3 (shard 1) waits: {behind:?}");

    // Shard 1 comes back: alice syncs again (as a client does after `sync_failed`), and
    // everything sent meanwhile arrives, in each conversation's order.
    proxies[1].restore();
    let mut got: Vec<String> = behind.into_iter().collect();
    let deadline = Instant::now() + WAIT;
    loop {
        alice_ws.sync(HashMap::new())?;
        let (bodies, errors) = sync_events(&mut alice_ws).await?;
        got.extend(bodies);
        if errors.is_empty() && alice_ws.unsynced_peers().is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "still not synced: {errors:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wanted = ["m1 on shard 1", "m3 on shard 1", "m4 on shard 0"];
    while !wanted.iter().all(|w| got.iter().any(|g| g == w)) {
        got.push(next_body(&mut alice_ws, WAIT).await?);
    }
    let on_shard_1: Vec<&String> = got.iter().filter(|b| b.ends_with("shard 1")).collect();
    assert_eq!(on_shard_1, ["m1 on shard 1", "m3 on shard 1"], "{got:?}");
    assert!(
        !got.contains(&"m0 on shard 0".to_owned()),
        "repeats are dropped: {got:?}"
    );
    let r = ops.request("GET", "/readyz", None, None).await?;
    assert_eq!((r.status, r.body.as_str()), (200, Some("ready")));
    assert_eq!(shard_up(&ops, 1).await?, Some(1.0));
    let r = rest
        .request("GET", &format!("/messages/{b1}"), Some(&t), None)
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let bodies: Vec<&str> = r.body["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter_map(|m| m["body"].as_str())
        .collect();
    assert_eq!(bodies, ["m1 on shard 1", "m3 on shard 1"]);

    // Every shard down: not ready, and the answer names them.
    for p in &proxies {
        p.cut();
    }
    let r = ops.request("GET", "/readyz", None, None).await?;
    assert_eq!(r.status, 503, "{}", r.body);
    let text = r.body.as_str().unwrap_or_default();
    assert!(
        text.contains("every shard is down")
            && text.contains("shard 0")
            && text.contains("shard 1"),
        "{text}"
    );
    for p in &proxies {
        p.restore();
    }

    for c in [from_b0, from_b1, alice_ws, carol_ws] {
        c.close();
    }
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}
