//! One websocket connection: authenticate (done before the upgrade), register the session,
//! publish presence, sync what is pending, then serve frames both ways until either side closes.
//!
//! Order guarantees at the seam between sync and live: live messages that arrive while a sync is
//! running are held and released after it, skipping any the sync already sent (same or lower
//! sequence in that conversation). So the client sees each conversation in order, without gaps
//! or duplicates, across the seam.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_common::ids::{ConversationKey, UserId};
use chat_proto::v1::{
    self, client_frame, server_frame, ChatMessage, ClientFrame, Deliver, ServerFrame, SyncDone,
};
use futures_util::{SinkExt, StreamExt};
use governor::clock::Clock as _;
use prost::Message as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::app::{AddrSlot, App, Enqueue, PendingSend, PreparedSend, SyncCursor};
use crate::error::{whole_units, Close, FrameError, SendError};
use crate::sessions::{Mail, Mailbox, Outgoing, SessionHandle, SyncAnswer};
use crate::upgrade::Socket;

/// Rate-limited frames in a row after which the connection is closed (1008).
const RATE_STRIKES: u32 = 50;
/// Room in a frame for everything but the body: the frame's field names or tags, a client
/// message id and a recipient (64 bytes each) and whitespace.
const FRAME_ENVELOPE_BYTES: usize = 1024;
/// Most live messages held while a sync runs before the socket counts as not draining.
const MAX_HELD: usize = 4096;
/// The last seq sent of a conversation the last sync could not read (its shard did not
/// answer): no live message of it is pushed until a sync reads it, or the client would see it
/// after a gap (and, acking it, acknowledge what it never saw).
const UNSYNCED: u64 = u64::MAX;

/// Encoding of the frames this server sends on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Protobuf in binary frames.
    Binary,
    /// Proto3 JSON mapping in text frames.
    Json,
}

fn encode(format: Format, frame: &ServerFrame) -> Message {
    match format {
        Format::Binary => Message::Binary(frame.encode_to_vec().into()),
        Format::Json => Message::Text(
            serde_json::to_string(frame)
                .unwrap_or_else(|_| "{}".into())
                .into(),
        ),
    }
}

fn error_frame(code: &str, message: String, client_message_id: String) -> ServerFrame {
    ServerFrame {
        kind: Some(server_frame::Kind::Error(chat_proto::v1::Error {
            code: code.to_owned(),
            message,
            client_message_id,
            retry_after_ms: 0,
        })),
    }
}

/// A `rate_limited` error frame that says when the limiter lets the next one through.
fn rate_limited_frame(message: String, client_message_id: String, wait: Duration) -> ServerFrame {
    let mut frame = error_frame("rate_limited", message, client_message_id);
    if let Some(server_frame::Kind::Error(e)) = &mut frame.kind {
        e.retry_after_ms = whole_units(wait, Duration::from_millis(1));
    }
    frame
}

/// The per-connection writer state: what has been sent, and what waits for a sync to finish.
struct Writer {
    /// Highest sequence sent per conversation on this connection.
    last_sent: HashMap<String, u64>,
    /// Syncs still running; live messages are held while this is non-zero.
    syncing: usize,
    held: Vec<ChatMessage>,
    /// In manual sync mode, until the client's first `sync`: that sync answers the initial hold.
    first_sync_pending: bool,
}

impl Writer {
    /// The frames of `items`, in order, to go out in one write; and the close, if an item
    /// cannot be sent (the frames are then those of the items before it, and the rest are
    /// dropped with the connection).
    fn frames_of_all(&mut self, items: Vec<Outgoing>) -> (Vec<ServerFrame>, Option<Close>) {
        let mut frames = Vec::new();
        for item in items {
            if let Err(why) = self.frames_into(item, &mut frames) {
                return (frames, Some(why));
            }
        }
        (frames, None)
    }

