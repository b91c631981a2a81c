//! `chatctl tail`: print a topic's records as JSON lines, decoded with the `chat.v1` schema.
//!
//! Each line: `{"topic","partition","offset","timestampMs","key","value"}` where `value` is the
//! record in the proto3 JSON mapping (or `null` for a tombstone, or `{"undecodable": <hex>}`).
//! On `inbound-dlq` the value is the `DeadLetter` with, next to its `original` bytes (base64),
//! `originalRecord`: the original decoded as an `InboundRecord`, or `null` when it does not decode.
//! A sealed body (delete-on-ack mode) shows as `"sealed": {"bytes": N}`, never as text.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use chat_common::kafka::{read_next, start_offset, KafkaConfig, Start};
use chat_common::topics::TopicRole;
use chat_proto::v1::{DeadLetter, InboundRecord, OutboundRecord, PresenceRecord};
use prost::Message as _;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

/// What a tail prints.
pub struct TailOptions {
    pub topic: String,
    /// What the topic's records are (from its name, or as the user said).
    pub role: TopicRole,
    pub start: Start,
    /// Keep waiting for new records (otherwise stop at the end of the log as it was at start).
    pub follow: bool,
    /// Only records about this user (key, sender, recipient, user or peer).
    pub user: Option<String>,
    /// Only records of this conversation key.
    pub conversation: Option<String>,
    /// Stop after printing this many records.
    pub max: Option<u64>,
}

/// Decodes one value by the role of the topic it is on (see [`TopicNames::role`]).
///
/// [`TopicNames::role`]: chat_common::topics::TopicNames::role
pub fn decode(role: &TopicRole, payload: Option<&[u8]>) -> Value {
    let Some(p) = payload else { return Value::Null };
    let decoded = match role {
        TopicRole::DeadLetters => DeadLetter::decode(p).ok().and_then(|d| {
            let original = InboundRecord::decode(d.original.as_slice())
                .ok()
                .and_then(|r| serde_json::to_value(r).ok())
                .unwrap_or(Value::Null);
            let mut v = serde_json::to_value(d).ok()?;
            if let Some(o) = v.as_object_mut() {
                o.insert("originalRecord".into(), original);
            }
            Some(v)
        }),
        TopicRole::Inbound => InboundRecord::decode(p)
            .ok()
            .and_then(|r| serde_json::to_value(r).ok()),
        TopicRole::Presence => PresenceRecord::decode(p)
            .ok()
            .and_then(|r| serde_json::to_value(r).ok()),
        TopicRole::Outbound(_) => OutboundRecord::decode(p)
            .ok()
            .and_then(|r| serde_json::to_value(r).ok()),
    };
    match decoded {
        Some(mut v) => {
            mark_sealed(&mut v);
            v
        }
        None => {
            let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
            json!({ "undecodable": hex, "as": role_name(role) })
        }
    }
}

/// Delete-on-ack mode: a message's sealed body is shown as such, `"sealed": {"bytes": N}` in
/// place of its ciphertext (`sealedBody`). Only a gateway, with the key from the shard, opens
/// it, and the recipient's ack destroys the key: a tail never shows the text.
fn mark_sealed(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(b64)) = o.remove("sealedBody") {
                // base64 of n bytes is 4 * ceil(n / 3) characters, less its padding.
                let pad = b64.bytes().rev().take_while(|&b| b == b'=').count();
                let bytes = b64.len() / 4 * 3 - pad;
                o.insert("sealed".into(), json!({ "bytes": bytes }));
            }
            o.values_mut().for_each(mark_sealed);
        }
        Value::Array(a) => a.iter_mut().for_each(mark_sealed),
        _ => {}
    }
}

/// The role as `--role` spells it.
pub fn role_name(role: &TopicRole) -> &'static str {
    match role {
        TopicRole::Inbound => "inbound",
        TopicRole::DeadLetters => "inbound-dlq",
        TopicRole::Presence => "presence",
        TopicRole::Outbound(_) => "outbound",
    }
}

