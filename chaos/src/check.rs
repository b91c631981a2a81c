//! The checker: every anomaly the guarantees rule out, counted from the workload's log and the
//! shards.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::degraded::DegradedCounts;
use crate::poison::PoisonCounts;
use crate::workload::Log;

/// The counts for one scenario.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub scenario: String,
    pub messages: usize,
    /// Accepted but never shown to the recipient.
    pub lost: usize,
    /// Shown to the user more than once (after client dedup).
    pub duplicates_shown: usize,
    /// Delivered more than once before dedup (allowed: at-least-once).
    pub duplicates_wire: u64,
    /// Per-conversation inversions or gaps in what the recipient was shown.
    pub order_violations: usize,
    /// Messages stored with a lower seq than a message their sender sent before them in the same
    /// conversation (guarantee 3: a sender's messages get seqs in the order they were sent,
    /// pipelined or not).
    pub sender_order_violations: usize,
    /// Shown but never accepted.
    pub phantoms: usize,
    /// Gaps or repeats in the stored per-conversation sequences.
    pub seq_violations: usize,
    /// Delete-on-ack: acked messages whose body can be read again (as text, or its key back).
    pub resurrected: usize,
    /// Delete-on-ack: bodies found as text on the brokers' or the shards' disks (the canary
    /// scan; every copy should be sealed).
    pub plaintext_on_disk: usize,
    /// Keep mode: the canary scan found no body on disk, where every body is as text: it
    /// cannot see the disks, and a delete-on-ack scan's zero would prove nothing.
    pub scan_blind: bool,
    /// Bodies found in the services' logs (none, in either mode).
    pub bodies_in_logs: usize,
    /// User index rows that break its invariant (a message pending for a user whose index does
    /// not show it) or run ahead of the shards.
    pub index_violations: usize,
    /// Poison-record scenario: bad records produced into `inbound`, and how many of them are
    /// missing from the dead-letter topic, or there with the wrong source or bytes.
    pub poison: Option<PoisonCounts>,
    /// Degraded-readiness scenario: the gateways' readiness and the healthy shard's
    /// conversations while the other shard was down.
    pub degraded: Option<DegradedCounts>,
    /// Heal to the delivery of the last message accepted before the heal, in seconds.
    pub recovery_secs: f64,
    pub unanswered: u64,
    pub note: String,
    /// What the failure looked like, for the log (not in the results table).
    pub detail: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicates_shown == 0
            && self.order_violations == 0
            && self.sender_order_violations == 0
            && self.phantoms == 0
            && self.seq_violations == 0
            && self.resurrected == 0
            && self.plaintext_on_disk == 0
            && !self.scan_blind
            && self.bodies_in_logs == 0
            && self.index_violations == 0
            && self.recovery_secs <= 30.0
            && self
                .poison
                .as_ref()
                .is_none_or(PoisonCounts::all_dead_lettered)
            && self.degraded.as_ref().is_none_or(DegradedCounts::passed)
    }

    /// The lost count as shown: "-" when the scenario did not complete.
    pub fn lost_text(&self) -> String {
        if self.lost == usize::MAX {
            "-".to_owned()
        } else {
            self.lost.to_string()
        }
    }

    /// Every count and the note, on one line.
    pub fn summary(&self) -> String {
        format!(
            "messages {}, unanswered {}, lost {}, duplicates shown {}, order violations {}, \
             sender-order violations {}, phantoms {}, seq gaps {}, resurrected {}, \
             bodies on disk {}, index violations {}, recovery {:.1} s; {} {}",
            self.messages,
            self.unanswered,
            self.lost_text(),
            self.duplicates_shown,
            self.order_violations,
            self.sender_order_violations,
            self.phantoms,
            self.seq_violations,
            self.resurrected,
            self.plaintext_on_disk,
            self.index_violations,
            self.recovery_secs,
            self.note,
            self.detail
        )
    }
}

