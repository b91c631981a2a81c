//! The pipeline's own histograms, read from its Prometheus endpoints around a trial.
//!
//! A trial scrapes every endpoint right before it starts and right after it drains; the
//! difference of two scrapes is what the trial added to each histogram. Quantiles come from the
//! difference's buckets the way Prometheus's `histogram_quantile` computes them (linear inside
//! the bucket that holds the rank), and the mean from `_sum` / `_count`. Only the text format's
//! histogram lines (`_bucket{le=...}`, `_sum`, `_count`) are read; other label sets of the same
//! histogram are added together.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A metrics endpoint to scrape: `name=http://host:port/path`.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("expected name=url, got {s:?}"))?;
        if !url.starts_with("http://") {
            return Err(format!("only http:// URLs, got {url:?}"));
        }
        Ok(Self {
            name: name.to_owned(),
            url: url.to_owned(),
        })
    }
}

/// One histogram as exported: cumulative counts per finite upper bound (ascending), the count
/// of every observation (the `+Inf` bucket) and their sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub count: f64,
    pub sum: f64,
}

impl Histogram {
    /// What was observed between `before` and `self` (a later scrape of the same process).
    /// `None` when the counts went down (the process restarted in between) or the buckets differ.
    pub fn minus(&self, before: &Histogram) -> Option<Histogram> {
        if before.count > self.count {
            return None;
        }
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (i, &(le, c)) in self.buckets.iter().enumerate() {
            // A histogram first observed after `before` is missing from it: nothing before.
            let b = match before.buckets.get(i) {
                Some(&(ble, bc)) if ble == le => bc,
                None if before.buckets.is_empty() => 0.0,
                _ => return None,
            };
            buckets.push((le, c - b));
        }
        Some(Histogram {
            buckets,
            count: self.count - before.count,
            sum: self.sum - before.sum,
        })
    }

    /// Adds another process's histogram with the same buckets; false if the buckets differ.
    fn add(&mut self, other: &Histogram) -> bool {
        if self.buckets.len() != other.buckets.len()
            || self
                .buckets
                .iter()
                .zip(&other.buckets)
                .any(|(a, b)| a.0 != b.0)
        {
            return false;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            a.1 += b.1;
        }
        self.count += other.count;
        self.sum += other.sum;
        true
    }

    /// The q-quantile as Prometheus's `histogram_quantile` estimates it: find the bucket that
    /// holds rank q × count and interpolate linearly between its bounds (from 0 for the first
    /// bucket). A rank beyond the last finite bucket gives that bucket's upper bound. `None`
    /// without observations or finite buckets.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 || self.buckets.is_empty() || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * self.count;
        let Some(b) = self.buckets.iter().position(|&(_, c)| c >= rank) else {
            return self.buckets.last().map(|&(le, _)| le);
        };
        let (end, cum) = self.buckets[b];
        if b == 0 && end <= 0.0 {
            return Some(end);
        }
        let (start, below) = if b == 0 {
            (0.0, 0.0)
        } else {
            self.buckets[b - 1]
        };
        let in_bucket = cum - below;
        if in_bucket <= 0.0 {
            return Some(start);
        }
        Some(start + (end - start) * (rank - below) / in_bucket)
    }

    /// True when the q-quantile lies beyond the last finite bucket (then `quantile` gives only a
    /// lower bound).
    pub fn beyond_last_bucket(&self, q: f64) -> bool {
        self.buckets
            .last()
            .is_some_and(|&(_, c)| self.count > 0.0 && c < q * self.count)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

/// Splits `name{labels} value [timestamp]` into name, labels and value.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let (series, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].rfind('}')?;
            (&line[..open], (&line[open + 1..close], &line[close + 1..]))
        }
        None => {
            let end = line.find(char::is_whitespace)?;
            (&line[..end], ("", &line[end..]))
        }
    };
    let (labels, rest) = rest;
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((series.trim(), labels, value))
}

/// The bound in a bucket's `le` label (its other labels only tell what is added together).
fn le(labels: &str) -> Option<f64> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k.trim() != "le" {
            return None;
        }
        match v.trim().trim_matches('"') {
            "+Inf" => Some(f64::INFINITY),
            v => v.parse().ok(),
        }
    })
}

/// Histograms by name.
pub type Histograms = BTreeMap<String, Histogram>;

/// Every histogram in a Prometheus text exposition, by name (label sets added together).
pub fn parse(text: &str) -> Histograms {
    let mut raw = Histograms::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, labels, value)) = sample(line) else {
            continue;
        };
        if let Some(name) = series.strip_suffix("_bucket") {
            let Some(bound) = le(labels) else { continue };
            let h = raw.entry(name.to_owned()).or_default();
            if bound.is_infinite() {
                continue; // the same as _count
            }
            match h.buckets.iter_mut().find(|b| b.0 == bound) {
                Some(b) => b.1 += value,
                None => h.buckets.push((bound, value)),
            }
        } else if let Some(name) = series.strip_suffix("_count") {
            raw.entry(name.to_owned()).or_default().count += value;
        } else if let Some(name) = series.strip_suffix("_sum") {
            raw.entry(name.to_owned()).or_default().sum += value;
        }
    }
    // Only histograms (a summary also has _sum and _count, but no buckets).
    raw.retain(|_, h| !h.buckets.is_empty());
    for h in raw.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    raw
}

