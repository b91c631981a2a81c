//! The server address, the saved token, and the calls every command makes: REST requests and
//! the websocket connection (both from the client library).

use std::sync::OnceLock;

use chat_client::{Client, ConversationsPage, Rest, Tls};
use chat_proto::v1::{Accepted, ChatMessage};
use serde_json::json;

use crate::config::{self, Config};
use crate::failure::Failure;

/// Most messages one sync answer carries (the gateway's limit); a full answer means "sync again".
const SYNC_LIMIT: u64 = 10_000;

/// A gateway address: the `http(s)://` base the user gave and the `ws(s)://` base derived from
/// it, and the CAs trusted for it.
#[derive(Clone, Debug)]
pub struct Server {
    pub http: String,
    pub ws: String,
    pub tls: Tls,
    /// The CA file `tls` trusts beyond the default roots, saved with the login.
    pub ca_file: Option<String>,
}

/// `--ca-file` (or `CHAT_CA_FILE`), set once by `main`: it wins over the saved login's.
static CA_FILE: OnceLock<Option<String>> = OnceLock::new();

/// Records the `--ca-file` of this run.
pub fn set_ca_file(path: Option<String>) {
    let _ = CA_FILE.set(path.filter(|p| !p.is_empty()));
}

impl Server {
    /// Accepts `http://host:port`, `https://host:port` (optionally with a path prefix), or a bare
    /// `host:port` (taken as http).
    pub fn parse(s: &str) -> Result<Self, Failure> {
        let s = s.trim();
        let with_scheme = if s.contains("://") {
            s.to_owned()
        } else {
            format!("http://{s}")
        };
        let bad = |why: &str| Failure::Usage(format!("bad server address {s:?}: {why}"));
        let url = url::Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
        let ws_scheme = match url.scheme() {
            "http" => "ws",
            "https" => "wss",
            other => return Err(bad(&format!("use http:// or https://, not {other}://"))),
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("no query or fragment, please"));
        }
        let http = url.as_str().trim_end_matches('/').to_owned();
        let rest = &http[url.scheme().len()..];
        Ok(Self {
            ws: format!("{ws_scheme}{rest}"),
            http,
            tls: Tls::default(),
            ca_file: None,
        })
    }

    /// Trusts the CAs of `--ca-file` when given, else of `saved` (the login's), besides the
    /// default roots.
    pub fn trusting(mut self, saved: Option<&str>) -> Result<Self, Failure> {
        let flag = CA_FILE.get().cloned().flatten();
        let Some(path) = flag.or(saved.map(str::to_owned)) else {
            return Ok(self);
        };
        self.tls = Tls::with_ca_file(&path).map_err(|e| Failure::from_client(e, &self.http))?;
        self.ca_file = Some(path);
        Ok(self)
    }
}

/// A token for a server (the user is whoever the token names).
#[derive(Clone)]
pub struct Session {
    pub server: Server,
    pub token: String,
    pub rest: Rest,
}

impl Session {
    pub fn new(server: Server, token: String) -> Self {
        let rest = Rest::with_tls(&server.http, &server.tls);
        Self {
            server,
            token,
            rest,
        }
    }

    /// The saved login, with the server replaced by `--server` when given.
    pub fn load(server_override: Option<&str>) -> Result<Self, Failure> {
        let path = config::path()?;
        let Config {
            server,
            token,
            ca_file,
            ..
        } = config::load(&path)?;
        let server =
            Server::parse(server_override.unwrap_or(&server))?.trusting(ca_file.as_deref())?;
        Ok(Self::new(server, token))
    }

