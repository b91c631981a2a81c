//! Rebuilding the stores from the `inbound` log.
//!
//! A replay reads `inbound` from a start point (the beginning, an offset, or a time) up to the
//! end of the log as it was when the replay began, and applies every record with the same code the
//! multiplexer uses: idempotent writes by (conversation, sender, client message id), sequences
//! assigned in log order, acks (with erasure in delete-on-ack mode). What the multiplexer set
//! aside (invalid records, messages and acks the store refuses for their data) is skipped and
//! counted, so the replay stores exactly what the live pipeline stored, and writes the user index
//! as the multiplexer does. Into the same shards it changes nothing that is already there; into
//! empty shards, or a new list of shards (resharding from N to M), it rebuilds what the log
//! holds, placing each conversation where the new locator says. It runs in its own consumer group
//! and commits its progress there; pushing to gateways is not part of a replay.

use std::collections::HashMap;
use std::time::Duration;

use chat_common::kafka::KafkaConfig;
use chat_common::message::{Ack, Message};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use crate::error::DbError;
use crate::inbound::{self, Inbound};
use crate::retention::Retention;
use crate::shards::Shards;
use crate::user_index::IndexUpdates;

pub use chat_common::kafka::{parse_start, Start};

/// What to replay and how.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub topic: String,
    /// The replay's own consumer group (it never touches the multiplexers' group).
    pub group: String,
    pub start: Start,
    pub retention: Retention,
    /// Records per batch (one transaction per shard per batch).
    pub max_batch: usize,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub records_read: u64,
    pub messages: u64,
    /// Messages written by this replay.
    pub rows_written: u64,
    /// Messages that were already stored (nothing changed).
    pub rows_present: u64,
    pub acks: u64,
    /// Records skipped as invalid.
    pub invalid: u64,
    /// Messages and acks skipped because the store refuses their data (dead-lettered live).
    pub refused: u64,
    /// User index rows written (each user of each conversation a batch touched, once per batch).
    pub index_rows: u64,
}

/// Why a replay stopped early.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka client: {0}")]
    Client(#[from] chat_common::kafka::KafkaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("topic {0} has no partitions (does it exist?)")]
    NoTopic(String),
    #[error("no record for 30 s while {0} remained to read")]
    Stalled(u64),
}

/// Replays `options.topic` into `shards`; `progress(done, total)` is called after each batch.
pub async fn replay(
    shards: &Shards,
    kafka: &KafkaConfig,
    options: &ReplayOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, ReplayError> {
    let consumer: StreamConsumer = kafka.consumer(&options.group)?;
    let topic = options.topic.as_str();
    let Range {
        mut end,
        assignment,
        total,
    } = range(&consumer, topic, options.start)?;
    let mut summary = Summary::default();
    progress(0, total);
    if end.is_empty() {
        return Ok(summary);
    }
    consumer.assign(&assignment)?;
    while !end.is_empty() {
        let records =
            next_records(&consumer, options.max_batch, total - summary.records_read).await?;
        let mut messages = Vec::new();
        let mut acks = Vec::new();
        let mut last: HashMap<i32, i64> = HashMap::new();
        for m in records {
            let p = m.partition();
            let Some(&stop) = end.get(&p) else { continue };
            if m.offset() >= stop {
                continue;
            }
            summary.records_read += 1;
            last.insert(p, m.offset());
            match inbound::decode(m.payload()) {
                Ok(Inbound::Message(msg)) => messages.push(msg),
                Ok(Inbound::Ack(a)) => acks.push(a),
                Err(_) => summary.invalid += 1,
            }
        }
        let mut index = IndexUpdates::new();
        store(shards, &messages, &mut index, &mut summary).await?;
        ack(shards, &acks, options.retention, &mut index, &mut summary).await?;
        shards.update_index(&index).await?;
        summary.index_rows += index.len() as u64;
        for (p, offset) in last {
            consumer.store_offset(topic, p, offset)?;
            if offset + 1 >= end[&p] {
                end.remove(&p);
            }
        }
        progress(summary.records_read, total);
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    Ok(summary)
}

/// What a replay reads: per partition, the end of the log when it began (records after it are
/// live traffic, not part of the replay), where to start, and how many records that is.
struct Range {
    end: HashMap<i32, i64>,
    assignment: TopicPartitionList,
    total: u64,
}

fn range(consumer: &StreamConsumer, topic: &str, start: Start) -> Result<Range, ReplayError> {
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ReplayError::NoTopic(topic.to_owned()));
    }
    let mut range = Range {
        end: HashMap::new(),
        assignment: TopicPartitionList::new(),
        total: 0,
    };
    for p in partitions {
        let marks = consumer.fetch_watermarks(topic, p, timeout)?;
        let first = chat_common::kafka::start_offset(consumer, topic, p, start, marks, timeout)?;
        if first < marks.1 {
            range
                .assignment
                .add_partition_offset(topic, p, Offset::Offset(first))?;
            range.end.insert(p, marks.1);
            range.total += (marks.1 - first) as u64;
        }
    }
    Ok(range)
}

/// The next batch: the first record (waiting up to 30 s for it while `remaining` are still to
/// read), then whatever else arrives within 5 ms each, up to `max`.
async fn next_records(
    consumer: &StreamConsumer,
    max: usize,
    remaining: u64,
) -> Result<Vec<OwnedMessage>, ReplayError> {
    let first = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .map_err(|_| ReplayError::Stalled(remaining))??;
    let mut batch = vec![first.detach()];
    while batch.len() < max {
        match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
            Ok(m) => batch.push(m?.detach()),
            Err(_) => break,
        }
    }
    Ok(batch)
}

/// Stores a batch's messages as the multiplexer does: everything the store takes, in log
/// order; a message the store refuses for its data is skipped (the multiplexer set it aside).
async fn store(
    shards: &Shards,
    messages: &[Message],
    index: &mut IndexUpdates,
    summary: &mut Summary,
) -> Result<(), ReplayError> {
    if messages.is_empty() {
        return Ok(());
    }
    let stored = match shards.store_batch(messages).await {
        Err(e) if e.is_data_error() => {
            let mut stored = Vec::with_capacity(messages.len());
            for m in messages {
                match shards.store_batch(std::slice::from_ref(m)).await {
                    Ok(s) => stored.extend(s),
                    Err(e) if e.is_data_error() => summary.refused += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            stored
        }
        other => other?,
    };
    index.stored(&stored);
    for s in stored {
        summary.messages += 1;
        if s.created {
            summary.rows_written += 1;
        } else {
            summary.rows_present += 1;
        }
    }
    Ok(())
}

/// Applies a batch's acks, one by one when the store refuses the batch for its data.
async fn ack(
    shards: &Shards,
    acks: &[Ack],
    retention: Retention,
    index: &mut IndexUpdates,
    summary: &mut Summary,
) -> Result<(), ReplayError> {
    if acks.is_empty() {
        return Ok(());
    }
    match shards.apply_acks(acks, retention).await {
        Err(e) if e.is_data_error() => {
            for a in acks {
                match shards.apply_acks(std::slice::from_ref(a), retention).await {
                    Ok(acked) => {
                        summary.acks += 1;
                        acked.watermarks.iter().for_each(|w| index.watermark(w));
                    }
                    Err(e) if e.is_data_error() => summary.refused += 1,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        other => {
            other?.watermarks.iter().for_each(|w| index.watermark(w));
            summary.acks += acks.len() as u64;
        }
    }
    Ok(())
}
