//! Kafka client factories: every producer and consumer in the project is built here, so the
//! durability settings (`acks=all`, idempotence, manual offset storage) are set in one place.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{OwnedMessage, ToBytes};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use thiserror::Error;

use clap::parser::ValueSource;

use crate::config::{config_error, try_parse_matches_from, ConfigError, DEFAULT_BROKERS};
use crate::producer::{hand_over, DeliveryFuture, Producer};
use crate::rate::RateSwitch;

/// The next record of a [`KafkaConfig::reader`], passing over the broker's refusals of the
/// reader's nominal group. A reader never joins that group, commits or fetches offsets, so a
/// user with no rights on it (a gateway's, or the data team's, whose groups are their own) reads
/// what its topic ACLs allow all the same; a refusal on the topic itself still comes back as an
/// error. Before, `chatctl tail` run as the data user stopped at its first record with "Group
/// authorization failed".
pub async fn read_next(
    reader: &Reader,
) -> Result<rdkafka::message::BorrowedMessage<'_>, rdkafka::error::KafkaError> {
    loop {
        match reader.recv().await {
            Err(e) if is_group_refusal(&e) => tracing::debug!(error = %e, "reader: group refused"),
            other => return other,
        }
    }
}

/// A consumer that assigns itself partitions and never joins its group: [`KafkaConfig::reader`].
pub type Reader = StreamConsumer<ReaderContext>;

/// The context of a [`Reader`]: rdkafka's default, except that the broker's refusal of the
/// reader's nominal group is no error (see [`read_next`]). librdkafka reports it as a global
/// error too, which rdkafka's default logs as an ERROR line: on a broker with ACLs, every
/// gateway's presence view logged one at start and more now and then.
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if is_group_refusal(&error) {
            tracing::debug!(%error, reason, "reader: group refused (it is never joined)");
        } else {
            tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// True for the broker's refusal of a consumer's group (see [`read_next`]).
pub fn is_group_refusal(e: &rdkafka::error::KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::GroupAuthorizationFailed)
}

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
    /// `linger.ms`: how long the producer waits to fill a batch. 10 ms by default: the gateways'
    /// sends and acks spread over the inbound topic's partitions, and librdkafka sends one produce
    /// request per partition, so at 2 ms most requests carried a single record, and under load
    /// each request the broker answers costs CPU the whole machine shares: at 9,000 msg/s 10 ms
    /// took 10-15% off Kafka's CPU a message against 5 ms, and latency fell with it
    /// (docs/performance-log.md, 2026-12-05). A gateway lingers only above `linger_above`
    /// (`KAFKA_LINGER_MS` overrides it; the multiplexer uses 0).
    pub linger: Duration,
    /// Below this many records a second (`KAFKA_LINGER_ABOVE`), a [`Lanes`] producer sends each
    /// record at once instead of lingering; 0: always linger.
    pub linger_above: u64,
    /// `max.poll.interval.ms` of group consumers: a member silent for longer (stopped, wedged)
    /// loses its partitions, and its late writes are fenced by idempotency.
    pub max_poll_interval: Duration,
    /// librdkafka properties set on every producer after the defaults (`KAFKA_PRODUCER_OPTS`).
    pub producer_opts: Vec<(String, String)>,
    /// librdkafka properties set on every consumer after the defaults (`KAFKA_CONSUMER_OPTS`).
    pub consumer_opts: Vec<(String, String)>,
    /// How every client reaches the brokers: plaintext, or TLS with SCRAM.
    pub security: KafkaSecurity,
}

/// How a client reaches the brokers (`KAFKA_SECURITY_PROTOCOL` and the settings beside it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KafkaSecurity {
    /// No TLS, no authentication: the local stack's default broker only.
    #[default]
    Plaintext,
    /// TLS (the brokers' certificates checked against `ca_file`, or the system's roots), no
    /// authentication.
    Ssl { ca_file: Option<std::path::PathBuf> },
    /// TLS, and SASL with `mechanism` (SCRAM-SHA-512 by default) as `username`.
    SaslSsl {
        ca_file: Option<std::path::PathBuf>,
        mechanism: String,
        username: String,
        password: String,
    },
}

