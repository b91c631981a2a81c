//! The multiplexer's view of `presence`: `catch_up` returns only once every record that was in
//! the log when it was called has been applied (routing after a commit depends on it).

use std::time::Duration;

use chat_common::presence::PresenceView;
use chat_common::producer::Producer;
use chat_e2e::TestEnv;
use chat_proto::v1::PresenceRecord;
use futures_util::future::join_all;
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

const USERS: usize = 600;

/// Writes one presence record per user (keyed by the user), all at once.
async fn publish(
    producer: &Producer,
    topic: &str,
    users: &[String],
    gateway: &str,
    epoch: u64,
    online: bool,
) -> anyhow::Result<()> {
    let values: Vec<Vec<u8>> = users
        .iter()
        .map(|user| {
            PresenceRecord {
                user: user.clone(),
                gateway_id: gateway.to_owned(),
                epoch,
                online,
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let sends = users.iter().zip(&values).map(|(user, value)| {
        producer.send(
            FutureRecord::to(topic).key(user).payload(value),
            Duration::from_secs(10),
        )
    });
    for r in join_all(sends).await {
        r.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_waits_for_every_record_already_in_the_log() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let topic = env.topics.presence();
    let shutdown = CancellationToken::new();
    let view = PresenceView::start(&env.kafka, &topic, None, shutdown.clone()).await?;
    let producer = env.kafka.producer()?;
    let gateway = env.gateway_ids[0].as_str();
    let users: Vec<String> = (0..USERS).map(|i| format!("user{i}")).collect();
    // Each round moves every user (spread over all partitions) online or offline with a newer
    // epoch; right after the writes, catch_up must leave the view showing exactly that.
    for (round, online) in [true, false, true].into_iter().enumerate() {
        publish(&producer, &topic, &users, gateway, round as u64 + 1, online).await?;
        assert!(
            view.catch_up(Duration::from_secs(20)).await,
            "round {round}"
        );
        let routed = users.iter().filter(|u| view.route(u).is_some()).count();
        assert_eq!(
            routed,
            if online { USERS } else { 0 },
            "round {round}: every record was applied"
        );
    }
    // With its reader stopped, the view cannot reach records written since: catch_up must say so
    // (an end-offset query that came back short or stale would report success).
    shutdown.cancel();
    let late: Vec<String> = (0..50).map(|i| format!("late{i}")).collect();
    publish(&producer, &topic, &late, gateway, 1, true).await?;
    assert!(!view.catch_up(Duration::from_millis(500)).await);
    env.teardown().await
}

/// The presence log names a gateway whose outbound topic does not exist (deleted with the
/// gateway, or not created yet): the multiplexer stores the message, leaves the push to sync,
/// and goes on. Retrying such a produce forever would stop every conversation behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_to_a_gateway_without_a_topic_does_not_stop_the_pipeline() -> anyhow::Result<()> {
    let env = TestEnv::new(1, &["gw1"]).await?;
    let mux = env
        .start_multiplexer_with(|c| {
            // librdkafka gives up on a topic missing from the metadata after this long.
            c.kafka
                .producer_opts
                .push(("topic.metadata.propagation.max.ms".into(), "500".into()));
        })
        .await?;
    let gw = env.start_gateway("gw1").await?;
    let producer = env.kafka.producer()?;
    publish(
        &producer,
        &env.topics.presence(),
        &["alice".into()],
        "ghost",
        1,
        true,
    )
    .await?;

    let bob = chat_e2e::connect(&chat_e2e::ws_url(gw.addr), &env.token("bob")).await;
    let mut carol = chat_e2e::connect(&chat_e2e::ws_url(gw.addr), &env.token("carol")).await;
    bob.send("alice", "to a gateway without a topic").await?;
    bob.send("carol", "behind it").await?;
    let got = carol.next_message(chat_e2e::WAIT).await?;
    assert_eq!(got.body, "behind it");
    assert_eq!(
        env.stored("alice:bob").await?.len(),
        1,
        "stored all the same"
    );

    // Counted once the batch is done, which may be just after carol has the push.
    let rest = chat_client::Rest::new(&chat_e2e::http_url(mux.addr));
    let deadline = tokio::time::Instant::now() + chat_e2e::WAIT;
    loop {
        let text = rest.request("GET", "/metrics", None, None).await?;
        let text = text.body.as_str().unwrap_or_default().to_owned();
        let routed: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("multiplexer_routed_total{"))
            .collect();
        if routed.contains(&"multiplexer_routed_total{to=\"no_topic\"} 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{routed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // alice turns up on a real gateway: the sync brings what the push could not.
    let mut alice =
        chat_client::Client::connect(&chat_e2e::ws_url(gw.addr), &env.token("alice")).await?;
    let synced = alice.until_sync_done(chat_e2e::WAIT).await?;
    let bodies: Vec<&str> = synced.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["to a gateway without a topic"]);

    alice.close();
    bob.close();
    carol.close();
    gw.stop().await;
    mux.stop().await;
    env.teardown().await
}
