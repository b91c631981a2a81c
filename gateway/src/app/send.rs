//! Writes: a send, an ack and a presence change each become a record on Kafka, and each
//! answers only after Kafka's delivery report, so "accepted" means durable.

use chat_common::ids::{message_id, ClientMessageId, ConversationKey, UserId};
use chat_common::now_ms;
use chat_common::producer::DeliveryFuture;
use chat_proto::v1::{
    inbound_record, Accepted, AckRecord, ChatMessage, InboundRecord, PresenceRecord,
};
use governor::clock::Clock as _;
use prost::Message as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;

use super::App;
use crate::error::SendError;

/// A send that passed every check, with its record encoded.
pub(crate) struct PreparedSend {
    accepted: Accepted,
    payload: Vec<u8>,
    /// Delete-on-ack mode: the record, until [`App::seal`] seals its body and encodes it
    /// (`payload` is empty meanwhile).
    pub(super) to_seal: Option<Box<InboundRecord>>,
}

impl PreparedSend {
    /// Whether [`App::seal`] must run before the send is handed to the producer.
    pub(crate) fn needs_seal(&self) -> bool {
        self.to_seal.is_some()
    }

    /// Encodes the sealed record.
    pub(super) fn sealed(&mut self, record: &InboundRecord) {
        self.payload = record.encode_to_vec();
        self.to_seal = None;
    }
}

/// A send handed to the producer: its answer once Kafka's delivery report is in.
pub(crate) struct PendingSend {
    accepted: Accepted,
    delivery: DeliveryFuture,
    started: std::time::Instant,
}

impl PendingSend {
    /// The `Accepted` answer once the record is durable, or why it is not.
    pub(crate) async fn accepted(self) -> Result<Accepted, SendError> {
        let failed = |e: String| {
            metrics::counter!("gateway_errors_total", "kind" => "produce").increment(1);
            SendError::ProduceFailed(e)
        };
        match self.delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(failed(e.to_string())),
            Err(_) => return Err(failed("the producer was dropped".into())),
        }
        metrics::histogram!("gateway_produce_seconds").record(self.started.elapsed());
        metrics::counter!("gateway_messages_accepted_total").increment(1);
        tracing::debug!(conversation = %self.accepted.conversation, message_id = %self.accepted.message_id, "accepted");
        Ok(self.accepted)
    }
}

/// Why [`App::enqueue_send`] did not hand the record over.
pub(crate) enum Enqueue {
    /// The producer's queue is full: try again shortly, before any later send of this sender.
    QueueFull(PreparedSend),
    Failed(SendError),
}

impl App {
    /// Validates a send from `sender` and produces it to `inbound`; returns once Kafka acked.
    /// Concurrent calls reach Kafka in no particular order: a transport that must keep a
    /// sender's order (the websocket) enqueues with [`App::enqueue_send`] in frame order instead.
    pub(crate) async fn send(
        &self,
        sender: &UserId,
        client_message_id: &str,
        recipient: &str,
        body: String,
    ) -> Result<Accepted, SendError> {
        let mut prepared = self.prepare_send(sender, client_message_id, recipient, body)?;
        self.seal(&mut prepared).await?;
        let pending = match self.enqueue_send(prepared) {
            Ok(p) => p,
            Err(Enqueue::QueueFull(p)) => self.enqueue_waiting(p).await?,
            Err(Enqueue::Failed(e)) => return Err(e),
        };
        pending.accepted().await
    }

    /// Checks a send (rate, ids, body) and encodes its record; nothing is produced yet.
    pub(crate) fn prepare_send(
        &self,
        sender: &UserId,
        client_message_id: &str,
        recipient: &str,
        body: String,
    ) -> Result<PreparedSend, SendError> {
        if let Err(not_until) = self.user_limiter.check_key(&sender.to_string()) {
            metrics::counter!("gateway_rate_limited_total", "scope" => "user").increment(1);
            let retry_after = not_until.wait_time_from(self.user_limiter.clock().now());
            return Err(SendError::RateLimited { retry_after });
        }
        // A user named from now on: `.` and `..` could never be reached over REST.
        let recipient = UserId::parse_addressable(recipient)
            .map_err(|e| SendError::InvalidRecipient(e.to_string()))?;
        let client_id = ClientMessageId::parse(client_message_id)
            .map_err(|e| SendError::InvalidClientId(e.to_string()))?;
        let conversation = ConversationKey::of(sender, &recipient).ok_or(SendError::SelfMessage)?;
        chat_common::body::check(&body, self.config.max_body_bytes)?;
        let id = message_id(sender, &recipient, &client_id).to_string();
        let sent_at_ms = now_ms();
        let accepted = Accepted {
            client_message_id: client_id.as_str().to_owned(),
            message_id: id.clone(),
            sent_at_ms,
            conversation: conversation.to_string(),
        };
        let record = InboundRecord {
            kind: Some(inbound_record::Kind::Message(ChatMessage {
                message_id: id,
                client_message_id: client_id.as_str().to_owned(),
                sender: sender.to_string(),
                recipient: recipient.to_string(),
                body,
                sent_at_ms,
                seq: 0,
                conversation: conversation.to_string(),
                sealed_body: Vec::new(),
            })),
            gateway_id: self.config.gateway_id.to_string(),
        };
        if self.seals() {
            return Ok(PreparedSend {
                accepted,
                payload: Vec::new(),
                to_seal: Some(Box::new(record)),
            });
        }
        Ok(PreparedSend {
            accepted,
            payload: record.encode_to_vec(),
            to_seal: None,
        })
    }