    /// Adds one queued item's frames to `out`, or `Err` with a close code.
    fn frames_into(&mut self, item: Outgoing, out: &mut Vec<ServerFrame>) -> Result<(), Close> {
        match item {
            Outgoing::Frame(f) => out.push(*f),
            Outgoing::Live(m) => {
                if self.syncing > 0 {
                    if self.held.len() >= MAX_HELD {
                        return Err(Close::TooManyHeld);
                    }
                    self.held.push(*m);
                } else {
                    self.deliver_if_new(*m, out);
                }
            }
            Outgoing::Synced(answer) => {
                let SyncAnswer {
                    incomplete,
                    messages,
                    receipts,
                    failures,
                } = *answer;
                // This answer read every conversation it could: those an earlier partial sync
                // left out are open again, unless this one leaves them out too.
                self.last_sent.retain(|_, seq| *seq != UNSYNCED);
                let mut unavailable_peers = Vec::new();
                if let Some(e) = incomplete {
                    out.push(error_frame(e.code(), e.to_string(), String::new()));
                    unavailable_peers = e.unavailable_peers().to_vec();
                    for conversation in e.unavailable_conversations() {
                        self.last_sent.insert(conversation.clone(), UNSYNCED);
                    }
                }
                let count = messages.len() as u64;
                for m in messages {
                    let seq = self.last_sent.entry(m.conversation.clone()).or_insert(0);
                    *seq = (*seq).max(m.seq);
                    out.push(deliver(m));
                }
                out.extend(receipts.into_iter().map(|r| ServerFrame {
                    kind: Some(server_frame::Kind::Receipt(r)),
                }));
                out.extend(failures.into_iter().map(|f| ServerFrame {
                    kind: Some(server_frame::Kind::Failed(f)),
                }));
                self.syncing = self.syncing.saturating_sub(1);
                out.push(ServerFrame {
                    kind: Some(server_frame::Kind::SyncDone(SyncDone {
                        delivered: count,
                        unavailable_peers,
                    })),
                });
                if self.syncing == 0 {
                    for m in std::mem::take(&mut self.held) {
                        self.deliver_if_new(m, out);
                    }
                }
            }
        }
        Ok(())
    }

    fn deliver_if_new(&mut self, m: ChatMessage, out: &mut Vec<ServerFrame>) {
        let seq = self.last_sent.entry(m.conversation.clone()).or_insert(0);
        if *seq == UNSYNCED {
            // Left out of the sync (its shard did not answer): what came before it there was
            // not sent, so neither is this. It stays pending for the next sync.
            return;
        }
        if m.seq <= *seq {
            metrics::counter!("gateway_duplicates_suppressed_total").increment(1);
            return;
        }
        *seq = m.seq;
        // Accept (gateway clock at send) to push (this gateway's clock): the pipeline's latency.
        let age_ms = chat_common::now_ms().saturating_sub(m.sent_at_ms).max(0);
        metrics::histogram!("chat_e2e_latency_seconds").record(age_ms as f64 / 1000.0);
        out.push(deliver(m));
    }
}

fn deliver(m: ChatMessage) -> ServerFrame {
    ServerFrame {
        kind: Some(server_frame::Kind::Deliver(Deliver { message: Some(m) })),
    }
}

/// What a connection starts with.
pub(crate) struct Start {
    pub(crate) app: Arc<App>,
    pub(crate) user: UserId,
    pub(crate) socket: Socket,
    pub(crate) format: Format,
    pub(crate) auto_sync: bool,
    pub(crate) address_slot: AddrSlot,
}

/// Serves one authenticated websocket until it closes: opens the session, goes live (presence,
/// welcome, first sync), serves frames both ways, then closes and winds the session up.
///
/// This future lives as long as the connection, idle or not, so it is kept small (it is most
/// of what an idle connection costs): its one argument is a box (an async fn keeps its
/// arguments for its whole life, even once moved out), frames are handled by plain functions,
/// and the futures of rare steps (going live, pings, errors, closing) and of writes are boxed
/// while they run.
pub(crate) async fn serve(start: Box<Start>) {
    // Moved out in a block of its own, so the box is freed now rather than when `serve` ends.
    let Start {
        app,
        user,
        mut socket,
        format,
        auto_sync,
        address_slot,
    } = {
        let boxed = start;
        *boxed
    };
    let mut conn = Conn::open(app, user, format, auto_sync);
    let close_with = match Box::pin(conn.go_live(&mut socket, auto_sync)).await {
        Ok(()) => conn.run(&mut socket).await,
        Err(why) => Some(why),
    };
    Box::pin(finish(socket, conn, close_with, address_slot)).await;
}

/// A connection's state apart from the socket.
struct Conn {
    app: Arc<App>,
    user: UserId,
    session: SessionHandle,
    format: Format,
    limiter: governor::DefaultDirectRateLimiter,
    /// Rate-limited frames in a row.
    strikes: u32,
    /// When the peer last sent anything (pings are answered by the websocket layer, but the
    /// answers count).
    last_heard: tokio::time::Instant,
    writer: Writer,
}

