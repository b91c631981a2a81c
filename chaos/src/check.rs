//! The checker: every anomaly the guarantees rule out, counted from the workload's log and the
//! shards.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

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
    /// Shown but never accepted.
    pub phantoms: usize,
    /// Gaps or repeats in the stored per-conversation sequences.
    pub seq_violations: usize,
    /// Delete-on-ack: acked messages whose body is stored again.
    pub resurrected: usize,
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
            && self.phantoms == 0
            && self.seq_violations == 0
            && self.resurrected == 0
            && self.recovery_secs <= 30.0
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
             phantoms {}, seq gaps {}, resurrected {}, recovery {:.1} s; {} {}",
            self.messages,
            self.unanswered,
            self.lost_text(),
            self.duplicates_shown,
            self.order_violations,
            self.phantoms,
            self.seq_violations,
            self.resurrected,
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
    for (id, (_, _, accepted_at)) in &log.accepted {
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
    if let Some((lo, hi)) = lost_window {
        r.detail = format!("lost messages accepted from {lo:+.1} s to {hi:+.1} s of the heal");
    }
    r
}

/// Stored sequences must be 1..=n in every conversation; returns the number of gaps or repeats,
/// and (delete-on-ack) how many acked messages have a body again.
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
                "SELECT count(*) FROM message_status WHERE acked AND body IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        resurrected += r as usize;
    }
    Ok((violations, resurrected))
}
