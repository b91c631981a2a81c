//! Property tests at a large case count over the decoding of `inbound` records: whatever bytes a
//! producer writes, `decode` answers without panicking, and what it lets through is what the
//! store can hold (valid ids, a consistent conversation, no U+0000 in the body). Everything else
//! is refused with a reason, to be set aside as a dead letter.

use chat_common::ids::{ConversationKey, UserId};
use chat_proto::v1::{inbound_record, AckRecord, ChatMessage, InboundRecord};
use db_writer::inbound::{decode, Inbound, InvalidRecord};
use proptest::prelude::*;
use prost::Message as _;

/// Strings that are sometimes valid ids and sometimes not: empty, too long, odd characters, NUL.
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}",
        "[A-Za-z0-9_.-]{60,70}",
        "[a-z]{0,3}[\\x00 :/é][a-z]{0,3}",
        Just(String::new()),
    ]
}

fn body_like() -> impl Strategy<Value = String> {
    prop_oneof!["\\PC{0,40}", "[\\x00-\\x1f\\x7f]{0,20}", ".{0,40}"]
}

fn message() -> impl Strategy<Value = ChatMessage> {
    (
        id_like(),
        id_like(),
        id_like(),
        body_like(),
        prop::bool::ANY,
        prop::bool::ANY,
    )
        .prop_map(|(sender, recipient, cid, body, good_key, good_id)| {
            let conversation = match (UserId::parse(&sender), UserId::parse(&recipient)) {
                (Ok(s), Ok(r)) if good_key => ConversationKey::of(&s, &r)
                    .map(|k| k.to_string())
                    .unwrap_or_default(),
                _ => format!("{sender}:{recipient}"),
            };
            ChatMessage {
                sealed_body: Vec::new(),
                message_id: if good_id {
                    uuid::Uuid::new_v4().to_string()
                } else {
                    "not-a-uuid".into()
                },
                client_message_id: cid,
                sender,
                recipient,
                body,
                sent_at_ms: 1,
                seq: 0,
                conversation,
            }
        })
}

fn valid_message(m: &ChatMessage) -> bool {
    let (Ok(s), Ok(r), Ok(c)) = (
        UserId::parse(&m.sender),
        UserId::parse(&m.recipient),
        ConversationKey::parse(&m.conversation),
    ) else {
        return false;
    };
    ConversationKey::of(&s, &r).as_ref() == Some(&c)
        && chat_common::ids::ClientMessageId::parse(&m.client_message_id).is_ok()
        && uuid::Uuid::parse_str(&m.message_id).is_ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    // Any bytes: an answer, never a panic; a message let through is one the store can hold.
    #[test]
    fn decoding_any_bytes_is_total(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        match decode(Some(&bytes)) {
            Ok(Inbound::Message(m)) => {
                prop_assert!(valid_message(&ChatMessage::from(&m)));
                prop_assert!(!m.body.contains('\0'));
            }
            Ok(Inbound::Ack(a)) => {
                prop_assert_eq!(a.conversation.peer_of(&a.user), Some(a.peer));
            }
            Err(_) => {}
        }
    }

    // Well-formed records with fields valid or not: let through exactly when every id is valid
    // and the body holds no NUL; a NUL body is refused by name.
    #[test]
    fn a_message_is_let_through_exactly_when_the_store_can_hold_it(m in message()) {
        let bytes = InboundRecord {
            kind: Some(inbound_record::Kind::Message(m.clone())),
            gateway_id: "gw1".into(),
        }
        .encode_to_vec();
        let verdict = decode(Some(&bytes));
        match (valid_message(&m), m.body.contains('\0')) {
            // Decoded into validated ids, and nothing changed on the way.
            (true, false) => match verdict {
                Ok(Inbound::Message(decoded)) => prop_assert_eq!(ChatMessage::from(&decoded), m),
                other => prop_assert!(false, "refused: {other:?}"),
            },
            (true, true) => prop_assert_eq!(verdict, Err(InvalidRecord::NulBody)),
            (false, _) => prop_assert_eq!(verdict, Err(InvalidRecord::BadMessage)),
        }
    }

    #[test]
    fn an_ack_is_let_through_exactly_when_its_user_is_in_its_conversation(
        user in id_like(), a in id_like(), b in id_like(), up_to_seq in any::<u64>()
    ) {
        let conversation = format!("{a}:{b}");
        let ack = AckRecord { user: user.clone(), peer: a.clone(), conversation: conversation.clone(), up_to_seq, acked_at_ms: 1 };
        let bytes = InboundRecord { kind: Some(inbound_record::Kind::Ack(ack.clone())), gateway_id: String::new() }.encode_to_vec();
        let valid = match (UserId::parse(&user), ConversationKey::parse(&conversation)) {
            (Ok(u), Ok(c)) => c.peer_of(&u).is_some(),
            _ => false,
        };
        let verdict = decode(Some(&bytes));
        if valid {
            // The peer comes from the conversation, whatever the record's peer field says.
            let Ok(Inbound::Ack(decoded)) = verdict else {
                return Err(TestCaseError::fail(format!("refused: {verdict:?}")));
            };
            let mut expected = ack;
            expected.peer = decoded.peer.to_string();
            prop_assert_eq!(AckRecord::from(&decoded), expected);
            prop_assert_ne!(decoded.peer, decoded.user);
        } else {
            prop_assert_eq!(verdict, Err(InvalidRecord::BadAck));
        }
    }
}
