//! The consume -> store -> route loop.
//!
//! A batch goes through two stages. The first reads up to `max_batch` records from `inbound`,
//! stores their messages in the shards (one transaction per shard) while it applies their acks,
//! and sets aside what cannot be processed. The second, at once, moves the users' conversation
//! index (one statement per home shard) and routes the batch with the presence view as it
//! stands: produces each stored message to the recipient's gateway topic and each receipt to
//! the sender's, and waits for every delivery report. Once the index has moved it catches up
//! with presence and routes the batch's records once more to every user whose session changed
//! since (see [`Pipeline::early`] and `db_writer::user_index`); only then are the batch's
//! offsets stored. The stages overlap (while one batch is indexed and routed, the next one is
//! stored), and the second takes batches in log order. With `early_push` off the index is
//! written first and the batch routed once, after it, in a third stage ([`Pipeline::finish`]).
//! A crash anywhere before the offsets are stored replays the batch, and every step is
//! idempotent, so the replay changes nothing but re-sends pushes that clients drop by message id.
//!
//! No record can stop a partition. A record that does not decode, or fails validation, or that
//! the store refuses for its data (`DbError::is_data_error`) is set aside: a `DeadLetter` on
//! `inbound-dlq` (delivery awaited before the offsets are stored), and for a message with valid
//! ids a `Failed` notice to its sender and a row for its next sync. A batch the store refuses is
//! bisected until every message that can be stored is, in log order (so seqs stay dense and in
//! order), and each that cannot is alone.
//!
//! A shard that does not answer stops only its own records: they are held aside with every later
//! record of their conversations (`holding`), the other shards' records pass, and the held ones
//! are tried again, in log order, once a ping says the shard is back. The stored offsets never
//! pass a held record. Other errors retrying can fix (a serialisation failure, a full holding)
//! are retried in place, holding the partition's order, as is anything that is not the data's
//! fault.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chat_common::ids::{ConversationKey, GatewayId, UserId};
use chat_common::message::Ack;
use chat_common::producer::Producer;
use chat_common::rate::RateSwitch;
use chat_proto::v1::{
    outbound_record, DeadLetter, OutboundBatch, OutboundItem, OutboundRecord, Stored,
};
use db_writer::inbound::{self, Inbound};
use db_writer::{Acked, DbError, FailedMessage, IndexUpdates, ReceiptFor, Shards};
use futures_util::future::join_all;
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::holding::{Decoded, Holding};
use chat_common::presence::{PresenceView, Route};

/// Largest value of one outbound batch record (the topics accept 1 MiB); a larger batch is split.
const MAX_BATCH_RECORD_BYTES: usize = 256 * 1024;

/// How long to wait for the presence view to catch up before routing with what it has.
const PRESENCE_CATCH_UP: Duration = Duration::from_secs(2);

/// How often the shards known down are pinged, and how long each ping may take.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_WITHIN: Duration = Duration::from_secs(2);

/// The state the loop works with.
pub struct Pipeline {
    pub(crate) config: Config,
    pub(crate) consumer: std::sync::Arc<StreamConsumer>,
    pub(crate) producer: Producer,
    pub(crate) shards: Shards,
    pub(crate) presence: PresenceView,
    /// Shards down at start: held from the start, migrated (or checked) once they answer.
    pub(crate) unchecked: Vec<usize>,
}

/// Migrates `shard` (with `migrate`) or checks that it has every migration this version needs.
pub(crate) async fn check_schema(
    shards: &Shards,
    shard: usize,
    migrate: bool,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if migrate {
        return shards
            .migrate_shard(shard)
            .await
            .with_context(|| format!("shard {shard}: migrations"));
    }
    let missing = shards
        .missing_migrations_on(shard)
        .await
        .with_context(|| format!("shard {shard}: schema"))?;
    anyhow::ensure!(
        missing.is_empty(),
        "shard {shard} lacks migrations this multiplexer needs: {missing:?}; apply them first \
         (db-writer migrate), or start with MULTIPLEXER_MIGRATE=true"
    );
    Ok(())
}

/// Records how long `m` waited in `inbound`: its timestamp (the producing gateway's clock) to now.
fn record_inbound_wait(m: &impl Message) {
    if let Some(produced_ms) = m.timestamp().to_millis() {
        let waited_ms = chat_common::now_ms().saturating_sub(produced_ms).max(0);
        metrics::histogram!("multiplexer_inbound_wait_seconds").record(waited_ms as f64 / 1000.0);
    }
}

/// The dead-letter code of a record the store refused for its data.
pub const STORE_REFUSED: &str = "store_refused";

/// Every dead-letter code, so that each series of `multiplexer_dead_letters_total` exists from
/// the start (an alert on its increase then sees the first dead letter too).
pub const DEAD_LETTER_CODES: [&str; 7] = [
    "empty",
    "undecodable",
    "bad_message",
    "invalid_body",
    "body_too_large",
    "bad_ack",
    STORE_REFUSED,
];

/// One decoded batch.
#[derive(Default)]
struct Batch {
    /// The records as read, for dead letters (their key, value and position).
    records: Vec<OwnedMessage>,
    /// Valid messages in log order, with the index of their record.
    messages: Vec<chat_common::message::Message>,
    message_records: Vec<usize>,
    /// Valid acks in log order, with the index of their record.
    acks: Vec<Ack>,
    ack_records: Vec<usize>,
    /// Records that failed decoding or validation: (record index, why).
    invalid: Vec<(usize, inbound::InvalidRecord)>,
    /// Highest offset per (topic, partition), stored once the batch is done.
    offsets: BTreeMap<(String, i32), i64>,
}

impl Batch {
    fn from_entries(entries: Vec<Decoded>) -> Batch {
        let mut batch = Batch::default();
        for (index, Decoded { record, item }) in entries.into_iter().enumerate() {
            let key = (record.topic().to_owned(), record.partition());
            let offset = batch.offsets.entry(key).or_insert(record.offset());
            *offset = (*offset).max(record.offset());
            match item {
                Ok(Inbound::Message(msg)) => {
                    batch.messages.push(msg);
                    batch.message_records.push(index);
                }
                Ok(Inbound::Ack(ack)) => {
                    batch.acks.push(ack);
                    batch.ack_records.push(index);
                }
                Err(e) => batch.invalid.push((index, e)),
            }
            batch.records.push(record);
        }
        batch
    }

    /// The records back as they were read, in order (to hold them).
    fn into_entries(self) -> Vec<Decoded> {
        let mut items: Vec<Option<Result<Inbound, inbound::InvalidRecord>>> =
            self.records.iter().map(|_| None).collect();
        for (m, i) in self.messages.into_iter().zip(self.message_records) {
            items[i] = Some(Ok(Inbound::Message(m)));
        }
        for (a, i) in self.acks.into_iter().zip(self.ack_records) {
            items[i] = Some(Ok(Inbound::Ack(a)));
        }
        for (i, e) in self.invalid {
            items[i] = Some(Err(e));
        }
        self.records
            .into_iter()
            .zip(items)
            .map(|(record, item)| Decoded {
                record,
                item: item.unwrap_or(Err(inbound::InvalidRecord::Empty)),
            })
            .collect()
    }
}

/// The holding and what wakes its retries, shared by the stages and the shard watch.
struct Hold {
    state: Mutex<Holding>,
    /// Set when a shard known down answers again (or records are held that wait for none).
    retry: AtomicBool,
    /// Wakes the first stage while it waits for records.
    wake: tokio::sync::Notify,
    /// Batches handed to the second stage and not routed. Held records are tried again only
    /// at 0, once every batch stored before is routed or has held its conversations back: a
    /// retried record must not pass a later record of its conversation.
    in_flight: tokio::sync::watch::Sender<usize>,
}

