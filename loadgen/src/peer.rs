//! A peer in the same run: a websocket server of another project (Centrifugo), measured with this
//! load generator's client beside the gateway (bench/peer.sh).
//!
//! One client for both servers: the same sockets (`ws::connect`, bound to the same source
//! addresses, the same small read buffer), the same tokens (`ws::issuer`: Centrifugo is configured
//! with the gateway's HS256 secret, issuer and audience), the same concurrency, the same open-loop
//! schedule. Only the frames differ: the gateway's protobuf frames, Centrifugo's JSON protocol.
//!
//! - `loadgen peer centrifugo-config` writes Centrifugo's configuration: tokens as the gateway
//!   verifies them, every user subscribed on connect to a personal channel (`personal:#<user>`),
//!   clients allowed to publish into that namespace, no history, no presence, memory engine.
//! - `loadgen peer measure --server gateway|centrifugo` measures one server: N connections opened
//!   with a fixed concurrency and held (connects per second, CPU per connect, the server's RSS
//!   per idle connection), then pairs of users, each message sent by one and pushed to the other
//!   at a fixed rate, open loop (latency from the scheduled send to the push at the recipient).
//! - `loadgen peer report` puts the two measurements side by side: `peer.json` and the Markdown
//!   section `peer.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::report::ms;
use anyhow::Context;
use chat_common::auth::{DEFAULT_AUDIENCE, DEFAULT_ISSUER};
use chat_common::config::DEV_JWT_SECRET;
use chat_proto::v1::{client_frame, server_frame, Ack, ClientFrame, Send};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cpu::{self, CpuUse, Probe, Watch};
use crate::stats::Latency;
use crate::ws;

/// Centrifugo's namespace of personal channels (`personal:#<user>`, subscribed on connect).
const PERSONAL_NAMESPACE: &str = "personal";

/// What `loadgen peer` does.
#[derive(clap::Args, Clone, Debug)]
pub struct PeerArgs {
    #[command(subcommand)]
    command: PeerCommand,
}

#[derive(clap::Subcommand, Clone, Debug)]
enum PeerCommand {
    /// Writes a Centrifugo v6 configuration that accepts the gateway's tokens.
    CentrifugoConfig {
        /// Port to listen on (127.0.0.1).
        #[arg(long)]
        port: u16,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measures one server: connects per second and memory per idle connection, then delivery
    /// latency between pairs of users at a fixed rate.
    Measure(MeasureArgs),
    /// The two measurements side by side: JSON and a Markdown section.
    Report(ReportArgs),
}

/// The server measured, and so the frames spoken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Server {
    /// This project's gateway (`/ws`, protobuf frames; a multiplexer must run for deliveries).
    Gateway,
    /// Centrifugo (`/connection/websocket`, JSON protocol), configured by `centrifugo-config`.
    Centrifugo,
}

#[derive(clap::Args, Clone, Debug)]
struct MeasureArgs {
    #[arg(long, value_enum)]
    server: Server,
    /// Base URL, ws://IP:PORT.
    #[arg(long)]
    url: String,
    /// The server process (for its memory).
    #[arg(long)]
    target_pid: u32,
    /// Idle connections to open and hold.
    #[arg(long, default_value_t = 5_000)]
    conns: usize,
    /// Connections in progress at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value = "127.0.0.2-127.0.0.5")]
    source_ips: String,
    /// Prefix of user ids (unique per run: conversations start empty).
    #[arg(long, default_value = "peer")]
    user_prefix: String,
    /// Wait after the last connect before reading the server's memory.
    #[arg(long, default_value_t = 3.0)]
    settle_seconds: f64,
    /// Users of the latency phase (even: they are paired).
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Messages per second of the latency phase (open loop).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Length of the measured part of the latency phase.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Sent at the same rate before the measured part and not counted (the first messages on a
    /// fresh pipeline open producer connections, conversations and plans).
    #[arg(long, default_value_t = 5.0)]
    warmup_seconds: f64,
    /// Most time to wait after the last send for the last deliveries.
    #[arg(long, default_value_t = 10.0)]
    drain_seconds: f64,
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Processes to measure CPU of (name=pid, name=pid+, name=self).
    #[arg(long = "watch")]
    watches: Vec<Watch>,
    /// What the server is, for the report (e.g. "Centrifugo v6.9.1").
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Clone, Debug)]
struct ReportArgs {
    /// `measure --server gateway` output.
    #[arg(long)]
    gateway: PathBuf,
    /// `measure --server centrifugo` output.
    #[arg(long)]
    centrifugo: PathBuf,
    /// The Centrifugo version measured (for the heading).
    #[arg(long, default_value = "v6.9.1")]
    centrifugo_version: String,
    #[arg(long)]
    out_json: PathBuf,
    #[arg(long)]
    out_md: PathBuf,
}