/// True when the record mentions `user` (as key or in a user field).
fn mentions_user(key: Option<&str>, value: &Value, user: &str) -> bool {
    if key == Some(user) {
        return true;
    }
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if matches!(k.as_str(), "sender" | "recipient" | "user" | "peer")
                        && v.as_str() == Some(user)
                    {
                        return true;
                    }
                    stack.push(v);
                }
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    false
}

fn mentions_conversation(key: Option<&str>, value: &Value, conversation: &str) -> bool {
    key == Some(conversation)
        || value
            .to_string()
            .contains(&format!("\"conversation\":\"{conversation}\""))
}

/// Runs the tail, writing JSON lines to stdout.
pub async fn tail(kafka: &KafkaConfig, options: TailOptions) -> anyhow::Result<u64> {
    let consumer = kafka.reader()?;
    let timeout = Duration::from_secs(10);
    let topic = options.topic.as_str();
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading metadata of {topic}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} does not exist");
    let mut tpl = TopicPartitionList::new();
    let mut end: HashMap<i32, i64> = HashMap::new();
    for p in &partitions {
        let marks = consumer.fetch_watermarks(topic, *p, timeout)?;
        let from = start_offset(&consumer, topic, *p, options.start, marks, timeout)?;
        tpl.add_partition_offset(topic, *p, Offset::Offset(from))?;
        if from < marks.1 {
            end.insert(*p, marks.1);
        }
    }
    if !options.follow && end.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl)?;
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        if !options.follow && end.is_empty() {
            break;
        }
        let m = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            m = read_next(&consumer) => m?,
        };
        let (p, offset) = (m.partition(), m.offset());
        if !options.follow {
            match end.get(&p) {
                Some(&stop) if offset < stop => {
                    if offset + 1 >= stop {
                        end.remove(&p);
                    }
                }
                _ => continue,
            }
        }
        let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
        for (item, key, value) in pushes(key, decode(&options.role, m.payload())) {
            if let Some(u) = &options.user {
                if !mentions_user(key.as_deref(), &value, u) {
                    continue;
                }
            }
            if let Some(c) = &options.conversation {
                if !mentions_conversation(key.as_deref(), &value, c) {
                    continue;
                }
            }
            let mut line = json!({
                "topic": topic,
                "partition": p,
                "offset": offset,
                "timestampMs": m.timestamp().to_millis(),
                "key": key,
                "value": value,
            });
            if let Some(i) = item {
                line["item"] = json!(i);
            }
            let mut out = stdout.lock();
            if writeln!(out, "{line}").is_err() {
                return Ok(printed); // stdout closed (e.g. piped into head)
            }
            printed += 1;
            if options.max.is_some_and(|max| printed >= max) {
                return Ok(printed);
            }
        }
    }
    Ok(printed)
}

