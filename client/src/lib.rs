//! A Rust client for the chat gateway, used by the tests (and by the CLI and load generator).
//!
//! [`Client::connect`] opens a websocket with a token; [`Client::send`] returns once the server
//! answered "accepted" (the message is durable in Kafka); [`Client::next_event`] yields messages,
//! receipts and sync boundaries. Messages are deduplicated by message id, so the caller sees
//! each message once even when the server delivers it again (at-least-once push). The client
//! remembers the last sequence it holds per conversation, for resuming with [`Client::sync`].
//!
//! [`Rest`] wraps the REST API (`PUT`/`GET /messages/{user_id}`, dev tokens).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_proto::v1::{
    client_frame, server_frame, Accepted, Ack, ChatMessage, ClientFrame, Receipt, Send,
    ServerFrame, Sync,
};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{self, Message};

/// Errors a client call can end with.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("the server refused the token (HTTP 401)")]
    Unauthorized,
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: Box<tungstenite::Error>,
    },
    #[error("the server refused the request: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("the connection is closed")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("http: {0}")]
    Http(String),
}

/// Something the server sent.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A message (each message id at most once per client).
    Message(ChatMessage),
    /// The peer acknowledged messages this user sent.
    Receipt(Receipt),
    /// Everything pending was delivered; live messages follow.
    SyncDone { delivered: u64 },
    /// An error not tied to a send.
    Error { code: String, message: String },
    /// The server closed the connection.
    Closed { code: u16, reason: String },
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<Accepted, ClientError>>>>>;

/// A connected client.
pub struct Client {
    user: String,
    gateway_id: String,
    out: mpsc::Sender<Message>,
    events: mpsc::Receiver<Event>,
    pending: Pending,
    last_seq: Arc<Mutex<HashMap<String, u64>>>,
    json: bool,
}

impl Client {
    /// Connects to `base` (for example `ws://127.0.0.1:8080`) with `token`, using binary protobuf
    /// frames. Returns after the server's welcome.
    pub async fn connect(base: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(base, token, false).await
    }

    /// Like [`Client::connect`]; `json` selects text frames with the proto3 JSON mapping.
    pub async fn connect_with(base: &str, token: &str, json: bool) -> Result<Self, ClientError> {
        let format = if json { "json" } else { "binary" };
        let url = format!(
            "{}/ws?format={format}&access_token={token}",
            base.trim_end_matches('/')
        );
        let (socket, _) = match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok(s) => s,
            Err(tungstenite::Error::Http(resp)) if resp.status() == 401 => {
                return Err(ClientError::Unauthorized)
            }
            Err(e) => {
                return Err(ClientError::Connect {
                    url: base.to_owned(),
                    source: Box::new(e),
                })
            }
        };
        let (mut sink, mut stream) = socket.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Message>(1024);
        let (ev_tx, ev_rx) = mpsc::channel::<Event>(65_536);
        let pending: Pending = Arc::default();
        let last_seq: Arc<Mutex<HashMap<String, u64>>> = Arc::default();

