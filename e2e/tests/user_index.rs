//! The per-user conversation index on a real Postgres, at the store's level: a seeded random
//! workload written the way the multiplexer writes it (with batches whose index write "crashed"
//! and were replayed), then checked three ways: the invariant (`check_index`), every user's
//! index sync against the sync that reads every shard, and a rebuild from the shards alone.
//! Also the cost: a user with 500 conversations and nothing pending syncs with one query. And
//! the conversation list's pages, the same before and after migration 9 dropped the index they
//! were read by.
//!
//! `USER_INDEX_SEED=<n>` replays a run (the seed is printed at the start).

use std::collections::{BTreeSet, HashMap};

use anyhow::Context;
use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_common::message::{Ack, Message};
use chat_e2e::{Rng, TestEnv};
use db_writer::{IndexUpdates, ListCursor, Retention, ShardConfig, Shards, SyncRead};

fn user(i: usize) -> UserId {
    UserId::parse(&format!("u{i}")).expect("valid")
}

fn message(sender: &UserId, recipient: &UserId, body: String, at: i64) -> Message {
    Message {
        sealed: None,
        id: uuid::Uuid::new_v4(),
        client_id: ClientMessageId::parse(&uuid::Uuid::new_v4().to_string()).expect("valid"),
        conversation: ConversationKey::of(sender, recipient).expect("distinct"),
        sender: sender.clone(),
        recipient: recipient.clone(),
        body,
        sent_at_ms: at,
        seq: 0,
    }
}

fn shards_of(dsns: &[String]) -> anyhow::Result<Shards> {
    Ok(Shards::connect(&ShardConfig::from_list(
        &dsns.join(","),
        4,
    )?)?)
}

/// One batch as the multiplexer handles it: store, acks, index. With `crash`, the index write
/// is lost (the process died after the store and acks committed), and the batch is handled again
/// from the start, as the next owner of the partition would.
async fn handle(
    shards: &Shards,
    messages: &[Message],
    acks: &[Ack],
    crash: bool,
) -> anyhow::Result<()> {
    let stored = shards.store_batch(messages).await?;
    let acked = shards.apply_acks(acks, Retention::Keep).await?;
    if crash {
        return Box::pin(handle(shards, messages, acks, false)).await;
    }
    let mut index = IndexUpdates::new();
    index.stored(&stored);
    acked.watermarks.iter().for_each(|w| index.watermark(w));
    shards.update_index(&index).await?;
    Ok(())
}

