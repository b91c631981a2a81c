//! Consumes this gateway's `outbound-<id>` topic and pushes each record to the socket of the
//! user it names: a single record (keyed by the user) or a batch (each item names its user). A
//! user not connected here is skipped: the message stays pending in its shard and reaches the
//! user by the sync of their next connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chat_proto::v1::{outbound_record, server_frame, OutboundRecord, ServerFrame};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::app::{App, PushKeyReader};
use crate::sessions::Outgoing;

/// The most records taken at once when more are waiting: in delete-on-ack mode their bodies are
/// opened with one read of keys per shard for them all.
const CHUNK: usize = 256;
/// Chunks whose bodies are being opened at once. In delete-on-ack mode each opening is a round
/// trip to the shards, and one at a time capped a gateway's pushes at a chunk per round trip, so
/// the shards' latency under load set the mode's highest rate. Pushes keep the log's order: a
/// chunk is pushed once every chunk before it is.
const OPENING: usize = 4;

/// An outbound item: the user it is for, and what to push.
type Item = (String, Option<outbound_record::Kind>);

/// Records taken at once, decoded, with the offsets to store once they are pushed.
struct Chunk {
    items: Vec<Item>,
    /// The next offset to consume, per partition of the topic.
    next: BTreeMap<i32, i64>,
    /// The consumer reported an error among these records.
    failed: bool,
    /// When the records were taken.
    taken: Instant,
}

impl Chunk {
    /// An empty chunk, taken now.
    fn taken_now() -> Self {
        Self {
            items: Vec::new(),
            next: BTreeMap::new(),
            failed: false,
            taken: Instant::now(),
        }
    }
}