impl KafkaSecurity {
    /// The librdkafka properties that say it.
    fn apply(&self, c: &mut ClientConfig) {
        let ca = |c: &mut ClientConfig, ca_file: &Option<std::path::PathBuf>| {
            // The broker's name is checked against its certificate (librdkafka's default since
            // 2.0, said here so that an override elsewhere cannot turn it off unnoticed).
            c.set("ssl.endpoint.identification.algorithm", "https");
            if let Some(f) = ca_file {
                c.set("ssl.ca.location", f.to_string_lossy());
            }
        };
        match self {
            Self::Plaintext => {
                c.set("security.protocol", "plaintext");
            }
            Self::Ssl { ca_file } => {
                c.set("security.protocol", "ssl");
                ca(c, ca_file);
            }
            Self::SaslSsl {
                ca_file,
                mechanism,
                username,
                password,
            } => {
                c.set("security.protocol", "sasl_ssl")
                    .set("sasl.mechanism", mechanism)
                    .set("sasl.username", username)
                    .set("sasl.password", password);
                ca(c, ca_file);
            }
        }
    }
}

/// The Kafka settings of a service, as flags with environment variables (`--kafka-brokers` /
/// `KAFKA_BROKERS`): flattened into each service's declaration, turned into a [`KafkaConfig`] by
/// [`KafkaConfig::from_args`].
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", default_value = DEFAULT_BROKERS, value_name = "HOST:PORT,...")]
    pub kafka_brokers: String,
    /// Prefix of every topic name (several stacks on one cluster).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "", value_name = "PREFIX")]
    pub topic_prefix: String,
    /// Extra librdkafka properties of every producer, over the defaults (e.g. linger.ms=5).
    #[arg(
        long,
        env = "KAFKA_PRODUCER_OPTS",
        value_name = "KEY=VALUE,...",
        hide_env_values = true
    )]
    pub kafka_producer_opts: Option<Properties>,
    /// Extra librdkafka properties of every consumer, over the defaults (e.g.
    /// fetch.min.bytes=65536).
    #[arg(
        long,
        env = "KAFKA_CONSUMER_OPTS",
        value_name = "KEY=VALUE,...",
        hide_env_values = true
    )]
    pub kafka_consumer_opts: Option<Properties>,
    /// Producer linger.ms: how long the producer waits to fill a batch.
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 10, value_name = "MS")]
    pub kafka_linger_ms: u64,
    /// Records a second above which a gateway's producer lingers; below it each record is sent
    /// at once. 0: always linger.
    #[arg(
        long,
        env = "KAFKA_LINGER_ABOVE",
        default_value_t = 2000,
        value_name = "N"
    )]
    pub kafka_linger_above: u64,
    /// plaintext, ssl, or sasl_ssl (TLS, then SASL with KAFKA_SASL_MECHANISM as
    /// KAFKA_SASL_USERNAME).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", default_value = "plaintext", value_name = "PROTOCOL", value_parser = ["plaintext", "ssl", "sasl_ssl"])]
    pub kafka_security_protocol: String,
    /// PEM file of the CA that signed the brokers' certificates (default: the system's roots).
    #[arg(long, env = "KAFKA_CA_FILE", value_name = "PATH")]
    pub kafka_ca_file: Option<std::path::PathBuf>,
    /// SASL mechanism with sasl_ssl.
    #[arg(
        long,
        env = "KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512",
        value_name = "MECHANISM"
    )]
    pub kafka_sasl_mechanism: String,
    /// This service's Kafka user (required with sasl_ssl).
    #[arg(
        long,
        env = "KAFKA_SASL_USERNAME",
        value_name = "USER",
        required_if_eq("kafka_security_protocol", "sasl_ssl")
    )]
    pub kafka_sasl_username: Option<String>,
    /// Its password (required with sasl_ssl).
    #[arg(
        long,
        env = "KAFKA_SASL_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true,
        required_if_eq("kafka_security_protocol", "sasl_ssl")
    )]
    pub kafka_sasl_password: Option<String>,
}

