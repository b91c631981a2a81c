//! The first message, end to end, against real Kafka and real Postgres.

use chat_client::Rest;
use chat_common::ids::{ConversationKey, UserId};
use chat_e2e::{connect, http_url, ws_url, TestEnv, WAIT};
use chat_proto::v1::{inbound_record, outbound_record, InboundRecord, OutboundRecord};
use db_writer::Locator;
use prost::Message as _;
use rdkafka::message::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_end_to_end() -> anyhow::Result<()> {
    let env = TestEnv::new(4, &["gw1", "gw2"]).await?;
    let gw1 = env.start_gateway("gw1").await?;
    let gw2 = env.start_gateway("gw2").await?;
    let mux = env.start_multiplexer().await?;

    // 1. alice on gateway 1, bob on gateway 2, each with a signed token.
    let mut alice = connect(&ws_url(gw1.addr), &env.token("alice")).await;
    let mut bob = connect(&ws_url(gw2.addr), &env.token("bob")).await;
    assert_eq!(
        (alice.user(), alice.gateway_id()),
        ("alice", "gw1".to_owned())
    );
    assert_eq!((bob.user(), bob.gateway_id()), ("bob", "gw2".to_owned()));

    // 2. alice sends "hi"; "accepted" carries the message id.
    let accepted = alice.send("bob", "hi").await?;
    assert!(uuid::Uuid::parse_str(&accepted.message_id).is_ok());
    assert_eq!(accepted.conversation, "alice:bob");

    // 3. The record is on `inbound` (so Kafka acknowledged it before "accepted"), keyed by the
    //    sorted pair, and decodes with the schema.
    let inbound = env.read_topic(&env.topics.inbound()).await?;
    let rec = inbound
        .iter()
        .find_map(|m| {
            let r = InboundRecord::decode(m.payload()?).ok()?;
            match r.kind? {
                inbound_record::Kind::Message(msg) if msg.message_id == accepted.message_id => {
                    Some((m.key().map(<[u8]>::to_vec), msg))
                }
                _ => None,
            }
        })
        .expect("accepted message is on inbound");
    assert_eq!(rec.0.as_deref(), Some(b"alice:bob".as_slice()));
    assert_eq!(
        (
            rec.1.sender.as_str(),
            rec.1.recipient.as_str(),
            rec.1.body.as_str()
        ),
        ("alice", "bob", "hi")
    );

    // 4. bob's socket receives it, with its sequence number.
    let got = bob.next_message(WAIT).await?;
    assert_eq!(
        (got.message_id.as_str(), got.body.as_str(), got.seq),
        (accepted.message_id.as_str(), "hi", 1)
    );
    assert_eq!(got.sender, "alice");

    // ... stored once, in the shard the locator names, and nowhere else.
    let key = ConversationKey::of(&UserId::parse("alice")?, &UserId::parse("bob")?).expect("pair");
    let home = Locator::new(4).shard_of(&key);
    for i in 0..4 {
        let n: i64 = env
            .shard(i)
            .await?
            .query_one(
                "SELECT count(*) FROM messages WHERE conversation = 'alice:bob'",
                &[],
            )
            .await?
            .get(0);
        assert_eq!(n, if i == home { 1 } else { 0 }, "shard {i} (home {home})");
    }
    // ... and it went through outbound-gw2, in a batch record keyed by the gateway, as an item
    // addressed to the recipient.
    let out = env
        .read_topic(&env.topics.outbound(&env.gateway_ids[1]))
        .await?;
    assert!(out.iter().any(|m| {
        let batch = match m.payload().and_then(|p| OutboundRecord::decode(p).ok()) {
            Some(OutboundRecord {
                kind: Some(outbound_record::Kind::Batch(b)),
            }) => b,
            _ => return false,
        };
        m.key() == Some(env.gateway_ids[1].as_str().as_bytes()) && batch.items.iter().any(|i| {
            i.user == "bob"
                && matches!(
                    i.record.as_ref().and_then(|r| r.kind.as_ref()),
                    Some(outbound_record::Kind::Deliver(d)) if d.message_id == accepted.message_id
                )
        })
    }));

    // 5. bob replies; alice receives it; it lands in the same shard.
    let reply = bob.send("alice", "hello alice").await?;
    let got = alice.next_message(WAIT).await?;
    assert_eq!(
        (got.message_id.as_str(), got.body.as_str(), got.seq),
        (reply.message_id.as_str(), "hello alice", 2)
    );
    let rows = env
        .shard(home)
        .await?
        .query(
            "SELECT seq, sender, body FROM messages WHERE conversation = 'alice:bob' ORDER BY seq",
            &[],
        )
        .await?;
    let rows: Vec<(i64, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, "alice".into(), "hi".into()),
            (2, "bob".into(), "hello alice".into())
        ]
    );

    // GET /messages/bob as alice returns both, in order.
    let rest = Rest::new(&http_url(gw1.addr));
    let page = rest
        .request("GET", "/messages/bob", Some(&env.token("alice")), None)
        .await?;
    assert_eq!(page.status, 200, "{:?}", page.body);
    let bodies: Vec<(&str, &str)> = page.body["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| {
            (
                m["sender"].as_str().unwrap_or(""),
                m["body"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(bodies, vec![("alice", "hi"), ("bob", "hello alice")]);

    alice.close();
    bob.close();
    gw1.stop().await;
    gw2.stop().await;
    mux.stop().await;
    env.teardown().await
}
