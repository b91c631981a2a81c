//! The consume -> store -> route loop.
//!
//! One batch at a time: read up to `max_batch` records from `inbound`, store their messages in
//! the shards (one transaction per shard), apply their acks, produce each stored message to the
//! recipient's gateway topic and each receipt to the sender's, wait for every delivery report,
//! and only then store the batch's offsets. A crash anywhere before that point replays the batch,
//! and every step is idempotent, so the replay changes nothing but re-sends pushes that clients
//! drop by message id.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use chat_proto::v1::{
    outbound_record, AckRecord, ChatMessage, OutboundBatch, OutboundItem, OutboundRecord, Stored,
};
use db_writer::inbound::{self, Inbound};
use db_writer::{DbError, Shards};
use futures_util::future::join_all;
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use chat_common::presence::PresenceView;

/// Largest value of one outbound batch record (the topics accept 1 MiB); a larger batch is split.
const MAX_BATCH_RECORD_BYTES: usize = 256 * 1024;

/// How long to wait for the presence view to catch up before routing with what it has.
const PRESENCE_CATCH_UP: Duration = Duration::from_secs(2);

/// The state the loop works with.
pub struct Pipeline {
    pub(crate) config: Config,
    pub(crate) consumer: std::sync::Arc<StreamConsumer>,
    pub(crate) producer: FutureProducer,
    pub(crate) shards: Shards,
    pub(crate) presence: PresenceView,
}

/// One decoded batch.
#[derive(Default)]
struct Batch {
    messages: Vec<ChatMessage>,
    acks: Vec<AckRecord>,
    /// Highest offset per (topic, partition), stored once the batch is done.
    offsets: BTreeMap<(String, i32), i64>,
}

