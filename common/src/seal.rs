//! Sealed bodies (delete-on-ack mode): each message's body is encrypted under a key of its own,
//! which the conversation's shard holds (`sealing_keys`). The recipient's ack, or the expiry of
//! an unacked message, deletes the key, and with it every copy of the body the pipeline made:
//! the `inbound` record, the `outbound-<gateway>` push, a dead letter, a backup of the row. See
//! docs/design.md, "Crypto-shredding".
//!
//! The form: version byte 2, the key's 8-byte id (under which the shard holds it), a 12-byte
//! random nonce, then the AES-256-GCM ciphertext and its 16-byte tag. The message id is the
//! associated data, so a sealed body cannot be passed off as another message's. A gateway takes
//! keys from a pool its shard issued ahead ([`BodyKeyId`]), one key a send: a client's retry is
//! sealed under another key, and the store destroys the key of the copy it skips.
//!
//! Version 1, written before keys were issued ahead, has no id: its key is held in `body_keys`
//! under the message's send key (conversation, sender, client message id), and a retry was
//! sealed again under the same key, so the nonce is random, never fixed. Such bodies still open
//! ([`BodyKey::open`]) until their keys go.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;
use uuid::Uuid;

/// The version byte of the form written today: the key's id before the nonce.
const VERSION: u8 = 2;
/// The version byte of the form without the key's id (keys held under the send key).
const VERSION_1: u8 = 1;
/// Bytes of a key's id.
pub const KEY_ID_LEN: usize = 8;
/// Bytes a sealed body adds to its plaintext: version, key id, nonce and tag.
pub const OVERHEAD: usize = 1 + KEY_ID_LEN + NONCE_LEN + 16;
/// What version 1 added (no key id).
const OVERHEAD_1: usize = 1 + NONCE_LEN + 16;
/// Bytes of a body key.
pub const KEY_LEN: usize = 32;

/// Why a body could not be sealed or opened.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("a body key is {0} bytes, not {KEY_LEN}")]
    KeyLength(usize),
    #[error("the system's random source failed")]
    Random,
    #[error("the sealed body is not version {VERSION} or {VERSION_1}, or is too short")]
    Form,
    #[error("the sealed body does not open with its key (altered, or another message's)")]
    Open,
    #[error("the opened body is not UTF-8")]
    Utf8,
}

/// One message's body key. Its bytes leave the process only to the shard's `sealing_keys` table.
#[derive(Clone, PartialEq, Eq)]
pub struct BodyKey([u8; KEY_LEN]);

impl std::fmt::Debug for BodyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyKey(***)")
    }
}

impl BodyKey {
    /// A new random key.
    pub fn generate() -> Result<Self, SealError> {
        random().map(Self)
    }

    /// A key as the shard stores it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let key: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| SealError::KeyLength(bytes.len()))?;
        Ok(Self(key))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn aead(&self) -> LessSafeKey {
        // Infallible: the length is AES-256's.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key"))
    }

    /// Seals `body` as message `id`'s, under this key, held by its shard as `key_id`.
    pub fn seal(&self, key_id: &BodyKeyId, id: &Uuid, body: &str) -> Result<Vec<u8>, SealError> {
        self.seal_as(Some(key_id), id, body)
    }

    /// Seals `body` in version 1's form, without a key id (its key held under the send key): a
    /// record as gateways wrote them before keys were issued ahead, for the tests that check
    /// such records still open and their keys still go.
    pub fn seal_v1(&self, id: &Uuid, body: &str) -> Result<Vec<u8>, SealError> {
        self.seal_as(None, id, body)
    }

