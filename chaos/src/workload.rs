//! The workload: `conversations` pairs of users; in each, one user sends to the other at a steady
//! average rate with a unique client message id per message, in pipelined bursts (several sends
//! in flight on the socket, as a client flushing its outbox does), and the other records what it
//! is shown and acks it. Every client logs what it sent (and in which order), had accepted,
//! received and acked, for the checker.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use chat_client::{Client, ClientError, Event, Options};
use chat_common::auth::TokenIssuer;
use chat_common::ids::UserId;
use chat_proto::v1::Accepted;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util_shim::CancellationToken;

/// A tiny stand-in for a cancellation token (the chaos crate keeps its dependencies few).
mod tokio_util_shim {
    use tokio::sync::watch;

    #[derive(Clone)]
    pub struct CancellationToken(watch::Sender<bool>, watch::Receiver<bool>);

    impl CancellationToken {
        pub fn new() -> Self {
            let (tx, rx) = watch::channel(false);
            Self(tx, rx)
        }
        pub fn cancel(&self) {
            let _ = self.0.send(true);
        }
        pub async fn cancelled(&self) {
            let mut rx = self.1.clone();
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

/// One accepted message, as its sender knows it.
#[derive(Clone, Debug)]
pub struct Sent {
    /// Index of the conversation.
    pub conversation: usize,
    pub client_message_id: String,
    pub accepted_at: Instant,
    /// Position, among the send frames the sender issued in this conversation, of this message's
    /// first send: the order the sender sent its messages in.
    pub first_send: u64,
    /// Position of the send that was accepted: later than `first_send` when the workload sent
    /// the message again after a refusal or a timeout (the client library's own repeats after a
    /// reconnect are not counted: they must keep the order).
    pub accepted_send: u64,
}

/// What the workload observed.
#[derive(Default)]
pub struct Log {
    /// message id -> how it was sent and accepted.
    pub accepted: HashMap<String, Sent>,
    /// Sends that never got an answer (the run ended first).
    pub unanswered: u64,
    /// Per conversation, the messages the recipient was shown: (message id, seq, at).
    pub shown: Vec<Vec<(String, u64, Instant)>>,
    /// Repeats the client library dropped (duplicates on the wire), summed over recipients.
    pub wire_duplicates: u64,
    /// Errors either client of a conversation was shown: a send refused or timed out (sent
    /// again), an error frame: (conversation, when, what).
    pub errors: Vec<(usize, Instant, String)>,
}

pub struct Workload {
    pub log: Arc<Mutex<Log>>,
    stop_sending: CancellationToken,
    stop_all: CancellationToken,
    senders: Vec<tokio::task::JoinHandle<()>>,
    receivers: Vec<tokio::task::JoinHandle<()>>,
}

fn lock(l: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

impl Workload {
    /// Connects every client and starts sending `rate` messages per second in all.
    /// Each sender sends `burst` messages at once, pipelined, every `burst` periods.
    pub async fn start(
        gateways: &[String],
        conversations: usize,
        rate: f64,
        burst: usize,
        run: &str,
    ) -> anyhow::Result<Self> {
        let burst = burst.max(1);
        // Room for a few bursts while a fault holds them back, far below the gateway's
        // MAX_IN_FLIGHT (256): the sender waits for room like a client with a bounded outbox.
        let window = 4 * burst;
        let issuer = TokenIssuer::hs256(
            crate::stack::SECRET.as_bytes(),
            chat_common::auth::DEFAULT_ISSUER,
            chat_common::auth::DEFAULT_AUDIENCE,
        );
        let log = Arc::new(Mutex::new(Log {
            shown: vec![Vec::new(); conversations],
            ..Log::default()
        }));
        let (stop_sending, stop_all) = (CancellationToken::new(), CancellationToken::new());
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        let period = Duration::from_secs_f64(conversations as f64 / rate);
        for i in 0..conversations {
            let (a, b) = (format!("{run}{i}a"), format!("{run}{i}b"));
            let options = |user: &str, first: usize| -> anyhow::Result<Options> {
                let token = issuer.issue(&UserId::parse(user)?, 24 * 3600)?;
                let mut o = Options::new(&gateways[first % gateways.len()], &token);
                o.urls = (0..gateways.len())
                    .map(|k| gateways[(first + k) % gateways.len()].clone())
                    .collect();
                o.reconnect = true;
                Ok(o)
            };
            let mut receiver = Client::connect_with(options(&b, i + 1)?).await?;
            let sender = Client::connect_with(options(&a, i)?).await?;

            // Recipient: record and ack each message shown.
            let (l, stop) = (log.clone(), stop_all.clone());
            receivers.push(tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        _ = stop.cancelled() => break,
                        e = receiver.next_event() => e,
                    };
                    match event {
                        Some(Event::Message(m)) => {
                            lock(&l).shown[i].push((m.message_id.clone(), m.seq, Instant::now()));
                            let _ = receiver.ack(&m.sender, m.seq);
                        }
                        Some(Event::Error { code, .. }) => {
                            lock(&l)
                                .errors
                                .push((i, Instant::now(), format!("receiver: {code}")));
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                lock(&l).wire_duplicates += receiver.wire_duplicates();
                receiver.close();
            }));

            // Sender: a burst of `burst` sends every `burst` periods, each sent without waiting
            // for the one before it to be accepted (at most `window` in flight); each message is
            // sent again with its id after a refusal or a timeout, until accepted.
            let (l, stop) = (log.clone(), stop_sending.clone());
            senders.push(tokio::spawn(async move {
                let issued = AtomicU64::new(0);
                let mut in_flight = FuturesUnordered::new();
                let mut tick = tokio::time::interval(period * burst as u32);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        Some(outcome) = in_flight.next(), if !in_flight.is_empty() => {
                            if let Some(again) = record(&l, outcome) {
                                in_flight.push(Box::pin(attempt(&sender, &issued, &b, again)));
                            }
                        }
                        _ = tick.tick(), if in_flight.len() + burst <= window => {
                            for _ in 0..burst {
                                n += 1;
                                let pending = Pending::first(i, n);
                                let mut send = Box::pin(attempt(&sender, &issued, &b, pending));
                                // Poll it once now, so its frame is queued on the socket before
                                // the next one's: the sends leave in the order they were made.
                                match issue(send.as_mut()).await {
                                    Poll::Pending => in_flight.push(send),
                                    Poll::Ready(outcome) => {
                                        if let Some(again) = record(&l, outcome) {
                                            in_flight.push(Box::pin(attempt(&sender, &issued, &b, again)));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                // The sends in flight when sending stopped are waited for like any other.
                while let Some(outcome) = in_flight.next().await {
                    if let Some(again) = record(&l, outcome) {
                        in_flight.push(Box::pin(attempt(&sender, &issued, &b, again)));
                    }
                }
                drop(in_flight);
                sender.close();
            }));
        }
        Ok(Self {
            log,
            stop_sending,
            stop_all,
            senders,
            receivers,
        })
    }

    pub fn stop_sending(&self) {
        self.stop_sending.cancel();
    }

    /// After `stop_sending`: waits for the senders to finish the sends they had in flight (one
    /// accepted after sending stopped must be waited for like any other), then until every
    /// accepted message was shown, or `timeout`; true if all arrived.
    pub async fn settle(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for sender in std::mem::take(&mut self.senders) {
            if tokio::time::timeout_at(deadline, sender).await.is_err() {
                return false;
            }
        }
        loop {
            {
                let log = lock(&self.log);
                let shown: usize = log.shown.iter().map(Vec::len).sum();
                if shown >= log.accepted.len() {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn finish(self) -> Arc<Mutex<Log>> {
        self.stop_sending.cancel();
        self.stop_all.cancel();
        for t in self.senders.into_iter().chain(self.receivers) {
            let _ = t.await;
        }
        self.log
    }
}

/// A message to send (again).
struct Pending {
    conversation: usize,
    n: u64,
    /// Sends made so far.
    tries: u32,
    /// Position of its first send, once made.
    first_send: Option<u64>,
}

impl Pending {
    fn first(conversation: usize, n: u64) -> Self {
        Self {
            conversation,
            n,
            tries: 0,
            first_send: None,
        }
    }

    fn client_message_id(&self) -> String {
        format!("{}-{}", self.conversation, self.n)
    }
}

/// How one send ended.
struct Outcome {
    pending: Pending,
    /// Position of this send among the sender's sends in the conversation.
    send: u64,
    result: Result<Accepted, ClientError>,
}

/// A send is given up after this many tries (and counted as unanswered).
const MAX_TRIES: u32 = 20;
/// Pause before sending a refused or timed-out message again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Sends `pending` once (after a pause when it is a retry). The send's position is taken in the
/// same poll that queues its frame, so positions follow the order of the frames.
async fn attempt(client: &Client, issued: &AtomicU64, to: &str, mut pending: Pending) -> Outcome {
    if pending.tries > 0 {
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    let cid = pending.client_message_id();
    // Every user's name starts with the run's id: every body starts with the run's canary
    // marker (`canary::marker`), which the delete-on-ack scan looks for on disk.
    let body = format!("chaos-canary {to} {cid}");
    let send = issued.fetch_add(1, Ordering::Relaxed);
    pending.first_send.get_or_insert(send);
    pending.tries += 1;
    let result = client.send_with_id(&cid, to, &body).await;
    Outcome {
        pending,
        send,
        result,
    }
}

/// Polls `f` once.
async fn issue<F: Future>(mut f: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
}

/// Logs how a send ended; returns the message when it is to be sent again.
fn record(log: &Mutex<Log>, outcome: Outcome) -> Option<Pending> {
    let Outcome {
        pending,
        send,
        result,
    } = outcome;
    match result {
        Ok(acc) => {
            let sent = Sent {
                conversation: pending.conversation,
                client_message_id: pending.client_message_id(),
                accepted_at: Instant::now(),
                first_send: pending.first_send.unwrap_or(send),
                accepted_send: send,
            };
            lock(log).accepted.insert(acc.message_id, sent);
            None
        }
        Err(e @ (ClientError::Refused { .. } | ClientError::Timeout(_)))
            if pending.tries < MAX_TRIES =>
        {
            let what = format!("sender: {e}");
            lock(log)
                .errors
                .push((pending.conversation, Instant::now(), what));
            Some(pending)
        }
        Err(_) => {
            lock(log).unanswered += 1;
            None
        }
    }
}
