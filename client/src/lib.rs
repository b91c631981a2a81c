//! A Rust client for the chat gateway, used by the tests (and by the CLI and load generator).
//!
//! [`Client::connect`] opens a websocket with a token and keeps it open: when the connection
//! drops it reconnects with backoff (to the next of the given gateway URLs), resumes from the last
//! sequence it holds per conversation, and re-sends every send that was not answered yet with the
//! same client message id (so a retry never creates a second message). Messages are handed out
//! once each, in order per conversation: a message at or below the last sequence held for its
//! conversation is a repeat of at-least-once delivery and is dropped.
//!
//! Sends keep the order the application issued them in: they are written
//! pipelined, without waiting for each answer, up to [`Options::max_in_flight`] unanswered at a
//! time; the rest wait their turn. Unanswered sends are written again after a reconnect in their
//! original order, and a send refused for a reason that passes (`produce_failed`,
//! `too_many_in_flight`, `rate_limited`) is written again, same id, before any send issued after
//! it that was not written yet. Other refusals are final. The server keeps a connection's order
//! from there on, so a sender's messages get their seqs in the order they were issued. One case
//! no client can mend: a retried send lands after the sends that were already in flight behind
//! it when it was refused (which is why the in-flight bound stays below the gateway's
//! `MAX_IN_FLIGHT`, so `too_many_in_flight` does not happen).
//!
//! Reconnection waits follow a [`Backoff`]: each delay is drawn at random between a floor and a
//! ceiling that doubles per failed attempt, so clients a gateway dropped together do not all come
//! back together (a reconnect storm); the schedule starts over once a connection has held for
//! [`STABLE_CONNECTION`].
//!
//! Both speak TLS (`wss://`, `https://`) with the CAs of a [`Tls`] (Mozilla's roots, plus a
//! private CA's when given one).
//!
//! [`Rest`] wraps the REST API (`PUT`/`GET /messages/{user_id}`, dev tokens, and
//! [`Rest::conversations`], the user's conversation list with unread counts and previews).
//!
//! Modules: `backoff` (the reconnection schedule), `conversations` (the conversation list's
//! types and call), `tls` (the CAs trusted); the connection, its outbox and the rest of the REST wrapper are here.

mod backoff;
mod conversations;
mod tls;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

pub use backoff::Backoff;
pub use conversations::{ConversationSummary, ConversationsPage, Preview, MAX_CONVERSATIONS_PAGE};
pub use tls::Tls;

use chat_proto::v1::{
    client_frame, server_frame, Accepted, Ack, ChatMessage, ClientFrame, Failed, Receipt, Send,
    ServerFrame, Stored, Sync,
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
    /// The TLS handshake failed: most often a certificate the client does not trust.
    #[error("TLS with {url} failed: {reason}")]
    Tls { url: String, reason: String },
    /// A file of CAs to trust cannot be used.
    #[error("cannot trust the CAs of {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("the server refused the request: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("the client is closed")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("http: {0}")]
    Http(String),
}

/// Something the server sent, or a change of connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A message: each one once, in sequence order per conversation.
    Message(ChatMessage),
    /// One of this user's messages is stored, with its sequence.
    Stored(Stored),
    /// The peer acknowledged messages this user sent (delivered).
    Receipt(Receipt),
    /// One of this user's accepted messages can never be stored: it will not be delivered.
    Failed(Failed),
    /// The answer to a sync is complete; live messages follow.
    SyncDone { delivered: u64 },
    /// An error not tied to a send.
    Error { code: String, message: String },
    /// The connection closed; with reconnection on, a `Connected` follows when it is back.
    Disconnected { code: u16, reason: String },
    /// (Re)connected to a gateway.
    Connected { gateway_id: String },
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct Options {
    /// Gateway base URLs (`ws://host:port` or `wss://host:port`); reconnects move on to the
    /// next one.
    pub urls: Vec<String>,
    /// The CAs trusted for `wss://` URLs.
    pub tls: Tls,
    pub token: String,
    /// Text frames with the proto3 JSON mapping instead of binary protobuf.
    pub json: bool,
    /// Reconnect (and resume) when the connection drops.
    pub reconnect: bool,
    /// Ack each message as soon as it is handed out.
    pub auto_ack: bool,
    /// Last sequence already held per conversation key (from a previous run).
    pub resume_from: HashMap<String, u64>,
    /// Most sends written and not answered yet; later ones wait their turn, in order. Below the
    /// gateway's `MAX_IN_FLIGHT` (256 by default), which refuses sends beyond it.
    pub max_in_flight: usize,
}