    fn seal_as(
        &self,
        key_id: Option<&BodyKeyId>,
        id: &Uuid,
        body: &str,
    ) -> Result<Vec<u8>, SealError> {
        let nonce: [u8; NONCE_LEN] = random()?;
        let mut out = Vec::with_capacity(body.len() + OVERHEAD);
        match key_id {
            Some(key_id) => {
                out.push(VERSION);
                out.extend_from_slice(&key_id.0);
            }
            None => out.push(VERSION_1),
        }
        out.extend_from_slice(&nonce);
        let head = out.len();
        out.extend_from_slice(body.as_bytes());
        let mut tail = out.split_off(head);
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut tail,
            )
            .map_err(|_| SealError::Open)?;
        out.append(&mut tail);
        Ok(out)
    }

    /// Opens a body sealed as message `id`'s (either form).
    pub fn open(&self, id: &Uuid, sealed: &[u8]) -> Result<String, SealError> {
        let nonce_at = match sealed.first() {
            Some(&VERSION) if sealed.len() >= OVERHEAD => 1 + KEY_ID_LEN,
            Some(&VERSION_1) if sealed.len() >= OVERHEAD_1 => 1,
            _ => return Err(SealError::Form),
        };
        let nonce = Nonce::try_assume_unique_for_key(&sealed[nonce_at..nonce_at + NONCE_LEN])
            .map_err(|_| SealError::Form)?;
        let mut buf = sealed[nonce_at + NONCE_LEN..].to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut buf)
            .map_err(|_| SealError::Open)?;
        let len = plain.len();
        buf.truncate(len);
        String::from_utf8(buf).map_err(|_| SealError::Utf8)
    }
}

/// The id a shard holds a key under (`sealing_keys.id`), made with the key and written into every
/// body sealed under it, so that whoever holds the body finds its key. Ids issued by a shard
/// ([`BodyKeyId::issued_at`]) begin with the time they were issued, so the shard's index of ids
/// grows at one end; an id says nothing of its key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BodyKeyId([u8; KEY_ID_LEN]);

impl std::fmt::Debug for BodyKeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BodyKeyId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl BodyKeyId {
    /// A new random id.
    pub fn generate() -> Result<Self, SealError> {
        random().map(Self)
    }

    /// `n` ids for keys issued together at `now_ms` (milliseconds since the Unix epoch): each is
    /// the time in its first 44 bits (big-endian, so ids sort by it, until the year 2527), then
    /// 20 bits counted up from a random start. A shard's index of ids then takes new ids at its
    /// end, where its pages are in memory, rather than on random pages all over it (with random
    /// ids, each key's insert dirtied a page of its own and, after a checkpoint, logged its whole
    /// image). Ids of one call differ while `n` is at most 2^20; two calls in the same millisecond
    /// may draw the same ids, which the shard's primary key refuses, and the issue is made again
    /// under new ones.
    pub fn issued_at(now_ms: i64, n: usize) -> Result<Vec<Self>, SealError> {
        const LOW_BITS: u32 = 20;
        const LOW: u64 = (1 << LOW_BITS) - 1;
        let time = (now_ms.max(0) as u64) << LOW_BITS;
        let start = u64::from(u32::from_be_bytes(random()?));
        Ok((0..n as u64)
            .map(|i| Self((time | (start.wrapping_add(i) & LOW)).to_be_bytes()))
            .collect())
    }

    /// An id as the shard stores it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        bytes.try_into().map(Self).map_err(|_| SealError::Form)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The id of the key `sealed` was sealed under; `None` for version 1's form (its key is
    /// held under the message's send key) or what is not a sealed body.
    pub fn of(sealed: &[u8]) -> Option<Self> {
        match sealed.first() {
            Some(&VERSION) if sealed.len() >= OVERHEAD => {
                Self::from_bytes(&sealed[1..1 + KEY_ID_LEN]).ok()
            }
            _ => None,
        }
    }
}

/// `N` bytes from the system's random source.
fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SealError::Random)?;
    Ok(bytes)
}

