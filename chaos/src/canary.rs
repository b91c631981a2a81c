//! The delete-on-ack canary scan: every body the workload sends carries the run's marker
//! ([`marker`]), and after the scenario the brokers' log directories and the Postgres servers'
//! data directories are read byte for byte for it. In delete-on-ack mode a body is sealed before
//! it leaves the gateway (docs/design.md, "Crypto-shredding"), so the marker is found nowhere:
//! not in `inbound`, not in the outbound topics, not in the shards' tables or WAL. In keep mode
//! the same scan is the control: the bodies are there as text, and it must find them. In every
//! mode the services' logs hold no body.

use std::path::PathBuf;

use anyhow::Context;

use crate::stack::{repo_root, PG};

/// What every body of run `run` begins with (`workload`), and what the scan looks for.
pub fn marker(run: &str) -> String {
    format!("chaos-canary {run}")
}

/// What a scan read and found.
#[derive(Debug, Default)]
pub struct Scan {
    pub files: u64,
    pub bytes: u64,
    /// Occurrences of the marker.
    pub hits: usize,
}

impl Scan {
    pub fn note(&self) -> String {
        format!(
            "canary scan: {} bodies as text in {} files ({} MiB) of the brokers and the shards",
            self.hits,
            self.files,
            self.bytes >> 20
        )
    }
}

/// The three brokers' log directories and both Postgres servers' data directories.
async fn data_dirs() -> anyhow::Result<Vec<PathBuf>> {
    let state = std::env::var_os("CHAT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".local"));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(state.join("kafka-cluster"))
        .context("the cluster's state directory")?
        .flatten()
        .map(|e| e.path().join("data"))
        .filter(|d| d.is_dir())
        .collect();
    anyhow::ensure!(
        dirs.len() == 3,
        "found {} broker log directories",
        dirs.len()
    );
    for (name, port) in PG {
        let out = tokio::process::Command::new(repo_root().join("infra/scripts/postgres.sh"))
            .args(["status", "--name", name, "--port", &port.to_string()])
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let dir = text
            .rsplit_once(", data ")
            .map(|(_, d)| PathBuf::from(d.trim()))
            .with_context(|| format!("the data directory of {name}: {text}"))?;
        dirs.push(dir);
    }
    Ok(dirs)
}

/// Reads every file under the stack's data directories for `marker`.
pub async fn scan(marker: &str) -> anyhow::Result<Scan> {
    scan_dirs(data_dirs().await?, marker).await
}

/// Reads every file under `dirs` for `marker` (the services' logs: no body in either mode).
pub async fn scan_dirs(dirs: Vec<PathBuf>, marker: &str) -> anyhow::Result<Scan> {
    let marker = marker.as_bytes().to_vec();
    tokio::task::spawn_blocking(move || {
        let finder = memchr::memmem::Finder::new(&marker);
        let mut hits = 0;
        let read = chaos::data_files::read_each(&dirs, |_, content| {
            hits += finder.find_iter(content).count();
        });
        Scan {
            files: read.files,
            bytes: read.bytes,
            hits,
        }
    })
    .await
    .context("the scan")
}