/// The default [`Options::max_in_flight`]: half the gateway's default `MAX_IN_FLIGHT`, so an
/// answer on its way while the next send goes out never meets the server's bound.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;

/// Error codes that answer a send with "not now": it is written again (same id, in order).
/// Every other error code is final.
pub const RETRYABLE_CODES: [&str; 3] = ["produce_failed", "too_many_in_flight", "rate_limited"];

/// Times one send is written again after a retryable error before it is refused for good.
const MAX_RETRIES: u32 = 5;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// The library's reconnection schedule (with [`Options::reconnect`]): the first attempt after a
/// drop waits 50 to 200 ms, each later one up to twice as long, never more than 2 s.
pub fn reconnect_backoff() -> Backoff {
    Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(200),
        Duration::from_secs(2),
    )
}

/// A connection that stayed up this long was a success: the reconnection schedule starts over
/// after it drops. One dropped sooner (a gateway that accepts and then closes at once) keeps
/// the schedule's place, so the waits keep growing.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

impl Options {
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            urls: vec![url.to_owned()],
            tls: Tls::default(),
            token: token.to_owned(),
            json: false,
            reconnect: false,
            auto_ack: false,
            resume_from: HashMap::new(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

type Reply = oneshot::Sender<Result<Accepted, ClientError>>;

/// A send the application issued and the server has not answered yet.
struct Pending {
    /// Issue order: sends are written, and written again, in this order.
    order: u64,
    frame: Send,
    reply: Reply,
    /// Retryable refusals so far.
    retries: u32,
}

/// The connection's sends not answered yet, in the order the application issued them: those
/// written on the current socket (`in_flight`, at most `max_in_flight`) and those waiting their
/// turn (`waiting`: not written yet, to be written again after a reconnect, or to be retried).
/// Pure bookkeeping: the driver writes what [`Outbox::next_to_write`] hands out.
struct Outbox {
    next_order: u64,
    max_in_flight: usize,
    in_flight: VecDeque<Pending>,
    waiting: VecDeque<Pending>,
    /// After a retryable refusal nothing is written until then (the retried send goes first).
    hold_until: Option<tokio::time::Instant>,
    retry_delay: Duration,
}

impl Outbox {
    fn new(max_in_flight: usize) -> Self {
        Self {
            next_order: 0,
            max_in_flight: max_in_flight.max(1),
            in_flight: VecDeque::new(),
            waiting: VecDeque::new(),
            hold_until: None,
            retry_delay: FIRST_RETRY_DELAY,
        }
    }

    /// A new send from the application: last in line.
    fn push(&mut self, frame: Send, reply: Reply) {
        let order = self.next_order;
        self.next_order += 1;
        self.waiting.push_back(Pending {
            order,
            frame,
            reply,
            retries: 0,
        });
    }

    /// The next send to write now, if the in-flight bound and a retry hold allow; it counts as
    /// in flight from here.
    fn next_to_write(&mut self, now: tokio::time::Instant) -> Option<Send> {
        if self.hold_until.is_some_and(|t| now < t) {
            return None;
        }
        self.hold_until = None;
        if self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let p = self.waiting.pop_front()?;
        let frame = p.frame.clone();
        self.in_flight.push_back(p);
        Some(frame)
    }

    /// The in-flight send an answer with this client message id is for (the earliest written).
    fn answered(&mut self, client_message_id: &str) -> Option<Pending> {
        let at = self
            .in_flight
            .iter()
            .position(|p| p.frame.client_message_id == client_message_id)?;
        self.in_flight.remove(at)
    }

    /// Puts a send back in line at its place (before every send issued after it).
    fn requeue(&mut self, p: Pending) {
        let at = self
            .waiting
            .iter()
            .position(|w| w.order > p.order)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, p);
    }

    /// A send refused for a reason that passes: back in line, and a pause before writing on, at
    /// least `at_least` (what the server said to wait). Returns it instead once it was retried
    /// too often.
    fn retry(
        &mut self,
        mut p: Pending,
        now: tokio::time::Instant,
        at_least: Duration,
    ) -> Option<Pending> {
        if p.retries >= MAX_RETRIES {
            return Some(p);
        }
        p.retries += 1;
        self.requeue(p);
        self.hold(now, at_least);
        None
    }

    /// Writes nothing for the current retry delay (doubled for the next time), or for
    /// `at_least` if the server asked for longer.
    fn hold(&mut self, now: tokio::time::Instant, at_least: Duration) {
        self.hold_until = Some(now + self.retry_delay.max(at_least));
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
    }

    /// The socket is gone (or dropped a frame we cannot name): everything in flight goes back in
    /// line, in order, to be written again.
    fn requeue_in_flight(&mut self) {
        while let Some(p) = self.in_flight.pop_back() {
            self.requeue(p);
        }
    }

    fn fail_all(&mut self, err: impl Fn() -> ClientError) {
        for p in self.in_flight.drain(..).chain(self.waiting.drain(..)) {
            let _ = p.reply.send(Err(err()));
        }
    }
}

enum Command {
    Send { frame: Send, reply: Reply },
    Frame(client_frame::Kind),
    Raw(Message),
    Disconnect,
    Close,
}

/// A connected client.
pub struct Client {
    user: String,
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<Event>,
    state: std::sync::Arc<std::sync::Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    gateway_id: String,
    /// Last sequence handed out per conversation.
    last_seq: HashMap<String, u64>,
    /// Deliveries dropped as repeats (at-least-once delivery seen on the wire).
    wire_duplicates: u64,
    /// Peers whose conversations the last sync could not read (their shard was unavailable).
    unsynced_peers: Vec<String>,
}

fn lock(m: &std::sync::Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(
    url: &str,
    token: &str,
    json: bool,
    tls: &Tls,
) -> Result<(Socket, String, String), ClientError> {
    let format = if json { "json" } else { "binary" };
    let full = format!(
        "{}/ws?format={format}&sync=manual&access_token={token}",
        url.trim_end_matches('/')
    );
    // tungstenite reads into a 128 KiB buffer by default; frames here are a few KiB at most
    // (the buffer grows for a larger one).
    let mut config = tungstenite::protocol::WebSocketConfig::default();
    config.read_buffer_size = 16 * 1024;
    let connector = tokio_tungstenite::Connector::Rustls(tls.client_config());
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        full.as_str(),
        Some(config),
        true,
        Some(connector),
    );
    let (mut socket, _) = match connect.await {
        Ok(s) => s,
        Err(tungstenite::Error::Http(resp)) if resp.status() == 401 => {
            return Err(ClientError::Unauthorized)
        }
        Err(tungstenite::Error::Io(e)) if tls::handshake_failure(&e).is_some() => {
            return Err(ClientError::Tls {
                url: url.to_owned(),
                reason: tls::handshake_failure(&e).unwrap_or_default(),
            })
        }
        Err(e) => {
            return Err(ClientError::Connect {
                url: url.to_owned(),
                source: Box::new(e),
            })
        }
    };
    let wait = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(wait, socket.next()).await {
            Ok(Some(Ok(m))) => {
                if let Some(ServerFrame {
                    kind: Some(server_frame::Kind::Welcome(w)),
                }) = decode(&m)
                {
                    return Ok((socket, w.user, w.gateway_id));
                }
                if m.is_close() {
                    return Err(ClientError::Closed);
                }
            }
            Ok(_) => return Err(ClientError::Closed),
            Err(_) => return Err(ClientError::Timeout(wait)),
        }
    }
}