/// Starts consuming `topic`, the one topic `consumer` is subscribed to, until `shutdown`; the
/// handle ends once it has stopped.
///
/// In keep mode on the process's runtime. In delete-on-ack mode on a thread of its own, with
/// pools of its own to the shards for the pushes' key reads, driven by that thread: on the
/// process's runtime each read's answer, then the chunk it opens, waited for a worker behind
/// every socket's task, and under load a read Postgres ran in well under a millisecond took
/// tens of them to come back (docs/performance-log.md, 2026-12-06). The thread stops on
/// `shutdown`, and also when the handle is dropped unfinished (the process's runtime is going
/// away without a shutdown), so that nothing waits on it.
///
/// The handle's value is true if the relay stopped before `shutdown`, which it does only by a
/// panic: it then cancels `shutdown` itself (see [`stop_if_ended`]).
pub(crate) fn start(
    app: Arc<App>,
    consumer: StreamConsumer,
    topic: String,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<bool>> {
    let relay = spawn_relay(app, consumer, topic, shutdown.clone())?;
    Ok(tokio::spawn(stop_if_ended(relay, shutdown)))
}

/// Waits for `relay`, which runs until `shutdown`. A relay that ends first (a panic) leaves a
/// gateway that accepts sends but pushes nothing, and whose health says nothing of it; so the
/// gateway stops: `shutdown` is cancelled, its sessions close with 1001 and reconnect elsewhere
/// (their sync finds what was not pushed), and the process exits with an error for its
/// supervisor to restart it. True if the relay ended first.
async fn stop_if_ended(relay: tokio::task::JoinHandle<()>, shutdown: CancellationToken) -> bool {
    // A panic's message went to the panic hook already, from the task or from the thread.
    let _ = relay.await;
    if shutdown.is_cancelled() {
        return false;
    }
    tracing::error!(
        "the outbound relay stopped before shutdown: the gateway cannot push, so it stops"
    );
    shutdown.cancel();
    true
}

/// The relay itself: a task on the process's runtime in keep mode, a thread in delete-on-ack
/// mode (see [`start`]); the handle ends once it has stopped.
fn spawn_relay(
    app: Arc<App>,
    consumer: StreamConsumer,
    topic: String,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    if !app.seals() {
        return Ok(tokio::spawn(run(app, None, consumer, topic, shutdown)));
    }
    let keys = Arc::new(
        app.push_key_reader(OPENING)
            .context("the pushes' shard pools")?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("the outbound relay's runtime")?;
    let (mut done, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("outbound".into())
        .spawn(move || {
            runtime.block_on(async move {
                let stop = shutdown.child_token();
                let relay = run(app, Some(keys), consumer, topic, stop.clone());
                tokio::pin!(relay);
                tokio::select! {
                    () = &mut relay => {}
                    () = done.closed() => {
                        stop.cancel();
                        relay.await;
                    }
                }
                let _ = done.send(());
            });
        })
        .context("the outbound relay's thread")?;
    Ok(tokio::spawn(async move {
        // An error here is the thread gone without a word: stopped all the same.
        let _ = stopped.await;
    }))
}

/// Consumes `topic` until `shutdown`; in delete-on-ack mode reads the pushes' keys through
/// `keys` (`None` in keep mode).
async fn run(
    app: Arc<App>,
    keys: Option<Arc<PushKeyReader>>,
    consumer: StreamConsumer,
    topic: String,
    shutdown: CancellationToken,
) {
    relay(
        || async {
            // A record, and those already waiting behind it.
            let mut records = vec![consumer.recv().await];
            while records.len() < CHUNK {
                match consumer.recv().now_or_never() {
                    Some(record) => records.push(record),
                    None => break,
                }
            }
            let mut chunk = decode(&topic, records);
            if app.seals() {
                for (user, kind) in take_receipts(&mut chunk.items) {
                    push(&app, &user, kind);
                }
            }
            chunk
        },
        |chunk| open_chunk(app.clone(), keys.clone(), chunk),
        |chunk| pushed(&app, &consumer, &topic, chunk),
        &shutdown,
    )
    .await;
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
}

/// Takes chunks with `take`, opens up to [`OPENING`] of them at a time with `open`, and gives
/// each to `deliver` once it and every chunk taken before it are opened: in the order taken.
/// Runs until `shutdown`. `take` must be cancel safe: its future is dropped, unfinished, when
/// a chunk finishes opening first.
async fn relay<C, Take, Taken, Open, Opened, Deliver>(
    mut take: Take,
    open: Open,
    mut deliver: Deliver,
    shutdown: &CancellationToken,
) where
    Take: FnMut() -> Taken,
    Taken: std::future::Future<Output = C>,
    Open: Fn(C) -> Opened,
    Opened: std::future::Future<Output = C>,
    Deliver: FnMut(C),
{
    let mut opening = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(chunk) = opening.next(), if !opening.is_empty() => deliver(chunk),
            chunk = take(), if opening.len() < OPENING => opening.push_back(open(chunk)),
        }
    }
}

/// Opens a chunk's sealed bodies (delete-on-ack mode; nothing to do in keep mode).
async fn open_chunk(app: Arc<App>, keys: Option<Arc<PushKeyReader>>, mut chunk: Chunk) -> Chunk {
    if chunk.failed {
        // Never a busy loop on a failing consumer.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open_sealed(&app, keys.as_deref(), &mut chunk.items).await;
    chunk
}

/// Pushes a chunk's items in order, then stores its offsets in `topic`.
fn pushed(app: &App, consumer: &StreamConsumer, topic: &str, chunk: Chunk) {
    for (user, kind) in chunk.items {
        push(app, &user, kind);
    }
    metrics::histogram!("gateway_outbound_open_seconds").record(chunk.taken.elapsed());
    let mut offsets = TopicPartitionList::new();
    for (partition, next) in &chunk.next {
        if let Err(e) = offsets.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::debug!(error = %e, "offset not stored");
        }
    }
    if offsets.count() > 0 {
        if let Err(e) = consumer.store_offsets(&offsets) {
            tracing::debug!(error = %e, "offsets not stored");
        }
    }
}

/// Decodes records as the consumer gave them: a batch's items in order, or a single record's
/// one item (keyed by its user). An undecodable record is counted and skipped, and so is a
/// record of any topic but `topic` (none is subscribed).
fn decode(topic: &str, records: Vec<KafkaResult<BorrowedMessage<'_>>>) -> Chunk {
    let mut chunk = Chunk::taken_now();
    for msg in records {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "outbound consume failed");
                metrics::counter!("gateway_errors_total", "kind" => "consume").increment(1);
                chunk.failed = true;
                continue;
            }
        };
        if msg.topic() != topic {
            tracing::warn!(
                topic = msg.topic(),
                "a record of a topic not subscribed; skipped"
            );
            metrics::counter!("gateway_errors_total", "kind" => "invalid_record").increment(1);
            continue;
        }
        if let Some(produced_ms) = msg.timestamp().to_millis() {
            // The record's timestamp (the multiplexer's clock at produce) to now.
            let waited_ms = chat_common::now_ms().saturating_sub(produced_ms).max(0);
            metrics::histogram!("gateway_outbound_wait_seconds").record(waited_ms as f64 / 1000.0);
        }
        chunk.next.insert(msg.partition(), msg.offset() + 1);
        let key = msg.key().and_then(|k| std::str::from_utf8(k).ok());
        match (msg.payload().map(OutboundRecord::decode), key) {
            (
                Some(Ok(OutboundRecord {
                    kind: Some(outbound_record::Kind::Batch(batch)),
                })),
                _,
            ) => chunk.items.extend(
                batch
                    .items
                    .into_iter()
                    .map(|item| (item.user, item.record.and_then(|r| r.kind))),
            ),
            (Some(Ok(OutboundRecord { kind: Some(kind) })), Some(user)) => {
                chunk.items.push((user.to_owned(), Some(kind)))
            }
            _ => {
                tracing::warn!(
                    partition = msg.partition(),
                    offset = msg.offset(),
                    "undecodable outbound record; skipped"
                );
                metrics::counter!("gateway_errors_total", "kind" => "invalid_record").increment(1);
            }
        }
    }
    chunk
}

