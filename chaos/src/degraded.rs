//! The degraded-readiness scenario's own checks. While shard 1's server is stopped:
//! - both gateways stay ready: their `/readyz` is polled throughout and must answer 200;
//! - REST history answers 200 for a conversation on shard 0 and 503 `shard_unavailable` for one
//!   on shard 1;
//! - the conversations that live wholly on shard 0 (the conversation and both users' indexes)
//!   see no error, and every message accepted in them during the outage is shown within
//!   [`HEALTHY_DELIVERY_BOUND`].

use std::time::{Duration, Instant};

use chat_common::auth::TokenIssuer;
use chat_common::ids::{ConversationKey, UserId};
use db_writer::Locator;
use tokio::sync::watch;

use crate::workload::Log;

/// Longest a message of a conversation wholly on a healthy shard may take from accepted to
/// shown while another shard is down.
pub const HEALTHY_DELIVERY_BOUND: Duration = Duration::from_secs(5);

/// How often each gateway's `/readyz` is asked during the outage.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// What the scenario found.
#[derive(Clone, Debug, Default)]
pub struct DegradedCounts {
    /// `/readyz` answers during the outage, over both gateways.
    pub polls: usize,
    /// Those other than 200 (or no answer), and the first of them.
    pub not_ready: usize,
    pub not_ready_example: Option<String>,
    /// Conversations wholly on the healthy shard.
    pub healthy_conversations: usize,
    /// Messages accepted in them during the outage, those shown later than the bound (or never),
    /// and the longest wait.
    pub healthy_sent: usize,
    pub healthy_late: usize,
    pub healthy_max_wait_secs: f64,
    /// Errors their clients were shown during the outage, and the first.
    pub healthy_errors: usize,
    pub healthy_error_example: Option<String>,
    /// What REST history answered, and whether that is what it should.
    pub history: String,
    pub history_ok: bool,
}

impl DegradedCounts {
    pub fn passed(&self) -> bool {
        self.polls > 0
            && self.not_ready == 0
            && self.healthy_sent > 0
            && self.healthy_late == 0
            && self.healthy_errors == 0
            && self.history_ok
    }

    /// For the table's note.
    pub fn note(&self) -> String {
        let mut note = format!(
            "/readyz: {} of {} polls not ready; {} conversations wholly on shard 0: {} messages \
             sent during the outage, {} shown later than {} s or not by the heal (longest shown \
             {:.1} s), {} errors; {}",
            self.not_ready,
            self.polls,
            self.healthy_conversations,
            self.healthy_sent,
            self.healthy_late,
            HEALTHY_DELIVERY_BOUND.as_secs(),
            self.healthy_max_wait_secs,
            self.healthy_errors,
            self.history,
        );
        if let Some(e) = &self.not_ready_example {
            note.push_str(&format!("; first not ready: {e}"));
        }
        if let Some(e) = &self.healthy_error_example {
            note.push_str(&format!("; first error: {e}"));
        }
        note
    }
}

/// The users of workload conversation `i` of run `run` (sender, recipient).
fn users(run: &str, i: usize) -> anyhow::Result<(UserId, UserId)> {
    Ok((
        UserId::parse(&format!("{run}{i}a"))?,
        UserId::parse(&format!("{run}{i}b"))?,
    ))
}

/// The workload conversations of run `run` placed on `shard` of `shards`; with `wholly`, only
/// those whose users both live there too (their indexes are written there).
pub fn placed_on(
    run: &str,
    conversations: usize,
    shards: u32,
    shard: usize,
    wholly: bool,
) -> anyhow::Result<Vec<usize>> {
    let locator = Locator::new(shards);
    let mut found = Vec::new();
    for i in 0..conversations {
        let (a, b) = users(run, i)?;
        let key = ConversationKey::of(&a, &b).expect("two distinct users");
        let homes = [locator.home_of(&a), locator.home_of(&b)];
        if locator.shard_of(&key) == shard && (!wholly || homes.iter().all(|h| *h == shard)) {
            found.push(i);
        }
    }
    Ok(found)
}

