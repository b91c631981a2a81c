//! No record can stop a partition, and client message ids are scoped to the conversation.
//!
//! - Bad records produced straight into `inbound` among normal ones: every normal message is
//!   stored (dense seqs, log order), every bad one is on `inbound-dlq` with its code, source and
//!   original bytes, senders with valid ids are told (`Failed` live and in `failures_since`),
//!   and the consumer group catches up.
//! - The same client message id toward B, C (same shard) and D (another shard) is three
//!   messages; a retry toward B is B's message again.
//! - The store deduplicates by (conversation, sender, client message id), so a message id of the
//!   first scheme and one of the current scheme for the same send are one message.

use std::collections::HashMap;

use chat_client::{Event, Rest};
use chat_common::ids::{message_id, ClientMessageId, ConversationKey, UserId};
use chat_e2e::{connect, eventually, http_url, ws_url, TestEnv, WAIT};
use chat_proto::v1::{inbound_record, AckRecord, ChatMessage, DeadLetter, Failed, InboundRecord};
use db_writer::{Locator, ShardConfig, Shards};
use prost::Message as _;
use rdkafka::message::Message;
use uuid::Uuid;

/// The namespace of the first message id scheme (sender and client id only).
const FIRST_SCHEME: Uuid = Uuid::from_u128(0x6c1f_3a52_9d0e_4b7a_8e21_5f4c_0b9d_7a13);

fn user(s: &str) -> UserId {
    UserId::parse(s).expect("valid user id")
}

fn conversation(a: &str, b: &str) -> String {
    ConversationKey::of(&user(a), &user(b))
        .expect("distinct users")
        .as_str()
        .to_owned()
}

/// A message as a current gateway would accept it.
fn message(from: &str, to: &str, client_id: &str, body: &str) -> ChatMessage {
    let cid = ClientMessageId::parse(client_id).expect("valid client id");
    ChatMessage {
        sealed_body: Vec::new(),
        message_id: message_id(&user(from), &user(to), &cid).to_string(),
        client_message_id: client_id.into(),
        conversation: conversation(from, to),
        sender: from.into(),
        recipient: to.into(),
        body: body.into(),
        sent_at_ms: chat_common::now_ms(),
        seq: 0,
    }
}

/// The message as the store takes it (validated ids).
fn domain(m: &ChatMessage) -> chat_common::message::Message {
    chat_common::message::Message::try_from(m.clone()).expect("valid ids")
}

/// The same send as a gateway of the first id scheme accepted it.
fn first_scheme(mut m: ChatMessage) -> ChatMessage {
    let name = format!("{}\n{}", m.sender, m.client_message_id);
    m.message_id = Uuid::new_v5(&FIRST_SCHEME, name.as_bytes()).to_string();
    m
}

fn record(m: ChatMessage) -> Vec<u8> {
    InboundRecord {
        kind: Some(inbound_record::Kind::Message(m)),
        gateway_id: "gw1".into(),
    }
    .encode_to_vec()
}

/// Reads events until a `Failed` arrives.
async fn next_failed(c: &mut chat_client::Client) -> anyhow::Result<Failed> {
    loop {
        if let Event::Failed(f) = c.next_event_within(WAIT).await? {
            return Ok(f);
        }
    }
}

