//! Kafka client factories: every producer and consumer in the project is built here, so the
//! durability settings (`acks=all`, idempotence, manual offset storage) are set in one place.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use thiserror::Error;

use crate::config::ConfigError;

/// Errors at the Kafka boundary.
#[derive(Debug, Error)]
pub enum KafkaError {
    #[error("kafka client: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("creating topic {name}: {code}")]
    CreateTopic {
        name: String,
        code: RDKafkaErrorCode,
    },
    #[error("brokers {brokers} unreachable: {source}")]
    Unreachable {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
}

/// How long the broker holds a consumer's fetch while it has nothing new. A fetch still returns
/// as soon as one record arrives (`fetch.min.bytes` stays 1), so this does not delay delivery; it
/// sets what an idle consumer costs: one fetch per wait. At 10 ms the pipeline's few consumers
/// (the multiplexer's and each gateway's, and their presence readers) kept the broker busy with
/// hundreds of empty fetches a second whatever the load. The price: librdkafka keeps one fetch in
/// flight per broker, so a partition newly assigned to an idle consumer (a rebalance) is first
/// fetched once the fetch in flight returns, up to this long later.
pub const FETCH_WAIT_MAX_MS: &str = "500";

/// Where the brokers are and how long a produce may take before it is reported as failed.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, comma separated host:port.
    pub brokers: String,
    /// Upper bound on a produce, retries included (`message.timeout.ms`); past it the sender gets
    /// an error instead of waiting forever.
    pub produce_timeout: Duration,
    /// `linger.ms`: how long the producer waits to fill a batch. 5 ms by default: the gateways'
    /// sends and acks spread over the inbound topic's partitions, and librdkafka sends one produce
    /// request per partition, so at 2 ms most requests carried a single record (`KAFKA_LINGER_MS`
    /// overrides it; the multiplexer uses 0).
    pub linger: Duration,
    /// `max.poll.interval.ms` of group consumers: a member silent for longer (stopped, wedged)
    /// loses its partitions, and its late writes are fenced by idempotency.
    pub max_poll_interval: Duration,
    /// librdkafka properties set on every producer after the defaults (`KAFKA_PRODUCER_OPTS`).
    pub producer_opts: Vec<(String, String)>,
    /// librdkafka properties set on every consumer after the defaults (`KAFKA_CONSUMER_OPTS`).
    pub consumer_opts: Vec<(String, String)>,
}

/// An item of a `key=value,...` list that is not `key=value`.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{0:?} is not key=value")]
pub struct NotKeyValue(pub String);

/// Parses `key=value,key=value` (librdkafka property names), as in `KAFKA_PRODUCER_OPTS`.
pub fn parse_opts(text: &str) -> Result<Vec<(String, String)>, NotKeyValue> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(NotKeyValue(p.to_owned())),
        })
        .collect()
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            produce_timeout: Duration::from_secs(10),
            linger: Duration::from_millis(5),
            max_poll_interval: Duration::from_secs(60),
            producer_opts: Vec::new(),
            consumer_opts: Vec::new(),
        }
    }

    /// Adds the librdkafka properties of `KAFKA_PRODUCER_OPTS` and `KAFKA_CONSUMER_OPTS`
    /// (`key=value,...`, applied over the defaults: batching and fetch tuning without a rebuild)
    /// and the linger of `KAFKA_LINGER_MS`.
    pub fn with_env_opts(mut self) -> Result<Self, ConfigError> {
        for (name, target) in [
            ("KAFKA_PRODUCER_OPTS", &mut self.producer_opts),
            ("KAFKA_CONSUMER_OPTS", &mut self.consumer_opts),
        ] {
            if let Ok(text) = std::env::var(name) {
                *target = parse_opts(&text).map_err(|e| ConfigError::new(name, &text, e))?;
            }
        }
        if let Ok(text) = std::env::var("KAFKA_LINGER_MS") {
            let ms: u64 = text
                .trim()
                .parse()
                .map_err(|e| ConfigError::new("KAFKA_LINGER_MS", &text, e))?;
            self.linger = Duration::from_millis(ms);
        }
        Ok(self)
    }

    /// Settings shared by every client.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("broker.address.family", "v4")
            .set("socket.keepalive.enable", "true");
        c
    }

    /// An idempotent producer with `acks=all`: a record acknowledged by its delivery report is
    /// on every in-sync replica and is never duplicated by the producer's own retries.
    pub fn producer(&self) -> Result<FutureProducer, KafkaError> {
        let mut c = self.client_config();
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("compression.type", "lz4")
            .set(
                "message.timeout.ms",
                self.produce_timeout.as_millis().to_string(),
            )
            .set("queue.buffering.max.messages", "200000");
        for (k, v) in &self.producer_opts {
            c.set(k, v);
        }
        Ok(c.create()?)
    }

    /// A consumer in `group` that stores offsets only when told to (at-least-once).
    pub fn consumer(&self, group: &str) -> Result<StreamConsumer, KafkaError> {
        let mut c = self.client_config();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set(
                "max.poll.interval.ms",
                self.max_poll_interval.as_millis().to_string(),
            )
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
        for (k, v) in &self.consumer_opts {
            c.set(k, v);
        }
        Ok(c.create()?)
    }

    /// A consumer without a group, for reading whole topics with manual assignment (presence).
    pub fn reader(&self) -> Result<StreamConsumer, KafkaError> {
        let mut c = self.client_config();
        c.set("group.id", "unused-manual-assignment")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
        Ok(c.create()?)
    }

    /// Checks that the brokers answer, so a misconfigured process fails at start, not at first use.
    pub fn check_reachable(&self, timeout: Duration) -> Result<(), KafkaError> {
        let consumer = self.reader()?;
        consumer
            .fetch_metadata(None, timeout)
            .map(|_| ())
            .map_err(|source| KafkaError::Unreachable {
                brokers: self.brokers.clone(),
                source,
            })
    }
}

