//! The caller's conversation list (`GET /conversations`): every conversation the user is in,
//! newest activity first, with unread counts and a preview, a page at a time.
//!
//! Why a client needs it: the websocket's sync brings only what the user has not acknowledged.
//! A conversation read on another device (and never answered) brings nothing, so a new device
//! learns of it only from this list.

use serde::{Deserialize, Serialize};

use crate::{ClientError, Rest};

/// The most conversations one page holds (the server clamps larger limits to it).
pub const MAX_CONVERSATIONS_PAGE: u32 = 200;

/// One conversation of the caller, as the server summarises it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationSummary {
    /// The other user.
    pub peer: String,
    /// The conversation key (`alice:bob`).
    pub conversation: String,
    /// The conversation's last sequence, both directions counted.
    #[serde(default)]
    pub last_seq: u64,
    /// When its last message was sent (ms since the epoch).
    #[serde(default)]
    pub last_activity_ms: i64,
    /// Messages from the peer above the caller's acknowledgement, not expired.
    #[serde(default)]
    pub unread: u64,
    /// The caller's acknowledgement in this conversation (everything up to it is received).
    #[serde(default)]
    pub read_up_to: u64,
    /// The peer's acknowledgement of the caller's messages (what receipts said).
    #[serde(default)]
    pub peer_read_up_to: u64,
    /// The last message, when the server still holds its body (keep mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<Preview>,
}

/// The last message of a conversation, shortened to what a list shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    pub sender: String,
    pub body: String,
    #[serde(default)]
    pub seq: u64,
}

/// One page of the list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationsPage {
    /// Newest activity first.
    #[serde(default)]
    pub conversations: Vec<ConversationSummary>,
    /// The cursor of the next (older) page, to pass as `before`; `None` on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

/// The path and query of one page: `limit` when given, `before` encoded as a query value.
fn conversations_path(limit: Option<u32>, before: Option<&str>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if let Some(l) = limit {
        query.append_pair("limit", &l.to_string());
    }
    if let Some(b) = before {
        query.append_pair("before", b);
    }
    let query = query.finish();
    if query.is_empty() {
        "/conversations".to_owned()
    } else {
        format!("/conversations?{query}")
    }
}

/// A refusal's code and message: `{"code","message"}` (every REST refusal), or the same nested
/// under `"error"`.
fn refusal(body: &serde_json::Value) -> Option<(String, String)> {
    let fields = if body["code"].is_string() {
        body
    } else {
        &body["error"]
    };
    let code = fields["code"].as_str()?;
    let message = fields["message"].as_str().unwrap_or_default();
    Some((code.to_owned(), message.to_owned()))
}

impl Rest {
    /// `GET /conversations`: one page of the caller's conversations, newest activity first.
    ///
    /// `limit` is conversations per page (1 to [`MAX_CONVERSATIONS_PAGE`]; the server's default
    /// is 50); `before` is a previous page's [`ConversationsPage::next_before`]. To list them
    /// all, follow the cursor:
    ///
    /// ```no_run
    /// # async fn list(rest: &chat_client::Rest, token: &str) -> Result<(), chat_client::ClientError> {
    /// let mut before = None;
    /// loop {
    ///     let page = rest.conversations(token, Some(200), before.as_deref()).await?;
    ///     for c in &page.conversations {
    ///         println!("{}: {} unread", c.peer, c.unread);
    ///     }
    ///     match page.next_before {
    ///         Some(next) => before = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// Errors: [`ClientError::Unauthorized`] for a refused token, [`ClientError::Refused`] with
    /// the server's code (`bad_query` for a bad `limit` or `before`), [`ClientError::Http`] when
    /// the server cannot be reached or its answer is not a list.
    pub async fn conversations(
        &self,
        token: &str,
        limit: Option<u32>,
        before: Option<&str>,
    ) -> Result<ConversationsPage, ClientError> {
        let r = self
            .request("GET", &conversations_path(limit, before), Some(token), None)
            .await?;
        match r.status {
            200 => serde_json::from_value(r.body.clone()).map_err(|e| {
                ClientError::Http(format!("unexpected conversation list ({e}): {}", r.body))
            }),
            401 => Err(ClientError::Unauthorized),
            status => match refusal(&r.body) {
                Some((code, message)) => Err(ClientError::Refused { code, message }),
                None => Err(ClientError::Http(format!(
                    "unexpected answer (HTTP {status}): {}",
                    r.body
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_page_decodes_from_the_servers_json() {
        let page: ConversationsPage = serde_json::from_value(json!({
            "conversations": [
                {
                    "peer": "bob", "conversation": "alice:bob", "lastSeq": 12,
                    "lastActivityMs": 1764550000000i64, "unread": 3, "readUpTo": 9,
                    "peerReadUpTo": 10,
                    "preview": {"sender": "bob", "body": "hi", "seq": 12}
                },
                {
                    "peer": "carol", "conversation": "alice:carol", "lastSeq": 2,
                    "lastActivityMs": 1764540000000i64, "unread": 0, "readUpTo": 2,
                    "peerReadUpTo": 2
                }
            ],
            "nextBefore": "1764540000000.alice:carol"
        }))
        .expect("decodes");
        assert_eq!(page.conversations.len(), 2);
        let bob = &page.conversations[0];
        assert_eq!(
            (
                bob.last_seq,
                bob.unread,
                bob.read_up_to,
                bob.peer_read_up_to
            ),
            (12, 3, 9, 10)
        );
        assert_eq!(bob.last_activity_ms, 1_764_550_000_000);
        assert_eq!(
            bob.preview,
            Some(Preview {
                sender: "bob".into(),
                body: "hi".into(),
                seq: 12
            })
        );
        assert_eq!(page.conversations[1].preview, None, "no preview: absent");
        assert_eq!(
            page.next_before.as_deref(),
            Some("1764540000000.alice:carol")
        );

        let last: ConversationsPage =
            serde_json::from_value(json!({"conversations": []})).expect("decodes");
        assert_eq!(last, ConversationsPage::default());
    }

    #[test]
    fn the_cursor_is_encoded_in_the_query() {
        assert_eq!(conversations_path(None, None), "/conversations");
        assert_eq!(
            conversations_path(Some(20), None),
            "/conversations?limit=20"
        );
        assert_eq!(
            conversations_path(Some(5), Some("1764550000000.alice:bob")),
            "/conversations?limit=5&before=1764550000000.alice%3Abob"
        );
        assert_eq!(
            conversations_path(None, Some("a b&c")),
            "/conversations?before=a+b%26c"
        );
    }

    #[test]
    fn refusals_are_read_flat_or_nested() {
        let flat = json!({"code": "bad_query", "message": "limit: not a number"});
        assert_eq!(
            refusal(&flat),
            Some(("bad_query".into(), "limit: not a number".into()))
        );
        let nested = json!({"error": {"code": "bad_query", "message": "before"}});
        assert_eq!(
            refusal(&nested),
            Some(("bad_query".into(), "before".into()))
        );
        assert_eq!(refusal(&json!("Bad Gateway")), None);
    }
}
