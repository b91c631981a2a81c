//! `chaos`: the fault-injection suite (`make chaos`; `make chaos-short` in CI).
//!
//! For each scenario: a fresh slice of the fault topology (see [`stack`]), the workload
//! ([`workload`]) running at a steady rate in pipelined bursts, one fault injected a third of the
//! way in and healed, sends stopped at the end, a settle period, then the checker ([`check`]).
//! The poison-record scenario also produces bad records into `inbound` ([`poison`]) and looks
//! for each on the dead-letter topic. Prints a Markdown table and writes it to `--out`. Exits
//! non-zero if any scenario has an anomaly.

mod canary;
mod check;
mod degraded;
mod poison;
mod proxy;
mod stack;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::check::Report;
use crate::stack::{base_env, Proc, Slice, GATEWAYS, MULTIPLEXER_PORTS};

const ALL: &[&str] = &[
    "kill-broker",
    "kill-multiplexer",
    "poison-record",
    "stop-multiplexer",
    "kill-gateway",
    "stop-postgres",
    "degraded-readiness",
    "cut-postgres-link",
    "replay-delete-on-ack",
];

#[derive(Parser)]
#[command(version, about = "Fault-injection suite for the chat pipeline")]
struct Args {
    /// Comma-separated scenarios, or `all`.
    #[arg(long, default_value = "all")]
    scenarios: String,
    /// Seconds of sending per scenario.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Messages per second, over all conversations.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    #[arg(long, default_value_t = 200)]
    conversations: usize,
    /// Messages each sender sends at once, pipelined (without waiting for each to be accepted),
    /// every `burst` periods; 1 sends one at a time.
    #[arg(long, default_value_t = 5)]
    burst: usize,
    /// Directory of the gateway and multiplexer binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where the results table is written.
    #[arg(long, default_value = "chaos/RESULTS.md")]
    out: PathBuf,
    /// Leave the cluster and Postgres servers running afterwards.
    #[arg(long)]
    keep_stack: bool,
    /// Where the gateways' and multiplexers' logs go: a directory per run under it, a file per
    /// scenario and process (`<scenario>-<process>.log`), kept across the process's restarts.
    #[arg(long, default_value = "target/chaos-logs")]
    log_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    args.log_dir = args.log_dir.join(format!("run-{started}"));
    std::fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("creating {}", args.log_dir.display()))?;
    eprintln!("chaos: process logs in {}", args.log_dir.display());
    let scenarios: Vec<String> = if args.scenarios == "all" {
        ALL.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect()
    };
    for s in &scenarios {
        anyhow::ensure!(
            ALL.contains(&s.as_str()),
            "unknown scenario {s:?}; known: {}",
            ALL.join(", ")
        );
    }
    eprintln!("chaos: starting a 3-broker Kafka cluster and 2 Postgres servers");
    stack::start_infra().await?;
    let mut reports = Vec::new();
    for s in &scenarios {
        eprintln!(
            "chaos: scenario {s} ({} s at {} msg/s over {} conversations)",
            args.duration, args.rate, args.conversations
        );
        let report = match run(s, &args).await {
            Ok(r) => r,
            Err(e) => Report {
                scenario: s.clone(),
                note: format!("did not complete: {e:#}"),
                lost: usize::MAX,
                ..Report::default()
            },
        };
        eprintln!(
            "chaos: {s}: {}",
            if report.passed() { "pass" } else { "FAIL" }
        );
        reports.push(report);
    }
    if !args.keep_stack {
        stack::stop_infra().await?;
    }
    let table = table(&reports, &args);
    println!("{table}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &table).with_context(|| format!("writing {}", args.out.display()))?;
    let passed = reports.iter().filter(|r| r.passed()).count();
    println!("{passed} passed, {} failed", reports.len() - passed);
    if passed == reports.len() {
        return Ok(());
    }
    // The failures again, last, on stderr and without a backtrace: a CI log is often read
    // from its tail, and this is what it needs to show.
    for r in reports.iter().filter(|r| !r.passed()) {
        eprintln!("chaos: {} FAILED: {}", r.scenario, r.summary());
    }
    eprintln!("chaos: process logs in {}", args.log_dir.display());
    std::process::exit(1);
}