impl Hold {
    fn lock(&self) -> std::sync::MutexGuard<'_, Holding> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the shard of `e` is down; logs it the first time. False if it was known
    /// down already (the caller then waits before trying again: nothing changed).
    fn mark_down(&self, e: &DbError) -> bool {
        let Some(shard) = e.shard() else {
            return false;
        };
        let new = self.lock().mark_down(shard);
        if new {
            tracing::warn!(shard, error = %describe(e), "shard down: holding its records aside; the other shards' records pass");
            metrics::counter!("multiplexer_errors_total", "kind" => "shard").increment(1);
        }
        new
    }

    /// Whether an error of a shard may be answered by holding its records.
    fn may_hold(&self) -> bool {
        !self.lock().is_full()
    }
}

/// What the first stage waited for.
enum Next {
    Records(Vec<OwnedMessage>),
    /// Held records are due for a retry.
    Woken,
    Stopped,
}

/// What the first stage made of a batch.
enum Handled {
    /// Stored: the second stage takes it.
    Routing(Routing),
    /// A shard it needs is down (now marked): split it again, and try what passes.
    Redo(Batch),
    /// Shutdown interrupted it.
    Stopped,
}

/// A stored batch, as the second and third stages take it.
struct Routing {
    /// What the batch moves in the users' conversation index.
    index: IndexUpdates,
    /// The records to route, in order.
    out: Vec<(UserId, OutboundRecord)>,
    /// Highest offset per (topic, partition), stored once the records are routed.
    offsets: BTreeMap<(String, i32), i64>,
    /// When the first stage took the batch.
    started: Instant,
    /// When the first stage had stored it: from then on it waits for the second.
    stored: Instant,
    /// Messages and acks in the batch.
    size: usize,
    /// The batch's records, to hold again if a user's home shard is found down when the index
    /// is written, and to release from the holding once routed.
    entries: Vec<Decoded>,
}

/// What the batch sets aside: dead letters, and the failures to tell senders about.
#[derive(Default)]
struct SetAside {
    /// (record index, code, reason)
    dead: Vec<(usize, &'static str, String)>,
    failures: Vec<FailedMessage>,
}

impl SetAside {
    /// Sets record `index` aside; `notice` is the reason its sender is told (and the failure row
    /// keeps): it must not quote the record's content.
    fn record(
        &mut self,
        batch: &Batch,
        index: usize,
        code: &'static str,
        reason: String,
        notice: &str,
    ) {
        let record = &batch.records[index];
        tracing::warn!(
            partition = record.partition(),
            offset = record.offset(),
            code,
            reason = %reason,
            "record set aside on the dead-letter topic"
        );
        if let Some(m) = inbound::message_of(record.payload()) {
            if let Some(f) = inbound::failed_message(&m, code, notice, chat_common::now_ms()) {
                self.failures.push(f);
            }
        }
        self.dead.push((index, code, reason));
    }
}

/// The result of [`retry`].
enum Attempt<T> {
    /// Done; true if an earlier attempt failed (it may have committed on some shards).
    Done(T, bool),
    /// The store refused the data: retrying cannot help.
    Refused(DbError),
    /// A shard did not answer, and the caller may hold its records aside.
    Down(DbError),
    /// Shutdown interrupted the retries.
    Stopped,
}

/// Most bytes of an original record a dead letter carries. The producer refuses a record above
/// `message.max.bytes` (1,000,000 by default), checked before compression, and a record read
/// from `inbound` can be larger than that once decompressed: a dead letter that can never be
/// produced would hold its partition as surely as the record it sets aside.
const MAX_DEAD_LETTER_ORIGINAL: usize = 512 * 1024;

/// Most bytes of an original key a dead letter is produced with.
const MAX_DEAD_LETTER_KEY: usize = 1024;

/// The dead letter of record `r`. An original above [`MAX_DEAD_LETTER_ORIGINAL`] keeps only its
/// first bytes, and the reason says so (the whole record stays on its topic while retained).
fn dead_letter(r: &OwnedMessage, code: &str, reason: &str, now_ms: i64) -> DeadLetter {
    let original = r.payload().unwrap_or_default();
    let (original, reason) = if original.len() > MAX_DEAD_LETTER_ORIGINAL {
        (
            &original[..MAX_DEAD_LETTER_ORIGINAL],
            format!(
                "{reason} (original truncated to its first {MAX_DEAD_LETTER_ORIGINAL} of {} bytes)",
                original.len()
            ),
        )
    } else {
        (original, reason.to_owned())
    };
    DeadLetter {
        original: original.to_vec(),
        topic: r.topic().to_owned(),
        partition: r.partition(),
        offset: r.offset(),
        code: code.to_owned(),
        reason,
        dead_at_ms: now_ms,
    }
}

/// The store's error with its causes (Postgres's message and SQLSTATE), for a dead letter.
fn describe(e: &DbError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    match e.sqlstate() {
        Some(code) => format!("{text} (SQLSTATE {code})"),
        None => text,
    }
}

impl Pipeline {
    /// Runs until `shutdown`; the batches in flight are finished (or abandoned, to be replayed
    /// by the next owner of their partitions) and stored offsets are committed before returning.
    ///
    /// The stages overlap: while one batch is indexed and routed (the second stage), the next
    /// one is read and stored. With `early_push` off, three: while one batch's records are
    /// routed, the next batch's index is written and the one after it is read and stored. The
    /// later stages take the batches one at a time and in order, so pushes, receipts and stored
    /// offsets keep the log's order. At most one batch waits for each of them.
    pub async fn run(self, shutdown: CancellationToken) {
        let (to_route, mut routing) = tokio::sync::mpsc::channel::<Routing>(1);
        let (to_send, mut sending) = tokio::sync::mpsc::channel::<Routing>(1);
        let mut holding = Holding::new(self.config.max_held);
        for shard in &self.unchecked {
            holding.mark_down(*shard);
        }
        let hold = Hold {
            state: Mutex::new(holding),
            retry: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            in_flight: tokio::sync::watch::Sender::new(0),
        };
        metrics::gauge!("multiplexer_held_records").set(0.0);
        let (this, hold, shutdown) = (&self, &hold, &shutdown);
        let mut pace = BatchPace::new(
            self.config.batch_wait,
            self.config.batch_wait_above,
            Instant::now(),
        );
        let store_stage = async move {
            loop {
                if hold.retry.swap(false, Ordering::AcqRel)
                    && !this.retry_held(hold, &to_route, shutdown).await
                {
                    break;
                }
                if hold.lock().is_full() {
                    // Back-pressure: nothing more is read until a shard is back.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = hold.wake.notified() => continue,
                    }
                }
                let records = match this.next_records(shutdown, &hold.wake, &mut pace).await {
                    Next::Records(records) => records,
                    Next::Woken => continue,
                    Next::Stopped => break,
                };
                let entries = records
                    .into_iter()
                    .map(Decoded::new)
                    .inspect(|e| {
                        if e.item.is_err() {
                            metrics::counter!("multiplexer_errors_total", "kind" => "invalid_record")
                                .increment(1);
                        }
                    })
                    .collect();
                if !this.process(entries, hold, &to_route, shutdown).await {
                    break;
                }
            }
        };
        let index_stage = async move {
            while let Some(mut r) = routing.recv().await {
                metrics::histogram!("multiplexer_stage_wait_seconds").record(r.stored.elapsed());
                // False only when shutdown interrupted it: the other stages stop too, and what
                // any of them holds is replayed from the stored offsets.
                if this.config.early_push {
                    let finished = this.early(r, hold, shutdown).await;
                    hold.in_flight.send_modify(|n| *n -= 1);
                    if !finished {
                        break;
                    }
                    continue;
                }
                if !this.update_index(&mut r, hold, shutdown).await {
                    break;
                }
                if to_send.send(r).await.is_err() {
                    break;
                }
            }
        };
        let route_stage = async move {
            while let Some(r) = sending.recv().await {
                let finished = this.finish(r, hold, shutdown).await;
                hold.in_flight.send_modify(|n| *n -= 1);
                if !finished {
                    break;
                }
            }
        };
        tokio::join!(
            store_stage,
            index_stage,
            route_stage,
            this.watch_down_shards(hold, shutdown)
        );
        if let Err(e) = self
            .consumer
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        {
            tracing::debug!(error = %e, "final commit (nothing to commit?)");
        }
        tracing::info!("multiplexer loop stopped");
    }

