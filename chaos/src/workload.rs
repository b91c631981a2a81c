//! The workload: `conversations` pairs of users; in each, one user sends to the other at a steady
//! rate with a unique client message id per message, and the other records what it is shown and
//! acks it. Every client logs what it sent, had accepted, received and acked, for the checker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_client::{Client, ClientError, Event, Options};
use chat_common::auth::TokenIssuer;
use chat_common::ids::UserId;
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

/// What the workload observed.
#[derive(Default)]
pub struct Log {
    /// message id -> (conversation index, client message id, accepted at)
    pub accepted: HashMap<String, (usize, String, Instant)>,
    /// Sends that never got an answer (the run ended first).
    pub unanswered: u64,
    /// Per conversation, the messages the recipient was shown: (message id, seq, at).
    pub shown: Vec<Vec<(String, u64, Instant)>>,
    /// Repeats the client library dropped (duplicates on the wire), summed over recipients.
    pub wire_duplicates: u64,
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
    pub async fn start(
        gateways: &[String],
        conversations: usize,
        rate: f64,
        run: &str,
    ) -> anyhow::Result<Self> {
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
                        Some(_) => {}
                        None => break,
                    }
                }
                lock(&l).wire_duplicates += receiver.wire_duplicates();
                receiver.close();
            }));

            // Sender: a steady pace; each message retried with its id until accepted.
            let (l, stop) = (log.clone(), stop_sending.clone());
            senders.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    n += 1;
                    let cid = format!("{i}-{n}");
                    let body = format!("m {cid}");
                    let mut accepted = None;
                    for _ in 0..20 {
                        match sender.send_with_id(&cid, &b, &body).await {
                            Ok(acc) => {
                                accepted = Some(acc);
                                break;
                            }
                            Err(ClientError::Refused { .. }) | Err(ClientError::Timeout(_)) => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(_) => break,
                        }
                    }
                    let mut log = lock(&l);
                    match accepted {
                        Some(acc) => {
                            log.accepted
                                .insert(acc.message_id, (i, cid, Instant::now()));
                        }
                        None => log.unanswered += 1,
                    }
                }
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
