//! The sockets this gateway holds, by user.
//!
//! One live session per user: a new connection replaces the previous one, which is told why
//! (close code 4001). Each session has a bounded queue; whoever pushes into it never waits, and a
//! session whose queue is full is closed (4008) so one slow reader cannot hold up the others.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chat_common::ids::UserId;
use chat_proto::v1::{ChatMessage, Failed, Receipt, ServerFrame};

use crate::error::{Close, SyncIncomplete};

/// What a connection's writer is asked to send. Every variant is boxed, so a queued item is two
/// words whatever the frame (a `ServerFrame` inline is several hundred bytes).
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A frame to send as is (accepted, error, receipt).
    Frame(Box<ServerFrame>),
    /// A live message from the outbound topic.
    Live(Box<ChatMessage>),
    /// The answer to a sync.
    Synced(Box<SyncAnswer>),
}

/// Pending messages, then receipts and failures of the user's own messages they may have missed.
#[derive(Debug, Default)]
pub(crate) struct SyncAnswer {
    /// Set when the pending messages could not be read (the client is told to sync again).
    pub(crate) incomplete: Option<SyncIncomplete>,
    pub(crate) messages: Vec<ChatMessage>,
    pub(crate) receipts: Vec<Receipt>,
    pub(crate) failures: Vec<Failed>,
}

/// A connection's mailbox: what its writer is asked to send, and whether it is asked to close.
///
/// One allocation per connection for both, and no preallocated slots: an idle connection holds
/// one of these for its whole life (tokio's mpsc allocates a block of 32 slots and a channel
/// state of about 1 KiB in all at creation; a separate kick would be another allocation).
/// Whoever pushes never waits: a full mailbox is the caller's signal that the socket does not
/// drain. A kick is seen even when the mailbox is full, and wins over what is queued.
/// It also counts the connection's sends still waiting for Kafka (`MAX_IN_FLIGHT`).
#[derive(Debug)]
pub(crate) struct Mailbox {
    state: Mutex<MailState>,
    /// Wakes the connection's task; `notify_one` keeps a permit when the task is not waiting,
    /// so a push or kick between its check and its wait is not missed.
    notify: tokio::sync::Notify,
    capacity: u32,
    max_in_flight: u32,
    in_flight: AtomicU32,
}

/// One send in flight on a connection; the count goes down when this is dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Mailbox>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
struct MailState {
    items: VecDeque<Outgoing>,
    kicked: Option<Close>,
    /// A ping is due (set by the gateway's ping timer; takes no queue slot).
    ping: bool,
    closed: bool,
}

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The mailbox holds `capacity` items: the socket is not draining.
    Full,
    /// The connection has ended.
    Closed,
}

/// Most queued items a connection's task takes at once: their frames go out in one write, with
/// one flush, so frames queued together (a user's push and receipt from one outbound batch, or
/// whatever queued while the task waited for a core) cost one send to the socket, not one each.
pub(crate) const MAX_ITEMS_AT_ONCE: usize = 64;

/// What the connection's task is to do next.
#[derive(Debug)]
pub(crate) enum Mail {
    /// The oldest queued items, in order: all of them, up to [`MAX_ITEMS_AT_ONCE`].
    Items(Vec<Outgoing>),
    Kicked(Close),
    /// Time to ping the peer (or to close, if it has not answered the last pings).
    Ping,
}

impl Mailbox {
    pub(crate) fn new(capacity: usize, max_in_flight: usize) -> Self {
        Self {
            state: Mutex::default(),
            notify: tokio::sync::Notify::new(),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            max_in_flight: u32::try_from(max_in_flight).unwrap_or(u32::MAX),
            in_flight: AtomicU32::new(0),
        }
    }

