//! The shard layer on a real Postgres: acks as watermarks per direction of a conversation, what
//! sync, receipts and the expiry sweep read from them, and the migration that introduced them.

use std::collections::HashMap;

use anyhow::Context;
use chat_common::ids::{ConversationKey, UserId};
use chat_common::message::{Ack, Message};
use chat_common::seal::{BodyKey, BodyKeyId};
use chat_e2e::{new_message, TestEnv};
use db_writer::{Retention, ShardConfig, Shards};

fn conversation(a: &str, b: &str) -> anyhow::Result<String> {
    let key = ConversationKey::of(&UserId::parse(a)?, &UserId::parse(b)?).context("same user")?;
    Ok(key.as_str().to_owned())
}

fn shards_of(dsns: &[String]) -> anyhow::Result<Shards> {
    Ok(Shards::connect(&ShardConfig::from_list(
        &dsns.join(","),
        2,
    )?)?)
}

/// Seals `m` as gateways did before keys were issued ahead: no key id in the body, its key held
/// under the message's send key on `shard`.
async fn seal_before_keys_were_issued_ahead(
    shard: &tokio_postgres::Client,
    m: &mut Message,
) -> anyhow::Result<()> {
    let key = BodyKey::generate()?;
    m.sealed = Some(key.seal_v1(&m.id, "older")?);
    shard
        .execute(
            "INSERT INTO body_keys VALUES ($1, $2, $3, $4, 0)",
            &[
                &m.conversation.as_str(),
                &m.sender.as_str(),
                &m.client_id.as_str(),
                &key.as_bytes(),
            ],
        )
        .await?;
    Ok(())
}

/// (seq, body) of what `user` has pending, in order.
async fn pending(shards: &Shards, user: &str) -> anyhow::Result<Vec<(u64, String)>> {
    Ok(shards
        .pending(&UserId::parse(user)?, &HashMap::new(), 100)
        .await?
        .into_iter()
        .map(|m| (m.seq, m.body))
        .collect())
}

/// (conversation, peer, up to seq, acked at) of each receipt `user` has after `after_ms`.
async fn receipts(
    shards: &Shards,
    user: &str,
    after_ms: i64,
) -> anyhow::Result<Vec<(String, String, u64, i64)>> {
    Ok(shards
        .receipts_since(&UserId::parse(user)?, after_ms, 10)
        .await?
        .into_iter()
        .map(|r| {
            (
                r.conversation.to_string(),
                r.peer.to_string(),
                r.up_to_seq,
                r.acked_at_ms,
            )
        })
        .collect())
}

async fn ack(
    shards: &Shards,
    conv: &str,
    user: &str,
    up_to: u64,
    at: i64,
    retention: Retention,
) -> anyhow::Result<Vec<(String, String, u64)>> {
    let user = UserId::parse(user)?;
    let conversation = ConversationKey::parse(conv)?;
    let ack = Ack {
        peer: conversation
            .peer_of(&user)
            .context("not in the conversation")?,
        user,
        conversation,
        up_to_seq: up_to,
        acked_at_ms: at,
    };
    Ok(shards
        .apply_acks(&[ack], retention)
        .await?
        .receipts
        .into_iter()
        .map(|r| {
            let r = r.receipt;
            (r.conversation.to_string(), r.peer.to_string(), r.up_to_seq)
        })
        .collect())
}