/// Takes a chunk's receipts out of it, in order; the rest keeps its order. In delete-on-ack
/// mode they are pushed as soon as the chunk is taken, before its bodies are opened: a receipt
/// carries no body, so it has no key to wait for, and under load the keys' read is the longest
/// step of a push. Only receipts go ahead. A `stored` stays behind the delivers before it (a
/// client may count its own messages' seqs in the cursor it resumes a sync from, and a `stored`
/// ahead of an earlier deliver would skip that deliver), and a `failed` keeps its place beside
/// them. Receipts keep the log's order among themselves: chunks are taken in the log's order,
/// one after another. A receipt pushed before its chunk's offsets are stored may be pushed
/// again after a restart, which a client ignores.
fn take_receipts(items: &mut Vec<Item>) -> Vec<Item> {
    let mut receipts = Vec::new();
    items.retain_mut(|(user, kind)| match kind {
        Some(outbound_record::Kind::Receipt(_)) => {
            receipts.push((std::mem::take(user), kind.take()));
            false
        }
        _ => true,
    });
    receipts
}

/// Delete-on-ack mode: opens the sealed bodies of the delivers for users connected here (one
/// read of keys per shard for the whole chunk), and drops those with nothing left to deliver:
/// acknowledged or expired since (their key is gone), or whose key could not be read (the
/// shard did not answer: the message stays pending for the client's next sync). A deliver for a
/// user not connected here is left sealed: it is skipped anyway.
async fn open_sealed(app: &App, keys: Option<&PushKeyReader>, items: &mut Vec<Item>) {
    // Keep mode has no reader and nothing sealed.
    let Some(keys) = keys else {
        return;
    };
    let mut positions = Vec::new();
    let mut messages = Vec::new();
    for (i, (user, kind)) in items.iter_mut().enumerate() {
        if let Some(outbound_record::Kind::Deliver(m)) = kind {
            if !m.sealed_body.is_empty() && app.holds(user) {
                positions.push(i);
                messages.push(std::mem::take(m));
            }
        }
    }
    if messages.is_empty() {
        return;
    }
    let opened = app.open_pushed(keys, &mut messages).await;
    let gone: std::collections::HashSet<usize> = opened
        .gone
        .iter()
        .chain(&opened.unavailable)
        .map(|&j| positions[j])
        .collect();
    for (m, &i) in messages.into_iter().zip(&positions) {
        items[i].1 = Some(outbound_record::Kind::Deliver(m));
    }
    if !gone.is_empty() {
        metrics::counter!("gateway_outbound_total", "outcome" => "shredded")
            .increment(opened.gone.len() as u64);
        let mut i = 0;
        items.retain(|_| {
            let keep = !gone.contains(&i);
            i += 1;
            keep
        });
    }
}