fn table(reports: &[Report], args: &Args) -> String {
    let mut t = format!(
        "# Fault-injection results\n\n`chaos --duration {} --rate {} --conversations {} --burst {}` on {} cores; \
         3 Kafka brokers (RF 3, min.insync.replicas 2), 2 Postgres servers, 2 gateways, 2 multiplexers. \
         `order violations`: what a recipient was shown out of seq order or with a gap; \
         `sender order`: messages stored with a lower seq than one their sender sent before them; \
         `index`: user index rows that break its invariant or run ahead of the shards (`db-writer check-index`).\n\n\
         | scenario | result | messages | unanswered | lost | dup shown | dup on wire | order violations | sender order | phantoms | seq gaps | resurrected | index | recovery (s) | note |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        args.duration,
        args.rate,
        args.conversations,
        args.burst,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    for r in reports {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |\n",
            r.scenario,
            if r.passed() { "pass" } else { "FAIL" },
            r.messages,
            r.unanswered,
            r.lost_text(),
            r.duplicates_shown,
            r.duplicates_wire,
            r.order_violations,
            r.sender_order_violations,
            r.phantoms,
            r.seq_violations,
            r.resurrected,
            r.index_violations,
            r.recovery_secs,
            r.note
        ));
    }
    t
}

/// Runs `db-writer replay` from the beginning of the slice's inbound; returns its summary line.
async fn replay_inbound(args: &Args, env: &[(String, String)]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(args.bin_dir.join("db-writer"))
        .args(["replay", "--from", "beginning", "--quiet"])
        .envs(env.iter().cloned())
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// SIGKILLs `mux` and restarts it 2 s later, 3 times over the middle third of `total`.
async fn kill_three_times(mux: &mut Proc, total: Duration) -> anyhow::Result<()> {
    let gap = (total / 3) / 4;
    for _ in 0..3 {
        mux.kill().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        mux.start().await?;
        tokio::time::sleep(gap).await;
    }
    Ok(())
}

/// Bad records of each kind per poison-record run.
const POISON_PER_KIND: usize = 4;

/// The poison-record scenario's bad records: each kind in turn, each in a different conversation
/// of the workload (spread over them, hence over the partitions of `inbound`).
fn poison_records(run_id: &str, conversations: usize) -> anyhow::Result<Vec<poison::BadRecord>> {
    let n = poison::KINDS.len() * POISON_PER_KIND;
    (0..n)
        .map(|j| {
            let i = j * conversations / n;
            let sender = chat_common::ids::UserId::parse(&format!("{run_id}{i}a"))?;
            let recipient = chat_common::ids::UserId::parse(&format!("{run_id}{i}b"))?;
            let kind = poison::KINDS[j % poison::KINDS.len()];
            Ok(poison::bad_record(
                kind,
                j / poison::KINDS.len(),
                &sender,
                &recipient,
            ))
        })
        .collect()
}

/// Which broker (node number 1..3) leads partition 0 of `topic`.
fn leader_of(topic: &str) -> anyhow::Result<i32> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", stack::CLUSTER)
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let p = md
        .topics()
        .first()
        .and_then(|t| t.partitions().first())
        .context("no partition 0")?;
    Ok(p.leader())
}

