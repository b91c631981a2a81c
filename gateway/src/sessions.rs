//! The sockets this gateway holds, by user.
//!
//! One live session per user: a new connection replaces the previous one, which is told why
//! (close code 4001). Each session has a bounded queue; whoever pushes into it never waits, and a
//! session whose queue is full is closed (4008) so one slow reader cannot hold up the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use chat_common::ids::UserId;
use chat_proto::v1::{ChatMessage, Receipt, ServerFrame};
use tokio::sync::mpsc;

/// What a connection's writer is asked to send. Every variant is boxed: a queue allocates its
/// slots in blocks of 32 when created, and an unboxed frame would make that block about 5 KiB on
/// every idle connection.
#[derive(Debug)]
pub enum Outgoing {
    /// A frame to send as is (accepted, error, receipt).
    Frame(Box<ServerFrame>),
    /// A live message from the outbound topic.
    Live(Box<ChatMessage>),
    /// The answer to a sync.
    Synced(Box<SyncAnswer>),
}

/// Pending messages, then receipts the user may have missed.
#[derive(Debug, Default)]
pub struct SyncAnswer {
    pub messages: Vec<ChatMessage>,
    pub receipts: Vec<Receipt>,
}

/// Close codes this gateway uses (4000-4999 are application-defined).
pub mod close {
    /// Another connection of the same user replaced this one.
    pub const REPLACED: u16 = 4001;
    /// The socket did not drain its queue; reconnect and sync.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The peer did not answer pings for two intervals.
    pub const PING_TIMEOUT: u16 = 4002;
    /// Abuse, such as a flood past the rate limit (standard "policy violation").
    pub const POLICY: u16 = 1008;
    /// The server is shutting down (standard "going away").
    pub const GOING_AWAY: u16 = 1001;
    /// A frame or message over the size limit (standard "message too big").
    pub const TOO_BIG: u16 = 1009;
    /// Invalid UTF-8 in a text frame (standard "invalid frame payload data").
    pub const BAD_DATA: u16 = 1007;
    /// The server cannot serve (standard "internal error").
    pub const INTERNAL: u16 = 1011;
}

/// A request, from outside a connection's task, to close it with a code and reason.
/// Separate from the queue so it works even when the queue is full. No allocation of its own:
/// an idle connection holds one of these for its whole life.
#[derive(Debug, Default)]
pub struct Kick {
    notify: tokio::sync::Notify,
    reason: OnceLock<(u16, &'static str)>,
}

impl Kick {
    /// Asks the connection to close (the first reason given wins).
    pub fn kick(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set((code, reason));
        // Stores a permit if the connection is not waiting right now, so it is not missed.
        self.notify.notify_one();
    }

    /// Resolves once kicked, with the close code and reason.
    pub async fn kicked(&self) -> (u16, &'static str) {
        loop {
            if let Some(reason) = self.reason.get() {
                return *reason;
            }
            self.notify.notified().await;
        }
    }
}

/// A registered connection.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub conn_id: u64,
    pub epoch: u64,
    pub tx: mpsc::Sender<Outgoing>,
    pub kick: Arc<Kick>,
}

/// All sessions of this gateway.
#[derive(Default)]
pub struct Sessions {
    by_user: RwLock<HashMap<UserId, SessionHandle>>,
    next_conn: AtomicU64,
    last_epoch: AtomicU64,
}

impl Sessions {
    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A presence epoch: microseconds since the Unix epoch, strictly increasing in this process.
    pub fn next_epoch(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut last = self.last_epoch.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .last_epoch
                .compare_exchange(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }

    /// Registers `handle` as `user`'s session; returns the session it replaced.
    pub fn register(&self, user: &UserId, handle: SessionHandle) -> Option<SessionHandle> {
        let mut map = self.by_user.write().unwrap_or_else(|p| p.into_inner());
        let old = map.insert(user.clone(), handle);
        metrics::gauge!("gateway_connections").set(map.len() as f64);
        old
    }

    /// Removes `user`'s session if it is still connection `conn_id`; true if it was.
    pub fn unregister(&self, user: &UserId, conn_id: u64) -> bool {
        let mut map = self.by_user.write().unwrap_or_else(|p| p.into_inner());
        let ours = map.get(user).is_some_and(|h| h.conn_id == conn_id);
        if ours {
            map.remove(user);
        }
        metrics::gauge!("gateway_connections").set(map.len() as f64);
        ours
    }

    /// Pushes to `user`'s session without waiting. Returns false if the user has no session here.
    /// A full queue closes the session (its messages stay pending and come back by sync).
    pub fn push(&self, user: &str, item: Outgoing) -> bool {
        let Ok(user) = UserId::parse(user) else {
            return false;
        };
        let handle = {
            let map = self.by_user.read().unwrap_or_else(|p| p.into_inner());
            match map.get(&user) {
                Some(h) => h.clone(),
                None => return false,
            }
        };
        match handle.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("gateway_slow_consumer_closed_total").increment(1);
                handle.kick.kick(
                    close::SLOW_CONSUMER,
                    "socket not draining; reconnect to sync",
                );
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks every session to close (shutdown).
    pub fn kick_all(&self, code: u16, reason: &'static str) {
        let map = self.by_user.read().unwrap_or_else(|p| p.into_inner());
        for handle in map.values() {
            handle.kick.kick(code, reason);
        }
    }

    /// Closes `user`'s session here if it is older than `epoch` (the user connected elsewhere).
    pub fn replaced_elsewhere(&self, user: &str, epoch: u64) {
        let Ok(user) = UserId::parse(user) else {
            return;
        };
        let map = self.by_user.read().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = map.get(&user).filter(|h| h.epoch < epoch) {
            h.kick.kick(
                close::REPLACED,
                "replaced by a newer connection of the same user",
            );
        }
    }
}