    /// Hands a prepared send to the producer without waiting. Records handed over one after
    /// another reach their partition in that order (the producer is idempotent, so its retries
    /// keep the order), which is what keeps a sender's pipelined messages in order.
    pub(crate) fn enqueue_send(&self, send: PreparedSend) -> Result<PendingSend, Enqueue> {
        if send.needs_seal() {
            // A transport's bug: an unsealed body must never reach the log in delete-on-ack mode.
            tracing::error!("a send reached the producer unsealed; refused");
            return Err(Enqueue::Failed(SendError::SealFailed { shard: 0 }));
        }
        let topic = self.config.topics.inbound();
        let record = FutureRecord::to(&topic)
            .key(send.accepted.conversation.as_str())
            .payload(&send.payload);
        match self.producer.send_result(record) {
            Ok(delivery) => Ok(PendingSend {
                accepted: send.accepted,
                delivery,
                started: std::time::Instant::now(),
            }),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(Enqueue::QueueFull(send))
            }
            Err((e, _)) => {
                metrics::counter!("gateway_errors_total", "kind" => "produce").increment(1);
                Err(Enqueue::Failed(SendError::ProduceFailed(e.to_string())))
            }
        }
    }

    /// [`App::enqueue_send`], waiting for room in a full producer queue for up to the produce
    /// timeout. The caller holds back its later sends meanwhile, so the order is kept.
    pub(crate) async fn enqueue_waiting(
        &self,
        mut send: PreparedSend,
    ) -> Result<PendingSend, SendError> {
        let deadline = tokio::time::Instant::now() + self.config.kafka.produce_timeout;
        metrics::counter!("gateway_produce_queue_full_total").increment(1);
        loop {
            match self.enqueue_send(send) {
                Ok(p) => return Ok(p),
                Err(Enqueue::Failed(e)) => return Err(e),
                Err(Enqueue::QueueFull(p)) => send = p,
            }
            if tokio::time::Instant::now() >= deadline {
                metrics::counter!("gateway_errors_total", "kind" => "produce").increment(1);
                return Err(SendError::ProduceFailed(
                    "the producer queue stayed full".into(),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// `user` acknowledges every message sent to them by `peer` up to `up_to_seq`.
    pub(crate) async fn ack(
        &self,
        user: &UserId,
        peer: &str,
        up_to_seq: u64,
    ) -> Result<(), SendError> {
        let peer = UserId::parse(peer).map_err(|e| SendError::InvalidRecipient(e.to_string()))?;
        let conversation = ConversationKey::of(user, &peer).ok_or(SendError::SelfMessage)?;
        let record = InboundRecord {
            kind: Some(inbound_record::Kind::Ack(AckRecord {
                user: user.to_string(),
                peer: peer.to_string(),
                conversation: conversation.to_string(),
                up_to_seq,
                acked_at_ms: now_ms(),
            })),
            gateway_id: self.config.gateway_id.to_string(),
        };
        self.produce(
            &self.config.topics.inbound(),
            conversation.as_str(),
            &record.encode_to_vec(),
        )
        .await
    }

    /// Publishes that `user`'s session with `epoch` is on (or off) this gateway.
    pub(super) async fn publish_presence(
        &self,
        user: &UserId,
        epoch: u64,
        online: bool,
    ) -> Result<(), SendError> {
        let record = PresenceRecord {
            user: user.to_string(),
            gateway_id: self.config.gateway_id.to_string(),
            epoch,
            online,
            at_ms: now_ms(),
        };
        self.produce(
            &self.config.topics.presence(),
            user.as_str(),
            &record.encode_to_vec(),
        )
        .await
    }

    async fn produce(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), SendError> {
        // The producer's message.timeout.ms bounds the wait; the queue timeout bounds how long
        // we wait for room in a full local queue.
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                self.config.kafka.produce_timeout,
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                metrics::counter!("gateway_errors_total", "kind" => "produce").increment(1);
                SendError::ProduceFailed(e.to_string())
            })
    }
}
