//! Records held aside while a shard they need is down, so that the other shards' records pass
//! (docs/design.md, "One shard down").
//!
//! A record needs the shard of its conversation (the message, the ack or the failure row) and
//! the home shards of both its users (their index rows, written before anything of it is
//! routed). While one of those is known to be down, the record is held, and so is every later
//! record of its conversation, whatever shards they need, so that each conversation keeps the
//! log's order: seqs are assigned, and pushes routed, in that order. The held records are tried
//! again, in log order, once the shard answers.
//!
//! Offsets: a partition's stored offset never passes its oldest record still held (or taken
//! back from holding and not finished yet), so a restart or the partition's next owner replays
//! from there. Every step of a record is idempotent, so records finished behind a held one are
//! only repeated. The holding is bounded: once full, the multiplexer stops reading new records
//! until the shard is back (the old behaviour, back-pressure instead of memory).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chat_common::ids::{ConversationKey, UserId};
use db_writer::inbound::{self, Inbound, InvalidRecord};
use db_writer::{IndexUpdates, Locator};
use rdkafka::message::{Message as _, OwnedMessage};

/// A record's place in the log: (topic, partition, offset).
pub(crate) type Position = (String, i32, i64);

/// One record as read and decoded.
pub(crate) struct Decoded {
    pub(crate) record: OwnedMessage,
    pub(crate) item: Result<Inbound, InvalidRecord>,
}

impl Decoded {
    pub(crate) fn new(record: OwnedMessage) -> Self {
        let item = inbound::decode(record.payload());
        Decoded { record, item }
    }

    pub(crate) fn position(&self) -> Position {
        (
            self.record.topic().to_owned(),
            self.record.partition(),
            self.record.offset(),
        )
    }

    /// The conversation the record writes to and its two users; `None` for a record that
    /// writes to no shard (one set aside without valid ids: a dead letter only).
    pub(crate) fn conversation(&self) -> Option<(ConversationKey, UserId, UserId)> {
        match &self.item {
            Ok(Inbound::Message(m)) => Some((
                m.conversation.clone(),
                m.sender.clone(),
                m.recipient.clone(),
            )),
            Ok(Inbound::Ack(a)) => Some((a.conversation.clone(), a.user.clone(), a.peer.clone())),
            // A refused message with valid ids leaves a failure row in its conversation's shard
            // and its sender's index row.
            Err(_) => inbound::message_of(self.record.payload())
                .and_then(|m| inbound::failed_message(&m, "", "", 0))
                .map(|f| (f.conversation, f.sender, f.recipient)),
        }
    }
}

/// What is held, which shards are known down, and where each partition's offset may go.
pub(crate) struct Holding {
    /// Shards that did not answer, until a ping says they do.
    down: BTreeSet<usize>,
    /// Records held, in log order per partition.
    held: BTreeMap<Position, Decoded>,
    /// Conversations with a record held: their later records are held too.
    conversations: HashSet<ConversationKey>,
    /// Records held, or taken back from holding and not finished yet: the stored offset of
    /// their partition stays below the oldest.
    pending: BTreeSet<Position>,
    /// The highest offset finished per partition.
    done: BTreeMap<(String, i32), i64>,
    /// Most records held at once.
    max: usize,
}

