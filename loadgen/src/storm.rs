//! The connect storm: many users with history connect to one gateway at once.
//!
//! Two parts, sharing one [`Plan`] of the data:
//! - [`seed`] writes the users' conversations straight into the shard databases (SQL with
//!   `generate_series`, each conversation on the shard the `db_writer` locator gives it), as if
//!   the pipeline had stored them: every user has the same number of conversations, a few with
//!   messages pending for them, a few whose peer acknowledged the user's message recently (a
//!   receipt in the sync), the rest acknowledged long ago;
//! - [`storm`] opens every user's websocket at once and measures, per connection, the time from
//!   the start of its TCP connect to `syncDone`, checks that each sync carried exactly the
//!   user's pending messages and receipts, and reports the CPU each process spent per connect
//!   (from `/proc`) and the gateway's memory per connection once they are all idle.
//!
//! The plan is a circulant graph: user `a` talks with `a ± d` for `d` in `1..=conversations/2`
//! (modulo the number of users). The conversation of `a` and `b = a + d` holds message 1 (`a` to
//! `b`) and message 2 (`b` to `a`), both acknowledged. When `d <= pending_conversations`, `a`
//! also sent `pending_messages` more that `b` has not acknowledged (so every user has that many
//! conversations with something pending); when `d` is in the next `receipt_conversations`, `b`
//! acknowledged message 1 an hour ago instead of 40 days ago (a receipt for `a`: the sync sends
//! receipts of the last 30 days).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_common::ids::{ConversationKey, UserId};
use chat_proto::v1::server_frame;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::cpu::{self, CpuUse, Probe, Watch};
use crate::stats::Latency;
use crate::ws;

/// The seeded data set: who talks with whom, and what is pending or receipted for whom.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub users: usize,
    /// User ids are this prefix and the user's number.
    pub user_prefix: String,
    /// Conversations per user (even: half with the users after, half with those before).
    pub conversations: usize,
    /// Conversations per user with messages pending for the user.
    pub pending_conversations: usize,
    /// Unacknowledged messages in each of those.
    pub pending_messages: usize,
    /// Conversations per user where the peer acknowledged the user's message within the last
    /// 30 days: one receipt each in the sync.
    pub receipt_conversations: usize,
}

/// What one conversation of the plan holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Both messages acknowledged 40 days ago.
    Acked,
    /// `a` sent more that `b` has not acknowledged.
    Pending,
    /// `b` acknowledged `a`'s message an hour ago.
    Receipt,
}

impl Kind {
    fn code(self) -> i32 {
        match self {
            Kind::Acked => 0,
            Kind::Pending => 1,
            Kind::Receipt => 2,
        }
    }
}

/// What a user's sync must carry: (conversation, seq) of each pending message, and
/// (conversation, seq) of each receipt, both sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub messages: Vec<(String, u64)>,
    pub receipts: Vec<(String, u64)>,
}

impl Plan {
    /// Checks the plan can be laid out: distinct peers, and enough conversations per side.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.conversations >= 2 && self.conversations.is_multiple_of(2),
            "conversations per user must be even and at least 2"
        );
        anyhow::ensure!(
            self.users > self.conversations,
            "more users than conversations per user, so every peer is distinct"
        );
        anyhow::ensure!(
            self.pending_conversations + self.receipt_conversations <= self.conversations / 2,
            "pending and receipt conversations are taken from the users after each user: at most conversations / 2"
        );
        Ok(())
    }

    pub fn user(&self, i: usize) -> String {
        format!("{}{i}", self.user_prefix)
    }

    fn key(&self, a: usize, b: usize) -> anyhow::Result<ConversationKey> {
        let (a, b) = (UserId::parse(&self.user(a))?, UserId::parse(&self.user(b))?);
        ConversationKey::of(&a, &b).context("a conversation needs two users")
    }

    fn kind(&self, d: usize) -> Kind {
        if d <= self.pending_conversations {
            Kind::Pending
        } else if d <= self.pending_conversations + self.receipt_conversations {
            Kind::Receipt
        } else {
            Kind::Acked
        }
    }

    /// Every conversation once: (a, b = a + d, kind).
    fn each_conversation(&self) -> impl Iterator<Item = (usize, usize, Kind)> + '_ {
        (0..self.users).flat_map(move |a| {
            (1..=self.conversations / 2).map(move |d| (a, (a + d) % self.users, self.kind(d)))
        })
    }

    /// The last seq of a conversation of this kind.
    fn last_seq(&self, kind: Kind) -> u64 {
        2 + if kind == Kind::Pending {
            self.pending_messages as u64
        } else {
            0
        }
    }

    /// What user `b`'s sync must carry.
    pub fn expected(&self, b: usize) -> anyhow::Result<Expected> {
        let n = self.users;
        let mut e = Expected::default();
        for d in 1..=self.conversations / 2 {
            match self.kind(d) {
                Kind::Pending => {
                    // From the user d before: messages 3.. are pending for `b`.
                    let key = self.key((b + n - d) % n, b)?;
                    for seq in 3..=self.last_seq(Kind::Pending) {
                        e.messages.push((key.as_str().to_owned(), seq));
                    }
                }
                Kind::Receipt => {
                    // To the user d after: they acknowledged `b`'s message 1 recently.
                    let key = self.key(b, (b + d) % n)?;
                    e.receipts.push((key.as_str().to_owned(), 1));
                }
                Kind::Acked => {}
            }
        }
        e.messages.sort();
        e.receipts.sort();
        Ok(e)
    }
}

