//! The Markdown results table from a bench output directory.
//!
//! Reads `meta.json` (written by bench/bench.sh), `kafka.json`, `pg.json`, `echo.json`,
//! `search.json`, `hold-gateway.json`, `hold-tcp.json`, `hold-fleet-<n>.json`, `storm-<shards>.json`
//! (and `storm-before-<shards>.json`, other code on the same data); a missing file shows as "not
//! run".

use std::fmt::Write as _;
use std::path::Path;

use crate::e2e::{SearchReport, TrialReport};
use crate::raw::{EchoReport, HoldReport, KafkaReport, PgReport};
use crate::storm::StormReport;

fn load<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Option<T> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("{name}: {e}");
            None
        }
    }
}

fn n(v: f64) -> String {
    // Thousands separators for rates.
    let s = format!("{:.0}", v);
    let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn us(cpu_s: f64) -> String {
    format!("{:.1} µs", cpu_s * 1e6)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

/// Kafka records, Postgres rows, acks and websocket round trips one e2e message costs.
pub const KAFKA_RECORDS_PER_MESSAGE: f64 = 5.0; // inbound message + ack; outbound stored, deliver, receipt
pub const WS_ROUND_TRIPS_PER_MESSAGE: f64 = 3.0; // 6 frames: send, accepted, stored, deliver, ack, receipt

pub fn markdown(dir: &Path) -> anyhow::Result<String> {
    let meta: Option<serde_json::Value> = load(dir, "meta.json");
    let kafka: Option<KafkaReport> = load(dir, "kafka.json");
    let pg: Option<PgReport> = load(dir, "pg.json");
    let echo: Option<EchoReport> = load(dir, "echo.json");
    let search: Option<SearchReport> = load(dir, "search.json");
    let hold_gw: Option<HoldReport> = load(dir, "hold-gateway.json");
    let hold_tcp: Option<HoldReport> = load(dir, "hold-tcp.json");
    let hold_ws: Option<HoldReport> = load(dir, "hold-ws.json");
    let idle: Option<crate::cpu::CpuUse> = load(dir, "idle.json");
    let cores = meta
        .as_ref()
        .and_then(|m| m["nproc"].as_f64())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as f64)
                .unwrap_or(2.0)
        });
    let mut o = String::new();
    if let Some(m) = &meta {
        writeln!(o, "Date: {}  ", m["date"].as_str().unwrap_or("?"))?;
        writeln!(
            o,
            "Machine: {} cores (nproc), {} memory, {}  ",
            m["nproc"],
            m["memory"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("")
        )?;
        writeln!(o, "Commit: {}  ", m["commit"].as_str().unwrap_or("?"))?;
        writeln!(
            o,
            "Command: `{}`",
            m["command"].as_str().unwrap_or("make bench")
        )?;
        if let Some(note) = m["note"].as_str() {
            writeln!(o, "\n{note}")?;
        }
        writeln!(o)?;
    }

    if let Some(i) = &idle {
        let parts: Vec<String> = i
            .seconds
            .iter()
            .map(|(k, v)| format!("{k} {:.2} cores", v / i.wall_seconds.max(1e-9)))
            .collect();
        writeln!(
            o,
            "Idle CPU of the shared processes before the bench (included in every CPU figure below): {}.\n",
            parts.join(", ")
        )?;
    }
    writeln!(o, "### 1. Baselines (same machine, same run)\n")?;
    writeln!(o, "| stage | records/s (flat out) | CPU per record, flat out | CPU per record, open loop at the latency rate | latency p50 / p99 / p99.9 (ms) | how |")?;
    writeln!(o, "|---|---:|---:|---:|---|---|")?;
    match &kafka {
        Some(k) => writeln!(
            o,
            "| Kafka produce → consume | {} | {} | {} | {} / {} / {} at {}/s | {}-byte records, {} partitions, pipeline's producer/consumer settings (acks=all, idempotent, linger 5 ms, lz4); CPU = loadgen + broker; produce→ack p99 {} ms; presence catch-up (per multiplexer batch) p50 {} ms (same watermark queries from an idle client: {} ms) |",
            n(k.throughput.records_per_sec),
            us(k.throughput.cpu_seconds_per_record),
            us(k.latency.cpu_seconds_per_record),
            ms(k.latency.latency.p50_ms),
            ms(k.latency.latency.p99_ms),
            ms(k.latency.latency.p999_ms),
            n(k.latency.rate),
            k.record_bytes,
            k.partitions,
            ms(k.produce_ack_latency.p99_ms),
            k.presence_catch_up.as_ref().map(|l| ms(l.p50_ms)).unwrap_or_else(|| "-".into()),
            k.watermarks_idle_client.as_ref().map(|l| ms(l.p50_ms)).unwrap_or_else(|| "-".into()),
        )?,
        None => writeln!(o, "| Kafka | not run | | | | |")?,
    }
    match &pg {
        Some(p) => {
            writeln!(
                o,
                "| Postgres batched insert (`store_batch`) | {} | {} | | per batch {} / {} / {} | {} rows per batch over {} shards, {} conversations; CPU = loadgen + all postgres processes |",
                n(p.insert.records_per_sec),
                us(p.insert.cpu_seconds_per_record),
                ms(p.insert_batch_latency.p50_ms),
                ms(p.insert_batch_latency.p99_ms),
                ms(p.insert_batch_latency.p999_ms),
                p.batch,
                p.shards,
                p.conversations
            )?;
            writeln!(
                o,
                "| Postgres ack UPDATE, one per ack (`Shards::ack_on_shard` with one row) | {} | {} | | {} / {} / {} | sequential, one statement per ack |",
                n(p.ack_each.records_per_sec),
                us(p.ack_each.cpu_seconds_per_record),
                ms(p.ack_each_latency.p50_ms),
                ms(p.ack_each_latency.p99_ms),
                ms(p.ack_each_latency.p999_ms),
            )?;
            writeln!(
                o,
                "| Postgres ack UPDATE batched (`unnest`, one per shard per batch) | {} | {} | | | as the multiplexer applies acks |",
                n(p.ack_batched.records_per_sec),
                us(p.ack_batched.cpu_seconds_per_record),
            )?;
        }
        None => writeln!(o, "| Postgres | not run | | | | |")?,
    }
    match &echo {
        Some(e) => writeln!(
            o,
            "| Websocket echo round trip (tokio-tungstenite) | {} | {} | {} | {} / {} / {} at {}/s | {}-byte binary frames, {} connections, window {}; CPU = client + server |",
            n(e.throughput.records_per_sec),
            us(e.throughput.cpu_seconds_per_record),
            us(e.latency.cpu_seconds_per_record),
            ms(e.latency.latency.p50_ms),
            ms(e.latency.latency.p99_ms),
            ms(e.latency.latency.p999_ms),
            n(e.latency.rate),
            e.frame_bytes,
            e.conns,
            e.window
        )?,
        None => writeln!(o, "| Websocket echo | not run | | | | |")?,
    }

    writeln!(
        o,
        "\n### 2. End to end (send → accepted → stored → pushed → acked → delivered receipt)\n"
    )?;
    let trial = |i: usize| search.as_ref().and_then(|s| s.trials.get(i));
    let max_trial: Option<&TrialReport> = search
        .as_ref()
        .and_then(|s| s.max_sustained_trial)
        .and_then(trial);
    writeln!(o, "| figure | value | target | met |")?;
    writeln!(o, "|---|---|---|---|")?;
    match (&search, max_trial) {
        (Some(s), Some(t)) => writeln!(
            o,
            "| highest rate sustained for {} s, nothing lost, bounded lag | **{} msg/s** ({} users, {} gateway(s), ack {:?}) | ≥ 12,000 msg/s | {} |",
            t.spec.seconds,
            n(t.spec.rate),
            s.users,
            s.gateways,
            s.ack_mode,
            yes(t.spec.rate >= 12000.0)
        )?,
        (Some(_), None) => writeln!(o, "| highest sustained rate | none of the tried rates passed | ≥ 12,000 msg/s | **no** |")?,
        _ => writeln!(o, "| end to end | not run | | |")?,
    }
    if let Some(s) = &search {
        for (label, &i) in &s.latency_points {
            if let Some(t) = trial(i) {
                let target = label.starts_with("10000") || label.contains("target");
                writeln!(
                    o,
                    "| latency at {} msg/s: p50 / p99 / p99.9 | {} / **{}** / {} ms ({} s, {} msgs, {} lost) | {} | {} |",
                    label,
                    ms(t.receipt_latency.p50_ms),
                    ms(t.receipt_latency.p99_ms),
                    ms(t.receipt_latency.p999_ms),
                    t.spec.seconds,
                    t.sent,
                    t.lost,
                    if target { "p99 < 50 ms at 10K" } else { "" },
                    if target { yes(t.spec.rate >= 10000.0 && t.receipt_latency.p99_ms < 50.0) } else { "" }
                )?;
                writeln!(
                    o,
                    "| … accepted p99 / delivered p99 at {} | {} / {} ms | | |",
                    label,
                    ms(t.accept_latency.p99_ms),
                    ms(t.deliver_latency.p99_ms)
                )?;
            }
        }
    }
    if let Some(t) = max_trial {
        let parts: Vec<String> = t
            .cpu
            .seconds
            .iter()
            .map(|(k, v)| format!("{k} {}", us(v / t.sent.max(1) as f64)))
            .collect();
        writeln!(
            o,
            "| CPU per message at the max rate (all processes) | {} ({}); {:.0}% of {} cores | | |",
            us(t.cpu_seconds_per_message),
            parts.join(", "),
            t.cpu.total_seconds / t.cpu.wall_seconds.max(1e-9) / cores * 100.0,
            cores
        )?;
    }

    writeln!(o, "\n### 3. Ratios\n")?;
    writeln!(o, "| ratio | value | target | met |")?;
    writeln!(o, "|---|---|---|---|")?;
    if let (Some(k), Some(p), Some(e)) = (&kafka, &pg, &echo) {
        // CPU per message the raw stages add up to, with a websocket round trip costing `ws`.
        let per_msg_with = |ws: f64| {
            KAFKA_RECORDS_PER_MESSAGE * k.throughput.cpu_seconds_per_record
                + p.insert.cpu_seconds_per_record
                + p.ack_batched.cpu_seconds_per_record
                + WS_ROUND_TRIPS_PER_MESSAGE * ws
        };
        let per_msg = per_msg_with(e.throughput.cpu_seconds_per_record);
        let allowed = cores / per_msg;
        match max_trial {
            Some(t) => writeln!(
                o,
                "| e2e rate / rate the raw stages' CPU allows on {cores} cores | {:.2} ({} / {}) | ≥ 0.6 | {} |",
                t.spec.rate / allowed,
                n(t.spec.rate),
                n(allowed),
                yes(t.spec.rate / allowed >= 0.6)
            )?,
            None => writeln!(o, "| e2e rate / CPU-allowed rate | no sustained rate | ≥ 0.6 | **no** |")?,
        }
        writeln!(
            o,
            "| (CPU-allowed rate = {cores} cores / ({} Kafka records × {} + 1 insert row × {} + 1 batched ack × {} + {} websocket round trips × {}) = {} per message) | | | |",
            KAFKA_RECORDS_PER_MESSAGE,
            us(k.throughput.cpu_seconds_per_record),
            us(p.insert.cpu_seconds_per_record),
            us(p.ack_batched.cpu_seconds_per_record),
            WS_ROUND_TRIPS_PER_MESSAGE,
            us(e.throughput.cpu_seconds_per_record),
            us(per_msg)
        )?;
        // The flat-out echo keeps a window of frames in flight per connection (16 in `make
        // bench`), so one write carries many frames; the gateway writes each frame to its own
        // user's socket, one write each. The echo's open-loop phase (one frame at a time on each
        // connection, at a steady rate) costs what the pipeline's websocket frames can cost at
        // best: the same ratio against it.
        let per_msg_ws_open = per_msg_with(e.latency.cpu_seconds_per_record);
        let allowed_ws_open = cores / per_msg_ws_open;
        if let Some(t) = max_trial {
            writeln!(
                o,
                "| … the same, with the websocket round trip at its open-loop cost ({} at {}/s: one frame per write, as the gateway writes them) | {:.2} ({} / {}; {} per message) | | |",
                us(e.latency.cpu_seconds_per_record),
                n(e.latency.rate),
                t.spec.rate / allowed_ws_open,
                n(t.spec.rate),
                n(allowed_ws_open),
                us(per_msg_ws_open)
            )?;
        }
        if let Some(s) = &search {
            for (label, &i) in &s.latency_points {
                if let Some(t) = trial(i) {
                    let base = k.latency.latency.p99_ms + e.latency.latency.p99_ms;
                    writeln!(
                        o,
                        "| e2e p99 / (raw Kafka p99 + raw websocket p99), at {} | {:.1} ({} / ({} + {}) ms) | | |",
                        label,
                        t.receipt_latency.p99_ms / base,
                        ms(t.receipt_latency.p99_ms),
                        ms(k.latency.latency.p99_ms),
                        ms(e.latency.latency.p99_ms)
                    )?;
                }
            }
        }
    } else {
        writeln!(o, "| ratios | need all three baselines | | |")?;
    }

    writeln!(o, "\n### 4. Connections (idle, one server process)\n")?;
    writeln!(o, "| server | held (of attempted) | fds open / limit | held / fd limit | RSS before → after | RSS per connection | target | met |")?;
    writeln!(o, "|---|---|---|---|---|---|---|---|")?;
    for (name, h, target) in [
        ("gateway (authenticated websockets)", &hold_gw, true),
        (
            "plain tokio-tungstenite websocket server (the echo server)",
            &hold_ws,
            false,
        ),
        ("plain tokio TCP server", &hold_tcp, false),
    ] {
        match h {
            Some(h) => writeln!(
                o,
                "| {name} | {} of {} (from {} source addresses) | {} / {} | {:.1}% | {:.1} → {:.1} MiB | {:.2} KiB | {} | {} |",
                n(h.still_open_at_end as f64),
                n(h.attempted as f64),
                h.source_addresses,
                n(h.target_fds_open as f64),
                n(h.target_fd_limit as f64),
                h.fraction_of_fd_limit * 100.0,
                h.target_rss_before_kib as f64 / 1024.0,
                h.target_rss_after_kib as f64 / 1024.0,
                h.rss_per_connection_bytes / 1024.0,
                if target { "≥ 19,500 at ≤ 3 KiB each" } else { "" },
                if target {
                    yes(h.still_open_at_end >= 19_500 && h.rss_per_connection_bytes <= 3072.0)
                } else {
                    ""
                }
            )?,
            None => writeln!(o, "| {name} | not run | | | | | | |")?,
        }
    }

    let fleet: Vec<HoldReport> = (1..=64)
        .map_while(|g| load(dir, &format!("hold-fleet-{g}.json")))
        .collect();
    writeln!(
        o,
        "\n### 5. Connections across gateway processes (all open at the same time)\n"
    )?;
    if fleet.is_empty() {
        writeln!(o, "not run")?;
    } else {
        let together = fleet.iter().all(|h| h.barrier_passed == Some(true));
        let held: u64 = fleet.iter().map(|h| h.still_open_at_end).sum();
        let attempted: usize = fleet.iter().map(|h| h.attempted).sum();
        let rss: f64 = fleet
            .iter()
            .map(|h| h.target_rss_after_kib as f64 / 1024.0)
            .sum();
        writeln!(o, "| gateways | held (of attempted) | all open at once | per gateway: held / fd limit | RSS of all gateways | RSS per connection (mean) | target | met |")?;
        writeln!(o, "|---|---|---|---|---|---|---|---|")?;
        let per_gw: Vec<String> = fleet
            .iter()
            .map(|h| format!("{:.1}%", h.fraction_of_fd_limit * 100.0))
            .collect();
        let mean_per_conn = fleet
            .iter()
            .map(|h| h.rss_per_connection_bytes)
            .sum::<f64>()
            / fleet.len() as f64;
        writeln!(
            o,
            "| {} | {} of {} | {} | {} | {:.0} MiB | {:.2} KiB | ≥ 100,000 | {} |",
            fleet.len(),
            n(held as f64),
            n(attempted as f64),
            if together { "yes" } else { "**no**" },
            per_gw.join(", "),
            rss,
            mean_per_conn / 1024.0,
            yes(together && held >= 100_000)
        )?;
    }

    storm_section(&mut o, dir, cores)?;

    if let Some(s) = &search {
        writeln!(o, "\n### Trials ({:.0} s in all)\n", s.total_seconds)?;
        writeln!(o, "| # | trial | rate | s | sent | receipted | lost | refused | accepted p99 | receipt p50 / p99 / p99.9 (ms) | CPU/msg | verdict |")?;
        writeln!(
            o,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"
        )?;
        for (i, t) in s.trials.iter().enumerate() {
            writeln!(
                o,
                "| {i} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |",
                t.spec.label,
                n(t.spec.rate),
                t.spec.seconds,
                n(t.sent as f64),
                n(t.receipted as f64),
                t.lost,
                t.refused,
                ms(t.accept_latency.p99_ms),
                ms(t.receipt_latency.p50_ms),
                ms(t.receipt_latency.p99_ms),
                ms(t.receipt_latency.p999_ms),
                us(t.cpu_seconds_per_message),
                if t.passed {
                    "pass".to_owned()
                } else {
                    format!("fail: {}", t.verdict)
                }
            )?;
        }
    }
    Ok(o)
}

