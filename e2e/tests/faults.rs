//! Crashes and replays: every accepted message is stored once with a gap-free sequence and
//! reaches its recipient once (after client dedup), whatever is killed when.

use std::collections::HashSet;
use std::time::Duration;

use chat_client::{Client, Options};
use chat_e2e::{connect, ws_url, TestEnv, WAIT};
use db_writer::Retention;
use futures_util::future::join_all;

/// The stored sequences of a conversation, over every shard.
async fn seqs(env: &TestEnv, conversation: &str) -> Vec<i64> {
    let rows = env.stored(conversation).await.expect("shards readable");
    rows.into_iter().map(|(seq, _)| seq).collect()
}

async fn wait_stored(env: &TestEnv, conversation: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seqs(env, conversation).await.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} stored",
            seqs(env, conversation).await.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiplexers_killed_mid_flow_and_rebalanced_lose_and_repeat_nothing() -> anyhow::Result<()>
{
    let env = TestEnv::new(2, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    // Two multiplexers in one group: each kill also forces a rebalance of its partitions.
    let mut muxes = [
        env.spawn_multiplexer_process().await?,
        env.spawn_multiplexer_process().await?,
    ];
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;

    // Send in waves; SIGKILL the multiplexer while records are flowing, three times.
    let mut sent = Vec::new();
    for wave in 0..4 {
        let bodies: Vec<String> = (0..100).map(|i| format!("w{wave}-{i}")).collect();
        let sends = join_all(bodies.iter().map(|b| alice.send("bob", b))).await;
        for r in sends {
            sent.push(r?.message_id);
        }
        if wave < 3 {
            let mux = &mut muxes[wave % 2];
            mux.kill().await?;
            mux.restart().await?;
        }
    }
    wait_stored(&env, "alice:bob", 400).await;
    assert_eq!(
        seqs(&env, "alice:bob").await,
        (1..=400).collect::<Vec<i64>>(),
        "dense, no gap, no repeat"
    );

    // bob sees each of the 400 once, in sequence order.
    let mut seen = Vec::new();
    while seen.len() < 400 {
        seen.push(bob.next_message(WAIT).await?);
    }
    let order: Vec<u64> = seen.iter().map(|m| m.seq).collect();
    assert_eq!(order, (1..=400).collect::<Vec<u64>>());
    let ids: HashSet<&str> = seen.iter().map(|m| m.message_id.as_str()).collect();
    let sent: HashSet<&str> = sent.iter().map(String::as_str).collect();
    assert_eq!(ids, sent, "exactly the accepted messages");

    alice.close();
    bob.close();
    for mux in &mut muxes {
        mux.terminate().await?;
    }
    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_with_pending_messages_its_users_resume_elsewhere() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    let gw1 = env.start_gateway("gw1").await?;
    let mut gw2 = env.spawn_gateway_process("gw2").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;

    // bob on gw2 (a process), with reconnection to gw1 when gw2 dies.
    let mut options = Options::new(&ws_url(gw2.addr), &env.token("bob"));
    options.urls.push(ws_url(gw1.addr));
    options.reconnect = true;
    let mut bob = Client::connect_with(options).await?;
    bob.until_sync_done(WAIT).await?;

    let first: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    for r in join_all(first.iter().map(|b| alice.send("bob", b))).await {
        r?;
    }
    // bob reads some (never acks), then gw2 dies without a word.
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(bob.next_message(WAIT).await?);
    }
    gw2.kill().await?;
    let more: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    for r in join_all(more.iter().map(|b| alice.send("bob", b))).await {
        r?;
    }
    while got.len() < 40 {
        got.push(bob.next_message(WAIT).await?);
    }
    assert_eq!(bob.gateway_id(), "gw1", "bob resumed on the other gateway");
    let order: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(order, (1..=40).collect::<Vec<u64>>(), "once each, in order");

    alice.close();
    bob.close();
    gw1.stop().await;
    mux.stop().await;
    env.teardown().await
}

