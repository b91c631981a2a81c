//! What the commands print: text for people, or with `--json` one JSON object per line.
//!
//! Results go to stdout; notes (connection changes) and errors go to stderr. With `--json` every
//! stdout line is an object with an `"event"` field, and an error is `{"event":"error",...}` on
//! stderr.

use std::io::Write as _;

use chat_client::ConversationSummary;
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

/// `{"event":"conversation",...}`: one conversation of the list, every field of the server's
/// summary (`preview` is null when the server has no body to show).
pub fn conversation_event(c: &ConversationSummary) -> Value {
    json!({
        "event": "conversation",
        "peer": c.peer,
        "conversation": c.conversation,
        "unread": c.unread,
        "lastSeq": c.last_seq,
        "lastActivityMs": c.last_activity_ms,
        "readUpTo": c.read_up_to,
        "peerReadUpTo": c.peer_read_up_to,
        "preview": c.preview,
    })
}

/// Longest preview shown in the text listing, in characters.
const PREVIEW_CHARS: usize = 60;

/// The conversation list for people: a header, then one aligned row per conversation,
/// `PEER  UNREAD  LAST ACTIVITY  LAST MESSAGE`.
pub fn conversation_rows(list: &[ConversationSummary]) -> Vec<String> {
    if list.is_empty() {
        return Vec::new();
    }
    let width = list.iter().map(|c| c.peer.len()).max().unwrap_or(0).max(4);
    let row = |peer: &str, unread: &str, when: &str, last: &str| {
        format!("{peer:<width$}  {unread:>6}  {when:<20}  {last}")
            .trim_end()
            .to_owned()
    };
    let mut rows = vec![row("PEER", "UNREAD", "LAST ACTIVITY", "LAST MESSAGE")];
    for c in list {
        let last = c.preview.as_ref().map(|p| {
            let who = if p.sender == c.peer { &p.sender } else { "you" };
            format!("{who}: {}", one_line(&p.body, PREVIEW_CHARS))
        });
        rows.push(row(
            &c.peer,
            &c.unread.to_string(),
            &utc_minute(c.last_activity_ms),
            last.as_deref().unwrap_or(""),
        ));
    }
    rows
}

/// `body` on one line (control characters, newlines included, become spaces), cut to `max`
/// characters with an ellipsis.
fn one_line(body: &str, max: usize) -> String {
    let flat: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM UTC` (the CLI knows no time zone).
pub fn utc_minute(ms: i64) -> String {
    let minutes = ms.div_euclid(60_000);
    let (days, minute_of_day) = (minutes.div_euclid(1440), minutes.rem_euclid(1440));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        minute_of_day / 60,
        minute_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_client::Preview;

    fn summary(peer: &str, unread: u64, preview: Option<(&str, &str)>) -> ConversationSummary {
        ConversationSummary {
            peer: peer.to_owned(),
            conversation: format!("alice:{peer}"),
            last_seq: 12,
            last_activity_ms: 1_764_550_000_000,
            unread,
            read_up_to: 9,
            peer_read_up_to: 10,
            preview: preview.map(|(sender, body)| Preview {
                sender: sender.to_owned(),
                body: body.to_owned(),
                seq: 12,
            }),
        }
    }

    #[test]
    fn times_print_as_utc_minutes() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_minute(1_764_550_000_000), "2025-12-01 00:46 UTC");
        assert_eq!(utc_minute(951_782_400_000), "2000-02-29 00:00 UTC");
        assert_eq!(utc_minute(-60_000), "1969-12-31 23:59 UTC");
        assert_eq!(utc_minute(4_102_444_799_999), "2099-12-31 23:59 UTC");
    }

    #[test]
    fn the_conversation_list_lines_up_and_says_who_wrote_last() {
        let rows = conversation_rows(&[
            summary("bob", 3, Some(("bob", "hi\nthere"))),
            summary("carolina", 0, Some(("alice", "see you"))),
            summary("dan", 0, None),
        ]);
        assert_eq!(
            rows,
            [
                "PEER      UNREAD  LAST ACTIVITY         LAST MESSAGE",
                "bob            3  2025-12-01 00:46 UTC  bob: hi there",
                "carolina       0  2025-12-01 00:46 UTC  you: see you",
                "dan            0  2025-12-01 00:46 UTC",
            ]
        );
        assert!(conversation_rows(&[]).is_empty());
        let long = "x".repeat(100);
        let rows = conversation_rows(&[summary("bob", 0, Some(("bob", &long)))]);
        assert!(rows[1].ends_with(&format!("bob: {}…", "x".repeat(PREVIEW_CHARS - 1))));
    }

    #[test]
    fn a_conversation_event_carries_the_whole_summary() {
        let v = conversation_event(&summary("bob", 3, Some(("bob", "hi"))));
        assert_eq!(
            json_line(&v),
            r#"{"event":"conversation","conversation":"alice:bob","lastActivityMs":1764550000000,"lastSeq":12,"peer":"bob","peerReadUpTo":10,"preview":{"body":"hi","sender":"bob","seq":12},"readUpTo":9,"unread":3}"#
        );
        let v = conversation_event(&summary("dan", 0, None));
        assert_eq!(v["preview"], Value::Null);
    }

    #[test]
    fn event_comes_first() {
        let v = json!({ "body": "hi \"x\"", "event": "message", "seq": 3 });
        let line = json_line(&v);
        assert_eq!(line, r#"{"event":"message","body":"hi \"x\"","seq":3}"#);
        assert_eq!(serde_json::from_str::<Value>(&line).expect("valid JSON"), v);
    }
}