impl Holding {
    pub(crate) fn new(max: usize) -> Self {
        Holding {
            down: BTreeSet::new(),
            held: BTreeMap::new(),
            conversations: HashSet::new(),
            pending: BTreeSet::new(),
            done: BTreeMap::new(),
            max,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.held.len() >= self.max
    }

    pub(crate) fn down(&self) -> Vec<usize> {
        self.down.iter().copied().collect()
    }

    /// Records that `shard` did not answer. False if it was known already.
    pub(crate) fn mark_down(&mut self, shard: usize) -> bool {
        self.down.insert(shard)
    }

    /// Records that `shard` answers again.
    pub(crate) fn mark_up(&mut self, shard: usize) -> bool {
        self.down.remove(&shard)
    }

    /// Whether a record of `conversation` between `a` and `b` must be held now.
    fn must_hold(
        &self,
        locator: &Locator,
        conversation: &ConversationKey,
        a: &UserId,
        b: &UserId,
    ) -> bool {
        self.conversations.contains(conversation)
            || (!self.down.is_empty()
                && (self.down.contains(&locator.shard_of(conversation))
                    || self.down.contains(&locator.home_of(a))
                    || self.down.contains(&locator.home_of(b))))
    }

    /// Holds the records that need a shard down (or follow a held record of their
    /// conversation) and returns the others, in their order.
    pub(crate) fn split(&mut self, locator: &Locator, entries: Vec<Decoded>) -> Vec<Decoded> {
        if self.down.is_empty() && self.conversations.is_empty() {
            return entries;
        }
        let mut now = Vec::with_capacity(entries.len());
        for e in entries {
            match e.conversation() {
                Some((c, a, b)) if self.must_hold(locator, &c, &a, &b) => {
                    self.conversations.insert(c);
                    self.hold(e);
                }
                _ => now.push(e),
            }
        }
        self.report();
        now
    }

    /// The conversations of `index` that have records held.
    pub(crate) fn held_among(&self, index: &IndexUpdates) -> BTreeSet<ConversationKey> {
        if self.conversations.is_empty() {
            return BTreeSet::new();
        }
        index
            .conversations_of(|_| true)
            .into_iter()
            .filter(|c| self.conversations.contains(c))
            .collect()
    }

    /// Holds records taken back from a batch (their shard went down after they were read).
    pub(crate) fn hold_again(&mut self, entries: Vec<Decoded>) {
        for e in entries {
            if let Some((c, _, _)) = e.conversation() {
                self.conversations.insert(c);
            }
            self.hold(e);
        }
        self.report();
    }

    fn hold(&mut self, e: Decoded) {
        let position = e.position();
        self.pending.insert(position.clone());
        self.held.insert(position, e);
    }

    /// Takes every held record back, in log order per partition, to be split again; records
    /// of partitions not in `assigned` are dropped (their new owner replays them from the
    /// stored offset, which never passed them).
    pub(crate) fn take_all(&mut self, assigned: Option<&HashSet<(String, i32)>>) -> Vec<Decoded> {
        self.conversations.clear();
        let held = std::mem::take(&mut self.held);
        let mut taken = Vec::with_capacity(held.len());
        for ((topic, partition, offset), e) in held {
            let key = (topic, partition);
            if assigned.is_some_and(|a| !a.contains(&key)) {
                self.pending.remove(&(key.0, key.1, offset));
            } else {
                taken.push(e);
            }
        }
        if let Some(assigned) = assigned {
            self.pending
                .retain(|(t, p, _)| assigned.contains(&(t.clone(), *p)));
            self.done.retain(|k, _| assigned.contains(k));
        }
        self.report();
        taken
    }

    /// A batch finished: its records (`positions`) are no longer pending, and its partitions
    /// reached `offsets`. Returns the offset to store for each of those partitions: the highest
    /// finished, but never at or past a pending record. `None` where nothing can be stored yet.
    pub(crate) fn finish(
        &mut self,
        offsets: &BTreeMap<(String, i32), i64>,
        positions: impl IntoIterator<Item = Position>,
    ) -> Vec<((String, i32), i64)> {
        if !self.pending.is_empty() {
            for p in positions {
                self.pending.remove(&p);
            }
        }
        let mut store = Vec::with_capacity(offsets.len());
        for (key, offset) in offsets {
            let done = self.done.entry(key.clone()).or_insert(*offset);
            *done = (*done).max(*offset);
            let mut target = *done;
            let from = (key.0.clone(), key.1, i64::MIN);
            if let Some((_, _, oldest)) = self
                .pending
                .range(from..)
                .next()
                .filter(|(t, p, _)| *t == key.0 && *p == key.1)
            {
                target = target.min(oldest - 1);
            }
            if target >= 0 {
                store.push((key.clone(), target));
            }
        }
        store
    }

    fn report(&self) {
        metrics::gauge!("multiplexer_held_records").set(self.held.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_common::message::Message;
    use prost::Message as _;

    const TOPIC: &str = "inbound";

    fn user(n: u32) -> UserId {
        UserId::parse(&format!("u{n}")).expect("a valid id")
    }

    fn message(a: &UserId, b: &UserId, n: u64) -> Message {
        let client_id =
            chat_common::ids::ClientMessageId::parse(&format!("c{n}")).expect("a valid id");
        Message {
            sealed: None,
            id: chat_common::ids::message_id(a, b, &client_id),
            client_id,
            conversation: ConversationKey::of(a, b).expect("two users"),
            sender: a.clone(),
            recipient: b.clone(),
            body: "hi".into(),
            sent_at_ms: 1,
            seq: 0,
        }
    }

    fn record(partition: i32, offset: i64, m: &Message) -> Decoded {
        let value = chat_proto::v1::InboundRecord {
            kind: Some(chat_proto::v1::inbound_record::Kind::Message(
                m.clone().into(),
            )),
            ..Default::default()
        }
        .encode_to_vec();
        Decoded::new(OwnedMessage::new(
            Some(value),
            None,
            TOPIC.into(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            offset,
            None,
        ))
    }

    /// Two users wholly on `shard` (both homes and their conversation), searched for.
    fn pair_on(locator: &Locator, shard: usize, skip: u32) -> (UserId, UserId) {
        let mut found = Vec::new();
        for n in 0..10_000 {
            let u = user(n);
            if locator.home_of(&u) == shard {
                found.push(u);
            }
        }
        for (i, a) in found.iter().enumerate().skip(skip as usize) {
            for b in &found[i + 1..] {
                if locator.shard_of(&ConversationKey::of(a, b).expect("two users")) == shard {
                    return (a.clone(), b.clone());
                }
            }
        }
        panic!("no pair on shard {shard}");
    }

    fn offsets(entries: &[Decoded]) -> Vec<i64> {
        entries.iter().map(|e| e.record.offset()).collect()
    }

    #[test]
    fn nothing_is_held_while_every_shard_answers() {
        let locator = Locator::new(4);
        let mut h = Holding::new(100);
        let (a, b) = pair_on(&locator, 1, 0);
        let now = h.split(
            &locator,
            (0..3)
                .map(|i| record(0, i, &message(&a, &b, i as u64)))
                .collect(),
        );
        assert_eq!(offsets(&now), [0, 1, 2]);
        assert_eq!(h.len(), 0);
        let key = (TOPIC.to_owned(), 0);
        assert_eq!(
            h.finish(&BTreeMap::from([(key.clone(), 2)]), []),
            [(key, 2)]
        );
    }

    #[test]
    fn a_down_shard_holds_its_conversations_and_the_offset_stays_below_them() {
        let locator = Locator::new(4);
        let mut h = Holding::new(100);
        let (a, b) = pair_on(&locator, 1, 0);
        let (c, d) = pair_on(&locator, 2, 0);
        h.mark_down(1);
        let key = (TOPIC.to_owned(), 0);
        // Partition 0: c->d, a->b, c->d, a->b.
        let entries = vec![
            record(0, 10, &message(&c, &d, 1)),
            record(0, 11, &message(&a, &b, 2)),
            record(0, 12, &message(&c, &d, 3)),
            record(0, 13, &message(&a, &b, 4)),
        ];
        let now = h.split(&locator, entries);
        assert_eq!(offsets(&now), [10, 12]);
        assert_eq!(h.len(), 2);
        // The batch of 10 and 12 finished: the offset stops before 11.
        let positions: Vec<Position> = now.iter().map(Decoded::position).collect();
        assert_eq!(
            h.finish(&BTreeMap::from([(key.clone(), 12)]), positions),
            [(key.clone(), 10)]
        );
        // The shard is back, but a later record of the held conversation arrives before the
        // retry: it is held too, behind the others.
        h.mark_up(1);
        let now = h.split(&locator, vec![record(0, 14, &message(&a, &b, 5))]);
        assert!(now.is_empty());
        let retried = h.take_all(None);
        assert_eq!(offsets(&retried), [11, 13, 14]);
        let now = h.split(&locator, retried);
        assert_eq!(offsets(&now), [11, 13, 14]);
        // Still pending until their batch finished.
        assert_eq!(
            h.finish(&BTreeMap::from([(key.clone(), 12)]), []),
            [(key.clone(), 10)]
        );
        let positions: Vec<Position> = now.iter().map(Decoded::position).collect();
        assert_eq!(
            h.finish(&BTreeMap::from([(key.clone(), 14)]), positions),
            [(key, 14)]
        );
    }

    #[test]
    fn a_down_home_shard_holds_its_users_conversations_elsewhere() {
        let locator = Locator::new(4);
        let mut h = Holding::new(100);
        // A user at home on shard 3 writing to someone in a conversation on another shard.
        let a = (0..10_000)
            .map(user)
            .find(|u| locator.home_of(u) == 3)
            .expect("found");
        let b = (0..10_000)
            .map(user)
            .find(|u| {
                locator.home_of(u) != 3
                    && locator.shard_of(&ConversationKey::of(&a, u).expect("two users")) != 3
            })
            .expect("found");
        h.mark_down(3);
        let now = h.split(&locator, vec![record(0, 1, &message(&b, &a, 1))]);
        assert!(now.is_empty());
        h.mark_up(3);
        assert_eq!(offsets(&h.take_all(None)), [1]);
    }

    #[test]
    fn records_of_revoked_partitions_are_dropped_and_bound_nothing() {
        let locator = Locator::new(2);
        let mut h = Holding::new(100);
        let (a, b) = pair_on(&locator, 0, 0);
        h.mark_down(0);
        h.split(
            &locator,
            vec![
                record(0, 5, &message(&a, &b, 1)),
                record(1, 7, &message(&a, &b, 2)),
            ],
        );
        let assigned = HashSet::from([(TOPIC.to_owned(), 1)]);
        assert_eq!(offsets(&h.take_all(Some(&assigned))), [7]);
        // Partition 0 is not ours any more: nothing pending bounds it.
        let key = (TOPIC.to_owned(), 0);
        assert_eq!(
            h.finish(&BTreeMap::from([(key.clone(), 9)]), []),
            [(key, 9)]
        );
    }

    #[test]
    fn the_holding_is_bounded() {
        let locator = Locator::new(2);
        let mut h = Holding::new(2);
        let (a, b) = pair_on(&locator, 0, 0);
        h.mark_down(0);
        h.split(&locator, vec![record(0, 1, &message(&a, &b, 1))]);
        assert!(!h.is_full());
        h.split(&locator, vec![record(0, 2, &message(&a, &b, 2))]);
        assert!(h.is_full());
    }
}
