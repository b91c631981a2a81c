//! A websocket session that reconnects and resumes, on top of the client library.
//!
//! The library can reconnect by itself (`Options::reconnect`), but it reconnects after every
//! close, including 4001 "replaced by a newer connection of the same user": two sessions of one
//! user (say `chat listen` and the web client) would then replace each other, the web client
//! (which does not retry after 4001) losing. So the library runs without reconnection and this
//! wrapper reconnects instead: with jittered backoff (see [`reconnect_backoff`]), resuming from the last sequence held per
//! conversation, settling a send the drop left unanswered over REST with the same client message
//! id (the server turns a repeat into the original message), stopping on 4001 and on a refused
//! token.

use std::collections::VecDeque;
use std::time::Duration;

use chat_client::{Backoff, Client, ClientError, Event, Options, STABLE_CONNECTION};
use chat_proto::v1::Accepted;
use tokio::time::Instant;

use crate::failure::Failure;
use crate::session::Session;

/// Longest wait for a websocket connection to open (the library bounds only the welcome).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The shortest wait before a reconnection attempt.
const BACKOFF_FLOOR: Duration = Duration::from_millis(100);
/// The first attempt's window ends here; each later window is twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before an attempt.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The reconnection schedule: a random wait in `[100 ms, 500 ms]` before the first attempt,
/// the window's end doubling per failed attempt up to 5 s. Random, so that the users of a
/// gateway that went away do not all come back to the next one at the same moments.
pub fn reconnect_backoff() -> Backoff {
    Backoff::new(BACKOFF_FLOOR, FIRST_BACKOFF, MAX_BACKOFF)
}

pub struct Connection {
    session: Session,
    auto_ack: bool,
    client: Client,
    /// When the current connection opened: one that held for
    /// [`STABLE_CONNECTION`] starts the schedule over when it drops.
    opened_at: Instant,
    /// Where the reconnection schedule is: kept across drops that come soon after a connect,
    /// so a server that accepts and drops at once sees the waits grow.
    backoff: Backoff,
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
            opened_at: Instant::now(),
            backoff: reconnect_backoff(),
            queue: VecDeque::new(),
        })
    }

    async fn open_client(
        session: &Session,
        auto_ack: bool,
        resume_from: std::collections::HashMap<String, u64>,
    ) -> Result<Client, Failure> {
        let mut options = Options::new(&session.server.ws, &session.token);
        options.tls = session.server.tls.clone();
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

    /// Connects again with jittered backoff, resuming after the last sequence held per
    /// conversation. Gives up only when the token is refused (it expired, or the server's key
    /// changed).
    async fn reconnect(&mut self) -> Result<(), Failure> {
        let resume_from = self.client.last_seq();
        if self.opened_at.elapsed() >= STABLE_CONNECTION {
            self.backoff.reset();
        }
        loop {
            tokio::time::sleep(self.backoff.next_delay()).await;
            match Self::open_client(&self.session, self.auto_ack, resume_from.clone()).await {
                Ok(client) => {
                    self.client = client;
                    self.opened_at = Instant::now();
                    return Ok(());
                }
                Err(f @ Failure::Unauthorized { .. }) => return Err(f),
                Err(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_waits_stay_between_the_floor_and_a_doubling_ceiling() {
        let mut backoff = reconnect_backoff();
        let mut ceilings = Vec::new();
        for _ in 0..200 {
            let ceiling = backoff.ceiling();
            ceilings.push(ceiling.as_millis());
            let wait = backoff.next_delay();
            assert!(
                (BACKOFF_FLOOR..=ceiling).contains(&wait),
                "{wait:?} outside [{BACKOFF_FLOOR:?}, {ceiling:?}]"
            );
        }
        assert_eq!(ceilings[..6], [500, 1000, 2000, 4000, 5000, 5000]);
        assert!(ceilings.iter().all(|c| *c <= MAX_BACKOFF.as_millis()));
        backoff.reset();
        assert_eq!(backoff.ceiling(), FIRST_BACKOFF);
    }
}