/// Counts the anomalies in `log`; `heal` is when the fault ended.
pub fn check(scenario: &str, log: &Log, heal: Instant) -> Report {
    let mut r = Report {
        scenario: scenario.to_owned(),
        messages: log.accepted.len(),
        duplicates_wire: log.wire_duplicates,
        unanswered: log.unanswered,
        ..Report::default()
    };
    let mut shown_at: HashMap<&str, Instant> = HashMap::new();
    for conv in &log.shown {
        let mut seen = HashSet::new();
        let mut expected = 1u64;
        for (id, seq, at) in conv {
            if !seen.insert(id.as_str()) {
                r.duplicates_shown += 1;
                continue;
            }
            if *seq != expected {
                r.order_violations += 1;
            }
            expected = seq + 1;
            if !log.accepted.contains_key(id) {
                r.phantoms += 1;
            }
            shown_at.entry(id.as_str()).or_insert(*at);
        }
    }
    let mut recovery = 0f64;
    // When the lost messages were accepted, in seconds from the heal (negative: before it).
    let mut lost_window: Option<(f64, f64)> = None;
    for (id, sent) in &log.accepted {
        let accepted_at = &sent.accepted_at;
        match shown_at.get(id.as_str()) {
            None => {
                r.lost += 1;
                let t = if *accepted_at >= heal {
                    accepted_at.duration_since(heal).as_secs_f64()
                } else {
                    -heal.duration_since(*accepted_at).as_secs_f64()
                };
                let (lo, hi) = lost_window.unwrap_or((t, t));
                lost_window = Some((lo.min(t), hi.max(t)));
            }
            Some(at) if *accepted_at <= heal && *at > heal => {
                recovery = recovery.max(at.duration_since(heal).as_secs_f64());
            }
            Some(_) => {}
        }
    }
    r.recovery_secs = recovery;
    let mut details = Vec::new();
    if let Some((lo, hi)) = lost_window {
        details.push(format!(
            "lost messages accepted from {lo:+.1} s to {hi:+.1} s of the heal"
        ));
    }
    let order = sender_order(log);
    r.sender_order_violations = order.violations;
    if let Some(example) = order.example {
        details.push(example);
    }
    r.detail = details.join("; ");
    r
}

/// What the sender-order check found.
#[derive(Debug, Default, PartialEq)]
struct SenderOrder {
    violations: usize,
    /// The first violation found, for the log.
    example: Option<String>,
}

/// Guarantee 3 from the sender's side: in each conversation, a message gets a higher seq than
/// every message its sender sent before it. "Before" is by send position: x is before y when
/// the send of x that was accepted was made before the first send of y. A message the workload
/// sent again (after a refusal or a timeout) once y was already sent has no order with y: the
/// client itself sent it again after y. Counts the messages y shown with a seq below that of
/// such an earlier x (each message at most once); messages never shown are counted as lost.
fn sender_order(log: &Log) -> SenderOrder {
    // The seq each message was shown with, the first time.
    let mut seq_of: HashMap<&str, u64> = HashMap::new();
    for conv in &log.shown {
        for (id, seq, _) in conv {
            seq_of.entry(id.as_str()).or_insert(*seq);
        }
    }
    // Per conversation: (first send, accepted send, seq, client message id).
    let mut by_conv: HashMap<usize, Vec<(u64, u64, u64, &str)>> = HashMap::new();
    for (id, sent) in &log.accepted {
        if let Some(seq) = seq_of.get(id.as_str()) {
            by_conv.entry(sent.conversation).or_default().push((
                sent.first_send,
                sent.accepted_send,
                *seq,
                sent.client_message_id.as_str(),
            ));
        }
    }
    let mut found = SenderOrder::default();
    let mut convs: Vec<_> = by_conv.into_iter().collect();
    convs.sort_by_key(|(c, _)| *c);
    for (conv, mut by_first) in convs {
        let mut by_accepted = by_first.clone();
        by_first.sort_by_key(|m| m.0);
        by_accepted.sort_by_key(|m| m.1);
        // Sweep: before looking at y, take in every x accepted from a send made before y's
        // first send, keeping the highest seq among them (and which message had it).
        let mut taken = 0;
        let mut highest: Option<(u64, &str)> = None;
        for (first, _, seq, cid) in &by_first {
            while taken < by_accepted.len() && by_accepted[taken].1 < *first {
                let (_, _, s, c) = by_accepted[taken];
                if highest.is_none_or(|(h, _)| s > h) {
                    highest = Some((s, c));
                }
                taken += 1;
            }
            if let Some((h, earlier)) = highest {
                if *seq < h {
                    found.violations += 1;
                    found.example.get_or_insert_with(|| {
                        format!(
                            "sender order: in conversation {conv}, {cid} (seq {seq}) was sent after {earlier} (seq {h})"
                        )
                    });
                }
            }
        }
    }
    found
}