/// The (seq, body) of a conversation's stored rows.
async fn bodies(env: &TestEnv, conversation: &str) -> anyhow::Result<Vec<(i64, String)>> {
    Ok(env
        .stored(conversation)
        .await?
        .into_iter()
        .map(|(seq, body)| (seq, body.unwrap_or_default()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_set_aside_and_nothing_behind_them_stops() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    // A rule of the store the edge does not know about, to refuse one message in the middle of
    // a batch (SQLSTATE 23514, a data error): the bisection must store everything around it.
    for i in 0..2 {
        env.shard(i)
            .await?
            .batch_execute(
                "ALTER TABLE messages ADD CONSTRAINT test_refused
                 CHECK (body IS DISTINCT FROM 'refuse me')",
            )
            .await?;
    }
    let gw = env.start_gateway("gw1").await?;
    let mut alice = connect(&ws_url(gw.addr), &env.token("alice")).await;
    let mut carol = connect(&ws_url(gw.addr), &env.token("carol")).await;

    // Everything is on inbound before the multiplexer starts, so it arrives in few batches.
    let ab = conversation("alice", "bob");
    let cd = conversation("carol", "dave");
    let mut oversized = message("alice", "bob", "ok", "too big an id");
    oversized.client_message_id = "x".repeat(100 * 1024);
    let bad_ack = InboundRecord {
        kind: Some(inbound_record::Kind::Ack(AckRecord {
            user: "b b".into(),
            peer: "alice".into(),
            conversation: ab.clone(),
            up_to_seq: 1,
            acked_at_ms: 1,
        })),
        gateway_id: "gw1".into(),
    }
    .encode_to_vec();
    // (key, value, the dead-letter code it must get, or None for a normal message)
    let records: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (&ab, record(message("alice", "bob", "a1", "one")), None),
        (
            &ab,
            b"\xff\xff\xff not a record".to_vec(),
            Some("undecodable"),
        ),
        (&cd, record(message("carol", "dave", "c1", "c-one")), None),
        (&ab, record(message("alice", "bob", "a2", "two")), None),
        (
            &ab,
            record(message("alice", "bob", "nul", "x\0y")),
            Some("invalid_body"),
        ),
        (
            &cd,
            record(message("carol", "dave", "c2", "refuse me")),
            Some("store_refused"),
        ),
        (&ab, record(message("alice", "bob", "a3", "three")), None),
        (&ab, record(oversized), Some("bad_message")),
        (&cd, record(message("carol", "dave", "c3", "c-two")), None),
        // A body no push could carry (and a record whose dead letter keeps only its first bytes).
        (
            &cd,
            record(message(
                "carol",
                "dave",
                "huge",
                &"z".repeat(db_writer::inbound::MAX_BODY_BYTES + 1),
            )),
            Some("body_too_large"),
        ),
        (&ab, bad_ack, Some("bad_ack")),
        (&ab, record(message("alice", "bob", "a4", "four")), None),
        (&cd, record(message("carol", "dave", "c4", "c-three")), None),
    ];
    for (key, value, _) in &records {
        env.produce(&env.topics.inbound(), key, value.clone())
            .await?;
    }
    let mux = env.start_multiplexer().await?;

    // Every normal message is stored, dense and in log order, around the bad ones.
    let want_ab = vec![
        (1, "one".to_owned()),
        (2, "two".into()),
        (3, "three".into()),
        (4, "four".into()),
    ];
    let want_cd = vec![
        (1, "c-one".to_owned()),
        (2, "c-two".into()),
        (3, "c-three".into()),
    ];
    eventually("normal messages stored", || async {
        let (got_ab, got_cd) = (bodies(&env, &ab).await?, bodies(&env, &cd).await?);
        Ok((got_ab == want_ab && got_cd == want_cd).then_some(()))
    })
    .await?;

    // Every bad record is on the dead-letter topic: its code, where it was read, its bytes.
    let inbound = env.read_topic(&env.topics.inbound()).await?;
    let source: HashMap<Vec<u8>, (i32, i64, Vec<u8>)> = inbound
        .iter()
        .map(|m| {
            (
                m.payload().unwrap_or_default().to_vec(),
                (
                    m.partition(),
                    m.offset(),
                    m.key().unwrap_or_default().to_vec(),
                ),
            )
        })
        .collect();
    let bad: Vec<(&Vec<u8>, &str)> = records
        .iter()
        .filter_map(|(_, v, code)| code.map(|c| (v, c)))
        .collect();
    let dead = eventually("dead letters", || async {
        let dead = env.read_topic(&env.topics.inbound_dlq()).await?;
        Ok((dead.len() >= bad.len()).then_some(dead))
    })
    .await?;
    assert_eq!(dead.len(), bad.len(), "one dead letter per bad record");
    let letters: Vec<(DeadLetter, Vec<u8>)> = dead
        .iter()
        .map(|m| {
            let d = DeadLetter::decode(m.payload().unwrap_or_default()).expect("a DeadLetter");
            (d, m.key().unwrap_or_default().to_vec())
        })
        .collect();
    for (value, code) in &bad {
        let (partition, offset, key) = &source[*value];
        let (d, dead_key) = letters
            .iter()
            .find(|(d, _)| d.partition == *partition && d.offset == *offset)
            .unwrap_or_else(|| panic!("no dead letter for the {code} record"));
        assert_eq!(d.code, *code);
        if d.original.len() < value.len() {
            // Only an original too large to produce whole is cut, and the reason says so.
            assert!(
                value.len() > 512 * 1024 && d.reason.contains("truncated"),
                "{code}"
            );
            assert!(value.starts_with(&d.original), "{code}");
        } else {
            assert_eq!(&d.original, *value, "{code}: the original bytes");
        }
        assert_eq!(
            (d.topic.as_str(), d.partition, d.offset),
            (env.topics.inbound().as_str(), *partition, *offset),
            "{code}"
        );
        assert_eq!(
            dead_key, key,
            "{code}: the dead letter keeps the original key"
        );
        assert!(!d.reason.is_empty() && d.dead_at_ms > 0, "{code}");
    }
    let refused = letters
        .iter()
        .find(|(d, _)| d.code == "store_refused")
        .expect("refused");
    assert!(refused.0.reason.contains("23514"), "{}", refused.0.reason);

    // The senders are told, live and for their next sync.
    let f = next_failed(&mut alice).await?;
    assert_eq!(
        (
            f.client_message_id.as_str(),
            f.peer.as_str(),
            f.code.as_str()
        ),
        ("nul", "bob", "invalid_body")
    );
    let nul = message("alice", "bob", "nul", "");
    assert_eq!(f.message_id, nul.message_id);
    let mut carols = [
        next_failed(&mut carol).await?,
        next_failed(&mut carol).await?,
    ];
    carols.sort_by(|a, b| a.client_message_id.cmp(&b.client_message_id));
    let got: Vec<(&str, &str, &str)> = carols
        .iter()
        .map(|f| {
            (
                f.client_message_id.as_str(),
                f.peer.as_str(),
                f.code.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("c2", "dave", "store_refused"),
            ("huge", "dave", "body_too_large")
        ]
    );
    let f = &carols[0];
    // The sender's reason names the rule, without quoting the row.
    assert!(
        f.reason.contains("23514") && !f.reason.contains("refuse me"),
        "{}",
        f.reason
    );
    let shards = Shards::connect(&ShardConfig::from_list(&env.shard_dsns.join(","), 1)?)?;
    let synced = shards.failures_since(&user("alice"), 0, 100).await?;
    assert_eq!(synced.len(), 1, "{synced:?}");
    assert_eq!(
        (
            synced[0].client_message_id.as_str(),
            synced[0].code.as_str()
        ),
        ("nul", "invalid_body")
    );
    assert_eq!(
        shards.failures_since(&user("carol"), 0, 100).await?.len(),
        2
    );
    assert!(shards
        .failures_since(&user("alice"), synced[0].failed_at_ms, 100)
        .await?
        .is_empty());
    // NUL never reached a row; the refused body neither.
    for i in 0..2 {
        let n: i64 = env
            .shard(i)
            .await?
            .query_one(
                "SELECT count(*) FROM messages WHERE client_message_id IN ('nul', 'c2', 'huge')",
                &[],
            )
            .await?
            .get(0);
        assert_eq!(n, 0);
    }

    // Nothing is stuck: the group's offsets reach the end of every partition.
    let group = format!("{}multiplexer", env.topics.prefix());
    eventually("consumer group caught up", || async {
        Ok(env
            .group_caught_up(&group, &env.topics.inbound())
            .await?
            .then_some(()))
    })
    .await?;
    // A replay of the log interprets it as the live pipeline did: it stores nothing new, skips
    // the invalid records and the one the store refuses, and does not stop at it.
    let snapshot = env.snapshot().await?;
    let summary = db_writer::replay::replay(
        &shards,
        &env.kafka,
        &db_writer::replay::ReplayOptions {
            topic: env.topics.inbound(),
            group: format!("{}replay", env.topics.prefix()),
            start: db_writer::replay::Start::Beginning,
            retention: db_writer::Retention::Keep,
            max_batch: 100,
        },
        &mut |_, _| {},
    )
    .await?;
    assert_eq!(
        (
            summary.records_read,
            summary.rows_written,
            summary.rows_present,
            summary.invalid,
            summary.refused
        ),
        (13, 0, 7, 5, 1),
        "{summary:?}"
    );
    assert_eq!(env.snapshot().await?, snapshot);

    // And the dead letters are counted by code.
    let metrics = Rest::new(&http_url(mux.addr))
        .request("GET", "/metrics", None, None)
        .await?;
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    for code in [
        "undecodable",
        "invalid_body",
        "body_too_large",
        "bad_message",
        "bad_ack",
        "store_refused",
    ] {
        let line = format!("multiplexer_dead_letters_total{{code=\"{code}\"}} 1");
        assert!(text.contains(&line), "missing {line}");
    }
    assert!(text.contains("multiplexer_dead_letters_total{code=\"empty\"} 0"));

    alice.close();
    carol.close();
    mux.stop().await;
    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_message_id_is_scoped_to_its_recipient() -> anyhow::Result<()> {
    let env = TestEnv::new(2, &["gw1"]).await?;
    let gw = env.start_gateway("gw1").await?;
    let mux = env.start_multiplexer().await?;
    // B and C share a shard with the sender's conversations; D is on the other one.
    let locator = Locator::new(2);
    let shard = |peer: &str| {
        let key = ConversationKey::of(&user("sender"), &user(peer)).expect("distinct");
        locator.shard_of(&key)
    };
    let names: Vec<String> = (0..100).map(|i| format!("peer{i}")).collect();
    let b = names[0].as_str();
    let c = names[1..]
        .iter()
        .find(|n| shard(n) == shard(b))
        .expect("a peer on B's shard");
    let d = names[1..]
        .iter()
        .find(|n| shard(n) != shard(b))
        .expect("a peer on the other shard");

    let mut sockets = Vec::new();
    for peer in [b, c.as_str(), d.as_str()] {
        sockets.push(connect(&ws_url(gw.addr), &env.token(peer)).await);
    }
    let rest = Rest::new(&http_url(gw.addr));
    let token = env.token("sender");
    let put = |peer: String, body: &'static str| {
        let (rest, token) = (&rest, &token);
        async move {
            let r = rest
                .request(
                    "PUT",
                    &format!("/messages/{peer}"),
                    Some(token),
                    Some(serde_json::json!({"body": body, "clientMessageId": "m1"})),
                )
                .await?;
            anyhow::ensure!(r.status == 202, "PUT to {peer}: {} {}", r.status, r.body);
            Ok::<_, anyhow::Error>(r.body["messageId"].as_str().unwrap_or_default().to_owned())
        }
    };
    let ids = [
        put(b.to_owned(), "to B").await?,
        put(c.clone(), "to C").await?,
        put(d.clone(), "to D").await?,
    ];
    assert!(ids.iter().all(|id| Uuid::parse_str(id).is_ok()), "{ids:?}");
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    // Each is delivered to its recipient under its own id.
    for ((socket, id), body) in sockets.iter_mut().zip(&ids).zip(["to B", "to C", "to D"]) {
        let got = socket.next_message(WAIT).await?;
        assert_eq!(
            (got.message_id.as_str(), got.body.as_str(), got.seq),
            (id.as_str(), body, 1)
        );
    }
    // A retry toward B is B's message: same id, nothing new.
    assert_eq!(put(b.to_owned(), "to B, again").await?, ids[0]);
    let group = format!("{}multiplexer", env.topics.prefix());
    eventually("consumer group caught up", || async {
        Ok(env
            .group_caught_up(&group, &env.topics.inbound())
            .await?
            .then_some(()))
    })
    .await?;
    // Each conversation's history holds its one message.
    for ((peer, id), body) in [b, c.as_str(), d.as_str()]
        .into_iter()
        .zip(&ids)
        .zip(["to B", "to C", "to D"])
    {
        let page = rest
            .request("GET", &format!("/messages/{peer}"), Some(&token), None)
            .await?;
        assert_eq!(page.status, 200, "{}", page.body);
        let got: Vec<(&str, &str)> = page.body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                (
                    m["messageId"].as_str().unwrap_or_default(),
                    m["body"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(got, vec![(id.as_str(), body)], "history with {peer}");
    }
    for s in &sockets {
        s.close();
    }
    mux.stop().await;
    gw.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_deduplicates_a_send_whatever_its_id_scheme() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let shards = Shards::connect(&ShardConfig::from_list(&env.shard_dsns.join(","), 2)?)?;
    let ab = conversation("alice", "bob");

    // One batch: the same send under a first-scheme id, then under a current id.
    let new = message("alice", "bob", "c1", "hello");
    let old = first_scheme(new.clone());
    assert_ne!(old.message_id, new.message_id);
    let out = shards.store_batch(&[domain(&old), domain(&new)]).await?;
    assert_eq!(out.len(), 2);
    assert!(out[0].created && !out[1].created);
    assert_eq!(
        (out[1].message.id.to_string(), out[1].message.seq),
        (old.message_id.clone(), 1),
        "the retry is the stored message"
    );

    // Across batches, the other way round: current id first, first-scheme id later.
    let new2 = message("alice", "bob", "c2", "again");
    let out = shards.store_batch(&[domain(&new2)]).await?;
    assert!(out[0].created);
    let out = shards
        .store_batch(&[domain(&first_scheme(new2.clone()))])
        .await?;
    assert!(!out[0].created);
    assert_eq!(
        (out[0].message.id.to_string(), out[0].message.seq),
        (new2.message_id.clone(), 2)
    );
    // Also when it is not the batch's only message (the lookup path, mixed with a new one).
    let out = shards
        .store_batch(&[
            domain(&first_scheme(new.clone())),
            domain(&message("alice", "bob", "c3", "three")),
        ])
        .await?;
    assert_eq!(
        out.iter()
            .map(|s| (s.created, s.message.seq))
            .collect::<Vec<_>>(),
        vec![(false, 1), (true, 3)]
    );

    // The same client id is another message from the other sender, or toward another recipient.
    let out = shards
        .store_batch(&[
            domain(&message("bob", "alice", "c1", "from bob")),
            domain(&message("alice", "carol", "c1", "to carol")),
        ])
        .await?;
    assert!(out.iter().all(|s| s.created), "{out:?}");
    assert_eq!(
        bodies(&env, &ab).await?,
        vec![
            (1, "hello".to_owned()),
            (2, "again".into()),
            (3, "three".into()),
            (4, "from bob".into())
        ]
    );
    assert_eq!(
        bodies(&env, &conversation("alice", "carol")).await?.len(),
        1
    );

    // What Postgres refuses for the data is told apart from what retrying fixes.
    let e = shards
        .store_batch(&[domain(&message("alice", "bob", "c4", "x\0y"))])
        .await
        .expect_err("Postgres text cannot hold U+0000");
    assert!(e.is_data_error() && !e.is_retryable(), "{e:?}");
    assert_eq!(e.sqlstate(), Some("22021"));
    assert_eq!(bodies(&env, &ab).await?.len(), 4, "nothing stored");
    let down = Shards::connect(&ShardConfig::from_list(
        "postgres://chat@127.0.0.1:1/nothing",
        1,
    )?)?;
    let e = down
        .store_batch(&[domain(&message("alice", "bob", "c5", "x"))])
        .await
        .expect_err("no shard there");
    assert!(e.is_retryable() && !e.is_data_error(), "{e:?}");

    // Failure rows are idempotent and read back for the sender only.
    let failed = db_writer::inbound::failed_message(
        &message("alice", "bob", "c4", "x\0y"),
        "store_refused",
        "reason with a \0 in it",
        1_000,
    )
    .expect("valid ids");
    shards
        .record_failures(std::slice::from_ref(&failed))
        .await?;
    shards
        .record_failures(std::slice::from_ref(&failed))
        .await?;
    let got = shards.failures_since(&user("alice"), 0, 10).await?;
    assert_eq!(got.len(), 1);
    // Read back as written, but for the NUL of the reason (a text column cannot hold it).
    let expected = db_writer::FailedMessage {
        reason: "reason with a \u{fffd} in it".into(),
        ..failed.clone()
    };
    assert_eq!(got[0], expected);
    assert!(shards.failures_since(&user("bob"), 0, 10).await?.is_empty());
    assert!(shards
        .failures_since(&user("alice"), 1_000, 10)
        .await?
        .is_empty());
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_that_is_not_the_data_s_fault_is_retried_and_sets_nothing_aside(
) -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    // The table is missing (SQLSTATE 42P01): a deployment fault, not the records' fault.
    env.shard(0)
        .await?
        .batch_execute("ALTER TABLE messages RENAME TO messages_away")
        .await?;
    let mux = env.start_multiplexer().await?;
    let ab = conversation("alice", "bob");
    let values: Vec<Vec<u8>> = ["one", "two", "three"]
        .iter()
        .enumerate()
        .map(|(i, body)| record(message("alice", "bob", &format!("r{i}"), body)))
        .collect();
    env.produce_all(&env.topics.inbound(), &ab, values).await?;
    let rest = Rest::new(&http_url(mux.addr));
    eventually("the store failing and retried", || async {
        let text = rest.request("GET", "/metrics", None, None).await?.body;
        let text = text.as_str().unwrap_or_default().to_owned();
        Ok(text
            .lines()
            .any(|l| {
                // Registered at 0 from start: counted means above 0.
                l.strip_prefix("multiplexer_errors_total{kind=\"shard\"} ")
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
            })
            .then_some(()))
    })
    .await?;
    env.shard(0)
        .await?
        .batch_execute("ALTER TABLE messages_away RENAME TO messages")
        .await?;
    eventually("stored once the table is back", || async {
        Ok((bodies(&env, &ab).await?.len() == 3).then_some(()))
    })
    .await?;
    assert_eq!(
        bodies(&env, &ab).await?,
        vec![
            (1, "one".to_owned()),
            (2, "two".into()),
            (3, "three".into())
        ]
    );
    assert!(env.read_topic(&env.topics.inbound_dlq()).await?.is_empty());
    mux.stop().await;
    env.teardown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiplexer_does_not_start_without_its_dead_letter_topic() -> anyhow::Result<()> {
    use chat_common::topics::{delete_topics, ensure_topics, TopicNames, TopicSpecs};
    let env = TestEnv::new(1, &["gw1"]).await?;
    // Every topic but inbound-dlq, under a prefix of its own.
    let names = TopicNames::new(format!("{}nodlq-", env.topics.prefix()));
    let specs = TopicSpecs::standard();
    let topics = vec![
        (names.inbound(), specs.inbound.clone()),
        (names.presence(), specs.presence.clone()),
    ];
    ensure_topics(&env.kafka, &topics, None).await?;
    if env.least_privilege() {
        // Its user holds no ACL on these topics yet: the broker will not say whether the
        // topic exists, and the multiplexer says what it does say.
        let error = match env
            .start_multiplexer_with(|c| c.topics = names.clone())
            .await
        {
            Ok(mux) => {
                mux.stop().await;
                anyhow::bail!("started without rights on {}", names.inbound_dlq());
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(
            error.contains("refuses") && error.contains("chatctl acls"),
            "{error}"
        );
        env.allow_topics(&names, &[]).await?;
    }
    let started = env
        .start_multiplexer_with(|c| c.topics = names.clone())
        .await;
    let error = match started {
        Ok(mux) => {
            mux.stop().await;
            anyhow::bail!("started without {}", names.inbound_dlq());
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains(&names.inbound_dlq()) && error.contains("does not exist"),
        "{error}"
    );
    let all: Vec<String> = topics.into_iter().map(|(n, _)| n).collect();
    delete_topics(&env.kafka, &all).await?;
    env.teardown().await
}