        // The first frame is the welcome.
        let welcome = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(m))) => match decode(&m) {
                    Some(ServerFrame {
                        kind: Some(server_frame::Kind::Welcome(w)),
                    }) => break w,
                    _ if m.is_close() => return Err(ClientError::Closed),
                    _ => continue,
                },
                Ok(_) => return Err(ClientError::Closed),
                Err(_) => return Err(ClientError::Timeout(Duration::from_secs(10))),
            }
        };

        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let (p, ls) = (pending.clone(), last_seq.clone());
        tokio::spawn(async move {
            let mut seen: HashSet<String> = HashSet::new();
            while let Some(m) = stream.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(_) => break,
                };
                if let Message::Close(frame) = &m {
                    let (code, reason) = frame
                        .as_ref()
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    let _ = ev_tx.send(Event::Closed { code, reason }).await;
                    break;
                }
                let Some(frame) = decode(&m) else { continue };
                let event = match frame.kind {
                    Some(server_frame::Kind::Accepted(a)) => {
                        let waiter = lock(&p).remove(&a.client_message_id);
                        if let Some(w) = waiter {
                            let _ = w.send(Ok(a));
                        }
                        continue;
                    }
                    Some(server_frame::Kind::Error(e)) => {
                        let waiter = (!e.client_message_id.is_empty())
                            .then(|| lock(&p).remove(&e.client_message_id))
                            .flatten();
                        match waiter {
                            Some(w) => {
                                let _ = w.send(Err(ClientError::Refused {
                                    code: e.code,
                                    message: e.message,
                                }));
                                continue;
                            }
                            None => Event::Error {
                                code: e.code,
                                message: e.message,
                            },
                        }
                    }
                    Some(server_frame::Kind::Deliver(d)) => {
                        let Some(msg) = d.message else { continue };
                        if !seen.insert(msg.message_id.clone()) {
                            continue;
                        }
                        let mut ls = lock(&ls);
                        let e = ls.entry(msg.conversation.clone()).or_insert(0);
                        *e = (*e).max(msg.seq);
                        drop(ls);
                        Event::Message(msg)
                    }
                    Some(server_frame::Kind::Receipt(r)) => Event::Receipt(r),
                    Some(server_frame::Kind::SyncDone(s)) => Event::SyncDone {
                        delivered: s.delivered,
                    },
                    Some(server_frame::Kind::Welcome(_)) | None => continue,
                };
                if ev_tx.send(event).await.is_err() {
                    break;
                }
            }
            // Fail whoever still waits for an answer.
            for (_, w) in lock(&p).drain() {
                let _ = w.send(Err(ClientError::Closed));
            }
        });
        Ok(Self {
            user: welcome.user,
            gateway_id: welcome.gateway_id,
            out: out_tx,
            events: ev_rx,
            pending,
            last_seq,
            json,
        })
    }

    /// The user the server authenticated.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The gateway holding this connection.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// The last sequence held per conversation (for resuming after a reconnect).
    pub fn last_seq(&self) -> HashMap<String, u64> {
        lock(&self.last_seq).clone()
    }

    /// Sends `body` to `to` with a fresh client message id; returns the server's acceptance.
    pub async fn send(&self, to: &str, body: &str) -> Result<Accepted, ClientError> {
        self.send_with_id(&uuid::Uuid::new_v4().to_string(), to, body)
            .await
    }

    /// Sends with a chosen client message id (a retry with the same id is idempotent).
    pub async fn send_with_id(
        &self,
        client_message_id: &str,
        to: &str,
        body: &str,
    ) -> Result<Accepted, ClientError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(client_message_id.to_owned(), tx);
        self.frame(client_frame::Kind::Send(Send {
            client_message_id: client_message_id.to_owned(),
            recipient: to.to_owned(),
            body: body.to_owned(),
        }))
        .await?;
        let timeout = Duration::from_secs(30);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                lock(&self.pending).remove(client_message_id);
                Err(ClientError::Timeout(timeout))
            }
        }
    }

    /// Acknowledges everything from `peer` up to `up_to_seq`.
    pub async fn ack(&self, peer: &str, up_to_seq: u64) -> Result<(), ClientError> {
        self.frame(client_frame::Kind::Ack(Ack {
            peer: peer.to_owned(),
            up_to_seq,
        }))
        .await
    }

    /// Asks for what is pending after the given last sequences (by peer user id).
    pub async fn sync(&self, last_seq_by_peer: HashMap<String, u64>) -> Result<(), ClientError> {
        self.frame(client_frame::Kind::Sync(Sync {
            last_seq: last_seq_by_peer,
        }))
        .await
    }

    /// Sends a raw frame (tests use it for malformed input).
    pub async fn raw(&self, message: Message) -> Result<(), ClientError> {
        self.out
            .send(message)
            .await
            .map_err(|_| ClientError::Closed)
    }

    async fn frame(&self, kind: client_frame::Kind) -> Result<(), ClientError> {
        let frame = ClientFrame { kind: Some(kind) };
        let m = if self.json {
            Message::text(
                serde_json::to_string(&frame).map_err(|e| ClientError::Http(e.to_string()))?,
            )
        } else {
            Message::binary(frame.encode_to_vec())
        };
        self.raw(m).await
    }

    /// The next event, or `None` once the connection is gone and every event was read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event within `timeout`.
    pub async fn next_event_within(&mut self, timeout: Duration) -> Result<Event, ClientError> {
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    /// The next message within `timeout`, skipping other events.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<ChatMessage, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event_within(left).await? {
                Event::Message(m) => return Ok(m),
                Event::Closed { .. } => return Err(ClientError::Closed),
                _ => continue,
            }
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.out.send(Message::Close(None)).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn decode(m: &Message) -> Option<ServerFrame> {
    match m {
        Message::Binary(b) => ServerFrame::decode(b.as_slice()).ok(),
        Message::Text(t) => serde_json::from_str(t).ok(),
        _ => None,
    }
}

/// The REST API, over plain HTTP (blocking calls run on a blocking thread).
#[derive(Clone, Debug)]
pub struct Rest {
    base: String,
}

/// A REST answer: status and JSON body.
#[derive(Debug)]
pub struct RestResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Rest {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// Performs a request; any HTTP status comes back as a response, not an error.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<RestResponse, ClientError> {
        let url = format!("{}{}", self.base, path);
        let (method, token) = (method.to_owned(), token.map(str::to_owned));
        tokio::task::spawn_blocking(move || {
            let mut req = ureq::request(&method, &url).timeout(Duration::from_secs(30));
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let result = match body {
                Some(b) => req
                    .set("Content-Type", "application/json")
                    .send_string(&b.to_string()),
                None => req.call(),
            };
            let resp = match result {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => return Err(ClientError::Http(e.to_string())),
            };
            let status = resp.status();
            let text = resp
                .into_string()
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            Ok(RestResponse { status, body })
        })
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
    }

    /// A dev token for `user` (local stack only).
    pub async fn dev_token(&self, user: &str) -> Result<String, ClientError> {
        let r = self
            .request("GET", &format!("/dev/token/{user}"), None, None)
            .await?;
        r.body["token"].as_str().map(str::to_owned).ok_or_else(|| {
            ClientError::Http(format!("no token in answer ({}): {}", r.status, r.body))
        })
    }
}