/// Runs the peer measurement.
pub async fn run(args: PeerArgs) -> anyhow::Result<()> {
    match args.command {
        PeerCommand::CentrifugoConfig { port, out } => {
            let config = centrifugo_config(port);
            std::fs::write(&out, serde_json::to_string_pretty(&config)?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        PeerCommand::Measure(a) => {
            let report = measure(&a).await?;
            crate::write_json(&a.out, &report)?;
        }
        PeerCommand::Report(a) => report(&a)?,
    }
    Ok(())
}

// ---------------------------------------------------------------- Centrifugo's configuration

/// Centrifugo v6's configuration: the gateway's token settings (`JWT_SECRET`, `JWT_ISSUER`,
/// `JWT_AUDIENCE` as `ws::issuer` reads them), a personal channel per user, client-side publish
/// into it, nothing stored (no history, no presence, no join/leave), no usage reports.
fn centrifugo_config(port: u16) -> serde_json::Value {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    serde_json::json!({
        "log": { "level": "error" },
        "http_server": { "address": "127.0.0.1", "port": port },
        "health": { "enabled": true },
        "usage_stats": { "disabled": true },
        "http_api": { "disabled": true },
        "client": {
            "token": {
                "hmac_secret_key": env("JWT_SECRET", DEV_JWT_SECRET),
                "issuer": env("JWT_ISSUER", DEFAULT_ISSUER),
                "audience": env("JWT_AUDIENCE", DEFAULT_AUDIENCE),
            },
            "allowed_origins": ["*"],
            "subscribe_to_user_personal_channel": {
                "enabled": true,
                "personal_channel_namespace": PERSONAL_NAMESPACE,
            },
        },
        "channel": {
            "namespaces": [{
                "name": PERSONAL_NAMESPACE,
                "allow_user_limited_channels": true,
                "allow_publish_for_client": true,
            }],
        },
    })
}

fn personal_channel(user: &str) -> String {
    format!("{PERSONAL_NAMESPACE}:#{user}")
}

// ---------------------------------------------------------------- the two protocols

/// One line of Centrifugo's JSON protocol from the server: a reply (`id` > 0) or a push. An
/// empty object is the server's ping, answered with an empty object.
#[derive(Debug, Default, Deserialize)]
struct CfReply {
    #[serde(default)]
    id: u32,
    error: Option<CfError>,
    connect: Option<CfConnect>,
    publish: Option<serde_json::Value>,
    push: Option<CfPush>,
}

#[derive(Debug, Deserialize)]
struct CfError {
    code: u32,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct CfConnect {
    #[serde(default)]
    subs: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct CfPush {
    #[serde(rename = "pub")]
    publication: Option<CfPublication>,
}

#[derive(Debug, Deserialize)]
struct CfPublication {
    data: Option<Payload>,
}

/// The data of a published message: its index in the run, and the body.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    i: u32,
    #[serde(default)]
    b: String,
}

impl CfReply {
    fn is_ping(&self) -> bool {
        self.id == 0
            && self.error.is_none()
            && self.connect.is_none()
            && self.publish.is_none()
            && self.push.is_none()
    }
}

/// Centrifugo may put several replies in one frame, one JSON object per line.
fn cf_lines(m: &Message) -> Vec<CfReply> {
    let Ok(text) = m.to_text() else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn cf_pong() -> Message {
    Message::text("{}")
}

/// What one server frame meant to the latency phase.
#[derive(Default)]
struct Events {
    /// Indexes of messages pushed to this user.
    delivered: Vec<u32>,
    /// Sends the server confirmed (gateway `accepted`, Centrifugo publish reply).
    confirmed: u64,
    /// Error codes the server answered with.
    errors: Vec<String>,
    /// Frames to write back (gateway acks, Centrifugo pongs).
    replies: Vec<Message>,
}

impl Server {
    /// Opens one user's session: the handshake the protocol defines before live messages flow.
    /// Gateway: upgrade, `welcome`, a manual `sync` answered by `syncDone`. Centrifugo: upgrade,
    /// `connect` with the token, its reply (which carries the personal channel's subscription).
    async fn open(
        self,
        url: &str,
        user: &str,
        token: &str,
        source: Option<IpAddr>,
    ) -> anyhow::Result<ws::Ws> {
        match self {
            Server::Gateway => crate::e2e::open_session(url, token, source).await,
            Server::Centrifugo => {
                let mut socket = ws::connect(url, "/connection/websocket", source).await?;
                let connect =
                    serde_json::json!({"id": 1, "connect": {"token": token, "name": "loadgen"}});
                socket.send(Message::text(connect.to_string())).await?;
                let channel = personal_channel(user);
                loop {
                    let m = tokio::time::timeout(Duration::from_secs(30), socket.next())
                        .await
                        .context("no connect reply within 30 s")?
                        .context("closed during connect")??;
                    if m.is_close() {
                        anyhow::bail!("closed during connect: {m:?}");
                    }
                    for r in cf_lines(&m) {
                        if r.is_ping() {
                            socket.send(cf_pong()).await?;
                        } else if r.id == 1 {
                            if let Some(e) = r.error {
                                anyhow::bail!("connect refused: {} {}", e.code, e.message);
                            }
                            let c = r.connect.context("reply to connect without connect")?;
                            anyhow::ensure!(
                                c.subs.contains_key(&channel),
                                "connected without the personal channel {channel}"
                            );
                            return Ok(socket);
                        }
                    }
                }
            }
        }
    }

    /// The frame that sends message `idx` from this user to `peer`.
    fn send(self, idx: u32, peer: &str, body: &str) -> Message {
        match self {
            Server::Gateway => ws::encode(&ClientFrame {
                kind: Some(client_frame::Kind::Send(Send {
                    client_message_id: format!("p{idx}"),
                    recipient: peer.to_owned(),
                    body: body.to_owned(),
                })),
            }),
            Server::Centrifugo => {
                let publish = serde_json::json!({
                    // Reply ids above the connect's (1).
                    "id": idx + 2,
                    "publish": {
                        "channel": personal_channel(peer),
                        "data": Payload { i: idx, b: body.to_owned() },
                    },
                });
                Message::text(publish.to_string())
            }
        }
    }

    /// Reads one frame of the latency phase. The gateway's recipient acks each message at once
    /// (as a client does once it has shown it); Centrifugo has no acks.
    fn on_message(self, m: &Message, ev: &mut Events) {
        match self {
            Server::Gateway => match ws::decode(m).and_then(|f| f.kind) {
                Some(server_frame::Kind::Deliver(d)) => {
                    let Some(msg) = d.message else { return };
                    if let Some(i) = parse_cid(&msg.client_message_id) {
                        ev.delivered.push(i);
                    }
                    ev.replies.push(ws::encode(&ClientFrame {
                        kind: Some(client_frame::Kind::Ack(Ack {
                            peer: msg.sender,
                            up_to_seq: msg.seq,
                        })),
                    }));
                }
                Some(server_frame::Kind::Accepted(_)) => ev.confirmed += 1,
                Some(server_frame::Kind::Error(e)) => ev.errors.push(e.code),
                _ => {}
            },
            Server::Centrifugo => {
                for r in cf_lines(m) {
                    if r.is_ping() {
                        ev.replies.push(cf_pong());
                    } else if let Some(e) = r.error {
                        ev.errors.push(format!("{} {}", e.code, e.message));
                    } else if r.publish.is_some() {
                        ev.confirmed += 1;
                    } else if let Some(data) = r.push.and_then(|p| p.publication?.data) {
                        ev.delivered.push(data.i);
                    }
                }
            }
        }
    }

    /// The path a message takes, for the report.
    fn path(self) -> &'static str {
        match self {
            Server::Gateway => {
                "send → accepted once durable in Kafka (acks=all) → multiplexer stores it in a \
                 Postgres shard (seq) → outbound topic → the recipient's gateway pushes it; the \
                 recipient acks each message (another Kafka record and a Postgres update)"
            }
            Server::Centrifugo => {
                "client-side publish over the websocket into the recipient's personal channel \
                 (subscribed on connect), memory engine, no history or presence: the push is an \
                 in-process fan-out, nothing is stored"
            }
        }
    }
}

fn parse_cid(cid: &str) -> Option<u32> {
    cid.strip_prefix('p')?.parse().ok()
}

// ---------------------------------------------------------------- measuring one server

/// One server measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerMeasurement {
    pub server: Server,
    pub label: String,
    pub url: String,
    pub connect: ConnectPhase,
    pub delivery: DeliveryPhase,
}

/// N connections opened with a fixed concurrency, then held idle.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectPhase {
    pub attempted: usize,
    pub established: usize,
    pub failures: BTreeMap<String, u64>,
    pub concurrency: usize,
    pub source_addresses: usize,
    pub seconds: f64,
    pub connects_per_sec: f64,
    /// Each connect, from the TCP connect to the end of the handshake.
    pub connect_latency: Latency,
    pub cpu: CpuUse,
    pub cpu_us_per_connect: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_connection_kib: f64,
    /// Connections still open when the memory was read.
    pub still_open: u64,
}

/// Pairs of users, each message pushed to the other user of its pair, open loop.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DeliveryPhase {
    pub users: usize,
    pub rate: f64,
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub body_bytes: usize,
    /// Messages of the measured part (the counts below are of these).
    pub scheduled: u64,
    pub confirmed: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub errors: BTreeMap<String, u64>,
    /// Latest send behind its scheduled time (a late scheduler is counted in the latency).
    pub scheduler_late_max_ms: f64,
    /// From the scheduled send to the push at the recipient.
    pub deliver_latency: Latency,
    /// The p99 of each second of the measured part (by scheduled send time).
    pub per_second_p99_ms: Vec<f64>,
    pub cpu: CpuUse,
    pub cpu_us_per_message: f64,
    pub path: String,
}