/// Whether `sealed` has the form of a sealed body (either version) of at most `max_body` bytes
/// of text (what the multiplexer checks of a record it cannot open).
pub fn check_form(sealed: &[u8], max_body: usize) -> Result<(), SealError> {
    let overhead = match sealed.first() {
        Some(&VERSION) => OVERHEAD,
        Some(&VERSION_1) => OVERHEAD_1,
        _ => return Err(SealError::Form),
    };
    if sealed.len() <= overhead || sealed.len() > max_body + overhead {
        return Err(SealError::Form);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_body_opens_with_its_key_and_id_only() {
        let key = BodyKey::generate().expect("key");
        let key_id = BodyKeyId::generate().expect("key id");
        let id = Uuid::new_v4();
        let body = "canary \u{1F600} \u{202E}rtl\u{0001}";
        let sealed = key.seal(&key_id, &id, body).expect("seal");
        assert_eq!(sealed.len(), body.len() + OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"canary"));
        assert_eq!(key.open(&id, &sealed).as_deref(), Ok(body));
        assert_eq!(BodyKeyId::of(&sealed), Some(key_id));
        // Another key, another message's id, one altered byte: refused.
        let other = BodyKey::generate().expect("key");
        assert_eq!(other.open(&id, &sealed), Err(SealError::Open));
        assert_eq!(key.open(&Uuid::new_v4(), &sealed), Err(SealError::Open));
        let mut altered = sealed.clone();
        *altered.last_mut().expect("tag") ^= 1;
        assert_eq!(key.open(&id, &altered), Err(SealError::Open));
        assert_eq!(key.open(&id, &sealed[..10]), Err(SealError::Form));
        assert_eq!(key.open(&id, &[]), Err(SealError::Form));
        // Sealing twice under one key uses two nonces.
        assert_ne!(key.seal(&key_id, &id, body).expect("seal"), sealed);
        assert_eq!(check_form(&sealed, body.len()), Ok(()));
        assert_eq!(check_form(&sealed, body.len() - 1), Err(SealError::Form));
        assert_eq!(check_form(&sealed[..OVERHEAD], 10), Err(SealError::Form));
        assert_eq!(format!("{key:?}"), "BodyKey(***)");
        assert_eq!(BodyKey::from_bytes(&[0; 31]), Err(SealError::KeyLength(31)));
        assert_eq!(BodyKeyId::from_bytes(&[0; 7]), Err(SealError::Form));
    }

    #[test]
    fn ids_issued_together_differ_and_sort_by_when_they_were_issued() {
        let ids = BodyKeyId::issued_at(1_796_500_000_123, 2_048).expect("ids");
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 2_048);
        for id in &ids {
            let v = u64::from_be_bytes(id.0);
            assert_eq!(v >> 20, 1_796_500_000_123, "{id:?}");
        }
        let later = BodyKeyId::issued_at(1_796_500_000_124, 2_048).expect("ids");
        assert!(ids.iter().max() < later.iter().min());
        // Calls in the same millisecond start at random points of the 20 bits.
        let starts: std::collections::HashSet<_> = (0..20)
            .map(|_| BodyKeyId::issued_at(1_796_500_000_123, 1).expect("id")[0])
            .collect();
        assert!(starts.len() > 1);
        assert_eq!(BodyKeyId::issued_at(0, 0).expect("none"), vec![]);
    }

    #[test]
    fn version_1_bodies_without_a_key_id_still_open() {
        let key = BodyKey::generate().expect("key");
        let id = Uuid::new_v4();
        let body = "older \u{1F600}";
        let sealed = key.seal_v1(&id, body).expect("seal");
        assert_eq!(sealed[0], 1);
        assert_eq!(sealed.len(), body.len() + OVERHEAD - KEY_ID_LEN);
        assert_eq!(key.open(&id, &sealed).as_deref(), Ok(body));
        assert_eq!(BodyKeyId::of(&sealed), None);
        assert_eq!(check_form(&sealed, body.len()), Ok(()));
        assert_eq!(check_form(&sealed, body.len() - 1), Err(SealError::Form));
        // Neither version, or too short for its own: no id, no form.
        assert_eq!(BodyKeyId::of(b"sealed x"), None);
        assert_eq!(BodyKeyId::of(&[2; 20]), None);
        assert_eq!(check_form(&[3; 64], 64), Err(SealError::Form));
    }
}
