//! The project's Kafka producer: rdkafka's `BaseProducer`, each record's delivery report handed
//! to a future as rdkafka's `FutureProducer` does, and a polling thread that spins a tenth as
//! long as `FutureProducer`'s.
//!
//! Why not `FutureProducer`: its thread calls `BaseProducer::poll(100 ms)` in a loop, and in
//! rdkafka 0.39 that `poll` hands librdkafka the time left before its deadline in whole
//! milliseconds, rounded down. So librdkafka waits 99 of every 100 ms, and the last fraction is
//! a loop of polls that do not wait: about 9 ms of CPU a second for each producer, idle or not
//! (performance log, 2026-12-06). The loop happens once a deadline, however long; here a poll's
//! deadline is [`POLL_PERIOD`] (a report still ends it at once, as before), so the thread spins
//! for under a millisecond a second. The thread only serves librdkafka's queue; the brokers'
//! traffic runs on librdkafka's own threads, so the period delays nothing but the thread's exit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage, Timestamp, ToBytes};
use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureRecord, Producer as _, ProducerContext,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::ClientContext;
use tokio::sync::oneshot;

/// The deadline of each of the polling thread's polls. It bounds how late the thread sees that
/// its producer was dropped, and so when the producer's connections close; librdkafka's
/// reports end a poll at once.
pub const POLL_PERIOD: Duration = Duration::from_secs(1);

/// How long a record handed over to a full queue waits before it tries again.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(5);

/// The producer's context: each delivery report goes to the future of its record.
pub struct Reports;

/// What a record carries until its delivery report: the way back to its future, and what to do
/// first when the report comes (a lane's count of its key, in [`crate::kafka::Lanes`]).
pub struct Pending {
    report: oneshot::Sender<OwnedDeliveryResult>,
    first: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Self::DeliveryOpaque) {
        let owned = match result {
            Ok(m) => Ok(Delivery {
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp(),
            }),
            Err((e, m)) => Err((e.clone(), m.detach())),
        };
        let Pending { report, first } = *pending;
        if let Some(first) = first {
            first();
        }
        // Nobody waits for it any more: the sender dropped its future.
        let _ = report.send(owned);
    }
}

/// A producer whose sends return futures of their delivery reports, like rdkafka's
/// `FutureProducer` (the same methods and results), on a polling thread that spins a tenth as
/// long (see the module). Clones share one producer; its thread stops at most [`POLL_PERIOD`] after the
/// last clone is dropped, and the producer is dropped there (queued records are purged, as
/// rdkafka's producers do: flush first).
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    base: Arc<BaseProducer<Reports>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Not joined: the thread ends its current poll first, and a drop never waits for it.
        self.stop.store(true, Ordering::Release);
    }
}