/// The conversations of one shard, as the seed statements' arrays.
#[derive(Default)]
struct ShardRows {
    conversations: Vec<String>,
    a: Vec<String>,
    b: Vec<String>,
    kinds: Vec<i32>,
}

/// Counters of conversations ($1 key, $4 kind; $5 pending messages).
const SEED_CONVERSATIONS: &str = "INSERT INTO conversations (conversation, last_seq)
     SELECT c, 2 + CASE WHEN k = 1 THEN $5::int ELSE 0 END
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) AS t(c, a, b, k)";

/// Messages: 1 from a to b, 2 from b to a, then (pending kind) $5 more from a to b. Sent 41 days
/// ago ($6), the pending ones an hour ago ($7); $8 is the body.
const SEED_MESSAGES: &str = "INSERT INTO messages (conversation, seq, message_id, client_message_id, sender,
                           recipient, body, sent_at_ms)
     SELECT t.c, s.seq, md5(t.c || '/' || s.seq)::uuid, 'seed-' || s.seq,
            CASE WHEN s.seq = 2 THEN t.b ELSE t.a END,
            CASE WHEN s.seq = 2 THEN t.a ELSE t.b END,
            $8::text,
            CASE WHEN s.seq <= 2 THEN $6::bigint ELSE $7::bigint END + s.seq
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) AS t(c, a, b, k)
     CROSS JOIN LATERAL generate_series(1, 2 + CASE WHEN t.k = 1 THEN $5::int ELSE 0 END) AS s(seq)";

/// The watermarks of both directions: b read message 1 (40 days ago, $5, or an hour ago, $6, in
/// the receipt kind), a read message 2 (40 days ago).
const SEED_ACKS: &str = "INSERT INTO acks (conversation, recipient, sender, up_to_seq, acked_at_ms)
     SELECT c, b, a, 1, CASE WHEN k = 2 THEN $6::bigint ELSE $5::bigint END
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) AS t(c, a, b, k)
     UNION ALL
     SELECT c, a, b, 2, $5::bigint
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) AS t(c, a, b, k)";

/// Conversations per seed statement.
const SEED_CHUNK: usize = 20_000;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// What [`seed`] wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedReport {
    pub plan: Plan,
    pub shards: usize,
    /// Conversations per shard.
    pub per_shard: Vec<usize>,
    pub messages: u64,
    pub seconds: f64,
}