/// The connect storms of a run: this code's (`storm-<shards>.json`) and other code's on the same
/// data (`storm-before-<shards>.json`), by shard count.
fn storms(dir: &Path) -> (Vec<StormReport>, Vec<StormReport>) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("storm-") && n.ends_with(".json"))
                .filter(|n| !n.starts_with("storm-seed"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let (mut now, mut before): (Vec<StormReport>, Vec<StormReport>) = (Vec::new(), Vec::new());
    for name in names {
        if let Some(r) = load::<StormReport>(dir, &name) {
            if name.starts_with("storm-before-") {
                before.push(r);
            } else {
                now.push(r);
            }
        }
    }
    now.sort_by_key(|r| r.shards);
    before.sort_by_key(|r| r.shards);
    (now, before)
}

/// CPU milliseconds per connect of a process; `None` when it was not measured (not found at
/// the end of the storm: restarted meanwhile).
fn cpu_ms(r: &StormReport, process: &str) -> Option<f64> {
    r.cpu_per_connect.get(process).map(|s| s * 1e3)
}

fn ms3(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// CPU milliseconds per connect of every reported process; `None` if one was not measured.
fn total_ms(r: &StormReport) -> Option<f64> {
    STORM_PROCESSES
        .iter()
        .all(|p| cpu_ms(r, p).is_some())
        .then_some(r.cpu_per_connect_total * 1e3)
}

/// The processes whose CPU a storm reports.
const STORM_PROCESSES: [&str; 4] = ["gateway", "postgres", "kafka", "loadgen"];

fn storm_section(o: &mut String, dir: &Path, cores: f64) -> anyhow::Result<()> {
    writeln!(
        o,
        "\n### 6. Connect storm (users with history connect to one gateway at once)\n"
    )?;
    let (now, before) = storms(dir);
    let Some(first) = now.first().or(before.first()) else {
        writeln!(o, "not run")?;
        return Ok(());
    };
    let p = &first.plan;
    writeln!(
        o,
        "{} users, each with {} conversations: {} with {} messages pending for the user, {} with a receipt of the last 30 days, the rest acknowledged 40 days ago. Every user's websocket opened at once ({} in progress at most), automatic sync; time per connection from the start of its TCP connect to `syncDone`; CPU from /proc over the storm (first connect to last `syncDone`), per synced connection; shard transactions from `pg_stat_database` (statements outside a transaction, and preparations); memory = gateway RSS growth per connection, all idle after their sync (15 s after the last `syncDone`; 3 s after it in brackets).\n",
        n(p.users as f64),
        p.conversations,
        p.pending_conversations,
        p.pending_messages,
        p.receipt_conversations,
        n(first.concurrency as f64),
    )?;
    writeln!(o, "| code | shards | synced as planned (of) | connects/s to syncDone | to syncDone p50 / p99 / max (ms) | CPU per connect (ms): gateway / postgres / kafka / loadgen / all | shard transactions per connect | memory per idle connection |")?;
    writeln!(o, "|---|---:|---|---:|---|---|---:|---:|")?;
    for r in now.iter().chain(&before) {
        let failed: u64 = r.failures.values().sum();
        writeln!(
            o,
            "| {} | {} | {} of {}{}{} | **{}** | {} / {} / {} | {} / {} / {} / {} / **{}** | {} | {:.2} KiB ({:.2}) |",
            r.label,
            r.shards,
            n(r.synced_as_planned as f64),
            n(r.attempted as f64),
            if failed > 0 { format!("; {failed} failed") } else { String::new() },
            if r.synced_as_planned < r.synced {
                format!("; {} synced otherwise", r.synced - r.synced_as_planned)
            } else {
                String::new()
            },
            n(r.connects_per_sec),
            ms(r.to_sync_done.p50_ms),
            ms(r.to_sync_done.p99_ms),
            ms(r.to_sync_done.max_ms),
            ms3(cpu_ms(r, "gateway")),
            ms3(cpu_ms(r, "postgres")),
            ms3(cpu_ms(r, "kafka")),
            ms3(cpu_ms(r, "loadgen")),
            ms3(total_ms(r)),
            r.pg_transactions_per_connect
                .map(|t| format!("{t:.1}"))
                .unwrap_or_else(|| "-".into()),
            r.rss_per_connection_idle_bytes / 1024.0,
            r.rss_per_connection_bytes / 1024.0,
        )?;
    }
    for r in now.iter().chain(&before) {
        for m in r.mismatches.iter().take(2) {
            writeln!(
                o,
                "\n{} ({} shards), a sync not as planned: {m}",
                r.label, r.shards
            )?;
        }
        let missing: Vec<&str> = STORM_PROCESSES
            .into_iter()
            .filter(|p| cpu_ms(r, p).is_none())
            .collect();
        if !missing.is_empty() {
            writeln!(
                o,
                "\n{} ({} shards): no CPU figure for {} (not found at the end of the storm: restarted meanwhile); its total leaves them out",
                r.label,
                r.shards,
                missing.join(", ")
            )?;
        }
        if let Some(busy) = r.machine_busy_seconds {
            writeln!(
                o,
                "\n{} ({} shards): over its {:.1} s the machine was busy {:.1} CPU s of {:.1} ({:.1} CPU s in processes other than the measured ones); load average {} at the end",
                r.label,
                r.shards,
                r.cpu.wall_seconds,
                busy,
                r.cpu.wall_seconds * cores,
                (busy - r.cpu.total_seconds).max(0.0),
                r.load_average.map(|l| format!("{l:.2}")).unwrap_or_else(|| "?".into()),
            )?;
        }
        for (code, count) in &r.sync_errors {
            writeln!(
                o,
                "\n{} ({} shards): {count} connections got an `{code}` error frame before `syncDone` (the gateway could not read all of their sync)",
                r.label, r.shards
            )?;
        }
        for (e, count) in &r.failures {
            writeln!(
                o,
                "\n{} ({} shards): {count} connections failed: {e}",
                r.label, r.shards
            )?;
        }
    }
    if now.is_empty() {
        return Ok(());
    }
    let list = |f: &dyn Fn(&StormReport) -> String| {
        now.iter()
            .map(|r| format!("{} ({} shards)", f(r), r.shards))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let all = |f: &dyn Fn(&StormReport) -> bool| now.iter().all(f);
    writeln!(o, "\n| figure (this code) | value | target | met |")?;
    writeln!(o, "|---|---|---|---|")?;
    writeln!(
        o,
        "| connects per second to `syncDone` | {} | ≥ 2,000 (aim 4,000) | {} |",
        list(&|r| n(r.connects_per_sec)),
        yes(all(&|r| r.connects_per_sec >= 2000.0))
    )?;
    writeln!(
        o,
        "| Postgres CPU per connect | {} | ≤ 0.3 ms | {} |",
        list(&|r| format!("{} ms", ms3(cpu_ms(r, "postgres")))),
        yes(all(&|r| cpu_ms(r, "postgres").is_some_and(|v| v <= 0.3)))
    )?;
    writeln!(
        o,
        "| gateway CPU per connect | {} | ≤ 0.4 ms | {} |",
        list(&|r| format!("{} ms", ms3(cpu_ms(r, "gateway")))),
        yes(all(&|r| cpu_ms(r, "gateway").is_some_and(|v| v <= 0.4)))
    )?;
    if let (Some(lo), Some(hi)) = (now.first(), now.last()) {
        if hi.shards > lo.shards {
            let (total_hi, total_lo) = (total_ms(hi), total_ms(lo));
            let met = match (total_hi, total_lo) {
                (Some(h), Some(l)) => yes(h / l <= 1.2),
                _ => "-",
            };
            writeln!(
                o,
                "| CPU per connect, {} shards / {} shards | all processes {} ({} / {} ms); Postgres {} ({} / {} ms); connects/s {:.2}x ({} / {}) | ≤ 1.2 | {} |",
                hi.shards,
                lo.shards,
                ratio(total_hi, total_lo),
                ms3(total_hi),
                ms3(total_lo),
                ratio(cpu_ms(hi, "postgres"), cpu_ms(lo, "postgres")),
                ms3(cpu_ms(hi, "postgres")),
                ms3(cpu_ms(lo, "postgres")),
                hi.connects_per_sec / lo.connects_per_sec.max(1e-9),
                n(hi.connects_per_sec),
                n(lo.connects_per_sec),
                met
            )?;
        }
    }
    writeln!(
        o,
        "| memory per idle connection (gateway RSS growth) | {} | 2.47 KiB before the index (Centrifugo 47.2) | |",
        list(&|r| format!("{:.2} KiB", r.rss_per_connection_idle_bytes / 1024.0))
    )?;
    writeln!(
        o,
        "| every sync carried exactly the user's pending messages and receipts | {} | all | {} |",
        list(&|r| format!(
            "{} of {}",
            n(r.synced_as_planned as f64),
            n(r.attempted as f64)
        )),
        yes(all(&|r| r.synced_as_planned == r.attempted))
    )?;
    for b in &before {
        if let Some(r) = now.iter().find(|r| r.shards == b.shards) {
            writeln!(
                o,
                "| against {} at {} shards: connects/s; CPU per connect (all; Postgres; gateway) | {:.1}x ({} / {}); {}; {}; {} | | |",
                b.label,
                b.shards,
                r.connects_per_sec / b.connects_per_sec.max(1e-9),
                n(r.connects_per_sec),
                n(b.connects_per_sec),
                ratio(total_ms(r), total_ms(b)),
                ratio(cpu_ms(r, "postgres"), cpu_ms(b, "postgres")),
                ratio(cpu_ms(r, "gateway"), cpu_ms(b, "gateway")),
            )?;
            if b.synced_as_planned < b.attempted {
                writeln!(
                    o,
                    "| … but {} completed only {} of {} syncs as planned: the others failed part of the way, so its CPU per connect is not the cost of a sync | | | |",
                    b.label,
                    n(b.synced_as_planned as f64),
                    n(b.attempted as f64)
                )?;
            }
        }
    }
    Ok(())
}