/// The plan mode of `client`'s session, and each prepared statement of it that `tag` names:
/// (generic plans, custom plans) so far.
async fn plans(
    client: &tokio_postgres::Client,
    tag: &str,
) -> anyhow::Result<(String, Vec<(i64, i64)>)> {
    let mode = client.query_one("SHOW plan_cache_mode", &[]).await?.get(0);
    let rows = client
        .query(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements
             WHERE strpos(statement, $1) > 0 AND strpos(statement, 'pg_prepared') = 0
             ORDER BY statement",
            &[&tag],
        )
        .await?;
    Ok((mode, rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
}

/// A writer's two kinds of connections to a shard. The store's first attempt, the ack and the
/// user index's upsert run on `Shards::generic_client`'s, with their generic plans and no
/// round trip to set the plan mode; everything else runs on `Shards::client`'s, planned per
/// execution with its own arrays, as the store's lookups need. One connection of each kind
/// (pools of one), so that each test reads the session the statements ran on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_hot_statements_run_generic_plans_and_the_rest_custom_ones() -> anyhow::Result<()>
{
    let env = TestEnv::new(1, &[]).await?;
    let shards = Shards::connect(&ShardConfig::from_list(&env.shard_dsns.join(","), 1)?)?;
    let (alice, bob) = ("plan-alice", "plan-bob");
    let conv = conversation(alice, bob)?;
    for round in 0..3i64 {
        let m = new_message(alice, bob, &format!("m{round}"), 1_000 + round)?;
        let stored = shards.store_batch(std::slice::from_ref(&m)).await?;
        let acked = ack(
            &shards,
            &conv,
            bob,
            stored[0].message.seq,
            2_000 + round,
            Retention::Keep,
        )
        .await?;
        assert_eq!(acked.len(), 1, "round {round}: a receipt");
        let mut index = db_writer::IndexUpdates::new();
        index.stored(&stored);
        shards.update_index(&index).await?;
    }
    let generic = shards.generic_client(0).await?;
    for (tag, statement) in [
        ("INSERT INTO conversations", "the store's first attempt"),
        ("UPDATE acks k SET", "the ack"),
        ("INSERT INTO user_conversations", "the index upsert"),
    ] {
        let (mode, counts) = plans(&generic, tag).await?;
        assert_eq!(mode, "force_generic_plan");
        assert_eq!(
            counts,
            vec![(3, 0)],
            "{statement}: three runs, each on its generic plan"
        );
    }
    drop(generic);

    // A message stored again takes the second attempt, whose lookup is planned per execution on
    // the writer's other connection.
    let again = new_message(alice, bob, "again", 5_000)?;
    shards.store_batch(std::slice::from_ref(&again)).await?;
    let stored = shards.store_batch(std::slice::from_ref(&again)).await?;
    assert!(!stored[0].created, "stored once");
    let custom = shards.client(0).await?;
    let (mode, counts) = plans(&custom, "FROM unnest").await?;
    assert_eq!(mode, "force_custom_plan");
    assert!(
        counts.iter().any(|&(_, c)| c >= 1) && counts.iter().all(|&(g, _)| g == 0),
        "the second attempt's statements, planned per execution: {counts:?}"
    );
    let (_, hot) = plans(&custom, "INSERT INTO user_conversations").await?;
    assert!(hot.is_empty(), "the hot statements never ran here: {hot:?}");
    env.teardown().await
}

/// The store's first attempt runs on its generic plan, planned once per connection with the
/// table sizes of that moment and kept. On a new shard whose key tables hold about a thousand
/// keys (a few pages, analyzed as autovacuum would), the check that each sealed body's key
/// exists must still probe the keys' index, not scan the table per message: with `EXISTS`, the
/// generic plan did scan, and kept scanning as the tables grew. Both forms of a delete-on-ack
/// batch: every body with its key's id, and some sealed before keys were issued ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shards_store_probes_the_key_tables_by_index() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let shard = env.shard(0).await?;
    let mut issued = shards.issue_sealing_keys(0, 1_000, 0).await?.into_iter();
    shard
        .batch_execute(
            "INSERT INTO body_keys
             SELECT 'filler-' || g, 'fi', 'x', decode(repeat('00', 32), 'hex'), 0
             FROM generate_series(1, 1000) g;
             ANALYZE sealing_keys; ANALYZE body_keys",
        )
        .await?;
    let mut by_id = Vec::new();
    let mut any = Vec::new();
    for i in 0..200 {
        let mut m = new_message("ia", "jo", "", i)?;
        if i % 4 == 3 {
            seal_before_keys_were_issued_ahead(&shard, &mut m).await?;
            any.push(m);
        } else {
            let (key_id, key) = issued.next().context("a key")?;
            m.sealed = Some(key.seal(&key_id, &m.id, "now")?);
            match i % 2 {
                0 => by_id.push(m),
                _ => any.push(m),
            }
        }
    }
    for batch in [&by_id, &any] {
        let stored = shards.store_batch(batch).await?;
        assert!(stored.iter().all(|s| s.created), "every message is new");
    }
    // The writer's sessions report their table statistics as they end. Each index the
    // migrations built scanned its table once: those scans are not counted.
    drop(shards);
    let scans = |table: &'static str| {
        let shard = &shard;
        async move {
            let row = shard
                .query_one(
                    "SELECT seq_scan - (SELECT count(*) FROM pg_index WHERE indrelid = relid),
                            coalesce(idx_scan, 0)
                     FROM pg_stat_user_tables WHERE relname = $1",
                    &[&table],
                )
                .await?;
            anyhow::Ok((row.get::<_, i64>(0), row.get::<_, i64>(1)))
        }
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (sealing, body) = (scans("sealing_keys").await?, scans("body_keys").await?);
        let reported = |(seq, index): (i64, i64)| seq > 0 || index > 0;
        if reported(sealing) && reported(body) {
            assert!(
                sealing.0 <= 0 && body.0 <= 0 && sealing.1 > 0 && body.1 > 0,
                "sequential scans of sealing_keys and body_keys: {}, {} (index scans: {}, {})",
                sealing.0,
                body.0,
                sealing.1,
                body.1
            );
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the store's probes of the key tables were not reported: {sealing:?}, {body:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_move_a_watermark_per_direction() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let conv = conversation("amy", "bo")?;
    // amy -> bo (1), bo -> amy (2), amy -> bo (3).
    let stored = shards
        .store_batch(&[
            new_message("amy", "bo", "one", 1)?,
            new_message("bo", "amy", "two", 2)?,
            new_message("amy", "bo", "three", 3)?,
        ])
        .await?;
    let seqs: Vec<u64> = stored.iter().map(|s| s.message.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(
        pending(&shards, "bo").await?,
        [(1, "one".into()), (3, "three".into())]
    );
    assert_eq!(pending(&shards, "amy").await?, [(2, "two".into())]);

    // bo acks up to 1: only bo's direction moves.
    assert_eq!(
        ack(&shards, &conv, "bo", 1, 100, Retention::Keep).await?,
        [(conv.clone(), "bo".into(), 1)]
    );
    assert_eq!(pending(&shards, "bo").await?, [(3, "three".into())]);
    assert_eq!(pending(&shards, "amy").await?, [(2, "two".into())]);
    // Again, or lower: nothing moves, no receipt.
    assert!(ack(&shards, &conv, "bo", 1, 101, Retention::Keep)
        .await?
        .is_empty());
    assert!(ack(&shards, &conv, "bo", 0, 101, Retention::Keep)
        .await?
        .is_empty());

    // An ack past the last seq stops at it: a later message is still pending.
    assert_eq!(
        ack(&shards, &conv, "bo", 1_000, 200, Retention::Keep).await?,
        [(conv.clone(), "bo".into(), 3)]
    );
    assert!(pending(&shards, "bo").await?.is_empty());
    shards
        .store_batch(&[new_message("amy", "bo", "four", 4)?])
        .await?;
    assert_eq!(pending(&shards, "bo").await?, [(4, "four".into())]);

    // A replayed message reports whether it is acked.
    let again = shards.store_batch(&[stored[0].message.clone()]).await?;
    assert!(!again[0].created && again[0].acked);
    let again = shards.store_batch(&[stored[1].message.clone()]).await?;
    assert!(!again[0].created && !again[0].acked);

    // Receipts for amy: bo's watermark and when it last moved; none for bo yet.
    assert_eq!(
        receipts(&shards, "amy", 0).await?,
        [(conv.clone(), "bo".into(), 3, 200)]
    );
    assert!(receipts(&shards, "amy", 200).await?.is_empty());
    assert!(receipts(&shards, "bo", 0).await?.is_empty());

    // Sync skips what the client says it holds.
    let held = HashMap::from([(ConversationKey::parse(&conv)?, 4)]);
    assert!(shards
        .pending(&UserId::parse("bo")?, &held, 100)
        .await?
        .is_empty());
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_ack_erases_what_the_watermark_passes_and_expiry_counts_the_unacked(
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let conv = conversation("cy", "di")?;
    shards
        .store_batch(&[
            new_message("cy", "di", "one", 1_000)?,
            new_message("di", "cy", "two", 1_000)?,
            new_message("cy", "di", "three", 1_000)?,
            new_message("cy", "di", "four", 5_000)?,
        ])
        .await?;
    assert_eq!(
        ack(&shards, &conv, "di", 3, 2_000, Retention::DeleteOnAck).await?,
        [(conv.clone(), "di".into(), 3)]
    );
    // di's messages up to 3 are erased; cy's message to di (2) and di's seq 4 keep their bodies.
    let bodies = env.stored(&conv).await?;
    assert_eq!(
        bodies,
        [
            (1, None),
            (2, Some("two".into())),
            (3, None),
            (4, Some("four".into()))
        ]
    );

    // The ack marked what it erased (at the ack's time): the metadata window counts from it.
    assert_eq!(
        erased_at(&env).await?,
        [(1, Some(2_000)), (2, None), (3, Some(2_000)), (4, None)]
    );

    // The sweep at 3,000 takes seqs 1-3: only seq 2 was unacked and unmarked. It erases and
    // marks it; seq 4 is younger and stays pending.
    assert_eq!(shards.expire_unacked(3_000, 9_999).await?, 1);
    assert!(pending(&shards, "cy").await?.is_empty());
    assert_eq!(pending(&shards, "di").await?, [(4, "four".into())]);
    let expired: i64 = env
        .shard(0)
        .await?
        .query_one(
            "SELECT count(*) FROM messages WHERE expired_at_ms IS NOT NULL AND body IS NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(expired, 3);
    assert_eq!(
        erased_at(&env).await?,
        [
            (1, Some(2_000)),
            (2, Some(9_999)),
            (3, Some(2_000)),
            (4, None)
        ]
    );
    // A second sweep finds nothing left.
    assert_eq!(shards.expire_unacked(3_000, 10_000).await?, 0);
    // The metadata window: rows erased before 5,000 go, the conversation keeps its counter,
    // and seq 4 (pending) stays.
    assert_eq!(shards.purge_erased(5_000).await?, 2);
    assert_eq!(erased_at(&env).await?, [(2, Some(9_999)), (4, None)]);
    assert_eq!(shards.purge_erased(10_000).await?, 1);
    assert_eq!(pending(&shards, "di").await?, [(4, "four".into())]);
    let last_seq: i64 = env
        .shard(0)
        .await?
        .query_one("SELECT last_seq FROM conversations", &[])
        .await?
        .get(0);
    assert_eq!(last_seq, 4);
    env.teardown().await
}

/// Delete-on-ack with sealed bodies, seeded (`STORE_SHRED_SEED` replays a run): messages in a
/// few conversations, sent at random times, acked to a random seq per direction. The ack
/// destroys exactly the keys of what its watermark passed and rewrites no row; the metadata
/// window then deletes exactly the acknowledged rows sent before its cutoff, over more than one
/// chunk and past pending rows of that age, and leaves the pending ones readable by sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_ack_destroys_keys_and_the_window_deletes_acked_rows() -> anyhow::Result<()> {
    let (_, mut rng) = chat_e2e::Rng::seeded("STORE_SHRED_SEED");
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let users = ["ev", "fa", "gi", "ho"];
    let n = rng.range(4_000, 4_400);
    let mut issued = shards.issue_sealing_keys(0, 2 * n, 0).await?.into_iter();
    let shard = env.shard(0).await?;
    let mut messages = Vec::new();
    // A client's retries, each sealed under a key of its own: (copy, its key id), stored with
    // the first copy (repeated in the batch) or after it.
    let (mut retries_with, mut retries_after) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let from = rng.below(users.len());
        let to = (from + 1 + rng.below(users.len() - 1)) % users.len();
        let mut m = new_message(users[from], users[to], "", rng.range(0, 9_999) as i64)?;
        // About a sixth sealed as gateways did before keys were issued ahead: no key id in the body,
        // the key held under the send key.
        if rng.chance(17) {
            seal_before_keys_were_issued_ahead(&shard, &mut m).await?;
        } else {
            let (key_id, key) = issued.next().context("a key")?;
            m.sealed = Some(key.seal(&key_id, &m.id, "now")?);
            if rng.chance(12) {
                let (retry_id, retry_key) = issued.next().context("a key")?;
                let mut retry = m.clone();
                retry.sealed = Some(retry_key.seal(&retry_id, &m.id, "now")?);
                match rng.chance(50) {
                    true => retries_with.push((retry, retry_id)),
                    false => retries_after.push((retry, retry_id)),
                }
            }
        }
        messages.push(m);
    }
    // Keys issued and never taken: the expiry's, not the ack's.
    let unused: Vec<BodyKeyId> = issued.map(|(id, _)| id).collect();
    let mut first_batch = messages.clone();
    first_batch.extend(retries_with.iter().map(|(m, _)| m.clone()));
    let stored = shards.store_batch(&first_batch).await?;
    let again: Vec<_> = retries_after.iter().map(|(m, _)| m.clone()).collect();
    let stored_again = shards.store_batch(&again).await?;
    assert!(
        stored_again.iter().all(|s| !s.created),
        "a retry is not stored twice"
    );
    // The store destroyed every retry's key, and no other.
    let key_ids = |rows: Vec<tokio_postgres::Row>| -> anyhow::Result<Vec<BodyKeyId>> {
        let mut ids = rows
            .iter()
            .map(|r| BodyKeyId::from_bytes(r.get(0)))
            .collect::<Result<Vec<_>, _>>()?;
        ids.sort();
        Ok(ids)
    };
    let mut want: Vec<BodyKeyId> = messages
        .iter()
        .filter_map(|m| BodyKeyId::of(m.sealed.as_deref()?))
        .chain(unused.iter().copied())
        .collect();
    want.sort();
    let held = key_ids(shard.query("SELECT id FROM sealing_keys", &[]).await?)?;
    assert_eq!(
        held.len(),
        want.len(),
        "{} retries' keys",
        retries_with.len() + retries_after.len()
    );
    assert_eq!(
        held, want,
        "keys after the store: every message's, no retry's"
    );
    let stored = stored[..messages.len()].to_vec();
    let seq_of: HashMap<String, u64> = stored
        .iter()
        .map(|s| (s.message.client_id.as_str().to_owned(), s.message.seq))
        .collect();

    // Each direction acked up to a random seq of its own (or not at all).
    let mut watermark: HashMap<(String, String), u64> = HashMap::new();
    let mut acks = Vec::new();
    for m in &messages {
        let direction = (m.conversation.to_string(), m.recipient.to_string());
        if watermark.contains_key(&direction) {
            continue;
        }
        let last = messages
            .iter()
            .filter(|o| o.conversation == m.conversation && o.recipient == m.recipient)
            .map(|o| seq_of[o.client_id.as_str()])
            .max()
            .unwrap_or(0);
        let up_to = if rng.chance(10) {
            0
        } else {
            rng.range(last as usize / 2, last as usize) as u64
        };
        watermark.insert(direction, up_to);
        if up_to > 0 {
            acks.push(Ack {
                conversation: m.conversation.clone(),
                user: m.recipient.clone(),
                peer: m.sender.clone(),
                up_to_seq: up_to,
                acked_at_ms: 20_000,
            });
        }
    }
    shards.apply_acks(&acks, Retention::DeleteOnAck).await?;
    let acked = |m: &chat_common::message::Message| {
        seq_of[m.client_id.as_str()]
            <= watermark[&(m.conversation.to_string(), m.recipient.to_string())]
    };

    // The keys are those of the unacknowledged messages, exactly, in either table (and the
    // unused ones); no row was rewritten.
    let mut keys: Vec<String> = shard
        .query("SELECT client_message_id FROM body_keys", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    keys.sort();
    let mut unacked: Vec<String> = messages
        .iter()
        .filter(|m| !acked(m) && m.sealed.as_deref().and_then(BodyKeyId::of).is_none())
        .map(|m| m.client_id.as_str().to_owned())
        .collect();
    unacked.sort();
    assert!(!unacked.is_empty(), "unacknowledged messages of version 1");
    assert_eq!(
        keys, unacked,
        "keys left by send key = the unacknowledged messages'"
    );
    let held = key_ids(shard.query("SELECT id FROM sealing_keys", &[]).await?)?;
    let mut want: Vec<BodyKeyId> = messages
        .iter()
        .filter(|m| !acked(m))
        .filter_map(|m| BodyKeyId::of(m.sealed.as_deref()?))
        .chain(unused.iter().copied())
        .collect();
    want.sort();
    assert_eq!(
        held, want,
        "keys left by id = the unacknowledged messages' and the unused"
    );
    let row = shard
        .query_one(
            "SELECT count(*) FILTER (WHERE sealed IS NULL OR body IS NOT NULL
                                        OR expired_at_ms IS NOT NULL),
                    count(*)
             FROM messages",
            &[],
        )
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (0, messages.len() as i64),
        "every row as stored: sealed, not marked"
    );

    // The window: exactly the acknowledged rows sent before the cutoff go.
    // A cutoff past more than a chunk's worth (1,000) of acknowledged rows, with pending rows
    // of the same age among them.
    let mut acked_sent: Vec<i64> = messages
        .iter()
        .filter(|m| acked(m))
        .map(|m| m.sent_at_ms)
        .collect();
    acked_sent.sort();
    assert!(acked_sent.len() > 1_200, "{} acked", acked_sent.len());
    let before = acked_sent[rng.range(1_050, acked_sent.len() - 1)] + 1;
    let gone = messages
        .iter()
        .filter(|m| acked(m) && m.sent_at_ms < before)
        .count();
    let pending_as_old = messages
        .iter()
        .filter(|m| !acked(m) && m.sent_at_ms < before)
        .count();
    assert!(
        gone > 1_000 && pending_as_old > 0,
        "{gone} rows to go, {pending_as_old} pending as old"
    );
    assert_eq!(shards.purge_erased(before).await?, gone as u64);
    let mut left: Vec<String> = shard
        .query("SELECT client_message_id FROM messages", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    left.sort();
    let mut kept: Vec<String> = messages
        .iter()
        .filter(|m| !(acked(m) && m.sent_at_ms < before))
        .map(|m| m.client_id.as_str().to_owned())
        .collect();
    kept.sort();
    assert_eq!(left, kept, "rows left after the window");
    assert_eq!(
        shards.purge_erased(before).await?,
        0,
        "a second pass finds none"
    );

    // What is pending is still there for sync, whatever its age.
    for user in users {
        let mut want: Vec<u64> = messages
            .iter()
            .filter(|m| m.recipient.as_str() == user && !acked(m))
            .map(|m| seq_of[m.client_id.as_str()])
            .collect();
        want.sort();
        let mut got: Vec<u64> = shards
            .pending(&UserId::parse(user)?, &HashMap::new(), 10_000)
            .await?
            .into_iter()
            .map(|m| m.seq)
            .collect();
        got.sort();
        assert_eq!(got, want, "{user}'s pending");
    }

    // The expiry: every message sent before its cutoff goes with its key, in either table, and
    // of the keys no message took, those issued more than `UNUSED_KEY_MARGIN_MS` before it.
    let margin = db_writer::keys::UNUSED_KEY_MARGIN_MS;
    let recent = shards.issue_sealing_keys(0, 20, 5_000).await?;
    let cutoff = margin + 2_500; // after every send; 0 < cutoff - margin < 5,000
    shards.expire_unacked(cutoff, cutoff).await?;
    let held = key_ids(shard.query("SELECT id FROM sealing_keys", &[]).await?)?;
    let mut want: Vec<BodyKeyId> = recent.iter().map(|(id, _)| *id).collect();
    want.sort();
    assert_eq!(
        held, want,
        "only the unused keys issued after cutoff - margin"
    );
    let v1: i64 = shard
        .query_one("SELECT count(*) FROM body_keys", &[])
        .await?
        .get(0);
    assert_eq!(
        v1, 0,
        "the keys of version 1 bodies went with their messages"
    );
    env.teardown().await
}

/// Keys issued ahead carry ids that begin with the millisecond they were issued in
/// (`BodyKeyId::issued_at`), so issues on one shard in the same millisecond can draw the same
/// ids; the shard refuses such an issue and it is made again under new ones. Many writers issuing
/// at once at one `now_ms` (about 8 overlaps expected among the 2,016 pairs of issues): each gets
/// every key it asked for, no id is held twice, and the shard holds each key under the id its
/// writer got, so every sealed body still opens with its own key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_in_one_millisecond_each_get_every_key_under_an_id_of_its_own() -> anyhow::Result<()>
{
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let shard = env.shard(0).await?;
    let (writers, each) = (64, 2_048);
    let now_ms = 1_796_500_000_123;
    let issued = futures_util::future::try_join_all(
        (0..writers).map(|_| shards.issue_sealing_keys(0, each, now_ms)),
    )
    .await?;
    let mut got = HashMap::new();
    for keys in &issued {
        assert_eq!(
            keys.len(),
            each,
            "a writer got fewer keys than it asked for"
        );
        for (id, key) in keys {
            assert!(got.insert(*id, key.clone()).is_none(), "{id:?} given twice");
        }
    }
    let rows = shard
        .query("SELECT id, key, created_at_ms FROM sealing_keys", &[])
        .await?;
    assert_eq!(rows.len(), writers * each);
    for row in rows {
        let id = BodyKeyId::from_bytes(row.get::<_, &[u8]>(0))?;
        let held = BodyKey::from_bytes(row.get::<_, &[u8]>(1))?;
        assert_eq!(
            got.get(&id),
            Some(&held),
            "{id:?} holds another writer's key"
        );
        assert_eq!(row.get::<_, i64>(2), now_ms);
    }
    env.teardown().await
}

/// Delete-on-ack's metadata window also deletes the records of messages set aside (who sent
/// whom what could not be stored, and when), seeded (`STORE_FAILURES_SEED` replays a run):
/// failures at random times over two shards; the window takes exactly those before its cutoff,
/// each sender's sync still finds every later one, and a second pass finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_deletes_old_failure_records_and_keeps_the_recent_ones() -> anyhow::Result<()> {
    let (seed, mut rng) = chat_e2e::Rng::seeded("STORE_FAILURES_SEED");
    let env = TestEnv::new(2, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let users = ["ia", "jo", "ku", "lu", "mo"];
    let mut failures = Vec::new();
    for _ in 0..rng.range(200, 300) {
        let from = rng.below(users.len());
        let to = (from + 1 + rng.below(users.len() - 1)) % users.len();
        let at = rng.range(0, 9_999) as i64;
        let m = new_message(users[from], users[to], "never stored", at)?;
        failures.push(db_writer::failures::FailedMessage::of(
            &m,
            "invalid_body",
            "the body is not valid",
            at,
        ));
    }
    shards.record_failures(&failures).await?;
    let before = rng.range(2_000, 8_000) as i64;
    let old = failures.iter().filter(|f| f.failed_at_ms < before).count();
    assert!(
        old > 0 && old < failures.len(),
        "seed {seed}: both sides of the cutoff"
    );

    assert_eq!(
        shards.purge_erased(before).await?,
        old as u64,
        "seed {seed}"
    );
    for user in users {
        let mut want: Vec<String> = failures
            .iter()
            .filter(|f| f.sender.as_str() == user && f.failed_at_ms >= before)
            .map(|f| f.client_message_id.as_str().to_owned())
            .collect();
        want.sort();
        let mut got: Vec<String> = shards
            .failures_since(&UserId::parse(user)?, -1, 1_000)
            .await?
            .iter()
            .map(|f| f.client_message_id.as_str().to_owned())
            .collect();
        got.sort();
        assert_eq!(got, want, "seed {seed}: {user}'s failures after the window");
    }
    assert_eq!(shards.purge_erased(before).await?, 0, "seed {seed}");
    env.teardown().await
}

/// A batch that mixes messages already stored (a replay after a crash, a client retry) with new
/// ones: the stored ones come back as they were, the new ones get the next seqs, with no gap
/// left by the attempt that found the stored ones, and nothing is written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_stored_and_new_messages_keeps_seqs_dense() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let (ab, cd) = (conversation("amy", "bo")?, conversation("cy", "di")?);
    let first = shards
        .store_batch(&[
            new_message("amy", "bo", "one", 1)?,
            new_message("bo", "amy", "two", 2)?,
            new_message("cy", "di", "uno", 3)?,
        ])
        .await?;
    let three = new_message("amy", "bo", "three", 4)?;
    let again = shards
        .store_batch(&[
            three.clone(),
            first[1].message.clone(),
            new_message("bo", "amy", "four", 5)?,
            first[2].message.clone(),
            three.clone(),
        ])
        .await?;
    let got: Vec<(String, u64, bool)> = again
        .iter()
        .map(|s| (s.message.body.clone(), s.message.seq, s.created))
        .collect();
    assert_eq!(
        got,
        [
            ("three".into(), 3, true),
            ("two".into(), 2, false),
            ("four".into(), 4, true),
            ("uno".into(), 1, false),
            ("three".into(), 3, false),
        ]
    );
    // The next message follows without a gap; each conversation holds each message once.
    let five = shards
        .store_batch(&[new_message("amy", "bo", "five", 6)?])
        .await?;
    assert_eq!(five[0].message.seq, 5);
    let bodies: Vec<(i64, Option<String>)> = env.stored(&ab).await?;
    let expected: Vec<(i64, Option<String>)> = ["one", "two", "three", "four", "five"]
        .iter()
        .zip(1..)
        .map(|(b, seq)| (seq, Some((*b).to_owned())))
        .collect();
    assert_eq!(bodies, expected);
    assert_eq!(env.stored(&cd).await?, [(1, Some("uno".to_owned()))]);
    env.teardown().await
}

/// Writers storing one log at once, the way a zombie multiplexer and the one that took over its
/// partitions do, each in batches of its own random sizes; seeded (`STORE_WRITERS_SEED` replays
/// a run). The log holds client retries (the same send with another message id) and client ids
/// reused toward another peer. Every send key is stored once, with the body it was first sent
/// with; seqs are dense in every conversation; every writer gets back each message's stored
/// seq; exactly one store reports creating each message; and the messages a writer creates take
/// seqs in its log order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_storing_one_log_at_once_store_each_send_once_with_dense_seqs() -> anyhow::Result<()>
{
    let (_, mut rng) = chat_e2e::Rng::seeded("STORE_WRITERS_SEED");
    let env = TestEnv::new(2, &[]).await?;
    let users = ["na", "ob", "pi", "qu", "ro", "su"];
    let mut log: Vec<Message> = Vec::new();
    for i in 0..rng.range(300, 500) {
        if !log.is_empty() && rng.chance(10) {
            let mut retry = log[rng.below(log.len())].clone();
            retry.id = uuid::Uuid::new_v4();
            log.push(retry);
            continue;
        }
        let from = rng.below(users.len());
        let to = (from + 1 + rng.below(users.len() - 1)) % users.len();
        let mut m = new_message(users[from], users[to], &format!("body {i}"), i as i64)?;
        if rng.chance(10) {
            if let Some(p) = log
                .iter()
                .find(|p| p.sender == m.sender && p.recipient != m.recipient)
            {
                m.client_id = p.client_id.clone();
            }
        }
        log.push(m);
    }
    let writers = rng.range(2, 4);
    let mut plans = Vec::new();
    for _ in 0..writers {
        let mut sizes = Vec::new();
        let mut left = log.len();
        while left > 0 {
            let size = rng.range(1, 60).min(left);
            sizes.push(size);
            left -= size;
        }
        plans.push(sizes);
    }
    println!("{} messages, {writers} writers", log.len());
    let outs = futures_util::future::try_join_all(plans.iter().map(|sizes| {
        let (log, dsns) = (&log, &env.shard_dsns);
        async move {
            let shards = shards_of(dsns)?;
            let mut out = Vec::new();
            let mut at = 0;
            for size in sizes {
                out.extend(shards.store_batch(&log[at..at + size]).await?);
                at += size;
            }
            anyhow::Ok(out)
        }
    }))
    .await?;

    // What the shards hold: each send key once, with the body of its first send.
    type Key = (String, String, String);
    let key = |m: &Message| -> Key {
        let (c, s, id) = (&m.conversation, &m.sender, &m.client_id);
        (c.as_str().into(), s.as_str().into(), id.as_str().into())
    };
    let mut first_body: HashMap<Key, &str> = HashMap::new();
    for m in &log {
        first_body.entry(key(m)).or_insert(m.body.as_str());
    }
    let mut seq_of: HashMap<(String, String), i64> = HashMap::new();
    let conversations: std::collections::BTreeSet<String> =
        first_body.keys().map(|k| k.0.clone()).collect();
    for c in &conversations {
        let stored = env.stored(c).await?;
        let seqs: Vec<i64> = stored.iter().map(|(seq, _)| *seq).collect();
        let dense: Vec<i64> = (1..=stored.len() as i64).collect();
        assert_eq!(seqs, dense, "{c}: seqs dense from 1");
        let mut bodies: Vec<&str> = stored.iter().filter_map(|(_, b)| b.as_deref()).collect();
        let mut expected: Vec<&str> = first_body
            .iter()
            .filter(|(k, _)| &k.0 == c)
            .map(|(_, b)| *b)
            .collect();
        bodies.sort_unstable();
        expected.sort_unstable();
        assert_eq!(bodies, expected, "{c}: each send key once, first body");
        for (seq, body) in stored {
            seq_of.insert((c.clone(), body.context("keep mode keeps bodies")?), seq);
        }
    }
    // What each writer was told, against it.
    let mut created: HashMap<Key, usize> = HashMap::new();
    for out in &outs {
        assert_eq!(out.len(), log.len(), "one stored form per record");
        let mut last_created: HashMap<&str, u64> = HashMap::new();
        for (m, s) in log.iter().zip(out) {
            let k = key(m);
            assert_eq!(key(&s.message), k);
            assert_eq!(s.message.body, first_body[&k]);
            let c = k.0.clone();
            assert_eq!(
                s.message.seq as i64,
                seq_of[&(c, s.message.body.clone())],
                "the stored seq"
            );
            if s.created {
                *created.entry(k).or_default() += 1;
                let last = last_created.entry(m.conversation.as_str()).or_default();
                assert!(s.message.seq > *last, "created in log order");
                *last = s.message.seq;
            }
        }
    }
    for k in first_body.keys() {
        assert_eq!(
            created.get(k),
            Some(&1),
            "{k:?} created by exactly one store"
        );
    }
    let by_writer: Vec<usize> = outs
        .iter()
        .map(|out| out.iter().filter(|s| s.created).count())
        .collect();
    println!("messages created by each writer: {by_writer:?}");
    env.teardown().await
}

/// The expiry sweep's index (delete-on-ack mode) is not made by migrations: a shard has none
/// until `ensure_sweep_index` builds it, which is idempotent and rebuilds one that an interrupted
/// build left invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_index_is_built_on_demand() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    let db = env.shard(0).await?;
    let index = || async {
        let row = db
            .query_opt(
                "SELECT indisvalid, pg_get_indexdef(indexrelid) FROM pg_index
                 WHERE indexrelid = to_regclass('messages_unexpired_age')",
                &[],
            )
            .await?;
        anyhow::Ok(row.map(|r| (r.get::<_, bool>(0), r.get::<_, String>(1))))
    };
    let expected = "CREATE INDEX messages_unexpired_age ON public.messages USING btree (sent_at_ms) WHERE (expired_at_ms IS NULL)";
    assert_eq!(index().await?, None);
    shards.ensure_sweep_index().await?;
    assert_eq!(index().await?, Some((true, expected.to_owned())));
    shards.ensure_sweep_index().await?;
    assert_eq!(index().await?, Some((true, expected.to_owned())));

    // A failed concurrent build leaves an invalid index behind under the name.
    db.batch_execute("DROP INDEX messages_unexpired_age")
        .await?;
    shards
        .store_batch(&[
            new_message("amy", "bo", "one", 1)?,
            new_message("amy", "bo", "two", 2)?,
        ])
        .await?;
    let failed = db
        .batch_execute(
            "CREATE UNIQUE INDEX CONCURRENTLY messages_unexpired_age ON messages (conversation)",
        )
        .await;
    assert!(failed.is_err(), "two messages share a conversation");
    assert!(index().await?.is_some_and(|(valid, _)| !valid));
    shards.ensure_sweep_index().await?;
    assert_eq!(index().await?, Some((true, expected.to_owned())));
    env.teardown().await
}

/// ANALYZE samples `messages` with a statistics target of 10 (3,000 rows, not 30,000): every
/// column and the send key's expression have it, so a column added later without it fails
/// here, and a table analyzed keeps histograms of 10 steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_analyzed_from_a_small_sample() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &[]).await?;
    let shards = shards_of(&env.shard_dsns)?;
    shards.ensure_sweep_index().await?;
    let db = env.shard(0).await?;
    let targets: Vec<(String, String)> = db
        .query(
            "SELECT c.relname::text, a.attname::text FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             WHERE a.attnum > 0 AND NOT a.attisdropped
               AND a.attstattarget IS DISTINCT FROM 10
               AND (c.oid = 'messages'::regclass
                    OR c.oid IN (SELECT indexrelid FROM pg_index
                                 WHERE indrelid = 'messages'::regclass AND indexprs IS NOT NULL))
             ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(targets, [], "columns sampled at another target");

    db.batch_execute(
        "INSERT INTO messages (conversation, seq, message_id, client_message_id, sender,
                               recipient, body, sent_at_ms)
         SELECT 'amy:bo', g, gen_random_uuid(), 'c' || g, 'amy', 'bo', 'b' || g, 1000 + g
         FROM generate_series(1, 500) g;
         ANALYZE messages;",
    )
    .await?;
    let steps: Vec<(String, i32)> = db
        .query(
            "SELECT attname::text, cardinality(histogram_bounds::text::text[]) FROM pg_stats
             WHERE tablename = 'messages' AND attname IN ('seq', 'sent_at_ms', 'body')
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        steps,
        [
            ("body".into(), 11),
            ("sent_at_ms".into(), 11),
            ("seq".into(), 11)
        ]
    );
    env.teardown().await
}