/// A record as the lines to print: an outbound batch becomes one line per item (its index, the
/// user it is for as the key, its record as the value), like a single outbound record; any
/// other record is one line.
fn pushes(key: Option<&str>, value: Value) -> Vec<(Option<usize>, Option<String>, Value)> {
    match value.pointer("/batch/items").and_then(Value::as_array) {
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let user = item.get("user").and_then(Value::as_str).map(str::to_owned);
                let record = item.get("record").cloned().unwrap_or(Value::Null);
                (Some(i), user, record)
            })
            .collect(),
        None => vec![(None, key.map(str::to_owned), value)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_proto::v1::{
        inbound_record, outbound_record, ChatMessage, OutboundBatch, OutboundItem, Stored,
    };

    fn outbound() -> TopicRole {
        TopicRole::Outbound(chat_common::ids::GatewayId::parse("gw1").expect("valid"))
    }

    #[test]
    fn a_sealed_body_shows_as_sealed_with_its_size() {
        let rec = InboundRecord {
            kind: Some(inbound_record::Kind::Message(ChatMessage {
                message_id: "6c1f3a52-9d0e-4b7a-8e21-5f4c0b9d7a13".into(),
                sealed_body: vec![1; 33],
                ..Default::default()
            })),
            gateway_id: "gw1".into(),
        };
        let v = decode(&TopicRole::Inbound, Some(&rec.encode_to_vec()));
        assert_eq!(v["message"]["sealed"]["bytes"], 33, "{v}");
        assert!(v["message"].get("sealedBody").is_none(), "{v}");
        for n in [29, 30, 31, 32] {
            let mut v = json!({ "sealedBody": base64_of(n) });
            mark_sealed(&mut v);
            assert_eq!(v["sealed"]["bytes"], n);
        }
    }

    fn base64_of(n: usize) -> String {
        let rec = ChatMessage {
            sealed_body: vec![7; n],
            ..Default::default()
        };
        serde_json::to_value(rec).expect("json")["sealedBody"]
            .as_str()
            .expect("base64")
            .to_owned()
    }

    #[test]
    fn decodes_by_topic_and_filters() {
        let rec = InboundRecord {
            kind: Some(inbound_record::Kind::Message(ChatMessage {
                sender: "alice".into(),
                recipient: "bob".into(),
                conversation: "alice:bob".into(),
                body: "hi".into(),
                ..Default::default()
            })),
            gateway_id: "gw1".into(),
        }
        .encode_to_vec();
        let v = decode(&TopicRole::Inbound, Some(&rec));
        assert_eq!(v["message"]["body"], "hi");
        assert!(mentions_user(Some("alice:bob"), &v, "bob"));
        assert!(!mentions_user(Some("alice:bob"), &v, "carol"));
        assert!(mentions_conversation(Some("alice:bob"), &v, "alice:bob"));
        assert_eq!(decode(&TopicRole::Presence, None), Value::Null);

        // An outbound batch is printed item by item, each keyed by its user.
        let stored = |seq: u64| OutboundRecord {
            kind: Some(outbound_record::Kind::Stored(Stored {
                seq,
                ..Default::default()
            })),
        };
        let batch = OutboundRecord {
            kind: Some(outbound_record::Kind::Batch(OutboundBatch {
                items: vec![
                    OutboundItem {
                        user: "alice".into(),
                        record: Some(stored(1)),
                    },
                    OutboundItem {
                        user: "bob".into(),
                        record: Some(stored(2)),
                    },
                ],
            })),
        }
        .encode_to_vec();
        let lines = pushes(Some("gw1"), decode(&outbound(), Some(&batch)));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].0, Some(1));
        assert_eq!(lines[1].1.as_deref(), Some("bob"));
        assert_eq!(lines[1].2["stored"]["seq"], "2");
        let single = pushes(
            Some("carol"),
            decode(&outbound(), Some(&stored(3).encode_to_vec())),
        );
        assert_eq!(single.len(), 1);
        assert_eq!((single[0].0, single[0].1.as_deref()), (None, Some("carol")));
        assert!(decode(&TopicRole::Inbound, Some(b"\xff\xff"))
            .get("undecodable")
            .is_some());
    }

    #[test]
    fn decodes_dead_letters_with_their_original() {
        let dead = |original: Vec<u8>| {
            DeadLetter {
                original,
                topic: "t-inbound".into(),
                partition: 2,
                offset: 41,
                code: "invalid_body".into(),
                reason: "NUL".into(),
                dead_at_ms: 5,
            }
            .encode_to_vec()
        };
        let rec = InboundRecord {
            kind: Some(inbound_record::Kind::Message(ChatMessage {
                sender: "alice".into(),
                recipient: "bob".into(),
                body: "x\0y".into(),
                ..Default::default()
            })),
            gateway_id: "gw1".into(),
        }
        .encode_to_vec();
        let v = decode(&TopicRole::DeadLetters, Some(&dead(rec)));
        assert_eq!(v["code"], "invalid_body");
        assert_eq!(v["partition"], 2);
        assert_eq!(v["offset"], "41");
        assert_eq!(v["originalRecord"]["message"]["body"], "x\u{0}y");
        assert!(mentions_user(None, &v, "alice"));
        // An original that is not an InboundRecord is kept as bytes only.
        let v = decode(&TopicRole::DeadLetters, Some(&dead(b"\xff\xff".to_vec())));
        assert_eq!(v["originalRecord"], Value::Null);
        assert_eq!(v["original"], "//8=");
    }
}