/// What the connection does next, decided from one mail or one frame from the client.
enum Step {
    Continue,
    /// Send these frames (answers, pushed messages, a sync) and flush; then close, if a reason
    /// is given (an item queued after them could not be sent).
    Write(Vec<ServerFrame>, Option<Close>),
    /// Answer with this frame (an error the client should see), then go on.
    Reply(Box<ServerFrame>),
    /// Ping the peer.
    Ping,
    /// Close, with a reason, or without (the client closed, or the socket failed).
    Close(Option<Close>),
    /// Finish this first, before reading the next frame: a send waiting for room in the
    /// producer's queue holds back the sends behind it, so they stay in order.
    Block(Box<BlockedSend>),
}

impl Conn {
    /// Registers the session. Live messages are held from the start until the first sync is
    /// answered: the automatic one, or (with `sync=manual`) the client's first `sync` frame,
    /// which takes over this hold.
    fn open(app: Arc<App>, user: UserId, format: Format, auto_sync: bool) -> Self {
        let session = app.open_session(&user);
        Conn {
            limiter: app.connection_limiter(),
            app,
            user,
            session,
            format,
            strikes: 0,
            last_heard: tokio::time::Instant::now(),
            writer: Writer {
                last_sent: HashMap::new(),
                syncing: 1,
                held: Vec::new(),
                first_sync_pending: !auto_sync,
            },
        }
    }

    /// Publishes the user's presence here, sends the welcome and starts the first sync (unless
    /// the client syncs itself). Route first, then sync: see `chat_common::presence` for why
    /// this order closes the gap.
    async fn go_live(&self, socket: &mut Socket, auto_sync: bool) -> Result<(), Close> {
        if let Err(e) = self.app.announce(&self.user, &self.session).await {
            tracing::warn!(user = %self.user, error = %e, "presence publish failed");
            return Err(Close::PresenceUnavailable);
        }
        let welcome = ServerFrame {
            kind: Some(server_frame::Kind::Welcome(chat_proto::v1::Welcome {
                user: self.user.to_string(),
                gateway_id: self.app.config().gateway_id.to_string(),
            })),
        };
        let _ = socket.send(encode(self.format, &welcome)).await;
        if auto_sync {
            let cursor = SyncCursor::default();
            spawn_sync(&self.app, &self.user, cursor, self.session.mailbox.clone());
        }
        Ok(())
    }

    /// Serves frames both ways until either side closes; the close to send, if any. One await
    /// for the mailbox and the socket, one (boxed) for what a step needs: each await point of
    /// this loop adds to the future that every connection holds.
    async fn run(&mut self, socket: &mut Socket) -> Option<Close> {
        self.last_heard = tokio::time::Instant::now();
        loop {
            let step = tokio::select! {
                mail = self.session.mailbox.next() => self.on_mail(mail),
                incoming = socket.next() => self.on_incoming(incoming),
            };
            match step {
                Step::Continue => {}
                Step::Close(why) => return why,
                step => {
                    if let Err(why) = Box::pin(self.perform(step, socket)).await {
                        return why;
                    }
                }
            }
        }
    }

    /// What the mailbox asks: close, ping (pings come from the gateway's one timer, see
    /// `App::ping_sessions`), or send what was queued.
    fn on_mail(&mut self, mail: Mail) -> Step {
        match mail {
            Mail::Kicked(why) => Step::Close(Some(why)),
            Mail::Ping if self.last_heard.elapsed() > self.app.config().ping_interval * 2 => {
                Step::Close(Some(Close::PingTimeout))
            }
            Mail::Ping => Step::Ping,
            Mail::Items(items) => match self.writer.frames_of_all(items) {
                (frames, why) if frames.is_empty() => {
                    why.map_or(Step::Continue, |why| Step::Close(Some(why)))
                }
                (frames, why) => Step::Write(frames, why),
            },
        }
    }

    /// What the socket read: a frame from the client, an error, or the end.
    fn on_incoming(&mut self, incoming: Option<Result<Message, WsError>>) -> Step {
        match incoming {
            Some(Ok(msg)) => {
                self.last_heard = tokio::time::Instant::now();
                self.on_message(msg)
            }
            Some(Err(e)) => {
                tracing::debug!(user = %self.user, error = %e, "socket error");
                metrics::counter!("gateway_errors_total", "kind" => "bad_frame").increment(1);
                Step::Close(Close::for_socket_error(&e))
            }
            None => Step::Close(None),
        }
    }

