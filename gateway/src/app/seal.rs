//! Delete-on-ack mode: the gateway seals each body before it enters `inbound`, under a key of its
//! own that the conversation's shard keeps (`db_writer::keys`), and opens what it pushes or a
//! read returns. Past the gateway, every copy of a body (the `inbound` and `outbound-*` records,
//! a dead letter, the shard's row) is sealed, and the recipient's ack or the expiry destroys the
//! key: no copy opens after that (docs/design.md, "Crypto-shredding").
//!
//! Keys are issued in batches, one worker per shard: a send waits for its shard's next
//! statement, which carries every send that arrived meanwhile, so the store's cost per key falls
//! as the rate rises, and a shard down delays only the sends of its conversations.

use std::time::Instant;

use chat_common::seal::BodyKey;
use chat_proto::v1::{inbound_record, ChatMessage};
use db_writer::keys::KeyId;
use db_writer::Shards;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{App, PreparedSend};
use crate::error::SendError;

/// Sends waiting for a key, per shard, before a new one waits for room (its connection reads no
/// further frame meanwhile).
const QUEUE: usize = 4096;
/// Most keys one statement issues.
const BATCH: usize = 512;

/// A send waiting for its key.
struct Request {
    id: KeyId,
    answer: oneshot::Sender<Option<BodyKey>>,
}

/// The per-shard workers that issue body keys.
pub(crate) struct KeyIssuer {
    lanes: Vec<mpsc::Sender<Request>>,
}

impl KeyIssuer {
    /// Starts one worker per shard of `shards` (in delete-on-ack mode only: keep mode has none).
    pub(crate) fn start(shards: &Shards) -> Self {
        let lanes = (0..shards.len())
            .map(|shard| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(issue(shards.clone(), shard, rx));
                tx
            })
            .collect();
        Self { lanes }
    }

    /// The key of `id`, from its shard (`None` when the shard did not answer).
    async fn key(&self, shard: usize, id: KeyId) -> Option<BodyKey> {
        let (answer, answered) = oneshot::channel();
        self.lanes
            .get(shard)?
            .send(Request { id, answer })
            .await
            .ok()?;
        answered.await.ok().flatten()
    }
}

/// A shard's worker: takes every request waiting (up to [`BATCH`]) and issues their keys in
/// one statement.
async fn issue(shards: Shards, shard: usize, mut requests: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(BATCH);
    while requests.recv_many(&mut batch, BATCH).await > 0 {
        let ids: Vec<KeyId> = batch.iter().map(|r| r.id.clone()).collect();
        let started = Instant::now();
        let issued = shards
            .issue_body_keys(shard, &ids, chat_common::now_ms())
            .await;
        metrics::histogram!("gateway_key_issue_seconds").record(started.elapsed());
        metrics::histogram!("gateway_key_issue_batch").record(ids.len() as f64);
        match issued {
            Ok(keys) => {
                for (request, key) in batch.drain(..).zip(keys) {
                    let _ = request.answer.send(Some(key));
                }
            }
            Err(e) => {
                tracing::warn!(shard, error = %e.summary(), sends = ids.len(), "body keys not issued: the sends are refused");
                metrics::counter!("gateway_errors_total", "kind" => "seal").increment(1);
                for request in batch.drain(..) {
                    let _ = request.answer.send(None);
                }
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
        let id = key_id(m).ok_or(SendError::SealFailed { shard: 0 })?;
        let shard = self.shards.locator().shard_of(&id.conversation);
        let started = Instant::now();
        let key = keys
            .key(shard, id)
            .await
            .ok_or(SendError::SealFailed { shard })?;
        let message_id =
            Uuid::parse_str(&m.message_id).map_err(|_| SendError::SealFailed { shard })?;
        m.sealed_body = key
            .seal(&message_id, &m.body)
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
        let mut opened = Opened::default();
        if messages.iter().all(|m| m.sealed_body.is_empty()) {
            return opened;
        }
        let ids: Vec<KeyId> = messages
            .iter()
            .filter(|m| !m.sealed_body.is_empty())
            .filter_map(key_id)
            .collect();
        let found = self.shards.body_keys(&ids).await;
        for (shard, e) in &found.failed {
            tracing::warn!(shard, error = %e.summary(), "body keys not read: that shard's messages are not shown");
            metrics::counter!("gateway_errors_total", "kind" => "open").increment(1);
        }
        let down: Vec<usize> = found.failed.iter().map(|(shard, _)| *shard).collect();
        for (i, m) in messages.iter_mut().enumerate() {
            if m.sealed_body.is_empty() {
                continue;
            }
            let sealed = std::mem::take(&mut m.sealed_body);
            let Some(id) = key_id(m) else {
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

/// What [`App::open_bodies`] could not open, by position.
#[derive(Debug, Default)]
pub(crate) struct Opened {
    /// The body is gone (its key destroyed), or did not open.
    pub(crate) gone: Vec<usize>,
    /// The shard of the message did not give its key.
    pub(crate) unavailable: Vec<usize>,
}

/// A wire message's send key, if its ids are valid.
fn key_id(m: &ChatMessage) -> Option<KeyId> {
    Some(KeyId {
        conversation: chat_common::ids::ConversationKey::parse(&m.conversation).ok()?,
        sender: chat_common::ids::UserId::parse(&m.sender).ok()?,
        client_id: chat_common::ids::ClientMessageId::parse(&m.client_message_id).ok()?,
    })
}
