//! The gateway's service: everything the transports (websocket, REST, the outbound consumer)
//! ask of it goes through [`App`], whose state is private.
//!
//! - here: the sessions held and the presence they publish, the connection slots per address,
//!   the tasks to wait for at shutdown, readiness;
//! - `send`: sends, acks and presence records produced to Kafka, answered once durable;
//! - `read`: sync and history, the only reads of the store. Its rows are turned into the
//!   protocol's messages there, so the transports never see a store type.

mod read;
mod seal;
mod send;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chat_common::http::{NotReady, Ready};
use chat_common::ids::UserId;
use chat_common::kafka::Lanes;
use chat_common::presence::OnRoute;
use db_writer::Shards;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TrackedFuture;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::{Close, SendError};
use crate::sessions::{Mailbox, Outgoing, SessionHandle, Sessions};

pub(crate) use read::{ConversationPage, History, SyncCursor};
pub(crate) use seal::PushKeyReader;
pub(crate) use send::{Enqueue, PendingSend, PreparedSend};

/// Shared state of one gateway process.
pub(crate) struct App {
    config: Config,
    /// Produces sends, acks and presence (idempotent, so a sender's records keep their order),
    /// in two lanes: at once at a low rate, lingering at a high one.
    producer: Lanes,
    /// Read for sync and history; writes go through Kafka and the multiplexer.
    shards: Shards,
    sessions: Arc<Sessions>,
    /// Cancelled on SIGTERM: connections close with 1001 and the server drains.
    shutdown: CancellationToken,
    /// Every connection task and the work it spawns, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Sends per user, over every connection and REST.
    user_limiter: governor::DefaultKeyedRateLimiter<String>,
    /// Open connections per source address, counted from accept (HTTP or websocket; an upgrade
    /// keeps its connection's count).
    per_addr: Mutex<HashMap<IpAddr, usize>>,
    /// One permit per sync allowed to run at once (`MAX_CONCURRENT_SYNCS`).
    sync_slots: tokio::sync::Semaphore,
    /// Delete-on-ack mode: issues the keys bodies are sealed under (`seal`).
    keys: Option<seal::KeyIssuer>,
}

/// How long `/readyz` waits for each shard's answer (they are asked at once): a server
/// stopped refuses at once, a link cut answers nothing, and a load balancer's health check
/// gives up after a few seconds.
const SHARD_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// A quota of `per_sec` sustained with bursts up to `burst` (both at least 1).
fn quota((per_sec, burst): (u32, u32)) -> governor::Quota {
    let one = std::num::NonZeroU32::MIN;
    governor::Quota::per_second(std::num::NonZeroU32::new(per_sec).unwrap_or(one))
        .allow_burst(std::num::NonZeroU32::new(burst).unwrap_or(one))
}

impl App {
    /// The service, with the shards of `config` connected and a producer to its brokers.
    pub(crate) fn new(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let shards = Shards::connect(&config.shards).context("shards")?;
        let producer = config.kafka.lanes()?;
        let sync_slots = tokio::sync::Semaphore::new(config.max_concurrent_syncs.max(1));
        let keys = (config.retention == db_writer::Retention::DeleteOnAck)
            .then(|| seal::KeyIssuer::start(&shards));
        Ok(Self {
            keys,
            user_limiter: governor::RateLimiter::keyed(quota(config.user_rate)),
            config,
            producer,
            shards,
            sessions: Arc::default(),
            shutdown,
            tracker: TaskTracker::new(),
            per_addr: Mutex::default(),
            sync_slots,
        })
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Can this gateway serve: does Kafka answer, and at least one shard? Sends only need
    /// Kafka, and a shard down costs only the reads of what it holds (history 503, syncs that
    /// leave its conversations out), so one shard down leaves the gateway ready: were it not,
    /// every gateway would leave the load balancer at once and a partial fault would become a
    /// total one. Every shard down is not ready. Each answer sets `gateway_shard_up{shard}`
    /// (the alert on a shard down reads it) and names the shards down: in the log, and in the
    /// answer (`ready, degraded: shards down: …`, or the 503's when none answers).
    pub(crate) async fn ready(&self) -> Result<Ready, NotReady> {
        chat_common::http::kafka_ready(self.producer.producer().clone()).await?;
        let down = self.shards.down_shards(SHARD_PING_TIMEOUT).await;
        for shard in 0..self.shards.len() {
            let up = if down.iter().any(|d| d.shard == shard) {
                0.0
            } else {
                1.0
            };
            metrics::gauge!("gateway_shard_up", "shard" => shard.to_string()).set(up);
        }
        if down.is_empty() {
            return Ok(Ready::default());
        }
        let named = db_writer::ShardDown::list(&down);
        if down.len() == self.shards.len() {
            return Err(NotReady::new(
                "shards",
                format!("every shard is down: {named}"),
            ));
        }
        tracing::warn!(down = %named, "ready with shards down: their conversations cannot be read");
        Ok(Ready::degraded(format!("shards down: {named}")))
    }

    /// The frame rate limit of one new connection.
    pub(crate) fn connection_limiter(&self) -> governor::DefaultDirectRateLimiter {
        governor::RateLimiter::direct(quota(self.config.conn_rate))
    }
}

/// Tasks: shutdown waits for every connection and what it started.
impl App {
    /// Runs `task` in a task of its own, tracked.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// `future`, tracked (for a connection spawned elsewhere).
    pub(crate) fn track<F: std::future::Future>(&self, future: F) -> TrackedFuture<F> {
        self.tracker.track_future(future)
    }