    /// Handles one frame from the client. Never waits, but for a send that finds the producer's
    /// queue full (`Step::Block`); the answers to sends and acks come back through the mailbox.
    fn on_message(&mut self, msg: Message) -> Step {
        if msg.is_close() {
            return Step::Close(None);
        }
        if msg.is_ping() || msg.is_pong() {
            return Step::Continue; // pings are answered by the websocket layer
        }
        if let Err(not_until) = self.limiter.check() {
            self.strikes += 1;
            metrics::counter!("gateway_rate_limited_total", "scope" => "connection").increment(1);
            if self.strikes > RATE_STRIKES {
                return Step::Close(Some(Close::RateLimited));
            }
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            let f = rate_limited_frame(
                "sending too fast; frame dropped".into(),
                String::new(),
                wait,
            );
            return Step::Reply(Box::new(f));
        }
        self.strikes = 0;
        match decode_frame(&msg, self.app.config().max_body_bytes) {
            Ok((frame, format)) => {
                self.format = format;
                self.on_frame(frame)
            }
            Err(e) if e.close().is_some() => Step::Close(e.close()),
            Err(e) => {
                metrics::counter!("gateway_errors_total", "kind" => "bad_frame").increment(1);
                Step::Reply(Box::new(error_frame(
                    "bad_frame",
                    e.to_string(),
                    String::new(),
                )))
            }
        }
    }

    /// Does what a step needs of the socket (or of the producer's queue); `Err` ends the
    /// connection, with a close or without (the socket failed).
    async fn perform(&self, step: Step, socket: &mut Socket) -> Result<(), Option<Close>> {
        match step {
            Step::Continue => Ok(()),
            Step::Close(why) => Err(why),
            Step::Write(frames, then) => {
                write_frames(socket, frames, self.format, &self.session.mailbox).await?;
                then.map_or(Ok(()), |why| Err(Some(why)))
            }
            Step::Reply(frame) => socket
                .send(encode(self.format, &frame))
                .await
                .map_err(|_| None),
            Step::Ping => {
                let ping = socket.send(Message::Ping(Default::default()));
                match tokio::time::timeout(std::time::Duration::from_secs(5), ping).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(None),
                }
            }
            Step::Block(send) => {
                send.enqueue().await;
                Ok(())
            }
        }
    }
}

/// Decodes a data frame: protobuf in a binary frame, the proto3 JSON mapping in a text frame
/// (whose UTF-8 the websocket layer has checked, 1007 otherwise). Also says in which format the
/// client speaks, so the answers follow it.
fn decode_frame(msg: &Message, max_body: usize) -> Result<(ClientFrame, Format), FrameError> {
    match msg {
        Message::Binary(bytes) => {
            // The socket admits frames big enough for a body JSON-escaped at its worst;
            // protobuf carries the body as it is.
            if bytes.len() > binary_frame_limit(max_body) {
                return Err(FrameError::TooBig);
            }
            ClientFrame::decode(bytes.as_ref())
                .map(|f| (f, Format::Binary))
                .map_err(|e| FrameError::Undecodable(e.to_string()))
        }
        Message::Text(text) => serde_json::from_str::<ClientFrame>(text.as_str())
            .map(|f| (f, Format::Json))
            .map_err(|e| FrameError::Undecodable(e.to_string())),
        _ => Err(FrameError::UnexpectedType),
    }
}

/// Closes the socket (with a close frame if the server closes it), then winds the session up
/// (unregistered, and the user's offline presence published if this was still their session).
async fn finish(mut socket: Socket, conn: Conn, close_with: Option<Close>, address_slot: AddrSlot) {
    let Conn {
        app, user, session, ..
    } = conn;
    session.mailbox.close();
    if let Some(why) = close_with {
        metrics::counter!("gateway_closed_by_server_total", "code" => why.code().to_string())
            .increment(1);
        // A peer that does not read cannot take the close frame until it reads what is ahead
        // of it: wait a bounded time, then drop the connection.
        let close = async {
            let frame = CloseFrame {
                code: CloseCode::from(why.code()),
                reason: why.reason().into(),
            };
            let _ = socket.send(Message::Close(Some(frame))).await;
            let _ = socket.close(None).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), close).await;
    } else {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), socket.close(None)).await;
    }
    app.close_session(&user, &session).await;
    drop(address_slot);
}