/// A plain HTTP/1.0 GET (the endpoints are the pipeline's own, on loopback): the body of a 200.
async fn get(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let timeout = Duration::from_secs(10);
    let mut stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(authority))
        .await
        .context("connect timed out")??;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(timeout, stream.read_to_end(&mut raw))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the response header")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    anyhow::ensure!(status == "200", "HTTP status {status}");
    Ok(body.to_owned())
}

/// The histograms of every endpoint at one moment (an endpoint that could not be read: why).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    endpoints: Vec<(String, Result<Histograms, String>)>,
}

/// Reads every endpoint (one after another: they are few).
pub async fn scrape(endpoints: &[Endpoint]) -> Snapshot {
    let mut out = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        let r = get(&e.url)
            .await
            .map(|body| parse(&body))
            .map_err(|err| format!("{}: {err:#}", e.url));
        out.push((e.name.clone(), r));
    }
    Snapshot { endpoints: out }
}

/// What a trial added to one histogram, over every endpoint that exports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistogramDelta {
    /// Endpoints it came from (added together when several, e.g. two gateways).
    pub sources: Vec<String>,
    pub count: u64,
    /// In the histogram's unit (seconds for `_seconds`).
    pub sum: f64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// The p99 lies beyond the last finite bucket: `p99` is only a lower bound.
    #[serde(default)]
    pub p99_beyond_buckets: bool,
    /// Cumulative counts per finite upper bound (the `+Inf` bucket is `count`).
    pub buckets: Vec<(f64, u64)>,
}

/// The pipeline's histograms over one trial.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PipelineHistograms {
    pub histograms: BTreeMap<String, HistogramDelta>,
    /// Endpoints not read, or histograms whose difference could not be taken, and why.
    pub errors: BTreeMap<String, String>,
}

