//! The Markdown results table from a bench output directory.
//!
//! Reads `meta.json` (written by bench/bench.sh), `kafka.json`, `pg.json`, `echo.json`,
//! `search.json` (and `delete-on-ack/search.json`, the same search in that retention mode),
//! `hold-gateway.json`, `hold-tcp.json`, `hold-fleet-<n>.json`, `storm-<shards>.json` (and
//! `storm-before-<shards>.json`, other code on the same data), `tls/` (the TLS stage: `setup.json`,
//! `clients-<n>-<mode>/run.json`, `storm-<n>-<mode>.json`, `services-<n>-<mode>/run.json`); a
//! missing file shows as "not run" (the TLS section only when the stage ran).

use std::fmt::Write as _;
use std::path::Path;

use crate::e2e::{SearchReport, SecondLatency, TrialReport};
use crate::prometheus::HistogramDelta;
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

/// A section another script wrote as markdown (`modes.md` from bench/bench.sh, `peer.md` from
/// bench/peer.sh), put in its place among the numbered ones; nothing when it is absent, and a
/// line on stderr (as `load` does) when it is there but cannot be read.
fn include_section(o: &mut String, dir: &Path, name: &str) -> std::fmt::Result {
    match std::fs::read_to_string(dir.join(name)) {
        Ok(text) => writeln!(o, "\n{}", text.trim_matches('\n')),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("{name}: {e}");
            }
            Ok(())
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

/// Milliseconds with three significant digits.
pub(crate) fn ms(v: f64) -> String {
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
            "| Kafka produce → consume | {} | {} | {} | {} / {} / {} at {}/s | {}-byte records, {} partitions, pipeline's producer/consumer settings (acks=all, idempotent, linger {}, lz4); CPU = loadgen + broker; produce→ack p99 {} ms; presence catch-up (per multiplexer batch) p50 {} ms (same watermark queries from an idle client: {} ms) |",
            n(k.throughput.records_per_sec),
            us(k.throughput.cpu_seconds_per_record),
            us(k.latency.cpu_seconds_per_record),
            ms(k.latency.latency.p50_ms),
            ms(k.latency.latency.p99_ms),
            ms(k.latency.latency.p999_ms),
            n(k.latency.rate),
            k.record_bytes,
            k.partitions,
            k.linger_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_else(|| "not recorded".into()),
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

    let doa: Option<SearchReport> = load(dir, &format!("{DELETE_ON_ACK_DIR}/search.json"));
    let max_trial: Option<&TrialReport> = search.as_ref().and_then(max_trial);
    e2e_section(
        &mut o,
        "2. End to end (send → accepted → stored → pushed → acked → delivered receipt)",
        "keep mode",
        search.as_ref(),
        cores,
    )?;
    if search.is_some() || doa.is_some() {
        e2e_section(
            &mut o,
            "2b. End to end, delete-on-ack mode (`RETENTION=delete-on-ack`: a body is erased once its recipient acks it; own shards, topics and users)",
            "delete-on-ack mode",
            doa.as_ref(),
            cores,
        )?;
    }
    include_section(&mut o, dir, "modes.md")?;

    writeln!(o, "\n### 3. Ratios\n")?;
    // The rate the raw stages' CPU allows, with the websocket at its open-loop cost.
    let mut allowed_rate_ws_open = None;
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
        allowed_rate_ws_open = Some(allowed_ws_open);
        let open_loop = format!(
            "… the same, with the websocket round trip at its open-loop cost ({} at {}/s: one frame per write, as the gateway writes them)",
            us(e.latency.cpu_seconds_per_record),
            n(e.latency.rate),
        );
        for (label, max_trial) in [
            (open_loop.as_str(), max_trial),
            (
                "… the same in delete-on-ack mode",
                doa.as_ref().and_then(self::max_trial),
            ),
        ] {
            let Some(t) = max_trial else { continue };
            writeln!(
                o,
                "| {label} | {:.2} ({} / {}; {} per message) | ≥ {RAW_RATIO_MIN} | {} |",
                t.spec.rate / allowed_ws_open,
                n(t.spec.rate),
                n(allowed_ws_open),
                us(per_msg_ws_open),
                yes(t.spec.rate / allowed_ws_open >= RAW_RATIO_MIN)
            )?;
        }
        if let Some(s) = &search {
            for (label, i) in latency_points(s) {
                if let Some(t) = s.trials.get(i) {
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
    let modes = modes_held(dir);
    let mode_ratio = mode_ratio(search.as_ref(), doa.as_ref(), modes.as_ref());
    if let Some(m) = &mode_ratio {
        writeln!(
            o,
            "| delete-on-ack max / keep max | {} | ≥ {DELETE_ON_ACK_RATIO_MIN} | {} |",
            m.text(),
            yes(m.ratio >= DELETE_ON_ACK_RATIO_MIN)
        )?;
    }
    targets_section(
        &mut o,
        search.as_ref(),
        doa.as_ref(),
        allowed_rate_ws_open,
        mode_ratio,
    )?;

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
    include_section(&mut o, dir, "peer.md")?;
    tls_section(&mut o, dir)?;

    if let Some(s) = &search {
        trials_table(&mut o, "Trials", s)?;
    }
    if let Some(s) = &doa {
        trials_table(&mut o, "Trials, delete-on-ack mode", s)?;
    }
    Ok(o)
}

/// Every trial of a search, in the order they ran.
fn trials_table(o: &mut String, title: &str, s: &SearchReport) -> anyhow::Result<()> {
    writeln!(o, "\n### {title} ({:.0} s in all)\n", s.total_seconds)?;
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
    Ok(())
}

/// Where bench/bench.sh puts the delete-on-ack mode's search (under the run's directory).
pub const DELETE_ON_ACK_DIR: &str = "delete-on-ack";

// The targets of the second performance step (issue 18).
const DELIVERED_P99_LOW_MS: f64 = 10.0;
const DELIVERED_P99_80PCT_MS: f64 = 50.0;
const RECEIPT_P99_80PCT_MS: f64 = 100.0;
const CPU_PER_MESSAGE_MAX_US: f64 = 150.0;
const RAW_RATIO_MIN: f64 = 0.8;
const DELETE_ON_ACK_RATIO_MIN: f64 = 0.85;

/// The pipeline's histograms of a message's hops, in the order a message meets them: a label
/// (what one observation is) and the histogram's name.
const HOPS: [(&str, &str); 12] = [
    (
        "gateway produce ack (produce to `inbound` until acknowledged; per message)",
        "gateway_produce_seconds",
    ),
    (
        "inbound wait (record's Kafka timestamp to consumed by the multiplexer; per record: messages and acks)",
        "multiplexer_inbound_wait_seconds",
    ),
    (
        "batch wait (consumed until its batch closes; per record)",
        "multiplexer_batch_wait_seconds",
    ),
    (
        "store (a batch's store and acks in the shards; per batch)",
        "multiplexer_store_seconds",
    ),
    (
        "wait for the index stage (stored until its index write starts; per batch)",
        "multiplexer_stage_wait_seconds",
    ),
    (
        "index (the conversation index write; per batch)",
        "multiplexer_index_seconds",
    ),
    (
        "presence catch-up (the presence log's end read and reached; per batch with pushes)",
        "multiplexer_presence_catch_up_seconds",
    ),
    (
        "outbound produce (until every delivery report; per batch)",
        "multiplexer_route_seconds",
    ),
    (
        "outbound wait (record's Kafka timestamp to consumed by the gateway; per record)",
        "gateway_outbound_wait_seconds",
    ),
    (
        "outbound open (records taken to pushed: in delete-on-ack mode their keys read and bodies opened; per chunk)",
        "gateway_outbound_open_seconds",
    ),
    (
        "socket write (frames written and flushed to a socket; per write)",
        "gateway_socket_write_seconds",
    ),
    (
        "accepted to pushed, on the gateway (per pushed message)",
        "chat_e2e_latency_seconds",
    ),
];

/// The trial that confirmed the highest sustained rate.
fn max_trial(s: &SearchReport) -> Option<&TrialReport> {
    s.max_sustained_trial.and_then(|i| s.trials.get(i))
}

/// The latency point at the fixed low rate (by label in reports older than the field).
fn low_trial(s: &SearchReport) -> Option<usize> {
    s.low_rate_trial.or_else(|| {
        s.latency_points
            .iter()
            .find(|(k, _)| k.contains("fixed low rate"))
            .map(|(_, &i)| i)
    })
}

/// The latency point at 80% of the maximum (by label in reports older than the field).
fn eighty_pct_trial(s: &SearchReport) -> Option<usize> {
    s.eighty_pct_trial.or_else(|| {
        s.latency_points
            .iter()
            .find(|(k, _)| k.contains("80% of max"))
            .map(|(_, &i)| i)
    })
}

/// The latency points by rate (label, trial index).
fn latency_points(s: &SearchReport) -> Vec<(&str, usize)> {
    let mut v: Vec<(&str, usize)> = s
        .latency_points
        .iter()
        .map(|(k, &i)| (k.as_str(), i))
        .filter(|(_, i)| *i < s.trials.len())
        .collect();
    v.sort_by(|a, b| s.trials[a.1].spec.rate.total_cmp(&s.trials[b.1].spec.rate));
    v
}

/// Delete-on-ack's maximum against keep mode's, and where the figure comes from. A mode's
/// maximum is the highest rate it held for 60 s: its search's, or the rate of the modes at one
/// rate (section 2c) when it held that rate in every one of its alternated runs there, whichever
/// is higher. The search knows its maximum to about 8%, the same margin the target holds
/// delete-on-ack to, so a mode that holds 0.85 of keep's maximum in every alternated run has a
/// maximum at least that high whatever its search found.
fn mode_ratio(
    keep: Option<&SearchReport>,
    doa: Option<&SearchReport>,
    modes: Option<&ModesHeld>,
) -> Option<ModeRatio> {
    let keep = keep?.max_sustained_rate?;
    let searched = doa?.max_sustained_rate.unwrap_or(0.0);
    let held = modes.filter(|m| m.doa_runs > 0 && m.doa_held == m.doa_runs && m.rate > searched);
    let doa = held.map_or(searched, |m| m.rate);
    (keep > 0.0).then(|| ModeRatio {
        ratio: doa / keep,
        keep,
        doa,
        searched,
        held: held.cloned(),
    })
}

/// Delete-on-ack's maximum against keep mode's (see [`mode_ratio`]).
#[derive(Clone, Debug, PartialEq)]
struct ModeRatio {
    ratio: f64,
    keep: f64,
    /// Delete-on-ack's maximum: its search's, or the modes' rate if it held that in every run.
    doa: f64,
    /// What delete-on-ack's search alone found.
    searched: f64,
    /// The modes at one rate, when they set delete-on-ack's maximum.
    held: Option<ModesHeld>,
}

impl ModeRatio {
    /// The ratio and where delete-on-ack's maximum comes from, for a table's cell. Ratios are
    /// cut to two decimals, not rounded, so that one just short of the target never reads as it.
    fn text(&self) -> String {
        let cut = |r: f64| format!("{:.2}", (r * 100.0).floor() / 100.0);
        let mut t = format!("{} ({} / {}", cut(self.ratio), n(self.doa), n(self.keep));
        if let Some(m) = &self.held {
            t += &format!(
                ": held in {} of {} alternated 60 s runs, section 2c, keep mode in {} of {}; \
                 its search's maximum {}, {}",
                m.doa_held,
                m.doa_runs,
                m.keep_held,
                m.keep_runs,
                n(self.searched),
                cut(self.searched / self.keep)
            );
        }
        t + ")"
    }
}

/// What the modes at one rate (bench/bench.sh's `modes_check`) held: the rate, and each mode's
/// runs whose 60 s confirm held it.
#[derive(Clone, Debug, PartialEq)]
struct ModesHeld {
    rate: f64,
    keep_runs: usize,
    keep_held: usize,
    doa_runs: usize,
    doa_held: usize,
}

/// Reads `modes/runs.tsv` (round, mode, run directory a line) and each run's `search.json` in
/// the run directory `dir`. A run held the rate when its search's maximum is the rate: its
/// search was bounded by it, so that is its confirm passing. `None` when the stage did not run.
fn modes_held(dir: &Path) -> Option<ModesHeld> {
    let runs = std::fs::read_to_string(dir.join("modes").join("runs.tsv")).ok()?;
    let mut held = ModesHeld {
        rate: 0.0,
        keep_runs: 0,
        keep_held: 0,
        doa_runs: 0,
        doa_held: 0,
    };
    for line in runs.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split('\t');
        let (Some(_round), Some(mode), Some(path)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // The runs' own directories sit beside runs.tsv, whatever path it was written with. A
        // path without a file name names no run directory: that run is counted, as not held,
        // like one whose search.json is missing, and the other lines still count.
        let s: Option<SearchReport> = Path::new(path)
            .file_name()
            .and_then(|name| load(&dir.join("modes").join(name), "search.json"));
        // Its search is bounded by the rate: every trial after the warm-up runs at it.
        let rate = s
            .as_ref()
            .and_then(|s| s.trials.iter().find(|t| t.spec.label != "warmup"))
            .map(|t| t.spec.rate);
        let ok = match (&s, rate) {
            (Some(s), Some(r)) => {
                held.rate = held.rate.max(r);
                s.max_sustained_rate == Some(r)
            }
            _ => false,
        };
        let (runs, n_held) = match mode {
            "keep" => (&mut held.keep_runs, &mut held.keep_held),
            "delete-on-ack" => (&mut held.doa_runs, &mut held.doa_held),
            _ => continue,
        };
        *runs += 1;
        *n_held += usize::from(ok);
    }
    (held.keep_runs + held.doa_runs > 0).then_some(held)
}

/// A measured value against a target: the cell's text and the "met" cell.
fn judged(value: String, ok: bool) -> (String, &'static str) {
    (value, yes(ok))
}

/// Delivered p99 at the fixed low rate against its target (`None`: not run).
fn low_rate_figure(s: &SearchReport) -> Option<(String, &'static str)> {
    if let Some(t) = low_trial(s).and_then(|i| s.trials.get(i)) {
        let p99 = t.deliver_latency.p99_ms;
        return Some(judged(
            format!("{} ms at {} msg/s", ms(p99), n(t.spec.rate)),
            p99 <= DELIVERED_P99_LOW_MS,
        ));
    }
    match s.max_sustained_rate {
        Some(max) if s.low_rate > max => Some((
            format!("{} msg/s not sustainable (max {})", n(s.low_rate), n(max)),
            yes(false),
        )),
        None if !s.trials.is_empty() => Some(("no sustained rate".into(), yes(false))),
        _ => None,
    }
}

fn eighty_pct(s: &SearchReport) -> Option<&TrialReport> {
    eighty_pct_trial(s).and_then(|i| s.trials.get(i))
}

fn cpu_figure(s: &SearchReport) -> Option<(String, &'static str)> {
    let t = max_trial(s)?;
    let v = t.cpu_seconds_per_message * 1e6;
    Some(judged(
        format!(
            "{} at {} msg/s",
            us(t.cpu_seconds_per_message),
            n(t.spec.rate)
        ),
        v <= CPU_PER_MESSAGE_MAX_US,
    ))
}

/// Section 2 for one retention mode: the figures against their targets, latency against rate,
/// and the per-hop breakdown at each latency point.
fn e2e_section(
    o: &mut String,
    heading: &str,
    mode: &str,
    search: Option<&SearchReport>,
    cores: f64,
) -> anyhow::Result<()> {
    writeln!(o, "\n### {heading}\n")?;
    let max = search.and_then(max_trial);
    writeln!(o, "| figure | value | target | met |")?;
    writeln!(o, "|---|---|---|---|")?;
    let Some(s) = search else {
        writeln!(o, "| end to end | not run | | |")?;
        return Ok(());
    };
    match max {
        Some(t) => writeln!(
            o,
            "| highest rate sustained for {} s, nothing lost, bounded lag | **{} msg/s** ({} users, {} gateway(s), ack {:?}) | ≥ 12,000 msg/s | {} |",
            t.spec.seconds,
            n(t.spec.rate),
            s.users,
            s.gateways,
            s.ack_mode,
            yes(t.spec.rate >= 12000.0)
        )?,
        None => writeln!(o, "| highest sustained rate | none of the tried rates passed | ≥ 12,000 msg/s | **no** |")?,
    }
    let (low, eighty) = (low_trial(s), eighty_pct_trial(s));
    if low.is_none() && s.low_rate > 0.0 {
        if let Some((value, met)) = low_rate_figure(s) {
            writeln!(
                o,
                "| latency at {} msg/s (fixed low rate) | {value} | delivered p99 ≤ {DELIVERED_P99_LOW_MS} ms | {met} |",
                n(s.low_rate)
            )?;
        }
    }
    for (label, i) in latency_points(s) {
        let t = &s.trials[i];
        let at_target = label.starts_with("10000") || label.contains("target");
        let (receipt_target, receipt_met) = if i == eighty.unwrap_or(usize::MAX) {
            (
                format!("receipt p99 ≤ {RECEIPT_P99_80PCT_MS} ms"),
                yes(t.receipt_latency.p99_ms <= RECEIPT_P99_80PCT_MS),
            )
        } else if at_target {
            (
                "p99 < 50 ms at 10K".to_owned(),
                yes(t.spec.rate >= 10000.0 && t.receipt_latency.p99_ms < 50.0),
            )
        } else {
            (String::new(), "")
        };
        writeln!(
            o,
            "| latency at {} msg/s: receipt p50 / p99 / p99.9 | {} / **{}** / {} ms ({} s, {} msgs, {} lost) | {receipt_target} | {receipt_met} |",
            label,
            ms(t.receipt_latency.p50_ms),
            ms(t.receipt_latency.p99_ms),
            ms(t.receipt_latency.p999_ms),
            t.spec.seconds,
            t.sent,
            t.lost,
        )?;
        let delivered_target = if Some(i) == low {
            Some(DELIVERED_P99_LOW_MS)
        } else if Some(i) == eighty {
            Some(DELIVERED_P99_80PCT_MS)
        } else {
            None
        };
        writeln!(
            o,
            "| … accepted p99; delivered p50 / p99 at {} | {}; {} / **{}** ms | {} | {} |",
            label,
            ms(t.accept_latency.p99_ms),
            ms(t.deliver_latency.p50_ms),
            ms(t.deliver_latency.p99_ms),
            delivered_target
                .map(|v| format!("delivered p99 ≤ {v} ms"))
                .unwrap_or_default(),
            delivered_target
                .map(|v| yes(t.deliver_latency.p99_ms <= v))
                .unwrap_or(""),
        )?;
    }
    if let Some(t) = max {
        let parts: Vec<String> = t
            .cpu
            .seconds
            .iter()
            .map(|(k, v)| format!("{k} {}", us(v / t.sent.max(1) as f64)))
            .collect();
        writeln!(
            o,
            "| CPU per message at the max rate (all processes) | {} ({}); {:.0}% of {} cores | ≤ {CPU_PER_MESSAGE_MAX_US} µs | {} |",
            us(t.cpu_seconds_per_message),
            parts.join(", "),
            t.cpu.total_seconds / t.cpu.wall_seconds.max(1e-9) / cores * 100.0,
            cores,
            yes(t.cpu_seconds_per_message * 1e6 <= CPU_PER_MESSAGE_MAX_US)
        )?;
    }
    curve_table(o, mode, s)?;
    hops_section(o, mode, s)
}

/// Delivered and receipt p50 / p99 of every trial (the warm-up aside), by rate.
fn curve_table(o: &mut String, mode: &str, s: &SearchReport) -> anyhow::Result<()> {
    writeln!(o, "\n#### Latency against rate ({mode})\n")?;
    let mut rows: Vec<(usize, &TrialReport)> = s
        .trials
        .iter()
        .enumerate()
        .filter(|(_, t)| t.spec.label != "warmup")
        .collect();
    rows.sort_by(|a, b| a.1.spec.rate.total_cmp(&b.1.spec.rate).then(a.0.cmp(&b.0)));
    let drawn = crate::e2e::curve_trials(&s.trials, s.max_sustained_rate).len();
    match &s.curve_chart {
        Some(c) => writeln!(
            o,
            "Chart: `{c}` (p50 and p99 against rate through the {drawn} trials that passed up to the maximum, the longest at each rate). Latency is from the scheduled send (open loop): delivered = the recipient reads the push, receipt = the sender reads the receipt of the recipient's ack.\n"
        )?,
        None if drawn == 0 => writeln!(o, "No chart: no trial passed.\n")?,
        None => writeln!(o, "No chart in this report.\n")?,
    }
    writeln!(o, "The machine's cores: how many of its cores were busy through the trial on average (`/proc/stat`), how many of them the watched processes were charged, and how many went to interrupts and softirqs (the loopback's packets among them) and to the hypervisor's other guests (steal). A kernel that samples time by ticks charges an interrupt to the process it interrupted, so the irq cores may be part of the watched ones; busy cores beyond the watched ones ran something no row of CPU/msg counts.\n")?;
    writeln!(o, "| # | trial | rate (msg/s) | s | delivered p50 / p99 (ms) | receipt p50 / p99 (ms) | CPU/msg | cores: busy / watched / irq / steal | passed |")?;
    writeln!(o, "|---:|---|---:|---:|---|---|---:|---|---|")?;
    for (i, t) in rows {
        writeln!(
            o,
            "| {i} | {} | {} | {} | {} / {} | {} / {} | {} | {} | {} |",
            t.spec.label,
            n(t.spec.rate),
            t.spec.seconds,
            ms(t.deliver_latency.p50_ms),
            ms(t.deliver_latency.p99_ms),
            ms(t.receipt_latency.p50_ms),
            ms(t.receipt_latency.p99_ms),
            us(t.cpu_seconds_per_message),
            machine_cores(&t.cpu),
            if t.passed { "yes" } else { "**no**" }
        )?;
    }
    Ok(())
}

/// The machine's busy cores through a measurement, the watched processes' share, and the
/// interrupts' and steal's: "1.92 / 1.80 / 0.11 / 0.00", or "-" where it was not read.
fn machine_cores(cpu: &crate::cpu::CpuUse) -> String {
    let wall = cpu.wall_seconds;
    let Some(m) = cpu.machine.filter(|_| wall > 0.0) else {
        return "-".into();
    };
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2}",
        m.busy() / wall,
        cpu.total_seconds / wall,
        m.irq / wall,
        m.steal / wall
    )
}

/// A histogram value in milliseconds.
fn hist_ms(v: Option<f64>) -> String {
    v.map(|v| ms(v * 1e3)).unwrap_or_else(|| "-".into())
}

/// A quantile of a histogram in milliseconds; within the first bucket only its bound is known
/// (interpolating from 0 says nothing), beyond the last only that it is above it.
fn quantile_ms(h: &HistogramDelta, v: Option<f64>, beyond: bool) -> String {
    match (v, h.buckets.first()) {
        (Some(v), Some(&(first, _))) if v <= first => format!("≤ {}", ms(first * 1e3)),
        (Some(v), _) if beyond => format!("> {}", ms(v * 1e3)),
        _ => hist_ms(v),
    }
}

/// What each latency point (fixed low rate, 80% of the maximum, the maximum) added to the
/// pipeline's own histograms, one table each.
fn hops_section(o: &mut String, mode: &str, s: &SearchReport) -> anyhow::Result<()> {
    writeln!(
        o,
        "\n#### Per hop, from the pipeline's own histograms ({mode})\n"
    )?;
    let mut points: Vec<(String, usize)> = Vec::new();
    if let Some(i) = low_trial(s) {
        points.push(("fixed low rate".into(), i));
    }
    if let Some(i) = eighty_pct_trial(s) {
        points.push(("80% of the maximum".into(), i));
    }
    if let Some(i) = s.max_sustained_trial {
        points.push(("the maximum: its confirming trial".into(), i));
    }
    points.retain(|(_, i)| *i < s.trials.len());
    if points.is_empty() {
        writeln!(o, "No latency point was measured.")?;
        return Ok(());
    }
    let bounds: Vec<String> = points
        .iter()
        .filter_map(|(_, i)| s.trials[*i].pipeline.as_ref())
        .flat_map(|p| p.histograms.iter())
        .find(|(name, _)| name.ends_with("_seconds"))
        .map(|(_, h)| {
            h.buckets
                .iter()
                .map(|b| {
                    let v = format!("{:.3}", b.0 * 1e3);
                    v.trim_end_matches('0').trim_end_matches('.').to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    writeln!(
        o,
        "What each trial added to the gateway's and the multiplexer's histograms: scraped right before it started and right after it drained, the difference taken bucket by bucket. p50 and p99 are interpolated inside a bucket as Prometheus's `histogram_quantile` does{}; mean = sum / count. The two waits compare Kafka timestamps (whole milliseconds) with the consumer's clock. A histogram the processes do not export shows as \"not exported\".",
        if bounds.is_empty() {
            String::new()
        } else {
            format!(
                " (bucket bounds {} ms; \"≤ x\": in the first bucket, \"> x\": beyond the last)",
                bounds.join(", ")
            )
        }
    )?;
    for (what, i) in points {
        let t = &s.trials[i];
        writeln!(
            o,
            "\nAt **{} msg/s** ({what}): trial #{i}, {} s, {} messages delivered\n",
            n(t.spec.rate),
            t.spec.seconds,
            n(t.delivered as f64)
        )?;
        let Some(p) = &t.pipeline else {
            writeln!(
                o,
                "not scraped (no `--metrics` endpoint given to `loadgen search`)"
            )?;
            continue;
        };
        writeln!(o, "| hop | p50 (ms) | p99 (ms) | mean (ms) | count |")?;
        writeln!(o, "|---|---:|---:|---:|---:|")?;
        for (label, name) in HOPS {
            match p.histograms.get(name) {
                Some(h) => writeln!(
                    o,
                    "| {label} `{name}` | {} | {} | {} | {} |",
                    quantile_ms(h, h.p50, false),
                    quantile_ms(h, h.p99, h.p99_beyond_buckets),
                    hist_ms(h.mean),
                    n(h.count as f64)
                )?,
                None => writeln!(o, "| {label} `{name}` | not exported | | | |")?,
            }
        }
        writeln!(
            o,
            "| delivered, as the load generator sees it (scheduled send to the push read) | {} | {} | {} | {} |",
            ms(t.deliver_latency.p50_ms),
            ms(t.deliver_latency.p99_ms),
            ms(t.deliver_latency.mean_ms),
            n(t.delivered as f64)
        )?;
        for (what, why) in &p.errors {
            writeln!(o, "\nnot read: {what}: {why}")?;
        }
        if let Some(line) = by_second_line(t) {
            writeln!(o, "\n{line}")?;
        }
    }
    Ok(())
}

/// A trial's delivered p99 second by second: whether its p99 came from a few slow seconds or
/// from every second alike, and when the slowest were, to lay beside the servers' logs. `None`
/// for a report of an older load generator.
fn by_second_line(t: &TrialReport) -> Option<String> {
    let seconds = &t.delivered_by_second;
    if seconds.is_empty() {
        return None;
    }
    let mut p99s: Vec<f64> = seconds.iter().map(|x| x.p99_ms).collect();
    p99s.sort_by(f64::total_cmp);
    // As bench/ab_report.py takes it: the middle one, or the mean of the middle two.
    let mid = p99s.len() / 2;
    let median = if p99s.len() % 2 == 1 {
        p99s[mid]
    } else {
        (p99s[mid - 1] + p99s[mid]) / 2.0
    };
    let mut slowest: Vec<&SecondLatency> = seconds.iter().collect();
    slowest.sort_by(|a, b| b.p99_ms.total_cmp(&a.p99_ms).then(a.second.cmp(&b.second)));
    let at = |second: u32| {
        if t.started_unix_ms <= 0 {
            return String::new();
        }
        let of_day = (t.started_unix_ms / 1000 + i64::from(second)).rem_euclid(86_400);
        format!(
            " at {:02}:{:02}:{:02} UTC",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60
        )
    };
    let shown: Vec<String> = slowest
        .iter()
        .take(3)
        .map(|x| format!("{} ms (second {}{})", ms(x.p99_ms), x.second, at(x.second)))
        .collect();
    Some(format!(
        "Second by second (the delivered p99 of the messages scheduled in each of its {} seconds): median {} ms; the slowest {}.",
        seconds.len(),
        ms(median),
        shown.join(", ")
    ))
}

/// The targets of issue 18, for each retention mode.
fn targets_section(
    o: &mut String,
    keep: Option<&SearchReport>,
    doa: Option<&SearchReport>,
    allowed_rate_ws_open: Option<f64>,
    mode_ratio: Option<ModeRatio>,
) -> anyhow::Result<()> {
    writeln!(
        o,
        "\n### 3b. Targets: latency under load, CPU per message, delete-on-ack\n"
    )?;
    writeln!(o, "| target | keep mode | met | delete-on-ack mode | met |")?;
    writeln!(o, "|---|---|---|---|---|")?;
    let not_run = || ("not run".to_owned(), "-");
    let row = |o: &mut String,
               target: String,
               f: &dyn Fn(&SearchReport) -> Option<(String, &'static str)>|
     -> anyhow::Result<()> {
        let (kv, km) = keep.and_then(f).unwrap_or_else(not_run);
        let (dv, dm) = doa.and_then(f).unwrap_or_else(not_run);
        writeln!(o, "| {target} | {kv} | {km} | {dv} | {dm} |")?;
        Ok(())
    };
    row(
        o,
        format!(
            "delivered p99 ≤ {DELIVERED_P99_LOW_MS} ms at {} msg/s",
            n(keep
                .or(doa)
                .map(|s| s.low_rate)
                .filter(|r| *r > 0.0)
                .unwrap_or(500.0))
        ),
        &low_rate_figure,
    )?;
    row(
        o,
        format!("delivered p99 ≤ {DELIVERED_P99_80PCT_MS} ms at 80% of the max"),
        &|s| {
            eighty_pct(s).map(|t| {
                judged(
                    format!(
                        "{} ms at {} msg/s",
                        ms(t.deliver_latency.p99_ms),
                        n(t.spec.rate)
                    ),
                    t.deliver_latency.p99_ms <= DELIVERED_P99_80PCT_MS,
                )
            })
        },
    )?;
    row(
        o,
        format!("receipt p99 ≤ {RECEIPT_P99_80PCT_MS} ms at 80% of the max"),
        &|s| {
            eighty_pct(s).map(|t| {
                judged(
                    format!(
                        "{} ms at {} msg/s",
                        ms(t.receipt_latency.p99_ms),
                        n(t.spec.rate)
                    ),
                    t.receipt_latency.p99_ms <= RECEIPT_P99_80PCT_MS,
                )
            })
        },
    )?;
    row(
        o,
        format!("CPU per message ≤ {CPU_PER_MESSAGE_MAX_US} µs at the max (all processes)"),
        &cpu_figure,
    )?;
    row(
        o,
        format!("e2e rate / rate the raw stages' CPU allows (websocket at its open-loop cost) ≥ {RAW_RATIO_MIN}"),
        &|s| {
            let allowed = allowed_rate_ws_open?;
            let t = max_trial(s)?;
            let r = t.spec.rate / allowed;
            Some(judged(
                format!("{r:.2} ({} / {})", n(t.spec.rate), n(allowed)),
                r >= RAW_RATIO_MIN,
            ))
        },
    )?;
    let (dv, dm) = match mode_ratio {
        Some(m) => judged(m.text(), m.ratio >= DELETE_ON_ACK_RATIO_MIN),
        None => not_run(),
    };
    writeln!(
        o,
        "| delete-on-ack max within 15% of keep mode's (ratio ≥ {DELETE_ON_ACK_RATIO_MIN}) | | | {dv} | {dm} |"
    )?;
    if allowed_rate_ws_open.is_none() {
        writeln!(
            o,
            "\nThe CPU-allowed rate needs the three baselines (section 1) of the same run."
        )?;
    }
    Ok(())
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

/// One trial of the TLS stage: its place in the run (1-based), its mode (`plain` or `tls`), and
/// what it measured.
struct TlsTrial<T> {
    order: usize,
    mode: String,
    report: T,
    /// CPU of the shared processes (Kafka, Postgres) over a few seconds right before the trial,
    /// while the pipeline idled: what other work on the machine made them use
    /// (`idle-<part>-<n>-<mode>.json`).
    idle: Option<crate::cpu::CpuUse>,
}

/// The trials of one part of the TLS stage, in run order: `<part>-<n>-<mode>.json`, or
/// `<part>-<n>-<mode>/run.json` (a `loadgen run` output directory).
fn tls_trials<T: serde::de::DeserializeOwned>(dir: &Path, part: &str) -> Vec<TlsTrial<T>> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{part}-")))
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<TlsTrial<T>> = names
        .into_iter()
        .filter_map(|name| {
            let stem = name.strip_suffix(".json").unwrap_or(&name);
            let (order, mode) = stem.strip_prefix(&format!("{part}-"))?.split_once('-')?;
            let file = if name.ends_with(".json") {
                name.clone()
            } else {
                format!("{name}/run.json")
            };
            Some(TlsTrial {
                order: order.parse().ok()?,
                mode: mode.to_owned(),
                report: load(dir, &file)?,
                idle: load(dir, &format!("idle-{stem}.json")),
            })
        })
        .collect();
    out.sort_by_key(|t| t.order);
    out
}

/// A row of a plain / TLS table: each mode's values in run order and their mean, and the ratio
/// of the means (TLS / plain).
fn tls_row<T>(
    o: &mut String,
    label: &str,
    trials: &[TlsTrial<T>],
    value: impl Fn(&T) -> Option<f64>,
    show: impl Fn(f64) -> String,
) -> anyhow::Result<()> {
    tls_row_of(o, label, trials, |t| value(&t.report), show)
}

/// [`tls_row`] with a value of the whole trial (its idle measurement included).
fn tls_row_of<T>(
    o: &mut String,
    label: &str,
    trials: &[TlsTrial<T>],
    value: impl Fn(&TlsTrial<T>) -> Option<f64>,
    show: impl Fn(f64) -> String,
) -> anyhow::Result<()> {
    let mut means = Vec::new();
    let mut cells = Vec::new();
    for mode in ["plain", "tls"] {
        let values: Vec<f64> = trials
            .iter()
            .filter(|t| t.mode == mode)
            .filter_map(&value)
            .collect();
        let mean = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
        let list: Vec<String> = values.iter().map(|v| show(*v)).collect();
        cells.push(match (values.len(), mean) {
            (0, _) | (_, None) => "-".to_owned(),
            (1, _) => list.join(""),
            (_, Some(m)) => format!("{} (mean **{}**)", list.join(", "), show(m)),
        });
        means.push(mean);
    }
    writeln!(
        o,
        "| {label} | {} | {} | {} |",
        cells[0],
        cells[1],
        ratio(means[1], means[0])
    )?;
    Ok(())
}

/// CPU microseconds per message sent of a process of a trial (`all`: every watched process).
fn cpu_us_per_message(r: &TrialReport, process: &str) -> Option<f64> {
    let sent = r.sent.max(1) as f64;
    if process == "all" {
        return Some(r.cpu_seconds_per_message * 1e6);
    }
    r.cpu.seconds.get(process).map(|s| s / sent * 1e6)
}

/// The processes other work on the machine may use too: their CPU over a trial less what they
/// used idle right before it is the trial's.
const SHARED_PROCESSES: [&str; 2] = ["kafka", "postgres"];

/// Cores `process` used idle right before a trial.
fn background_cores(idle: Option<&crate::cpu::CpuUse>, process: &str) -> Option<f64> {
    let idle = idle?;
    Some(idle.seconds.get(process)? / idle.wall_seconds.max(1e-9))
}

/// CPU seconds `process` used over a trial less its idle rate for as long (`all`: every
/// process, less the shared ones' idle rate).
fn net_cpu_seconds(
    cpu: &crate::cpu::CpuUse,
    idle: Option<&crate::cpu::CpuUse>,
    process: &str,
) -> Option<f64> {
    if process == "all" {
        let background: Option<f64> = SHARED_PROCESSES
            .iter()
            .map(|p| background_cores(idle, p))
            .sum();
        return Some(cpu.total_seconds - background? * cpu.wall_seconds);
    }
    Some(cpu.seconds.get(process)? - background_cores(idle, process)? * cpu.wall_seconds)
}

/// Rows of the shared processes' background, and of CPU net of it, per `unit` of work
/// (`per(trial, cpu seconds)` gives the figure).
fn tls_background_rows<T>(
    o: &mut String,
    trials: &[TlsTrial<T>],
    cpu: impl Fn(&T) -> &crate::cpu::CpuUse,
    per: impl Fn(&T, f64) -> f64,
    unit: &str,
    show: impl Fn(f64) -> String + Copy,
) -> anyhow::Result<()> {
    if trials.iter().all(|t| t.idle.is_none()) {
        return Ok(());
    }
    for p in SHARED_PROCESSES {
        tls_row_of(
            o,
            &format!("… {p} busy with other work right before the trial (cores)"),
            trials,
            |t| background_cores(t.idle.as_ref(), p),
            |v| format!("{v:.2}"),
        )?;
    }
    for p in SHARED_PROCESSES.into_iter().chain(["all"]) {
        let name = if p == "all" { "**all processes**" } else { p };
        tls_row_of(
            o,
            &format!("CPU per {unit} net of that: {name}"),
            trials,
            |t| net_cpu_seconds(cpu(&t.report), t.idle.as_ref(), p).map(|s| per(&t.report, s)),
            show,
        )?;
    }
    Ok(())
}

/// The processes whose CPU a trial of the TLS stage reports.
const TLS_PROCESSES: [&str; 5] = ["gateway", "multiplexer", "kafka", "postgres", "loadgen"];

/// The rows of a fixed-rate part (clients to the gateway, or services to Kafka and Postgres).
fn tls_rate_rows(o: &mut String, trials: &[TlsTrial<TrialReport>]) -> anyhow::Result<()> {
    let us1 = |v: f64| format!("{v:.1}");
    for p in TLS_PROCESSES {
        tls_row(
            o,
            &format!("CPU per message (µs): {p}"),
            trials,
            |r| cpu_us_per_message(r, p),
            us1,
        )?;
    }
    tls_row(
        o,
        "CPU per message (µs): **all processes**",
        trials,
        |r| cpu_us_per_message(r, "all"),
        us1,
    )?;
    tls_background_rows(
        o,
        trials,
        |r| &r.cpu,
        |r, s| s / r.sent.max(1) as f64 * 1e6,
        "message (µs)",
        us1,
    )?;
    tls_row(
        o,
        "delivered p50 (ms)",
        trials,
        |r| Some(r.deliver_latency.p50_ms),
        ms,
    )?;
    tls_row(
        o,
        "delivered p99 (ms)",
        trials,
        |r| Some(r.deliver_latency.p99_ms),
        ms,
    )?;
    tls_row(
        o,
        "receipt p50 (ms)",
        trials,
        |r| Some(r.receipt_latency.p50_ms),
        ms,
    )?;
    tls_row(
        o,
        "receipt p99 (ms)",
        trials,
        |r| Some(r.receipt_latency.p99_ms),
        ms,
    )?;
    tls_row(
        o,
        "messages lost (of sent)",
        trials,
        |r| Some(r.lost as f64),
        |v| format!("{v:.0}"),
    )?;
    Ok(())
}

/// Notes under a table: trials that did not pass, and processes without a CPU figure.
fn tls_notes(o: &mut String, part: &str, trials: &[TlsTrial<TrialReport>]) -> anyhow::Result<()> {
    for t in trials {
        let r = &t.report;
        if !r.passed {
            writeln!(
                o,
                "\n{part}, trial {} ({}): {} of {} sent receipted; {}",
                t.order,
                t.mode,
                n(r.receipted as f64),
                n(r.sent as f64),
                r.verdict
            )?;
        }
        let missing: Vec<&str> = TLS_PROCESSES
            .into_iter()
            .filter(|p| !r.cpu.seconds.contains_key(*p))
            .collect();
        if !missing.is_empty() {
            writeln!(
                o,
                "\n{part}, trial {} ({}): no CPU figure for {}",
                t.order,
                t.mode,
                missing.join(", ")
            )?;
        }
    }
    Ok(())
}

/// Section 8: what TLS costs, from `tls/` of the run (bench/tls.sh): clients to the gateway
/// (`ws://` against `wss://` served by the gateway), and the services' links to Kafka and
/// Postgres (plain against the secured broker and Postgres), the modes alternated in one run.
fn tls_section(o: &mut String, dir: &Path) -> anyhow::Result<()> {
    let dir = dir.join("tls");
    let Some(setup) = load::<serde_json::Value>(&dir, "setup.json") else {
        return Ok(());
    };
    writeln!(
        o,
        "\n### 8. What TLS costs (plain and TLS side by side, alternated in one run)\n"
    )?;
    let order = |modes: Vec<String>| {
        modes
            .iter()
            .map(|m| if m == "tls" { "TLS" } else { m.as_str() })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let clients: Vec<TlsTrial<TrialReport>> = tls_trials(&dir, "clients");
    let storms: Vec<TlsTrial<StormReport>> = tls_trials(&dir, "storm");
    let services: Vec<TlsTrial<TrialReport>> = tls_trials(&dir, "services");
    let (users, rate, seconds) = (
        setup["users"].as_u64().unwrap_or(0),
        setup["rate"].as_f64().unwrap_or(0.0),
        setup["seconds"].as_f64().unwrap_or(0.0),
    );
    writeln!(
        o,
        "**Clients to the gateway.** One gateway serving `ws://` and one serving `wss://` itself (`TLS_CERT_FILE`: {} certificate from a CA made for the run, which the load generator trusts with `--ca-file`), one multiplexer, the shared Kafka and Postgres. Trials in the order {}: {} users at {} msg/s for {} s each (a receipt round trip per message: the send, its ack, the push, the recipient's ack, the receipt); CPU from /proc over each trial, per message sent; TLS / plain is the ratio of the means.\n",
        setup["key"].as_str().unwrap_or("?"),
        order(clients.iter().map(|t| t.mode.clone()).collect()),
        n(users as f64),
        n(rate),
        seconds,
    )?;
    if clients.is_empty() {
        writeln!(o, "not run")?;
    } else {
        writeln!(o, "| figure | plain | TLS | TLS / plain |")?;
        writeln!(o, "|---|---|---|---|")?;
        tls_rate_rows(o, &clients)?;
        tls_notes(o, "clients", &clients)?;
    }
    if let Some(first) = storms.first() {
        let p = &first.report.plan;
        writeln!(
            o,
            "\n**Connect storm**, a fresh gateway per trial (plain or TLS), in the order {}: {} users with history ({} conversations each, {} with {} messages pending) connect, {} at a time, through the handshake and the websocket upgrade to `syncDone`; CPU per connect from /proc over the storm; memory = the gateway's RSS growth per connection, all idle ({:.0} s after the last `syncDone`).\n",
            order(storms.iter().map(|t| t.mode.clone()).collect()),
            n(p.users as f64),
            p.conversations,
            p.pending_conversations,
            p.pending_messages,
            n(first.report.concurrency as f64),
            setup["storm_idle_seconds"].as_f64().unwrap_or(15.0),
        )?;
        writeln!(o, "| figure | plain | TLS | TLS / plain |")?;
        writeln!(o, "|---|---|---|---|")?;
        let ms3 = |v: f64| format!("{v:.3}");
        for p in STORM_PROCESSES {
            tls_row(
                o,
                &format!("CPU per connect (ms): {p}"),
                &storms,
                |r| cpu_ms(r, p),
                ms3,
            )?;
        }
        tls_row(
            o,
            "CPU per connect (ms): **all processes**",
            &storms,
            total_ms,
            ms3,
        )?;
        tls_background_rows(
            o,
            &storms,
            |r| &r.cpu,
            |r, s| s / r.synced.max(1) as f64 * 1e3,
            "connect (ms)",
            ms3,
        )?;
        tls_row(
            o,
            "connects per second (to `syncDone`)",
            &storms,
            |r| Some(r.connects_per_sec),
            n,
        )?;
        tls_row(
            o,
            "to `syncDone` p50 (ms)",
            &storms,
            |r| Some(r.to_sync_done.p50_ms),
            ms,
        )?;
        tls_row(
            o,
            "to `syncDone` p99 (ms)",
            &storms,
            |r| Some(r.to_sync_done.p99_ms),
            ms,
        )?;
        tls_row(
            o,
            "memory per idle connection (KiB)",
            &storms,
            |r| Some(r.rss_per_connection_idle_bytes / 1024.0),
            |v| format!("{v:.2}"),
        )?;
        for t in &storms {
            let r = &t.report;
            let failed: u64 = r.failures.values().sum();
            if failed > 0 || r.synced_as_planned < r.attempted {
                writeln!(
                    o,
                    "\nstorm, trial {} ({}): {} of {} synced as planned, {failed} failed",
                    t.order,
                    t.mode,
                    n(r.synced_as_planned as f64),
                    n(r.attempted as f64)
                )?;
            }
        }
    }
    writeln!(
        o,
        "\n**Services to Kafka and Postgres.** The same load ({} users at {} msg/s for {} s, clients over `ws://` in both) on a gateway and a multiplexer that reach the secured broker (SASL_SSL with SCRAM-SHA-512, each as its own user, ACLs) and the secured Postgres (`sslmode=verify-full`, scram-sha-256; the gateway as `chat_reader`, the multiplexer as `chat_writer`), against a pair on the plain broker and Postgres of `make stack`. They are other instances of the same versions: the plain ones also serve whatever else runs on the machine.\n",
        n(users as f64),
        n(rate),
        seconds,
    )?;
    if let Some(skipped) = setup["services_skipped"].as_str() {
        writeln!(o, "Not run: {skipped}.")?;
    } else if services.is_empty() {
        writeln!(o, "not run")?;
    } else {
        writeln!(
            o,
            "Trials in the order {}.\n",
            order(services.iter().map(|t| t.mode.clone()).collect())
        )?;
        writeln!(o, "| figure | plain | TLS | TLS / plain |")?;
        writeln!(o, "|---|---|---|---|")?;
        tls_rate_rows(o, &services)?;
        tls_notes(o, "services", &services)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A search bounded by `rate` (as the modes at one rate run it): a warm-up, a probe and a
    /// 60 s confirm at the rate, the confirm `held` or not.
    fn bounded_search(rate: f64, held: bool) -> serde_json::Value {
        let latency = serde_json::json!({"count": 1, "mean_ms": 1.0, "p50_ms": 1.0, "p90_ms": 1.0,
            "p99_ms": 1.0, "p999_ms": 1.0, "max_ms": 1.0});
        let trial = |label: &str, rate: f64, seconds: f64, passed: bool| {
            serde_json::json!({
                "spec": {"label": label, "rate": rate, "seconds": seconds, "drain_seconds": 10.0,
                         "abort_backlog_seconds": 5.0, "max_p99_ms": 1000.0},
                "users": 10, "scheduled": 1, "sent": 1, "accepted": 1, "delivered": 1,
                "receipted": 1, "refused": 0, "duplicates": 0, "errors": {}, "lost": 0,
                "achieved_rate": rate, "scheduler_late_max_ms": 0.0,
                "accept_latency": latency, "deliver_latency": latency, "receipt_latency": latency,
                "window_p99_ms": [], "cpu": {"wall_seconds": 1.0, "seconds": {}, "total_seconds": 1.0},
                "cpu_seconds_per_message": 0.0001, "passed": passed, "verdict": "",
                "per_second": [], "chart": null
            })
        };
        serde_json::json!({
            "users": 10, "gateways": 2, "ack_mode": "Each", "body_bytes": 100,
            "trials": [trial("warmup", rate / 2.0, 5.0, true), trial("probe", rate, 5.0, true),
                       trial("confirm", rate, 60.0, held)],
            "max_sustained_rate": if held { Some(rate) } else { None },
            "max_sustained_trial": if held { Some(2) } else { None },
            "latency_points": {}, "total_seconds": 90.0
        })
    }

    /// A trial's cores: the machine's busy time over the wall time, the watched processes',
    /// the interrupts' and steal; a trial from before the machine was read shows "-".
    #[test]
    fn a_trials_cores_are_the_machines_time_over_its_wall_time() {
        let cpu = crate::cpu::CpuUse {
            wall_seconds: 10.0,
            total_seconds: 15.0,
            machine: Some(crate::cpu::MachineTime {
                user: 14.0,
                system: 3.0,
                irq: 1.2,
                steal: 0.1,
                idle: 1.7,
            }),
            ..Default::default()
        };
        assert_eq!(machine_cores(&cpu), "1.83 / 1.50 / 0.12 / 0.01");
        let old: crate::cpu::CpuUse =
            serde_json::from_str(r#"{"wall_seconds": 10.0, "seconds": {}, "total_seconds": 15.0}"#)
                .expect("a trial's cpu from before");
        assert_eq!(machine_cores(&old), "-");
    }

    /// The second-by-second line names the median second and the three slowest, with their
    /// wall-clock time; a report from before the field has none.
    #[test]
    fn a_trials_slowest_seconds_are_named_with_their_time() -> anyhow::Result<()> {
        let mut trial = bounded_search(500.0, true)["trials"][2].clone();
        // 2026-12-07 02:10:04.500 UTC.
        trial["started_unix_ms"] = serde_json::json!(1_796_609_404_500i64);
        let second = |s: u32, p99: f64| {
            serde_json::json!({"second": s, "delivered": 500, "p50_ms": 4.0, "p99_ms": p99,
                               "max_ms": p99 + 1.0})
        };
        trial["delivered_by_second"] = serde_json::json!([
            second(0, 9.0),
            second(1, 47.0),
            second(2, 8.0),
            second(3, 109.0),
            second(4, 9.5),
            second(5, 12.0)
        ]);
        let t: TrialReport = serde_json::from_value(trial.clone())?;
        assert_eq!(
            by_second_line(&t).as_deref(),
            Some(
                "Second by second (the delivered p99 of the messages scheduled in each of its 6 seconds): \
                 median 10.8 ms; the slowest 109 ms (second 3 at 02:10:07 UTC), 47.0 ms (second 1 at \
                 02:10:05 UTC), 12.0 ms (second 5 at 02:10:09 UTC)."
            )
        );
        trial
            .as_object_mut()
            .map(|o| (o.remove("delivered_by_second"), o.remove("started_unix_ms")));
        let old: TrialReport = serde_json::from_value(trial)?;
        assert_eq!(by_second_line(&old), None);
        Ok(())
    }

    /// Delete-on-ack's maximum is its search's, or the rate of the modes at one rate when it
    /// held that in every alternated run; one run of it that failed leaves the search's.
    #[test]
    fn delete_on_acks_maximum_counts_the_rate_it_held_in_every_alternated_run() -> anyhow::Result<()>
    {
        let dir = std::env::temp_dir().join(format!("loadgen-modes-{}", std::process::id()));
        let write_modes = |doa_held: [bool; 2]| -> anyhow::Result<()> {
            let _ = std::fs::remove_dir_all(dir.join("modes"));
            let mut runs = String::new();
            for (round, mode, held) in [
                (1, "keep", true),
                (1, "delete-on-ack", doa_held[0]),
                (2, "delete-on-ack", doa_held[1]),
                (2, "keep", true),
            ] {
                let name = format!("{round}-{}", if mode == "keep" { "keep" } else { "doa" });
                std::fs::create_dir_all(dir.join("modes").join(&name))?;
                std::fs::write(
                    dir.join("modes").join(&name).join("search.json"),
                    bounded_search(12_500.0, held).to_string(),
                )?;
                // bench.sh writes the paths from the checkout's root, not the run's.
                runs += &format!("{round}\t{mode}\ttarget/bench/elsewhere/modes/{name}\n");
            }
            Ok(std::fs::write(dir.join("modes").join("runs.tsv"), runs)?)
        };
        let search = |rate: f64| -> anyhow::Result<SearchReport> {
            Ok(serde_json::from_value(bounded_search(rate, true))?)
        };
        let (keep, doa) = (search(14_705.0)?, search(12_090.0)?);

        write_modes([true, true])?;
        let modes = modes_held(&dir);
        assert_eq!(
            modes,
            Some(ModesHeld {
                rate: 12_500.0,
                keep_runs: 2,
                keep_held: 2,
                doa_runs: 2,
                doa_held: 2
            })
        );
        let m = mode_ratio(Some(&keep), Some(&doa), modes.as_ref()).expect("a ratio");
        assert_eq!((m.doa, m.searched), (12_500.0, 12_090.0));
        assert!(m.ratio >= DELETE_ON_ACK_RATIO_MIN, "{m:?}");
        assert!(
            m.text()
                .starts_with("0.85 (12,500 / 14,705: held in 2 of 2")
                && m.text().contains("0.82"),
            "{}",
            m.text()
        );

        write_modes([true, false])?;
        let modes = modes_held(&dir);
        assert_eq!(
            modes.as_ref().map(|m| (m.doa_runs, m.doa_held)),
            Some((2, 1))
        );
        let m = mode_ratio(Some(&keep), Some(&doa), modes.as_ref()).expect("a ratio");
        assert_eq!((m.doa, m.held.as_ref()), (12_090.0, None));
        assert!(m.ratio < DELETE_ON_ACK_RATIO_MIN, "{m:?}");
        assert_eq!(m.text(), "0.82 (12,090 / 14,705)");

        // 12,499 held against 14,705 is 0.84998: cut, not rounded, it reads 0.84 and fails.
        let m = ModeRatio {
            ratio: 12_499.0 / 14_705.0,
            doa: 12_499.0,
            ..m
        };
        assert!(
            m.text().starts_with("0.84 (12,499 / 14,705)"),
            "{}",
            m.text()
        );

        // A search that found more than the modes' rate keeps its own maximum.
        write_modes([true, true])?;
        let higher = search(13_071.0)?;
        let m = mode_ratio(Some(&keep), Some(&higher), modes_held(&dir).as_ref()).expect("a ratio");
        assert_eq!((m.doa, m.held.as_ref()), (13_071.0, None));

        // A line whose path names no directory is a run that did not hold; the others count.
        let runs = dir.join("modes").join("runs.tsv");
        let mut lines = std::fs::read_to_string(&runs)?;
        lines += "3\tdelete-on-ack\ttarget/bench/..\n";
        std::fs::write(&runs, lines)?;
        assert_eq!(
            modes_held(&dir).map(|m| (m.keep_runs, m.keep_held, m.doa_runs, m.doa_held)),
            Some((2, 2, 3, 2))
        );

        std::fs::remove_dir_all(dir.join("modes"))?;
        assert_eq!(modes_held(&dir), None);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// The sections other scripts write land in their numbered places: the modes at one rate
    /// (2c) after the end-to-end sections and before the ratios (3), the peer (7) after the
    /// connect storm (6) and before TLS (8); an absent one leaves nothing behind.
    #[test]
    fn written_sections_land_in_their_numbered_places() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("loadgen-report-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tls"))?;
        std::fs::write(dir.join("tls/setup.json"), "{}")?;
        let without = markdown(&dir)?;
        assert!(
            !without.contains("### 2c.") && !without.contains("### 7."),
            "{without}"
        );
        std::fs::write(
            dir.join("modes.md"),
            "### 2c. The modes at one rate: not run\n",
        )?;
        std::fs::write(
            dir.join("peer.md"),
            "\n### 7. A peer in the same run: x\n\nSkipped.\n",
        )?;
        let with = markdown(&dir)?;
        std::fs::remove_dir_all(&dir)?;
        let at = |h: &str| with.find(h).unwrap_or_else(|| panic!("no {h} in:\n{with}"));
        let order = [
            "### 1.", "### 2.", "### 2c.", "### 3.", "### 6.", "### 7.", "### 8.",
        ];
        for pair in order.windows(2) {
            assert!(
                at(pair[0]) < at(pair[1]),
                "{} before {}:\n{with}",
                pair[0],
                pair[1]
            );
        }
        assert!(
            with.contains("\n\n### 7. A peer in the same run: x\n\nSkipped.\n"),
            "{with}"
        );
        Ok(())
    }
}