impl Client {
    /// Connects to one gateway, without reconnection (see [`Client::connect_with`]).
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(Options::new(url, token)).await
    }

    /// Connects with options; returns once the first connection is open and its sync requested.
    pub async fn connect_with(options: Options) -> Result<Self, ClientError> {
        let first = options.urls.first().ok_or(ClientError::Closed)?.clone();
        let (socket, user, gateway_id) =
            open(&first, &options.token, options.json, &options.tls).await?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let state = std::sync::Arc::new(std::sync::Mutex::new(Shared {
            gateway_id: gateway_id.clone(),
            last_seq: options.resume_from.clone(),
            wire_duplicates: 0,
            unsynced_peers: Vec::new(),
        }));
        let _ = ev_tx.send(Event::Connected { gateway_id });
        let driver = Driver {
            user: user.clone(),
            state: state.clone(),
            events: ev_tx,
            outbox: Outbox::new(options.max_in_flight),
            last_receipt_ms: 0,
            options,
        };
        tokio::spawn(driver.run(socket, cmd_rx));
        Ok(Self {
            user,
            commands: cmd_tx,
            events: ev_rx,
            state,
        })
    }

    /// The user the server authenticated.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The gateway holding the current connection.
    pub fn gateway_id(&self) -> String {
        lock(&self.state).gateway_id.clone()
    }

    /// The last sequence held per conversation (to resume from in a later run).
    pub fn last_seq(&self) -> HashMap<String, u64> {
        lock(&self.state).last_seq.clone()
    }

    /// How many deliveries were dropped as repeats so far (duplicates on the wire).
    pub fn wire_duplicates(&self) -> u64 {
        lock(&self.state).wire_duplicates
    }

    /// The peers whose conversations the last completed sync could not read, because the
    /// server's shard holding them did not answer (the sync-done frame's `unavailable_peers`):
    /// what is pending there comes with a later [`Client::sync`] (the server pushes nothing
    /// live in them until a sync has read them). Empty when the last sync read everything.
    pub fn unsynced_peers(&self) -> Vec<String> {
        lock(&self.state).unsynced_peers.clone()
    }

    /// Sends `body` to `to` with a fresh client message id; returns the server's acceptance.
    pub async fn send(&self, to: &str, body: &str) -> Result<Accepted, ClientError> {
        self.send_with_id(&uuid::Uuid::new_v4().to_string(), to, body)
            .await
    }

    /// Sends with a chosen client message id. Until answered, the send is repeated (same id)
    /// after every reconnect; the server turns repeats into the original message.
    pub async fn send_with_id(
        &self,
        client_message_id: &str,
        to: &str,
        body: &str,
    ) -> Result<Accepted, ClientError> {
        let (reply, rx) = oneshot::channel();
        let frame = Send {
            client_message_id: client_message_id.to_owned(),
            recipient: to.to_owned(),
            body: body.to_owned(),
        };
        self.commands
            .send(Command::Send { frame, reply })
            .map_err(|_| ClientError::Closed)?;
        let timeout = Duration::from_secs(60);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    /// Acknowledges everything from `peer` up to `up_to_seq`.
    pub fn ack(&self, peer: &str, up_to_seq: u64) -> Result<(), ClientError> {
        self.command(Command::Frame(client_frame::Kind::Ack(Ack {
            peer: peer.to_owned(),
            up_to_seq,
        })))
    }

    /// Asks again for what is pending after the sequences this client holds.
    pub fn sync(&self, last_seq_by_peer: HashMap<String, u64>) -> Result<(), ClientError> {
        self.command(Command::Frame(client_frame::Kind::Sync(Sync {
            last_seq: last_seq_by_peer,
            receipts_after_ms: 0,
        })))
    }

    /// Sends a raw websocket message (tests use it for malformed input).
    pub fn raw(&self, message: Message) -> Result<(), ClientError> {
        self.command(Command::Raw(message))
    }

    /// Drops the current connection as a network failure would (reconnects if enabled).
    pub fn disconnect(&self) -> Result<(), ClientError> {
        self.command(Command::Disconnect)
    }

    fn command(&self, c: Command) -> Result<(), ClientError> {
        self.commands.send(c).map_err(|_| ClientError::Closed)
    }

    /// The next event, or `None` once the client has stopped and every event was read.
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
            if let Event::Message(m) = self.next_event_within(left).await? {
                return Ok(m);
            }
        }
    }

    /// Waits for the end of the current sync answer, returning the messages it brought.
    pub async fn until_sync_done(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<ChatMessage>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event_within(left).await? {
                Event::Message(m) => got.push(m),
                Event::SyncDone { .. } => return Ok(got),
                _ => {}
            }
        }
    }

    /// Closes the connection and stops reconnecting.
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }
}

