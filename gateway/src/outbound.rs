//! Consumes this gateway's `outbound-<id>` topic and pushes each record to the socket of the
//! user it names: a single record (keyed by the user) or a batch (each item names its user). A
//! user not connected here is skipped: the message stays pending in its shard and reaches the
//! user by the sync of their next connection.

use std::sync::Arc;
use std::time::Duration;

use chat_proto::v1::{outbound_record, server_frame, OutboundRecord, ServerFrame};
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::sessions::Outgoing;

/// Runs until `shutdown`.
pub(crate) async fn run(app: Arc<App>, consumer: StreamConsumer, shutdown: CancellationToken) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "outbound consume failed");
                metrics::counter!("gateway_errors_total", "kind" => "consume").increment(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(produced_ms) = msg.timestamp().to_millis() {
            // The record's timestamp (the multiplexer's clock at produce) to now.
            let waited_ms = chat_common::now_ms().saturating_sub(produced_ms).max(0);
            metrics::histogram!("gateway_outbound_wait_seconds").record(waited_ms as f64 / 1000.0);
        }
        let key = msg.key().and_then(|k| std::str::from_utf8(k).ok());
        match (msg.payload().map(OutboundRecord::decode), key) {
            (
                Some(Ok(OutboundRecord {
                    kind: Some(outbound_record::Kind::Batch(batch)),
                })),
                _,
            ) => {
                let mut items: Vec<(String, Option<outbound_record::Kind>)> = batch
                    .items
                    .into_iter()
                    .map(|item| (item.user, item.record.and_then(|r| r.kind)))
                    .collect();
                open_sealed(&app, &mut items).await;
                for (user, kind) in items {
                    push(&app, &user, kind);
                }
            }
            (Some(Ok(OutboundRecord { kind: Some(kind) })), Some(user)) => {
                let mut items = vec![(user.to_owned(), Some(kind))];
                open_sealed(&app, &mut items).await;
                for (user, kind) in items {
                    push(&app, &user, kind);
                }
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
        if let Err(e) = consumer.store_offset_from_message(&msg) {
            tracing::debug!(error = %e, "offset not stored");
        }
    }
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
}

/// Delete-on-ack mode: opens the sealed bodies of the delivers for users connected here (one
/// read of keys per shard for the whole record), and drops those with nothing left to deliver:
/// acknowledged or expired since (their key is gone), or whose key could not be read (the
/// shard did not answer: the message stays pending for the client's next sync). A deliver for a
/// user not connected here is left sealed: it is skipped anyway.
async fn open_sealed(app: &App, items: &mut Vec<(String, Option<outbound_record::Kind>)>) {
    if !app.seals() {
        return;
    }
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
    let opened = app.open_bodies(&mut messages).await;
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
