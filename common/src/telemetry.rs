//! Logs and metrics.
//!
//! Logs: `tracing` with the `RUST_LOG` filter (default `info`); `LOG_FORMAT=json` switches to one
//! JSON object per line. Logs go to stderr, never stdout, so a tool whose output is data (an
//! export, a tail, a replay summary) keeps its stream clean at any log level. Colours only when
//! stderr is a terminal, so logs written to a file or a pipe carry no escape codes. Metrics: the `metrics` facade recorded by a Prometheus recorder;
//! every process serves the rendering at `GET /metrics` (see [`crate::http`]).
//!
//! Each crate lists the metric families it records in one catalogue of [`Family`] (its
//! `catalogue` module; common's own are [`PRESENCE_FAMILIES`] and [`LANES_FAMILIES`]). A
//! service hands its catalogues to [`register_metrics`] at start: every family gets its HELP
//! text, and every series whose labels are known then exists from the first scrape at zero, so a
//! panel shows 0 rather than "No data" and `rate()`/`increase()` see the first event after a
//! restart.
//! The rendering also carries the standard `process_*` metrics (refreshed at each scrape) and
//! `chat_build_info{service,version} 1`. The scrapes pass `promtool check metrics`
//! (`e2e/tests/metrics.rs`); `infra/observability/metrics.json` lists every family per service,
//! and the dashboard and the alert rules may use only those (`infra/tests`).

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. Safe to call more than once (later calls do nothing).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide metrics: the Prometheus recorder's handle and the `process_*` collector.
pub struct Metrics {
    prometheus: PrometheusHandle,
    process: metrics_process::Collector,
}

impl Metrics {
    /// The Prometheus text rendering of every metric, with the `process_*` metrics read now.
    pub fn render(&self) -> String {
        self.process.collect();
        self.prometheus.render()
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics, with the Prometheus recorder installed on first use.
pub fn metrics_handle() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            // Fine below 25 ms, where a message's hops are judged against a 10 ms target, and
            // finest from 1 to 5 ms, where each hop's p99 lies at low rates (at 500 msg/s, nine
            // hops with p99s of 1-6 ms; with no bound between 1 and 2.5 ms, and none between
            // 2.5 and 5, a quantile there was a straight line through the bucket).
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075,
                0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            .expect("static bucket list is non-empty")
            .set_buckets_for_metric(
                Matcher::Suffix("_batch_size".into()),
                &[
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                ],
            )
            .expect("static bucket list is non-empty")
            .build_recorder();
        let prometheus = recorder.handle();
        // Fails only if another recorder is installed, in which case ours just stays unused.
        let _ = metrics::set_global_recorder(recorder);
        let process = metrics_process::Collector::default();
        process.describe();
        process.collect();
        Metrics {
            prometheus,
            process,
        }
    })
}

/// The type of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The labels of a metric family's series.
#[derive(Clone, Copy, Debug)]
pub enum Labels {
    /// One series, without labels.
    None,
    /// One label, whose every value is known at start: one series per value, all from the start.
    Known(&'static str, &'static [&'static str]),
    /// One label whose values appear as the process runs (a partition it is assigned, say): the
    /// family is described at start, and each series exists from its first record.
    Open(&'static str),
}

/// One metric family of a catalogue: what a dashboard or an alert may name.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    /// Its unit, for the recorder's metadata (the name already says it: `_seconds`, `_total`).
    pub unit: Option<metrics::Unit>,
    /// The HELP text: what one sample or one increment is.
    pub help: &'static str,
    pub labels: Labels,
}

impl Family {
    /// A counter without labels.
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Counter, Some(metrics::Unit::Count), help)
    }

    /// A gauge without labels.
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Gauge, None, help)
    }

    /// A histogram of durations in seconds, without labels.
    pub const fn seconds(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Histogram, Some(metrics::Unit::Seconds), help)
    }

    /// A histogram of counts (batch sizes, queries per request), without labels.
    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Histogram, Some(metrics::Unit::Count), help)
    }

    const fn new(
        name: &'static str,
        kind: Kind,
        unit: Option<metrics::Unit>,
        help: &'static str,
    ) -> Self {
        Self {
            name,
            kind,
            unit,
            help,
            labels: Labels::None,
        }
    }

    /// The same family with one label, whose values are all known at start.
    pub const fn known(self, label: &'static str, values: &'static [&'static str]) -> Self {
        Self {
            labels: Labels::Known(label, values),
            ..self
        }
    }

    /// The same family with one label, whose values appear as the process runs.
    pub const fn open(self, label: &'static str) -> Self {
        Self {
            labels: Labels::Open(label),
            ..self
        }
    }

    /// Gives the family its HELP text, and creates each of its series known now at zero.
    fn register(&self) {
        let (name, unit, help) = (self.name, self.unit, self.help);
        match (self.kind, unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(name, u, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(name, u, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
        match self.labels {
            Labels::None => self.create(Vec::new()),
            Labels::Known(label, values) => {
                for value in values {
                    self.create(vec![metrics::Label::new(label, *value)]);
                }
            }
            Labels::Open(_) => {}
        }
    }

    /// Creates one series at zero (a gauge set later keeps its value: only new series start here).
    fn create(&self, labels: Vec<metrics::Label>) {
        let name = self.name;
        match self.kind {
            Kind::Counter => metrics::counter!(name, labels).increment(0),
            Kind::Gauge => metrics::gauge!(name, labels).increment(0.0),
            // Registering is what creates it; there is nothing to record yet.
            Kind::Histogram => drop(metrics::histogram!(name, labels)),
        }
    }
}

/// The families recorded by the code of this crate: the presence view (gateways and
/// multiplexers) and the gateways' producer lanes.
pub const PRESENCE_FAMILIES: &[Family] = &[
    Family::counter(
        "presence_catch_up_failed_total",
        "Times the presence view could not catch up with the presence log in time (routing then used what it had).",
    ),
    Family::counter(
        "presence_invalid_records_total",
        "Presence records that did not decode or named an invalid gateway, skipped.",
    ),
];

/// The producer lanes of [`crate::kafka::Lanes`] (gateways).
pub const LANES_FAMILIES: &[Family] = &[Family::counter(
    "kafka_producer_lane_switches_total",
    "Times a producer moved between its prompt lane and its lingering lane as its send rate crossed KAFKA_LINGER_ABOVE.",
)];

/// Registers the process's metrics at start: the Prometheus recorder, every family of
/// `catalogues` (HELP text, and each series known now at zero), the `process_*` metrics, and
/// `chat_build_info{service,version}` at 1. Call it once, before the service records anything.
pub fn register_metrics(service: &'static str, version: &'static str, catalogues: &[&[Family]]) {
    metrics_handle();
    metrics::describe_gauge!(
        "chat_build_info",
        "Always 1: the service and its version (the crate version it was built from), as labels."
    );
    metrics::gauge!("chat_build_info", "service" => service, "version" => version).set(1.0);
    for family in catalogues.iter().flat_map(|c| c.iter()) {
        family.register();
    }
}
