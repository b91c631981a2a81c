//! What the gateway and the multiplexer serve at `/metrics`, scraped from the real binaries:
//!
//! - Each scrape passes `promtool check metrics` without a single warning (HELP on every family,
//!   Prometheus naming rules).
//! - Each holds exactly the families `infra/observability/metrics.json` lists for its service
//!   (the catalogue the dashboard and the alert rules are checked against in `infra/tests`),
//!   with their types, and every listed label value from the first scrape: a counter is there at
//!   0 before its first event, so a panel shows 0 and `rate()` sees the first error after a
//!   restart. Plus the `process_*` metrics and `chat_build_info{service,version} 1`.
//! - `multiplexer_consumer_lag` counts from the group's committed offset: records the multiplexer
//!   has fetched but cannot store (a shard refusing writes) stay in it until they are stored;
//!   each such record's waits before the store (in the consumer, for its batch to close) are
//!   counted once, however many times its store is tried.
//!
//! Needs `promtool` (Debian's `prometheus` package; `make deps` installs it) and the binaries
//! (`cargo build --bins`, which `make test` runs first).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use chat_client::Rest;
use chat_common::ids::{ClientMessageId, ConversationKey, UserId};
use chat_e2e::{eventually_within, http_url, TestEnv};
use chat_proto::v1::{inbound_record, ChatMessage, InboundRecord};
use prost::Message as _;

const CATALOGUE: &str = include_str!("../../infra/observability/metrics.json");

/// The spawned binaries report lag every 5 s: a longer wait than the harness's.
const WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`, for at most [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    eventually_within(what, WAIT, check).await
}

/// One family of the catalogue.
struct Family {
    kind: String,
    services: Vec<String>,
    /// Label -> every value (all there from the start), or None (values appear at run time).
    labels: BTreeMap<String, Option<Vec<String>>>,
}

fn catalogue() -> anyhow::Result<BTreeMap<String, Family>> {
    let doc: serde_json::Value = serde_json::from_str(CATALOGUE)?;
    let families = doc["families"]
        .as_object()
        .context("metrics.json has no families")?;
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(families
        .iter()
        .map(|(name, f)| {
            let labels = f["labels"]
                .as_object()
                .map(|l| {
                    l.iter()
                        .map(|(k, v)| (k.clone(), (!v.is_null()).then(|| strings(v))))
                        .collect()
                })
                .unwrap_or_default();
            let family = Family {
                kind: f["type"].as_str().unwrap_or_default().to_owned(),
                services: strings(&f["services"]),
                labels,
            };
            (name.clone(), family)
        })
        .collect())
}

/// A parsed scrape: the TYPE and HELP of each family, and each sample.
#[derive(Default)]
struct Scrape {
    text: String,
    types: BTreeMap<String, String>,
    helps: BTreeSet<String>,
    /// (name with its suffix, labels) -> value
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Scrape {
    fn parse(text: String) -> anyhow::Result<Self> {
        let mut s = Scrape::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE line")?;
                s.types.insert(name.into(), kind.into());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                s.helps
                    .insert(rest.split(' ').next().unwrap_or_default().into());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').context("sample line")?;
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                    None => (series, BTreeMap::new()),
                };
                let value = value.parse().with_context(|| format!("value in {line}"))?;
                s.samples.insert((name.into(), labels), value);
            }
        }
        s.text = text;
        Ok(s)
    }

    /// The samples of `name` (with its suffix, if any).
    fn series<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |((n, _), _)| n == name)
            .map(|((_, labels), v)| (labels, *v))
    }

    /// The value of `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }
}

/// `a="x",b="y"` (values of this code hold no quotes or commas).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let r = Rest::new(&http_url(addr))
        .request("GET", "/metrics", None, None)
        .await?;
    anyhow::ensure!(r.status == 200, "/metrics answered {}", r.status);
    Scrape::parse(r.body.as_str().unwrap_or_default().to_owned())
}

/// Runs `promtool check metrics` on `text`: its complaints, empty when there is none.
fn promtool(text: &str) -> anyhow::Result<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian's prometheus package; `make deps` installs it)")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(String::new())
    } else {
        Ok(format!("promtool exited {}:\n{said}", out.status))
    }
}

