//! Delete-on-ack mode: the gateway seals each body before it enters `inbound`, under a key of its
//! own that the conversation's shard keeps (`db_writer::keys`), and opens what it pushes or a
//! read returns. Past the gateway, every copy of a body (the `inbound` and `outbound-*` records,
//! a dead letter, the shard's row) is sealed, and the recipient's ack or the expiry destroys the
//! key: no copy opens after that (docs/design.md, "Crypto-shredding").
//!
//! Keys are issued ahead, in batches, one worker per shard: the shard's pool holds keys for the
//! sends to come, each under the id its sealed body will carry (`db_writer::keys`), so a send
//! takes a key without a round trip. The worker refills the pool when it runs low, with about
//! [`LEAD`]'s worth of keys at the rate they were taken, in one statement. A send that finds the
//! pool empty waits for the worker's next statement, which carries every send waiting; a shard
//! down delays only the sends of its conversations. A key is used once: a client's retry is
//! sealed under another one, and the store destroys the key of the copy it skips.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_common::seal::{BodyKey, BodyKeyId};
use chat_proto::v1::{inbound_record, ChatMessage};
use db_writer::keys::{KeyId, POOL_KEY_MAX_AGE_MS};
use db_writer::{DbError, ShardConfig, Shards};
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

use super::{App, PreparedSend};
use crate::error::SendError;

/// Sends waiting for a key, per shard, before a new one waits for room (its connection reads no
/// further frame meanwhile).
const QUEUE: usize = 4096;
/// Most sends one statement serves while they wait.
const BATCH: usize = 512;
/// How far ahead a pool is filled: the keys taken in this long at the rate of the last refill.
const LEAD: Duration = Duration::from_millis(250);
/// The fewest keys a pool is refilled to, and the most.
const POOL_MIN: usize = 16;
const POOL_MAX: usize = 2048;
/// After a refill failed, how long the pool waits before it refills ahead again (sends that
/// find it empty still ask the shard at once).
const BACKOFF: Duration = Duration::from_secs(1);
/// The age after which a key issued ahead is not used (`db_writer::keys::POOL_KEY_MAX_AGE_MS`).
const MAX_AGE: Duration = Duration::from_millis(POOL_KEY_MAX_AGE_MS as u64);

/// A key and its id, as a send takes it.
type Issued = (BodyKeyId, BodyKey);

/// A shard's keys issued ahead.
struct Pool {
    keys: VecDeque<(Issued, Instant)>,
    /// The size the worker refills the pool to; a take that leaves fewer than half of it asks
    /// for a refill.
    target: usize,
    /// Keys taken since the last refill began, and when it began.
    taken: usize,
    since: Instant,
    /// A refill is asked for or running.
    refilling: bool,
}

impl Pool {
    /// The first usable key, the stale ones before it dropped (their count is returned too).
    fn take(&mut self, now: Instant) -> (Option<Issued>, usize) {
        let mut stale = 0;
        while let Some((issued, at)) = self.keys.pop_front() {
            if now.duration_since(at) < MAX_AGE {
                self.taken += 1;
                return (Some(issued), stale);
            }
            stale += 1;
        }
        (None, stale)
    }

    /// Whether a refill should be asked for (and marks it asked).
    fn wants_refill(&mut self) -> bool {
        let low = self.keys.len() * 2 < self.target;
        let ask = low && !self.refilling;
        self.refilling |= ask;
        ask
    }

    /// Starts a refill: how many keys to issue for the pool, from the rate keys were taken at.
    fn start_refill(&mut self, now: Instant) -> usize {
        let elapsed = now.duration_since(self.since).as_secs_f64().max(0.001);
        let rate = self.taken as f64 / elapsed;
        self.target = ((rate * LEAD.as_secs_f64()) as usize).clamp(POOL_MIN, POOL_MAX);
        self.taken = 0;
        self.since = now;
        self.target.saturating_sub(self.keys.len())
    }
}