/// Writes `frames` and flushes. A write blocks while the peer does not read; a kick (its queue
/// overflowed, it was replaced, or the server is shutting down) still gets through. `Err(None)`:
/// the socket failed; `Err(Some(reason))`: kicked.
async fn write_frames(
    socket: &mut Socket,
    frames: Vec<ServerFrame>,
    format: Format,
    mailbox: &Mailbox,
) -> Result<(), Option<Close>> {
    let write = async {
        let started = std::time::Instant::now();
        for f in frames {
            socket.feed(encode(format, &f)).await?;
        }
        socket.flush().await?;
        metrics::histogram!("gateway_socket_write_seconds").record(started.elapsed());
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    };
    tokio::select! {
        r = write => r.map_err(|_| None),
        reason = mailbox.kicked() => Err(Some(reason)),
    }
}

/// The largest frame the socket admits for bodies of up to `max_body` bytes: a JSON text frame
/// whose body is escaped at its worst (six bytes a byte), and the rest of the frame.
pub(crate) fn frame_limit(max_body: usize) -> usize {
    chat_common::body::json_escaped_max(max_body) + FRAME_ENVELOPE_BYTES
}

/// The largest binary (protobuf) frame: the body as it is, and the rest of the frame.
fn binary_frame_limit(max_body: usize) -> usize {
    max_body + FRAME_ENVELOPE_BYTES
}

/// A client frame's handlers. A send is handed to the producer here, in frame order, so a
/// connection's pipelined sends reach Kafka (and get their seqs) in the order they were sent;
/// only the wait for each delivery report runs in a task of its own, so a slow produce never
/// stalls this connection's reads or writes. Answers come back through the mailbox.
impl Conn {
    fn on_frame(&mut self, frame: ClientFrame) -> Step {
        match frame.kind {
            Some(client_frame::Kind::Send(send)) => return self.on_send(send),
            Some(client_frame::Kind::Ack(ack)) => self.on_ack(ack),
            Some(client_frame::Kind::Sync(sync)) => self.on_sync(sync),
            None => self.answer(error_frame(
                "bad_frame",
                "empty frame".into(),
                String::new(),
            )),
        }
        Step::Continue
    }

    /// Hands the send to the producer, or refuses it; blocks the connection's reads while the
    /// producer's queue is full.
    fn on_send(&mut self, send: v1::Send) -> Step {
        let mailbox = &self.session.mailbox;
        let Some(permit) = mailbox.begin_send() else {
            self.answer(refusal(&SendError::TooManyInFlight, send.client_message_id));
            return Step::Continue;
        };
        let cid = send.client_message_id;
        let prepared = match self
            .app
            .prepare_send(&self.user, &cid, &send.recipient, send.body)
        {
            Ok(p) => p,
            Err(e) => {
                self.answer(refusal(&e, cid));
                return Step::Continue;
            }
        };
        if prepared.needs_seal() {
            // Delete-on-ack mode: the body's key comes from its shard first.
            return self.blocked(prepared, cid, permit);
        }
        match self.app.enqueue_send(prepared) {
            Ok(pending) => answer_when_durable(&self.app, pending, cid, mailbox.clone(), permit),
            Err(Enqueue::Failed(e)) => self.answer(refusal(&e, cid)),
            Err(Enqueue::QueueFull(prepared)) => return self.blocked(prepared, cid, permit),
        }
        Step::Continue
    }

    /// A send the connection waits for before it reads another frame (see [`BlockedSend`]).
    fn blocked(
        &self,
        prepared: PreparedSend,
        client_message_id: String,
        permit: crate::sessions::InFlight,
    ) -> Step {
        Step::Block(Box::new(BlockedSend {
            app: self.app.clone(),
            prepared,
            client_message_id,
            mailbox: self.session.mailbox.clone(),
            permit,
        }))
    }

    /// Produces the ack in a task of its own; only a refusal is answered.
    fn on_ack(&self, ack: v1::Ack) {
        let (app, user) = (self.app.clone(), self.user.clone());
        let mailbox = self.session.mailbox.clone();
        self.app.spawn(async move {
            if let Err(e) = app.ack(&user, &ack.peer, ack.up_to_seq).await {
                let refused = refusal(&e, String::new());
                mailbox.push_or_kick(Outgoing::Frame(Box::new(refused)));
            }
        });
    }