impl Producer {
    /// A producer with `config`, and its polling thread.
    pub fn from_config(config: &ClientConfig) -> KafkaResult<Producer> {
        let base = Arc::new(BaseProducer::from_config_and_context(config, Reports)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopped) = (Arc::clone(&base), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("kafka-producer".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    polled.poll(POLL_PERIOD);
                }
            })
            .map_err(|e| {
                tracing::error!(error = %e, "cannot start a Kafka producer's polling thread");
                KafkaError::ClientCreation(format!("polling thread: {e}"))
            })?;
        Ok(Producer {
            inner: Arc::new(Inner { base, stop }),
        })
    }

    /// Hands `record` to librdkafka without waiting; the future resolves with its delivery
    /// report. A full queue is an error at once (`QueueFull`), with the record given back.
    #[allow(clippy::result_large_err)]
    pub fn send_result<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        self.send_then(record, None)
    }

    /// [`Producer::send_result`], and `first` runs on the polling thread when the record's
    /// report comes, before the report goes to its future; a record refused here never runs it.
    #[allow(clippy::result_large_err)]
    pub(crate) fn send_then<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
        first: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (report, reported) = oneshot::channel();
        let base = BaseRecord {
            topic: record.topic,
            partition: record.partition,
            payload: record.payload,
            key: record.key,
            timestamp: record.timestamp,
            headers: record.headers,
            delivery_opaque: Box::new(Pending { report, first }),
        };
        match self.inner.base.send(base) {
            Ok(()) => Ok(DeliveryFuture { reported }),
            Err((e, r)) => Err((
                e,
                FutureRecord {
                    topic: r.topic,
                    partition: r.partition,
                    payload: r.payload,
                    key: r.key,
                    timestamp: r.timestamp,
                    headers: r.headers,
                },
            )),
        }
    }

    /// Hands `record` over, waiting up to `queue_timeout` for room in a full queue, then waits
    /// for its delivery report. A record that was not delivered comes back in the error.
    #[allow(clippy::result_large_err)]
    pub async fn send<K, P, T>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: T,
    ) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
        T: Into<Timeout>,
    {
        let (topic, partition, payload, key) =
            (record.topic, record.partition, record.payload, record.key);
        match hand_over(record, queue_timeout.into(), |r| self.send_result(r)).await {
            Ok(delivery) => match delivery.await {
                Ok(report) => report,
                // The report's sender went without a word (librdkafka always reports, even a
                // purge): the record is not known to be delivered.
                Err(_) => Err((
                    KafkaError::Canceled,
                    owned(topic, partition, payload, key, None),
                )),
            },
            Err((e, r)) => Err((e, owned(r.topic, r.partition, r.payload, r.key, r.headers))),
        }
    }

    /// Waits up to `timeout` for every queued record to be delivered.
    pub fn flush<T: Into<Timeout>>(&self, timeout: T) -> KafkaResult<()> {
        self.inner.base.flush(timeout)
    }

    /// Records handed over and not yet reported on.
    pub fn in_flight_count(&self) -> i32 {
        self.inner.base.in_flight_count()
    }

    /// The client, for what is not a send (metadata).
    pub fn client(&self) -> &Client<Reports> {
        self.inner.base.client()
    }
}

/// Hands `record` over with `send`, trying again every few milliseconds while the queue is
/// full, for up to `queue_timeout`. Any other refusal is returned at once.
#[allow(clippy::result_large_err)]
pub(crate) async fn hand_over<'a, K, P, F>(
    record: FutureRecord<'a, K, P>,
    queue_timeout: Timeout,
    mut send: F,
) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    F: FnMut(
        FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>,
{
    let deadline = match queue_timeout {
        Timeout::After(d) => Instant::now().checked_add(d),
        Timeout::Never => None,
    };
    let mut record = record;
    loop {
        match send(record) {
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                if deadline.is_none_or(|d| Instant::now() < d) =>
            {
                record = r;
                tokio::time::sleep(QUEUE_FULL_RETRY).await;
            }
            other => return other,
        }
    }
}

/// A record that was not delivered, as a message of its own.
fn owned<K, P>(
    topic: &str,
    partition: Option<i32>,
    payload: Option<&P>,
    key: Option<&K>,
    headers: Option<OwnedHeaders>,
) -> OwnedMessage
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    OwnedMessage::new(
        payload.map(|p| p.to_bytes().to_vec()),
        key.map(|k| k.to_bytes().to_vec()),
        topic.to_owned(),
        Timestamp::NotAvailable,
        partition.unwrap_or(-1),
        0,
        headers,
    )
}

/// The delivery report of a record handed to a [`Producer`]: `Err` only if the producer was
/// gone before it could report.
#[derive(Debug)]
pub struct DeliveryFuture {
    reported: oneshot::Receiver<OwnedDeliveryResult>,
}