/// Writes the plan's conversations, messages and watermarks into the shards (migrated, empty),
/// each conversation on its shard, and marks the user index not built: these rows did not go
/// through the multiplexer, so only `db-writer rebuild-index` can make the index hold them.
pub async fn seed(dsns: &[String], plan: &Plan, body_bytes: usize) -> anyhow::Result<SeedReport> {
    plan.check()?;
    anyhow::ensure!(!dsns.is_empty(), "no shard DSNs");
    let started = Instant::now();
    let locator = db_writer::Locator::new(dsns.len() as u32);
    let mut shards: Vec<ShardRows> = (0..dsns.len()).map(|_| ShardRows::default()).collect();
    for (a, b, kind) in plan.each_conversation() {
        let key = plan.key(a, b)?;
        let rows = &mut shards[locator.shard_of(&key)];
        rows.conversations.push(key.as_str().to_owned());
        rows.a.push(plan.user(a));
        rows.b.push(plan.user(b));
        rows.kinds.push(kind.code());
    }
    let per_shard: Vec<usize> = shards.iter().map(|s| s.conversations.len()).collect();
    let messages: u64 = plan
        .each_conversation()
        .map(|(_, _, k)| plan.last_seq(k))
        .sum();
    let bar = crate::progress_bar(messages, "seeding shards");
    let now = chat_common::now_ms();
    let (old, recent) = (now - 40 * DAY_MS, now - 3600 * 1000);
    let body = "x".repeat(body_bytes.max(1));
    let writes = shards.iter().zip(dsns).enumerate().map(|(i, (rows, dsn))| {
        let (bar, body) = (bar.clone(), body.clone());
        async move {
            seed_shard(dsn, rows, plan, &body, old, recent, &bar)
                .await
                .with_context(|| format!("seeding shard {i}"))
        }
    });
    futures_util::future::try_join_all(writes).await?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "seeded {} users x {} conversations ({messages} messages) into {} shards in {seconds:.1} s",
        plan.users,
        plan.conversations,
        dsns.len()
    );
    Ok(SeedReport {
        plan: plan.clone(),
        shards: dsns.len(),
        per_shard,
        messages,
        seconds,
    })
}

async fn seed_shard(
    dsn: &str,
    rows: &ShardRows,
    plan: &Plan,
    body: &str,
    old: i64,
    recent: i64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let mut client = pg_connect(dsn).await?;
    let pending = plan.pending_messages as i32;
    let total = rows.conversations.len();
    for start in (0..total).step_by(SEED_CHUNK) {
        let end = (start + SEED_CHUNK).min(total);
        let (c, a, b, k) = (
            &rows.conversations[start..end],
            &rows.a[start..end],
            &rows.b[start..end],
            &rows.kinds[start..end],
        );
        let tx = client.transaction().await?;
        tx.execute(SEED_CONVERSATIONS, &[&c, &a, &b, &k, &pending])
            .await
            .context("conversations")?;
        let written = tx
            .execute(
                SEED_MESSAGES,
                &[&c, &a, &b, &k, &pending, &(old - DAY_MS), &recent, &body],
            )
            .await
            .context("messages")?;
        tx.execute(SEED_ACKS, &[&c, &a, &b, &k, &old, &recent])
            .await
            .context("acks")?;
        tx.commit().await?;
        bar.inc(written);
    }
    // The index (migration 6) started built on the empty shard; it holds none of these rows.
    client
        .batch_execute(
            "DO $$ BEGIN
                 IF to_regclass('index_state') IS NOT NULL THEN UPDATE index_state SET built = false; END IF;
             END $$;
             ANALYZE",
        )
        .await
        .context("marking the index not built")?;
    Ok(())
}

async fn pg_connect(dsn: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {dsn}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection: {e}");
        }
    });
    Ok(client)
}

/// Work counters of the shard databases (`pg_stat_database`), summed over the shards.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PgCounters {
    /// Transactions committed: one per statement a client runs outside a transaction (and one
    /// per statement it prepares).
    pub transactions: i64,
    /// Buffers read (from shared buffers or not): pages the statements touched.
    pub buffers: i64,
}

async fn pg_counters(clients: &[tokio_postgres::Client]) -> anyhow::Result<PgCounters> {
    let mut sum = PgCounters::default();
    for c in clients {
        let row = c
            .query_one(
                "SELECT xact_commit, blks_hit + blks_read FROM pg_stat_database
                 WHERE datname = current_database()",
                &[],
            )
            .await?;
        sum.transactions += row.get::<_, i64>(0);
        sum.buffers += row.get::<_, i64>(1);
    }
    Ok(sum)
}

/// How to run a storm.
#[derive(Clone, Debug)]
pub struct StormArgs {
    pub url: String,
    pub plan: Plan,
    pub source_ips: Vec<IpAddr>,
    /// Connections in progress at once (0: all of them).
    pub concurrency: usize,
    /// The gateway process (for its memory).
    pub target_pid: u32,
    pub watches: Vec<Watch>,
    /// The shards, to count their statements (none: not counted).
    pub dsns: Vec<String>,
    /// What was measured: the code and layout (for the report).
    pub label: String,
    /// Most time one connection may take to reach `syncDone`.
    pub timeout: Duration,
    /// Wait after the last `syncDone` before reading the gateway's memory (and the shards'
    /// counters), and then again before reading its memory once more: the allocator returns
    /// what the syncs freed only after a while (jemalloc's dirty pages decay over 10 s).
    pub settle: Duration,
    pub idle: Duration,
}