/// The difference of two snapshots of the same endpoints.
pub fn delta(before: &Snapshot, after: &Snapshot) -> PipelineHistograms {
    let mut out = PipelineHistograms::default();
    let mut merged: BTreeMap<String, (Histogram, Vec<String>)> = BTreeMap::new();
    for (name, a) in &after.endpoints {
        let a = match a {
            Ok(a) => a,
            Err(e) => {
                out.errors.insert(name.clone(), format!("after: {e}"));
                continue;
            }
        };
        let b = match before.endpoints.iter().find(|(n, _)| n == name) {
            Some((_, Ok(b))) => b,
            Some((_, Err(e))) => {
                out.errors.insert(name.clone(), format!("before: {e}"));
                continue;
            }
            None => {
                out.errors
                    .insert(name.clone(), "not scraped before".to_owned());
                continue;
            }
        };
        for (metric, h) in a {
            let d = match b.get(metric) {
                Some(bh) => h.minus(bh),
                None => h.minus(&Histogram::default()),
            };
            let Some(d) = d else {
                out.errors.insert(
                    format!("{name}/{metric}"),
                    "counts went down or buckets changed (restarted?)".to_owned(),
                );
                continue;
            };
            match merged.get_mut(metric) {
                Some((m, sources)) => {
                    if m.add(&d) {
                        sources.push(name.clone());
                    } else {
                        out.errors.insert(
                            format!("{name}/{metric}"),
                            "buckets differ from another endpoint's; left out".to_owned(),
                        );
                    }
                }
                None => {
                    merged.insert(metric.clone(), (d, vec![name.clone()]));
                }
            }
        }
    }
    for (metric, (h, sources)) in merged {
        out.histograms.insert(
            metric,
            HistogramDelta {
                sources,
                count: h.count.round() as u64,
                sum: h.sum,
                mean: h.mean(),
                p50: h.quantile(0.5),
                p99: h.quantile(0.99),
                p99_beyond_buckets: h.beyond_last_bucket(0.99),
                buckets: h
                    .buckets
                    .iter()
                    .map(|&(le, c)| (le, c.round() as u64))
                    .collect(),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(buckets: &[(f64, f64)], count: f64, sum: f64) -> Histogram {
        Histogram {
            buckets: buckets.to_vec(),
            count,
            sum,
        }
    }

    fn close(a: Option<f64>, b: f64) {
        let a = a.expect("a quantile");
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        // 10 in (0, 1], 30 in (1, 2], 60 in (2, 4].
        let x = h(&[(1.0, 10.0), (2.0, 40.0), (4.0, 100.0)], 100.0, 250.0);
        // rank 50: bucket (2, 4], 10 of its 60 -> 2 + 2 * 10/60.
        close(x.quantile(0.5), 2.0 + 2.0 * 10.0 / 60.0);
        // rank 99: 2 + 2 * 59/60.
        close(x.quantile(0.99), 2.0 + 2.0 * 59.0 / 60.0);
        // rank 5: first bucket, from 0.
        close(x.quantile(0.05), 0.5);
        // rank 40 exactly: the bucket whose cumulative count reaches it, at its upper bound.
        close(x.quantile(0.4), 2.0);
        close(x.mean(), 2.5);
        assert!(!x.beyond_last_bucket(0.99));
    }

    #[test]
    fn quantile_beyond_the_last_bucket_is_its_bound() {
        let x = h(&[(0.5, 50.0), (1.0, 90.0)], 100.0, 80.0);
        close(x.quantile(0.99), 1.0);
        assert!(x.beyond_last_bucket(0.99));
        close(x.quantile(0.9), 1.0);
        assert!(!x.beyond_last_bucket(0.9));
    }

    #[test]
    fn quantile_without_observations_is_none() {
        let x = h(&[(1.0, 0.0)], 0.0, 0.0);
        assert_eq!(x.quantile(0.5), None);
        assert_eq!(x.mean(), None);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn quantile_of_the_difference_sees_only_the_trial() {
        // Before: 1000 fast observations; the trial adds 100 slow ones.
        let before = h(
            &[(0.001, 1000.0), (0.01, 1000.0), (0.1, 1000.0)],
            1000.0,
            0.5,
        );
        let after = h(
            &[(0.001, 1000.0), (0.01, 1000.0), (0.1, 1100.0)],
            1100.0,
            5.5,
        );
        let d = after.minus(&before).expect("a difference");
        assert_eq!(d.count, 100.0);
        close(d.mean(), 0.05);
        // All 100 in (0.01, 0.1]: p50 at the middle.
        close(d.quantile(0.5), 0.055);
        // The cumulative histogram would put its p50 in the first bucket.
        assert!(after.quantile(0.5).expect("p50") <= 0.001);
        // A restart (counts down) has no difference.
        assert_eq!(before.minus(&after), None);
    }

    #[test]
    fn parses_the_text_format() {
        let text = "\
# TYPE gateway_produce_seconds histogram
gateway_produce_seconds_bucket{le=\"0.001\"} 3
gateway_produce_seconds_bucket{le=\"0.0005\"} 1
gateway_produce_seconds_bucket{le=\"+Inf\"} 4
gateway_produce_seconds_sum 0.0061
gateway_produce_seconds_count 4
# a summary: no buckets
rpc_seconds{quantile=\"0.5\"} 0.1
rpc_seconds_sum 1
rpc_seconds_count 10
errors_total{kind=\"x\"} 3
# two label sets of one histogram are added
w_seconds_bucket{shard=\"0\",le=\"1\"} 2
w_seconds_bucket{shard=\"0\",le=\"+Inf\"} 3
w_seconds_sum{shard=\"0\"} 4
w_seconds_count{shard=\"0\"} 3
w_seconds_bucket{shard=\"1\",le=\"1\"} 1
w_seconds_bucket{shard=\"1\",le=\"+Inf\"} 1
w_seconds_sum{shard=\"1\"} 0.5
w_seconds_count{shard=\"1\"} 1
";
        let m = parse(text);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(
            m["gateway_produce_seconds"],
            h(&[(0.0005, 1.0), (0.001, 3.0)], 4.0, 0.0061)
        );
        assert_eq!(m["w_seconds"], h(&[(1.0, 3.0)], 4.0, 4.5));
    }

    #[test]
    fn delta_adds_endpoints_and_treats_a_new_histogram_as_zero_before() {
        let snap = |text: &str| parse(text);
        let before = Snapshot {
            endpoints: vec![
                ("gw1".into(), Ok(snap(""))),
                (
                    "gw2".into(),
                    Ok(snap(
                        "x_seconds_bucket{le=\"1\"} 5\nx_seconds_sum 2\nx_seconds_count 5\n",
                    )),
                ),
                ("mx".into(), Err("down".into())),
            ],
        };
        let after = Snapshot {
            endpoints: vec![
                (
                    "gw1".into(),
                    Ok(snap(
                        "x_seconds_bucket{le=\"1\"} 2\nx_seconds_sum 1\nx_seconds_count 4\n",
                    )),
                ),
                (
                    "gw2".into(),
                    Ok(snap(
                        "x_seconds_bucket{le=\"1\"} 7\nx_seconds_sum 3\nx_seconds_count 9\n",
                    )),
                ),
                ("mx".into(), Ok(snap(""))),
            ],
        };
        let d = delta(&before, &after);
        let x = &d.histograms["x_seconds"];
        assert_eq!(x.sources, vec!["gw1".to_owned(), "gw2".to_owned()]);
        assert_eq!(x.count, 8);
        assert_eq!(x.buckets, vec![(1.0, 4)]);
        assert!(x.p99_beyond_buckets);
        assert!(d.errors.contains_key("mx"));
    }

    #[test]
    fn endpoint_from_str() {
        let e: Endpoint = "gateway=http://127.0.0.1:8080/metrics"
            .parse()
            .expect("valid");
        assert_eq!(e.name, "gateway");
        assert_eq!(e.url, "http://127.0.0.1:8080/metrics");
        assert!("gateway".parse::<Endpoint>().is_err());
        assert!("g=https://x/metrics".parse::<Endpoint>().is_err());
    }
}
