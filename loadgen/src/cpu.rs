//! CPU time, context switches and memory of processes, from `/proc` (Linux only).
//!
//! A watched process is named and given by pid. `tree` mode adds every live descendant and the
//! time of reaped children (`cutime`/`cstime`), which is how a Postgres postmaster's backends are
//! counted: a backend that exits during a measurement moves its time into the postmaster's
//! `cutime`, so the sum stays continuous.
//!
//! Context switches are counted over every thread (`/proc/<pid>/task/*/status`), of the process
//! and, in `tree` mode, of its live descendants. The kernel keeps no such sum for threads and
//! processes that have exited, so one that exits during a measurement takes its switches with
//! it: a count is a floor. The watched services' threads (tokio's workers, librdkafka's, a
//! pooled connection's backend) live as long as they do.

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

/// The live descendants of `pid` with their own CPU ticks: the parent links of every process,
/// walked from `pid`.
fn descendants(pid: u32) -> Vec<(u32, u64)> {
    let parents: Vec<(u32, u32, u64)> = all_pids()
        .into_iter()
        .filter_map(|p| stat(p).map(|(pp, t, _)| (p, pp, t)))
        .collect();
    let mut members = vec![pid];
    let mut out = Vec::new();
    let mut i = 0;
    while i < members.len() {
        let m = members[i];
        for (p, pp, t) in &parents {
            if *pp == m && !members.contains(p) {
                members.push(*p);
                out.push((*p, *t));
            }
        }
        i += 1;
    }
    out
}

/// CPU seconds and context switches so far of a watched process (and its tree), from one walk
/// of the process table.
fn usage(w: &Watch) -> (Option<f64>, Option<u64>) {
    let Some((_, own, reaped)) = stat(w.pid) else {
        return (None, None);
    };
    let mut ticks = own;
    let mut switches = thread_switches(w.pid);
    if w.tree {
        let members = descendants(w.pid);
        ticks += reaped + members.iter().map(|(_, t)| t).sum::<u64>();
        let theirs: u64 = members
            .iter()
            .filter_map(|(p, _)| thread_switches(*p))
            .sum();
        switches = switches.map(|own| own + theirs);
    }
    (Some(ticks as f64 / ticks_per_sec()), switches)
}

/// Context switches, voluntary and not, of every live thread of `pid`.
fn thread_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = 0;
    for task in tasks.flatten() {
        // A thread that exits between the listing and the read is skipped.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let count = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"));
            if let Some(n) = count.and_then(|v| v.trim().parse::<u64>().ok()) {
                sum += n;
            }
        }
    }
    Some(sum)
}

/// The whole machine's CPU time (every CPU, the first line of `/proc/stat`) by what it was
/// spent on, in seconds: since boot, or over a measurement (`since`). The watched processes'
/// own time is part of `user` and `system`; `irq` is time in interrupts and softirqs (the
/// loopback's packet processing among it), which a kernel that samples time by ticks also
/// charges to the process it interrupted and one that accounts irq time apart charges to none;
/// `steal` is time the hypervisor gave to other guests while this one could run.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MachineTime {
    /// user and nice (guest time is counted in user already).
    pub user: f64,
    pub system: f64,
    /// hardware interrupts and softirqs.
    pub irq: f64,
    pub steal: f64,
    /// idle and iowait.
    pub idle: f64,
}

impl MachineTime {
    pub fn now() -> Option<Self> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        Self::parse(&s)
    }

    /// From the text of `/proc/stat`: the `cpu` line's user nice system idle iowait irq
    /// softirq steal, in ticks.
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse::<u64>().map(|t| t as f64 / ticks_per_sec()))
            .collect::<Result<_, _>>()
            .ok()?;
        (f.len() == 8).then(|| Self {
            user: f[0] + f[1],
            system: f[2],
            idle: f[3] + f[4],
            irq: f[5] + f[6],
            steal: f[7],
        })
    }

    /// The time spent from `earlier` to this reading.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            user: (self.user - earlier.user).max(0.0),
            system: (self.system - earlier.system).max(0.0),
            irq: (self.irq - earlier.irq).max(0.0),
            steal: (self.steal - earlier.steal).max(0.0),
            idle: (self.idle - earlier.idle).max(0.0),
        }
    }

    /// Every CPU's time but idle and iowait.
    pub fn busy(&self) -> f64 {
        self.user + self.system + self.irq + self.steal
    }
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
    /// Each watch's CPU seconds and context switches at the start.
    start: Vec<(Option<f64>, Option<u64>)>,
    machine: Option<MachineTime>,
    started: Instant,
}

/// The CPU each process used over a measurement, and how often its threads were switched out.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CpuUse {
    pub wall_seconds: f64,
    /// CPU seconds by process name.
    pub seconds: BTreeMap<String, f64>,
    pub total_seconds: f64,
    /// Context switches by process name (a floor: see the module's doc). Each is a thread that
    /// blocked (waiting for a socket, a lock, a timer) or was preempted: what a process's
    /// wake-ups cost, counted.
    #[serde(default)]
    pub switches: BTreeMap<String, u64>,
    /// The whole machine's time over the measurement: what every process (watched or not) and
    /// the kernel's interrupt work took, beside the watched processes' `total_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineTime>,
}

