//! `chatctl topics delete`: removing a gateway's outbound topic without stranding a push.
//!
//! The multiplexer routes a user's messages to `outbound-<gateway>` of the gateway the presence
//! log says holds their session. So the topic may go only when the log says nobody is online
//! there: a gateway stopped gracefully has said so for each of its users. One that died
//! without saying so leaves them online in the log; `--clear-presence` writes the offline
//! records it would have written (same session epochs, so a session the user has since opened
//! elsewhere, with a greater epoch, is untouched), then deletes.

use std::time::Duration;

use anyhow::Context;
use chat_common::ids::GatewayId;
use chat_common::kafka::KafkaConfig;
use chat_common::presence::PresenceView;
use chat_common::topics::{delete_topics, TopicNames};
use chat_proto::v1::PresenceRecord;
use futures_util::future::try_join_all;
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Deletes `outbound-<gateway>`; see the module docs for when it is refused.
pub async fn delete_outbound(
    kafka: &KafkaConfig,
    names: &TopicNames,
    gateway: &GatewayId,
    clear_presence: bool,
) -> anyhow::Result<()> {
    let topic = names.outbound(gateway);
    let stop = CancellationToken::new();
    let _stop_reader = stop.clone().drop_guard();
    let view = PresenceView::start(kafka, &names.presence(), None, stop)
        .await
        .with_context(|| format!("reading {} on {}", names.presence(), kafka.brokers))?;
    anyhow::ensure!(
        view.catch_up(TIMEOUT).await,
        "could not read {} to its end within {TIMEOUT:?}",
        names.presence()
    );
    let online = view.online_at(gateway);
    if !online.is_empty() {
        let some: Vec<&str> = online.iter().take(5).map(|(u, _)| u.as_str()).collect();
        anyhow::ensure!(
            clear_presence,
            "{} users are online at {gateway} in the presence log (for example {}): messages \
             to them are routed to {topic}. Stop the gateway first (a graceful stop marks them \
             offline); if it is gone without having done so, --clear-presence marks them \
             offline, then deletes",
            online.len(),
            some.join(", ")
        );
        let producer = kafka.producer()?;
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let records: Vec<(String, Vec<u8>)> = online
            .iter()
            .map(|(user, epoch)| {
                let record = PresenceRecord {
                    user: user.clone(),
                    gateway_id: gateway.to_string(),
                    epoch: *epoch,
                    online: false,
                    at_ms,
                };
                (user.clone(), record.encode_to_vec())
            })
            .collect();
        let presence = names.presence();
        try_join_all(records.iter().map(|(user, value)| {
            producer.send(
                FutureRecord::to(&presence).key(user).payload(value),
                TIMEOUT,
            )
        }))
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("marking users offline in {presence}"))?;
        println!(
            "{presence}: {} users at {gateway} marked offline",
            online.len()
        );
    }
    delete_topics(kafka, std::slice::from_ref(&topic))
        .await
        .with_context(|| format!("deleting {topic}"))?;
    println!("{topic}: deleted (or already absent)");
    Ok(())
}