    /// Starts a sync from where the client says it is; live messages are held until it is
    /// answered.
    fn on_sync(&mut self, sync: v1::Sync) {
        let cursor = match sync_cursor(&self.user, sync) {
            Ok(cursor) => cursor,
            Err(peer) => {
                let message = format!("invalid peer {peer:?} in sync");
                self.answer(error_frame("invalid_peer", message, String::new()));
                return;
            }
        };
        if self.writer.first_sync_pending {
            self.writer.first_sync_pending = false;
        } else {
            self.writer.syncing += 1;
        }
        spawn_sync(&self.app, &self.user, cursor, self.session.mailbox.clone());
    }

    /// Queues `frame` for the client.
    fn answer(&self, frame: ServerFrame) {
        self.session
            .mailbox
            .push_or_kick(Outgoing::Frame(Box::new(frame)));
    }
}

/// The cursor a `sync` frame gives: per peer, the last seq the client has of that conversation,
/// and the time after which it wants receipts. `Err` with the first peer that is not a valid
/// user id other than the caller's own.
fn sync_cursor(user: &UserId, sync: v1::Sync) -> Result<SyncCursor, String> {
    let mut after = HashMap::new();
    for (peer, seq) in sync.last_seq {
        let conversation = UserId::parse(&peer)
            .ok()
            .and_then(|p| ConversationKey::of(user, &p));
        match conversation {
            Some(c) => after.insert(c, seq),
            None => return Err(peer),
        };
    }
    Ok(SyncCursor {
        after,
        receipts_after_ms: sync.receipts_after_ms,
    })
}

/// The error frame of a refused send or ack.
fn refusal(e: &SendError, client_message_id: String) -> ServerFrame {
    match e {
        SendError::RateLimited { retry_after } => {
            rate_limited_frame(e.to_string(), client_message_id, *retry_after)
        }
        _ => error_frame(e.code(), e.to_string(), client_message_id),
    }
}

/// A send that found the producer's queue full, or whose body must be sealed first
/// (delete-on-ack mode): the connection reads no further frame until it is handed over (or
/// refused), so the sends behind it stay behind it.
struct BlockedSend {
    app: Arc<App>,
    prepared: PreparedSend,
    client_message_id: String,
    mailbox: Arc<Mailbox>,
    permit: crate::sessions::InFlight,
}

impl BlockedSend {
    async fn enqueue(self) {
        let BlockedSend {
            app,
            prepared,
            client_message_id,
            mailbox,
            permit,
        } = self;
        let mut prepared = prepared;
        if let Err(e) = app.seal(&mut prepared).await {
            let refused = refusal(&e, client_message_id);
            mailbox.push_or_kick(Outgoing::Frame(Box::new(refused)));
            return;
        }
        match app.enqueue_waiting(prepared).await {
            Ok(pending) => answer_when_durable(&app, pending, client_message_id, mailbox, permit),
            Err(e) => {
                let refused = refusal(&e, client_message_id);
                mailbox.push_or_kick(Outgoing::Frame(Box::new(refused)));
            }
        }
    }
}

/// Waits, in a task of its own, for the delivery report of a send handed to the producer, and
/// queues its answer (`accepted`, or the error); the in-flight slot is freed then.
fn answer_when_durable(
    app: &Arc<App>,
    pending: PendingSend,
    client_message_id: String,
    mailbox: Arc<Mailbox>,
    permit: crate::sessions::InFlight,
) {
    app.spawn(async move {
        let reply = match pending.accepted().await {
            Ok(accepted) => ServerFrame {
                kind: Some(server_frame::Kind::Accepted(accepted)),
            },
            Err(e) => refusal(&e, client_message_id),
        };
        mailbox.push_or_kick(Outgoing::Frame(Box::new(reply)));
        drop(permit);
    });
}