/// One connection's result.
struct Outcome {
    user: usize,
    /// Microseconds from the storm's start: connect started, welcome, syncDone.
    started_us: u64,
    welcome_us: u64,
    done_us: u64,
    /// What the sync carried, when it differed from the plan.
    mismatch: Option<String>,
    /// Error frames the gateway sent before `syncDone` (e.g. `sync_failed`), by code.
    error_frames: Vec<String>,
    error: Option<String>,
}

/// What a storm measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StormReport {
    pub label: String,
    pub shards: usize,
    pub plan: Plan,
    pub concurrency: usize,
    pub attempted: usize,
    /// Connections that reached `syncDone`.
    pub synced: usize,
    /// Of those, syncs that carried exactly the user's pending messages and receipts.
    pub synced_as_planned: usize,
    /// Up to 5 syncs that did not, described.
    pub mismatches: Vec<String>,
    /// Error frames the gateway sent before `syncDone` (it could not read everything), by code:
    /// connections that got at least one.
    #[serde(default)]
    pub sync_errors: BTreeMap<String, u64>,
    /// Connections that failed, by error.
    pub failures: BTreeMap<String, u64>,
    /// From the first connect to the last `syncDone`.
    pub seconds: f64,
    pub connects_per_sec: f64,
    /// Per connection, from the start of its TCP connect to `syncDone`, and to `welcome`.
    pub to_sync_done: Latency,
    pub to_welcome: Latency,
    /// `syncDone`s in each second of the storm.
    pub done_per_second: Vec<u64>,
    /// Over the storm (first connect to last `syncDone`).
    pub cpu: CpuUse,
    /// CPU seconds per synced connection, by process and in all.
    pub cpu_per_connect: BTreeMap<String, f64>,
    pub cpu_per_connect_total: f64,
    /// CPU seconds the whole machine was busy over the storm, and the 1-minute load average at
    /// its end: what else ran on the machine (a shared one) is `machine - cpu.total_seconds`.
    #[serde(default)]
    pub machine_busy_seconds: Option<f64>,
    #[serde(default)]
    pub load_average: Option<f64>,
    /// Shard work per synced connection (`pg_stat_database` of the shards, over the storm).
    pub pg_transactions_per_connect: Option<f64>,
    pub pg_buffers_per_connect: Option<f64>,
    pub gateway_rss_before_kib: u64,
    /// `settle` after the last `syncDone`.
    pub gateway_rss_after_kib: u64,
    /// `idle` later still.
    #[serde(default)]
    pub gateway_rss_idle_kib: u64,
    /// Gateway RSS growth per connection, `settle` after the last `syncDone`.
    pub rss_per_connection_bytes: f64,
    /// The same, `idle` later (every connection idle; what the syncs freed returned).
    #[serde(default)]
    pub rss_per_connection_idle_bytes: f64,
    pub still_open: usize,
}