async fn run(scenario: &str, args: &Args) -> anyhow::Result<Report> {
    let slice = Slice::create(scenario).await?;
    let retention = if scenario == "replay-delete-on-ack" {
        "delete-on-ack"
    } else {
        "keep"
    };
    let via_proxy = scenario == "cut-postgres-link";
    let proxy = if via_proxy {
        Some(
            proxy::Proxy::start(
                format!("127.0.0.1:{}", stack::PG2_PROXY_PORT).parse()?,
                format!("127.0.0.1:{}", stack::PG[1].1).parse()?,
            )
            .await?,
        )
    } else {
        None
    };
    let env = base_env(&slice, via_proxy, retention);
    let mut gateways: Vec<Proc> = GATEWAYS
        .iter()
        .map(|(id, port)| {
            let mut e = env.clone();
            e.push(("GATEWAY_ID".into(), (*id).into()));
            e.push(("GATEWAY_ADDR".into(), format!("127.0.0.1:{port}")));
            e.push((
                "GATEWAY_METRICS_ADDR".into(),
                stack::gateway_metrics_addr(*port),
            ));
            let log = args.log_dir.join(format!("{scenario}-{id}.log"));
            Proc::new(id, args.bin_dir.join("gateway"), *port, e, log)
        })
        .collect();
    let mut muxes: Vec<Proc> = MULTIPLEXER_PORTS
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let mut e = env.clone();
            e.push(("MULTIPLEXER_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
            let name = format!("mux{}", i + 1);
            let log = args.log_dir.join(format!("{scenario}-{name}.log"));
            Proc::new(&name, args.bin_dir.join("multiplexer"), *port, e, log)
        })
        .collect();
    for p in gateways.iter_mut().chain(muxes.iter_mut()) {
        p.start().await?;
    }
    let urls: Vec<String> = GATEWAYS
        .iter()
        .map(|(_, port)| format!("ws://127.0.0.1:{port}"))
        .collect();
    let run_id = format!("{}{}", &scenario[..2], &slice.db[slice.db.len() - 4..]);
    let mut load =
        workload::Workload::start(&urls, args.conversations, args.rate, args.burst, &run_id)
            .await?;
    let started = Instant::now();

    let total = Duration::from_secs(args.duration);
    let fault_at = total / 3;
    tokio::time::sleep(fault_at).await;
    // Poison-record: the bad records produced, and where they landed.
    let mut poisoned = Vec::new();
    // Degraded-readiness: the outage, and what was seen during it.
    let mut outage_seen: Option<(Instant, Instant, degraded::DegradedCounts)> = None;
    let (heal, mut note) = match scenario {
        "kill-broker" => {
            let leader = leader_of(&slice.topics.inbound())?;
            let note = format!("broker {leader} (leader of inbound-0) killed for 15 s");
            stack::script(&["kafka.sh", "kill-node", &leader.to_string(), "--cluster"]).await?;
            tokio::time::sleep(Duration::from_secs(15)).await;
            stack::script(&["kafka.sh", "start-node", &leader.to_string(), "--cluster"]).await?;
            (Instant::now(), note)
        }
        "kill-multiplexer" => {
            kill_three_times(&mut muxes[0], total).await?;
            (Instant::now(), "mux1 SIGKILLed 3 times".into())
        }
        "poison-record" => {
            let records = poison_records(&run_id, args.conversations)?;
            let (kafka, inbound) = (slice.kafka.clone(), slice.topics.inbound());
            let producing =
                tokio::spawn(
                    async move { poison::produce(&kafka, &inbound, records, total / 3).await },
                );
            kill_three_times(&mut muxes[0], total).await?;
            poisoned = producing.await??;
            (Instant::now(), "mux1 SIGKILLed 3 times".into())
        }
        "stop-multiplexer" => {
            muxes[0].pause()?;
            tokio::time::sleep(Duration::from_secs(20)).await; // past max.poll.interval (15 s)
            muxes[0].resume()?;
            (
                Instant::now(),
                "mux1 SIGSTOPped 20 s (max.poll.interval 15 s)".into(),
            )
        }
        "kill-gateway" => {
            gateways[0].kill().await?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            gateways[0].start().await?;
            (
                Instant::now(),
                "cg1 SIGKILLed; its users reconnect to cg2".into(),
            )
        }
        "stop-postgres" => {
            let (name, port) = stack::PG[1];
            stack::script(&[
                "postgres.sh",
                "stop",
                "--name",
                name,
                "--port",
                &port.to_string(),
            ])
            .await?;
            tokio::time::sleep(Duration::from_secs(30)).await;
            stack::script(&[
                "postgres.sh",
                "start",
                "--name",
                name,
                "--port",
                &port.to_string(),
            ])
            .await?;
            (Instant::now(), "shard 1's server stopped 30 s".into())
        }
        "degraded-readiness" => {
            let (name, port) = stack::PG[1];
            let down = degraded::placed_on(&run_id, args.conversations, 2, 1, false)?;
            let healthy = degraded::placed_on(&run_id, args.conversations, 2, 0, true)?;
            let (first_healthy, first_down) = match (healthy.first(), down.first()) {
                (Some(h), Some(d)) => (*h, *d),
                _ => anyhow::bail!("no conversation wholly on shard 0, or none on shard 1"),
            };
            let (stop_polling, stopped) = tokio::sync::watch::channel(false);
            let addrs = GATEWAYS
                .iter()
                .map(|(_, p)| stack::gateway_metrics_addr(*p))
                .collect();
            let polling = tokio::spawn(degraded::poll_readiness(addrs, stopped));
            let port_arg = port.to_string();
            stack::script(&["postgres.sh", "stop", "--name", name, "--port", &port_arg]).await?;
            let outage = Instant::now();
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (history, history_ok) =
                degraded::probe_history(GATEWAYS[0].1, &run_id, first_healthy, first_down).await?;
            tokio::time::sleep(Duration::from_secs(25)).await;
            let _ = stop_polling.send(true);
            let (polls, not_ready, not_ready_example) = polling.await?;
            stack::script(&["postgres.sh", "start", "--name", name, "--port", &port_arg]).await?;
            let heal = Instant::now();
            let counts = degraded::DegradedCounts {
                polls,
                not_ready,
                not_ready_example,
                history,
                history_ok,
                ..Default::default()
            };
            outage_seen = Some((outage, heal, counts));
            (heal, "shard 1's server stopped 30 s".into())
        }
        "cut-postgres-link" => {
            let p = proxy.as_ref().context("proxy")?;
            p.cut();
            tokio::time::sleep(Duration::from_secs(15)).await;
            p.restore();
            (Instant::now(), "link to shard 1 cut 15 s".into())
        }
        "replay-delete-on-ack" => {
            let summary = replay_inbound(args, &env).await?;
            (
                Instant::now(),
                summary.chars().take(120).collect::<String>(),
            )
        }
        other => anyhow::bail!("unknown scenario {other}"),
    };
    let left = total.saturating_sub(started.elapsed());
    tokio::time::sleep(left.max(Duration::from_secs(5))).await;
    load.stop_sending();
    let settled = load.settle(Duration::from_secs(60)).await;
    if scenario == "replay-delete-on-ack" {
        // A second replay after everything was acked: nothing erased may come back.
        replay_inbound(args, &env).await?;
    }
    let log = load.finish().await;
    let mut report = {
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = check::check(scenario, &log, heal);
        if let Some((outage, healed, mut counts)) = outage_seen.take() {
            let healthy = degraded::placed_on(&run_id, args.conversations, 2, 0, true)?;
            degraded::healthy_delivery(&log, &healthy, outage, healed, &mut counts);
            note = format!("{note}; {}", counts.note());
            report.degraded = Some(counts);
        }
        report
    };
    if scenario == "poison-record" {
        let mut counts = poison::read_dead_letters(
            &slice.kafka,
            &slice.topics.inbound_dlq(),
            &slice.topics.inbound(),
            &poisoned,
            Duration::from_secs(30),
        )
        .await?;
        let mut texts = Vec::new();
        for m in &muxes {
            let rest = chat_client::Rest::new(&format!("http://127.0.0.1:{}", m.port));
            if let Ok(r) = rest.request("GET", "/metrics", None, None).await {
                texts.push(r.body.as_str().unwrap_or_default().to_owned());
            }
        }
        counts.metric = poison::dead_letter_metric(texts.iter().map(String::as_str));
        note = format!("{note}; {}", counts.note());
        report.poison = Some(counts);
    }
    // Delete-on-ack: no body as text on any disk of the stack, every copy was sealed. Keep
    // mode is the scan's control: its bodies are on disk as text, and a scan that finds none
    // cannot see the disks.
    let marker = canary::marker(&run_id);
    let scan = canary::scan(&marker).await?;
    note = format!("{note}; {}", scan.note());
    let logs = canary::scan_dirs(vec![args.log_dir.clone()], &marker).await?;
    note = format!(
        "{note}; {} in the services' logs ({} files)",
        logs.hits, logs.files
    );
    report.bodies_in_logs = logs.hits;
    if retention == "delete-on-ack" {
        report.plaintext_on_disk = scan.hits;
    } else if scan.hits == 0 {
        report.scan_blind = true;
    }
    let (gaps, resurrected) = check::check_shards(&slice.dsns(false)).await?;
    report.seq_violations = gaps;
    report.index_violations = check::check_index(&slice.dsns(false)).await?;
    report.resurrected = if retention == "delete-on-ack" {
        resurrected
    } else {
        0
    };
    if !settled {
        note.push_str("; not all delivered within 60 s of the end");
    }
    report.note = note;
    for p in gateways.iter_mut().chain(muxes.iter_mut()) {
        p.stop().await?;
    }
    slice.drop().await?;
    Ok(report)
}