/// A shard migrated before watermarks, with acked, unacked and expired messages, keeps every
/// message's state through the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_migration_keeps_every_state() -> anyhow::Result<()> {
    let mut env = TestEnv::new(1, &[]).await?;
    let dsns = env.empty_databases(1).await?;
    let shards = shards_of(&dsns)?;
    shards.migrate_to(2).await?;
    let c = chat_e2e::pg_connect(&dsns[0]).await?;
    let ab = conversation("al", "bea")?;
    let ac = conversation("al", "cid")?;
    // al<->bea: bea acked 1 and 2 (al's messages), 4 is al's and unacked; bea's message 3 to al
    // is unacked. al<->cid: cid's message 1 expired unacked.
    c.batch_execute(&format!(
        "INSERT INTO conversations VALUES ('{ab}', 4), ('{ac}', 1);
         INSERT INTO messages (conversation, seq, message_id, client_message_id, sender,
                               recipient, body, sent_at_ms, acked_at_ms, expired_at_ms)
         VALUES ('{ab}', 1, gen_random_uuid(), 'c1', 'al', 'bea', 'one', 10, 50, NULL),
                ('{ab}', 2, gen_random_uuid(), 'c2', 'al', 'bea', 'two', 20, 60, NULL),
                ('{ab}', 3, gen_random_uuid(), 'c3', 'bea', 'al', 'three', 30, NULL, NULL),
                ('{ab}', 4, gen_random_uuid(), 'c4', 'al', 'bea', 'four', 40, NULL, NULL),
                ('{ac}', 1, gen_random_uuid(), 'c5', 'cid', 'al', NULL, 5, NULL, 70);"
    ))
    .await?;
    shards.migrate().await?;

    let status: Vec<(String, i64, bool)> = c
        .query(
            "SELECT conversation, seq, acked FROM message_status ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        status,
        [
            (ab.clone(), 1, true),
            (ab.clone(), 2, true),
            (ab.clone(), 3, false),
            (ab.clone(), 4, false),
            (ac.clone(), 1, false),
        ]
    );
    assert_eq!(pending(&shards, "bea").await?, [(4, "four".into())]);
    assert_eq!(pending(&shards, "al").await?, [(3, "three".into())]);
    assert_eq!(
        receipts(&shards, "al", 0).await?,
        [(ab.clone(), "bea".into(), 2, 60)]
    );
    // The migrated watermarks move on as new ones do.
    assert_eq!(
        ack(&shards, &ab, "bea", 4, 80, Retention::Keep).await?,
        [(ab.clone(), "bea".into(), 4)]
    );
    assert!(pending(&shards, "bea").await?.is_empty());
    env.teardown().await
}

