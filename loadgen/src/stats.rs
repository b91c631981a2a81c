//! Latency summaries.

use serde::{Deserialize, Serialize};

/// Percentiles of a latency sample, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// From samples in microseconds (sorted in place).
    pub fn of_us(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |q: f64| {
            // Nearest rank.
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
            samples[rank - 1] as f64 / 1000.0
        };
        Self {
            count: n,
            mean_ms: samples.iter().sum::<u64>() as f64 / n as f64 / 1000.0,
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: samples[n - 1] as f64 / 1000.0,
        }
    }
}

/// Log-spaced histogram buckets (for the chart): upper bounds in microseconds and counts.
pub fn log_histogram(sorted_us: &[u64], per_decade: usize) -> Vec<(f64, u64)> {
    let lo = 100.0f64; // 0.1 ms
    let hi = 100_000_000.0f64; // 100 s
    let steps = ((hi / lo).log10() * per_decade as f64) as usize;
    let mut out = Vec::with_capacity(steps);
    let mut i = 0;
    for s in 1..=steps {
        let bound = lo * 10f64.powf(s as f64 / per_decade as f64);
        let mut c = 0;
        while i < sorted_us.len() && (sorted_us[i] as f64) <= bound {
            c += 1;
            i += 1;
        }
        out.push((bound, c));
    }
    if let Some(last) = out.last_mut() {
        last.1 += (sorted_us.len() - i) as u64;
    }
    out
}