async fn measure(a: &MeasureArgs) -> anyhow::Result<PeerMeasurement> {
    anyhow::ensure!(
        a.users >= 2 && a.users.is_multiple_of(2),
        "--users must be even"
    );
    let sources = ws::parse_ips(&a.source_ips)?;
    let connect = connect_phase(a, &sources).await?;
    let delivery = delivery_phase(a, &sources).await?;
    Ok(PeerMeasurement {
        server: a.server,
        label: a.label.clone(),
        url: a.url.clone(),
        connect,
        delivery,
    })
}

fn source_for(sources: &[IpAddr], i: usize) -> Option<IpAddr> {
    (!sources.is_empty()).then(|| sources[i % sources.len()])
}

/// Reads a socket until it closes or `stop`, answering Centrifugo's pings (tungstenite answers
/// websocket pings while reading); counts it in `open` meanwhile.
fn hold(server: Server, mut socket: ws::Ws, stop: CancellationToken, open: Arc<AtomicU64>) {
    open.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = socket.close(None).await;
                    break;
                }
                m = socket.next() => match m {
                    Some(Ok(m)) if m.is_close() => break,
                    Some(Ok(m)) => {
                        if server == Server::Centrifugo
                            && cf_lines(&m).iter().any(CfReply::is_ping)
                            && socket.send(cf_pong()).await.is_err()
                        {
                            break;
                        }
                    }
                    _ => break,
                },
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
    });
}

