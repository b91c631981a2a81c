//! `db-writer replay`: rebuilding a lost shard and resharding from the `inbound` log.

use std::collections::BTreeSet;
use std::time::Duration;

use chat_common::ids::ConversationKey;
use chat_e2e::{connect, ws_url, TestEnv, WAIT};
use db_writer::replay::{replay, ReplayOptions, Start, Summary};
use db_writer::{Locator, Retention, ShardConfig, Shards};

/// One row as a replay must reproduce it (everything but the storage timestamp).
type Row = (
    String,
    i64,
    String,
    String,
    String,
    Option<String>,
    i64,
    bool,
);

async fn rows_of(dsn: &str) -> anyhow::Result<Vec<Row>> {
    let c = chat_e2e::pg_connect(dsn).await?;
    let rows = c
        .query(
            "SELECT conversation, seq, message_id::text, sender, recipient, body, sent_at_ms,
                    acked
             FROM message_status ORDER BY conversation, seq",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect())
}

async fn all_rows(dsns: &[String]) -> anyhow::Result<Vec<Vec<Row>>> {
    let mut out = Vec::new();
    for d in dsns {
        out.push(rows_of(d).await?);
    }
    Ok(out)
}

/// Traffic over several conversations, some acked; returns once all is stored and applied.
async fn traffic(env: &TestEnv) -> anyhow::Result<()> {
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    let users = ["ann", "ben", "cat", "dan", "eve", "fay"];
    let mut clients = Vec::new();
    for u in users {
        clients.push(connect(&ws_url(gw.addr), &env.token(u)).await);
    }
    let mut sent = 0;
    for (i, from) in users.iter().enumerate() {
        for (j, to) in users.iter().enumerate() {
            if i != j {
                clients[i].send(to, &format!("{from}->{to}")).await?;
                sent += 1;
            }
        }
    }
    // Everyone acks what they got from the first two users.
    for c in clients.iter_mut() {
        let me = c.user().to_owned();
        let expected = users.iter().filter(|u| **u != me).count();
        for _ in 0..expected {
            let m = c.next_message(WAIT).await?;
            if m.sender == "ann" || m.sender == "ben" {
                c.ack(&m.sender, m.seq)?;
            }
        }
    }
    // Wait for the stores to settle: all messages stored and the acks applied.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rows: Vec<Row> = all_rows(&env.shard_dsns)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let acked = rows.iter().filter(|r| r.7).count();
        if rows.len() == sent && acked == 2 * (users.len() - 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "traffic did not settle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in clients {
        c.close();
    }
    gw.stop().await;
    mux.stop().await;
    Ok(())
}

async fn run_replay(env: &TestEnv, dsns: &[String]) -> anyhow::Result<Summary> {
    let shards = Shards::connect(&ShardConfig::from_list(&dsns.join(","), 2)?)?;
    let options = ReplayOptions {
        topic: env.topics.inbound(),
        group: format!(
            "{}replay-{}",
            env.topics.prefix(),
            uuid::Uuid::new_v4().simple()
        ),
        start: Start::Beginning,
        retention: Retention::Keep,
        max_batch: 50,
    };
    let mut last = (0, 0);
    let summary = replay(&shards, &env.kafka, &options, &mut |done, total| {
        last = (done, total)
    })
    .await?;
    assert_eq!(last.0, last.1, "progress reached the total");
    Ok(summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_lost_and_replayed_comes_back_identical() -> anyhow::Result<()> {
    let env = TestEnv::new(4, &["gw1"]).await?;
    traffic(&env).await?;
    let before = all_rows(&env.shard_dsns).await?;
    let total: usize = before.iter().map(Vec::len).sum();
    let (lost, lost_rows) = before
        .iter()
        .enumerate()
        .max_by_key(|(_, r)| r.len())
        .map(|(i, r)| (i, r.len()))
        .expect("four shards");
    assert!(lost_rows > 0);
    env.shard(lost)
        .await?
        .batch_execute("DELETE FROM messages; DELETE FROM conversations;")
        .await?;

    let summary = run_replay(&env, &env.shard_dsns).await?;
    assert_eq!(summary.rows_written as usize, lost_rows);
    assert_eq!(summary.rows_present as usize, total - lost_rows);
    assert_eq!(summary.invalid, 0);
    assert_eq!(
        all_rows(&env.shard_dsns).await?,
        before,
        "the lost shard is back as it was"
    );

    // Replaying again changes nothing at all.
    let again = run_replay(&env, &env.shard_dsns).await?;
    assert_eq!(
        (again.rows_written, again.rows_present as usize),
        (0, total)
    );
    assert_eq!(all_rows(&env.shard_dsns).await?, before);
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_4_to_6_puts_every_conversation_where_the_new_locator_says() -> anyhow::Result<()>
{
    let mut env = TestEnv::new(4, &["gw1"]).await?;
    traffic(&env).await?;
    let old: BTreeSet<Row> = all_rows(&env.shard_dsns)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let new_dsns = env.extra_shards(6).await?;

    let summary = run_replay(&env, &new_dsns).await?;
    assert_eq!(summary.rows_written as usize, old.len());

    let locator = Locator::new(6);
    let mut new = BTreeSet::new();
    for (i, rows) in all_rows(&new_dsns).await?.into_iter().enumerate() {
        for r in rows {
            let key = ConversationKey::parse(&r.0)?;
            assert_eq!(locator.shard_of(&key), i, "{} is on shard {i}", r.0);
            new.insert(r);
        }
    }
    assert_eq!(
        new, old,
        "same messages, sequences, bodies and acks in the new layout"
    );
    env.teardown().await
}