/// Asks `/readyz` of each of `addrs` (host:port) every [`POLL_EVERY`] until `stop`; returns
/// (answers, answers other than 200, the first of those).
pub async fn poll_readiness(
    addrs: Vec<String>,
    mut stop: watch::Receiver<bool>,
) -> (usize, usize, Option<String>) {
    let (mut polls, mut not_ready, mut example) = (0, 0, None);
    let clients: Vec<(String, chat_client::Rest)> = addrs
        .into_iter()
        .map(|a| {
            let rest = chat_client::Rest::new(&format!("http://{a}"));
            (a, rest)
        })
        .collect();
    loop {
        for (addr, rest) in &clients {
            polls += 1;
            let answer = rest.request("GET", "/readyz", None, None).await;
            let bad = match answer {
                Ok(r) if r.status == 200 => None,
                Ok(r) => Some(format!("{addr}: {} {}", r.status, r.body)),
                Err(e) => Some(format!("{addr}: {e}")),
            };
            if let Some(bad) = bad {
                not_ready += 1;
                example.get_or_insert(bad);
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return (polls, not_ready, example),
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}

/// REST history of workload conversation `healthy` (on the healthy shard) and `down` (on the
/// stopped one), asked of the gateway on `port` by each conversation's sender: what they
/// answered, and whether that is 200 and 503 `shard_unavailable`.
pub async fn probe_history(
    port: u16,
    run: &str,
    healthy: usize,
    down: usize,
) -> anyhow::Result<(String, bool)> {
    let issuer = TokenIssuer::hs256(
        crate::stack::SECRET.as_bytes(),
        chat_common::auth::DEFAULT_ISSUER,
        chat_common::auth::DEFAULT_AUDIENCE,
    );
    let rest = chat_client::Rest::new(&format!("http://127.0.0.1:{port}"));
    let mut answers = Vec::new();
    for i in [healthy, down] {
        let (a, b) = users(run, i)?;
        let token = issuer.issue(&a, 3600)?;
        let r = rest
            .request("GET", &format!("/messages/{b}"), Some(&token), None)
            .await?;
        let code = r.body["code"].as_str().unwrap_or_default().to_owned();
        answers.push((r.status, code));
    }
    let ok = answers[0].0 == 200 && answers[1] == (503, "shard_unavailable".to_owned());
    let text = format!(
        "history: shard 0 conversation {}, shard 1 conversation {} {}",
        answers[0].0, answers[1].0, answers[1].1
    );
    Ok((text, ok))
}

/// How the conversations `healthy` fared between `from` and `to` (the outage) in `log`.
pub fn healthy_delivery(
    log: &Log,
    healthy: &[usize],
    from: Instant,
    to: Instant,
    counts: &mut DegradedCounts,
) {
    counts.healthy_conversations = healthy.len();
    for sent in log.accepted.iter().filter_map(|(id, s)| {
        (healthy.contains(&s.conversation) && s.accepted_at >= from && s.accepted_at <= to)
            .then_some((id, s))
    }) {
        let (id, s) = sent;
        counts.healthy_sent += 1;
        let shown = log.shown[s.conversation]
            .iter()
            .find(|(shown_id, _, _)| shown_id == id)
            .map(|(_, _, at)| *at);
        let wait = shown.map(|at| at.saturating_duration_since(s.accepted_at));
        match wait {
            Some(w) if w <= HEALTHY_DELIVERY_BOUND => {}
            _ => counts.healthy_late += 1,
        }
        if let Some(w) = wait {
            counts.healthy_max_wait_secs = counts.healthy_max_wait_secs.max(w.as_secs_f64());
        }
    }
    for (conversation, at, what) in &log.errors {
        if healthy.contains(conversation) && *at >= from && *at <= to {
            counts.healthy_errors += 1;
            counts
                .healthy_error_example
                .get_or_insert_with(|| format!("conversation {conversation}: {what}"));
        }
    }
}
