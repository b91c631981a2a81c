//! Delivery guarantees: idempotent sends, order, offline sync, resume, routing, sessions,
//! backpressure, receipts.

use std::collections::HashMap;
use std::time::Duration;

use chat_client::{Client, ClientError, Event, Options, Rest};
use chat_e2e::{connect, http_url, ws_url, Rng, TestEnv, WAIT};
use chat_proto::v1::{outbound_record, ChatMessage, OutboundBatch, OutboundItem, OutboundRecord};
use db_writer::Retention;
use futures_util::future::join_all;
use prost::Message as _;
use rdkafka::message::Message as _;

/// Sends `n` messages from `from` to `to` (bodies "<prefix>-<i>"), up to 64 at a time; returns
/// the bodies in the order Kafka accepted them is not known, so the caller checks by seq.
async fn send_many(from: &Client, to: &str, prefix: &str, n: usize) -> Vec<String> {
    let bodies: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in bodies.chunks(64) {
        let results = join_all(chunk.iter().map(|b| from.send(to, b))).await;
        for r in results {
            r.expect("accepted");
        }
    }
    bodies
}

/// The stored rows of a conversation: (seq, body), in seq order.
async fn rows(env: &TestEnv, conversation: &str) -> Vec<(i64, Option<String>)> {
    env.stored(conversation).await.expect("shards readable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_client_id_creates_nothing_new() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    let (gw1, gw2) = (
        env.start_gateway("gw1").await?,
        env.start_gateway("gw2").await?,
    );
    let mux = env.start_multiplexer().await?;
    let mut bob = connect(&ws_url(gw2.addr), &env.token("bob")).await;

    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let first = alice.send_with_id("same-id", "bob", "once").await?;
    let again = alice.send_with_id("same-id", "bob", "once").await?;
    alice.close();
    // After reconnecting to the other gateway.
    let alice = connect(&ws_url(gw2.addr), &env.token("alice")).await;
    let third = alice.send_with_id("same-id", "bob", "once").await?;
    assert_eq!(first.message_id, again.message_id);
    assert_eq!(first.message_id, third.message_id);

    let got = bob.next_message(WAIT).await?;
    // The message keeps its first attempt's time; each retry's answer carries its own.
    assert_eq!(
        (got.message_id, got.seq, got.sent_at_ms),
        (first.message_id.clone(), 1, first.sent_at_ms)
    );
    // A marker proves nothing else was delivered before it.
    let marker = alice.send("bob", "marker").await?;
    let next = bob.next_message(WAIT).await?;
    assert_eq!(next.message_id, marker.message_id);
    assert_eq!(next.seq, 2, "the retries took no sequence number");
    assert_eq!(
        rows(&env, "alice:bob").await,
        vec![(1, Some("once".into())), (2, Some("marker".into()))]
    );
    alice.close();
    bob.close();
    for c in [gw1, gw2, mux] {
        c.stop().await;
    }
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_1000_messages_once_in_order() -> anyhow::Result<()> {
    let env = TestEnv::new(4, &["gw1", "gw2"]).await?;
    let (gw1, gw2) = (
        env.start_gateway("gw1").await?,
        env.start_gateway("gw2").await?,
    );
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let sent = send_many(&alice, "bob", "m", 1000).await;

    // Wait until all 1000 are stored (the multiplexer is asynchronous to "accepted").
    let deadline = tokio::time::Instant::now() + WAIT;
    while rows(&env, "alice:bob").await.len() < 1000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all stored in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut bob = Client::connect(&ws_url(gw2.addr), &env.token("bob")).await?;
    let synced = bob.until_sync_done(WAIT).await?;
    let seqs: Vec<u64> = synced.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=1000).collect::<Vec<_>>(),
        "every message once, in order"
    );
    let mut bodies: Vec<String> = synced.iter().map(|m| m.body.clone()).collect();
    bodies.sort();
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(bodies, expected);
    // Then live messages, with nothing repeated at the seam.
    let marker = alice.send("bob", "live").await?;
    let next = bob.next_message(WAIT).await?;
    assert_eq!((next.message_id, next.seq), (marker.message_id, 1001));

    alice.close();
    bob.close();
    for c in [gw1, gw2, mux] {
        c.stop().await;
    }
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_gets_exactly_what_the_client_lacks_and_history_pages() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;
    send_many(&alice, "bob", "a", 5).await;
    for _ in 0..5 {
        bob.next_message(WAIT).await?;
    }
    let held = bob.last_seq();
    assert_eq!(held.get("alice:bob"), Some(&5));
    bob.close(); // no ack: all five stay pending

    send_many(&alice, "bob", "b", 3).await;
    let mut options = Options::new(&ws_url(gw.addr), &env.token("bob"));
    options.resume_from = held;
    let mut bob = Client::connect_with(options).await?;
    let got = bob.until_sync_done(WAIT).await?;
    let got: Vec<u64> = got.iter().map(|m| m.seq).collect();
    if got.len() < 3 {
        // Some were not stored yet at sync time: they follow live.
        let mut all = got.clone();
        while all.len() < 3 {
            all.push(bob.next_message(WAIT).await?.seq);
        }
        assert_eq!(all, vec![6, 7, 8]);
    } else {
        assert_eq!(got, vec![6, 7, 8], "exactly what it lacked");
    }

    // History pages, oldest first, with a cursor.
    send_many(&alice, "bob", "c", 17).await; // 25 in all
    let deadline = tokio::time::Instant::now() + WAIT;
    while rows(&env, "alice:bob").await.len() < 25 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rest = Rest::new(&http_url(gw.addr));
    let token = env.token("alice");
    let mut pages = Vec::new();
    let mut path = "/messages/bob?limit=10".to_owned();
    loop {
        let r = rest.request("GET", &path, Some(&token), None).await?;
        assert_eq!(r.status, 200);
        let seqs: Vec<u64> = r.body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["seq"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0))
            .collect();
        pages.push(seqs);
        match r.body["nextBefore"].as_u64() {
            Some(b) => path = format!("/messages/bob?limit=10&before={b}"),
            None => break,
        }
    }
    assert_eq!(
        pages,
        vec![
            (16..=25).collect::<Vec<u64>>(),
            (6..=15).collect(),
            (1..=5).collect()
        ]
    );
    let r = rest
        .request("GET", "/messages/bob?limit=abc", Some(&token), None)
        .await?;
    assert_eq!(r.status, 400);

    alice.close();
    bob.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_moves_gateways_gets_messages_there_and_the_old_session_is_replaced(
) -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    let (gw1, gw2) = (
        env.start_gateway("gw1").await?,
        env.start_gateway("gw2").await?,
    );
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;

    // Same gateway: the second connection replaces the first.
    let mut bob1 = connect(&ws_url(gw1.addr), &env.token("bob")).await;
    let mut bob2 = connect(&ws_url(gw1.addr), &env.token("bob")).await;
    let closed = wait_closed(&mut bob1).await;
    assert_eq!(closed.0, 4001, "{}", closed.1);

    // Another gateway: the gw1 session is replaced, and messages follow bob to gw2.
    let mut bob3 = connect(&ws_url(gw2.addr), &env.token("bob")).await;
    let closed = wait_closed(&mut bob2).await;
    assert_eq!(closed.0, 4001);
    let a = alice.send("bob", "to gw2").await?;
    let got = bob3.next_message(WAIT).await?;
    assert_eq!(got.message_id, a.message_id);
    assert_eq!(bob3.gateway_id(), "gw2");

    alice.close();
    bob3.close();
    for c in [gw1, gw2, mux] {
        c.stop().await;
    }
    env.teardown().await
}