/// What is wrong with the first scrape of `service` against the catalogue (empty: nothing).
fn check_start(
    service: &str,
    catalogue: &BTreeMap<String, Family>,
    scrape: &Scrape,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mine: BTreeMap<&String, &Family> = catalogue
        .iter()
        .filter(|(_, f)| f.services.iter().any(|s| s == service))
        .collect();
    for name in scrape.types.keys() {
        if !mine.contains_key(name) {
            problems.push(format!(
                "{name} is served but not in metrics.json for {service}"
            ));
        }
    }
    for (name, family) in &mine {
        match scrape.types.get(*name) {
            None => problems.push(format!("{name} is missing from the first scrape")),
            Some(kind) if *kind != family.kind => problems.push(format!(
                "{name} is a {kind}, metrics.json says {}",
                family.kind
            )),
            Some(_) => {}
        }
        if !scrape.helps.contains(*name) {
            problems.push(format!("{name} has no HELP"));
        }
        let sample_name = if family.kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_string()
        };
        for (label, values) in &family.labels {
            if let Some(values) = values {
                // A value the catalogue does not list: a dashboard matcher on it is not checked.
                for (labels, _) in scrape.series(&sample_name) {
                    if let Some(v) = labels.get(label).filter(|v| !values.contains(v)) {
                        problems.push(format!("{name}{{{label}=\"{v}\"}} is not in metrics.json"));
                    }
                }
            }
            for value in values.iter().flatten() {
                let there = scrape
                    .series(&sample_name)
                    .any(|(labels, _)| labels.get(label) == Some(value));
                if !there {
                    problems.push(format!(
                        "{name}{{{label}=\"{value}\"}} is not there at start"
                    ));
                }
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scrape_passes_promtool_and_holds_the_catalogue_from_the_start() -> anyhow::Result<()>
{
    let catalogue = catalogue()?;
    let env = TestEnv::new(1, &["gw1"]).await?;
    let mut mux = env.spawn_multiplexer_process().await?;
    let mut gw = env.spawn_gateway_process("gw1").await?;
    for (service, addr) in [("multiplexer", mux.ops_addr), ("gateway", gw.ops_addr)] {
        // The first scrape, right after /readyz: nothing has happened yet. The lag has a series
        // per partition owned, so it is there once the group has assigned them; the rest at once.
        let first = eventually(&format!("{service}'s partitions assigned"), || async {
            let s = scrape(addr).await?;
            let lag = s.series("multiplexer_consumer_lag").count();
            Ok((service != "multiplexer" || lag > 0).then_some(s))
        })
        .await?;
        let complaints = promtool(&first.text)?;
        assert!(
            complaints.is_empty(),
            "{service}: {complaints}\n{}",
            first.text
        );
        let problems = check_start(service, &catalogue, &first);
        assert!(problems.is_empty(), "{service}:\n{}", problems.join("\n"));

        // Every counter starts at 0 (no traffic yet): an alert on its rate sees the first event.
        for (name, family) in &catalogue {
            if family.kind == "counter" && family.services.iter().any(|s| s == service) {
                if name.starts_with("process_") {
                    continue;
                }
                for (labels, v) in first.series(name) {
                    assert_eq!(v, 0.0, "{service}: {name}{labels:?} at start");
                }
            }
        }
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            first.value(
                "chat_build_info",
                &[("service", service), ("version", version)]
            ),
            Some(1.0),
            "{service}: chat_build_info"
        );
        assert_eq!(first.series("chat_build_info").count(), 1);
        let started = first
            .value("process_start_time_seconds", &[])
            .context("process_start_time_seconds")?;
        let now = chat_common::now_ms() as f64 / 1000.0;
        assert!(started > now - 600.0 && started <= now + 1.0, "{started}");
        assert!(
            first
                .value("process_resident_memory_bytes", &[])
                .unwrap_or(0.0)
                > 0.0
        );
        assert!(first.value("process_open_fds", &[]).unwrap_or(0.0) > 0.0);
        let partitions = first.series("multiplexer_consumer_lag").count();
        if service == "multiplexer" {
            // One multiplexer in the group: it owns every partition of inbound, none lagging.
            assert_eq!(partitions, 12, "{}", first.text);
            for (labels, lag) in first.series("multiplexer_consumer_lag") {
                assert_eq!(lag, 0.0, "{labels:?}");
            }
        }
    }
    gw.terminate().await?;
    mux.terminate().await?;
    env.teardown().await
}

fn user(s: &str) -> UserId {
    UserId::parse(s).expect("valid user id")
}

/// A message alice sends bob, as a gateway would produce it to inbound.
fn record(n: usize) -> anyhow::Result<Vec<u8>> {
    let (from, to) = (user("alice"), user("bob"));
    let cid = ClientMessageId::parse(&format!("lag{n}"))?;
    let message = ChatMessage {
        sealed_body: Vec::new(),
        message_id: chat_common::ids::message_id(&from, &to, &cid).to_string(),
        client_message_id: cid.as_str().to_owned(),
        conversation: ConversationKey::of(&from, &to)
            .context("distinct users")?
            .as_str()
            .to_owned(),
        sender: from.as_str().to_owned(),
        recipient: to.as_str().to_owned(),
        body: format!("message {n}"),
        sent_at_ms: chat_common::now_ms(),
        seq: 0,
    };
    Ok(InboundRecord {
        kind: Some(inbound_record::Kind::Message(message)),
        gateway_id: "gw1".into(),
    }
    .encode_to_vec())
}

/// The summed lag, and the shard errors, of a multiplexer's scrape.
fn lag_and_shard_errors(s: &Scrape) -> (f64, f64) {
    let lag = s.series("multiplexer_consumer_lag").map(|(_, v)| v).sum();
    let errors = s
        .value("multiplexer_errors_total", &[("kind", "shard")])
        .unwrap_or(-1.0);
    (lag, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_counts_what_the_group_has_not_committed() -> anyhow::Result<()> {
    const RECORDS: usize = 5;
    let env = TestEnv::new(1, &["gw1"]).await?;
    let mut mux = env.spawn_multiplexer_process().await?;
    let first = eventually("partitions assigned", || async {
        let s = scrape(mux.addr).await?;
        Ok((s.series("multiplexer_consumer_lag").count() > 0).then_some(s))
    })
    .await?;
    // Registered at start: the errors of the outage below start from 0, not from nothing.
    assert_eq!(lag_and_shard_errors(&first), (0.0, 0.0));

    // The table is missing (SQLSTATE 42P01): the multiplexer fetches the records and retries
    // storing them in place, so it commits nothing. Their fetch position has moved past them;
    // the lag, counted from the committed offset, keeps them.
    env.shard(0)
        .await?
        .batch_execute("ALTER TABLE messages RENAME TO messages_away")
        .await?;
    let key = ConversationKey::of(&user("alice"), &user("bob")).context("distinct users")?;
    let values = (0..RECORDS)
        .map(record)
        .collect::<anyhow::Result<Vec<_>>>()?;
    env.produce_all(&env.topics.inbound(), key.as_str(), values)
        .await?;
    let during = eventually("the lag of the records not stored", || async {
        let s = scrape(mux.addr).await?;
        let (lag, errors) = lag_and_shard_errors(&s);
        Ok((lag == RECORDS as f64 && errors > 0.0).then_some(s))
    })
    .await?;
    // All of it on the conversation's partition.
    let lagging: Vec<_> = during
        .series("multiplexer_consumer_lag")
        .filter(|(_, v)| *v > 0.0)
        .collect();
    assert_eq!(lagging.len(), 1, "{lagging:?}");

    env.shard(0)
        .await?
        .batch_execute("ALTER TABLE messages_away RENAME TO messages")
        .await?;
    eventually("no lag once stored and committed", || async {
        let s = scrape(mux.addr).await?;
        Ok((lag_and_shard_errors(&s).0 == 0.0).then_some(()))
    })
    .await?;
    assert_eq!(env.stored(key.as_str()).await?.len(), RECORDS);
    // Each record's hops before the store, once each, though its store was tried many times:
    // its wait in the consumer and its wait for its batch to close.
    let after = scrape(mux.addr).await?;
    for hop in [
        "multiplexer_inbound_wait_seconds_count",
        "multiplexer_batch_wait_seconds_count",
    ] {
        assert_eq!(after.value(hop, &[]), Some(RECORDS as f64), "{hop}");
    }
    mux.terminate().await?;
    env.teardown().await
}