    /// Counts one more send in flight, or `None` if the connection has the most it may have.
    pub(crate) fn begin_send(self: &Arc<Self>) -> Option<InFlight> {
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_in_flight).then_some(n + 1)
            });
        taken.ok().map(|_| InFlight(self.clone()))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MailState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` without waiting.
    pub(crate) fn push(&self, item: Outgoing) -> Result<(), PushError> {
        {
            let mut st = self.state();
            if st.closed {
                return Err(PushError::Closed);
            }
            if st.items.len() >= self.capacity as usize {
                return Err(PushError::Full);
            }
            st.items.push_back(item);
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Queues `item`; a full mailbox closes the connection as a slow consumer (its messages stay
    /// pending and come back by sync). False if the connection has ended.
    pub(crate) fn push_or_kick(&self, item: Outgoing) -> bool {
        match self.push(item) {
            Ok(()) => true,
            Err(PushError::Full) => {
                metrics::counter!("gateway_slow_consumer_closed_total").increment(1);
                self.kick(Close::SlowConsumer);
                true
            }
            Err(PushError::Closed) => false,
        }
    }

    /// Asks the connection to close (the first reason given wins).
    pub(crate) fn kick(&self, why: Close) {
        {
            let mut st = self.state();
            if st.kicked.is_none() {
                st.kicked = Some(why);
            }
        }
        self.notify.notify_one();
    }

    /// Asks the connection to ping its peer (once, however often asked before it does).
    pub(crate) fn ping(&self) {
        {
            let mut st = self.state();
            if st.closed || st.ping {
                return;
            }
            st.ping = true;
        }
        self.notify.notify_one();
    }

    /// The next thing to do: a kick first, then a due ping, else the oldest queued items (up to
    /// [`MAX_ITEMS_AT_ONCE`]). Waits for one of them. Items taken no longer count against the
    /// capacity: a socket that does not drain holds at most `capacity` queued items beside the
    /// ones its task is writing.
    pub(crate) async fn next(&self) -> Mail {
        loop {
            {
                let mut st = self.state();
                if let Some(why) = st.kicked {
                    return Mail::Kicked(why);
                }
                if std::mem::take(&mut st.ping) {
                    return Mail::Ping;
                }
                if !st.items.is_empty() {
                    let n = st.items.len().min(MAX_ITEMS_AT_ONCE);
                    return Mail::Items(st.items.drain(..n).collect());
                }
                // Drained: an idle connection keeps no queue storage.
                if st.items.capacity() > 0 {
                    st.items = VecDeque::new();
                }
            }
            self.notify.notified().await;
        }
    }

    /// Resolves once kicked, with why (items are left queued).
    pub(crate) async fn kicked(&self) -> Close {
        loop {
            if let Some(why) = self.state().kicked {
                return why;
            }
            self.notify.notified().await;
        }
    }

    /// The connection has ended: drops what is queued and refuses later pushes.
    pub(crate) fn close(&self) {
        let mut st = self.state();
        st.closed = true;
        st.items = VecDeque::new();
    }
}

/// A registered connection.
#[derive(Clone, Debug)]
pub(crate) struct SessionHandle {
    pub(crate) conn_id: u64,
    pub(crate) epoch: u64,
    pub(crate) mailbox: Arc<Mailbox>,
}

/// All sessions of this gateway.
#[derive(Default)]
pub(crate) struct Sessions {
    by_user: RwLock<HashMap<UserId, SessionHandle>>,
    next_conn: AtomicU64,
    last_epoch: AtomicU64,
}

impl Sessions {
    /// A fresh connection id.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A presence epoch: microseconds since the Unix epoch, strictly increasing in this process.
    pub(crate) fn next_epoch(&self) -> u64 {
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
    pub(crate) fn register(&self, user: &UserId, handle: SessionHandle) -> Option<SessionHandle> {
        let mut map = self.by_user.write().unwrap_or_else(|p| p.into_inner());
        let old = map.insert(user.clone(), handle);
        metrics::gauge!("gateway_connections").set(map.len() as f64);
        old
    }

    /// Removes `user`'s session if it is still connection `conn_id`; true if it was.
    pub(crate) fn unregister(&self, user: &UserId, conn_id: u64) -> bool {
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
    pub(crate) fn push(&self, user: &str, item: Outgoing) -> bool {
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
        handle.mailbox.push_or_kick(item)
    }

    /// Whether `user` has a session here.
    pub(crate) fn holds(&self, user: &str) -> bool {
        let Ok(user) = UserId::parse(user) else {
            return false;
        };
        let map = self.by_user.read().unwrap_or_else(|p| p.into_inner());
        map.contains_key(&user)
    }

    /// Asks every session to ping its peer: one timer for the gateway, not one per socket.
    pub(crate) fn ping_all(&self) {
        let map = self.by_user.read().unwrap_or_else(|p| p.into_inner());
        for handle in map.values() {
            handle.mailbox.ping();
        }
    }

    /// Asks every session to close (shutdown).
    pub(crate) fn kick_all(&self, why: Close) {
        let map = self.by_user.read().unwrap_or_else(|p| p.into_inner());
        for handle in map.values() {
            handle.mailbox.kick(why);
        }
    }

    /// Closes `user`'s session here if it is older than `epoch` (the user connected elsewhere).
    pub(crate) fn replaced_elsewhere(&self, user: &str, epoch: u64) {
        let Ok(user) = UserId::parse(user) else {
            return;
        };
        let map = self.by_user.read().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = map.get(&user).filter(|h| h.epoch < epoch) {
            h.mailbox.kick(Close::Replaced);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u64) -> Outgoing {
        Outgoing::Live(Box::new(ChatMessage {
            seq: n,
            ..ChatMessage::default()
        }))
    }

    /// The seqs of the items taken, in order (`None` for any other mail).
    fn seqs_of(mail: Mail) -> Option<Vec<u64>> {
        match mail {
            Mail::Items(items) => items
                .into_iter()
                .map(|i| match i {
                    Outgoing::Live(m) => Some(m.seq),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    fn seq_of(mail: Mail) -> Option<u64> {
        match seqs_of(mail)?.as_slice() {
            [seq] => Some(*seq),
            _ => None,
        }
    }

    #[tokio::test]
    async fn items_come_out_together_in_order_and_a_full_mailbox_refuses() {
        let mb = Mailbox::new(2, 1);
        assert_eq!(mb.push(frame(1)), Ok(()));
        assert_eq!(mb.push(frame(2)), Ok(()));
        assert_eq!(mb.push(frame(3)), Err(PushError::Full));
        assert_eq!(seqs_of(mb.next().await), Some(vec![1, 2]));
        assert_eq!(mb.push(frame(3)), Ok(()));
        assert_eq!(mb.push(frame(4)), Ok(()));
        assert_eq!(mb.push(frame(5)), Err(PushError::Full));
        assert_eq!(seqs_of(mb.next().await), Some(vec![3, 4]));
    }

    #[tokio::test]
    async fn a_long_queue_comes_out_in_order_at_most_so_many_items_at_once() {
        let queued = 2 * MAX_ITEMS_AT_ONCE + 5;
        let mb = Mailbox::new(queued, 1);
        for seq in 1..=queued as u64 {
            assert_eq!(mb.push(frame(seq)), Ok(()));
        }
        let mut sizes = Vec::new();
        let mut seqs = Vec::new();
        while seqs.len() < queued {
            let taken = seqs_of(mb.next().await).expect("items");
            sizes.push(taken.len());
            seqs.extend(taken);
        }
        assert_eq!(sizes, [MAX_ITEMS_AT_ONCE, MAX_ITEMS_AT_ONCE, 5]);
        assert_eq!(seqs, (1..=queued as u64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_kick_gets_through_a_full_mailbox_and_wins_over_items() {
        let mb = Mailbox::new(1, 1);
        assert!(mb.push_or_kick(frame(1)));
        // Full: the second push kicks as a slow consumer.
        assert!(mb.push_or_kick(frame(2)));
        mb.kick(Close::Replaced);
        assert!(matches!(mb.next().await, Mail::Kicked(Close::SlowConsumer)));
        assert_eq!(mb.kicked().await, Close::SlowConsumer);
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_by_a_push_from_another_task() {
        let mb = Arc::new(Mailbox::new(4, 1));
        let waiter = tokio::spawn({
            let mb = mb.clone();
            async move { seq_of(mb.next().await) }
        });
        tokio::task::yield_now().await;
        let pusher = tokio::spawn({
            let mb = mb.clone();
            async move { mb.push(frame(7)) }
        });
        assert_eq!(pusher.await.ok(), Some(Ok(())));
        assert_eq!(waiter.await.ok(), Some(Some(7)));
    }

    #[tokio::test]
    async fn a_closed_mailbox_refuses_pushes() {
        let mb = Mailbox::new(4, 1);
        assert_eq!(mb.push(frame(1)), Ok(()));
        mb.close();
        assert_eq!(mb.push(frame(2)), Err(PushError::Closed));
        assert!(!mb.push_or_kick(frame(3)));
    }

    #[test]
    fn sends_in_flight_are_bounded_and_counted_down_when_done() {
        let mb = Arc::new(Mailbox::new(4, 2));
        let a = mb.begin_send();
        let b = mb.begin_send();
        assert!(a.is_some() && b.is_some());
        assert!(mb.begin_send().is_none());
        drop(a);
        assert!(mb.begin_send().is_some());
    }
}