impl KafkaArgs {
    /// The security settings they declare (clap has already refused sasl_ssl without a user
    /// and a password).
    pub fn security(&self) -> KafkaSecurity {
        let ca_file = self.kafka_ca_file.clone();
        match self.kafka_security_protocol.as_str() {
            "ssl" => KafkaSecurity::Ssl { ca_file },
            "sasl_ssl" => KafkaSecurity::SaslSsl {
                ca_file,
                mechanism: self.kafka_sasl_mechanism.clone(),
                username: self.kafka_sasl_username.clone().unwrap_or_default(),
                password: self.kafka_sasl_password.clone().unwrap_or_default(),
            },
            _ => KafkaSecurity::Plaintext,
        }
    }
}

/// librdkafka properties, `key=value,...` (see [`parse_opts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties(pub Vec<(String, String)>);

impl std::str::FromStr for Properties {
    type Err = NotKeyValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_opts(s).map(Self)
    }
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
            linger: Duration::from_millis(10),
            linger_above: 2000,
            max_poll_interval: Duration::from_secs(60),
            producer_opts: Vec::new(),
            consumer_opts: Vec::new(),
            security: KafkaSecurity::Plaintext,
        }
    }

    /// The configuration `args` declare, over [`KafkaConfig::new`]'s defaults.
    pub fn from_args(args: &KafkaArgs) -> Self {
        Self {
            linger: Duration::from_millis(args.kafka_linger_ms),
            linger_above: args.kafka_linger_above,
            producer_opts: args.kafka_producer_opts.clone().unwrap_or_default().0,
            consumer_opts: args.kafka_consumer_opts.clone().unwrap_or_default().0,
            security: args.security(),
            ..Self::new(&args.kafka_brokers)
        }
    }

    /// Adds the librdkafka properties of `KAFKA_PRODUCER_OPTS` and `KAFKA_CONSUMER_OPTS`
    /// (`key=value,...`, applied over the defaults: batching and fetch tuning without a rebuild)
    /// and the linger of `KAFKA_LINGER_MS` and `KAFKA_LINGER_ABOVE`, for a tool with brokers of
    /// its own. Read through [`KafkaArgs`]; only the variables that are set change `self`.
    pub fn with_env_opts(mut self) -> Result<Self, ConfigError> {
        /// [`KafkaArgs`] alone, from the environment.
        #[derive(clap::Parser)]
        struct FromEnv {
            #[command(flatten)]
            kafka: KafkaArgs,
        }
        let (args, matches) = try_parse_matches_from::<FromEnv, _, _>(["kafka"])
            .map_err(|e| config_error::<FromEnv>(&e))?;
        let args = args.kafka;
        let security = args.security();
        let from_env = |id: &str| matches.value_source(id) == Some(ValueSource::EnvVariable);
        if let Some(opts) = args.kafka_producer_opts {
            self.producer_opts = opts.0;
        }
        if let Some(opts) = args.kafka_consumer_opts {
            self.consumer_opts = opts.0;
        }
        if from_env("kafka_linger_ms") {
            self.linger = Duration::from_millis(args.kafka_linger_ms);
        }
        if from_env("kafka_linger_above") {
            self.linger_above = args.kafka_linger_above;
        }
        if from_env("kafka_security_protocol") {
            self.security = security;
        }
        Ok(self)
    }

    /// Settings shared by every client.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("broker.address.family", "v4")
            .set("socket.keepalive.enable", "true");
        self.security.apply(&mut c);
        c
    }

    /// An idempotent producer with `acks=all`: a record acknowledged by its delivery report is
    /// on every in-sync replica and is never duplicated by the producer's own retries.
    ///
    /// Keyed records go to the partition Java's client picks by default (`murmur2_random`:
    /// murmur2 of the key, sign bit cleared, modulo the partition count), so a JVM or Kafka
    /// Streams producer writing to `inbound` keeps each conversation on the same partition as
    /// the gateways do. See docs/data.md for the migration from librdkafka's default.
    pub fn producer(&self) -> Result<Producer, KafkaError> {
        let mut c = self.client_config();
        c.set("partitioner", "murmur2_random")
            .set("acks", "all")
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
        Ok(Producer::from_config(&c)?)
    }

    /// An idempotent producer like [`KafkaConfig::producer`] in two lanes: one that sends each
    /// record at once and one that lingers, chosen by the rate (see [`Lanes`]).
    pub fn lanes(&self) -> Result<Lanes, KafkaError> {
        let prompt = KafkaConfig {
            linger: Duration::ZERO,
            ..self.clone()
        }
        .producer()?;
        let lingering = self.producer()?;
        Ok(Lanes {
            lanes: [prompt, lingering],
            state: Arc::new(Mutex::new(LaneState {
                switch: RateSwitch::new(self.linger_above, Instant::now()),
                in_flight: Default::default(),
                handed: [0; 2],
            })),
        })
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
    /// Read it with [`read_next`]: librdkafka wants a `group.id` for `assign()` and looks up
    /// that group's coordinator, which a broker with ACLs refuses to a user without rights on
    /// the group; the refusal arrives as a consumption error the reader has no use for.
    pub fn reader(&self) -> Result<Reader, KafkaError> {
        let mut c = self.client_config();
        c.set("group.id", "unused-manual-assignment")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
        Ok(c.create_with_context(ReaderContext)?)
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

/// A producer in two lanes to the same brokers: one with `linger.ms` 0, one with the configured
/// linger. Lingering fills produce requests when records come fast (librdkafka sends one request
/// per partition, and the broker's cost follows requests), but at a low rate a request holds
/// one record whatever the linger, and lingering only adds its time to every record. So records
/// go by the prompt lane while the rate is below `linger_above` records a second (measured over
/// 100 ms; back below half of it to return) and by the lingering lane above (a [`RateSwitch`]).
///
/// Order: records with the same key reach their partition in the order they were handed over,
/// as with one producer. A record whose key still has records in the other lane (handed over
/// and not yet reported on) follows them into that lane; the choice and the handing over
/// happen under one lock, and a lane's count of a key falls when the record's report comes.
/// Every record of the project's that needs an order shares its key with the records it is
/// ordered against (a conversation's messages and acks; a user's presence). Before, the lanes
/// moved only once the lane left had nothing in flight at all, and at a steady rate that never
/// happens: from 100 records a second or so, one record or another is always lingering, so a
/// gateway that went lingering in a burst (a connect storm) kept lingering at 500 msg/s, 10 ms
/// on every send (performance log, 2026-12-06). A key moves to the new lane once all of its
/// records in the old one are reported on: librdkafka sends a partition's lingering records
/// together, so that comes within a linger, unless the key's own records keep arriving closer
/// together than a report takes.
pub struct Lanes {
    /// The prompt lane, then the lingering one.
    lanes: [Producer; 2],
    state: Arc<Mutex<LaneState>>,
}

struct LaneState {
    /// On: the lingering lane.
    switch: RateSwitch,
    /// For each lane, the keys with records in it not yet reported on, and how many.
    in_flight: [HashMap<Vec<u8>, usize>; 2],
    /// Records handed to each lane.
    handed: [u64; 2],
}

impl Lanes {
    /// Hands `record` to its lane without waiting (see [`Producer::send_result`]).
    #[allow(clippy::result_large_err)]
    pub fn send_result<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (rdkafka::error::KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let key = record
            .key
            .map(|k| k.to_bytes().to_vec())
            .unwrap_or_default();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.switch.count(1, Instant::now());
        if s.switch.follow() {
            metrics::counter!("kafka_producer_lane_switches_total").increment(1);
            tracing::debug!(
                lingering = s.switch.is_on(),
                rate = s.switch.rate(),
                "producer lane switched"
            );
        }
        let chosen = usize::from(s.switch.is_on());
        let lane = if s.in_flight[1 - chosen].contains_key(&key) {
            1 - chosen
        } else {
            chosen
        };
        let state = Arc::clone(&self.state);
        let reported = key.clone();
        let first: Box<dyn FnOnce() + Send + Sync> = Box::new(move || {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            if let Entry::Occupied(mut n) = s.in_flight[lane].entry(reported) {
                *n.get_mut() -= 1;
                if *n.get() == 0 {
                    n.remove();
                }
            }
        });
        // Under the lock: the report's count down waits for the count up.
        let sent = self.lanes[lane].send_then(record, Some(first));
        if sent.is_ok() {
            *s.in_flight[lane].entry(key).or_default() += 1;
            s.handed[lane] += 1;
        }
        sent
    }

    /// Records handed to the prompt lane and to the lingering lane since the start.
    pub fn handed(&self) -> [u64; 2] {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).handed
    }

    /// Hands `record` over, waiting up to `queue_timeout` for room in a full queue, then waits
    /// for its delivery report.
    #[allow(clippy::result_large_err)]
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> Result<
        rdkafka::producer::future_producer::Delivery,
        (rdkafka::error::KafkaError, Option<OwnedMessage>),
    >
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let delivery = hand_over(record, queue_timeout.into(), |r| self.send_result(r))
            .await
            .map_err(|(e, _)| (e, None))?;
        match delivery.await {
            Ok(Ok(delivery)) => Ok(delivery),
            Ok(Err((e, m))) => Err((e, Some(m))),
            Err(_) => Err((rdkafka::error::KafkaError::Canceled, None)),
        }
    }

    /// A producer of the lanes, for checks that only need a connection (readiness).
    pub fn producer(&self) -> &Producer {
        &self.lanes[0]
    }

    /// Waits up to `bound` for every queued record of both lanes to be delivered.
    pub fn flush(&self, bound: Duration) {
        for lane in &self.lanes {
            let _ = lane.flush(bound);
        }
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
pub fn start_offset<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
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

    /// The lanes leave the lingering lane as soon as the rate falls, at a steady rate too, and
    /// the records of a key keep their order across the switch. A burst of many keys, a hot key
    /// among them, turns the lingering lane on (a linger of 1 s here, 12 partitions as
    /// `inbound`); then one record every 2.5 ms (400 a second, below half the threshold), every
    /// other one of the hot key and the rest each of a new key. Every record goes where the rule
    /// says: to the other lane than the switch's only while its key has records there. Once the
    /// rate is measured the new keys go by the prompt lane, while the hot key, whose records are
    /// all still lingering, follows them there; and the hot key's records arrive in order.
    /// Before, nothing left the lingering lane until all of it was delivered.
    #[tokio::test]
    async fn lanes_leave_lingering_at_a_steady_rate_and_keep_each_keys_order() {
        use rdkafka::mocking::MockCluster;
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 12, 1).expect("topic");
        let mut config = KafkaConfig::new(cluster.bootstrap_servers());
        config.linger = Duration::from_secs(1);
        config.linger_above = 1_000;
        let lanes = config.lanes().expect("lanes");
        let pause = |d: Duration| std::thread::sleep(d);
        let in_flight = |key: &str| {
            let s = lanes.state.lock().expect("lanes");
            [0, 1].map(|l| s.in_flight[l].contains_key(key.as_bytes()))
        };

        let mut futures = Vec::new();
        let mut hot = Vec::new();
        let mut send = |key: &str, payload: &str| {
            let record = FutureRecord::to("t").key(key).payload(payload);
            let f = lanes.send_result(record).expect("queued");
            if key == "hot" {
                hot.push(f);
            } else {
                futures.push((key.to_owned(), f));
            }
        };
        // The burst: about 2,000 records a second or more, for over 100 ms; the hot key's
        // records only once the lingering lane is on, so that they all linger.
        for i in 0..300 {
            let key = if i % 10 == 0 && lanes.handed()[1] > 0 {
                "hot".to_owned()
            } else {
                format!("b{i}")
            };
            send(&key, "burst");
            if i % 10 == 9 {
                pause(Duration::from_millis(5));
            }
        }
        assert_eq!(
            in_flight("hot"),
            [false, true],
            "the burst went lingering, the hot key with it"
        );

        let (mut followed, mut last) = (0, [0; 2]);
        for i in 0..160 {
            let key = if i % 2 == 0 {
                "hot".to_owned()
            } else {
                format!("s{i}")
            };
            let before = (in_flight(&key), lanes.handed());
            send(&key, "steady");
            let lane = usize::from(lanes.handed()[1] > before.1[1]);
            let on = usize::from(lanes.state.lock().expect("lanes").switch.is_on());
            if lane != on {
                assert!(
                    before.0[lane],
                    "step {i}: to the other lane without a reason"
                );
                followed += 1;
            } else {
                assert!(!before.0[1 - on], "step {i}: left its key's records behind");
            }
            if i >= 120 {
                last[lane] += 1;
            }
            pause(Duration::from_micros(2_500));
        }
        assert!(followed > 0, "the hot key did not follow its records");
        assert_eq!(
            last,
            [20, 20],
            "the last 40: the new keys by the prompt lane, the hot key lingering"
        );
        let mut previous = None;
        for f in hot {
            let d = f.await.expect("reported").expect("delivered");
            if let Some((partition, offset)) = previous {
                assert_eq!(partition, d.partition);
                assert!(d.offset > offset, "the hot key out of order");
            }
            previous = Some((d.partition, d.offset));
        }
        for (key, f) in futures {
            f.await
                .expect("reported")
                .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        }
        let s = lanes.state.lock().expect("lanes");
        assert!(
            s.in_flight.iter().all(|m| m.is_empty()),
            "every count back to nothing"
        );
    }

    #[test]
    fn declared_defaults_are_those_of_new() {
        use clap::{CommandFactory, FromArgMatches};
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            kafka: KafkaArgs,
        }
        // No environment variable in play.
        let cmd = Only::command().mut_args(|a| a.env(clap::builder::Resettable::Reset));
        let matches = cmd.try_get_matches_from(["kafka"]).expect("defaults parse");
        let args = Only::from_arg_matches(&matches)
            .expect("defaults parse")
            .kafka;
        let (declared, new) = (
            KafkaConfig::from_args(&args),
            KafkaConfig::new(DEFAULT_BROKERS),
        );
        assert_eq!(declared.brokers, new.brokers);
        assert_eq!(declared.linger, new.linger);
        assert_eq!(declared.linger_above, new.linger_above);
        assert_eq!(declared.produce_timeout, new.produce_timeout);
        assert_eq!(declared.max_poll_interval, new.max_poll_interval);
        assert!(declared.producer_opts.is_empty() && declared.consumer_opts.is_empty());
        assert_eq!(args.topic_prefix, "");
        let opts: Properties = "a=1, b = 2".parse().expect("key=value");
        assert_eq!(opts.0, [("a".into(), "1".into()), ("b".into(), "2".into())]);
        assert!("a=1,b".parse::<Properties>().is_err());
    }

    #[test]
    fn security_is_declared_and_sasl_needs_a_user_and_a_password() {
        use clap::{CommandFactory, FromArgMatches};
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            kafka: KafkaArgs,
        }
        let parse = |args: &[&str]| {
            let cmd = Only::command().mut_args(|a| a.env(clap::builder::Resettable::Reset));
            cmd.try_get_matches_from(std::iter::once("kafka").chain(args.iter().copied()))
                .map_err(|e| e.to_string())
                .and_then(|m| Only::from_arg_matches(&m).map_err(|e| e.to_string()))
                .map(|o| KafkaConfig::from_args(&o.kafka).security)
        };
        assert_eq!(parse(&[]), Ok(KafkaSecurity::Plaintext));
        let err = parse(&["--kafka-security-protocol", "sasl_ssl"]).expect_err("no user");
        assert!(err.contains("--kafka-sasl-username"), "{err}");
        let err = parse(&[
            "--kafka-security-protocol",
            "sasl_ssl",
            "--kafka-sasl-username",
            "gw1",
        ])
        .expect_err("no password");
        assert!(err.contains("--kafka-sasl-password"), "{err}");
        assert!(parse(&["--kafka-security-protocol", "tls"]).is_err());
        assert_eq!(
            parse(&[
                "--kafka-security-protocol",
                "sasl_ssl",
                "--kafka-sasl-username",
                "gw1",
                "--kafka-sasl-password",
                "pw",
                "--kafka-ca-file",
                "/ca.pem",
            ]),
            Ok(KafkaSecurity::SaslSsl {
                ca_file: Some("/ca.pem".into()),
                mechanism: "SCRAM-SHA-512".into(),
                username: "gw1".into(),
                password: "pw".into(),
            })
        );
        // What librdkafka is told.
        let mut c = ClientConfig::new();
        KafkaSecurity::Ssl { ca_file: None }.apply(&mut c);
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        assert_eq!(
            c.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
    }

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