async fn connect_phase(a: &MeasureArgs, sources: &[IpAddr]) -> anyhow::Result<ConnectPhase> {
    let issuer = ws::issuer();
    let users: Vec<(String, String)> = (0..a.conns)
        .map(|i| {
            let user = format!("{}h{i}", a.user_prefix);
            let token = ws::token(&issuer, &user)?;
            Ok((user, token))
        })
        .collect::<anyhow::Result<_>>()?;
    let rss_before = cpu::rss_kib(a.target_pid).context("target pid: no /proc entry")?;
    let stop = CancellationToken::new();
    let open = Arc::new(AtomicU64::new(0));
    let bar = crate::progress_bar(a.conns as u64, &format!("{:?} connects", a.server));
    let probe = Probe::start(&a.watches);
    let started = Instant::now();
    let results: Vec<Result<u64, String>> = futures_util::stream::iter(users.iter().enumerate())
        .map(|(i, (user, token))| {
            let (stop, open, bar) = (stop.clone(), open.clone(), bar.clone());
            let source = source_for(sources, i);
            async move {
                let t = Instant::now();
                let r = a.server.open(&a.url, user, token, source).await;
                let us = t.elapsed().as_micros() as u64;
                bar.inc(1);
                match r {
                    Ok(socket) => {
                        hold(a.server, socket, stop, open);
                        Ok(us)
                    }
                    Err(e) => Err(e.to_string().chars().take(80).collect()),
                }
            }
        })
        .buffer_unordered(a.concurrency.max(1))
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_use = probe.stop();
    bar.finish_and_clear();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut connect_us = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(us) => connect_us.push(us),
            Err(e) => *failures.entry(e).or_default() += 1,
        }
    }
    let established = connect_us.len();
    tokio::time::sleep(Duration::from_secs_f64(a.settle_seconds)).await;
    let rss_after = cpu::rss_kib(a.target_pid).unwrap_or(0);
    let still_open = open.load(Ordering::Relaxed);
    let per_conn = rss_after.saturating_sub(rss_before) as f64 / established.max(1) as f64;
    eprintln!(
        "{:?}: {established} of {} connected in {seconds:.1} s ({:.0}/s, {} at a time); RSS {rss_before} -> {rss_after} KiB ({per_conn:.2} KiB per connection); failures {failures:?}",
        a.server,
        a.conns,
        established as f64 / seconds,
        a.concurrency
    );
    // Close them all, and give the server a moment to forget them before the next phase.
    stop.cancel();
    let deadline = Instant::now() + Duration::from_secs(15);
    while open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(ConnectPhase {
        attempted: a.conns,
        established,
        failures,
        concurrency: a.concurrency,
        source_addresses: sources.len().max(1),
        seconds,
        connects_per_sec: established as f64 / seconds.max(1e-9),
        connect_latency: Latency::of_us(&mut connect_us),
        cpu_us_per_connect: cpu_use.total_seconds * 1e6 / established.max(1) as f64,
        cpu: cpu_use,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_kib: per_conn,
        still_open,
    })
}

