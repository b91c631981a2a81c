//! Baselines: each stage alone on the same machine, with the pipeline's settings.
//!
//! - Kafka: the pipeline's producer and consumer factories (`acks=all`, idempotence, the
//!   gateways' linger of `KAFKA_LINGER_MS`, 10 ms by default, lz4, read_committed), records of
//!   the pipeline's inbound size on a 12-partition topic.
//! - Postgres: the db-writer's own batched insert (`Shards::store_batch`) and ack update
//!   (`Shards::ack_on_shard`) into migrated shards, and a batched variant of the ack update.
//! - Websocket: a trivial tokio-tungstenite echo server and client.
//! - TCP: a tokio server that accepts and holds sockets (memory per connection).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_common::kafka::KafkaConfig;
use chat_common::message::Ack;
use chat_proto::v1::{client_frame, inbound_record, ChatMessage, ClientFrame, InboundRecord, Send};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use prost::Message as _;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message as _;
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

use crate::cpu::{self, CpuUse, Probe, Watch};
use crate::stats::Latency;

/// Throughput of a stage run flat out.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    pub records: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
    pub cpu: CpuUse,
    pub cpu_seconds_per_record: f64,
}

impl Throughput {
    fn of(records: u64, seconds: f64, cpu: CpuUse) -> Self {
        Self {
            records,
            seconds,
            records_per_sec: records as f64 / seconds.max(1e-9),
            cpu_seconds_per_record: cpu.total_seconds / records.max(1) as f64,
            cpu,
        }
    }
}

/// Latency of a stage under open-loop load at a fixed rate.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpenLoop {
    pub rate: f64,
    pub seconds: f64,
    pub sent: u64,
    pub completed: u64,
    pub latency: Latency,
    pub cpu: CpuUse,
    pub cpu_seconds_per_record: f64,
}

fn conversation_users(prefix: &str, pairs: usize, i: usize) -> (String, String) {
    let p = i % pairs;
    let (a, b) = (
        format!("{prefix}u{}", 2 * p),
        format!("{prefix}u{}", 2 * p + 1),
    );
    if (i / pairs) & 1 == 0 {
        (a, b)
    } else {
        (b, a)
    }
}

fn conv_key(a: &str, b: &str) -> String {
    if a < b {
        format!("{a}:{b}")
    } else {
        format!("{b}:{a}")
    }
}

/// An inbound record as the gateway writes it.
pub fn inbound_record(
    prefix: &str,
    pairs: usize,
    i: usize,
    body: &str,
    cid: String,
) -> (String, Vec<u8>) {
    let (from, to) = conversation_users(prefix, pairs, i);
    let conversation = conv_key(&from, &to);
    let rec = InboundRecord {
        kind: Some(inbound_record::Kind::Message(ChatMessage {
            sealed_body: Vec::new(),
            message_id: uuid::Uuid::new_v4().to_string(),
            client_message_id: cid,
            sender: from,
            recipient: to,
            body: body.to_owned(),
            sent_at_ms: chat_common::now_ms(),
            seq: 0,
            conversation: conversation.clone(),
        })),
        gateway_id: "lgw1".into(),
    };
    (conversation, rec.encode_to_vec())
}

/// The size of a websocket Send frame with this body (what a client writes per message).
pub fn send_frame_bytes(body_bytes: usize) -> usize {
    ClientFrame {
        kind: Some(client_frame::Kind::Send(Send {
            client_message_id: "t12-1234567".into(),
            recipient: "bench1234567u123".into(),
            body: "x".repeat(body_bytes),
        })),
    }
    .encoded_len()
}