/// A session that opens while a batch's index is being written, and whose sync therefore
/// misses the batch, still gets it live: with the index write held up by a lock on the index
/// table, bob connects after alice's message is stored, his sync comes back without it, and
/// the message arrives on his socket once the lock is released. Run with the multiplexer
/// routing a batch before its index write (then again to sessions announced meanwhile) and
/// after it.
async fn a_session_opened_during_the_index_write_gets_the_batch_live(
    early_push: bool,
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env
        .start_multiplexer_with(|c| c.early_push = early_push)
        .await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    // Warm up: a first message delivered (to another user: bob's index must not list the
    // conversation yet), so that everything is routed and running.
    let mut carol = connect(&ws_url(gw.addr), &env.token("carol")).await;
    alice.send("carol", "first").await?;
    assert_eq!(carol.next_message(WAIT).await?.body, "first");
    let activity = || async {
        let rows = env
            .shard(0)
            .await?
            .query(
                "SELECT coalesce(wait_event_type, '') || ' ' || coalesce(wait_event, '')
                        || ': ' || left(query, 100)
                   FROM pg_stat_activity WHERE datname = current_database()",
                &[],
            )
            .await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>(),
        )
    };
    let locker = env.shard(0).await?;
    locker
        .batch_execute("BEGIN; LOCK TABLE user_conversations IN EXCLUSIVE MODE")
        .await?;
    let sent = alice.send("bob", "while the index waits").await?;
    chat_e2e::eventually("the message stored, its index write waiting", || async {
        let stored = env.stored("alice:bob").await?.len();
        let waiting: i64 = env
            .shard(0)
            .await?
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await?
            .get(0);
        Ok((stored == 1 && waiting > 0).then_some(()))
    })
    .await?;
    let mut bob = Client::connect(&ws_url(gw.addr), &env.token("bob")).await?;
    let synced = match bob.until_sync_done(WAIT).await {
        Ok(synced) => synced,
        Err(e) => anyhow::bail!(
            "bob's sync: {e}; the shard's sessions: {:?}",
            activity().await?
        ),
    };
    assert!(
        synced.iter().all(|m| m.message_id != sent.message_id),
        "the sync ran before the index moved, so it cannot have the message: {synced:?}"
    );
    locker.batch_execute("COMMIT").await?;
    let got = bob.next_message(WAIT).await?;
    assert_eq!(got.message_id, sent.message_id);
    assert_eq!(got.body, "while the index waits");

    for c in [&alice, &bob, &carol] {
        c.close();
    }
    for c in [gw, mux] {
        c.stop().await;
    }
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_during_the_index_write_gets_the_batch_pushed_again() -> anyhow::Result<()>
{
    a_session_opened_during_the_index_write_gets_the_batch_live(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_during_the_index_write_gets_the_batch_once_indexed() -> anyhow::Result<()>
{
    a_session_opened_during_the_index_write_gets_the_batch_live(false).await
}

async fn wait_closed(c: &mut Client) -> (u16, String) {
    loop {
        match c.next_event_within(WAIT).await.expect("an event") {
            Event::Disconnected { code, reason } => return (code, reason),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_a_gateway_the_user_left_are_not_lost_and_reach_no_one_else() -> anyhow::Result<()>
{
    let env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    let (gw1, gw2) = (
        env.start_gateway("gw1").await?,
        env.start_gateway("gw2").await?,
    );
    let mux = env.start_multiplexer().await?;
    let alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let mut carol = connect(&ws_url(gw1.addr), &env.token("carol")).await;

    // bob is offline: alice's message is stored and pending.
    let a = alice.send("bob", "while away").await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while rows(&env, "alice:bob").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A stale push for bob lands on gw1, where bob is not; and a corrupt one keyed to carol.
    let stored = ChatMessage {
        sealed_body: Vec::new(),
        message_id: a.message_id.clone(),
        client_message_id: "x".into(),
        sender: "alice".into(),
        recipient: "bob".into(),
        body: "while away".into(),
        sent_at_ms: a.sent_at_ms,
        seq: 1,
        conversation: "alice:bob".into(),
    };
    let rec = OutboundRecord {
        kind: Some(outbound_record::Kind::Deliver(stored)),
    };
    let topic = env.topics.outbound(&env.gateway_ids[0]);
    env.produce(&topic, "bob", rec.encode_to_vec()).await?;
    env.produce(&topic, "carol", rec.encode_to_vec()).await?;
    // The same in a batch: an item for bob, one addressed to carol, and a batch nested in an
    // item (refused).
    let item = |user: &str, record: OutboundRecord| OutboundItem {
        user: user.into(),
        record: Some(record),
    };
    let nested = OutboundRecord {
        kind: Some(outbound_record::Kind::Batch(OutboundBatch {
            items: vec![item("carol", rec.clone())],
        })),
    };
    let batch = OutboundRecord {
        kind: Some(outbound_record::Kind::Batch(OutboundBatch {
            items: vec![
                item("bob", rec.clone()),
                item("carol", rec.clone()),
                item("carol", nested),
            ],
        })),
    };
    env.produce(&topic, "gw1", batch.encode_to_vec()).await?;
    // carol must not see bob's message: the next thing she gets is her own marker.
    let marker = alice.send("carol", "marker").await?;
    let got = carol.next_message(WAIT).await?;
    assert_eq!(
        got.message_id, marker.message_id,
        "bob's message never reaches carol"
    );

    // bob's next sync delivers it.
    let mut bob = Client::connect(&ws_url(gw2.addr), &env.token("bob")).await?;
    let synced = bob.until_sync_done(WAIT).await?;
    assert_eq!(synced.len(), 1);
    assert_eq!(synced[0].message_id, a.message_id);

    alice.close();
    carol.close();
    bob.close();
    for c in [gw1, gw2, mux] {
        c.stop().await;
    }
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_does_not_drain_is_closed_and_its_messages_stay_pending() -> anyhow::Result<()>
{
    use futures_util::StreamExt;

    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env
        .start_gateway_with("gw1", |c| c.socket_queue = 4)
        .await?;
    // A raw socket that reads the welcome and then nothing.
    let url = format!("{}/ws?access_token={}", ws_url(gw.addr), env.token("bob"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let _welcome = socket.next().await;

    // Large pushes straight into gw1's outbound topic fill the TCP buffers, then the queue.
    let body = "x".repeat(512 * 1024);
    let topic = env.topics.outbound(&env.gateway_ids[0]);
    let mut records = Vec::new();
    for seq in 1..=40u64 {
        let rec = OutboundRecord {
            kind: Some(outbound_record::Kind::Deliver(ChatMessage {
                sealed_body: Vec::new(),
                message_id: format!("00000000-0000-0000-0000-{seq:012}"),
                client_message_id: format!("c{seq}"),
                sender: "alice".into(),
                recipient: "bob".into(),
                body: body.clone(),
                sent_at_ms: 0,
                seq,
                conversation: "alice:bob".into(),
            })),
        };
        records.push(rec.encode_to_vec());
    }
    env.produce_all(&topic, "bob", records).await?;
    // Now read: some frames, then the close with 4008.
    let close = chat_e2e::close_code(&mut socket).await;
    assert_eq!(close, Some(4008));
    // Other users are unaffected.
    let mut carol = connect(&ws_url(gw.addr), &env.token("carol")).await;
    carol.sync(HashMap::new())?;
    carol.until_sync_done(WAIT).await?;
    carol.close();
    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_reach_the_sender_live_and_on_the_next_sync() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    let (gw1, gw2) = (
        env.start_gateway("gw1").await?,
        env.start_gateway("gw2").await?,
    );
    let mux = env.start_multiplexer().await?;
    let mut alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw2.addr), &env.token("bob")).await;

    let a = alice.send("bob", "one").await?;
    // The sender learns the seq from a "stored" frame.
    let stored = loop {
        if let Event::Stored(s) = alice.next_event_within(WAIT).await? {
            break s;
        }
    };
    assert_eq!(
        (stored.message_id.as_str(), stored.seq),
        (a.message_id.as_str(), 1)
    );
    let m = bob.next_message(WAIT).await?;
    bob.ack("alice", m.seq)?;
    let receipt = loop {
        if let Event::Receipt(r) = alice.next_event_within(WAIT).await? {
            break r;
        }
    };
    assert_eq!((receipt.peer.as_str(), receipt.up_to_seq), ("bob", 1));

    // alice goes offline; bob acks a second message; alice's next sync carries the receipt.
    alice.send("bob", "two").await?;
    alice.close();
    let m = bob.next_message(WAIT).await?;
    assert_eq!(m.seq, 2);
    bob.ack("alice", 2)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let acked: i64 = env
            .shard(0)
            .await?
            .query_one("SELECT count(*) FROM message_status WHERE acked", &[])
            .await?
            .get(0);
        let acked1: i64 = env
            .shard(1)
            .await?
            .query_one("SELECT count(*) FROM message_status WHERE acked", &[])
            .await?
            .get(0);
        if acked + acked1 == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ack not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alice = Client::connect(&ws_url(gw1.addr), &env.token("alice")).await?;
    let receipt = loop {
        match alice.next_event_within(WAIT).await? {
            Event::Receipt(r) => break r,
            Event::SyncDone { .. } => panic!("sync ended without the receipt"),
            _ => {}
        }
    };
    assert_eq!((receipt.peer.as_str(), receipt.up_to_seq), ("bob", 2));

    // Acking twice, out of order, or beyond what exists changes nothing and breaks nothing.
    bob.ack("alice", 1)?;
    bob.ack("alice", 99)?;
    bob.ack("nobody", 5)?;
    let c = alice.send("bob", "three").await?;
    assert_eq!(bob.next_message(WAIT).await?.message_id, c.message_id);

    alice.close();
    bob.close();
    for c in [gw1, gw2, mux] {
        c.stop().await;
    }
    env.teardown().await
}

/// A multiplexer told to write one record per push (for gateways of an earlier version, which
/// read only those) still delivers, confirms and receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_outbound_records_still_deliver() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env
        .start_multiplexer_with(|c| c.outbound_batches = false)
        .await?;
    let mut alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw.addr), &env.token("bob")).await;

    let a = alice.send("bob", "one").await?;
    let m = bob.next_message(WAIT).await?;
    assert_eq!((m.message_id.as_str(), m.seq), (a.message_id.as_str(), 1));
    bob.ack("alice", m.seq)?;
    let (mut stored, mut receipt) = (None, None);
    while stored.is_none() || receipt.is_none() {
        match alice.next_event_within(WAIT).await? {
            Event::Stored(s) => stored = Some(s.seq),
            Event::Receipt(r) => receipt = Some(r.up_to_seq),
            _ => {}
        }
    }
    assert_eq!((stored, receipt), (Some(1), Some(1)));
    // The deliver went out as a record of its own, keyed by the recipient.
    let out = env
        .read_topic(&env.topics.outbound(&env.gateway_ids[0]))
        .await?;
    assert!(out.iter().any(|r| {
        r.key() == Some(b"bob".as_slice())
            && matches!(
                r.payload().and_then(|p| OutboundRecord::decode(p).ok()).and_then(|r| r.kind),
                Some(outbound_record::Kind::Deliver(d)) if d.message_id == a.message_id
            )
    }));

    alice.close();
    bob.close();
    for c in [gw, mux] {
        c.stop().await;
    }
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_produce_is_answered_with_an_error_frame() -> anyhow::Result<()> {
    use chat_common::topics::{delete_topics, ensure_topics, TopicNames, TopicSpecs};
    let env = TestEnv::new(1, &["gw1"]).await?;
    // This gateway's inbound topic does not exist (brokers never auto-create); its presence
    // topic does, so sockets connect and the send itself fails.
    let broken = TopicNames::new(format!("{}missing-", env.topics.prefix()));
    ensure_topics(
        &env.kafka,
        &[(broken.presence(), TopicSpecs::standard().presence)],
        None,
    )
    .await?;
    env.allow_topics(&broken, &["gw1"]).await?;
    let gw = env
        .start_gateway_with("gw1", |c| {
            c.topics = broken.clone();
            c.kafka.produce_timeout = Duration::from_millis(1500);
        })
        .await?;
    let alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    match alice.send_with_id("c1", "bob", "hi").await {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "produce_failed", "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    // The socket stays usable after the error.
    assert!(matches!(
        alice.send_with_id("c2", "b b", "x").await,
        Err(ClientError::Refused { code, .. }) if code == "invalid_recipient"
    ));
    // REST says the same with a status.
    let rest = Rest::new(&http_url(gw.addr));
    let r = rest
        .request(
            "PUT",
            "/messages/bob",
            Some(&env.token("alice")),
            Some(serde_json::json!({"body": "hi"})),
        )
        .await?;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (503, Some("produce_failed")),
        "{}",
        r.body
    );
    alice.close();
    gw.stop().await;
    delete_topics(&env.kafka, &[broken.presence()]).await?;
    env.teardown().await
}

/// Delete-on-ack mode, as busy clients drive it: senders on one gateway pipeline bursts to
/// recipients on the other, all at once, with bodies of odd characters; one recipient acks each
/// message as it arrives (destroying the keys of what it read while later records are being
/// opened). The receiving gateway opens the bodies of several outbound records at a time
/// (`gateway::outbound`); every recipient must still get every message once, in each
/// conversation's order, with its body intact. Seeded: DOA_BURSTS_SEED replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_ack_pushes_pipelined_bursts_once_in_order_with_bodies_intact(
) -> anyhow::Result<()> {
    let (_, mut rng) = Rng::seeded("DOA_BURSTS_SEED");
    let mut env = TestEnv::new(2, &["gw1", "gw2"]).await?;
    env.retention = Retention::DeleteOnAck;
    let (gw1, gw2) = (
        env.start_gateway("gw1").await?,
        env.start_gateway("gw2").await?,
    );
    let mux = env.start_multiplexer().await?;
    let senders: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let recipients: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
    let mut readers = Vec::new();
    for r in &recipients {
        readers.push(connect(&ws_url(gw2.addr), &env.token(r)).await);
    }
    let odd = [
        "😀👍🏽👨‍👩‍👧‍👦🇳🇱",
        "\u{1}\u{1f}\u{7f}\t\r\n",
        "שלום \u{202e}مرحبا\u{202c}",
        "\u{feff}\u{2028}\u{fffd}\u{10ffff}",
        "e\u{301}Z\u{336}a\u{30a}",
        "\"quoted\" \\ back/slash",
    ];
    // What each sender sends, in issue order: (recipient, body).
    let mut plans: Vec<Vec<(String, String)>> = Vec::new();
    for s in &senders {
        let n = rng.range(30, 70);
        plans.push(
            (0..n)
                .map(|i| {
                    let to = recipients[rng.below(recipients.len())].clone();
                    let body = format!("{s}-{i} {}", odd[rng.below(odd.len())]);
                    (to, body)
                })
                .collect(),
        );
    }
    let mut clients = Vec::new();
    for s in &senders {
        clients.push(connect(&ws_url(gw1.addr), &env.token(s)).await);
    }
    // Every sender at once, each pipelining its whole burst.
    let bursts = clients
        .iter()
        .zip(&plans)
        .map(|(client, plan)| join_all(plan.iter().map(|(to, body)| client.send(to, body))));
    for results in join_all(bursts).await {
        for r in results {
            r.expect("accepted");
        }
    }
    // Each conversation's bodies in issue order, which is its seq order.
    let mut expected: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (s, plan) in senders.iter().zip(&plans) {
        for (to, body) in plan {
            expected
                .entry((to.clone(), s.clone()))
                .or_default()
                .push(body.clone());
        }
    }
    for (i, (reader, r)) in readers.iter_mut().zip(&recipients).enumerate() {
        let total: usize = expected
            .iter()
            .filter(|((to, _), _)| to == r)
            .map(|(_, v)| v.len())
            .sum();
        let mut got: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        for _ in 0..total {
            let m = reader.next_message(WAIT).await?;
            if i == 0 {
                reader.ack(&m.sender, m.seq)?;
            }
            got.entry(m.sender.clone())
                .or_default()
                .push((m.seq, m.body));
        }
        for s in &senders {
            let want = expected.remove(&(r.clone(), s.clone())).unwrap_or_default();
            let have = got.remove(s).unwrap_or_default();
            let seqs: Vec<u64> = have.iter().map(|(seq, _)| *seq).collect();
            assert_eq!(
                seqs,
                (1..=want.len() as u64).collect::<Vec<_>>(),
                "{s} -> {r}: every message once, in order"
            );
            let bodies: Vec<String> = have.into_iter().map(|(_, b)| b).collect();
            assert_eq!(bodies, want, "{s} -> {r}: bodies intact, in issue order");
        }
        assert!(got.is_empty(), "{r} got messages from no sender: {got:?}");
    }
    // Nothing more arrives: a repeat would show here.
    let marker = clients[0].send(&recipients[1], "marker").await?;
    let next = readers[1].next_message(WAIT).await?;
    assert_eq!(
        next.message_id, marker.message_id,
        "nothing after the bursts but the marker"
    );
    for c in clients.iter().chain(&readers) {
        c.close();
    }
    for c in [gw1, gw2, mux] {
        c.stop().await;
    }
    // gw2 stored the offset of every record it pushed (the marker's last), and committed them
    // as it stopped: a restart would push nothing again.
    let group = env.topics.gateway_group(&env.gateway_ids[1]);
    assert!(
        env.group_caught_up(&group, &env.topics.outbound(&env.gateway_ids[1]))
            .await?,
        "gw2 committed its outbound topic's offsets to the end"
    );
    env.teardown().await
}

/// A TCP link to a server whose client-to-server direction can be held: what a client sends
/// while it is held waits in the link (as a query waits for a server too busy to read it), and
/// goes on once it is let go. Answers flow back all along.
struct HeldLink {
    addr: std::net::SocketAddr,
    hold: tokio::sync::watch::Sender<bool>,
    /// Reads from a client that found the link held.
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HeldLink {
    async fn to(target: String) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (hold, held) = tokio::sync::watch::channel(false);
        let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = waiting.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut held, counted) = (held.clone(), counted.clone());
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = from_client.read(&mut buf).await?;
                            if n == 0 {
                                return to_server.shutdown().await;
                            }
                            if *held.borrow() {
                                counted.fetch_add(1, Ordering::SeqCst);
                            }
                            if held.wait_for(|h| !*h).await.is_err() {
                                return Ok(());
                            }
                            to_server.write_all(&buf[..n]).await?;
                        }
                    };
                    let down = tokio::io::copy(&mut from_server, &mut to_client);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok(Self {
            addr,
            hold,
            waiting,
        })
    }

    /// `dsn` (a URL) through this link in place of `target`, its host and port.
    fn carry(&self, dsn: &str, target: &str) -> String {
        assert!(dsn.contains(target), "{dsn} does not name {target}");
        dsn.replacen(target, &self.addr.to_string(), 1)
    }

    fn set_held(&self, held: bool) {
        self.hold.send_replace(held);
    }

    fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// In delete-on-ack mode a receipt does not wait for the keys its gateway reads to open the
/// messages it pushes: with the gateway's link to the shard held, the read of the key of a
/// message to bob cannot be answered, and carol's ack still reaches alice as a receipt while
/// bob's message waits; once the link is let go, bob gets it, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_does_not_wait_for_the_keys_of_the_messages_beside_it() -> anyhow::Result<()> {
    let mut env = TestEnv::new(1, &["gw1"]).await?;
    env.retention = Retention::DeleteOnAck;
    // The shard's host and port, as its DSN (a URL) names them.
    let dsn = &env.shard_dsns[0];
    let rest = dsn.split_once("://").map_or(dsn.as_str(), |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let target = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port)
        .to_owned();
    anyhow::ensure!(target.contains(':'), "no port in the shard's DSN");
    let link = HeldLink::to(target.clone()).await?;
    let gw = env
        .start_gateway_with("gw1", |c| {
            for dsn in &mut c.shards.dsns {
                *dsn = link.carry(dsn, &target);
            }
        })
        .await?;
    let mux = env.start_multiplexer().await?;
    let url = ws_url(gw.addr);
    let mut alice = connect(&url, &env.token("alice")).await;
    let mut bob = connect(&url, &env.token("bob")).await;
    let mut carol = connect(&url, &env.token("carol")).await;
    // Through the link, unheld: alice's message to carol is sealed, pushed and opened.
    alice.send("carol", "before the hold").await?;
    let first = carol.next_message(WAIT).await?;
    assert_eq!(first.body, "before the hold");

    link.set_held(true);
    // Sealed under a key the gateway holds ready (no round trip), stored, and routed to bob,
    // whose push now waits for its key.
    let sent = alice.send("bob", "while the link is held").await?;
    chat_e2e::eventually(
        "the gateway reading bob's key through the held link",
        || async { Ok((link.waiting() > 0).then_some(())) },
    )
    .await?;
    carol.ack("alice", first.seq)?;
    let receipt = loop {
        match alice.next_event_within(WAIT).await {
            Ok(Event::Receipt(r)) => break r,
            Ok(_) => continue,
            Err(e) => anyhow::bail!("no receipt while the link is held: {e}"),
        }
    };
    assert_eq!(
        (receipt.peer.as_str(), receipt.up_to_seq),
        ("carol", first.seq)
    );
    assert!(
        !matches!(
            bob.next_event_within(Duration::from_millis(1)).await,
            Ok(Event::Message(_))
        ),
        "bob's message was pushed while its key could not be read"
    );

    link.set_held(false);
    let got = bob.next_message(WAIT).await?;
    assert_eq!(got.message_id, sent.message_id);
    assert_eq!(got.body, "while the link is held");

    for c in [&alice, &bob, &carol] {
        c.close();
    }
    for c in [gw, mux] {
        c.stop().await;
    }
    env.teardown().await
}