    /// Holds what needs a shard down, stores the rest and hands it to the second stage. A
    /// shard found down on the way is marked, and the batch split again. False if the pipeline
    /// stops (shutdown, or the second stage ended).
    async fn process(
        &self,
        mut entries: Vec<Decoded>,
        hold: &Hold,
        to_route: &tokio::sync::mpsc::Sender<Routing>,
        shutdown: &CancellationToken,
    ) -> bool {
        let started = Instant::now();
        let mut retold = false;
        loop {
            let now = hold.lock().split(self.shards.locator(), entries);
            if now.is_empty() {
                return true;
            }
            match self
                .handle(Batch::from_entries(now), started, retold, hold, shutdown)
                .await
            {
                Handled::Routing(r) => {
                    hold.in_flight.send_modify(|n| *n += 1);
                    // Fails once the second stage stopped.
                    return to_route.send(r).await.is_ok();
                }
                Handled::Redo(batch) => {
                    entries = batch.into_entries();
                    // Parts may have committed on the shards that answered.
                    retold = true;
                }
                Handled::Stopped => return false,
            }
        }
    }

    /// Tries the held records again, in log order: those whose shards answer now pass.
    async fn retry_held(
        &self,
        hold: &Hold,
        to_route: &tokio::sync::mpsc::Sender<Routing>,
        shutdown: &CancellationToken,
    ) -> bool {
        let assigned: Option<HashSet<(String, i32)>> = self.consumer.assignment().ok().map(|a| {
            a.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect()
        });
        let mut in_flight = hold.in_flight.subscribe();
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            done = in_flight.wait_for(|n| *n == 0) => {
                if done.is_err() {
                    return false;
                }
            }
        }
        let entries = hold.lock().take_all(assigned.as_ref());
        if entries.is_empty() {
            return true;
        }
        tracing::info!(records = entries.len(), "trying the held records again");
        self.process(entries, hold, to_route, shutdown).await
    }

    /// Pings the shards known down every second; when one answers, the held records are tried
    /// again. Records held that wait for no shard (after a rebalance) are tried again too.
    async fn watch_down_shards(&self, hold: &Hold, shutdown: &CancellationToken) {
        let mut unchecked = self.unchecked.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PING_EVERY) => {}
            }
            let (down, held) = {
                let h = hold.lock();
                (h.down(), h.len())
            };
            let mut back = down.is_empty() && held > 0;
            for shard in down {
                if !self.shards.answers(shard, PING_WITHIN).await {
                    continue;
                }
                if unchecked.contains(&shard) {
                    match check_schema(&self.shards, shard, self.config.migrate).await {
                        Ok(()) => unchecked.retain(|s| *s != shard),
                        Err(e) => {
                            // Its records stay held; tried again at the next ping.
                            tracing::error!(
                                shard,
                                error = format!("{e:#}"),
                                "a shard down at start answers, but its schema is not ready"
                            );
                            metrics::counter!("multiplexer_errors_total", "kind" => "shard")
                                .increment(1);
                            continue;
                        }
                    }
                }
                tracing::info!(shard, "shard answers again: its held records go on");
                hold.lock().mark_up(shard);
                back = true;
            }
            if back {
                hold.retry.store(true, Ordering::Release);
                hold.wake.notify_one();
            }
        }
    }

    /// With `early_push` off, the third stage of a batch, once the second moved its index:
    /// catches up with presence, routes, and stores the batch's offsets. False if shutdown
    /// interrupted it.
    ///
    /// The index moved before anything is routed: a message a sync may have to deliver is in its
    /// recipient's index by then (the invariant of `db_writer::user_index`). It was also
    /// committed before the presence catch-up below reads the log's end: a session announced
    /// after that read is not routed to, and its sync must find the index moved. So the two
    /// waits do not overlap for one batch; the next batch's index write overlaps this one's.
    async fn finish(&self, mut r: Routing, hold: &Hold, shutdown: &CancellationToken) -> bool {
        // Everything this batch changed is committed; make sure the routes we use are at least
        // as new as any session that synced before the commit (see `presence`).
        if !r.out.is_empty() {
            self.catch_up_timed().await;
        }
        let route_started = Instant::now();
        if !self.route(std::mem::take(&mut r.out), shutdown).await {
            return false;
        }
        metrics::histogram!("multiplexer_route_seconds").record(route_started.elapsed());
        self.store_offsets(&r, hold);
        true
    }

    /// The second stage of a batch (with `early_push`, the default): the batch is routed as
    /// soon as it is stored, beside its index write, and then again to every user whose
    /// session changed meanwhile; then its offsets are stored. False if shutdown interrupted it.
    ///
    /// The first routing takes the routes of the presence view as it stands (its consumer
    /// follows the log all along), with no catch-up: it is there for speed, not for the
    /// guarantee. A session it misses, announced before or after it, may have run its sync
    /// before the index moved and missed the batch there; so once the index is written the
    /// view catches up with the presence log's end, and every user whose route is not the one
    /// the first routing used (online now, and offline then or in another session) gets the
    /// batch's records for them again. A session announced after that catch-up's read of the
    /// log's end finds the batch by its sync, the index having moved before it. The next batch
    /// is routed only after this one's second routing, so a new session receives the batches
    /// in the log's order.
    async fn early(&self, mut r: Routing, hold: &Hold, shutdown: &CancellationToken) -> bool {
        let first = r.out.clone();
        let early_route = async {
            if first.is_empty() {
                return Some(HashMap::new());
            }
            let route_started = Instant::now();
            // Each user's route taken once, so that all of a user's records in the batch go
            // the same way, and the second routing knows which way that was.
            let used: HashMap<UserId, Option<Route>> = first
                .iter()
                .map(|(u, _)| (u.clone(), self.presence.route_of(u.as_str())))
                .collect();
            let ok = self
                .route_to(
                    first,
                    |u| used.get(u)?.as_ref().map(|r| r.gateway.clone()),
                    shutdown,
                )
                .await;
            metrics::histogram!("multiplexer_route_seconds").record(route_started.elapsed());
            ok.then_some(used)
        };
        let (indexed, used) = tokio::join!(self.update_index(&mut r, hold, shutdown), early_route);
        let (true, Some(used)) = (indexed, used) else {
            return false;
        };
        if !r.out.is_empty() {
            self.catch_up_timed().await;
            let again = routed_again(std::mem::take(&mut r.out), &used, |u| {
                self.presence.route_of(u.as_str())
            });
            if !again.is_empty() {
                metrics::counter!("multiplexer_routed_again_total").increment(again.len() as u64);
                if !self.route(again, shutdown).await {
                    return false;
                }
            }
        }
        self.store_offsets(&r, hold);
        true
    }

    /// Catches up with presence before a batch is routed (with `early_push`, routed again),
    /// recording how long it took.
    async fn catch_up_timed(&self) {
        let started = Instant::now();
        self.presence.catch_up(PRESENCE_CATCH_UP).await;
        metrics::histogram!("multiplexer_presence_catch_up_seconds").record(started.elapsed());
    }

    /// Stores the offsets of a routed batch, never at or past a record still held.
    fn store_offsets(&self, r: &Routing, hold: &Hold) {
        let offsets = hold
            .lock()
            .finish(&r.offsets, r.entries.iter().map(Decoded::position));
        for ((topic, partition), offset) in &offsets {
            // Fails only if the partition was revoked meanwhile; its new owner replays it.
            if let Err(e) = self.consumer.store_offset(topic, *partition, *offset) {
                tracing::debug!(error = %e, topic, partition, "offset not stored");
            }
        }
        metrics::histogram!("multiplexer_batch_seconds").record(r.started.elapsed());
        metrics::histogram!("multiplexer_batch_size").record(r.size as f64);
    }

    /// Waits for the first record, then gathers more for up to the wait `pace` gives (none
    /// below its rate: then what has already arrived). `wake` ends the wait for the first
    /// record only, so that no record read is dropped. Each record's time from its consumption
    /// to its batch's close is `multiplexer_batch_wait_seconds`.
    async fn next_records(
        &self,
        shutdown: &CancellationToken,
        wake: &tokio::sync::Notify,
        pace: &mut BatchPace,
    ) -> Next {
        let mut records = Vec::new();
        let mut taken = Vec::new();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Next::Stopped,
                _ = wake.notified() => return Next::Woken,
                m = self.consumer.recv() => m,
            };
            match first {
                Ok(m) => {
                    record_inbound_wait(&m);
                    taken.push(Instant::now());
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
        // With no wait the records already consumed are taken (the timeout polls `recv` before
        // its deadline), and the batch closes at the timer's next tick: tokio's timer works in
        // whole milliseconds and rounds a deadline up, so under a millisecond (0.5 ms at the
        // median at 500 msg/s), taking what arrives until then.
        let deadline = tokio::time::Instant::now() + pace.wait_at(Instant::now());
        while records.len() < self.config.max_batch {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    record_inbound_wait(&m);
                    taken.push(Instant::now());
                    records.push(m.detach());
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consume failed");
                    break;
                }
                Err(_) => break,
            }
        }
        let closed = Instant::now();
        let waited = metrics::histogram!("multiplexer_batch_wait_seconds");
        for t in taken {
            waited.record(closed.duration_since(t));
        }
        pace.taken(records.len(), closed);
        Next::Records(records)
    }

    /// The first stage of a batch: stores its messages and applies its acks, sets aside what
    /// can never be processed, and returns what the later stages write and route. `None` if
    /// shutdown interrupted it.
    async fn handle(
        &self,
        mut batch: Batch,
        started: Instant,
        retold: bool,
        hold: &Hold,
        shutdown: &CancellationToken,
    ) -> Handled {
        let mut aside = SetAside::default();
        for (index, why) in &batch.invalid {
            let reason = why.to_string();
            aside.record(&batch, *index, why.code(), reason.clone(), &reason);
        }
        // The messages and the acks go to the shards at once: they write different rows (an
        // ack only moves its direction's watermark up to the conversation's last seq as its
        // statement sees it, so it never covers a message stored beside it), and each commit
        // waits for a WAL flush, so one after the other cost two.
        let store_started = Instant::now();
        let mut ack_aside = SetAside::default();
        let (stored, acked) = tokio::join!(
            self.store(&batch, &mut aside, hold, shutdown),
            self.ack(&batch, &mut ack_aside, retold, hold, shutdown)
        );
        let (
            (stored, isolated),
            Acked {
                receipts,
                watermarks,
            },
        ) = match (stored, acked) {
            (Ok(stored), Ok(acked)) => (stored, acked),
            (stored, acked) => {
                let (mut stopped, mut marked) = (false, false);
                for halt in [stored.err(), acked.err()].into_iter().flatten() {
                    match halt {
                        Halt::Down(e) => marked |= hold.mark_down(&e),
                        Halt::Stopped => stopped = true,
                    }
                }
                // Never a busy loop: a shard failing again that was known down already (its
                // records should have been held) is waited for like any other retry.
                if stopped || (!marked && !pause(shutdown).await) {
                    return Handled::Stopped;
                }
                return Handled::Redo(batch);
            }
        };
        let offsets = std::mem::take(&mut batch.offsets);
        aside.dead.extend(ack_aside.dead);
        aside.failures.extend(ack_aside.failures);
        let created = stored.iter().filter(|s| s.created).count();
        metrics::counter!("multiplexer_messages_stored_total").increment(created as u64);
        metrics::counter!("multiplexer_messages_duplicate_total")
            .increment((stored.len() - created) as u64);
        metrics::histogram!("multiplexer_store_seconds").record(store_started.elapsed());
        if !self.set_aside(&batch, &aside, shutdown).await {
            return Handled::Stopped;
        }
        let mut index = IndexUpdates::new();
        index.stored(&stored);
        watermarks.iter().for_each(|w| index.watermark(w));
        aside.failures.iter().for_each(|f| index.failure(f));
        let mut out: Vec<(UserId, OutboundRecord)> = Vec::new();
        // A batch that was bisected, retried or split again may have committed some messages
        // on some shards in an attempt that failed: those come back as not created, so their
        // senders are told again (a repeated `Stored` changes nothing for a client).
        for s in stored.iter().filter(|s| s.created || isolated || retold) {
            // Tell the sender where the message landed (its sequence).
            let m = &s.message;
            out.push((
                m.sender.clone(),
                OutboundRecord {
                    kind: Some(outbound_record::Kind::Stored(Stored {
                        client_message_id: m.client_id.as_str().to_owned(),
                        message_id: m.id.to_string(),
                        conversation: m.conversation.as_str().to_owned(),
                        seq: m.seq,
                        peer: m.recipient.as_str().to_owned(),
                    })),
                },
            ));
        }
        for f in &aside.failures {
            out.push((
                f.sender.clone(),
                OutboundRecord {
                    kind: Some(outbound_record::Kind::Failed(f.to_proto())),
                },
            ));
        }
        for s in stored.into_iter().filter(|s| !s.acked) {
            out.push((
                s.message.recipient.clone(),
                OutboundRecord {
                    kind: Some(outbound_record::Kind::Deliver(s.message.into())),
                },
            ));
        }
        for ReceiptFor { sender, receipt } in receipts {
            out.push((
                sender,
                OutboundRecord {
                    kind: Some(outbound_record::Kind::Receipt((&receipt).into())),
                },
            ));
        }
        let size = batch.messages.len() + batch.acks.len();
        Handled::Routing(Routing {
            index,
            out,
            offsets,
            started,
            stored: Instant::now(),
            size,
            entries: batch.into_entries(),
        })
    }

    /// Stores the batch's messages. When the store refuses the batch for its data, bisects it:
    /// each half is stored (the earlier first), and a refused half is split again, down to the
    /// single messages that are set aside. Returns the stored messages in log order and whether
    /// the batch was bisected or retried; a `Halt` if shutdown interrupted or a shard is down.
    async fn store(
        &self,
        batch: &Batch,
        aside: &mut SetAside,
        hold: &Hold,
        shutdown: &CancellationToken,
    ) -> Result<(Vec<db_writer::Stored>, bool), Halt> {
        if batch.messages.is_empty() {
            return Ok((Vec::new(), false));
        }
        let mut stored = Vec::with_capacity(batch.messages.len());
        let mut isolated = false;
        // Ranges of `batch.messages` still to store; the last is the earliest in the log.
        let mut todo = vec![(0, batch.messages.len())];
        while let Some((lo, hi)) = todo.pop() {
            let part = &batch.messages[lo..hi];
            match retry(shutdown, "store batch", hold.may_hold(), || {
                self.shards.store_batch(part)
            })
            .await
            {
                Attempt::Done(s, retried) => {
                    isolated |= retried;
                    stored.extend(s);
                }
                Attempt::Stopped => return Err(Halt::Stopped),
                Attempt::Down(e) => return Err(Halt::Down(e)),
                Attempt::Refused(e) if hi - lo == 1 => {
                    aside.record(
                        batch,
                        batch.message_records[lo],
                        STORE_REFUSED,
                        describe(&e),
                        &e.summary(),
                    );
                }
                Attempt::Refused(e) => {
                    if !isolated {
                        tracing::warn!(error = %describe(&e), messages = hi - lo, "the store refused a batch; isolating the messages it cannot hold");
                    }
                    isolated = true;
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            }
        }
        Ok((stored, isolated))
    }

    /// Applies the batch's acks; when the store refuses them for their data, applies them one
    /// by one and sets aside each it refuses. A `Halt` if shutdown interrupted or a shard is
    /// down. When an attempt may have moved watermarks without their receipts reaching anyone
    /// (`retold`, or retried here), every watermark is sent as a receipt (a repeated receipt
    /// changes nothing for a client).
    async fn ack(
        &self,
        batch: &Batch,
        aside: &mut SetAside,
        retold: bool,
        hold: &Hold,
        shutdown: &CancellationToken,
    ) -> Result<Acked, Halt> {
        if batch.acks.is_empty() {
            return Ok(Acked::default());
        }
        let retention = self.config.retention;
        match retry(shutdown, "acks", hold.may_hold(), || {
            self.shards.apply_acks(&batch.acks, retention)
        })
        .await
        {
            Attempt::Done(r, retried) if retried || retold => return Ok(receipts_of_all(r)),
            Attempt::Done(r, _) => return Ok(r),
            Attempt::Stopped => return Err(Halt::Stopped),
            Attempt::Down(e) => return Err(Halt::Down(e)),
            Attempt::Refused(e) => {
                tracing::warn!(error = %describe(&e), "the store refused a batch of acks; applying them one by one");
            }
        }
        let mut all = Acked::default();
        for (i, ack) in batch.acks.iter().enumerate() {
            match retry(shutdown, "ack", hold.may_hold(), || {
                self.shards.apply_acks(std::slice::from_ref(ack), retention)
            })
            .await
            {
                Attempt::Done(acked, _) => {
                    all.receipts.extend(acked.receipts);
                    all.watermarks.extend(acked.watermarks);
                }
                Attempt::Stopped => return Err(Halt::Stopped),
                Attempt::Down(e) => return Err(Halt::Down(e)),
                Attempt::Refused(e) => {
                    aside.record(
                        batch,
                        batch.ack_records[i],
                        STORE_REFUSED,
                        describe(&e),
                        &e.summary(),
                    );
                }
            }
        }
        // The batch attempt was refused and may have moved some watermarks.
        Ok(receipts_of_all(all))
    }

    /// Moves the users' conversation index by what the batch did. False if shutdown
    /// interrupted it. Its rows hold validated ids and numbers only: the store has no reason to
    /// refuse them, and if it does, the batch waits (routing before the index moved would break
    /// the sync's invariant).
    ///
    /// A home shard found down here holds back the conversations of its users: their rows, their
    /// pushes, and their records (held again, to be stored again, which changes nothing, and
    /// routed once the shard is back); the rest goes on.
    async fn update_index(
        &self,
        r: &mut Routing,
        hold: &Hold,
        shutdown: &CancellationToken,
    ) -> bool {
        if r.index.is_empty() {
            return true;
        }
        let started = Instant::now();
        let rows = r.index.len();
        // Conversations held since this batch was stored wait behind their held records.
        let behind = hold.lock().held_among(&r.index);
        if !behind.is_empty() {
            self.hold_back(r, behind, hold);
        }
        while !r.index.is_empty() {
            let index = &r.index;
            let attempt = retry(shutdown, "index", hold.may_hold(), || {
                self.shards.update_index(index)
            })
            .await;
            match attempt {
                Attempt::Done((), _) => break,
                Attempt::Stopped => return false,
                Attempt::Down(e) => {
                    hold.mark_down(&e);
                    let locator = self.shards.locator();
                    let back = e.shard().map_or_else(BTreeSet::new, |shard| {
                        r.index.conversations_of(|u| locator.home_of(u) == shard)
                    });
                    if back.is_empty() {
                        // Nothing of this batch to hold back: never a busy loop.
                        if !pause(shutdown).await {
                            return false;
                        }
                        continue;
                    }
                    tracing::warn!(
                        shard = e.shard(),
                        conversations = back.len(),
                        "index rows for a shard down: holding those conversations back"
                    );
                    self.hold_back(r, back, hold);
                }
                Attempt::Refused(e) => {
                    tracing::error!(error = %describe(&e), "the store refused index rows; retrying");
                    metrics::counter!("multiplexer_errors_total", "kind" => "index").increment(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        metrics::histogram!("multiplexer_index_seconds").record(started.elapsed());
        metrics::counter!("multiplexer_index_rows_total").increment(rows as u64);
        true
    }

    /// Takes the conversations `back` out of `r` (index rows, pushes, records), and holds
    /// their records again.
    fn hold_back(&self, r: &mut Routing, back: BTreeSet<ConversationKey>, hold: &Hold) {
        if back.is_empty() {
            return;
        }
        r.index.retain_conversations(|c| !back.contains(c));
        r.out.retain(|(user, record)| {
            conversation_of(user, record).is_none_or(|c| !back.contains(&c))
        });
        let (held, kept): (Vec<Decoded>, Vec<Decoded>) = std::mem::take(&mut r.entries)
            .into_iter()
            .partition(|e| e.conversation().is_some_and(|(c, _, _)| back.contains(&c)));
        r.entries = kept;
        hold.lock().hold_again(held);
    }

    /// Writes the dead letters to `inbound-dlq` (waiting for every delivery report) and
    /// remembers the failed messages in their shards. False if shutdown interrupted.
    async fn set_aside(
        &self,
        batch: &Batch,
        aside: &SetAside,
        shutdown: &CancellationToken,
    ) -> bool {
        if aside.dead.is_empty() {
            return true;
        }
        let topic = self.config.topics.inbound_dlq();
        let now = chat_common::now_ms();
        let todo = aside
            .dead
            .iter()
            .map(|(index, code, reason)| {
                let r = &batch.records[*index];
                let value = dead_letter(r, code, reason, now).encode_to_vec();
                // The key only spreads dead letters over partitions: a hostile one is cut short.
                let key = r
                    .key()
                    .map(|k| k[..k.len().min(MAX_DEAD_LETTER_KEY)].to_vec());
                (topic.clone(), key, value)
            })
            .collect();
        // The dead-letter topic is checked at start: never dropped, retried until it is back.
        if self.produce_all(todo, false, shutdown).await.is_none() {
            return false;
        }
        for (_, code, _) in &aside.dead {
            metrics::counter!("multiplexer_dead_letters_total", "code" => *code).increment(1);
        }
        if aside.failures.is_empty() {
            return true;
        }
        // Their shards answered a moment ago (the records were not held): retried in place.
        match retry(shutdown, "failure rows", false, || {
            self.shards.record_failures(&aside.failures)
        })
        .await
        {
            Attempt::Done((), _) => true,
            Attempt::Stopped | Attempt::Down(_) => false,
            Attempt::Refused(e) => {
                // Rows of validated ids only: should never happen. The dead letters and the
                // live notices stand; only the next sync will not repeat them.
                tracing::error!(error = %describe(&e), "failure rows refused; the senders' next sync will miss them");
                metrics::counter!("multiplexer_errors_total", "kind" => "failure_rows")
                    .increment(1);
                true
            }
        }
    }

    /// Produces each record to the gateway that holds its user; users without a live session
    /// are skipped (their messages stay pending and reach them by sync). By default the records
    /// for one gateway go out as batch records, keyed by the gateway id so that they stay in one
    /// partition and in order: one Kafka record per gateway per batch instead of one per push.
    async fn route(
        &self,
        records: Vec<(UserId, OutboundRecord)>,
        shutdown: &CancellationToken,
    ) -> bool {
        self.route_to(records, |u| self.presence.route(u.as_str()), shutdown)
            .await
    }

    /// [`Pipeline::route`] with each user's gateway given by `gateway_of`.
    async fn route_to(
        &self,
        records: Vec<(UserId, OutboundRecord)>,
        gateway_of: impl Fn(&UserId) -> Option<GatewayId>,
        shutdown: &CancellationToken,
    ) -> bool {
        // (topic, key, value, pushes it holds)
        let mut todo: Vec<(String, String, Vec<u8>, u64)> = Vec::new();
        // topic -> (gateway id, its pushes in order)
        let mut per_gateway: HashMap<String, (String, Vec<OutboundItem>)> = HashMap::new();
        for (user, rec) in records {
            let Some(gw) = gateway_of(&user) else {
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
                        user: user.as_str().to_owned(),
                        record: Some(rec),
                    });
            } else {
                todo.push((topic, user.as_str().to_owned(), rec.encode_to_vec(), 1));
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
        let records = todo.len() as u64;
        let pushes: Vec<u64> = todo.iter().map(|t| t.3).collect();
        let todo = todo
            .into_iter()
            .map(|(topic, key, value, _)| (topic, Some(key.into_bytes()), value))
            .collect();
        let Some(missing) = self.produce_all(todo, true, shutdown).await else {
            return false;
        };
        let lost: u64 = missing.iter().map(|&i| pushes[i]).sum();
        let sent: u64 = pushes.iter().sum::<u64>() - lost;
        metrics::counter!("multiplexer_routed_total", "to" => "gateway").increment(sent);
        metrics::counter!("multiplexer_routed_total", "to" => "no_topic").increment(lost);
        metrics::counter!("multiplexer_outbound_records_total")
            .increment(records - missing.len() as u64);
        true
    }

    /// Produces every (topic, key, value), retrying the failed ones with backoff until each has
    /// its delivery report. With `skip_missing`, records whose topic does not exist are not
    /// retried, and their indexes are returned: a gateway the presence log still names but whose
    /// outbound topic was deleted (or not yet created) would otherwise stop the partition for
    /// good, and the messages are stored, so they reach the recipient by sync. None if shutdown
    /// interrupted.
    async fn produce_all(
        &self,
        todo: Vec<Produce>,
        skip_missing: bool,
        shutdown: &CancellationToken,
    ) -> Option<Vec<usize>> {
        let mut todo: Vec<(usize, Produce)> = todo.into_iter().enumerate().collect();
        let mut missing = Vec::new();
        let mut backoff = Duration::from_millis(50);
        while !todo.is_empty() {
            let results = join_all(todo.iter().map(|(_, (topic, key, payload))| {
                let mut record = FutureRecord::to(topic).payload(payload);
                if let Some(key) = key {
                    record = record.key(key);
                }
                self.producer.send(record, rdkafka::util::Timeout::Never)
            }))
            .await;
            let mut failed = Vec::new();
            for ((i, item), result) in todo.into_iter().zip(results) {
                match result {
                    Ok(_) => {}
                    // librdkafka's own verdict once the cluster's metadata has lacked the topic
                    // for topic.metadata.propagation.max.ms; a broker's transient "unknown
                    // partition" is retried inside librdkafka and never lands here.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopic), _))
                        if skip_missing =>
                    {
                        tracing::warn!(
                            topic = %item.0,
                            "outbound topic does not exist; its pushes are left to sync"
                        );
                        missing.push(i);
                    }
                    Err((e, _)) => {
                        tracing::warn!(error = %e, topic = %item.0, "produce failed; retrying");
                        metrics::counter!("multiplexer_errors_total", "kind" => "produce")
                            .increment(1);
                        failed.push((i, item));
                    }
                }
            }
            todo = failed;
            if !todo.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        Some(missing)
    }
}

/// Whether a batch waits to fill, by the rate records come in (not waiting still closes it at
/// the timer's next millisecond tick: see `next_records`). Waiting trades latency for fewer,
/// larger batches (each a store, an ack and an index transaction, and their commits' flushes).
/// At a low rate the machine has the CPU to spare and the wait is most of a message's time in
/// the multiplexer; under load a batch fills while the one before it is stored, and the wait
/// keeps the stages from contending for the shards with batches of a few records (bench/ab.sh,
/// keep mode: without the wait, delivered p50 0.71 times as long at 500 msg/s and 0.88 at
/// 3,000, 1.26 at 6,000 and 1.43 at 12,000; docs/performance-log.md, 2026-12-06). So a batch
/// waits `wait` only while at least `above` records a second come (counted over 100 ms), until
/// the rate falls below half of that: the same [`RateSwitch`] as the gateways' producer lanes.
#[derive(Debug)]
pub(crate) struct BatchPace {
    wait: Duration,
    /// On: batches wait.
    switch: RateSwitch,
}

impl BatchPace {
    pub(crate) fn new(wait: Duration, above: u64, now: Instant) -> Self {
        Self {
            wait,
            switch: RateSwitch::new(above, now),
        }
    }

    /// How long a batch whose first record came at `now` waits to fill. The rate is counted up
    /// to `now` first: a window that ended in a quiet spell closes here, so the first batch after
    /// a burst and a pause goes by the pause's rate, not the burst's.
    pub(crate) fn wait_at(&mut self, now: Instant) -> Duration {
        self.switch.count(0, now);
        self.switch.follow();
        if self.switch.is_on() {
            self.wait
        } else {
            Duration::ZERO
        }
    }

    /// Counts a batch of `records` closed at `now`.
    pub(crate) fn taken(&mut self, records: usize, now: Instant) {
        self.switch.count(records as u64, now);
        self.switch.follow();
    }
}

/// The records to route again after the index write (see [`Pipeline::early`]): those of the
/// users online `now` in another session than the route `used` the first time (none, or
/// another gateway or epoch), in order.
fn routed_again(
    out: Vec<(UserId, OutboundRecord)>,
    used: &HashMap<UserId, Option<Route>>,
    now: impl Fn(&UserId) -> Option<Route>,
) -> Vec<(UserId, OutboundRecord)> {
    out.into_iter()
        .filter(|(u, _)| {
            let now = now(u);
            now.is_some() && now.as_ref() != used.get(u).and_then(Option::as_ref)
        })
        .collect()
}

/// A record to produce: topic, key, value.
type Produce = (String, Option<Vec<u8>>, Vec<u8>);

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

/// Waits a second before trying again; false if shutdown came first.
async fn pause(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
    }
}

/// Why the first stage stopped a batch.
enum Halt {
    /// A shard did not answer (the error names it).
    Down(DbError),
    Stopped,
}

/// `acked` with a receipt for every watermark that ever moved, moved by this attempt or not.
fn receipts_of_all(mut acked: Acked) -> Acked {
    acked.receipts = acked
        .watermarks
        .iter()
        .filter(|w| w.up_to_seq > 0)
        .filter_map(|w| {
            Some(ReceiptFor {
                sender: w.writer.clone(),
                receipt: chat_common::message::Receipt {
                    conversation: w.conversation.clone(),
                    peer: w.reader.clone(),
                    up_to_seq: w.up_to_seq,
                    acked_at_ms: w.acked_at_ms?,
                },
            })
        })
        .collect();
    acked
}

/// The conversation a push to `user` belongs to.
fn conversation_of(user: &UserId, record: &OutboundRecord) -> Option<ConversationKey> {
    let conversation = match record.kind.as_ref()? {
        outbound_record::Kind::Deliver(m) => &m.conversation,
        outbound_record::Kind::Receipt(r) => &r.conversation,
        outbound_record::Kind::Stored(s) => &s.conversation,
        outbound_record::Kind::Failed(f) => {
            return ConversationKey::of(user, &UserId::parse(&f.peer).ok()?)
        }
        outbound_record::Kind::Batch(_) => return None,
    };
    ConversationKey::parse(conversation).ok()
}

/// Runs `op` until it succeeds or the store refuses its data (returned at once: the caller sets
/// the data aside), or, with `may_hold`, a shard does not answer (returned at once: the caller
/// holds that shard's records aside). Any other error is retried with backoff, in place, so the
/// partition's order holds: a retryable one quickly, anything else (a schema or configuration
/// problem, which an operator must fix) every 5 s, counted in the metric.
async fn retry<T, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    may_hold: bool,
    mut op: F,
) -> Attempt<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut backoff = Duration::from_millis(50);
    let mut retried = false;
    loop {
        match op().await {
            Ok(v) => return Attempt::Done(v, retried),
            Err(e) if e.is_data_error() => return Attempt::Refused(e),
            Err(e) if may_hold && e.is_unavailable() && e.shard().is_some() => {
                return Attempt::Down(e)
            }
            Err(e) => {
                let retryable = e.is_retryable();
                tracing::warn!(error = %describe(&e), retryable, "{what} failed; retrying");
                metrics::counter!("multiplexer_errors_total", "kind" => "shard").increment(1);
                if !retryable {
                    backoff = Duration::from_secs(5);
                }
            }
        }
        retried = true;
        tokio::select! {
            _ = shutdown.cancelled() => return Attempt::Stopped,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Publishes `multiplexer_consumer_lag{partition}` for the partitions this instance owns, every
/// `every`, until `shutdown`. The lag is counted from the group's committed offset (where a
/// restart or the partition's next owner resumes), not from the fetch position, which runs ahead
/// of what is stored while a batch is retried (a shard down): the records not committed yet are
/// the ones still to process. A partition revoked since the last report is set to 0, so a value
/// from before a rebalance does not linger here while its new owner reports the real one.
pub async fn report_lag(
    consumer: std::sync::Arc<StreamConsumer>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut reported = BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = consumer.clone();
        // None: the assignment or the committed offsets could not be read; the last values stay.
        let Ok(Some(owned)) = tokio::task::spawn_blocking(move || committed_lags(&c)).await else {
            continue;
        };
        for (partition, lag) in lag_updates(&mut reported, &owned) {
            metrics::gauge!("multiplexer_consumer_lag", "partition" => partition.to_string())
                .set(lag as f64);
        }
    }
}

/// The lag of each partition assigned to `c` now (None where a watermark could not be read).
fn committed_lags(c: &StreamConsumer) -> Option<BTreeMap<i32, Option<i64>>> {
    let timeout = Duration::from_secs(2);
    let assigned = c.assignment().ok()?;
    let committed = c.committed_offsets(assigned, timeout).ok()?;
    Some(
        committed
            .elements()
            .iter()
            .map(|e| {
                let lag = c
                    .fetch_watermarks(e.topic(), e.partition(), timeout)
                    .ok()
                    .and_then(|(low, high)| lag(e.offset(), low, high));
                (e.partition(), lag)
            })
            .collect(),
    )
}

/// Records from the committed offset to the high watermark `high`. A group with no committed
/// offset yet, or one below the log start `low` (deleted by retention), starts at `low`
/// (`auto.offset.reset=earliest`).
fn lag(committed: rdkafka::Offset, low: i64, high: i64) -> Option<i64> {
    let from = match committed {
        rdkafka::Offset::Offset(o) => o.max(low),
        rdkafka::Offset::Invalid | rdkafka::Offset::Beginning => low,
        _ => return None,
    };
    Some((high - from).max(0))
}

/// The gauge values of one report: the lag of each partition owned now whose lag is known, and 0
/// for each reported before and owned no more. `reported` becomes the partitions owned now.
fn lag_updates(
    reported: &mut BTreeSet<i32>,
    owned: &BTreeMap<i32, Option<i64>>,
) -> Vec<(i32, i64)> {
    let mut updates: Vec<(i32, i64)> = reported
        .iter()
        .filter(|p| !owned.contains_key(p))
        .map(|p| (*p, 0))
        .collect();
    updates.extend(owned.iter().filter_map(|(p, lag)| lag.map(|l| (*p, l))));
    *reported = owned.keys().copied().collect();
    updates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(user: &str, body_bytes: usize) -> OutboundItem {
        OutboundItem {
            user: user.into(),
            record: Some(OutboundRecord {
                kind: Some(outbound_record::Kind::Deliver(
                    chat_proto::v1::ChatMessage {
                        recipient: user.into(),
                        body: "x".repeat(body_bytes),
                        ..Default::default()
                    },
                )),
            }),
        }
    }

    #[test]
    fn a_dead_letter_keeps_its_source_and_bounds_the_original() {
        let record = |value: Vec<u8>| {
            OwnedMessage::new(
                Some(value),
                Some(b"alice:bob".to_vec()),
                "t-inbound".into(),
                rdkafka::Timestamp::NotAvailable,
                4,
                17,
                None,
            )
        };
        let d = dead_letter(&record(b"\xff\xff".to_vec()), "undecodable", "why", 9);
        assert_eq!(
            (
                d.original.as_slice(),
                d.topic.as_str(),
                d.partition,
                d.offset,
                d.code.as_str(),
                d.reason.as_str(),
                d.dead_at_ms
            ),
            (
                b"\xff\xff".as_slice(),
                "t-inbound",
                4,
                17,
                "undecodable",
                "why",
                9
            )
        );
        let big = vec![7u8; 3 * 1024 * 1024];
        let d = dead_letter(&record(big.clone()), "undecodable", "why", 9);
        assert_eq!(d.original, big[..MAX_DEAD_LETTER_ORIGINAL]);
        assert!(d.reason.contains("truncated") && d.reason.contains("3145728"));
        // Well within what the producer accepts (1,000,000 bytes by default).
        assert!(d.encoded_len() < 600 * 1024);
    }

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_log_start() {
        use rdkafka::Offset;
        assert_eq!(lag(Offset::Offset(40), 0, 100), Some(60));
        assert_eq!(lag(Offset::Offset(100), 0, 100), Some(0));
        // Nothing committed yet: everything from the log start is still to process.
        assert_eq!(lag(Offset::Invalid, 10, 100), Some(90));
        // Committed below what retention kept: the group resumes at the log start.
        assert_eq!(lag(Offset::Offset(3), 10, 100), Some(90));
        // A watermark read before the commit landed: never negative.
        assert_eq!(lag(Offset::Offset(105), 0, 100), Some(0));
        assert_eq!(lag(Offset::End, 0, 100), None);
    }

    #[test]
    fn a_revoked_partition_is_reported_at_zero_once() {
        let mut reported = BTreeSet::new();
        let owned = BTreeMap::from([(0, Some(5)), (1, Some(7)), (2, None)]);
        assert_eq!(lag_updates(&mut reported, &owned), [(0, 5), (1, 7)]);
        // A rebalance takes 1 and 2 away and gives 3: 1 and 2 go to 0 (2 was never known).
        let owned = BTreeMap::from([(0, Some(4)), (3, Some(9))]);
        assert_eq!(
            lag_updates(&mut reported, &owned),
            [(1, 0), (2, 0), (0, 4), (3, 9)]
        );
        assert_eq!(lag_updates(&mut reported, &owned), [(0, 4), (3, 9)]);
        // Every partition revoked: each goes to 0, and nothing is reported after.
        assert_eq!(
            lag_updates(&mut reported, &BTreeMap::new()),
            [(0, 0), (3, 0)]
        );
        assert!(lag_updates(&mut reported, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn a_batch_gives_its_records_back_as_read() {
        let record = |offset: i64, value: Option<Vec<u8>>| {
            Decoded::new(OwnedMessage::new(
                value,
                None,
                "inbound".into(),
                rdkafka::Timestamp::NotAvailable,
                1,
                offset,
                None,
            ))
        };
        let ack = chat_proto::v1::InboundRecord {
            kind: Some(chat_proto::v1::inbound_record::Kind::Ack(
                chat_proto::v1::AckRecord {
                    user: "bob".into(),
                    peer: "alice".into(),
                    conversation: "alice:bob".into(),
                    up_to_seq: 3,
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
        .encode_to_vec();
        let entries = vec![
            record(7, Some(b"\xff".to_vec())),
            record(8, Some(ack)),
            record(9, None),
        ];
        let kinds = |entries: &[Decoded]| -> Vec<(i64, String)> {
            entries
                .iter()
                .map(|e| {
                    let kind = match &e.item {
                        Ok(Inbound::Message(_)) => "message".to_owned(),
                        Ok(Inbound::Ack(a)) => format!("ack {}", a.up_to_seq),
                        Err(e) => e.code().to_owned(),
                    };
                    (e.record.offset(), kind)
                })
                .collect()
        };
        let before = kinds(&entries);
        let batch = Batch::from_entries(entries);
        assert_eq!(batch.offsets[&("inbound".to_owned(), 1)], 9);
        assert_eq!((batch.acks.len(), batch.invalid.len()), (1, 2));
        assert_eq!(kinds(&batch.into_entries()), before);
        assert_eq!(
            before,
            [
                (7, "undecodable".to_owned()),
                (8, "ack 3".to_owned()),
                (9, "empty".to_owned())
            ]
        );
    }

    /// After the index write, a batch goes again to the users whose session changed since it
    /// was first routed, and only to them, in order.
    #[test]
    fn routed_again_goes_to_sessions_announced_since_the_first_routing() -> anyhow::Result<()> {
        let user = |s: &str| UserId::parse(s);
        let route = |gw: &str, epoch| -> anyhow::Result<Route> {
            Ok(Route {
                gateway: GatewayId::parse(gw)?,
                epoch,
                online: true,
            })
        };
        let (same, moved, new_epoch, came, left, never) = (
            user("same")?,
            user("moved")?,
            user("epoch")?,
            user("came")?,
            user("left")?,
            user("never")?,
        );
        let used: HashMap<UserId, Option<Route>> = [
            (same.clone(), Some(route("gw-a", 1)?)),
            (moved.clone(), Some(route("gw-a", 1)?)),
            (new_epoch.clone(), Some(route("gw-a", 1)?)),
            (came.clone(), None),
            (left.clone(), Some(route("gw-b", 3)?)),
            (never.clone(), None),
        ]
        .into();
        let now: HashMap<UserId, Route> = [
            (same.clone(), route("gw-a", 1)?),
            (moved.clone(), route("gw-b", 2)?),
            (new_epoch.clone(), route("gw-a", 2)?),
            (came.clone(), route("gw-c", 1)?),
        ]
        .into();
        let record = |n: usize| OutboundRecord {
            kind: Some(outbound_record::Kind::Stored(Stored {
                seq: n as u64,
                ..Default::default()
            })),
        };
        let users = [
            &same, &moved, &new_epoch, &came, &left, &never, &came, &moved,
        ];
        let out: Vec<(UserId, OutboundRecord)> = users
            .iter()
            .enumerate()
            .map(|(i, u)| ((*u).clone(), record(i)))
            .collect();
        let again = routed_again(out, &used, |u| now.get(u).cloned());
        let got: Vec<(String, u64)> = again
            .iter()
            .map(|(u, r)| match &r.kind {
                Some(outbound_record::Kind::Stored(s)) => (u.to_string(), s.seq),
                _ => (u.to_string(), u64::MAX),
            })
            .collect();
        let want: Vec<(String, u64)> = [
            ("moved", 1),
            ("epoch", 2),
            ("came", 3),
            ("came", 6),
            ("moved", 7),
        ]
        .iter()
        .map(|(u, n)| (u.to_string(), *n))
        .collect();
        assert_eq!(got, want);
        Ok(())
    }

    /// A batch waits to fill only while records come at the rate given (the switch and its
    /// hysteresis are `chat_common::rate`'s test), and the first batch after a pause goes by the
    /// pause's rate; 0 always waits.
    #[test]
    fn batches_wait_to_fill_only_under_load() {
        let wait = Duration::from_millis(2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut pace = BatchPace::new(wait, 10_000, t0);
        assert_eq!(pace.wait_at(t0), Duration::ZERO, "idle: no wait");
        // 500 records in 100 ms: 5,000 a second, below the rate.
        for i in 1..=50 {
            pace.taken(10, at(2 * i));
        }
        assert_eq!(pace.wait_at(at(100)), Duration::ZERO);
        // 1,200 in the next 100 ms: 12,000 a second.
        for i in 1..=50 {
            pace.taken(24, at(100 + 2 * i));
        }
        assert_eq!(
            pace.wait_at(at(200)),
            wait,
            "at 12,000 records a second a batch waits"
        );
        // 4,000 a second: below half.
        for i in 1..=50 {
            pace.taken(8, at(200 + 2 * i));
        }
        assert_eq!(pace.wait_at(at(300)), Duration::ZERO);

        // A burst, then a second with nothing: the batch that opens after it does not wait.
        for i in 1..=50 {
            pace.taken(24, at(300 + 2 * i));
        }
        assert_eq!(pace.wait_at(at(400)), wait, "the burst's rate");
        assert_eq!(
            pace.wait_at(at(1_400)),
            Duration::ZERO,
            "after a quiet second, the first batch goes by the quiet's rate"
        );

        let mut always = BatchPace::new(wait, 0, t0);
        assert_eq!(always.wait_at(at(5_000)), wait, "0: always wait");
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