impl Future for DeliveryFuture {
    type Output = Result<OwnedDeliveryResult, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.reported).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    const TOPIC: &str = "t";

    fn producer(cluster_servers: &str, extra: &[(&str, &str)]) -> Producer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", cluster_servers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "0");
        for (k, v) in extra {
            c.set(*k, *v);
        }
        Producer::from_config(&c).expect("producer")
    }

    /// Records handed over without waiting come back each to its own future, delivered, in the
    /// order they were handed over within a partition.
    #[tokio::test]
    async fn reports_come_back_to_their_futures_in_order() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(TOPIC, 3, 1).expect("topic");
        let p = producer(&cluster.bootstrap_servers(), &[]);
        let keys = ["a", "b", "c", "d"];
        let payloads: Vec<String> = (0..400).map(|i| format!("record {i}")).collect();
        let mut futures = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            let record = FutureRecord::to(TOPIC)
                .key(keys[i % keys.len()])
                .payload(payload.as_str());
            futures.push(p.send_result(record).map_err(|(e, _)| e).expect("queued"));
        }
        let mut last: std::collections::HashMap<&str, (i32, i64)> = Default::default();
        for (i, f) in futures.into_iter().enumerate() {
            let d = f.await.expect("reported").expect("delivered");
            let key = keys[i % keys.len()];
            if let Some((partition, offset)) = last.insert(key, (d.partition, d.offset)) {
                assert_eq!(partition, d.partition, "key {key} changed partition");
                assert!(
                    d.offset > offset,
                    "key {key}: offset {} after {offset}",
                    d.offset
                );
            }
        }
        // The awaited `send` reports the same way.
        let d = p
            .send(
                FutureRecord::to(TOPIC).key("a").payload("last"),
                Timeout::Never,
            )
            .await
            .expect("delivered");
        assert!(d.offset > last["a"].1);
    }

    /// A full queue: `send_result` refuses at once and gives the record back; `send` waits for
    /// room up to its bound, then refuses with the record's bytes.
    #[tokio::test]
    async fn a_full_queue_is_waited_out_or_refused_with_the_record() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(TOPIC, 1, 1).expect("topic");
        let p = producer(
            &cluster.bootstrap_servers(),
            &[("queue.buffering.max.messages", "1")],
        );
        // The broker refuses every connection, so the first record stays queued.
        cluster.broker_down(1).expect("down");
        let first = p
            .send_result(FutureRecord::to(TOPIC).key("k").payload("first"))
            .map_err(|(e, _)| e)
            .expect("queued");
        let full = FutureRecord::<str, str>::to(TOPIC)
            .key("k")
            .payload("second");
        let (e, back) = p.send_result(full).expect_err("the queue is full");
        assert_eq!(
            e,
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        );
        assert_eq!(back.payload, Some("second"));
        let (e, m) = p
            .send(back, Duration::ZERO)
            .await
            .expect_err("no room, no wait");
        assert_eq!(
            e,
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        );
        assert_eq!(m.payload(), Some(&b"second"[..]));
        assert_eq!(m.key(), Some(&b"k"[..]));

        let waiting = {
            let p = p.clone();
            tokio::spawn(async move {
                p.send(
                    FutureRecord::to(TOPIC).key("k").payload("second"),
                    Duration::from_secs(60),
                )
                .await
                .map(|d| d.offset)
                .map_err(|(e, _)| e)
            })
        };
        cluster.broker_up(1).expect("up");
        let first = first.await.expect("reported").expect("delivered");
        let second = waiting.await.expect("task").expect("delivered");
        assert!(second > first.offset);
    }

    /// A record the brokers cannot take comes back in the error, bytes and all.
    #[tokio::test]
    async fn an_undelivered_record_comes_back() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic(TOPIC, 3, 1).expect("topic");
        let p = producer(&cluster.bootstrap_servers(), &[]);
        let (e, m) = p
            .send(
                FutureRecord::to(TOPIC)
                    .partition(99)
                    .key("k")
                    .payload("lost?"),
                Duration::from_secs(5),
            )
            .await
            .expect_err("no partition 99");
        assert!(
            matches!(
                e,
                KafkaError::MessageProduction(RDKafkaErrorCode::UnknownPartition)
            ),
            "{e}"
        );
        assert_eq!(m.payload(), Some(&b"lost?"[..]));
        assert_eq!(m.key(), Some(&b"k"[..]));
        assert_eq!(m.topic(), TOPIC);
    }
}