/// Queries, in a task of its own, what `user` has pending after `cursor` and queues it as one
/// sync answer.
fn spawn_sync(app: &Arc<App>, user: &UserId, cursor: SyncCursor, mailbox: Arc<Mailbox>) {
    let (service, user) = (app.clone(), user.clone());
    app.spawn(async move {
        let answer = service.sync(&user, &cursor).await;
        mailbox.push_or_kick(Outgoing::Synced(Box::new(answer)));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SyncIncomplete;

    /// tokio's task header (32 bytes), scheduler and id (16), trailer (48); the tracker's
    /// token (8) and the stage's tag (8).
    const TASK_OVERHEAD: usize = 112;

    fn future_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(Box<Start>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    fn send(body: String) -> ClientFrame {
        ClientFrame {
            kind: Some(client_frame::Kind::Send(chat_proto::v1::Send {
                client_message_id: "c".repeat(64),
                recipient: "r".repeat(64),
                body,
            })),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        // Whatever bytes or text a client sends, decoding answers (a frame or an error); it
        // never panics, and a binary frame over its bound is refused as too big.
        #[test]
        fn frame_decoding_is_total(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300), text in "\\PC{0,200}|[{}\\[\\]\",:a-z0-9\\\\]{0,200}") {
            let max_body = 64;
            let verdict = decode_frame(&Message::Binary(bytes.clone().into()), max_body);
            if bytes.len() > binary_frame_limit(max_body) {
                proptest::prop_assert!(matches!(verdict, Err(FrameError::TooBig)));
            }
            let _ = decode_frame(&Message::Text(text.into()), max_body);
        }

        // Any body a client may send (any characters, at most the limit in UTF-8 bytes) fits a
        // frame in both formats and decodes back to the same send.
        #[test]
        fn every_body_within_the_limit_fits_a_frame(chars in proptest::collection::vec(proptest::char::any(), 0..200), max_body in 1usize..800) {
            let mut body = String::new();
            for c in chars {
                if body.len() + c.len_utf8() > max_body {
                    break;
                }
                body.push(c);
            }
            let frame = send(body);
            let json = serde_json::to_string(&frame).expect("serialises");
            proptest::prop_assert!(json.len() <= frame_limit(max_body), "{} > {}", json.len(), frame_limit(max_body));
            let decoded = decode_frame(&Message::Text(json.into()), max_body).expect("decodes");
            proptest::prop_assert_eq!(&decoded, &(frame.clone(), Format::Json));
            let binary = frame.encode_to_vec();
            proptest::prop_assert!(binary.len() <= binary_frame_limit(max_body));
            let decoded = decode_frame(&Message::Binary(binary.into()), max_body).expect("decodes");
            proptest::prop_assert_eq!(&decoded, &(frame, Format::Binary));
        }
    }

    fn chat(conversation: &str, seq: u64) -> ChatMessage {
        ChatMessage {
            conversation: conversation.into(),
            seq,
            ..Default::default()
        }
    }

    fn delivered(frames: &[ServerFrame]) -> Vec<(String, u64)> {
        frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(server_frame::Kind::Deliver(d)) => d.message.as_ref(),
                _ => None,
            })
            .map(|m| (m.conversation.clone(), m.seq))
            .collect()
    }

    impl Writer {
        /// One queued item's frames alone.
        fn frames(&mut self, item: Outgoing) -> Result<Vec<ServerFrame>, Close> {
            let mut out = Vec::new();
            self.frames_into(item, &mut out).map(|()| out)
        }
    }

    /// The codes of the error frames among `frames`, in order.
    fn error_codes(frames: &[ServerFrame]) -> Vec<&str> {
        frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(server_frame::Kind::Error(e)) => Some(e.code.as_str()),
                _ => None,
            })
            .collect()
    }

    /// A send refused for the user's rate says when to retry, in whole milliseconds rounded up
    /// (never 0, which would say nothing); other refusals say nothing.
    #[test]
    fn a_rate_limited_refusal_carries_its_wait_in_milliseconds() {
        let wait_of = |frame: ServerFrame| match frame.kind {
            Some(server_frame::Kind::Error(e)) => (e.code, e.retry_after_ms, e.client_message_id),
            other => panic!("{other:?}"),
        };
        let limited = |wait| SendError::RateLimited { retry_after: wait };
        for (wait, ms) in [
            (Duration::ZERO, 1),
            (Duration::from_nanos(1), 1),
            (Duration::from_micros(9_999), 10),
            (Duration::from_millis(10), 10),
            (Duration::from_millis(10) + Duration::from_nanos(1), 11),
        ] {
            assert_eq!(
                wait_of(refusal(&limited(wait), "c1".into())),
                ("rate_limited".into(), ms, "c1".into()),
                "{wait:?}"
            );
        }
        let (_, ms, _) = wait_of(refusal(&SendError::TooManyInFlight, "c2".into()));
        assert_eq!(ms, 0);
    }

    /// A conversation a sync could not read gets nothing live (it would come after a gap) until
    /// a later sync reads it; the others go on.
    #[test]
    fn a_conversation_left_out_of_a_sync_is_not_pushed_until_a_sync_reads_it() {
        let mut w = Writer {
            last_sent: HashMap::new(),
            syncing: 1,
            held: Vec::new(),
            first_sync_pending: false,
        };
        let partial = SyncAnswer {
            incomplete: Some(SyncIncomplete::Partial {
                peers: vec!["b".into()],
                conversations: vec!["a:b".into()],
            }),
            messages: vec![chat("a:c", 1)],
            ..SyncAnswer::default()
        };
        // Held during the sync, released after it: only the readable conversation's.
        let held = w
            .frames(Outgoing::Live(Box::new(chat("a:b", 2))))
            .expect("held");
        assert!(held.is_empty());
        let frames = w
            .frames(Outgoing::Synced(Box::new(partial)))
            .expect("frames");
        assert_eq!(delivered(&frames), [("a:c".to_owned(), 1)]);
        assert_eq!(error_codes(&frames), ["sync_failed"]);
        let done = frames.iter().find_map(|f| match &f.kind {
            Some(server_frame::Kind::SyncDone(d)) => Some(d.clone()),
            _ => None,
        });
        assert_eq!(done.expect("sync done").unavailable_peers, ["b"]);
        let live = w
            .frames(Outgoing::Live(Box::new(chat("a:b", 3))))
            .expect("live");
        assert!(delivered(&live).is_empty(), "after the gap: not pushed");
        let live = w
            .frames(Outgoing::Live(Box::new(chat("a:c", 2))))
            .expect("live");
        assert_eq!(delivered(&live), [("a:c".to_owned(), 2)]);

        // The next sync reads it: from then on it is pushed like any other.
        w.syncing += 1;
        let full = SyncAnswer {
            messages: vec![chat("a:b", 1), chat("a:b", 2), chat("a:b", 3)],
            ..SyncAnswer::default()
        };
        let frames = w.frames(Outgoing::Synced(Box::new(full))).expect("frames");
        assert_eq!(delivered(&frames).len(), 3);
        let live = w
            .frames(Outgoing::Live(Box::new(chat("a:b", 4))))
            .expect("live");
        assert_eq!(delivered(&live), [("a:b".to_owned(), 4)]);
    }

    /// Items taken from the mailbox together become one write: every item's frames, in the
    /// items' order; an item that cannot be sent ends the write with the close, after the frames
    /// of the items before it.
    #[test]
    fn items_taken_together_keep_their_order_and_a_failing_one_closes_after_those_before() {
        let mut w = Writer {
            last_sent: HashMap::new(),
            syncing: 0,
            held: Vec::new(),
            first_sync_pending: false,
        };
        let notice =
            |code: &str| Outgoing::Frame(Box::new(error_frame(code, String::new(), String::new())));
        let live = |c: &str, seq| Outgoing::Live(Box::new(chat(c, seq)));
        let items = vec![
            live("a:b", 1),
            notice("first"),
            live("a:c", 1),
            live("a:b", 1), // a repeat: sent once
            live("a:b", 2),
        ];
        let (frames, close) = w.frames_of_all(items);
        assert_eq!(close, None);
        let kinds: Vec<String> = frames
            .iter()
            .map(|f| match &f.kind {
                Some(server_frame::Kind::Deliver(d)) => {
                    let m = d.message.as_ref().expect("message");
                    format!("{}#{}", m.conversation, m.seq)
                }
                Some(server_frame::Kind::Error(e)) => e.code.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["a:b#1", "first", "a:c#1", "a:b#2"]);

        // A sync runs and its hold is full: the next live message cannot be held.
        w.syncing = 1;
        w.held = (1..=MAX_HELD as u64).map(|seq| chat("a:d", seq)).collect();
        let (frames, close) =
            w.frames_of_all(vec![notice("before"), live("a:e", 1), notice("after")]);
        assert_eq!(close, Some(Close::TooManyHeld));
        assert_eq!(error_codes(&frames), ["before"]);
    }

    #[test]
    fn a_body_of_control_characters_at_the_limit_fits_a_json_frame() {
        // The worst case: every byte escapes to six.
        let frame = send("\u{1}".repeat(4096));
        let json = serde_json::to_string(&frame).expect("serialises");
        assert!(json.len() > 6 * 4096 && json.len() <= frame_limit(4096));
    }

    /// The connection's future is most of what an idle connection costs. With tokio's task
    /// header and trailer it must fit in 1 KiB, an allocator size class (tokio rounds a task up
    /// to 128 bytes): a few bytes more and every connection takes 1.25 KiB.
    #[test]
    fn a_connection_task_fits_in_one_kib() {
        let size = future_size(serve);
        eprintln!("serve future: {size} bytes");
        assert!(
            size + TASK_OVERHEAD <= 1024,
            "serve's future is {size} bytes"
        );
    }
}
