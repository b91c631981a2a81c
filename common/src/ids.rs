//! Domain identifiers with validating constructors.
//!
//! Every id that comes from a client, a token or a Kafka record passes through one of these
//! `parse` functions before it is used, so the rest of the code can rely on their invariants.

use std::fmt;

use thiserror::Error;
use uuid::Uuid;

/// Longest accepted user or gateway id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest accepted client message id, in bytes.
pub const MAX_CLIENT_MESSAGE_ID_LEN: usize = 64;

/// Why an id was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may only contain a-z, A-Z, 0-9, '_', '-' and '.'")]
    BadChar { kind: &'static str },
    #[error("conversation key must be two distinct, sorted user ids joined by ':'")]
    BadConversation,
    #[error("{kind} may not be '.' or '..': a URL cannot hold them as a path segment")]
    DotSegment { kind: &'static str },
}

fn check(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(IdError::BadChar { kind });
    }
    Ok(())
}

/// A user id: 1 to 64 bytes of `[A-Za-z0-9_.-]`. The alphabet leaves out ':' (the conversation key
/// separator), '/', whitespace and control characters, so ids are safe in keys, URLs and logs;
/// and a user named from now on ([`UserId::parse_addressable`]) is neither `.` nor `..`, which a
/// URL path cannot hold as a segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// An id as it may already be stored or logged: the alphabet and the length. What is read
    /// back (Kafka records, shard rows) goes through here, so that data written before
    /// [`UserId::parse_addressable`]'s rule reads back.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check("user id", s, MAX_ID_LEN)?;
        Ok(Self(s.to_owned()))
    }

    /// An id that names a user from now on: a token's subject, a message's recipient, the peer
    /// of a request. [`UserId::parse`]'s rules, and neither `.` nor `..`: clients normalise
    /// those path segments away (`/messages/..` is `/`; browsers do it to `%2E%2E` too), so such
    /// a user could never be reached over REST.
    pub fn parse_addressable(s: &str) -> Result<Self, IdError> {
        let id = Self::parse(s)?;
        if matches!(s, "." | "..") {
            return Err(IdError::DotSegment { kind: "user id" });
        }
        Ok(id)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A gateway id: same alphabet as user ids; it becomes part of the topic name `outbound-<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayId(String);

impl GatewayId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check("gateway id", s, MAX_ID_LEN)?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client-chosen message id (unique per sender): same alphabet, at most 64 bytes, so a UUID fits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientMessageId(String);

impl ClientMessageId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check("client message id", s, MAX_CLIENT_MESSAGE_ID_LEN)?;
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The key of a conversation between two distinct users: the two ids sorted and joined by ':'.
///
/// The encoding is injective: ':' is outside the user id alphabet, so the key splits back into
/// exactly one sorted pair. A->B and B->A share the key, hence the Kafka partition and the shard.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationKey(String);

impl ConversationKey {
    /// The key of the conversation between `a` and `b`; `None` when they are the same user.
    pub fn of(a: &UserId, b: &UserId) -> Option<Self> {
        let (lo, hi) = match a.cmp(b) {
            std::cmp::Ordering::Less => (a, b),
            std::cmp::Ordering::Greater => (b, a),
            std::cmp::Ordering::Equal => return None,
        };
        Some(Self(format!("{lo}:{hi}")))
    }

    /// Parses and validates a key read from Kafka or the database.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (lo, hi) = s.split_once(':').ok_or(IdError::BadConversation)?;
        let (lo, hi) = (UserId::parse(lo)?, UserId::parse(hi)?);
        if lo >= hi {
            return Err(IdError::BadConversation);
        }
        Ok(Self(s.to_owned()))
    }

    /// The two users, in sorted order.
    pub fn users(&self) -> (UserId, UserId) {
        let (lo, hi) = self.0.split_once(':').unwrap_or((&self.0, ""));
        (UserId(lo.to_owned()), UserId(hi.to_owned()))
    }

    /// The other user of the conversation, when `me` is one of the two.
    pub fn peer_of(&self, me: &UserId) -> Option<UserId> {
        let (lo, hi) = self.users();
        if &lo == me {
            Some(hi)
        } else if &hi == me {
            Some(lo)
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Namespace of message ids (UUIDv5 over sender, recipient and client message id). The first
/// scheme hashed only the sender and the client id in another namespace; a new namespace means an
/// id of this scheme never equals one of the old, whatever the inputs.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2b8e_61d4_57a0_4c39_9f1e_c3a7_0d52_e684);

/// The server's id for a message: a UUIDv5 of the sender, the recipient and the client message
/// id, so a retried send to the same recipient (same session or another gateway) maps to the
/// same id, and the same client id toward another recipient is another message. The store
/// deduplicates on (conversation, sender, client message id), not on this id, so ids derived
/// by an earlier scheme still find their message (docs/design.md, "Idempotency scope").
pub fn message_id(sender: &UserId, recipient: &UserId, client_id: &ClientMessageId) -> Uuid {
    // The separator is outside every alphabet, so distinct triples never hash the same input.
    let name = format!(
        "{}\n{}\n{}",
        sender.as_str(),
        recipient.as_str(),
        client_id.as_str()
    );
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> UserId {
        UserId::parse(s).expect("valid id")
    }

    #[test]
    fn user_ids_are_validated() {
        assert!(UserId::parse("alice_1.x-y").is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::Empty { kind: "user id" }));
        assert!(matches!(
            UserId::parse(&"a".repeat(65)),
            Err(IdError::TooLong { .. })
        ));
        assert!(UserId::parse(&"a".repeat(64)).is_ok());
        for bad in [
            "a:b",
            "a b",
            "a/b",
            "a\0b",
            "é",
            "x'; DROP TABLE messages;--",
            "a\n",
        ] {
            assert!(
                matches!(UserId::parse(bad), Err(IdError::BadChar { .. })),
                "{bad:?}"
            );
        }
    }

    /// `.` and `..` are refused for a user named from now on, and read back where stored; any
    /// other id of dots, or with dots in it, is a user's like any other.
    #[test]
    fn a_user_named_from_now_on_is_neither_dot_nor_dot_dot() {
        for dots in [".", ".."] {
            assert_eq!(
                UserId::parse_addressable(dots),
                Err(IdError::DotSegment { kind: "user id" })
            );
            assert_eq!(UserId::parse(dots).map(|u| u.0), Ok(dots.to_owned()));
        }
        for fine in ["...", ".a", "a.", "a..b", "..a", "-", "_"] {
            assert_eq!(
                UserId::parse_addressable(fine).map(|u| u.0),
                Ok(fine.to_owned())
            );
        }
        for (bad, err) in [
            ("", IdError::Empty { kind: "user id" }),
            ("a/b", IdError::BadChar { kind: "user id" }),
        ] {
            assert_eq!(UserId::parse_addressable(bad), Err(err));
        }
    }

    #[test]
    fn conversation_key_is_symmetric_and_injective() {
        let ab = ConversationKey::of(&u("alice"), &u("bob")).expect("distinct");
        let ba = ConversationKey::of(&u("bob"), &u("alice")).expect("distinct");
        assert_eq!(ab, ba);
        assert_eq!(ab.as_str(), "alice:bob");
        assert_eq!(ab.users(), (u("alice"), u("bob")));
        assert_eq!(ConversationKey::parse("alice:bob"), Ok(ab.clone()));
        assert_eq!(ab.peer_of(&u("alice")), Some(u("bob")));
        assert_eq!(ab.peer_of(&u("carol")), None);
        assert!(ConversationKey::of(&u("a"), &u("a")).is_none());
        // Pairs that a naive concatenation would confuse stay distinct.
        let k1 = ConversationKey::of(&u("a"), &u("bc")).expect("distinct");
        let k2 = ConversationKey::of(&u("ab"), &u("c")).expect("distinct");
        assert_ne!(k1, k2);
        for bad in ["bob:alice", "alice", "alice:alice", ":bob", "a:b:c"] {
            assert!(ConversationKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn message_ids_are_scoped_to_sender_recipient_and_client_id() {
        let c1 = ClientMessageId::parse("c1").expect("valid");
        let c2 = ClientMessageId::parse("c2").expect("valid");
        let (a, b, c) = (u("alice"), u("bob"), u("carol"));
        assert_eq!(message_id(&a, &b, &c1), message_id(&a, &b, &c1));
        assert_ne!(message_id(&a, &b, &c1), message_id(&a, &b, &c2));
        // The same client id toward another recipient is another message.
        assert_ne!(message_id(&a, &b, &c1), message_id(&a, &c, &c1));
        // Each direction of a conversation has its own ids.
        assert_ne!(message_id(&a, &b, &c1), message_id(&b, &a, &c1));
        // Never the id of the first scheme (sender and client id only, another namespace).
        let old = Uuid::new_v5(
            &Uuid::from_u128(0x6c1f_3a52_9d0e_4b7a_8e21_5f4c_0b9d_7a13),
            b"alice\nc1",
        );
        assert_ne!(message_id(&a, &b, &c1), old);
    }

    proptest::proptest! {
        // Any string either parses into an id that obeys the alphabet and length, or is refused;
        // never a panic.
        #[test]
        fn id_parsing_is_total(s in ".{0,80}") {
            if let Ok(id) = UserId::parse(&s) {
                proptest::prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= MAX_ID_LEN);
                proptest::prop_assert!(!id.as_str().contains(':'));
            }
            let _ = ConversationKey::parse(&s);
            let _ = ClientMessageId::parse(&s);
        }

        // The conversation key of any two distinct valid ids parses back to the same sorted pair.
        #[test]
        fn conversation_keys_round_trip(a in "[A-Za-z0-9_.-]{1,64}", b in "[A-Za-z0-9_.-]{1,64}") {
            let (a, b) = (u(&a), u(&b));
            match ConversationKey::of(&a, &b) {
                None => proptest::prop_assert_eq!(&a, &b),
                Some(k) => {
                    let parsed = ConversationKey::parse(k.as_str()).expect("a key parses");
                    let (lo, hi) = parsed.users();
                    proptest::prop_assert!(lo < hi);
                    proptest::prop_assert!((lo == a && hi == b) || (lo == b && hi == a));
                }
            }
        }
    }
}
