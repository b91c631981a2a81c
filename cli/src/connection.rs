//! A websocket session that reconnects and resumes, on top of the client library.
//!
//! The library can reconnect by itself (`Options::reconnect`), but it reconnects after every
//! close, including 4001 "replaced by a newer connection of the same user": two sessions of one
//! user (say `chat listen` and the web client) would then replace each other, the web client
//! (which does not retry after 4001) losing. So the library runs without reconnection and this
//! wrapper reconnects instead: with backoff, resuming from the last sequence held per
//! conversation, settling a send the drop left unanswered over REST with the same client message
//! id (the server turns a repeat into the original message), stopping on 4001 and on a refused
//! token.

use std::collections::VecDeque;
use std::time::Duration;

use chat_client::{Client, ClientError, Event, Options};
use chat_proto::v1::Accepted;

use crate::failure::Failure;
use crate::session::Session;

/// Longest wait for a websocket connection to open (the library bounds only the welcome).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Connection {
    session: Session,
    auto_ack: bool,
    client: Client,
    /// Events read from a connection that ended, not handed out yet.
    queue: VecDeque<Event>,
}

impl Connection {
    /// Opens the first connection; failing to is an error (no retries: the server is wrong,
    /// down, or refuses the token, and the user should know now).
    pub async fn open(session: &Session, auto_ack: bool) -> Result<Self, Failure> {
        let client = Self::open_client(session, auto_ack, Default::default()).await?;
        Ok(Self {
            session: session.clone(),
            auto_ack,
            client,
            queue: VecDeque::new(),
        })
    }

    async fn open_client(
        session: &Session,
        auto_ack: bool,
        resume_from: std::collections::HashMap<String, u64>,
    ) -> Result<Client, Failure> {
        let mut options = Options::new(&session.server.ws, &session.token);
        options.auto_ack = auto_ack;
        options.resume_from = resume_from;
        match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_with(options)).await {
            Ok(r) => r.map_err(|e| session.failure(e)),
            Err(_) => Err(Failure::Unreachable {
                server: session.server.http.clone(),
                detail: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            }),
        }
    }

    /// The current client (for acks, syncs and its resume state).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The next event; reconnects when the connection ends. `Disconnected` events are handed
    /// out (except 4001, which ends the session with `Failure::Replaced`), and each reconnection
    /// starts with a `Connected`.
    pub async fn next_event(&mut self) -> Result<Event, Failure> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(e);
            }
            match self.client.next_event().await {
                Some(Event::Disconnected { code: 4001, .. }) => return Err(Failure::Replaced),
                Some(e) => return Ok(e),
                None => self.reconnect().await?,
            }
        }
    }

    /// Sends and waits for `accepted`. If the connection drops first, reconnects and asks again
    /// over REST with the same client message id: the answer is then definitive (the original
    /// message if the first try got through, or the server's refusal; an over-size frame, for
    /// one, makes the gateway drop the socket without saying why).
    pub async fn send(&mut self, to: &str, body: &str) -> Result<Accepted, Failure> {
        let client_message_id = uuid::Uuid::new_v4().to_string();
        match self.client.send_with_id(&client_message_id, to, body).await {
            Ok(a) => Ok(a),
            Err(ClientError::Closed) => {
                // Keep what the ended connection delivered.
                while let Some(e) = self.client.next_event().await {
                    if let Event::Disconnected { code: 4001, .. } = e {
                        return Err(Failure::Replaced);
                    }
                    self.queue.push_back(e);
                }
                self.reconnect().await?;
                self.session.send_rest(&client_message_id, to, body).await
            }
            Err(e) => Err(self.session.failure(e)),
        }
    }

    /// Connects again with backoff, resuming after the last sequence held per conversation.
    /// Gives up only when the token is refused (it expired, or the server's key changed).
    async fn reconnect(&mut self) -> Result<(), Failure> {
        let resume_from = self.client.last_seq();
        let mut backoff = FIRST_BACKOFF;
        loop {
            tokio::time::sleep(backoff).await;
            match Self::open_client(&self.session, self.auto_ack, resume_from.clone()).await {
                Ok(client) => {
                    self.client = client;
                    return Ok(());
                }
                Err(f @ Failure::Unauthorized { .. }) => return Err(f),
                Err(_) => backoff = (backoff * 2).min(MAX_BACKOFF),
            }
        }
    }

    /// Closes the connection and waits (briefly) for the socket to close cleanly.
    pub async fn close(mut self) {
        self.client.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.client.next_event().await.is_some() {}
        })
        .await;
    }
}
