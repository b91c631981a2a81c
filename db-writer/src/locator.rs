//! Which shard holds a conversation.
//!
//! Jump consistent hash of the conversation key over the number of shards: A->B and B->A share a
//! key, so a conversation lives on one shard and one query answers it; growing from N to N+1
//! shards moves only about 1/(N+1) of the conversations (resharding is a replay of `inbound`).
//!
//! The same hash over a user id gives the user's home shard, which holds their conversation
//! index (`user_index`). A user id contains no ':', so it is never a conversation key.

use chat_common::ids::{ConversationKey, UserId};
use jumphash::JumpHasher;

/// Fixed SipHash keys: placement must be the same in every process and every release. Changing
/// them moves every conversation and requires a reshard.
const KEYS: (u64, u64) = (0x6368_6174_2d73_6861, 0x7264_2d6c_6f63_6174);

/// Maps conversation keys to shard indexes in `0..shards`.
#[derive(Clone, Copy, Debug)]
pub struct Locator {
    shards: u32,
    hasher: JumpHasher,
}

impl Locator {
    /// A locator over `shards` shards (at least 1).
    pub fn new(shards: u32) -> Self {
        Self {
            shards: shards.max(1),
            hasher: JumpHasher::new_with_keys(KEYS.0, KEYS.1),
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a conversation.
    pub fn shard_of(&self, key: &ConversationKey) -> usize {
        self.hasher.slot(&key.as_str(), self.shards) as usize
    }

    /// The home shard of a user: where their conversation index lives.
    pub fn home_of(&self, user: &UserId) -> usize {
        self.hasher.slot(&user.as_str(), self.shards) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_common::ids::UserId;

    fn key(a: &str, b: &str) -> ConversationKey {
        ConversationKey::of(
            &UserId::parse(a).expect("valid"),
            &UserId::parse(b).expect("valid"),
        )
        .expect("distinct")
    }

    #[test]
    fn both_directions_share_a_shard() {
        let l = Locator::new(4);
        for i in 0..200 {
            let (a, b) = (format!("u{i}"), format!("v{}", i * 7));
            assert_eq!(l.shard_of(&key(&a, &b)), l.shard_of(&key(&b, &a)));
        }
    }

    #[test]
    fn placement_is_stable_across_releases() {
        // Golden values: if this fails, placement changed and existing data needs a reshard.
        let l = Locator::new(4);
        let got: Vec<usize> = ["alice:bob", "bob:carol", "a:b", "x:y"]
            .iter()
            .map(|k| l.shard_of(&ConversationKey::parse(k).expect("valid")))
            .collect();
        assert_eq!(got, GOLDEN);
    }
    const GOLDEN: [usize; 4] = [0, 1, 3, 1];

    #[test]
    fn home_placement_is_stable_across_releases() {
        // Golden values: if this fails, every user's index moved and needs a rebuild.
        let l = Locator::new(4);
        let got: Vec<usize> = ["alice", "bob", "carol", "u1"]
            .iter()
            .map(|u| l.home_of(&UserId::parse(u).expect("valid")))
            .collect();
        assert_eq!(got, HOME_GOLDEN);
        // A user's home is computed like a conversation's: the hash of the id's text.
        let spread: std::collections::HashSet<usize> = (0..100)
            .map(|i| l.home_of(&UserId::parse(&format!("user{i}")).expect("valid")))
            .collect();
        assert_eq!(spread.len(), 4, "homes use every shard");
    }
    const HOME_GOLDEN: [usize; 4] = [2, 2, 1, 0];

    #[test]
    fn spreads_evenly_and_moves_little_when_growing() {
        let (l4, l5) = (Locator::new(4), Locator::new(5));
        let mut counts = [0usize; 4];
        let mut moved = 0;
        let n = 20_000;
        for i in 0..n {
            let k = key(&format!("user{i}"), &format!("peer{}", i % 97));
            let s4 = l4.shard_of(&k);
            counts[s4] += 1;
            let s5 = l5.shard_of(&k);
            if s5 != s4 {
                assert_eq!(s5, 4, "a moved conversation goes to the new shard only");
                moved += 1;
            }
        }
        for c in counts {
            assert!((4_000..6_000).contains(&c), "uneven spread {counts:?}");
        }
        // About 1/5 move; allow noise.
        assert!((3_000..5_000).contains(&moved), "moved {moved}");
    }
}
