//! The rule for a message body, checked at the edge (the gateway) and again wherever a body
//! enters the store from the log, so a body the store cannot hold is refused with a clear error
//! instead of reaching Postgres.
//!
//! A body is UTF-8 text (the proto's `string`), 1 to `max` bytes, without U+0000. Postgres `text`
//! cannot hold U+0000 (every other Unicode scalar value is fine: control characters, emoji,
//! combining marks, right-to-left text), and a NUL in chat text has no use but to end C strings
//! early in clients that read it. Refusing it keeps bodies readable as text by every tool (psql,
//! the JSON mapping, exports); storing bodies as bytes instead would make them opaque to all of
//! them for the sake of one character.

use thiserror::Error;

/// Why a body was refused. `code()` is the machine-readable reason clients see.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("message body is empty")]
    Empty,
    #[error("message body is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message body contains U+0000 (NUL) at byte {at}, which cannot be stored")]
    Nul { at: usize },
}

impl BodyError {
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::Empty => "empty_body",
            BodyError::TooLarge { .. } => "body_too_large",
            BodyError::Nul { .. } => "invalid_body",
        }
    }
}

/// Checks `body` against the rule, with `max` bytes the largest size allowed.
pub fn check(body: &str, max: usize) -> Result<(), BodyError> {
    if body.is_empty() {
        return Err(BodyError::Empty);
    }
    if body.len() > max {
        return Err(BodyError::TooLarge {
            size: body.len(),
            limit: max,
        });
    }
    match body.bytes().position(|b| b == 0) {
        Some(at) => Err(BodyError::Nul { at }),
        None => Ok(()),
    }
}

/// The most bytes a body of `max_body` bytes takes inside a JSON string: a control character
/// escapes to six (`\u0001`), the worst case per byte of UTF-8.
pub const fn json_escaped_max(max_body: usize) -> usize {
    max_body.saturating_mul(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_empty_oversized_and_nul_bodies() {
        assert_eq!(check("", 10), Err(BodyError::Empty));
        assert_eq!(
            check("12345678901", 10),
            Err(BodyError::TooLarge {
                size: 11,
                limit: 10
            })
        );
        assert_eq!(check("x\u{0}y", 10), Err(BodyError::Nul { at: 1 }));
        assert_eq!(
            check("x\u{0}y", 10).map_err(|e| e.code()),
            Err("invalid_body")
        );
        // Every other character the store holds is accepted.
        for ok in [
            "\u{1}\u{1f}\u{7f}\t\r\n",
            "😀👍🏽",
            "e\u{301}",
            "שלום עליכם",
            "\u{feff}\u{fffd}\u{10ffff}",
        ] {
            assert_eq!(check(ok, 64), Ok(()), "{ok:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]

        // Any string is accepted exactly when it is non-empty, fits, and holds no NUL; never a
        // panic. A string that is accepted fits the JSON frame bound once escaped.
        #[test]
        fn body_rule_is_total_and_exact(s in "\\PC{0,40}|[\\x00-\\x20]{0,40}|.{0,40}", max in 0usize..64) {
            let verdict = check(&s, max);
            let expected = !s.is_empty() && s.len() <= max && !s.contains('\0');
            proptest::prop_assert_eq!(verdict.is_ok(), expected);
            if verdict.is_ok() {
                let json = serde_json::to_string(&s).expect("a string serialises");
                proptest::prop_assert!(json.len() - 2 <= json_escaped_max(s.len()));
            }
        }
    }
}
