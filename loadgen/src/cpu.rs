//! CPU time and memory of processes, from `/proc` (Linux only).
//!
//! A watched process is named and given by pid. `tree` mode adds every live descendant and the
//! time of reaped children (`cutime`/`cstime`), which is how a Postgres postmaster's backends are
//! counted: a backend that exits during a measurement moves its time into the postmaster's
//! `cutime`, so the sum stays continuous.

use std::collections::BTreeMap;
use std::time::Instant;

/// A process to measure.
#[derive(Clone, Debug)]
pub struct Watch {
    pub name: String,
    pub pid: u32,
    /// Include descendants (live ones and reaped ones).
    pub tree: bool,
}

impl std::str::FromStr for Watch {
    type Err = String;
    /// `name=pid` or `name=pid+` (tree); `name=self` for this process.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pid) = s
            .split_once('=')
            .ok_or_else(|| format!("expected name=pid, got {s:?}"))?;
        let (pid, tree) = match pid.strip_suffix('+') {
            Some(p) => (p, true),
            None => (pid, false),
        };
        let pid = if pid == "self" {
            std::process::id()
        } else {
            pid.parse().map_err(|e| format!("bad pid {pid:?}: {e}"))?
        };
        Ok(Self {
            name: name.to_owned(),
            pid,
            tree,
        })
    }
}

fn ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (ppid, utime+stime, cutime+cstime) in ticks.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4 -> f[1]; utime 14 -> f[11]; stime f[12];
    // cutime f[13]; cstime f[14].
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((num(1)? as u32, num(11)? + num(12)?, num(13)? + num(14)?))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// CPU seconds used so far by a watched process (and its tree).
pub fn cpu_seconds(w: &Watch) -> Option<f64> {
    let (_, own, reaped) = stat(w.pid)?;
    let mut ticks = own;
    if w.tree {
        ticks += reaped;
        // Live descendants: walk the parent links of every process.
        let parents: Vec<(u32, u32, u64)> = all_pids()
            .into_iter()
            .filter_map(|p| stat(p).map(|(pp, t, _)| (p, pp, t)))
            .collect();
        let mut members = vec![w.pid];
        let mut i = 0;
        while i < members.len() {
            let m = members[i];
            for (p, pp, t) in &parents {
                if *pp == m && !members.contains(p) {
                    members.push(*p);
                    ticks += t;
                }
            }
            i += 1;
        }
    }
    Some(ticks as f64 / ticks_per_sec())
}

/// CPU seconds the whole machine has spent busy (every CPU, `/proc/stat`: all but idle and
/// iowait) since boot: with the watched processes' share, how much else ran meanwhile.
pub fn machine_busy_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy as f64 / ticks_per_sec())
}

/// Resident memory in KiB (`VmRSS`), of the process alone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Soft limit on open files of a process (`Max open files` in `/proc/<pid>/limits`).
pub fn fd_limit(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

/// A CPU measurement in progress over a set of processes.
pub struct Probe {
    watches: Vec<Watch>,
    start: Vec<Option<f64>>,
    started: Instant,
}

/// The CPU each process used over a measurement.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CpuUse {
    pub wall_seconds: f64,
    /// CPU seconds by process name.
    pub seconds: BTreeMap<String, f64>,
    pub total_seconds: f64,
}

impl Probe {
    pub fn start(watches: &[Watch]) -> Self {
        Self {
            watches: watches.to_vec(),
            start: watches.iter().map(cpu_seconds).collect(),
            started: Instant::now(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let mut out = CpuUse {
            wall_seconds: self.started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        for (w, s) in self.watches.iter().zip(&self.start) {
            if let (Some(a), Some(b)) = (s, cpu_seconds(w)) {
                let d = (b - a).max(0.0);
                *out.seconds.entry(w.name.clone()).or_default() += d;
                out.total_seconds += d;
            }
        }
        out
    }
}