/// Where migrations run as their own step (MULTIPLEXER_MIGRATE=false), a multiplexer refuses
/// a shard that lacks one, naming it, instead of migrating it or running against an old schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiplexer_that_does_not_migrate_refuses_a_shard_behind() -> anyhow::Result<()> {
    let mut env = TestEnv::new(1, &["gw1"]).await?;
    let mut dsns = env.shard_dsns.clone();
    let fresh = env.empty_databases(1).await?;
    dsns.extend(fresh.clone());
    let with = |migrate: bool| {
        let dsns = dsns.join(",");
        move |c: &mut multiplexer::Config| {
            c.shards = ShardConfig::from_list(&dsns, 1).expect("valid DSNs");
            c.migrate = migrate;
        }
    };
    let refused = match env.start_multiplexer_with(with(false)).await {
        Ok(_) => anyhow::bail!("started against a shard with no schema"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("shard 1 lacks migrations this multiplexer needs: [1, 2, 3"),
        "{refused}"
    );
    assert!(
        !refused.contains("shard 0"),
        "shard 0 is migrated: {refused}"
    );
    // Untouched: it still has no schema at all.
    let shards = Shards::connect(&ShardConfig::from_list(&fresh.join(","), 1)?)?;
    assert_eq!(shards.missing_migrations().await?.len(), 1);

    // Migrated as its own step, the same multiplexer starts.
    shards.migrate().await?;
    assert!(shards.missing_migrations().await?.is_empty());
    let mux = env.start_multiplexer_with(with(false)).await?;
    mux.stop().await;
    env.teardown().await
}

/// Each row's seq and when its body was erased (`expired_at_ms`: the ack's or the sweep's time).
async fn erased_at(env: &TestEnv) -> anyhow::Result<Vec<(i64, Option<i64>)>> {
    let rows = env
        .shard(0)
        .await?
        .query("SELECT seq, expired_at_ms FROM messages ORDER BY seq", &[])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
