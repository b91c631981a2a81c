//! The poison-record scenario's own part: bad records produced straight into `inbound` among the
//! workload's traffic (keyed like real ones, so they land in the partitions and conversations the
//! workload uses), and the check that each was set aside on the dead-letter topic
//! (`<prefix>inbound-dlq`, values `chat.v1.DeadLetter`) instead of stopping its partition.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use anyhow::Context;
use chat_common::ids::{ConversationKey, UserId};
use chat_common::kafka::KafkaConfig;
use chat_proto::v1::{inbound_record, AckRecord, ChatMessage, DeadLetter, InboundRecord};
use prost::Message as _;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;
use rdkafka::{Message as _, Offset, TopicPartitionList};

/// The kinds of bad record, produced in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Bytes that are not an `InboundRecord`.
    Undecodable,
    /// A message whose body holds U+0000 (valid UTF-8; Postgres text refuses it).
    NulBody,
    /// A message with a 100 KB client message id or conversation field.
    Oversized,
    /// An ack whose user is not a valid user id.
    BadAckUser,
    /// A record with an empty value, or none.
    Empty,
}

pub const KINDS: [Kind; 5] = [
    Kind::Undecodable,
    Kind::NulBody,
    Kind::Oversized,
    Kind::BadAckUser,
    Kind::Empty,
];

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Undecodable => "undecodable",
            Kind::NulBody => "NUL body",
            Kind::Oversized => "oversized field",
            Kind::BadAckUser => "ack with invalid user",
            Kind::Empty => "empty value",
        })
    }
}

/// Size of the oversized field.
const OVERSIZED: usize = 100 * 1024;

/// One bad record, before it is produced.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRecord {
    pub kind: Kind,
    /// The conversation key of `sender` and `recipient`, as the gateways key records.
    pub key: String,
    /// `None`: a record with no value at all.
    pub value: Option<Vec<u8>>,
}

/// The `k`-th bad record of `kind`, in the conversation of `sender` and `recipient` (a real one
/// of the workload). Variants alternate with `k`.
pub fn bad_record(kind: Kind, k: usize, sender: &UserId, recipient: &UserId) -> BadRecord {
    let conversation = ConversationKey::of(sender, recipient)
        .map(|c| c.as_str().to_owned())
        .unwrap_or_default();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let message = |client_message_id: String, body: &str, conversation: String| {
        let record = InboundRecord {
            kind: Some(inbound_record::Kind::Message(ChatMessage {
                sealed_body: Vec::new(),
                message_id: uuid::Uuid::new_v4().to_string(),
                client_message_id,
                sender: sender.as_str().to_owned(),
                recipient: recipient.as_str().to_owned(),
                body: body.to_owned(),
                sent_at_ms: now_ms,
                seq: 0,
                conversation,
            })),
            gateway_id: "cg1".to_owned(),
        };
        Some(record.encode_to_vec())
    };
    let value = match kind {
        Kind::Undecodable => Some(match k % 3 {
            // A varint longer than ten bytes.
            0 => vec![0xff; 12],
            // Field 1 (length-delimited) declaring far more bytes than follow.
            1 => vec![0x0a, 0xff, 0xff, 0xff, 0x0f, b'x'],
            // Text: 'n' is field 13 with wire type 6, which does not exist.
            _ => b"not a protobuf record".to_vec(),
        }),
        Kind::NulBody => message(format!("poison-nul-{k}"), "x\u{0}y", conversation.clone()),
        Kind::Oversized if k.is_multiple_of(2) => {
            message("c".repeat(OVERSIZED), "oversized id", conversation.clone())
        }
        Kind::Oversized => message(
            format!("poison-big-{k}"),
            "oversized conversation",
            "x".repeat(OVERSIZED),
        ),
        Kind::BadAckUser => {
            let user = match k % 4 {
                0 => "bad user".to_owned(),
                1 => String::new(),
                2 => "x\u{0}y".to_owned(),
                _ => "u".repeat(65),
            };
            let record = InboundRecord {
                kind: Some(inbound_record::Kind::Ack(AckRecord {
                    user,
                    peer: sender.as_str().to_owned(),
                    conversation: conversation.clone(),
                    up_to_seq: 1,
                    acked_at_ms: now_ms,
                })),
                gateway_id: "cg1".to_owned(),
            };
            Some(record.encode_to_vec())
        }
        Kind::Empty if k.is_multiple_of(2) => Some(Vec::new()),
        Kind::Empty => None,
    };
    BadRecord {
        kind,
        key: conversation,
        value,
    }
}

