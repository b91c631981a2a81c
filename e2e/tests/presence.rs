//! The multiplexer's view of `presence`: `catch_up` returns only once every record that was in
//! the log when it was called has been applied (routing after a commit depends on it).

use std::time::Duration;

use chat_common::presence::PresenceView;
use chat_e2e::TestEnv;
use chat_proto::v1::PresenceRecord;
use futures_util::future::join_all;
use prost::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

const USERS: usize = 600;

/// Writes one presence record per user (keyed by the user), all at once.
async fn publish(
    producer: &FutureProducer,
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