/// Stored sequences must be 1..=n in every conversation; returns the number of gaps or repeats,
/// and (delete-on-ack) how many acked messages have a body again: as text, or sealed under a
/// key that still exists.
pub async fn check_shards(dsns: &[String]) -> anyhow::Result<(usize, usize)> {
    let (mut violations, mut resurrected) = (0, 0);
    for dsn in dsns {
        let (c, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        for row in c
            .query(
                "SELECT conversation, count(*), count(DISTINCT seq), min(seq), max(seq)
                 FROM messages GROUP BY conversation",
                &[],
            )
            .await?
        {
            let (n, distinct, min, max): (i64, i64, i64, i64) =
                (row.get(1), row.get(2), row.get(3), row.get(4));
            if n != distinct || min != 1 || max != n {
                violations += 1;
            }
        }
        let r: i64 = c
            .query_one(
                &format!(
                    "SELECT count(*) FROM message_status s
                     JOIN messages m ON m.conversation = s.conversation AND m.seq = s.seq
                     WHERE s.acked AND (s.body IS NOT NULL OR {})",
                    db_writer::keys::MESSAGE_KEY_EXISTS
                ),
                &[],
            )
            .await?
            .get(0);
        resurrected += r as usize;
    }
    Ok((violations, resurrected))
}

/// The user index against the shards (`Shards::check_index`): the number of violations, each
/// logged.
pub async fn check_index(dsns: &[String]) -> anyhow::Result<usize> {
    let shards =
        db_writer::Shards::connect(&db_writer::ShardConfig::from_list(&dsns.join(","), 1)?)?;
    let found = shards.check_index(1000).await?;
    for v in found.iter().take(10) {
        eprintln!("user index: {v}");
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Sent;

    /// A log of one conversation: (message id, first send, accepted send, seq shown; 0 = never
    /// shown), with messages shown in seq order.
    fn log(messages: &[(&str, u64, u64, u64)]) -> Log {
        let now = Instant::now();
        let mut l = Log {
            shown: vec![Vec::new()],
            ..Log::default()
        };
        for (id, first, accepted, _) in messages {
            l.accepted.insert(
                (*id).to_owned(),
                Sent {
                    conversation: 0,
                    client_message_id: format!("c-{id}"),
                    accepted_at: now,
                    first_send: *first,
                    accepted_send: *accepted,
                },
            );
        }
        let mut shown: Vec<_> = messages.iter().filter(|m| m.3 > 0).collect();
        shown.sort_by_key(|m| m.3);
        l.shown[0] = shown
            .into_iter()
            .map(|(id, _, _, seq)| ((*id).to_owned(), *seq, now))
            .collect();
        l
    }

    #[test]
    fn seqs_in_send_order_pass() {
        let r = check(
            "t",
            &log(&[("a", 0, 0, 1), ("b", 1, 1, 2), ("c", 2, 2, 3)]),
            Instant::now(),
        );
        assert_eq!(r.sender_order_violations, 0);
        assert!(r.passed(), "{}", r.summary());
    }

    /// Pipelined sends stored out of order (the recipient sees seqs 1, 2, 3 in order, so only
    /// the sender's side can tell).
    #[test]
    fn a_message_stored_before_one_sent_earlier_is_a_violation() {
        // Sent a, b, c; stored c, a, b.
        let r = check(
            "t",
            &log(&[("a", 0, 0, 2), ("b", 1, 1, 3), ("c", 2, 2, 1)]),
            Instant::now(),
        );
        assert_eq!(r.order_violations, 0);
        assert_eq!(r.sender_order_violations, 1);
        assert!(!r.passed());
        assert!(
            r.detail.contains("c-c (seq 1) was sent after c-b (seq 3)"),
            "{}",
            r.detail
        );
        // Sent a, b, c, d; stored d first: only d is below a message sent before it.
        let r = check(
            "t",
            &log(&[
                ("a", 0, 0, 2),
                ("b", 1, 1, 3),
                ("c", 2, 2, 4),
                ("d", 3, 3, 1),
            ]),
            Instant::now(),
        );
        assert_eq!(r.sender_order_violations, 1);
        // Sent a, b, c; stored b, c, a: b and c are below a.
        let r = check(
            "t",
            &log(&[("a", 0, 0, 3), ("b", 1, 1, 1), ("c", 2, 2, 2)]),
            Instant::now(),
        );
        assert_eq!(r.sender_order_violations, 2);
    }

    /// A message the workload sent again after a later one was sent has no order with it.
    #[test]
    fn a_message_sent_again_after_a_later_one_is_not_ordered_with_it() {
        // a refused at send 0, b sent at 1, a sent again and accepted at send 2: b before a is
        // fine, but c (first sent at 3) must come after both.
        let ok = log(&[("a", 0, 2, 2), ("b", 1, 1, 1), ("c", 3, 3, 3)]);
        assert_eq!(check("t", &ok, Instant::now()).sender_order_violations, 0);
        let bad = log(&[("a", 0, 2, 3), ("b", 1, 1, 1), ("c", 3, 3, 2)]);
        assert_eq!(check("t", &bad, Instant::now()).sender_order_violations, 1);
    }

    #[test]
    fn messages_never_shown_are_lost_not_out_of_order() {
        let r = check(
            "t",
            &log(&[("a", 0, 0, 1), ("b", 1, 1, 0), ("c", 2, 2, 2)]),
            Instant::now(),
        );
        assert_eq!(r.sender_order_violations, 0);
        assert_eq!(r.lost, 1);
    }

    #[test]
    fn a_poison_run_passes_only_when_every_bad_record_was_dead_lettered() {
        let mut r = check("t", &log(&[("a", 0, 0, 1)]), Instant::now());
        r.poison = Some(PoisonCounts {
            produced: 2,
            dead_lettered: 1,
            ..PoisonCounts::default()
        });
        assert!(!r.passed());
        r.poison = Some(PoisonCounts {
            produced: 2,
            dead_lettered: 2,
            ..PoisonCounts::default()
        });
        assert!(r.passed(), "{}", r.summary());
    }
}