/// Pushes one record to `user`'s socket, if `user` is connected here. A deliver for anyone but
/// its recipient, or a batch inside a batch, is refused and counted.
fn push(app: &App, user: &str, kind: Option<outbound_record::Kind>) {
    let item = match kind {
        // A body still sealed never reaches a client: its user was not connected when the
        // record's bodies were opened (`open_sealed`), so it is skipped like any such push.
        Some(outbound_record::Kind::Deliver(m)) if !m.sealed_body.is_empty() => {
            metrics::counter!("gateway_outbound_total", "outcome" => "not_connected").increment(1);
            return;
        }
        // A message only ever goes to its own recipient, whatever the key says.
        Some(outbound_record::Kind::Deliver(m)) if m.recipient == user => {
            Some(Outgoing::Live(Box::new(m)))
        }
        Some(outbound_record::Kind::Receipt(r)) => Some(Outgoing::Frame(Box::new(ServerFrame {
            kind: Some(server_frame::Kind::Receipt(r)),
        }))),
        Some(outbound_record::Kind::Stored(s)) => Some(Outgoing::Frame(Box::new(ServerFrame {
            kind: Some(server_frame::Kind::Stored(s)),
        }))),
        Some(outbound_record::Kind::Failed(f)) => Some(Outgoing::Frame(Box::new(ServerFrame {
            kind: Some(server_frame::Kind::Failed(f)),
        }))),
        // A deliver addressed to someone else, a batch inside a batch, or nothing.
        _ => None,
    };
    let Some(item) = item else {
        metrics::counter!("gateway_errors_total", "kind" => "misrouted_record").increment(1);
        return;
    };
    let pushed = app.push_to(user, item);
    let outcome = if pushed { "pushed" } else { "not_connected" };
    metrics::counter!("gateway_outbound_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// A seeded xorshift: the delays of a run, replayed by its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A relay that ends before shutdown, by a panic or otherwise, stops the gateway (shutdown
    /// cancelled, reported as a failure); one that ends on shutdown is not a failure.
    #[tokio::test]
    async fn a_relay_that_ends_before_shutdown_stops_the_gateway() {
        let shutdown = CancellationToken::new();
        let panicked = tokio::spawn(async { panic!("a relay's bug") });
        assert!(stop_if_ended(panicked, shutdown.clone()).await);
        assert!(shutdown.is_cancelled());

        let shutdown = CancellationToken::new();
        // The delete-on-ack thread's handle ends without a panic when the thread is gone.
        assert!(stop_if_ended(tokio::spawn(async {}), shutdown.clone()).await);
        assert!(shutdown.is_cancelled());

        let shutdown = CancellationToken::new();
        let relay = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        });
        let watched = tokio::spawn(stop_if_ended(relay, shutdown.clone()));
        shutdown.cancel();
        assert!(!watched.await.expect("the watch ends"));
    }

    /// Receipts come out of a chunk in the order they were in, and everything else stays, in
    /// its order: a seeded mix of every kind of item, several users.
    #[test]
    fn receipts_are_taken_out_in_order_and_the_rest_keeps_its_order() {
        use chat_proto::v1::{ChatMessage, Failed, Receipt, Stored};
        let seed = std::env::var("RECEIPTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| chat_common::now_ms() as u64 | 1);
        println!("RECEIPTS_SEED={seed}");
        let mut rng = Rng(seed);
        for _ in 0..200 {
            let n = rng.below(40) as usize;
            let mut items: Vec<Item> = Vec::new();
            // Each item's place in the chunk, in a field of its own kind.
            for i in 0..n {
                let user = format!("u{}", rng.below(4));
                let kind = match rng.below(5) {
                    0 => Some(outbound_record::Kind::Deliver(ChatMessage {
                        seq: i as u64,
                        ..Default::default()
                    })),
                    1 => Some(outbound_record::Kind::Stored(Stored {
                        seq: i as u64,
                        ..Default::default()
                    })),
                    2 => Some(outbound_record::Kind::Failed(Failed {
                        client_message_id: i.to_string(),
                        ..Default::default()
                    })),
                    3 => None,
                    _ => Some(outbound_record::Kind::Receipt(Receipt {
                        up_to_seq: i as u64,
                        ..Default::default()
                    })),
                };
                items.push((user, kind));
            }
            let before = items.clone();
            let receipts = take_receipts(&mut items);
            let (want_receipts, want_rest): (Vec<Item>, Vec<Item>) = before
                .into_iter()
                .partition(|(_, k)| matches!(k, Some(outbound_record::Kind::Receipt(_))));
            assert_eq!(receipts, want_receipts, "seed {seed}");
            assert_eq!(items, want_rest, "seed {seed}");
        }
    }

    /// Chunks opened in random times, several at once, are delivered in the order taken, with
    /// never more than `OPENING` opening at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_open_together_and_are_delivered_in_the_order_taken() {
        const N: usize = 300;
        let seed = std::env::var("RELAY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| chat_common::now_ms() as u64 | 1);
        println!("RELAY_SEED={seed}");
        let rng = Mutex::new(Rng(seed));
        let (next, in_flight, most) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let mut delivered = Vec::new();
        let shutdown = CancellationToken::new();
        let delay = || Duration::from_micros(rng.lock().expect("rng").below(3000));
        relay(
            || {
                let (pause, next) = (delay(), &next);
                async move {
                    if next.load(Ordering::SeqCst) == N {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(pause / 4).await;
                    next.fetch_add(1, Ordering::SeqCst)
                }
            },
            |chunk| {
                let pause = delay();
                let (in_flight, most) = (&in_flight, &most);
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(pause).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    chunk
                }
            },
            |chunk| {
                delivered.push(chunk);
                if delivered.len() == N {
                    shutdown.cancel();
                }
            },
            &shutdown,
        )
        .await;
        assert_eq!(delivered, (0..N).collect::<Vec<_>>(), "in the order taken");
        let most = most.load(Ordering::SeqCst);
        assert!(
            most <= OPENING,
            "{most} opened at once, more than {OPENING}"
        );
        assert!(most > 1, "never more than one opening at a time");
    }
}