/// A second multiplexer in a fresh consumer group reads `inbound` from the beginning.
async fn replay(env: &TestEnv) -> anyhow::Result<()> {
    let group = format!(
        "{}replay-{}",
        env.topics.prefix(),
        uuid::Uuid::new_v4().simple()
    );
    env.allow_multiplexer_group(&group).await?;
    let mux = env
        .start_multiplexer_with(|c| {
            c.group = group.clone();
            c.shards.pool_size = 2;
        })
        .await?;
    // Done when the replay group's committed offsets reach the end of inbound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if env.group_caught_up(&group, &env.topics.inbound()).await? {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mux.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_inbound_from_the_beginning_changes_no_stored_row() -> anyhow::Result<()> {
    let env = TestEnv::new(3, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;
    for i in 0..30 {
        alice
            .send(if i % 2 == 0 { "bob" } else { "carol" }, &format!("m{i}"))
            .await?;
    }
    for _ in 0..15 {
        let m = bob.next_message(WAIT).await?;
        bob.ack("alice", m.seq)?;
    }
    wait_stored(&env, "alice:carol", 15).await;
    // Wait for the acks to land, then snapshot.
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked_count(&env).await? < 15 {
        assert!(tokio::time::Instant::now() < deadline, "acks not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = env.snapshot().await?;
    replay(&env).await?;
    let after = env.snapshot().await?;
    assert_eq!(before.len(), 30);
    assert_eq!(before, after, "a replay changes no stored row");

    alice.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

async fn acked_count(env: &TestEnv) -> anyhow::Result<i64> {
    let mut n = 0;
    for i in 0..env.shard_dsns.len() {
        let c: i64 = env
            .shard(i)
            .await?
            .query_one("SELECT count(*) FROM message_status WHERE acked", &[])
            .await?
            .get(0);
        n += c;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_ack_erases_content_and_a_replay_never_brings_it_back() -> anyhow::Result<()> {
    let mut env = TestEnv::new(2, &["gw1"]).await?;
    env.retention = Retention::DeleteOnAck;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;
    for i in 0..5 {
        alice.send("bob", &format!("secret {i}")).await?;
    }
    let mut last = 0;
    for _ in 0..3 {
        last = bob.next_message(WAIT).await?.seq;
    }
    bob.ack("alice", last)?; // acks 1..=3; 4 and 5 stay
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked_count(&env).await? < 3 {
        assert!(tokio::time::Instant::now() < deadline, "acks not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The acked rows' keys are gone, which leaves their sealed bytes nothing can open (the
    // metadata window deletes the rows later); the unacked ones hold their bodies sealed under
    // keys the shard still has. No row holds a body as text.
    let bodies = bodies_of(&env).await?;
    assert_eq!(
        bodies,
        vec![
            (1, None, true, false),
            (2, None, true, false),
            (3, None, true, false),
            (4, None, true, true),
            (5, None, true, true)
        ]
    );
    let before = env.snapshot().await?;
    replay(&env).await?;
    assert_eq!(bodies_of(&env).await?, bodies, "nothing erased came back");
    assert_eq!(env.snapshot().await?, before);

    alice.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

/// Each row's seq, body, whether it holds a sealed body, and whether its key exists.
async fn bodies_of(env: &TestEnv) -> anyhow::Result<Vec<(i64, Option<String>, bool, bool)>> {
    let mut out = Vec::new();
    for i in 0..env.shard_dsns.len() {
        let query = format!(
            "SELECT m.seq, m.body, m.sealed IS NOT NULL, {}
             FROM messages m ORDER BY seq",
            db_writer::keys::MESSAGE_KEY_EXISTS
        );
        let rows = env.shard(i).await?.query(&query, &[]).await?;
        out.extend(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))),
        );
    }
    out.sort();
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_expire_in_delete_on_ack_mode() -> anyhow::Result<()> {
    let mut env = TestEnv::new(1, &["gw1"]).await?;
    env.retention = Retention::DeleteOnAck;
    env.unacked_ttl = Duration::from_secs(1);
    env.expiry_interval = Duration::from_millis(200);
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    alice.send("bob", "nobody reads this").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row = env
            .shard(0)
            .await?
            .query_opt("SELECT body, expired_at_ms FROM messages", &[])
            .await?;
        if let Some(r) = row {
            let (body, expired): (Option<String>, Option<i64>) = (r.get(0), r.get(1));
            if expired.is_some() {
                assert_eq!(body, None, "expired content is erased");
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "message did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The sweep built its index before sweeping (keep mode's shards have none).
    let valid: Option<bool> = env
        .shard(0)
        .await?
        .query_opt(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('messages_unexpired_age')",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    assert_eq!(valid, Some(true));
    // No longer pending: bob's sync is empty.
    let mut bob = Client::connect(&ws_url(gw.addr), &env.token("bob")).await?;
    assert!(bob.until_sync_done(WAIT).await?.is_empty());
    alice.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}