/// A sync answer as comparable text: messages in order, receipts as a set.
fn summary(read: &SyncRead) -> (Vec<String>, BTreeSet<String>) {
    (
        read.messages
            .iter()
            .map(|m| format!("{} {} {}", m.conversation, m.seq, m.body))
            .collect(),
        read.receipts
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r.conversation, r.peer, r.up_to_seq, r.acked_at_ms
                )
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_agrees_with_the_shards_through_crashes_and_a_rebuild() -> anyhow::Result<()> {
    let (seed, mut rng) = Rng::seeded("USER_INDEX_SEED");
    let env = TestEnv::new(4, &["gw1"]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let users = 40;
    // What each recipient has been sent, per conversation: the seqs come from the store.
    let mut sent_to: HashMap<(UserId, ConversationKey), u64> = HashMap::new();
    let mut at = 1_000_000;
    for batch in 0..60 {
        let mut messages = Vec::new();
        let mut acks = Vec::new();
        for _ in 0..(1 + rng.below(40)) {
            let (a, b) = (rng.below(users), rng.below(users));
            if a == b {
                continue;
            }
            let (a, b) = (user(a), user(b));
            at += 1;
            if rng.below(3) == 0 {
                // b acks what it may have from a, up to a guess (clamped by the store).
                let conversation = ConversationKey::of(&a, &b).expect("distinct");
                let known = sent_to.get(&(b.clone(), conversation.clone())).copied();
                acks.push(Ack {
                    user: b.clone(),
                    peer: a.clone(),
                    conversation,
                    up_to_seq: known.unwrap_or(0) + rng.below(3) as u64,
                    acked_at_ms: at,
                });
            } else {
                messages.push(message(&a, &b, format!("b{batch} {at}"), at));
            }
        }
        let crash = rng.below(4) == 0;
        handle(&shards, &messages, &acks, crash)
            .await
            .with_context(|| format!("seed {seed}: batch {batch}"))?;
        // Record the seqs each recipient was sent (read back from history).
        for m in &messages {
            let page = shards.history(&m.conversation, None, 1).await?;
            if let Some(last) = page.last() {
                sent_to.insert((m.recipient.clone(), m.conversation.clone()), last.seq);
            }
        }
    }

    let violations = shards.check_index(20).await?;
    anyhow::ensure!(violations.is_empty(), "seed {seed}: {violations:?}");

    // Every user's sync through the index is the sync that reads every shard, with and without
    // a client cursor and a receipt time.
    let compare = |label: &'static str| {
        let shards = shards.clone();
        async move {
            for i in 0..users {
                let u = user(i);
                for since in [0, 1_000_000 + 300] {
                    let by_index = shards
                        .sync_read(&u, &HashMap::new(), since, 10_000, 1000)
                        .await?;
                    let every = shards
                        .sync_read_every_shard(&u, &HashMap::new(), since, 10_000, 1000)
                        .await?;
                    anyhow::ensure!(
                        summary(&by_index) == summary(&every),
                        "seed {seed}: {label}: {u} since {since}: index {:?} != shards {:?}",
                        summary(&by_index),
                        summary(&every)
                    );
                    anyhow::ensure!(
                        by_index.shard_queries <= 1 + shards.len() * 2,
                        "seed {seed}: {label}: {} queries",
                        by_index.shard_queries
                    );
                }
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    compare("live").await?;

    // Built again from the shards alone, the index says the same.
    for i in 0..shards.len() {
        env.shard(i)
            .await?
            .execute("TRUNCATE user_conversations", &[])
            .await?;
    }
    let rebuilt = shards.rebuild_index().await?;
    anyhow::ensure!(rebuilt.rows > 0, "seed {seed}: nothing rebuilt");
    let violations = shards.check_index(20).await?;
    anyhow::ensure!(
        violations.is_empty(),
        "seed {seed}: after rebuild: {violations:?}"
    );
    compare("rebuilt").await?;

    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_500_conversations_and_nothing_pending_syncs_in_one_query() -> anyhow::Result<()>
{
    let env = TestEnv::new(4, &["gw1"]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let me = UserId::parse("busy")?;
    let peers: Vec<UserId> = (0..500).map(|i| user(10_000 + i)).collect();
    let messages: Vec<Message> = peers
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                message(p, &me, format!("hello {i}"), 1_000 + i as i64),
                message(&me, p, format!("hi {i}"), 2_000 + i as i64),
            ]
        })
        .collect();
    handle(&shards, &messages, &[], false).await?;
    let conversations: BTreeSet<usize> = peers
        .iter()
        .map(|p| {
            shards
                .locator()
                .shard_of(&ConversationKey::of(&me, p).expect("distinct"))
        })
        .collect();
    anyhow::ensure!(
        conversations.len() == 4,
        "the conversations span every shard"
    );

    // Everything pending: one query for the index, one per shard.
    let read = shards
        .sync_read(&me, &HashMap::new(), i64::MAX - 1, 10_000, 1000)
        .await?;
    assert_eq!(read.messages.len(), 500);
    assert_eq!(read.shard_queries, 1 + 4, "index, then the four shards");

    // Acked everywhere: one query, whatever the number of conversations and shards.
    let acks: Vec<Ack> = peers
        .iter()
        .map(|p| Ack {
            user: me.clone(),
            peer: p.clone(),
            conversation: ConversationKey::of(&me, p).expect("distinct"),
            up_to_seq: 2,
            acked_at_ms: 5_000,
        })
        .collect();
    handle(&shards, &[], &acks, false).await?;
    let read = shards
        .sync_read(&me, &HashMap::new(), i64::MAX - 1, 10_000, 1000)
        .await?;
    assert!(read.messages.is_empty());
    assert_eq!(read.shard_queries, 1, "nothing pending: the index alone");

    // One conversation pending again: the index and that conversation's shard.
    let one = message(&peers[7], &me, "again".into(), 9_000);
    let shard = shards.locator().shard_of(&one.conversation);
    handle(&shards, &[one], &[], false).await?;
    let read = shards
        .sync_read(&me, &HashMap::new(), i64::MAX - 1, 10_000, 1000)
        .await?;
    assert_eq!(read.messages.len(), 1);
    assert_eq!(read.messages[0].body, "again");
    assert_eq!(read.shard_queries, 2, "the index, then shard {shard} only");

    // A peer's receipt comes from the index too (its "hello" was acked at 5,000); the query
    // beyond the index is for the "hi" pending for it.
    let read = shards
        .sync_read(&peers[3], &HashMap::new(), 4_999, 10_000, 1000)
        .await?;
    assert_eq!(read.receipts.len(), 1);
    assert_eq!(read.receipts[0].up_to_seq, 2);
    assert_eq!(read.messages.len(), 1);
    assert_eq!(
        read.shard_queries, 2,
        "the index, then the pending conversation's shard"
    );

    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_deployment_syncs_every_shard_until_the_index_is_rebuilt() -> anyhow::Result<()>
{
    let mut env = TestEnv::new(1, &["gw1"]).await?;
    // Shards of the release before the index, with messages and acks in them.
    let dsns = env.empty_databases(3).await?;
    let shards = shards_of(&dsns)?;
    shards.migrate_to(5).await?;
    // Today's store writes the sealed-body column and reads the key tables of migrations 8 and
    // 10 (delete-on-ack mode); the release before the index wrote none of them. They are added
    // empty, as those migrations would, so that today's store can write that release's rows.
    for dsn in &dsns {
        chat_e2e::pg_connect(dsn)
            .await?
            .batch_execute(
                "ALTER TABLE messages ADD COLUMN sealed bytea;
                 CREATE TABLE body_keys (conversation text, sender text,
                                         client_message_id text, key bytea,
                                         created_at_ms bigint,
                                         PRIMARY KEY (conversation, sender, client_message_id));
                 CREATE TABLE sealing_keys (id bytea PRIMARY KEY, key bytea,
                                            created_at_ms bigint)",
            )
            .await?;
    }
    let (ann, bob, cy) = (user(1), user(2), user(3));
    let old = [
        message(&ann, &bob, "one".into(), 10),
        message(&ann, &bob, "two".into(), 11),
        message(&cy, &bob, "three".into(), 12),
        message(&bob, &ann, "back".into(), 13),
    ];
    shards.store_batch(&old).await?;
    let ack = Ack {
        user: bob.clone(),
        peer: ann.clone(),
        conversation: ConversationKey::of(&bob, &ann).expect("distinct"),
        up_to_seq: 1,
        acked_at_ms: 20,
    };
    shards.apply_acks(&[ack], Retention::Keep).await?;

    // Migration 6 on shards that hold messages: not built, so the sync reads every shard.
    shards.migrate().await?;
    anyhow::ensure!(
        !shards.index_built().await,
        "a shard with messages starts unbuilt"
    );
    let before = shards.sync_read(&bob, &HashMap::new(), 0, 100, 100).await?;
    assert_eq!(before.shard_queries, 3 * 3, "every query on every shard");
    let bodies: Vec<&str> = before.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies.len(), 2, "two and three pending: {bodies:?}");

    // The rebuild builds it from the shards; the same answers come from the index.
    let rebuilt = shards.rebuild_index().await?;
    assert_eq!(rebuilt.directions, 3, "ann->bob, cy->bob, bob->ann");
    assert!(shards.index_built().await);
    assert!(shards.check_index(10).await?.is_empty());
    for u in [&ann, &bob, &cy] {
        let by_index = shards.sync_read(u, &HashMap::new(), 0, 100, 100).await?;
        let every = shards
            .sync_read_every_shard(u, &HashMap::new(), 0, 100, 100)
            .await?;
        assert_eq!(summary(&by_index), summary(&every), "{u}");
        // The index, then the shards of the conversations with something pending.
        let pending_shards: BTreeSet<usize> = every
            .messages
            .iter()
            .map(|m| shards.locator().shard_of(&m.conversation))
            .collect();
        assert_eq!(by_index.shard_queries, 1 + pending_shards.len(), "{u}");
    }
    let list = shards.conversations(&bob, None, 10, true).await?;
    let unread: Vec<(String, u64)> = list
        .iter()
        .map(|c| (c.peer.to_string(), c.unread))
        .collect();
    // Newest activity first: bob's "back" to ann (13), then cy's "three" (12).
    assert_eq!(unread, [("u1".to_owned(), 1), ("u3".to_owned(), 1)]);
    assert_eq!(
        list[0].preview.as_ref().map(|p| p.body.as_str()),
        Some("back")
    );
    env.teardown().await
}

/// Every page of `user`'s list, `limit` at a time, each page starting after the last one's last.
async fn list_pages(
    shards: &Shards,
    user: &UserId,
    limit: u32,
) -> anyhow::Result<Vec<Vec<(i64, ConversationKey)>>> {
    let mut pages = Vec::new();
    let mut before: Option<ListCursor> = None;
    loop {
        let page: Vec<(i64, ConversationKey)> = shards
            .conversations(user, before.as_ref(), limit, false)
            .await?
            .into_iter()
            .map(|c| (c.last_activity_ms, c.conversation))
            .collect();
        anyhow::ensure!(page.len() <= limit as usize, "a page of {}", page.len());
        let Some((last_activity_ms, conversation)) = page.last().cloned() else {
            return Ok(pages);
        };
        before = Some(ListCursor {
            last_activity_ms,
            conversation,
        });
        pages.push(page);
        anyhow::ensure!(pages.len() <= 1_000, "the pages never end");
    }
}

/// Migration 9 drops the index the list walked by last activity; the list then reads the user's
/// rows by the primary key and sorts them. Its pages must not change: newest activity first,
/// ties (many here) by conversation, each conversation once, every page after the last one's
/// last. And a message after the migration brings its conversation to the front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_pages_the_same_after_its_activity_index_is_dropped() -> anyhow::Result<()> {
    let (_seed, mut rng) = Rng::seeded("USER_INDEX_LIST_SEED");
    let mut env = TestEnv::new(1, &["gw1"]).await?;
    let dsns = env.empty_databases(2).await?;
    let shards = shards_of(&dsns)?;
    shards.migrate_to(8).await?;
    // Today's store reads the key table of migration 10 (delete-on-ack mode): added empty, as
    // that migration would.
    for dsn in &dsns {
        chat_e2e::pg_connect(dsn)
            .await?
            .batch_execute(
                "CREATE TABLE sealing_keys (id bytea PRIMARY KEY, key bytea,
                                            created_at_ms bigint)",
            )
            .await?;
    }
    let me = user(0);
    let peers = 30 + rng.below(90);
    let mut messages = Vec::new();
    for p in 1..=peers {
        // Ten distinct times among up to 120 conversations: most of them tie on activity.
        let at = 1_000 + rng.below(10) as i64;
        for _ in 0..(1 + rng.below(3)) {
            messages.push(if rng.below(2) == 0 {
                message(&me, &user(p), format!("to {p}"), at)
            } else {
                message(&user(p), &me, format!("from {p}"), at)
            });
        }
    }
    handle(&shards, &messages, &[], false).await?;
    let mut expected: Vec<(i64, ConversationKey)> = messages
        .iter()
        .map(|m| (m.sent_at_ms, m.conversation.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    expected.reverse();
    assert_eq!(expected.len(), peers, "one conversation per peer");

    let limit = 1 + rng.below(15) as u32;
    let before = list_pages(&shards, &me, limit).await?;
    assert_eq!(
        before.concat(),
        expected,
        "pages of {limit}, with the index"
    );

    shards.migrate().await?;
    for dsn in &dsns {
        let left = chat_e2e::pg_connect(dsn)
            .await?
            .query(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'user_conversations'",
                &[],
            )
            .await?;
        let names: Vec<String> = left.iter().map(|r| r.get(0)).collect();
        assert_eq!(names, ["user_conversations_pkey"], "{dsn}");
    }
    let after = list_pages(&shards, &me, limit).await?;
    assert_eq!(after, before, "pages of {limit}, without the index");

    let p = 1 + rng.below(peers);
    handle(
        &shards,
        &[message(&user(p), &me, "late".into(), 5_000)],
        &[],
        false,
    )
    .await?;
    let first = list_pages(&shards, &me, limit).await?;
    let late = ConversationKey::of(&me, &user(p)).expect("distinct");
    assert_eq!(
        first[0][0],
        (5_000, late.clone()),
        "the late message's first"
    );
    let rest: Vec<_> = first.concat().into_iter().skip(1).collect();
    let others: Vec<_> = expected.into_iter().filter(|(_, c)| *c != late).collect();
    assert_eq!(rest, others, "the others in their order");
    env.teardown().await
}