/// Connects every user of the plan at once and measures the way to `syncDone`.
pub async fn storm(a: StormArgs) -> anyhow::Result<StormReport> {
    a.plan.check()?;
    let n = a.plan.users;
    // Tokens and expectations first: a client has its token before it reconnects.
    let issuer = ws::issuer();
    let mut prepared = Vec::with_capacity(n);
    for i in 0..n {
        prepared.push((ws::token(&issuer, &a.plan.user(i))?, a.plan.expected(i)?));
    }
    let stats_clients = {
        let mut v = Vec::new();
        for dsn in &a.dsns {
            v.push(pg_connect(dsn).await?);
        }
        v
    };
    let rss_before = cpu::rss_kib(a.target_pid).context("gateway pid: no /proc entry")?;
    let pg_before = pg_counters(&stats_clients).await.ok();
    let limit = if a.concurrency == 0 { n } else { a.concurrency };
    let slots = Arc::new(Semaphore::new(limit));
    let hold = CancellationToken::new();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let bar = crate::progress_bar(n as u64, "storm: connected to syncDone");
    let probe = Probe::start(&a.watches);
    let t0 = Instant::now();
    for (user, (token, expected)) in prepared.into_iter().enumerate() {
        let source = (!a.source_ips.is_empty()).then(|| a.source_ips[user % a.source_ips.len()]);
        let (url, slots, hold, open, tx) = (
            a.url.clone(),
            slots.clone(),
            hold.clone(),
            open.clone(),
            tx.clone(),
        );
        let timeout = a.timeout;
        tokio::spawn(async move {
            let permit = slots.acquire_owned().await;
            let started_us = t0.elapsed().as_micros() as u64;
            let r = tokio::time::timeout(
                timeout,
                connect_and_sync(&url, &token, source, &expected, t0),
            )
            .await
            .unwrap_or_else(|_| Err(format!("no syncDone within {} s", timeout.as_secs())));
            drop(permit);
            match r {
                Ok(Synced {
                    socket,
                    welcome_us,
                    done_us,
                    mismatch,
                    error_frames,
                }) => {
                    open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = tx.send(Outcome {
                        user,
                        started_us,
                        welcome_us,
                        done_us,
                        mismatch,
                        error_frames,
                        error: None,
                    });
                    idle(socket, hold).await;
                    open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    let _ = tx.send(Outcome {
                        user,
                        started_us,
                        welcome_us: 0,
                        done_us: 0,
                        mismatch: None,
                        error_frames: Vec::new(),
                        error: Some(e),
                    });
                }
            }
        });
    }
    drop(tx);
    let mut outcomes = Vec::with_capacity(n);
    while let Some(o) = rx.recv().await {
        bar.inc(1);
        outcomes.push(o);
        if outcomes.len() == n {
            break;
        }
    }
    let cpu = probe.stop();
    let machine_busy_seconds = cpu.machine.map(|m| m.busy());
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    bar.finish_and_clear();

    tokio::time::sleep(a.settle).await;
    let rss_after = cpu::rss_kib(a.target_pid).unwrap_or(0);
    let pg_after = pg_counters(&stats_clients).await.ok();
    tokio::time::sleep(a.idle).await;
    let rss_idle = cpu::rss_kib(a.target_pid).unwrap_or(0);
    let still_open = open.load(std::sync::atomic::Ordering::Relaxed);

    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let (mut to_done, mut to_welcome) = (Vec::new(), Vec::new());
    let mut mismatches = Vec::new();
    let mut sync_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut as_planned = 0;
    let mut first_start = u64::MAX;
    let mut last_done = 0u64;
    let mut per_second: Vec<u64> = Vec::new();
    for o in &outcomes {
        if let Some(e) = &o.error {
            *failures.entry(e.chars().take(80).collect()).or_default() += 1;
            continue;
        }
        first_start = first_start.min(o.started_us);
        last_done = last_done.max(o.done_us);
        to_done.push(o.done_us.saturating_sub(o.started_us));
        to_welcome.push(o.welcome_us.saturating_sub(o.started_us));
        let s = (o.done_us / 1_000_000) as usize;
        if per_second.len() <= s {
            per_second.resize(s + 1, 0);
        }
        per_second[s] += 1;
        let mut codes = o.error_frames.clone();
        codes.sort();
        codes.dedup();
        for c in codes {
            *sync_errors.entry(c).or_default() += 1;
        }
        match &o.mismatch {
            None => as_planned += 1,
            Some(m) if mismatches.len() < 5 => {
                mismatches.push(format!("{}: {m}", a.plan.user(o.user)))
            }
            Some(_) => {}
        }
    }
    let synced = to_done.len();
    let seconds = if synced > 0 {
        (last_done - first_start) as f64 / 1e6
    } else {
        0.0
    };
    let per = |v: f64| v / synced.max(1) as f64;
    let cpu_per_connect = cpu
        .seconds
        .iter()
        .map(|(k, v)| (k.clone(), per(*v)))
        .collect();
    let pg_delta = match (pg_before, pg_after) {
        (Some(b), Some(e)) => Some((
            per((e.transactions - b.transactions) as f64),
            per((e.buffers - b.buffers) as f64),
        )),
        _ => None,
    };
    let report = StormReport {
        label: a.label.clone(),
        shards: a.dsns.len(),
        plan: a.plan.clone(),
        concurrency: limit,
        attempted: n,
        synced,
        synced_as_planned: as_planned,
        mismatches,
        sync_errors,
        failures,
        seconds,
        connects_per_sec: if seconds > 0.0 {
            synced as f64 / seconds
        } else {
            0.0
        },
        to_sync_done: Latency::of_us(&mut to_done),
        to_welcome: Latency::of_us(&mut to_welcome),
        done_per_second: per_second,
        cpu_per_connect_total: per(cpu.total_seconds),
        machine_busy_seconds,
        load_average,
        cpu_per_connect,
        cpu,
        pg_transactions_per_connect: pg_delta.map(|d| d.0),
        pg_buffers_per_connect: pg_delta.map(|d| d.1),
        gateway_rss_before_kib: rss_before,
        gateway_rss_after_kib: rss_after,
        gateway_rss_idle_kib: rss_idle,
        rss_per_connection_bytes: rss_after.saturating_sub(rss_before) as f64 * 1024.0
            / synced.max(1) as f64,
        rss_per_connection_idle_bytes: rss_idle.saturating_sub(rss_before) as f64 * 1024.0
            / synced.max(1) as f64,
        still_open,
    };
    eprintln!("{}", report.one_line());
    hold.cancel();
    Ok(report)
}