/// Where a reader starts, in every partition of a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Beginning,
    /// This offset in every partition (or the partition's first offset if that is later).
    Offset(i64),
    /// The first record at or after this time, in milliseconds since the Unix epoch.
    Timestamp(i64),
    /// Only records produced from now on.
    End,
}

/// A start point that does not parse.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BadStart {
    #[error("bad offset {0:?}: expected offset:N with N a whole number")]
    Offset(String),
    #[error("bad time {0:?}: expected ms:N with N milliseconds since the Unix epoch")]
    Millis(String),
    #[error("{0:?}: expected beginning, end, offset:N, ms:N or an RFC 3339 time")]
    Unknown(String),
}

/// Parses a start point: `beginning`, `end`, an offset (`offset:123`), milliseconds since the
/// epoch (`ms:1700000000000`), or an RFC 3339 time (`2026-11-28T10:00:00Z`).
pub fn parse_start(s: &str) -> Result<Start, BadStart> {
    match s {
        "beginning" => return Ok(Start::Beginning),
        "end" => return Ok(Start::End),
        _ => {}
    }
    if let Some(o) = s.strip_prefix("offset:") {
        return o
            .parse()
            .map(Start::Offset)
            .map_err(|_| BadStart::Offset(s.to_owned()));
    }
    if let Some(ms) = s.strip_prefix("ms:") {
        return ms
            .parse()
            .map(Start::Timestamp)
            .map_err(|_| BadStart::Millis(s.to_owned()));
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| BadStart::Unknown(s.to_owned()))?;
    Ok(Start::Timestamp(
        (t.unix_timestamp_nanos() / 1_000_000) as i64,
    ))
}

/// The offset to start reading partition `partition` of `topic` at, for `start`, given the
/// partition's watermarks; `None` when there is nothing to read (for a bounded read).
pub fn start_offset(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    start: Start,
    (low, high): (i64, i64),
    timeout: Duration,
) -> Result<i64, KafkaError> {
    Ok(match start {
        Start::Beginning => low,
        Start::End => high,
        Start::Offset(o) => o.clamp(low, high),
        Start::Timestamp(ms) => {
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(ms))?;
            let found = consumer.offsets_for_times(tpl, timeout)?;
            match found.find_partition(topic, partition).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => high,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opts_parse_and_refuse_what_is_not_key_value() {
        assert_eq!(
            parse_opts(" fetch.min.bytes=65536, linger.ms = 5 ,"),
            Ok(vec![
                ("fetch.min.bytes".to_owned(), "65536".to_owned()),
                ("linger.ms".to_owned(), "5".to_owned())
            ])
        );
        assert_eq!(parse_opts(""), Ok(vec![]));
        assert_eq!(
            parse_opts("linger.ms"),
            Err(NotKeyValue("linger.ms".into()))
        );
        assert!(parse_opts("=5").is_err());
    }

    #[test]
    fn start_points_parse() {
        assert_eq!(parse_start("beginning"), Ok(Start::Beginning));
        assert_eq!(parse_start("end"), Ok(Start::End));
        assert_eq!(parse_start("offset:42"), Ok(Start::Offset(42)));
        assert_eq!(
            parse_start("ms:1700000000000"),
            Ok(Start::Timestamp(1_700_000_000_000))
        );
        assert_eq!(
            parse_start("2023-11-14T22:13:20Z"),
            Ok(Start::Timestamp(1_700_000_000_000))
        );
        assert!(parse_start("yesterday").is_err());
        assert!(parse_start("offset:x").is_err());
    }
}
