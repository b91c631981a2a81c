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

    /// The test vectors of docs/data.md ("Where a conversation lives"): key, SipHash-1-3 of
    /// the key's bytes and one 0xff byte under [`KEYS`], and the shard over 2, 3, 4, 6, 12 and
    /// 1000 shards. A conversation key goes through `shard_of`, a user id through `home_of`.
    const VECTORS: [(&str, u64, [usize; 6]); 8] = [
        ("alice:bob", 0x2518_e021_04c3_53fa, [0, 0, 0, 0, 0, 730]),
        ("bob:carol", 0x3398_99a1_a912_d41a, [1, 1, 1, 1, 9, 901]),
        ("carol:dave", 0x711c_1740_7b22_b15f, [1, 2, 2, 2, 2, 597]),
        ("a:b", 0xc823_d67b_07be_855c, [0, 2, 3, 3, 3, 339]),
        (
            "user.name-42:x_y",
            0x7528_59d4_6585_a48d,
            [0, 0, 0, 5, 10, 638],
        ),
        ("alice", 0x53d8_ae34_4363_5986, [0, 2, 2, 2, 2, 110]),
        ("bob", 0xb533_f0f8_d9b7_04a0, [1, 2, 2, 2, 2, 920]),
        ("u1", 0x0fbf_20d4_daee_f5ad, [0, 0, 0, 4, 4, 209]),
    ];
    const VECTOR_SHARDS: [u32; 6] = [2, 3, 4, 6, 12, 1000];

    /// The placement as docs/data.md specifies it, written from the spec: SipHash-1-3, then
    /// jump consistent hash.
    fn sip13(k0: u64, k1: u64, data: &[u8]) -> u64 {
        let mut v = [
            k0 ^ 0x736f_6d65_7073_6575,
            k1 ^ 0x646f_7261_6e64_6f6d,
            k0 ^ 0x6c79_6765_6e65_7261,
            k1 ^ 0x7465_6462_7974_6573,
        ];
        let round = |v: &mut [u64; 4]| {
            v[0] = v[0].wrapping_add(v[1]);
            v[1] = v[1].rotate_left(13) ^ v[0];
            v[0] = v[0].rotate_left(32);
            v[2] = v[2].wrapping_add(v[3]);
            v[3] = v[3].rotate_left(16) ^ v[2];
            v[0] = v[0].wrapping_add(v[3]);
            v[3] = v[3].rotate_left(21) ^ v[0];
            v[2] = v[2].wrapping_add(v[1]);
            v[1] = v[1].rotate_left(17) ^ v[2];
            v[2] = v[2].rotate_left(32);
        };
        let mut blocks = data.chunks_exact(8);
        for block in &mut blocks {
            let m = u64::from_le_bytes(block.try_into().expect("8 bytes"));
            v[3] ^= m;
            round(&mut v);
            v[0] ^= m;
        }
        let mut last = [0u8; 8];
        last[..blocks.remainder().len()].copy_from_slice(blocks.remainder());
        let m = u64::from_le_bytes(last) | ((data.len() as u64 & 0xff) << 56);
        v[3] ^= m;
        round(&mut v);
        v[0] ^= m;
        v[2] ^= 0xff;
        for _ in 0..3 {
            round(&mut v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    fn jump(mut h: u64, shards: u32) -> usize {
        let (mut b, mut j) = (-1i64, 0i64);
        while j < i64::from(shards) {
            b = j;
            h = h.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
            j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((h >> 33) + 1) as f64)) as i64;
        }
        b as usize
    }

    fn spec(text: &str, shards: u32) -> usize {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0xff);
        jump(sip13(KEYS.0, KEYS.1, &bytes), shards)
    }

    fn place(l: &Locator, text: &str) -> usize {
        match ConversationKey::parse(text) {
            Ok(k) => l.shard_of(&k),
            Err(_) => l.home_of(&UserId::parse(text).expect("a key or a user id")),
        }
    }

    #[test]
    fn the_documented_vectors_hold() {
        for (text, hash, shards) in VECTORS {
            let mut bytes = text.as_bytes().to_vec();
            bytes.push(0xff);
            assert_eq!(sip13(KEYS.0, KEYS.1, &bytes), hash, "hash of {text}");
            for (n, want) in VECTOR_SHARDS.into_iter().zip(shards) {
                assert_eq!(
                    place(&Locator::new(n), text),
                    want,
                    "{text} over {n} shards"
                );
            }
        }
    }

    #[test]
    fn the_locator_is_the_documented_function() {
        // Lengths 1 to 64 cover every tail length of SipHash's 8-byte blocks.
        for n in [1, 2, 3, 4, 5, 8, 12, 100, 10_000_000] {
            let l = Locator::new(n);
            for len in 1..=64 {
                let user = "u".repeat(len);
                assert_eq!(place(&l, &user), spec(&user, n), "{user} over {n}");
                let conversation = key(&user, "peer.1");
                assert_eq!(
                    place(&l, conversation.as_str()),
                    spec(conversation.as_str(), n),
                    "{conversation} over {n}"
                );
            }
        }
    }

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