/// Timestamps of the latency phase, microseconds since `t0` plus one (0: not yet).
struct Schedule {
    t0: Instant,
    rate: f64,
    delivered_at: Vec<AtomicU64>,
    n_delivered: AtomicU64,
    n_confirmed: AtomicU64,
    duplicates: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Schedule {
    fn sched_us(&self, idx: u32) -> u64 {
        (idx as f64 * 1e6 / self.rate) as u64
    }

    fn record(&self, ev: &mut Events) {
        let now = self.t0.elapsed().as_micros() as u64 + 1;
        for i in ev.delivered.drain(..) {
            let Some(slot) = self.delivered_at.get(i as usize) else {
                continue;
            };
            if slot
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.n_delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.n_confirmed.fetch_add(ev.confirmed, Ordering::Relaxed);
        ev.confirmed = 0;
        if !ev.errors.is_empty() {
            let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            for code in ev.errors.drain(..) {
                *e.entry(code).or_default() += 1;
            }
        }
    }
}

/// One user of the latency phase: sends what the scheduler hands it to its peer, reads pushes.
async fn run_user(
    server: Server,
    socket: ws::Ws,
    peer: String,
    body: Arc<String>,
    schedule: Arc<Schedule>,
    mut sends: mpsc::UnboundedReceiver<u32>,
    stop: CancellationToken,
) {
    let (mut sink, mut stream) = socket.split();
    let mut out: Vec<Message> = Vec::new();
    let mut ev = Events::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            i = sends.recv() => {
                let Some(i) = i else { break };
                out.push(server.send(i, &peer, &body));
                while let Ok(i) = sends.try_recv() {
                    out.push(server.send(i, &peer, &body));
                }
            }
            m = stream.next() => {
                let mut next = Some(m);
                while let Some(m) = next {
                    match m {
                        Some(Ok(m)) if m.is_close() => {
                            eprintln!("closed by the server: {m:?}");
                            return;
                        }
                        Some(Ok(m)) => server.on_message(&m, &mut ev),
                        _ => return,
                    }
                    next = stream.next().now_or_never();
                }
                schedule.record(&mut ev);
                out.append(&mut ev.replies);
            }
        }
        if !out.is_empty() {
            for m in out.drain(..) {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    }
    let _ = sink.close().await;
}

async fn delivery_phase(a: &MeasureArgs, sources: &[IpAddr]) -> anyhow::Result<DeliveryPhase> {
    let issuer = ws::issuer();
    let names: Vec<String> = (0..a.users)
        .map(|i| format!("{}l{i}", a.user_prefix))
        .collect();
    let results: Vec<anyhow::Result<ws::Ws>> = futures_util::stream::iter(names.iter().enumerate())
        .map(|(i, user)| {
            let token = ws::token(&issuer, user);
            let source = source_for(sources, i);
            async move { a.server.open(&a.url, user, &token?, source).await }
        })
        .buffered(a.concurrency.max(1))
        .collect()
        .await;
    let sockets: Vec<ws::Ws> = results
        .into_iter()
        .collect::<anyhow::Result<_>>()
        .context("connecting the users of the latency phase")?;
    let warm = (a.rate * a.warmup_seconds).round() as u32;
    let measured = (a.rate * a.seconds).round() as u32;
    let n = warm + measured;
    let schedule = Arc::new(Schedule {
        t0: Instant::now() + Duration::from_millis(500),
        rate: a.rate,
        delivered_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        n_delivered: AtomicU64::new(0),
        n_confirmed: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
    });
    let body = Arc::new("x".repeat(a.body_bytes));
    let stop = CancellationToken::new();
    let mut senders = Vec::with_capacity(a.users);
    let mut tasks = Vec::with_capacity(a.users);
    for (i, socket) in sockets.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        // Users 2k and 2k+1 are a pair.
        let peer = names[i ^ 1].clone();
        tasks.push(tokio::spawn(run_user(
            a.server,
            socket,
            peer,
            body.clone(),
            schedule.clone(),
            rx,
            stop.clone(),
        )));
    }
    let bar = crate::progress_bar(n as u64, &format!("{:?} at {} msg/s", a.server, a.rate));
    let mut probe = None;
    let mut late_max = Duration::ZERO;
    for i in 0..n {
        let due = schedule.t0 + Duration::from_micros(schedule.sched_us(i));
        tokio::time::sleep_until(due.into()).await;
        if i == warm {
            probe = Some(Probe::start(&a.watches));
        }
        late_max = late_max.max(Instant::now().saturating_duration_since(due));
        // Message i from user i mod users, to the other user of its pair.
        let _ = senders[i as usize % a.users].send(i);
        if i % 100 == 0 {
            bar.set_position(i as u64);
        }
    }
    let drain_until = Instant::now() + Duration::from_secs_f64(a.drain_seconds);
    while schedule.n_delivered.load(Ordering::Relaxed) < n as u64 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_use = probe.map(|p| p.stop()).unwrap_or_default();
    bar.finish_and_clear();
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    // The measured part: (scheduled send, latency) of each delivered message.
    let measured_samples: Vec<(u64, u64)> = schedule
        .delivered_at
        .iter()
        .enumerate()
        .skip(warm as usize)
        .filter_map(|(i, at)| {
            let at = at.load(Ordering::Relaxed);
            let sched = schedule.sched_us(i as u32);
            (at > 0).then(|| (sched, (at - 1).saturating_sub(sched)))
        })
        .collect();
    let delivered = measured_samples.len() as u64;
    let warm_us = schedule.sched_us(warm);
    let mut per_second: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (sched, us) in &measured_samples {
        per_second
            .entry((sched - warm_us) / 1_000_000)
            .or_default()
            .push(*us);
    }
    let per_second_p99_ms = per_second
        .into_values()
        .map(|mut v| Latency::of_us(&mut v).p99_ms)
        .collect();
    let mut samples: Vec<u64> = measured_samples.into_iter().map(|(_, us)| us).collect();
    let latency = Latency::of_us(&mut samples);
    let errors = schedule
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    eprintln!(
        "{:?}: {delivered} of {measured} delivered at {} msg/s (after {warm} not counted); p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; errors {errors:?}",
        a.server, a.rate, latency.p50_ms, latency.p99_ms, latency.p999_ms
    );
    Ok(DeliveryPhase {
        users: a.users,
        rate: a.rate,
        seconds: a.seconds,
        warmup_seconds: a.warmup_seconds,
        body_bytes: a.body_bytes,
        scheduled: measured as u64,
        confirmed: schedule.n_confirmed.load(Ordering::Relaxed),
        delivered,
        duplicates: schedule.duplicates.load(Ordering::Relaxed),
        lost: measured as u64 - delivered,
        errors,
        scheduler_late_max_ms: late_max.as_secs_f64() * 1e3,
        deliver_latency: latency,
        per_second_p99_ms,
        cpu_us_per_message: cpu_use.total_seconds * 1e6 / (measured as f64).max(1.0),
        cpu: cpu_use,
        path: a.server.path().to_owned(),
    })
}

// ---------------------------------------------------------------- the report

/// Both measurements and their ratios (gateway / Centrifugo).
#[derive(Debug, Serialize)]
struct PeerReport {
    centrifugo_version: String,
    gateway: Option<PeerMeasurement>,
    centrifugo: Option<PeerMeasurement>,
    ratios: Option<Ratios>,
}

#[derive(Debug, Serialize)]
struct Ratios {
    memory_per_connection: f64,
    connects_per_sec: f64,
    deliver_p50: f64,
    deliver_p99: f64,
    deliver_p999: f64,
    cpu_per_message: f64,
}

fn read_measurement(path: &Path) -> Option<PeerMeasurement> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            None
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn report(a: &ReportArgs) -> anyhow::Result<()> {
    let gateway = read_measurement(&a.gateway);
    let centrifugo = read_measurement(&a.centrifugo);
    let ratios = match (&gateway, &centrifugo) {
        (Some(g), Some(c)) => Some(Ratios {
            memory_per_connection: ratio(
                g.connect.rss_per_connection_kib,
                c.connect.rss_per_connection_kib,
            ),
            connects_per_sec: ratio(g.connect.connects_per_sec, c.connect.connects_per_sec),
            deliver_p50: ratio(
                g.delivery.deliver_latency.p50_ms,
                c.delivery.deliver_latency.p50_ms,
            ),
            deliver_p99: ratio(
                g.delivery.deliver_latency.p99_ms,
                c.delivery.deliver_latency.p99_ms,
            ),
            deliver_p999: ratio(
                g.delivery.deliver_latency.p999_ms,
                c.delivery.deliver_latency.p999_ms,
            ),
            cpu_per_message: ratio(g.delivery.cpu_us_per_message, c.delivery.cpu_us_per_message),
        }),
        _ => None,
    };
    let r = PeerReport {
        centrifugo_version: a.centrifugo_version.clone(),
        gateway,
        centrifugo,
        ratios,
    };
    crate::write_json(&a.out_json, &r)?;
    std::fs::write(&a.out_md, markdown(&r)?)
        .with_context(|| format!("writing {}", a.out_md.display()))?;
    eprintln!("wrote {}", a.out_md.display());
    Ok(())
}

/// 12345.6 -> "12,346".
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn times(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 10.0 {
        format!("{v:.0}×")
    } else if v >= 1.0 {
        format!("{v:.1}×")
    } else {
        format!("{v:.2}×")
    }
}

fn cpu_split(cpu: &CpuUse, per: f64) -> String {
    cpu.seconds
        .iter()
        .map(|(k, v)| format!("{k} {:.0}", v * 1e6 / per.max(1.0)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn row(o: &mut String, name: &str, m: &PeerMeasurement) -> std::fmt::Result {
    let c = &m.connect;
    let d = &m.delivery;
    let failed = c.attempted - c.established;
    writeln!(
        o,
        "| {name} | **{:.2} KiB** ({} held{}; RSS {:.1} → {:.1} MiB) | **{}** ({} at a time; each p50 {} / p99 {} ms) | **{} / {} / {} ms** ({} of {} delivered{}) |",
        c.rss_per_connection_kib,
        thousands(c.established as f64),
        if failed > 0 { format!(", {failed} failed") } else { String::new() },
        c.rss_before_kib as f64 / 1024.0,
        c.rss_after_kib as f64 / 1024.0,
        thousands(c.connects_per_sec),
        c.concurrency,
        ms(c.connect_latency.p50_ms),
        ms(c.connect_latency.p99_ms),
        ms(d.deliver_latency.p50_ms),
        ms(d.deliver_latency.p99_ms),
        ms(d.deliver_latency.p999_ms),
        thousands(d.delivered as f64),
        thousands(d.scheduled as f64),
        if d.errors.is_empty() {
            String::new()
        } else {
            format!("; errors {:?}", d.errors)
        },
    )
}

fn markdown(r: &PeerReport) -> anyhow::Result<String> {
    let mut o = String::new();
    let v = &r.centrifugo_version;
    writeln!(o, "\n### 7. A peer in the same run: Centrifugo {v}\n")?;
    let (Some(g), Some(c)) = (&r.gateway, &r.centrifugo) else {
        writeln!(
            o,
            "Not measured: {} (see the peer stage's logs).",
            match (&r.gateway, &r.centrifugo) {
                (None, None) => "neither server",
                (None, _) => "the gateway",
                _ => "Centrifugo",
            }
        )?;
        return Ok(o);
    };
    let (gc, gd) = (&g.connect, &g.delivery);
    writeln!(
        o,
        "The same client for both (`loadgen peer measure`: tokio-tungstenite, the same tokens, \
         sockets from {} source addresses), one server at a time: {} connections opened {} at a \
         time and held idle (RSS of the server process before and after), then {} users in pairs, \
         each message sent by one and pushed to the other, {} msg/s open loop for {:.0} s after \
         {:.0} s of warm-up, {}-byte bodies (latency from the scheduled send to the push at the \
         recipient). Frames: the gateway's protobuf, Centrifugo's JSON protocol.\n",
        gc.source_addresses,
        thousands(gc.attempted as f64),
        gc.concurrency,
        gd.users,
        thousands(gd.rate),
        gd.seconds,
        gd.warmup_seconds,
        gd.body_bytes,
    )?;
    writeln!(
        o,
        "| server | memory per idle connection | connects/s | delivered p50 / p99 / p99.9 at {} msg/s |",
        thousands(gd.rate)
    )?;
    writeln!(o, "|---|---|---|---|")?;
    row(&mut o, "gateway (+ multiplexer, Kafka, Postgres)", g)?;
    row(&mut o, &format!("Centrifugo {v} (memory engine)"), c)?;
    if let Some(x) = &r.ratios {
        writeln!(
            o,
            "| gateway / Centrifugo | {} | {} | {} / {} / {} |",
            times(x.memory_per_connection),
            times(x.connects_per_sec),
            times(x.deliver_p50),
            times(x.deliver_p99),
            times(x.deliver_p999),
        )?;
    }
    let (cc, cd) = (&c.connect, &c.delivery);
    writeln!(
        o,
        "\nCPU per connect: gateway path {:.0} µs ({}), Centrifugo {:.0} µs ({}). CPU per message \
         at {} msg/s: gateway path {:.0} µs ({}), Centrifugo {:.0} µs ({}).\n",
        gc.cpu_us_per_connect,
        cpu_split(&gc.cpu, gc.established as f64),
        cc.cpu_us_per_connect,
        cpu_split(&cc.cpu, cc.established as f64),
        thousands(gd.rate),
        gd.cpu_us_per_message,
        cpu_split(&gd.cpu, gd.scheduled as f64),
        cd.cpu_us_per_message,
        cpu_split(&cd.cpu, cd.scheduled as f64),
    )?;
    writeln!(
        o,
        "- Gateway: a connect is the upgrade, `welcome`, a `sync` and `syncDone` (the user's \
         presence goes to Kafka); a message: {}.",
        gd.path
    )?;
    writeln!(
        o,
        "- Centrifugo: a connect is the upgrade, `connect` with the token and its reply (with \
         the personal channel's subscription); a message: {}. No Kafka or Postgres, so it is the \
         floor of the websocket layer: the gateway's latency above it is what durability \
         (Kafka, Postgres) and the ack cost.",
        cd.path
    )?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centrifugo_lines_ping_reply_and_push() {
        let m = Message::text(
            "{}\n{\"id\":7,\"publish\":{}}\n{\"push\":{\"channel\":\"personal:#b\",\"pub\":{\"data\":{\"i\":42,\"b\":\"x\"}}}}",
        );
        let mut ev = Events::default();
        Server::Centrifugo.on_message(&m, &mut ev);
        assert_eq!(ev.delivered, vec![42]);
        assert_eq!(ev.confirmed, 1);
        assert_eq!(ev.replies.len(), 1, "the ping is answered");
    }

    #[test]
    fn centrifugo_publish_goes_to_the_peers_personal_channel() {
        let m = Server::Centrifugo.send(5, "bob", "hi");
        let text = m.to_text().expect("a text frame");
        let v: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(v["id"], 7);
        assert_eq!(v["publish"]["channel"], "personal:#bob");
        assert_eq!(v["publish"]["data"]["i"], 5);
    }

    #[test]
    fn thousands_and_ratios() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(times(0.0523), "0.05×");
        assert_eq!(times(ratio(1.0, 0.0)), "–");
    }
}