    /// Waits up to `bound` for every tracked task, once no more are started; false if some
    /// were still running then.
    pub(crate) async fn drain(&self, bound: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(bound, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Waits up to `bound` for the producer's queued records to be delivered.
    pub(crate) fn flush(&self, bound: Duration) {
        self.producer.flush(bound);
    }
}

/// Holds one of a source address's connection slots; gives it back when dropped. Taken when
/// the connection is accepted, handed to the websocket if it upgrades (see `server`).
pub(crate) struct AddrSlot {
    app: Arc<App>,
    addr: IpAddr,
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        let mut map = self.app.per_addr.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.addr);
            }
        }
    }
}

impl App {
    /// Takes a connection slot for `addr`, or `None` when it already holds the maximum.
    pub(crate) fn addr_slot(self: &Arc<Self>, addr: IpAddr) -> Option<AddrSlot> {
        let mut map = self.per_addr.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(addr).or_insert(0);
        if *n >= self.config.max_conns_per_addr {
            return None;
        }
        *n += 1;
        Some(AddrSlot {
            app: self.clone(),
            addr,
        })
    }
}

/// Sessions: one per user on this gateway, and the presence records that say so.
impl App {
    /// Registers a new connection of `user` as their session, replacing (closing) the one they
    /// had here. Its presence is published by [`App::announce`].
    pub(crate) fn open_session(&self, user: &UserId) -> SessionHandle {
        let mailbox = Arc::new(Mailbox::new(
            self.config.socket_queue,
            self.config.max_in_flight,
        ));
        let session = SessionHandle {
            conn_id: self.sessions.next_conn_id(),
            epoch: self.sessions.next_epoch(),
            mailbox,
        };
        if let Some(old) = self.sessions.register(user, session.clone()) {
            old.mailbox.kick(Close::Replaced);
        }
        // Shutdown kicks every registered session; one registering meanwhile sees the flag.
        if self.shutdown.is_cancelled() {
            session.mailbox.kick(Close::GoingAway);
        }
        metrics::counter!("gateway_connections_opened_total").increment(1);
        tracing::info!(user = %user, conn_id = session.conn_id, "connected");
        session
    }

    /// Publishes that `user`'s `session` is on this gateway (messages for them are routed here
    /// from then on).
    pub(crate) async fn announce(
        &self,
        user: &UserId,
        session: &SessionHandle,
    ) -> Result<(), SendError> {
        self.publish_presence(user, session.epoch, true).await
    }

    /// Unregisters `session` and, if it was still `user`'s session here, publishes that they
    /// are offline.
    pub(crate) async fn close_session(&self, user: &UserId, session: &SessionHandle) {
        if self.sessions.unregister(user, session.conn_id) {
            if let Err(e) = self.publish_presence(user, session.epoch, false).await {
                tracing::warn!(user = %user, error = %e, "presence offline publish failed");
            }
        }
        metrics::counter!("gateway_connections_closed_total").increment(1);
        tracing::info!(user = %user, conn_id = session.conn_id, "disconnected");
    }

    /// Pushes `item` to `user`'s session without waiting; false if they have no session here.
    pub(crate) fn push_to(&self, user: &str, item: Outgoing) -> bool {
        self.sessions.push(user, item)
    }

    /// Whether `user` has a session here.
    pub(crate) fn holds(&self, user: &str) -> bool {
        self.sessions.holds(user)
    }

    /// Asks every session to ping its peer.
    pub(crate) fn ping_sessions(&self) {
        self.sessions.ping_all();
    }

    /// Asks every session to close, with `why`.
    pub(crate) fn close_sessions(&self, why: Close) {
        self.sessions.kick_all(why);
    }

    /// What to do when the presence log routes a user: a user holds one session, so when they
    /// connect to another gateway the session here is closed (4001), and the old device does
    /// not sit there receiving nothing.
    pub(crate) fn on_route(&self) -> OnRoute {
        let sessions = self.sessions.clone();
        let me = self.config.gateway_id.clone();
        Arc::new(move |user, route| {
            if route.online && route.gateway != me {
                sessions.replaced_elsewhere(user, route.epoch);
            }
        })
    }
}