impl StormReport {
    pub fn one_line(&self) -> String {
        let parts: Vec<String> = self
            .cpu_per_connect
            .iter()
            .map(|(k, v)| format!("{k} {:.0} us", v * 1e6))
            .collect();
        format!(
            "storm {} ({} shards): {} of {} synced ({} as planned; error frames {:?}) in {:.1} s: {:.0} connects/s; to syncDone p50 {:.0} ms p99 {:.0} ms; CPU per connect {:.0} us ({}); {:.2} KiB per idle connection; failures {:?}",
            self.label,
            self.shards,
            self.synced,
            self.attempted,
            self.synced_as_planned,
            self.sync_errors,
            self.seconds,
            self.connects_per_sec,
            self.to_sync_done.p50_ms,
            self.to_sync_done.p99_ms,
            self.cpu_per_connect_total * 1e6,
            parts.join(", "),
            self.rss_per_connection_idle_bytes / 1024.0,
            self.failures
        )
    }
}

/// A connection that reached `syncDone`.
struct Synced {
    socket: ws::Ws,
    /// Microseconds since the storm's start.
    welcome_us: u64,
    done_us: u64,
    /// How the sync differed from the plan, if it did.
    mismatch: Option<String>,
    /// Codes of the error frames before `syncDone`.
    error_frames: Vec<String>,
}

/// Opens one user's websocket (automatic sync, as a client that reconnects without state) and
/// reads up to `syncDone`, comparing what the sync carried with `expected`.
async fn connect_and_sync(
    url: &str,
    token: &str,
    source: Option<IpAddr>,
    expected: &Expected,
    t0: Instant,
) -> Result<Synced, String> {
    let now = || t0.elapsed().as_micros() as u64;
    let mut socket = ws::connect(
        url,
        &format!("/ws?format=binary&access_token={token}"),
        source,
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let mut welcome_us = 0;
    let mut got = Expected::default();
    let mut error_frames = Vec::new();
    loop {
        let m = match socket.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed before syncDone".into()),
        };
        if let tokio_tungstenite::tungstenite::Message::Close(frame) = &m {
            return Err(match frame {
                Some(f) => format!("closed before syncDone: {} {}", u16::from(f.code), f.reason),
                None => "closed before syncDone".into(),
            });
        }
        match ws::decode(&m).and_then(|f| f.kind) {
            Some(server_frame::Kind::Welcome(_)) => welcome_us = now(),
            Some(server_frame::Kind::Deliver(d)) => {
                if let Some(m) = d.message {
                    got.messages.push((m.conversation, m.seq));
                }
            }
            Some(server_frame::Kind::Receipt(r)) => {
                got.receipts.push((r.conversation, r.up_to_seq))
            }
            Some(server_frame::Kind::Error(e)) => error_frames.push(e.code),
            Some(server_frame::Kind::SyncDone(s)) => {
                let done_us = now();
                got.messages.sort();
                got.receipts.sort();
                let mismatch = (got != *expected || s.delivered != expected.messages.len() as u64)
                    .then(|| {
                        format!(
                            "messages: {} (syncDone says {}); receipts: {}",
                            difference(&got.messages, &expected.messages),
                            s.delivered,
                            difference(&got.receipts, &expected.receipts)
                        )
                    });
                return Ok(Synced {
                    socket,
                    welcome_us,
                    done_us,
                    mismatch,
                    error_frames,
                });
            }
            _ => {}
        }
    }
}

