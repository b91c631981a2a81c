//! Turning the client library's events into lines, shared by `listen` and interactive mode.

use chat_client::{Client, Event};
use serde_json::{json, Value};

use crate::failure::Failure;
use crate::output::{message_event, message_text, receipt_event};
use crate::session::continue_sync;

/// What one event shows: a line for people on stdout, a note on stderr, a JSON event.
#[derive(Default)]
pub struct Shown {
    pub text: Option<String>,
    pub note: Option<String>,
    pub event: Option<Value>,
}

/// Follows the connection's state across events.
pub struct Tracker {
    me: String,
    connections: u32,
}

impl Tracker {
    pub fn new(me: &str) -> Self {
        Self {
            me: me.to_owned(),
            connections: 0,
        }
    }

    /// What `event` shows; a failure ends the session (the user connected elsewhere).
    pub fn show(&mut self, client: &Client, event: &Event) -> Result<Shown, Failure> {
        let shown = match event {
            Event::Message(m) => Shown {
                text: Some(message_text(m, &self.me)),
                event: Some(message_event(m)),
                ..Shown::default()
            },
            Event::Stored(s) => Shown {
                event: Some(json!({
                    "event": "stored",
                    "to": s.peer,
                    "seq": s.seq,
                    "messageId": s.message_id,
                    "clientMessageId": s.client_message_id,
                    "conversation": s.conversation,
                })),
                ..Shown::default()
            },
            Event::Receipt(r) => Shown {
                event: Some(receipt_event(r)),
                ..Shown::default()
            },
            Event::Failed(f) => Shown {
                text: Some(format!(
                    "! message {} to {} failed: {} ({})",
                    f.client_message_id, f.peer, f.reason, f.code
                )),
                event: Some(json!({
                    "event": "failed",
                    "to": f.peer,
                    "messageId": f.message_id,
                    "clientMessageId": f.client_message_id,
                    "code": f.code,
                    "reason": f.reason,
                })),
                ..Shown::default()
            },
            Event::SyncDone { delivered } => {
                continue_sync(client, *delivered);
                Shown {
                    event: Some(json!({ "event": "synced", "pending": delivered })),
                    ..Shown::default()
                }
            }
            Event::Error { code, message } => Shown {
                note: Some(format!("server error: {code}: {message}")),
                event: Some(json!({ "event": "server_error", "code": code, "message": message })),
                ..Shown::default()
            },
            // The web client does the same: a newer session of this user wins, this one stops
            // (reconnecting would replace the newer one in turn, and so on).
            Event::Disconnected { code: 4001, .. } => return Err(Failure::Replaced),
            Event::Disconnected { code, reason } => Shown {
                note: Some(format!(
                    "connection lost ({code}{}); reconnecting...",
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                )),
                event: Some(json!({ "event": "disconnected", "code": code, "reason": reason })),
                ..Shown::default()
            },
            Event::Connected { gateway_id } => {
                self.connections += 1;
                let verb = if self.connections == 1 {
                    "connected"
                } else {
                    "reconnected"
                };
                Shown {
                    note: Some(format!("{verb} to {gateway_id} as {}", self.me)),
                    event: Some(json!({
                        "event": verb,
                        "user": self.me,
                        "gateway": gateway_id,
                    })),
                    ..Shown::default()
                }
            }
        };
        Ok(shown)
    }
}