/// Owns the connection: reads and writes frames, reconnects, resumes.
struct Driver {
    options: Options,
    user: String,
    state: std::sync::Arc<std::sync::Mutex<Shared>>,
    events: mpsc::UnboundedSender<Event>,
    /// Sends not answered yet, in issue order: written up to the in-flight bound, written
    /// again after a reconnect or a retryable refusal.
    outbox: Outbox,
    /// Newest receipt seen, so a resume only asks for newer ones.
    last_receipt_ms: i64,
}

enum Ended {
    /// The user closed the client, or a newer session of the same user replaced this one
    /// (close code 4001): reconnecting would only take the session back from it.
    Closed,
    /// The connection dropped (or was dropped on purpose).
    Dropped,
}

/// Close code of a session replaced by a newer one of the same user.
pub const CLOSE_REPLACED: u16 = 4001;

impl Driver {
    async fn run(mut self, mut socket: Socket, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut url_index = 0;
        let mut backoff = reconnect_backoff();
        loop {
            let opened_at = tokio::time::Instant::now();
            if self.resume(&mut socket).await.is_ok() {
                if let Ended::Closed = self.serve(&mut socket, &mut commands).await {
                    let _ = socket.close(None).await;
                    break;
                }
            }
            let _ = socket.close(None).await;
            if !self.options.reconnect {
                break;
            }
            // Reconnect with backoff, moving through the URLs. Every attempt waits first, the
            // first one too: a gateway dropping all its sockets at once must not see them all
            // come back (to it or the next one) at once.
            if opened_at.elapsed() >= STABLE_CONNECTION {
                backoff.reset();
            }
            socket = loop {
                // Commands keep arriving while we are away: sends queue up, close ends it.
                let sleep = tokio::time::sleep(backoff.next_delay());
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        c = commands.recv() => match c {
                            None | Some(Command::Close) => {
                                self.fail_all(|| ClientError::Closed);
                                return;
                            }
                            Some(Command::Send { frame, reply }) => self.outbox.push(frame, reply),
                            Some(_) => {}
                        }
                    }
                }
                url_index = (url_index + 1) % self.options.urls.len();
                let url = self.options.urls[url_index].clone();
                match open(
                    &url,
                    &self.options.token,
                    self.options.json,
                    &self.options.tls,
                )
                .await
                {
                    Ok((s, _, gateway_id)) => {
                        lock(&self.state).gateway_id = gateway_id.clone();
                        let _ = self.events.send(Event::Connected { gateway_id });
                        break s;
                    }
                    Err(ClientError::Unauthorized) => {
                        self.fail_all(|| ClientError::Unauthorized);
                        return;
                    }
                    Err(_) => {}
                }
            };
        }
        self.fail_all(|| ClientError::Closed);
    }

    fn fail_all(&mut self, err: impl Fn() -> ClientError) {
        self.outbox.fail_all(err);
    }

    /// After (re)connecting: ask for what we lack, and repeat unanswered sends.
    async fn resume(&mut self, socket: &mut Socket) -> Result<(), ClientError> {
        let last_seq: HashMap<String, u64> = lock(&self.state)
            .last_seq
            .iter()
            .filter_map(|(conv, seq)| {
                let (a, b) = conv.split_once(':')?;
                let peer = if a == self.user { b } else { a };
                Some((peer.to_owned(), *seq))
            })
            .collect();
        let sync = client_frame::Kind::Sync(Sync {
            last_seq,
            receipts_after_ms: self.last_receipt_ms,
        });
        self.write(socket, sync).await?;
        // What the last socket left unanswered goes first, in its order.
        self.outbox.requeue_in_flight();
        self.pump(socket).await
    }

    /// Writes the sends whose turn it is (pipelined: no waiting for answers in between).
    async fn pump(&mut self, socket: &mut Socket) -> Result<(), ClientError> {
        while let Some(frame) = self.outbox.next_to_write(tokio::time::Instant::now()) {
            self.write(socket, client_frame::Kind::Send(frame)).await?;
        }
        Ok(())
    }

    async fn write(
        &self,
        socket: &mut Socket,
        kind: client_frame::Kind,
    ) -> Result<(), ClientError> {
        let frame = ClientFrame { kind: Some(kind) };
        let m = if self.options.json {
            Message::text(
                serde_json::to_string(&frame).map_err(|e| ClientError::Http(e.to_string()))?,
            )
        } else {
            Message::binary(frame.encode_to_vec())
        };
        socket.send(m).await.map_err(|_| ClientError::Closed)
    }

    async fn serve(
        &mut self,
        socket: &mut Socket,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Ended {
        let ended = self.serve_frames(socket, commands).await;
        // Whatever was in flight is unanswered: it goes again after the reconnect, in order.
        self.outbox.requeue_in_flight();
        ended
    }

    async fn serve_frames(
        &mut self,
        socket: &mut Socket,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Ended {
        loop {
            let hold = self.outbox.hold_until;
            tokio::select! {
                _ = tokio::time::sleep_until(hold.unwrap_or_else(tokio::time::Instant::now)), if hold.is_some() => {
                    if self.pump(socket).await.is_err() {
                        return Ended::Dropped;
                    }
                }
                c = commands.recv() => {
                    let result = match c {
                        None | Some(Command::Close) => return Ended::Closed,
                        Some(Command::Disconnect) => return Ended::Dropped,
                        Some(Command::Send { frame, reply }) => {
                            self.outbox.push(frame, reply);
                            self.pump(socket).await
                        }
                        Some(Command::Frame(kind)) => self.write(socket, kind).await,
                        Some(Command::Raw(m)) => socket.send(m).await.map_err(|_| ClientError::Closed),
                    };
                    if result.is_err() {
                        return Ended::Dropped;
                    }
                }
                m = socket.next() => {
                    let m = match m {
                        Some(Ok(m)) => m,
                        _ => {
                            let _ = self.events.send(Event::Disconnected { code: 1006, reason: "connection lost".into() });
                            return Ended::Dropped;
                        }
                    };
                    if let Message::Close(frame) = &m {
                        let (code, reason) = frame
                            .as_ref()
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        let _ = self.events.send(Event::Disconnected { code, reason });
                        if code == CLOSE_REPLACED {
                            return Ended::Closed;
                        }
                        return Ended::Dropped;
                    }
                    if let Some(frame) = decode(&m) {
                        if self.on_frame(socket, frame).await.is_err() {
                            return Ended::Dropped;
                        }
                    }
                }
            }
        }
    }

    async fn on_frame(
        &mut self,
        socket: &mut Socket,
        frame: ServerFrame,
    ) -> Result<(), ClientError> {
        let event = match frame.kind {
            Some(server_frame::Kind::Accepted(a)) => {
                if let Some(p) = self.outbox.answered(&a.client_message_id) {
                    self.outbox.retry_delay = FIRST_RETRY_DELAY;
                    let _ = p.reply.send(Ok(a));
                }
                return self.pump(socket).await;
            }
            Some(server_frame::Kind::Error(e)) => {
                let retryable = RETRYABLE_CODES.contains(&e.code.as_str());
                let asked = Duration::from_millis(u64::from(e.retry_after_ms));
                match self.outbox.answered(&e.client_message_id) {
                    Some(p) => {
                        let now = tokio::time::Instant::now();
                        let given_up = if retryable {
                            self.outbox.retry(p, now, asked)
                        } else {
                            Some(p)
                        };
                        if let Some(p) = given_up {
                            let _ = p.reply.send(Err(ClientError::Refused {
                                code: e.code,
                                message: e.message,
                            }));
                        }
                        return self.pump(socket).await;
                    }
                    None => {
                        if retryable && e.client_message_id.is_empty() {
                            // A frame was dropped (the connection's rate limit) and the server
                            // cannot say which: write every unanswered send again, in order,
                            // after a pause; a repeat is answered with the original message.
                            self.outbox.requeue_in_flight();
                            self.outbox.hold(tokio::time::Instant::now(), asked);
                        }
                        Event::Error {
                            code: e.code,
                            message: e.message,
                        }
                    }
                }
            }
            Some(server_frame::Kind::Deliver(d)) => {
                let Some(msg) = d.message else { return Ok(()) };
                {
                    let mut state = lock(&self.state);
                    let state = &mut *state;
                    let last = state.last_seq.entry(msg.conversation.clone()).or_insert(0);
                    if msg.seq <= *last {
                        state.wire_duplicates += 1;
                        return Ok(()); // a repeat: already handed out
                    }
                    *last = msg.seq;
                }
                if self.options.auto_ack {
                    let ack = client_frame::Kind::Ack(Ack {
                        peer: msg.sender.clone(),
                        up_to_seq: msg.seq,
                    });
                    self.write(socket, ack).await?;
                }
                Event::Message(msg)
            }
            Some(server_frame::Kind::Receipt(r)) => {
                self.last_receipt_ms = self.last_receipt_ms.max(r.acked_at_ms);
                Event::Receipt(r)
            }
            Some(server_frame::Kind::Stored(s)) => Event::Stored(s),
            Some(server_frame::Kind::Failed(f)) => Event::Failed(f),
            Some(server_frame::Kind::SyncDone(s)) => {
                lock(&self.state).unsynced_peers = s.unavailable_peers;
                Event::SyncDone {
                    delivered: s.delivered,
                }
            }
            Some(server_frame::Kind::Welcome(_)) | None => return Ok(()),
        };
        let _ = self.events.send(event);
        Ok(())
    }
}

fn decode(m: &Message) -> Option<ServerFrame> {
    match m {
        Message::Binary(b) => ServerFrame::decode(b.as_ref()).ok(),
        Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
        _ => None,
    }
}

/// The REST API, over HTTP or HTTPS (blocking calls run on a blocking thread).
#[derive(Clone, Debug)]
pub struct Rest {
    base: String,
    agent: ureq::Agent,
}

/// A REST answer: status and JSON body.
#[derive(Debug)]
pub struct RestResponse {
    pub status: u16,
    pub body: serde_json::Value,
    /// `Retry-After` in seconds, when the server says when to ask again (a 429 for the send
    /// rate, a 503 for a shard that does not answer).
    pub retry_after: Option<u64>,
}

impl Rest {
    /// `base` like `http://127.0.0.1:8080` (or `https://`, trusting the default roots).
    pub fn new(base: &str) -> Self {
        Self::with_tls(base, &Tls::default())
    }

    /// `base` like `https://chat.example.com`, trusting the CAs of `tls`.
    pub fn with_tls(base: &str, tls: &Tls) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            agent: ureq::AgentBuilder::new()
                .tls_config(tls.client_config())
                .build(),
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
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || {
            let mut req = agent
                .request(&method, &url)
                .timeout(Duration::from_secs(30));
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
                Err(ureq::Error::Transport(t)) => {
                    return Err(match tls::handshake_failure(&t) {
                        Some(reason) => ClientError::Tls { url, reason },
                        None => ClientError::Http(t.to_string()),
                    })
                }
            };
            let status = resp.status();
            let retry_after = resp
                .header("retry-after")
                .and_then(|v| v.trim().parse().ok());
            let text = resp
                .into_string()
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            Ok(RestResponse {
                status,
                body,
                retry_after,
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn send(cid: &str) -> Send {
        Send {
            client_message_id: cid.to_owned(),
            recipient: "bob".to_owned(),
            body: cid.to_owned(),
        }
    }

    fn outbox(
        max: usize,
        cids: &[&str],
    ) -> (
        Outbox,
        Vec<oneshot::Receiver<Result<Accepted, ClientError>>>,
    ) {
        let mut o = Outbox::new(max);
        let mut replies = Vec::new();
        for c in cids {
            let (tx, rx) = oneshot::channel();
            o.push(send(c), tx);
            replies.push(rx);
        }
        (o, replies)
    }

    fn drain(o: &mut Outbox, now: tokio::time::Instant) -> Vec<String> {
        std::iter::from_fn(|| o.next_to_write(now))
            .map(|s| s.client_message_id)
            .collect()
    }

    #[test]
    fn sends_go_out_in_issue_order_up_to_the_in_flight_bound() {
        let now = tokio::time::Instant::now();
        let (mut o, _r) = outbox(3, &["a", "b", "c", "d", "e"]);
        assert_eq!(drain(&mut o, now), ["a", "b", "c"]);
        assert!(o.answered("b").is_some());
        assert!(o.answered("b").is_none(), "one answer per write");
        assert_eq!(drain(&mut o, now), ["d"]);
        assert!(o.answered("a").is_some());
        assert!(o.answered("c").is_some());
        assert_eq!(drain(&mut o, now), ["e"]);
    }

    #[test]
    fn a_reconnect_writes_the_unanswered_again_in_their_order_before_the_rest() {
        let now = tokio::time::Instant::now();
        let (mut o, _r) = outbox(3, &["a", "b", "c", "d", "e"]);
        assert_eq!(drain(&mut o, now), ["a", "b", "c"]);
        assert!(o.answered("b").is_some());
        o.requeue_in_flight();
        assert_eq!(drain(&mut o, now), ["a", "c", "d"]);
    }

    #[test]
    fn a_retryable_refusal_goes_again_before_later_sends_after_a_pause() {
        let now = tokio::time::Instant::now();
        let (mut o, _r) = outbox(2, &["a", "b", "c", "d"]);
        assert_eq!(drain(&mut o, now), ["a", "b"]);
        let a = o.answered("a").expect("in flight");
        assert!(
            o.retry(a, now, Duration::ZERO).is_none(),
            "retried, not given up"
        );
        assert!(drain(&mut o, now).is_empty(), "held for a while");
        let later = now + MAX_RETRY_DELAY;
        assert_eq!(
            drain(&mut o, later),
            ["a"],
            "b is still in flight: one slot"
        );
        assert!(o.answered("b").is_some());
        assert_eq!(drain(&mut o, later), ["c"]);
    }

    #[test]
    fn a_pause_lasts_at_least_what_the_server_asked_and_no_less_than_the_backoff() {
        let now = tokio::time::Instant::now();
        let (mut o, _r) = outbox(1, &["a"]);
        assert_eq!(drain(&mut o, now), ["a"]);
        let a = o.answered("a").expect("in flight");
        let asked = FIRST_RETRY_DELAY * 10;
        assert!(o.retry(a, now, asked).is_none());
        let just_before = now + asked - Duration::from_millis(1);
        assert!(drain(&mut o, just_before).is_empty(), "held as asked");
        assert_eq!(drain(&mut o, now + asked), ["a"]);

        // A shorter hint than the backoff does not shorten it.
        let a = o.answered("a").expect("in flight");
        let now = now + asked;
        assert!(o.retry(a, now, Duration::from_millis(1)).is_none());
        let backoff = FIRST_RETRY_DELAY * 2; // the second pause
        assert!(drain(&mut o, now + backoff - Duration::from_millis(1)).is_empty());
        assert_eq!(drain(&mut o, now + backoff), ["a"]);
    }

    #[test]
    fn a_send_retried_too_often_is_handed_back() {
        let mut now = tokio::time::Instant::now();
        let (mut o, _r) = outbox(1, &["a"]);
        for _ in 0..MAX_RETRIES {
            assert_eq!(drain(&mut o, now), ["a"]);
            let a = o.answered("a").expect("in flight");
            assert!(o.retry(a, now, Duration::ZERO).is_none());
            now += MAX_RETRY_DELAY;
        }
        assert_eq!(drain(&mut o, now), ["a"]);
        let a = o.answered("a").expect("in flight");
        assert!(o.retry(a, now, Duration::ZERO).is_some());
    }

    #[test]
    fn closing_fails_every_unanswered_send() {
        let now = tokio::time::Instant::now();
        let (mut o, mut r) = outbox(1, &["a", "b"]);
        assert_eq!(drain(&mut o, now), ["a"]);
        o.fail_all(|| ClientError::Closed);
        for rx in &mut r {
            assert!(matches!(rx.try_recv(), Ok(Err(ClientError::Closed))));
        }
    }
}