    pub fn failure(&self, e: chat_client::ClientError) -> Failure {
        Failure::from_client(e, &self.server.http)
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, Failure> {
        let r = self
            .rest
            .request(method, path, Some(&self.token), body)
            .await
            .map_err(|e| self.failure(e))?;
        if (200..300).contains(&r.status) {
            Ok(r.body)
        } else {
            Err(Failure::from_rest(&r, &self.server.http))
        }
    }

    /// `PUT /messages/{to}`: returns once the message is durable in Kafka.
    /// The same `client_message_id` again returns the original message (also one sent over the
    /// websocket).
    pub async fn send_rest(
        &self,
        client_message_id: &str,
        to: &str,
        body: &str,
    ) -> Result<Accepted, Failure> {
        let answer = self
            .request(
                "PUT",
                &format!("/messages/{}", segment(to, "invalid_recipient")?),
                Some(json!({ "body": body, "clientMessageId": client_message_id })),
            )
            .await?;
        serde_json::from_value(answer.clone())
            .map_err(|e| Failure::other(format!("unexpected answer to a send ({e}): {answer}")))
    }

    /// `GET /messages/{peer}`: a page of history, oldest first, and the `before` of the
    /// previous page.
    pub async fn history(
        &self,
        peer: &str,
        limit: Option<u32>,
        before: Option<u64>,
    ) -> Result<(Vec<ChatMessage>, Option<u64>), Failure> {
        let mut query = Vec::new();
        if let Some(l) = limit {
            query.push(format!("limit={l}"));
        }
        if let Some(b) = before {
            query.push(format!("before={b}"));
        }
        let mut path = format!("/messages/{}", segment(peer, "invalid_user")?);
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        let answer = self.request("GET", &path, None).await?;
        let messages = serde_json::from_value(answer["messages"].clone())
            .map_err(|e| Failure::other(format!("unexpected history answer ({e}): {answer}")))?;
        Ok((messages, answer["nextBefore"].as_u64()))
    }

    /// `GET /conversations`: a page of the user's conversations, newest activity first.
    pub async fn conversations(
        &self,
        limit: Option<u32>,
        before: Option<&str>,
    ) -> Result<ConversationsPage, Failure> {
        self.rest
            .conversations(&self.token, limit, before)
            .await
            .map_err(|e| self.failure(e))
    }

    /// `GET /me`: the user the token names.
    pub async fn whoami(&self) -> Result<String, Failure> {
        let answer = self.request("GET", "/me", None).await?;
        answer["user"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Failure::other(format!("unexpected answer to /me: {answer}")))
    }
}

/// `GET /dev/token/{user}` (local stack only).
pub async fn dev_token(server: &Server, user: &str) -> Result<String, Failure> {
    // Not `Rest::dev_token`: its error drops the status and the server's code.
    let path = format!("/dev/token/{}", segment(user, "invalid_user")?);
    let r = Rest::with_tls(&server.http, &server.tls)
        .request("GET", &path, None, None)
        .await
        .map_err(|e| Failure::from_client(e, &server.http))?;
    match (r.status, r.body["token"].as_str()) {
        (200, Some(token)) => Ok(token.to_owned()),
        (404, _) if r.body["code"] == "not_found" => Err(Failure::Refused {
            code: "dev_tokens_disabled".to_owned(),
            message: format!(
                "{} does not hand out dev tokens (DEV_TOKENS is off); pass --token or set CHAT_TOKEN",
                server.http
            ),
        }),
        _ => Err(Failure::from_rest(&r, &server.http)),
    }
}

/// A user id as a path segment, percent-encoded (user ids are plain ASCII; anything else is the
/// server's to refuse, not ours to mangle). "." and ".." are refused here with the code the
/// gateway refuses them with: every client resolves them away as path steps (`/messages/..` is
/// `/`, and so is `/messages/%2E%2E` to most), and the gateway decodes `%2E%2E` to `..`, so no
/// request can name such a user. Other all-dot ids (`...`) are ordinary segments and go as they
/// are.
pub fn segment(user: &str, code: &'static str) -> Result<String, Failure> {
    if matches!(user, "." | "..") {
        return Err(Failure::NotSent {
            code,
            message: "user id may not be '.' or '..': a URL cannot hold them as a path segment"
                .to_owned(),
        });
    }
    let mut out = String::with_capacity(user.len());
    for b in user.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

/// Asks for the rest of a sync answer that hit the gateway's limit.
pub fn continue_sync(client: &Client, delivered: u64) {
    if delivered < SYNC_LIMIT {
        return;
    }
    let me = client.user().to_owned();
    let last = client
        .last_seq()
        .into_iter()
        .filter_map(|(conversation, seq)| {
            let (a, b) = conversation.split_once(':')?;
            Some((if a == me { b } else { a }.to_owned(), seq))
        })
        .collect();
    let _ = client.sync(last);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        let s = Server::parse("http://127.0.0.1:8080").expect("valid");
        assert_eq!(
            (s.http.as_str(), s.ws.as_str()),
            ("http://127.0.0.1:8080", "ws://127.0.0.1:8080")
        );
        let s = Server::parse("https://chat.example.com/").expect("valid");
        assert_eq!(
            (s.http.as_str(), s.ws.as_str()),
            ("https://chat.example.com", "wss://chat.example.com")
        );
        let s = Server::parse("localhost:8081").expect("valid");
        assert_eq!(s.ws, "ws://localhost:8081");
        let s = Server::parse("https://example.com/chat/").expect("valid");
        assert_eq!(s.ws, "wss://example.com/chat");
        assert!(Server::parse("ftp://example.com").is_err());
        assert!(Server::parse("http://").is_err());
        assert!(Server::parse("http://h:1/?x=1").is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        let seg = |s: &str| segment(s, "invalid_user").expect("a segment");
        assert_eq!(seg("bob"), "bob");
        assert_eq!(seg("b b"), "b%20b");
        assert_eq!(seg("a/b"), "a%2Fb");
        assert_eq!(seg("a%2E"), "a%252E");
        assert_eq!(seg("a.b"), "a.b");
        assert_eq!(seg("a."), "a.");
        // Three dots and more are a user id like any other, and an ordinary path segment.
        assert_eq!(seg("..."), "...");
        assert_eq!(seg("...."), "....");
        for dots in [".", ".."] {
            match segment(dots, "invalid_recipient") {
                Err(Failure::NotSent { code, message }) => {
                    assert_eq!(code, "invalid_recipient");
                    assert!(message.contains("may not be '.' or '..'"), "{message}");
                }
                other => panic!("{dots:?}: {other:?}"),
            }
        }
    }
}
