//! What the commands print: text for people, or with `--json` one JSON object per line.
//!
//! Results go to stdout; notes (connection changes) and errors go to stderr. With `--json` every
//! stdout line is an object with an `"event"` field, and an error is `{"event":"error",...}` on
//! stderr.

use std::io::Write as _;

use chat_proto::v1::{Accepted, ChatMessage, Receipt};
use serde_json::{json, Value};

use crate::failure::Failure;

#[derive(Clone, Copy, Debug)]
pub struct Out {
    pub json: bool,
}

/// Writes a line to stdout; if stdout is gone (a closed pipe) there is nobody left to tell, so
/// the process ends quietly like other filters do.
pub fn stdout_line(s: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{s}").and_then(|()| out.flush()).is_err() {
        std::process::exit(141);
    }
}

/// Writes text to stdout without a newline (a prompt).
pub fn stdout_raw(s: &str) {
    let mut out = std::io::stdout().lock();
    if write!(out, "{s}").and_then(|()| out.flush()).is_err() {
        std::process::exit(141);
    }
}

fn stderr_line(s: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{s}");
}

/// A JSON object on one line with `"event"` first (the other keys follow in name order).
pub fn json_line(v: &Value) -> String {
    match v {
        Value::Object(map) if map.contains_key("event") => {
            let mut s = format!("{{\"event\":{}", map["event"]);
            for (k, v) in map.iter().filter(|(k, _)| *k != "event") {
                s.push(',');
                s.push_str(&Value::String(k.clone()).to_string());
                s.push(':');
                s.push_str(&v.to_string());
            }
            s.push('}');
            s
        }
        other => other.to_string(),
    }
}

impl Out {
    /// A result: `text` for people, `event` with `--json`.
    pub fn emit(&self, text: &str, event: Value) {
        if self.json {
            stdout_line(&json_line(&event));
        } else {
            stdout_line(text);
        }
    }

    /// Only with `--json` (events a person does not need to see).
    pub fn event(&self, event: Value) {
        if self.json {
            stdout_line(&json_line(&event));
        }
    }

    /// A note for people, on stderr; nothing with `--json`.
    pub fn note(&self, text: &str) {
        if !self.json {
            stderr_line(text);
        }
    }

    /// An error, on stderr.
    pub fn error(&self, f: &Failure) {
        if self.json {
            stderr_line(&json_line(
                &json!({ "event": "error", "code": f.code(), "message": f.message() }),
            ));
        } else {
            stderr_line(&format!("chat: {}", f.message()));
        }
    }
}

/// `{"event":"message",...}` for a delivered or listed message.
pub fn message_event(m: &ChatMessage) -> Value {
    json!({
        "event": "message",
        "from": m.sender,
        "to": m.recipient,
        "seq": m.seq,
        "body": m.body,
        "messageId": m.message_id,
        "clientMessageId": m.client_message_id,
        "sentAtMs": m.sent_at_ms,
        "conversation": m.conversation,
    })
}

fn body_text(m: &ChatMessage) -> &str {
    if m.body.is_empty() {
        "(erased)"
    } else {
        &m.body
    }
}

/// A message as it arrives: `alice: hi` (or `you -> bob: hi` for a copy of one's own).
pub fn message_text(m: &ChatMessage, me: &str) -> String {
    if m.sender == me {
        format!("you -> {}: {}", m.recipient, body_text(m))
    } else {
        format!("{}: {}", m.sender, body_text(m))
    }
}

/// A message in a history listing: `#3 alice: hi`.
pub fn history_text(m: &ChatMessage) -> String {
    format!("#{} {}: {}", m.seq, m.sender, body_text(m))
}

pub fn accepted_event(to: &str, a: &Accepted) -> Value {
    json!({
        "event": "accepted",
        "to": to,
        "messageId": a.message_id,
        "clientMessageId": a.client_message_id,
        "sentAtMs": a.sent_at_ms,
        "conversation": a.conversation,
    })
}

pub fn receipt_event(r: &Receipt) -> Value {
    json!({
        "event": "receipt",
        "peer": r.peer,
        "conversation": r.conversation,
        "upToSeq": r.up_to_seq,
        "ackedAtMs": r.acked_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_comes_first() {
        let v = json!({ "body": "hi \"x\"", "event": "message", "seq": 3 });
        let line = json_line(&v);
        assert_eq!(line, r#"{"event":"message","body":"hi \"x\"","seq":3}"#);
        assert_eq!(serde_json::from_str::<Value>(&line).expect("valid JSON"), v);
    }
}