impl Probe {
    pub fn start(watches: &[Watch]) -> Self {
        Self {
            watches: watches.to_vec(),
            start: watches.iter().map(usage).collect(),
            machine: MachineTime::now(),
            started: Instant::now(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let mut out = CpuUse {
            wall_seconds: self.started.elapsed().as_secs_f64(),
            machine: self
                .machine
                .zip(MachineTime::now())
                .map(|(a, b)| b.since(&a)),
            ..Default::default()
        };
        for (w, (cpu_then, switches_then)) in self.watches.iter().zip(&self.start) {
            let (cpu_now, switches_now) = usage(w);
            if let (Some(a), Some(b)) = (cpu_then, cpu_now) {
                let d = (b - a).max(0.0);
                *out.seconds.entry(w.name.clone()).or_default() += d;
                out.total_seconds += d;
            }
            if let (Some(a), Some(b)) = (switches_then, switches_now) {
                // A thread that exited since the start takes its switches with it.
                *out.switches.entry(w.name.clone()).or_default() += b.saturating_sub(*a);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A thread that sleeps 200 times blocks 200 times: each sleep is a voluntary switch, which
    /// the count over this process's threads must see. The main thread, which waits once, would
    /// not.
    #[test]
    fn a_sleeping_thread_s_switches_are_counted_with_its_process() -> anyhow::Result<()> {
        let me: Watch = "self=self".parse().map_err(anyhow::Error::msg)?;
        let probe = Probe::start(std::slice::from_ref(&me));
        let (slept, done) = mpsc::channel();
        let (leave, told) = mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            for _ in 0..200 {
                std::thread::sleep(Duration::from_micros(200));
            }
            slept.send(()).expect("the test waits");
            // Still alive while measured: an exited thread takes its count with it.
            told.recv().expect("the test says when to end");
        });
        done.recv()?;
        let used = probe.stop();
        leave.send(())?;
        sleeper
            .join()
            .map_err(|_| anyhow::anyhow!("the sleeper panicked"))?;
        let switched = used.switches["self"];
        assert!(
            switched >= 200,
            "{switched} context switches counted for 200 sleeps"
        );
        Ok(())
    }

    /// The `cpu` line's eight fields, by what they count; a line cut short is no reading.
    #[test]
    fn the_machine_s_time_is_read_by_kind() {
        let t = ticks_per_sec();
        let stat = "cpu  100 10 50 1000 5 1 20 3 0 0\ncpu0 50 5 25 500 2 1 10 1 0 0\n";
        let m = MachineTime::parse(stat).expect("a full cpu line");
        let in_ticks = |v: f64| (v * t).round() as u64;
        assert_eq!(
            [m.user, m.system, m.irq, m.steal, m.idle].map(in_ticks),
            [110, 50, 21, 3, 1005]
        );
        assert_eq!(in_ticks(m.busy()), 184);
        assert_eq!(MachineTime::parse("cpu  100 10 50 1000\n"), None);
        let later = MachineTime {
            user: m.user + 1.0,
            ..m
        };
        assert!((later.since(&m).busy() - 1.0).abs() < 1e-9);
    }

    /// A thread that spins for 300 ms of CPU: the machine's busy time over the measurement
    /// covers what this process was charged (within two ticks of rounding).
    #[test]
    fn the_machine_s_busy_time_covers_a_watched_process_s() -> anyhow::Result<()> {
        let me: Watch = "self=self".parse().map_err(anyhow::Error::msg)?;
        let probe = Probe::start(std::slice::from_ref(&me));
        let spinner = std::thread::spawn(|| {
            let (start, wall) = (cpu_now(), Instant::now());
            let mut x = 0u64;
            while cpu_now() - start < 0.3 && wall.elapsed() < Duration::from_secs(10) {
                for i in 0..1_000_000u64 {
                    x = x.wrapping_mul(31).wrapping_add(i);
                }
            }
            std::hint::black_box(x);
        });
        spinner
            .join()
            .map_err(|_| anyhow::anyhow!("the spinner panicked"))?;
        let used = probe.stop();
        let machine = used.machine.context("/proc/stat read")?;
        let two_ticks = 2.0 / ticks_per_sec();
        assert!(used.total_seconds >= 0.25, "{used:?}");
        assert!(machine.busy() + two_ticks >= used.total_seconds, "{used:?}");
        Ok(())
    }

    /// This process's CPU seconds so far.
    fn cpu_now() -> f64 {
        stat(std::process::id())
            .map(|(_, t, _)| t as f64 / ticks_per_sec())
            .unwrap_or(0.0)
    }

    /// A tree counts its descendants' switches: a shell whose child shell sleeps ten times (each
    /// `sleep` waited for), against the same shell counted alone.
    #[test]
    fn a_tree_counts_its_descendants_switches() -> anyhow::Result<()> {
        let mut shell = std::process::Command::new("sh")
            .args([
                "-c",
                "sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.01; done; sleep 30'; true",
            ])
            .spawn()?;
        let alone = Watch {
            name: "shell".into(),
            pid: shell.id(),
            tree: false,
        };
        let tree = Watch {
            tree: true,
            ..alone.clone()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut own, mut all) = (0, 0);
        while Instant::now() < deadline {
            let count = |w| usage(w).1.context("the shell's context switches");
            (own, all) = (count(&alone)?, count(&tree)?);
            if all >= own + 10 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its descendants, listed before it ends (they are someone else's children after).
        let children = descendants(alone.pid);
        let _ = shell.kill();
        let _ = shell.wait();
        for (pid, _) in children {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        assert!(
            all >= own + 10,
            "the tree counts {all}, the shell alone {own}"
        );
        Ok(())
    }
}