#[derive(Clone, Debug)]
pub struct KafkaArgs {
    pub brokers: String,
    pub topic: String,
    /// A presence topic to time `PresenceView::catch_up` on (the multiplexer does it per batch).
    pub presence_topic: Option<String>,
    pub group: String,
    pub records: u64,
    pub rate: f64,
    pub seconds: f64,
    pub body_bytes: usize,
    pub pairs: usize,
    pub watches: Vec<Watch>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KafkaReport {
    pub topic: String,
    /// The producer's `linger.ms` (the gateways' default unless `KAFKA_LINGER_MS` set another);
    /// `None` in a report from before it was recorded.
    #[serde(default)]
    pub linger_ms: Option<u64>,
    pub partitions: usize,
    pub record_bytes: usize,
    pub settings: String,
    /// Produce flat out and consume concurrently: records/s until the last one is consumed.
    pub throughput: Throughput,
    /// Open loop: produce at the rate; latency from scheduled send to consumed.
    pub latency: OpenLoop,
    /// Open loop: latency from scheduled send to the delivery report (acks=all).
    pub produce_ack_latency: Latency,
    /// `PresenceView::catch_up` (the end offsets of every presence partition, in one request),
    /// which the multiplexer awaits once per batch.
    pub presence_catch_up: Option<Latency>,
    /// The same watermark queries from a client with no fetch in flight (what catch-up costs
    /// when its queries do not queue behind the reader's long-poll fetches).
    pub watermarks_idle_client: Option<Latency>,
}

pub async fn raw_kafka(a: KafkaArgs) -> anyhow::Result<KafkaReport> {
    // The pipeline's settings, including any KAFKA_*_OPTS tuning it runs with.
    let cfg = KafkaConfig::new(&a.brokers).with_env_opts()?;
    let producer = cfg.producer()?;
    let consumer = Arc::new(cfg.consumer(&a.group)?);
    consumer.subscribe(&[&a.topic])?;
    let body = "x".repeat(a.body_bytes);
    let prefix = "rawk123456";
    let n1 = a.records;
    let n2 = (a.rate * a.seconds).round() as u64;
    let t0 = Instant::now();
    let recv_at: Arc<Vec<AtomicU32>> = Arc::new((0..n2).map(|_| AtomicU32::new(0)).collect());
    let phase1 = Arc::new(AtomicU64::new(0));
    let phase2 = Arc::new(AtomicU64::new(0));
    let consumer_task = {
        let (consumer, recv_at, phase1, phase2) = (
            consumer.clone(),
            recv_at.clone(),
            phase1.clone(),
            phase2.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let Some(Ok(rec)) = m.payload().map(InboundRecord::decode) else {
                    continue;
                };
                let Some(inbound_record::Kind::Message(msg)) = rec.kind else {
                    continue;
                };
                let Some(idx) = msg
                    .client_message_id
                    .strip_prefix('k')
                    .and_then(|s| s.parse::<u64>().ok())
                else {
                    continue;
                };
                if idx < n1 {
                    phase1.fetch_add(1, Ordering::Relaxed);
                } else if let Some(slot) = recv_at.get((idx - n1) as usize) {
                    let _ = slot.compare_exchange(
                        0,
                        (t0.elapsed().as_micros() as u64 + 1) as u32,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    phase2.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Wait for the group to assign every partition.
    let deadline = Instant::now() + Duration::from_secs(60);
    let partitions = loop {
        let n = consumer.assignment().map(|t| t.count()).unwrap_or(0);
        let md = consumer.fetch_metadata(Some(&a.topic), Duration::from_secs(5))?;
        let total = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if n > 0 && n == total {
            break total;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "consumer got no assignment within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let record_bytes = inbound_record(prefix, a.pairs, 0, &body, "k0".into())
        .1
        .len();

    // Phase 1: flat out.
    let bar = crate::progress_bar(n1, "raw kafka: produce+consume flat out");
    let probe = Probe::start(&a.watches);
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut failed = 0u64;
    for i in 0..n1 {
        let (key, payload) = inbound_record(prefix, a.pairs, i as usize, &body, format!("k{i}"));
        loop {
            match producer.send_result(FutureRecord::to(&a.topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    inflight.push(f);
                    break;
                }
                Err((_e, _)) => {
                    // Queue full: wait for some delivery reports.
                    match inflight.next().await {
                        Some(Ok(Ok(_))) => {}
                        Some(_) => failed += 1,
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            }
        }
        while inflight.len() > 100_000 {
            if !matches!(inflight.next().await, Some(Ok(Ok(_)))) {
                failed += 1;
            }
        }
        if i % 1000 == 0 {
            bar.set_position(phase1.load(Ordering::Relaxed));
            // Let the consumer task run on a busy runtime.
            tokio::task::yield_now().await;
        }
    }
    while let Some(r) = inflight.next().await {
        if !matches!(r, Ok(Ok(_))) {
            failed += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while phase1.load(Ordering::Relaxed) < n1 - failed && Instant::now() < deadline {
        bar.set_position(phase1.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let throughput = Throughput::of(phase1.load(Ordering::Relaxed), secs, probe.stop());
    bar.finish_and_clear();
    eprintln!(
        "raw kafka flat out: {:.0} records/s, {:.1} us CPU per record ({} failed)",
        throughput.records_per_sec,
        throughput.cpu_seconds_per_record * 1e6,
        failed
    );

    // Phase 2: open loop at the rate.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bar = crate::progress_bar(n2, "raw kafka: open loop");
    let base_us = t0.elapsed().as_micros() as u64 + 10_000;
    let sched = |j: u64| base_us + (j as f64 * 1e6 / a.rate) as u64;
    let ack_at: Vec<AtomicU32> = (0..n2).map(|_| AtomicU32::new(0)).collect();
    let probe = Probe::start(&a.watches);
    let mut sent = 0u64;
    let mut inflight = FuturesUnordered::new();
    while sent < n2 {
        let now = t0.elapsed().as_micros() as u64;
        while sent < n2 && sched(sent) <= now {
            let i = n1 + sent;
            let (key, payload) =
                inbound_record(prefix, a.pairs, i as usize, &body, format!("k{i}"));
            if let Ok(f) =
                producer.send_result(FutureRecord::to(&a.topic).key(&key).payload(&payload))
            {
                let j = sent;
                inflight.push(f.map(move |r| (j, r)));
            }
            sent += 1;
        }
        bar.set_position(sent);
        let sleep = tokio::time::sleep(Duration::from_millis(1));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                Some((j, r)) = inflight.next(), if !inflight.is_empty() => {
                    if matches!(r, Ok(Ok(_))) {
                        ack_at[j as usize].store((t0.elapsed().as_micros() as u64 + 1) as u32, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    while let Some((j, r)) = inflight.next().await {
        if matches!(r, Ok(Ok(_))) {
            ack_at[j as usize].store(
                (t0.elapsed().as_micros() as u64 + 1) as u32,
                Ordering::Relaxed,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while phase2.load(Ordering::Relaxed) < n2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = probe.stop();
    bar.finish_and_clear();
    consumer_task.abort();
    let mut e2e: Vec<u64> = Vec::new();
    let mut acks: Vec<u64> = Vec::new();
    for j in 0..n2 {
        let r = recv_at[j as usize].load(Ordering::Relaxed);
        if r > 0 {
            e2e.push((r as u64 - 1).saturating_sub(sched(j)));
        }
        let k = ack_at[j as usize].load(Ordering::Relaxed);
        if k > 0 {
            acks.push((k as u64 - 1).saturating_sub(sched(j)));
        }
    }
    let completed = e2e.len() as u64;
    let latency = OpenLoop {
        rate: a.rate,
        seconds: a.seconds,
        sent: n2,
        completed,
        latency: Latency::of_us(&mut e2e),
        cpu_seconds_per_record: cpu.total_seconds / completed.max(1) as f64,
        cpu,
    };
    eprintln!(
        "raw kafka open loop at {}/s: p50 {:.1} ms p99 {:.1} ms p99.9 {:.1} ms ({} of {} consumed)",
        a.rate,
        latency.latency.p50_ms,
        latency.latency.p99_ms,
        latency.latency.p999_ms,
        completed,
        n2
    );
    let presence_catch_up = match &a.presence_topic {
        Some(topic) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            let view =
                chat_common::presence::PresenceView::start(&cfg, topic, None, shutdown.clone())
                    .await?;
            let mut v = Vec::new();
            for _ in 0..100 {
                let t = Instant::now();
                view.catch_up(Duration::from_secs(2)).await;
                v.push(t.elapsed().as_micros() as u64);
            }
            shutdown.cancel();
            let l = Latency::of_us(&mut v);
            eprintln!(
                "presence catch_up: p50 {:.2} ms p99 {:.2} ms",
                l.p50_ms, l.p99_ms
            );
            Some(l)
        }
        None => None,
    };
    let watermarks_idle_client = match &a.presence_topic {
        Some(topic) => {
            let reader = cfg.reader()?;
            let md = reader.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            let parts: Vec<i32> = md
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let topic = topic.clone();
            let mut v = tokio::task::spawn_blocking(move || {
                (0..100)
                    .map(|_| {
                        let t = Instant::now();
                        for p in &parts {
                            let _ = reader.fetch_watermarks(&topic, *p, Duration::from_secs(2));
                        }
                        t.elapsed().as_micros() as u64
                    })
                    .collect::<Vec<u64>>()
            })
            .await?;
            let l = Latency::of_us(&mut v);
            eprintln!(
                "watermarks from an idle client: p50 {:.2} ms p99 {:.2} ms",
                l.p50_ms, l.p99_ms
            );
            Some(l)
        }
        None => None,
    };
    Ok(KafkaReport {
        presence_catch_up,
        watermarks_idle_client,
        topic: a.topic,
        linger_ms: Some(cfg.linger.as_millis() as u64),
        partitions,
        record_bytes,
        settings: format!(
            "chat_common::kafka::KafkaConfig::producer()/consumer(): acks=all, enable.idempotence, linger.ms={}, lz4, read_committed, fetch.wait.max.ms={}",
            cfg.linger.as_millis(),
            chat_common::kafka::FETCH_WAIT_MAX_MS
        ),
        throughput,
        latency,
        produce_ack_latency: Latency::of_us(&mut acks),
    })
}

#[derive(Clone, Debug)]
pub struct PgArgs {
    pub dsns: Vec<String>,
    pub rows: usize,
    pub batch: usize,
    pub acks_each: usize,
    pub pairs: usize,
    pub body_bytes: usize,
    pub watches: Vec<Watch>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PgReport {
    pub shards: usize,
    pub batch: usize,
    pub conversations: usize,
    /// `Shards::store_batch`: batches in sequence, each one transaction per shard (in parallel).
    pub insert: Throughput,
    pub insert_batch_latency: Latency,
    /// `Shards::ack`: one UPDATE per ack, in sequence (what the multiplexer does per ack record).
    pub ack_each: Throughput,
    pub ack_each_latency: Latency,
    /// The same acks batched as the multiplexer applies them (`Shards::apply_acks`): per batch,
    /// the highest seq per (conversation, recipient), one statement per shard, in parallel.
    pub ack_batched: Throughput,
}

pub async fn raw_pg(a: PgArgs) -> anyhow::Result<PgReport> {
    let config = db_writer::ShardConfig::from_list(&a.dsns.join(","), 8)?;
    let shards = db_writer::Shards::connect(&config)?;
    let body = "x".repeat(a.body_bytes);
    let prefix = "rawp123456";
    let msgs: Vec<chat_common::message::Message> = (0..a.rows)
        .map(|i| {
            let (from, to) = conversation_users(prefix, a.pairs, i);
            Ok(chat_common::message::Message::try_from(ChatMessage {
                sealed_body: Vec::new(),
                message_id: uuid::Uuid::new_v4().to_string(),
                client_message_id: format!("p{i}"),
                conversation: conv_key(&from, &to),
                sender: from,
                recipient: to,
                body: body.clone(),
                sent_at_ms: chat_common::now_ms(),
                seq: 0,
            })?)
        })
        .collect::<anyhow::Result<_>>()?;

    // Insert.
    let bar = crate::progress_bar(a.rows as u64, "raw postgres: batched insert");
    let probe = Probe::start(&a.watches);
    let started = Instant::now();
    let mut stored = Vec::with_capacity(a.rows);
    let mut lat = Vec::new();
    for chunk in msgs.chunks(a.batch) {
        let t = Instant::now();
        stored.extend(shards.store_batch(chunk).await?);
        lat.push(t.elapsed().as_micros() as u64);
        bar.inc(chunk.len() as u64);
    }
    let insert = Throughput::of(a.rows as u64, started.elapsed().as_secs_f64(), probe.stop());
    bar.finish_and_clear();
    eprintln!(
        "raw postgres insert: {:.0} rows/s, {:.1} us CPU per row",
        insert.records_per_sec,
        insert.cpu_seconds_per_record * 1e6
    );

    // Acks, one statement each, in order.
    let n_each = a.acks_each.min(stored.len() / 2);
    let bar = crate::progress_bar(n_each as u64, "raw postgres: ack per record");
    let probe = Probe::start(&a.watches);
    let started = Instant::now();
    let mut ack_lat = Vec::new();
    for s in &stored[..n_each] {
        let m = &s.message;
        let t = Instant::now();
        let ack = Ack {
            user: m.recipient.clone(),
            peer: m.sender.clone(),
            conversation: m.conversation.clone(),
            up_to_seq: m.seq,
            acked_at_ms: chat_common::now_ms(),
        };
        shards
            .apply_acks(std::slice::from_ref(&ack), db_writer::Retention::Keep)
            .await?;
        ack_lat.push(t.elapsed().as_micros() as u64);
        bar.inc(1);
    }
    let ack_each = Throughput::of(n_each as u64, started.elapsed().as_secs_f64(), probe.stop());
    bar.finish_and_clear();
    eprintln!(
        "raw postgres ack per record: {:.0} acks/s, {:.1} us CPU per ack",
        ack_each.records_per_sec,
        ack_each.cpu_seconds_per_record * 1e6
    );

    // Acks batched: each batch through `Shards::apply_acks`, as the multiplexer applies them
    // (the highest seq per conversation and recipient, one statement per shard, in parallel).
    let rest = &stored[n_each..];
    let bar = crate::progress_bar(rest.len() as u64, "raw postgres: ack batched");
    let probe = Probe::start(&a.watches);
    let started = Instant::now();
    for chunk in rest.chunks(a.batch) {
        let now = chat_common::now_ms();
        let acks: Vec<Ack> = chunk
            .iter()
            .map(|s| Ack {
                user: s.message.recipient.clone(),
                peer: s.message.sender.clone(),
                conversation: s.message.conversation.clone(),
                up_to_seq: s.message.seq,
                acked_at_ms: now,
            })
            .collect();
        shards.apply_acks(&acks, db_writer::Retention::Keep).await?;
        bar.inc(chunk.len() as u64);
    }
    let ack_batched = Throughput::of(
        rest.len() as u64,
        started.elapsed().as_secs_f64(),
        probe.stop(),
    );
    bar.finish_and_clear();
    eprintln!(
        "raw postgres ack batched: {:.0} acks/s, {:.1} us CPU per ack",
        ack_batched.records_per_sec,
        ack_batched.cpu_seconds_per_record * 1e6
    );

    Ok(PgReport {
        shards: a.dsns.len(),
        batch: a.batch,
        conversations: a.pairs,
        insert,
        insert_batch_latency: Latency::of_us(&mut lat),
        ack_each,
        ack_each_latency: Latency::of_us(&mut ack_lat),
        ack_batched,
    })
}

/// A websocket echo server (binary and text frames come back as they are).
pub async fn echo_server(addr: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("echo server on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // The gateway's socket settings (gateway/src/upgrade.rs): 256-byte read buffer,
            // frames gathered up to 4 KiB per write.
            let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
            config.read_buffer_size = 256;
            config.write_buffer_size = 4096;
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            let (mut sink, mut source) = ws.split();
            while let Some(Ok(m)) = source.next().await {
                let mut next = Some(m);
                while let Some(m) = next {
                    if m.is_close() {
                        return;
                    }
                    if (m.is_binary() || m.is_text()) && sink.feed(m).await.is_err() {
                        return;
                    }
                    next = match source.next().now_or_never() {
                        Some(Some(Ok(m))) => Some(m),
                        Some(_) => return,
                        None => None,
                    };
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}

#[derive(Clone, Debug)]
pub struct EchoArgs {
    pub url: String,
    pub conns: usize,
    pub source_ips: Vec<IpAddr>,
    pub frame_bytes: usize,
    pub window: usize,
    pub flat_seconds: f64,
    pub rate: f64,
    pub seconds: f64,
    pub watches: Vec<Watch>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EchoReport {
    pub conns: usize,
    pub frame_bytes: usize,
    /// Closed loop, `window` frames in flight per connection: round trips per second.
    pub throughput: Throughput,
    pub window: usize,
    /// Open loop at the rate: latency from scheduled send to the echo.
    pub latency: OpenLoop,
}

pub async fn echo(a: EchoArgs) -> anyhow::Result<EchoReport> {
    let mut sockets = Vec::new();
    for i in 0..a.conns {
        let source = (!a.source_ips.is_empty()).then(|| a.source_ips[i % a.source_ips.len()]);
        sockets.push(crate::ws::connect(&a.url, "/", source).await?);
    }
    let t0 = Instant::now();
    let flat_done = Arc::new(AtomicU64::new(0));
    let flat_until = t0 + Duration::from_secs_f64(a.flat_seconds);
    let n2 = (a.rate * a.seconds).round() as u64;
    let base_us = (a.flat_seconds * 1e6) as u64 + 1_000_000;
    let recv_at: Arc<Vec<AtomicU32>> = Arc::new((0..n2).map(|_| AtomicU32::new(0)).collect());
    let mut senders = Vec::new();
    let probe = Probe::start(&a.watches);
    for ws in sockets {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        senders.push(tx);
        let (done, recv_at) = (flat_done.clone(), recv_at.clone());
        let (window, frame_bytes) = (a.window, a.frame_bytes);
        tokio::spawn(async move {
            let (mut sink, mut source) = ws.split();
            let frame = |tag: u64| {
                let mut v = vec![0u8; frame_bytes.max(8)];
                v[..8].copy_from_slice(&tag.to_le_bytes());
                Message::binary(v)
            };
            // Phase 1: closed loop.
            for _ in 0..window {
                if sink.feed(frame(u64::MAX)).await.is_err() {
                    return;
                }
            }
            let _ = sink.flush().await;
            let mut outstanding = window;
            let mut phase1 = true;
            loop {
                tokio::select! {
                    m = source.next() => {
                        let mut next = Some(m);
                        while let Some(m) = next {
                            let Some(Ok(m)) = m else { return };
                            let data = m.into_data();
                            if data.len() < 8 { break; }
                            let tag = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
                            if tag == u64::MAX {
                                done.fetch_add(1, Ordering::Relaxed);
                                outstanding -= 1;
                                if phase1 && Instant::now() < flat_until {
                                    if sink.feed(frame(u64::MAX)).await.is_err() { return; }
                                    outstanding += 1;
                                } else {
                                    phase1 = false;
                                }
                            } else if let Some(s) = recv_at.get(tag as usize) {
                                s.store((t0.elapsed().as_micros() as u64 + 1) as u32, Ordering::Relaxed);
                            }
                            next = source.next().now_or_never();
                        }
                        if sink.flush().await.is_err() { return; }
                    }
                    c = rx.recv() => {
                        let Some(tag) = c else { return };
                        if sink.feed(frame(tag)).await.is_err() { return; }
                        while let Ok(tag) = rx.try_recv() {
                            if sink.feed(frame(tag)).await.is_err() { return; }
                        }
                        if sink.flush().await.is_err() { return; }
                    }
                }
                let _ = outstanding;
            }
        });
    }
    let bar = crate::progress_bar(
        (a.flat_seconds * 10.0) as u64,
        "raw websocket echo: flat out",
    );
    while Instant::now() < flat_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bar.set_position((t0.elapsed().as_secs_f64() * 10.0) as u64);
    }
    let done = flat_done.load(Ordering::Relaxed);
    let throughput = Throughput::of(done, t0.elapsed().as_secs_f64(), probe.stop());
    bar.finish_and_clear();
    eprintln!(
        "raw websocket echo flat out: {:.0} round trips/s, {:.1} us CPU per round trip",
        throughput.records_per_sec,
        throughput.cpu_seconds_per_record * 1e6
    );
    // Phase 2: open loop.
    while (t0.elapsed().as_micros() as u64) < base_us {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sched = |j: u64| base_us + (j as f64 * 1e6 / a.rate) as u64;
    let bar = crate::progress_bar(n2, "raw websocket echo: open loop");
    let probe = Probe::start(&a.watches);
    let mut sent = 0u64;
    while sent < n2 {
        let now = t0.elapsed().as_micros() as u64;
        while sent < n2 && sched(sent) <= now {
            let _ = senders[(sent as usize) % senders.len()].send(sent);
            sent += 1;
        }
        bar.set_position(sent);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let count = || {
        recv_at
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) > 0)
            .count() as u64
    };
    while count() < n2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = probe.stop();
    bar.finish_and_clear();
    let mut lat: Vec<u64> = (0..n2)
        .filter_map(|j| {
            let r = recv_at[j as usize].load(Ordering::Relaxed);
            (r > 0).then(|| (r as u64 - 1).saturating_sub(sched(j)))
        })
        .collect();
    let completed = lat.len() as u64;
    let latency = OpenLoop {
        rate: a.rate,
        seconds: a.seconds,
        sent: n2,
        completed,
        latency: Latency::of_us(&mut lat),
        cpu_seconds_per_record: cpu.total_seconds / completed.max(1) as f64,
        cpu,
    };
    eprintln!(
        "raw websocket echo open loop at {}/s: p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms",
        a.rate, latency.latency.p50_ms, latency.latency.p99_ms, latency.latency.p999_ms
    );
    Ok(EchoReport {
        conns: a.conns,
        frame_bytes: a.frame_bytes,
        throughput,
        window: a.window,
        latency,
    })
}

/// Accepts TCP connections and holds them (reads until the peer closes).
pub async fn tcp_server(addr: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("tcp hold server on {}", listener.local_addr()?);
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum HoldMode {
    /// Authenticated websockets to a gateway (welcome, manual sync, syncDone).
    Ws,
    /// Plain TCP connections.
    Tcp,
    /// Plain websockets (handshake only; against the echo server).
    WsRaw,
}

#[derive(Clone, Debug)]
pub struct HoldArgs {
    pub url: String,
    pub mode: HoldMode,
    pub conns: usize,
    pub source_ips: Vec<IpAddr>,
    pub concurrency: usize,
    pub target_pid: u32,
    pub settle_seconds: f64,
    pub hold_seconds: f64,
    pub user_prefix: String,
    /// With several holders (one per server process): a directory where each says it has all
    /// its connections open, and how many must have said so before anyone measures. Every
    /// holder past the barrier had all its connections open at the same moment.
    pub barrier: Option<(PathBuf, usize)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HoldReport {
    pub mode: HoldMode,
    pub attempted: usize,
    pub established: usize,
    pub still_open_at_end: u64,
    pub failures: BTreeMap<String, u64>,
    pub source_addresses: usize,
    pub connect_seconds: f64,
    pub target_rss_before_kib: u64,
    pub target_rss_after_kib: u64,
    pub target_rss_end_kib: u64,
    pub rss_per_connection_bytes: f64,
    pub target_fds_open: usize,
    pub target_fd_limit: u64,
    pub fraction_of_fd_limit: f64,
    pub client_fd_limit: u64,
    /// Whether every holder of the barrier had its connections open at once (None: no barrier).
    pub barrier_passed: Option<bool>,
}

pub async fn hold(a: HoldArgs) -> anyhow::Result<HoldReport> {
    let rss_before = cpu::rss_kib(a.target_pid).context("target pid: no /proc entry")?;
    let issuer = crate::ws::issuer();
    let addr = crate::ws::addr_of(&a.url)?;
    let open = Arc::new(AtomicU64::new(0));
    let bar = crate::progress_bar(a.conns as u64, "holding connections");
    let started = Instant::now();
    let results: Vec<Result<(), String>> = futures_util::stream::iter(0..a.conns)
        .map(|i| {
            let source = (!a.source_ips.is_empty()).then(|| a.source_ips[i % a.source_ips.len()]);
            let (url, bar, open) = (a.url.clone(), bar.clone(), open.clone());
            let user = format!("{}h{i}", a.user_prefix);
            let token = crate::ws::token(&issuer, &user);
            let mode = a.mode;
            async move {
                let r: Result<(), String> = match mode {
                    HoldMode::Ws => {
                        let token = token.map_err(|e| e.to_string())?;
                        crate::e2e::open_session(&url, &token, source)
                            .await
                            .map(|ws| keep_open(ws, open))
                            .map_err(|e| e.to_string())
                    }
                    HoldMode::WsRaw => crate::ws::connect(&url, "/", source)
                        .await
                        .map(|ws| keep_open(ws, open))
                        .map_err(|e| e.to_string()),
                    HoldMode::Tcp => match crate::ws::tcp(addr, source).await {
                        Ok(mut s) => {
                            open.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(async move {
                                let mut buf = [0u8; 16];
                                while let Ok(n) = s.read(&mut buf).await {
                                    if n == 0 {
                                        break;
                                    }
                                }
                                open.fetch_sub(1, Ordering::Relaxed);
                            });
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    },
                };
                bar.inc(1);
                r
            }
        })
        .buffer_unordered(a.concurrency.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let connect_seconds = started.elapsed().as_secs_f64();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut established = 0;
    for r in results {
        match r {
            Ok(()) => established += 1,
            Err(e) => {
                let key: String = e.chars().take(80).collect();
                *failures.entry(key).or_default() += 1;
            }
        }
    }
    eprintln!(
        "{established} of {} connections open after {connect_seconds:.1} s; failures: {failures:?}",
        a.conns
    );
    let barrier_passed = match &a.barrier {
        Some((dir, count)) => Some(wait_at_barrier(dir, *count).await?),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs_f64(a.settle_seconds)).await;
    let rss_after = cpu::rss_kib(a.target_pid).unwrap_or(0);
    let fds = cpu::fd_count(a.target_pid).unwrap_or(0);
    let limit = cpu::fd_limit(a.target_pid).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs_f64(a.hold_seconds)).await;
    let rss_end = cpu::rss_kib(a.target_pid).unwrap_or(0);
    let still = open.load(Ordering::Relaxed);
    let per_conn =
        (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / established.max(1) as f64;
    eprintln!(
        "target RSS {rss_before} KiB -> {rss_after} KiB ({per_conn:.0} bytes per connection); {fds} fds of {limit}; {still} still open after {} s",
        a.hold_seconds
    );
    Ok(HoldReport {
        mode: a.mode,
        attempted: a.conns,
        established,
        still_open_at_end: still,
        failures,
        source_addresses: a.source_ips.len().max(1),
        connect_seconds,
        target_rss_before_kib: rss_before,
        target_rss_after_kib: rss_after,
        target_rss_end_kib: rss_end,
        rss_per_connection_bytes: per_conn,
        target_fds_open: fds,
        target_fd_limit: limit,
        fraction_of_fd_limit: if limit > 0 {
            still as f64 / limit as f64
        } else {
            0.0
        },
        client_fd_limit: cpu::fd_limit(std::process::id()).unwrap_or(0),
        barrier_passed,
    })
}

/// Counts `ws` as open and keeps reading it (which answers the server's pings) until it closes.
fn keep_open(mut ws: crate::ws::Ws, open: Arc<AtomicU64>) {
    open.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Says this holder is ready (a file named after its pid in `dir`) and waits, up to 10
/// minutes, until `count` holders have. False if the wait timed out.
async fn wait_at_barrier(dir: &std::path::Path, count: usize) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(std::process::id().to_string()), b"ready")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ready = std::fs::read_dir(dir)?.count();
        if ready >= count {
            eprintln!("barrier: {ready} of {count} holders ready");
            return Ok(true);
        }
        if Instant::now() > deadline {
            eprintln!("barrier: only {ready} of {count} holders ready after 10 minutes");
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
