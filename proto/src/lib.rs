//! The `chat.v1` wire contract, generated from `proto/chat/v1/chat.proto`.
//!
//! This crate owns the schema and nothing else: client frames ([`v1::ClientFrame`],
//! [`v1::ServerFrame`]) and Kafka record values ([`v1::InboundRecord`], [`v1::OutboundRecord`],
//! [`v1::PresenceRecord`]). Every message implements `prost::Message` (binary) and serde
//! `Serialize`/`Deserialize` in the proto3 JSON mapping (text frames, JSON-lines tools).

/// Generated types of package `chat.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/chat.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/chat.v1.serde.rs"));
}

/// The compatibility rule (only add fields), checked in tests against the released schema.
#[cfg(test)]
mod compat;

/// The schema source, for tools that decode records without the generated code
/// (for example `protoc --decode chat.v1.InboundRecord`).
pub const SCHEMA: &str = include_str!("../proto/chat/v1/chat.proto");

#[cfg(test)]
mod tests {
    use super::v1::*;
    use prost::Message;

    #[test]
    fn json_mapping_uses_camel_case_and_string_int64() {
        let frame = ServerFrame {
            kind: Some(server_frame::Kind::Accepted(Accepted {
                client_message_id: "c1".into(),
                message_id: "m1".into(),
                sent_at_ms: 1_700_000_000_000,
                conversation: "k".into(),
            })),
        };
        let json = serde_json::to_value(&frame).expect("serialize");
        assert_eq!(json["accepted"]["clientMessageId"], "c1");
        assert_eq!(json["accepted"]["sentAtMs"], "1700000000000");
    }

    #[test]
    fn json_text_frame_parses_like_binary() {
        let text = r#"{"send":{"clientMessageId":"c1","recipient":"bob","body":"hi"}}"#;
        let from_json: ClientFrame = serde_json::from_str(text).expect("parse");
        let bytes = from_json.encode_to_vec();
        let from_bin = ClientFrame::decode(bytes.as_slice()).expect("decode");
        assert_eq!(from_json, from_bin);
        match from_bin.kind {
            Some(client_frame::Kind::Send(s)) => assert_eq!(s.body, "hi"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_json_fields_are_rejected_cleanly() {
        let err = serde_json::from_str::<ClientFrame>(r#"{"send":{"nope":1}}"#);
        // pbjson ignores unknown fields by default; either way it must not panic.
        let _ = err;
        assert!(serde_json::from_str::<ClientFrame>("{").is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        // Arbitrary bytes never panic the binary decoder, and what decodes re-encodes.
        #[test]
        fn binary_frames_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(frame) = ClientFrame::decode(bytes.as_slice()) {
                let again = ClientFrame::decode(frame.encode_to_vec().as_slice()).expect("re-decodes");
                proptest::prop_assert_eq!(frame, again);
            }
        }

        // Arbitrary text never panics the JSON decoder.
        #[test]
        fn text_frames_decode_or_fail_cleanly(text in ".{0,300}") {
            let _ = serde_json::from_str::<ClientFrame>(&text);
        }
    }
}