/// A shard's pool, and the way to its worker.
struct Lane {
    pool: Mutex<Pool>,
    /// Wakes the worker to refill the pool.
    low: Notify,
    /// Sends that found the pool empty.
    waiting: mpsc::Sender<oneshot::Sender<Option<Issued>>>,
}

/// The per-shard pools of keys issued ahead, and their workers.
pub(crate) struct KeyIssuer {
    lanes: Vec<Arc<Lane>>,
}

impl KeyIssuer {
    /// Starts one worker per shard of `shards` (in delete-on-ack mode only: keep mode has none).
    /// The pools fill at the first send.
    pub(crate) fn start(shards: &Shards) -> Self {
        let lanes = (0..shards.len())
            .map(|shard| {
                let (waiting, rx) = mpsc::channel(QUEUE);
                let lane = Arc::new(Lane {
                    pool: Mutex::new(Pool {
                        keys: VecDeque::new(),
                        target: POOL_MIN,
                        taken: 0,
                        since: Instant::now(),
                        refilling: false,
                    }),
                    low: Notify::new(),
                    waiting,
                });
                tokio::spawn(issue(shards.clone(), shard, lane.clone(), rx));
                lane
            })
            .collect();
        Self { lanes }
    }

    /// A key for a send to `shard`, and its id: from the pool, or from the shard's next
    /// statement when the pool is empty (`None` when the shard did not answer).
    async fn key(&self, shard: usize) -> Option<Issued> {
        let lane = self.lanes.get(shard)?;
        let (taken, refill) = {
            let mut pool = lane.pool.lock().unwrap_or_else(|e| e.into_inner());
            let (taken, stale) = pool.take(Instant::now());
            if stale > 0 {
                metrics::counter!("gateway_keys_unused_total").increment(stale as u64);
            }
            (taken, pool.wants_refill())
        };
        if refill {
            lane.low.notify_one();
        }
        if let Some(issued) = taken {
            return Some(issued);
        }
        metrics::counter!("gateway_key_waits_total").increment(1);
        let (answer, answered) = oneshot::channel();
        lane.waiting.send(answer).await.ok()?;
        answered.await.ok().flatten()
    }
}

