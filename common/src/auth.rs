//! Identity: JSON Web Tokens naming the user.
//!
//! The gateway verifies tokens with a configured HS256 secret or RS256 public key and checks
//! issuer, audience and expiry. The user id is the token's subject and comes from nowhere else.
//! The algorithm is fixed by the key type, so `alg: none` and algorithm confusion are refused.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{IdError, UserId};

/// Why a token was refused (the message is safe to show; it never contains the token).
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token subject is not a valid user id: {0}")]
    BadSubject(#[from] IdError),
    #[error("bad key: {0}")]
    BadKey(String),
}

/// The claims this system reads and writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub exp: u64,
    pub iat: u64,
}

/// Verifies tokens. Built once from configuration.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], issuer: &str, audience: &str) -> Self {
        Self::with(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            issuer,
            audience,
        )
    }

    /// RS256 with a PEM public key.
    pub fn rs256(pem: &[u8], issuer: &str, audience: &str) -> Result<Self, AuthError> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|e| AuthError::BadKey(e.to_string()))?;
        Ok(Self::with(key, Algorithm::RS256, issuer, audience))
    }

    fn with(key: DecodingKey, alg: Algorithm, issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.leeway = 30;
        Self { key, validation }
    }

    /// The user the token names, if it is valid.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        Ok(UserId::parse_addressable(&data.claims.sub)?)
    }
}

/// Mints HS256 tokens: for the local stack (`make token`) and tests, never needed in production.
#[derive(Clone)]
pub struct TokenIssuer {
    key: EncodingKey,
    issuer: String,
    audience: String,
}

impl TokenIssuer {
    pub fn hs256(secret: &[u8], issuer: &str, audience: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        }
    }

    /// A token for `user` valid for `ttl_secs` seconds.
    pub fn issue(&self, user: &UserId, ttl_secs: u64) -> Result<String, AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.issue_at(user, now, now + ttl_secs)
    }

    /// A token for `user` issued at `iat` and expiring at `exp` (Unix seconds).
    pub fn issue_at(&self, user: &UserId, iat: u64, exp: u64) -> Result<String, AuthError> {
        let claims = Claims {
            sub: user.as_str().to_owned(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat,
            exp,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.key,
        )?)
    }
}

/// Default issuer and audience of the local stack.
pub const DEFAULT_ISSUER: &str = "chat-local";
pub const DEFAULT_AUDIENCE: &str = "chat";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let alice = UserId::parse("alice").expect("valid");
        let issuer = TokenIssuer::hs256(b"s3cret", "iss", "aud");
        let verifier = TokenVerifier::hs256(b"s3cret", "iss", "aud");
        let token = issuer.issue(&alice, 60).expect("issue");
        assert_eq!(verifier.verify(&token).expect("valid"), alice);

        // Wrong secret, issuer or audience.
        assert!(TokenVerifier::hs256(b"other", "iss", "aud")
            .verify(&token)
            .is_err());
        assert!(TokenVerifier::hs256(b"s3cret", "x", "aud")
            .verify(&token)
            .is_err());
        assert!(TokenVerifier::hs256(b"s3cret", "iss", "x")
            .verify(&token)
            .is_err());

        // alg: none, with the same claims.
        let parts: Vec<&str> = token.split('.').collect();
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
        let forged = format!("{none_header}.{}.", parts[1]);
        assert!(verifier.verify(&forged).is_err());

        // Expired.
        let old = Claims {
            sub: "alice".into(),
            iss: "iss".into(),
            aud: "aud".into(),
            iat: 1,
            exp: 2,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &old,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .expect("encode");
        assert!(verifier.verify(&expired).is_err());

        // Subjects that are not a user's id: outside the alphabet, or a dot segment (a user a URL
        // cannot name).
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        for (sub, why) in [
            ("a/b", IdError::BadChar { kind: "user id" }),
            ("..", IdError::DotSegment { kind: "user id" }),
            (".", IdError::DotSegment { kind: "user id" }),
        ] {
            let claims = Claims {
                sub: sub.into(),
                iss: "iss".into(),
                aud: "aud".into(),
                iat: now,
                exp: now + 60,
            };
            let token = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"s3cret"),
            )
            .expect("encode");
            match verifier.verify(&token) {
                Err(AuthError::BadSubject(e)) => assert_eq!(e, why, "{sub:?}"),
                other => panic!("{sub:?}: {other:?}"),
            }
        }
        assert!(verifier.verify("not a token").is_err());
    }
}