impl Pipeline {
    /// Runs until `shutdown`; the batch in flight is finished (or abandoned, to be replayed by
    /// the next owner of its partitions) and stored offsets are committed before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        while let Some(records) = self.next_records(&shutdown).await {
            let batch = decode(records);
            let started = Instant::now();
            if !self.handle(&batch, &shutdown).await {
                break;
            }
            for ((topic, partition), offset) in &batch.offsets {
                // Fails only if the partition was revoked meanwhile; its new owner replays it.
                if let Err(e) = self.consumer.store_offset(topic, *partition, *offset) {
                    tracing::debug!(error = %e, topic, partition, "offset not stored");
                }
            }
            metrics::histogram!("multiplexer_batch_seconds").record(started.elapsed());
            metrics::histogram!("multiplexer_batch_size")
                .record((batch.messages.len() + batch.acks.len()) as f64);
        }
        if let Err(e) = self
            .consumer
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        {
            tracing::debug!(error = %e, "final commit (nothing to commit?)");
        }
        tracing::info!("multiplexer loop stopped");
    }

    /// Waits for the first record, then gathers more for up to `batch_wait`.
    async fn next_records(&self, shutdown: &CancellationToken) -> Option<Vec<OwnedMessage>> {
        let mut records = Vec::new();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return None,
                m = self.consumer.recv() => m,
            };
            match first {
                Ok(m) => {
                    records.push(m.detach());
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consume failed");
                    metrics::counter!("multiplexer_errors_total", "kind" => "consume").increment(1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.batch_wait;
        while records.len() < self.config.max_batch {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => records.push(m.detach()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consume failed");
                    break;
                }
                Err(_) => break,
            }
        }
        Some(records)
    }

    /// Stores, acks and routes one batch. False if shutdown interrupted it.
    async fn handle(&self, batch: &Batch, shutdown: &CancellationToken) -> bool {
        let stored = if batch.messages.is_empty() {
            Vec::new()
        } else {
            match retry(shutdown, "store batch", || {
                self.shards.store_batch(&batch.messages)
            })
            .await
            {
                Some(s) => s,
                None => return false,
            }
        };
        let created = stored.iter().filter(|s| s.created).count();
        metrics::counter!("multiplexer_messages_stored_total").increment(created as u64);
        metrics::counter!("multiplexer_messages_duplicate_total")
            .increment((stored.len() - created) as u64);

        let receipts = if batch.acks.is_empty() {
            Vec::new()
        } else {
            match retry(shutdown, "acks", || {
                self.shards.apply_acks(&batch.acks, self.config.retention)
            })
            .await
            {
                Some(r) => r,
                None => return false,
            }
        };

        // Everything this batch changed is committed; make sure the routes we use are at least
        // as new as any session that synced before the commit (see `presence`).
        if !stored.is_empty() || !receipts.is_empty() {
            self.presence.catch_up(PRESENCE_CATCH_UP).await;
        }
        let mut out: Vec<(String, OutboundRecord)> = Vec::new();
        for s in stored.iter().filter(|s| s.created) {
            // Tell the sender where the message landed (its sequence).
            let m = &s.message;
            out.push((
                m.sender.clone(),
                OutboundRecord {
                    kind: Some(outbound_record::Kind::Stored(Stored {
                        client_message_id: m.client_message_id.clone(),
                        message_id: m.message_id.clone(),
                        conversation: m.conversation.clone(),
                        seq: m.seq,
                        peer: m.recipient.clone(),
                    })),
                },
            ));
        }
        for s in stored.into_iter().filter(|s| !s.acked) {
            let to = s.message.recipient.clone();
            out.push((
                to,
                OutboundRecord {
                    kind: Some(outbound_record::Kind::Deliver(s.message)),
                },
            ));
        }
        for (to, r) in receipts {
            out.push((
                to,
                OutboundRecord {
                    kind: Some(outbound_record::Kind::Receipt(r)),
                },
            ));
        }
        self.route(out, shutdown).await
    }

    /// Produces each record to the gateway that holds its user; users without a live session
    /// are skipped (their messages stay pending and reach them by sync). By default the records
    /// for one gateway go out as batch records, keyed by the gateway id so that they stay in one
    /// partition and in order: one Kafka record per gateway per batch instead of one per push.
    async fn route(
        &self,
        records: Vec<(String, OutboundRecord)>,
        shutdown: &CancellationToken,
    ) -> bool {
        // (topic, key, value, pushes it holds)
        let mut todo: Vec<(String, String, Vec<u8>, u64)> = Vec::new();
        // topic -> (gateway id, its pushes in order)
        let mut per_gateway: HashMap<String, (String, Vec<OutboundItem>)> = HashMap::new();
        for (user, rec) in records {
            let Some(gw) = self.presence.route(&user) else {
                metrics::counter!("multiplexer_routed_total", "to" => "offline").increment(1);
                continue;
            };
            let topic = self.config.topics.outbound(&gw);
            if self.config.outbound_batches {
                per_gateway
                    .entry(topic)
                    .or_insert_with(|| (gw.as_str().to_owned(), Vec::new()))
                    .1
                    .push(OutboundItem {
                        user,
                        record: Some(rec),
                    });
            } else {
                todo.push((topic, user, rec.encode_to_vec(), 1));
            }
        }
        for (topic, (key, items)) in per_gateway {
            for batch in split(items) {
                let n = batch.items.len() as u64;
                let value = OutboundRecord {
                    kind: Some(outbound_record::Kind::Batch(batch)),
                }
                .encode_to_vec();
                todo.push((topic.clone(), key.clone(), value, n));
            }
        }
        let mut backoff = Duration::from_millis(50);
        while !todo.is_empty() {
            let results = join_all(todo.iter().map(|(topic, key, payload, _)| {
                self.producer.send(
                    FutureRecord::to(topic).key(key).payload(payload),
                    rdkafka::util::Timeout::Never,
                )
            }))
            .await;
            let mut failed = Vec::new();
            for (item, result) in todo.into_iter().zip(results) {
                match result {
                    Ok(_) => {
                        metrics::counter!("multiplexer_routed_total", "to" => "gateway")
                            .increment(item.3);
                        metrics::counter!("multiplexer_outbound_records_total").increment(1);
                    }
                    Err((e, _)) => {
                        tracing::warn!(error = %e, topic = %item.0, "outbound produce failed; retrying");
                        metrics::counter!("multiplexer_errors_total", "kind" => "produce")
                            .increment(1);
                        failed.push(item);
                    }
                }
            }
            todo = failed;
            if !todo.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        true
    }
}

/// Splits a gateway's pushes, in order, into batches of at most `MAX_BATCH_RECORD_BYTES` each
/// (a single larger push gets a batch of its own).
fn split(items: Vec<OutboundItem>) -> Vec<OutboundBatch> {
    let mut batches = Vec::new();
    let mut current = OutboundBatch::default();
    let mut bytes = 0;
    for item in items {
        let size = item.encoded_len() + 8; // with the field's tag and length
        if bytes + size > MAX_BATCH_RECORD_BYTES && !current.items.is_empty() {
            batches.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.items.push(item);
        bytes += size;
    }
    if !current.items.is_empty() {
        batches.push(current);
    }
    batches
}

fn decode(records: Vec<OwnedMessage>) -> Batch {
    let mut batch = Batch::default();
    for m in records {
        let key = (m.topic().to_owned(), m.partition());
        let offset = batch.offsets.entry(key).or_insert(m.offset());
        *offset = (*offset).max(m.offset());
        match inbound::decode(m.payload()) {
            Ok(Inbound::Message(msg)) => batch.messages.push(msg),
            Ok(Inbound::Ack(ack)) => batch.acks.push(ack),
            Err(e) => {
                tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "invalid record; skipped");
                metrics::counter!("multiplexer_errors_total", "kind" => "invalid_record")
                    .increment(1);
            }
        }
    }
    batch
}

/// Runs `op` until it succeeds, backing off on retryable errors. A non-retryable error is logged
/// and retried more slowly too: skipping would lose data, so an operator must see the metric.
/// Returns `None` only when shutdown interrupts.
async fn retry<T, F, Fut>(shutdown: &CancellationToken, what: &str, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                let retryable = e.is_retryable();
                tracing::warn!(error = %e, retryable, "{what} failed; retrying");
                metrics::counter!("multiplexer_errors_total", "kind" => "shard").increment(1);
                if !retryable {
                    backoff = Duration::from_secs(5);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Publishes `multiplexer_consumer_lag{partition}` (high watermark minus position) for the
/// partitions this instance owns, every `every`, until `shutdown`.
pub async fn report_lag(
    consumer: std::sync::Arc<StreamConsumer>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = consumer.clone();
        let lags = tokio::task::spawn_blocking(move || {
            let Ok(positions) = c.position() else {
                return Vec::new();
            };
            positions
                .elements()
                .iter()
                .filter_map(|e| {
                    let (_, high) = c
                        .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
                        .ok()?;
                    let at = match e.offset() {
                        rdkafka::Offset::Offset(o) => o,
                        _ => return None, // nothing consumed yet on this partition
                    };
                    Some((e.partition(), (high - at).max(0)))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (partition, lag) in lags {
            metrics::gauge!("multiplexer_consumer_lag", "partition" => partition.to_string())
                .set(lag as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(user: &str, body_bytes: usize) -> OutboundItem {
        OutboundItem {
            user: user.into(),
            record: Some(OutboundRecord {
                kind: Some(outbound_record::Kind::Deliver(ChatMessage {
                    recipient: user.into(),
                    body: "x".repeat(body_bytes),
                    ..Default::default()
                })),
            }),
        }
    }

    #[test]
    fn split_keeps_order_and_bounds_each_batch() {
        assert!(split(Vec::new()).is_empty());
        // 10 pushes of 100 KiB: two per batch, in order; one larger than the bound goes alone.
        let mut items: Vec<OutboundItem> = (0..10)
            .map(|i| item(&format!("u{i}"), 100 * 1024))
            .collect();
        items.push(item("big", 300 * 1024));
        items.push(item("small", 10));
        let batches = split(items);
        let users: Vec<Vec<&str>> = batches
            .iter()
            .map(|b| b.items.iter().map(|i| i.user.as_str()).collect())
            .collect();
        assert_eq!(users.len(), 7);
        assert_eq!(users[0], ["u0", "u1"]);
        assert_eq!(users[4], ["u8", "u9"]);
        assert_eq!(users[5], ["big"]);
        assert_eq!(users[6], ["small"]);
    }
}
