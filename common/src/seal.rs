//! Sealed bodies (delete-on-ack mode): each message's body is encrypted under a key of its own,
//! which the conversation's shard holds (`body_keys`). The recipient's ack, or the expiry of an
//! unacked message, deletes the key, and with it every copy of the body the pipeline made: the
//! `inbound` record, the `outbound-<gateway>` push, a dead letter, a backup of the row. See
//! docs/design.md, "Crypto-shredding".
//!
//! The form: version byte 1, a 12-byte random nonce, then the AES-256-GCM ciphertext and its
//! 16-byte tag. The message id is the associated data, so a sealed body cannot be passed off as
//! another message's. A key seals one message, but a client's retry of the same send is sealed
//! again under the same key (the shard hands back the key it holds), so the nonce is random,
//! never fixed.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;
use uuid::Uuid;

/// The version byte of the only form so far.
const VERSION: u8 = 1;
/// Bytes a sealed body adds to its plaintext: version, nonce and tag.
pub const OVERHEAD: usize = 1 + NONCE_LEN + 16;
/// Bytes of a body key.
pub const KEY_LEN: usize = 32;

/// Why a body could not be sealed or opened.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("a body key is {0} bytes, not {KEY_LEN}")]
    KeyLength(usize),
    #[error("the system's random source failed")]
    Random,
    #[error("the sealed body is not version {VERSION} or is too short")]
    Form,
    #[error("the sealed body does not open with its key (altered, or another message's)")]
    Open,
    #[error("the opened body is not UTF-8")]
    Utf8,
}

/// One message's body key. Its bytes leave the process only to the shard's `body_keys` table.
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
        let mut key = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| SealError::Random)?;
        Ok(Self(key))
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

    /// Seals `body` as message `id`'s.
    pub fn seal(&self, id: &Uuid, body: &str) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(body.len() + OVERHEAD);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(body.as_bytes());
        let mut tail = out.split_off(1 + NONCE_LEN);
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

    /// Opens a body sealed as message `id`'s.
    pub fn open(&self, id: &Uuid, sealed: &[u8]) -> Result<String, SealError> {
        if sealed.len() < OVERHEAD || sealed[0] != VERSION {
            return Err(SealError::Form);
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN])
            .map_err(|_| SealError::Form)?;
        let mut buf = sealed[1 + NONCE_LEN..].to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut buf)
            .map_err(|_| SealError::Open)?;
        let len = plain.len();
        buf.truncate(len);
        String::from_utf8(buf).map_err(|_| SealError::Utf8)
    }
}

/// Whether `sealed` has the form of a sealed body of at most `max_body` bytes of text (what the
/// multiplexer checks of a record it cannot open).
pub fn check_form(sealed: &[u8], max_body: usize) -> Result<(), SealError> {
    if sealed.len() <= OVERHEAD || sealed.len() > max_body + OVERHEAD || sealed[0] != VERSION {
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
        let id = Uuid::new_v4();
        let body = "canary \u{1F600} \u{202E}rtl\u{0001}";
        let sealed = key.seal(&id, body).expect("seal");
        assert_eq!(sealed.len(), body.len() + OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"canary"));
        assert_eq!(key.open(&id, &sealed).as_deref(), Ok(body));
        // Another key, another message's id, one altered byte: refused.
        let other = BodyKey::generate().expect("key");
        assert_eq!(other.open(&id, &sealed), Err(SealError::Open));
        assert_eq!(key.open(&Uuid::new_v4(), &sealed), Err(SealError::Open));
        let mut altered = sealed.clone();
        *altered.last_mut().expect("tag") ^= 1;
        assert_eq!(key.open(&id, &altered), Err(SealError::Open));
        assert_eq!(key.open(&id, &sealed[..10]), Err(SealError::Form));
        // Sealing twice under one key uses two nonces.
        assert_ne!(key.seal(&id, body).expect("seal"), sealed);
        assert_eq!(check_form(&sealed, body.len()), Ok(()));
        assert_eq!(check_form(&sealed, body.len() - 1), Err(SealError::Form));
        assert_eq!(format!("{key:?}"), "BodyKey(***)");
        assert_eq!(BodyKey::from_bytes(&[0; 31]), Err(SealError::KeyLength(31)));
    }
}