/// A bad record in `inbound`.
#[derive(Clone, Debug)]
pub struct Produced {
    pub kind: Kind,
    pub partition: i32,
    pub offset: i64,
    pub value: Option<Vec<u8>>,
}

/// Produces `records` to `topic`, spread evenly over `window`, with the gateways' producer
/// settings (so each lands in its key's partition); returns where each landed.
pub async fn produce(
    kafka: &KafkaConfig,
    topic: &str,
    records: Vec<BadRecord>,
    window: Duration,
) -> anyhow::Result<Vec<Produced>> {
    let producer = kafka.producer()?;
    let spacing = window / u32::try_from(records.len().max(1)).unwrap_or(u32::MAX);
    let mut tick = tokio::time::interval(spacing);
    let mut produced = Vec::with_capacity(records.len());
    for r in records {
        tick.tick().await;
        let mut record = FutureRecord::<str, [u8]>::to(topic).key(&r.key);
        if let Some(v) = &r.value {
            record = record.payload(v);
        }
        let (partition, offset) = producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
            .with_context(|| format!("producing a bad record ({})", r.kind))?;
        produced.push(Produced {
            kind: r.kind,
            partition,
            offset,
            value: r.value,
        });
    }
    Ok(produced)
}

/// What the dead-letter topic held for the bad records.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoisonCounts {
    pub produced: usize,
    /// Distinct partitions of `inbound` they landed in.
    pub partitions: usize,
    /// Bad records found on the dead-letter topic (by source partition and offset).
    pub dead_lettered: usize,
    /// Dead letters of bad records read, repeats included (at-least-once: a kill can repeat
    /// some); reading stops once every bad record was found, so later repeats are not counted.
    pub copies: usize,
    /// Dead letters of a bad record whose source topic or original bytes are not the record's,
    /// plus dead letters that do not decode as `DeadLetter`.
    pub wrong: usize,
    /// Dead letters of records the suite did not produce as bad (the workload's own messages).
    pub others: usize,
    /// Dead letters of bad records by their code.
    pub codes: BTreeMap<String, usize>,
    /// Bad records missing from the dead-letter topic, by kind.
    pub missing: BTreeMap<Kind, usize>,
    /// `multiplexer_dead_letters_total` summed over the multiplexers at the end (a restarted
    /// process counts from zero); `None` when no multiplexer exports it.
    pub metric: Option<f64>,
}

impl PoisonCounts {
    /// Every bad record was set aside, with its source and bytes.
    pub fn all_dead_lettered(&self) -> bool {
        self.dead_lettered == self.produced && self.wrong == 0
    }

    /// For the note column.
    pub fn note(&self) -> String {
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let mut s = format!(
            "{} bad records into {} partitions, {} dead-lettered ({} dead letters read{})",
            self.produced,
            self.partitions,
            self.dead_lettered,
            self.copies,
            if codes.is_empty() {
                String::new()
            } else {
                format!(": {}", codes.join(", "))
            }
        );
        if !self.missing.is_empty() {
            let missing: Vec<String> = self
                .missing
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            s.push_str(&format!("; missing: {}", missing.join(", ")));
        }
        if self.wrong > 0 {
            s.push_str(&format!("; {} with wrong source or bytes", self.wrong));
        }
        if self.others > 0 {
            s.push_str(&format!("; {} other dead letters", self.others));
        }
        match self.metric {
            Some(m) => s.push_str(&format!("; multiplexer_dead_letters_total {m}")),
            None => s.push_str("; no multiplexer_dead_letters_total"),
        }
        s
    }
}