/// How `got` differs from `planned` (both sorted): counts, and the first item missing or extra.
fn difference(got: &[(String, u64)], planned: &[(String, u64)]) -> String {
    let missing: Vec<_> = planned.iter().filter(|p| !got.contains(p)).collect();
    let mut extra: Vec<&(String, u64)> = Vec::new();
    for (i, g) in got.iter().enumerate() {
        // Anything not planned, or a repeat.
        if !planned.contains(g) || got[..i].contains(g) {
            extra.push(g);
        }
    }
    format!(
        "{} of {} planned, {} missing{}, {} extra{}",
        got.len(),
        planned.len(),
        missing.len(),
        missing
            .first()
            .map(|m| format!(" (e.g. {} seq {})", m.0, m.1))
            .unwrap_or_default(),
        extra.len(),
        extra
            .first()
            .map(|m| format!(" (e.g. {} seq {})", m.0, m.1))
            .unwrap_or_default(),
    )
}

/// Keeps an idle socket open (reading answers the gateway's pings) until `hold` is cancelled.
async fn idle(mut socket: ws::Ws, hold: CancellationToken) {
    loop {
        tokio::select! {
            _ = hold.cancelled() => return,
            m = socket.next() => match m {
                Some(Ok(m)) if !m.is_close() => {}
                _ => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(users: usize) -> Plan {
        Plan {
            users,
            user_prefix: "s".into(),
            conversations: 50,
            pending_conversations: 3,
            pending_messages: 2,
            receipt_conversations: 2,
        }
    }

    #[test]
    fn every_user_has_the_planned_conversations() {
        let p = plan(120);
        p.check().expect("valid plan");
        let mut per_user = vec![std::collections::BTreeSet::new(); p.users];
        let mut pending_for = vec![0u64; p.users];
        let mut receipts_for = vec![0usize; p.users];
        for (a, b, kind) in p.each_conversation() {
            assert!(per_user[a].insert(b), "{a} and {b} twice");
            assert!(per_user[b].insert(a), "{b} and {a} twice");
            match kind {
                Kind::Pending => pending_for[b] += p.last_seq(kind) - 2,
                Kind::Receipt => receipts_for[a] += 1,
                Kind::Acked => {}
            }
        }
        for u in 0..p.users {
            assert_eq!(per_user[u].len(), 50);
            assert_eq!(pending_for[u], 6);
            assert_eq!(receipts_for[u], 2);
        }
    }

    #[test]
    fn expected_sync_matches_the_conversations() {
        let p = plan(120);
        let e = p.expected(0).expect("expected");
        // User 0 receives from users 119, 118, 117 (messages 3 and 4) and has receipts from
        // users 4 and 5.
        let mut messages = Vec::new();
        for peer in [117, 118, 119] {
            for seq in [3, 4] {
                messages.push((format!("s0:s{peer}"), seq));
            }
        }
        messages.sort();
        assert_eq!(e.messages, messages);
        assert_eq!(e.receipts, vec![("s0:s4".into(), 1), ("s0:s5".into(), 1)]);
    }

    #[test]
    fn differences_name_what_is_missing_and_extra() {
        let planned = vec![("a:b".to_owned(), 3), ("a:b".to_owned(), 4)];
        let got = vec![("a:b".to_owned(), 3), ("a:b".to_owned(), 3)];
        assert_eq!(
            difference(&got, &planned),
            "2 of 2 planned, 1 missing (e.g. a:b seq 4), 1 extra (e.g. a:b seq 3)"
        );
        assert_eq!(
            difference(&planned, &planned),
            "2 of 2 planned, 0 missing, 0 extra"
        );
    }

    #[test]
    fn plans_that_cannot_be_laid_out_are_refused() {
        assert!(plan(50).check().is_err(), "peers would repeat");
        let mut p = plan(120);
        p.conversations = 7;
        assert!(p.check().is_err(), "odd");
        p.conversations = 4;
        assert!(p.check().is_err(), "3 pending + 2 receipts > 2 per side");
    }
}