/// A shard's worker: issues, in one statement, a key for every send waiting (up to [`BATCH`])
/// and the keys the pool is short of, answers the sends and keeps the rest in the pool.
async fn issue(
    shards: Shards,
    shard: usize,
    lane: Arc<Lane>,
    mut waiting: mpsc::Receiver<oneshot::Sender<Option<Issued>>>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failed_at: Option<Instant> = None;
    loop {
        tokio::select! {
            n = waiting.recv_many(&mut batch, BATCH) => if n == 0 { return },
            () = lane.low.notified() => {}
        }
        while batch.len() < BATCH {
            match waiting.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let ahead = match failed_at {
            Some(at) if now.duration_since(at) < BACKOFF => 0,
            _ => lane
                .pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .start_refill(now),
        };
        let n = batch.len() + ahead;
        if n == 0 {
            lane.pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refilling = false;
            continue;
        }
        let started = Instant::now();
        let issued = shards
            .issue_sealing_keys(shard, n, chat_common::now_ms())
            .await;
        metrics::histogram!("gateway_key_issue_seconds").record(started.elapsed());
        metrics::histogram!("gateway_key_issue_batch").record(n as f64);
        match issued {
            Ok(keys) => {
                failed_at = None;
                let mut keys = keys.into_iter();
                for (answer, key) in batch.drain(..).zip(keys.by_ref()) {
                    let _ = answer.send(Some(key));
                }
                let at = Instant::now();
                let mut pool = lane.pool.lock().unwrap_or_else(|e| e.into_inner());
                pool.keys.extend(keys.map(|k| (k, at)));
                pool.refilling = false;
            }
            Err(e) => {
                failed_at = Some(Instant::now());
                tracing::warn!(shard, error = %e.summary(), sends = batch.len(), "body keys not issued: the sends waiting are refused");
                metrics::counter!("gateway_errors_total", "kind" => "seal").increment(1);
                for answer in batch.drain(..) {
                    let _ = answer.send(None);
                }
                lane.pool
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .refilling = false;
            }
        }
    }
}

impl App {
    /// Whether bodies are sealed: delete-on-ack mode.
    pub(crate) fn seals(&self) -> bool {
        self.keys.is_some()
    }

    /// Seals a prepared send's body under its key, issued by the conversation's shard (nothing
    /// to do in keep mode). Refused when that shard does not answer: nothing is sent.
    pub(crate) async fn seal(&self, send: &mut PreparedSend) -> Result<(), SendError> {
        let (Some(keys), Some(mut record)) = (&self.keys, send.to_seal.take()) else {
            return Ok(());
        };
        let Some(inbound_record::Kind::Message(m)) = record.kind.as_mut() else {
            return Err(SendError::SealFailed { shard: 0 });
        };
        let conversation = chat_common::ids::ConversationKey::parse(&m.conversation)
            .map_err(|_| SendError::SealFailed { shard: 0 })?;
        let shard = self.shards.locator().shard_of(&conversation);
        let started = Instant::now();
        let (key_id, key) = keys
            .key(shard)
            .await
            .ok_or(SendError::SealFailed { shard })?;
        let message_id =
            Uuid::parse_str(&m.message_id).map_err(|_| SendError::SealFailed { shard })?;
        m.sealed_body = key
            .seal(&key_id, &message_id, &m.body)
            .map_err(|_| SendError::SealFailed { shard })?;
        m.body = String::new();
        send.sealed(&record);
        metrics::histogram!("gateway_seal_seconds").record(started.elapsed());
        Ok(())
    }

    /// Opens the sealed bodies of `messages` (delete-on-ack mode), reading their keys from their
    /// shards at once. A message whose key is gone (acknowledged or expired meanwhile) is left
    /// with an empty body and reported in [`Opened::gone`]: there is nothing left to deliver. A
    /// message whose shard did not give its key is left with an empty body too and reported in
    /// [`Opened::unavailable`]; the other shards' messages are opened.
    pub(crate) async fn open_bodies(&self, messages: &mut [ChatMessage]) -> Opened {
        self.open_bodies_with(&self.shards, messages).await
    }

    /// Pools of their own to the shards, of at most `pool_size` connections each, for the
    /// pushes' key reads ([`App::open_pushed`]). Their connections are driven by the runtime
    /// that first uses them.
    pub(crate) fn push_key_reader(&self, pool_size: usize) -> Result<PushKeyReader, DbError> {
        let config = ShardConfig {
            pool_size: self.config.shards.pool_size.min(pool_size),
            ..self.config.shards.clone()
        };
        Ok(PushKeyReader(Shards::connect(&config)?))
    }

    /// [`App::open_bodies`] for pushes, with the keys read through `reader`'s pools.
    pub(crate) async fn open_pushed(
        &self,
        reader: &PushKeyReader,
        messages: &mut [ChatMessage],
    ) -> Opened {
        self.open_bodies_with(&reader.0, messages).await
    }

    async fn open_bodies_with(&self, shards: &Shards, messages: &mut [ChatMessage]) -> Opened {
        let mut opened = Opened::default();
        if messages.iter().all(|m| m.sealed_body.is_empty()) {
            return opened;
        }
        let ids: Vec<KeyId> = messages
            .iter()
            .filter(|m| !m.sealed_body.is_empty())
            .filter_map(key_id)
            .collect();
        let found = shards.body_keys(&ids).await;
        for (shard, e) in &found.failed {
            tracing::warn!(shard, error = %e.summary(), "body keys not read: that shard's messages are not shown");
            metrics::counter!("gateway_errors_total", "kind" => "open").increment(1);
        }
        let down: Vec<usize> = found.failed.iter().map(|(shard, _)| *shard).collect();
        for (i, m) in messages.iter_mut().enumerate() {
            if m.sealed_body.is_empty() {
                continue;
            }
            let id = key_id(m);
            let sealed = std::mem::take(&mut m.sealed_body);
            let Some(id) = id else {
                opened.gone.push(i);
                continue;
            };
            if down.contains(&self.shards.locator().shard_of(&id.conversation)) {
                opened.unavailable.push(i);
                continue;
            }
            match open_one(&sealed, m, found.keys.get(&id)) {
                Some(body) => m.body = body,
                None => opened.gone.push(i),
            }
        }
        opened
    }
}

/// Opens one sealed body with its key, if the key still exists and opens it.
fn open_one(sealed: &[u8], m: &ChatMessage, key: Option<&BodyKey>) -> Option<String> {
    let key = key?;
    let id = Uuid::parse_str(&m.message_id).ok()?;
    match key.open(&id, sealed) {
        Ok(body) => Some(body),
        Err(e) => {
            tracing::warn!(conversation = %m.conversation, seq = m.seq, error = %e, "a sealed body does not open");
            metrics::counter!("gateway_errors_total", "kind" => "open").increment(1);
            None
        }
    }
}

/// Pools to the shards for the pushes' key reads alone ([`App::push_key_reader`]).
pub(crate) struct PushKeyReader(Shards);

/// What [`App::open_bodies`] could not open, by position.
#[derive(Debug, Default)]
pub(crate) struct Opened {
    /// The body is gone (its key destroyed), or did not open.
    pub(crate) gone: Vec<usize>,
    /// The shard of the message did not give its key.
    pub(crate) unavailable: Vec<usize>,
}

/// Where a wire message's key is, if its ids are valid: by the id its sealed body carries, or
/// under its send key (a body sealed before keys were issued ahead).
fn key_id(m: &ChatMessage) -> Option<KeyId> {
    Some(KeyId {
        conversation: chat_common::ids::ConversationKey::parse(&m.conversation).ok()?,
        sender: chat_common::ids::UserId::parse(&m.sender).ok()?,
        client_id: chat_common::ids::ClientMessageId::parse(&m.client_message_id).ok()?,
        key_id: BodyKeyId::of(&m.sealed_body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued() -> Issued {
        (
            BodyKeyId::generate().expect("id"),
            BodyKey::generate().expect("key"),
        )
    }

    #[test]
    fn a_pool_skips_stale_keys_asks_once_and_refills_to_the_rate() {
        let start = Instant::now();
        let mut pool = Pool {
            keys: VecDeque::new(),
            target: POOL_MIN,
            taken: 0,
            since: start,
            refilling: false,
        };
        // Empty: nothing to take, a refill asked for once while it runs.
        assert!(pool.take(start).0.is_none());
        assert!(pool.wants_refill());
        assert!(!pool.wants_refill());
        // 1,000 keys taken in the second before the refill: LEAD's worth at that rate.
        pool.taken = 1_000;
        let now = start + Duration::from_secs(1);
        let n = pool.start_refill(now);
        assert_eq!(n, 250);
        assert_eq!(pool.target, 250);
        pool.refilling = false;
        // Three keys issued long ago and two now: the stale ones are dropped, not used.
        let (old, fresh) = ([issued(), issued(), issued()], [issued(), issued()]);
        let later = now + MAX_AGE + Duration::from_millis(1);
        pool.keys.extend(old.iter().cloned().map(|k| (k, now)));
        pool.keys.extend(fresh.iter().cloned().map(|k| (k, later)));
        let (taken, stale) = pool.take(later);
        assert_eq!(taken.map(|k| k.0), Some(fresh[0].0));
        assert_eq!(stale, 3);
        assert_eq!(pool.taken, 1);
        // One key left, under half the target: a refill; a quiet pool refills to the minimum,
        // a busy one to at most the maximum.
        assert!(pool.wants_refill());
        assert_eq!(
            pool.start_refill(later + Duration::from_secs(60)),
            POOL_MIN - 1
        );
        pool.taken = 10_000_000;
        pool.start_refill(later + Duration::from_secs(61));
        assert_eq!(pool.target, POOL_MAX);
    }
}