/// Reads `dlq` from the beginning until every produced bad record was found there, or `timeout`.
pub async fn read_dead_letters(
    kafka: &KafkaConfig,
    dlq: &str,
    inbound: &str,
    produced: &[Produced],
    timeout: Duration,
) -> anyhow::Result<PoisonCounts> {
    let mut counts = PoisonCounts {
        produced: produced.len(),
        partitions: produced
            .iter()
            .map(|p| p.partition)
            .collect::<HashSet<_>>()
            .len(),
        ..PoisonCounts::default()
    };
    let by_source: HashMap<(i32, i64), &Produced> = produced
        .iter()
        .map(|p| ((p.partition, p.offset), p))
        .collect();
    let consumer = kafka.reader()?;
    let metadata = consumer
        .fetch_metadata(Some(dlq), Duration::from_secs(10))
        .with_context(|| format!("metadata of {dlq}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    anyhow::ensure!(partitions > 0, "the dead-letter topic {dlq} does not exist");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(dlq, i32::try_from(p)?, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut found: HashSet<(i32, i64)> = HashSet::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while found.len() < produced.len() {
        let m = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_) => break,
            Ok(m) => m.context("reading the dead-letter topic")?,
        };
        let Ok(letter) = DeadLetter::decode(m.payload().unwrap_or_default()) else {
            counts.wrong += 1;
            continue;
        };
        let source = (letter.partition, letter.offset);
        let Some(bad) = by_source.get(&source) else {
            counts.others += 1;
            continue;
        };
        counts.copies += 1;
        *counts.codes.entry(letter.code.clone()).or_default() += 1;
        let original_matches = letter.original == bad.value.clone().unwrap_or_default();
        if letter.topic != inbound || !original_matches {
            counts.wrong += 1;
            continue;
        }
        found.insert(source);
    }
    counts.dead_lettered = found.len();
    for p in produced {
        if !found.contains(&(p.partition, p.offset)) {
            *counts.missing.entry(p.kind).or_default() += 1;
        }
    }
    Ok(counts)
}

/// `multiplexer_dead_letters_total` summed over its series in each Prometheus text, or `None`
/// when no text has it.
pub fn dead_letter_metric<'a>(texts: impl IntoIterator<Item = &'a str>) -> Option<f64> {
    let mut total = None;
    for text in texts {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("multiplexer_dead_letters_total") else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *total.get_or_insert(0.0) += v;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> (UserId, UserId) {
        (
            UserId::parse("po12ab3a").expect("valid"),
            UserId::parse("po12ab3b").expect("valid"),
        )
    }

    /// Each bad record is keyed like a real one, and is bad in the way its kind says.
    #[test]
    fn bad_records_are_bad_in_their_own_way() {
        let (a, b) = users();
        for kind in KINDS {
            for k in 0..4 {
                let r = bad_record(kind, k, &a, &b);
                assert_eq!(r.key, "po12ab3a:po12ab3b");
                let decoded = r.value.as_deref().map(InboundRecord::decode);
                match kind {
                    Kind::Undecodable => {
                        assert!(matches!(decoded, Some(Err(_))), "{kind} {k} decodes")
                    }
                    Kind::Empty => assert!(
                        r.value.as_deref().is_none_or(<[u8]>::is_empty),
                        "{kind} {k} has bytes"
                    ),
                    Kind::NulBody => match decoded {
                        Some(Ok(InboundRecord {
                            kind: Some(inbound_record::Kind::Message(m)),
                            ..
                        })) => assert!(m.body.contains('\u{0}')),
                        other => panic!("{kind} {k}: {other:?}"),
                    },
                    Kind::Oversized => match decoded {
                        Some(Ok(InboundRecord {
                            kind: Some(inbound_record::Kind::Message(m)),
                            ..
                        })) => assert!(
                            m.client_message_id.len().max(m.conversation.len()) >= OVERSIZED
                        ),
                        other => panic!("{kind} {k}: {other:?}"),
                    },
                    Kind::BadAckUser => match decoded {
                        Some(Ok(InboundRecord {
                            kind: Some(inbound_record::Kind::Ack(ack)),
                            ..
                        })) => assert!(UserId::parse(&ack.user).is_err(), "{:?}", ack.user),
                        other => panic!("{kind} {k}: {other:?}"),
                    },
                }
            }
        }
    }

    #[test]
    fn the_metric_sums_its_series_and_only_its_own() {
        let a = "# TYPE multiplexer_dead_letters_total counter\n\
                 multiplexer_dead_letters_total{code=\"undecodable\"} 3\n\
                 multiplexer_dead_letters_total{code=\"empty\"} 2\n\
                 multiplexer_dead_letters_total_other 100\n";
        let b = "multiplexer_dead_letters_total 4\n";
        assert_eq!(dead_letter_metric([a, b]), Some(9.0));
        assert_eq!(dead_letter_metric(["other_total 1\n"]), None);
    }

    #[test]
    fn counts_pass_only_when_every_bad_record_is_there_with_its_bytes() {
        let mut c = PoisonCounts {
            produced: 3,
            dead_lettered: 3,
            ..PoisonCounts::default()
        };
        assert!(c.all_dead_lettered());
        c.wrong = 1;
        assert!(!c.all_dead_lettered());
        c.wrong = 0;
        c.dead_lettered = 2;
        assert!(!c.all_dead_lettered());
    }
}
