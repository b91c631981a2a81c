//! The files a stack keeps its data in, read whole: the brokers' log directories and the Postgres
//! servers' data directories, for the delete-on-ack canary scans (`make chaos`, and the
//! end-to-end shredding test).

use std::path::{Path, PathBuf};

/// How much a walk read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub files: u64,
    pub bytes: u64,
}

/// Reads every regular file under `dirs`, recursively, and hands each to `each` with its path.
/// Kafka's offset and time indexes are left out (preallocated and sparse, they hold no record
/// bytes), and so is whatever goes while the walk runs (a segment deleted, a temporary file).
pub fn read_each(dirs: &[PathBuf], mut each: impl FnMut(&Path, &[u8])) -> Read {
    let mut read = Read::default();
    let mut pending = dirs.to_vec();
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            let index = path
                .extension()
                .is_some_and(|e| e == "index" || e == "timeindex");
            if !kind.is_file() || index {
                continue;
            }
            let Ok(content) = std::fs::read(&path) else {
                continue;
            };
            read.files += 1;
            read.bytes += content.len() as u64;
            each(&path, &content);
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_file_below_but_kafkas_indexes() -> std::io::Result<()> {
        let root = std::env::temp_dir().join(format!("data-files-{}", std::process::id()));
        let nested = root.join("topic-0");
        std::fs::create_dir_all(&nested)?;
        std::fs::write(root.join("base"), b"one")?;
        std::fs::write(nested.join("00000000000000000000.log"), b"record bytes")?;
        std::fs::write(nested.join("00000000000000000000.index"), [0u8; 64])?;
        std::fs::write(nested.join("00000000000000000000.timeindex"), [0u8; 64])?;
        let mut seen = Vec::new();
        let read = read_each(&[root.clone(), root.join("gone")], |path, content| {
            seen.push((path.file_name().map(|n| n.to_owned()), content.len()));
        });
        std::fs::remove_dir_all(&root)?;
        seen.sort();
        assert_eq!(
            read,
            Read {
                files: 2,
                bytes: 15
            }
        );
        assert_eq!(
            seen,
            [
                (Some("00000000000000000000.log".into()), 12),
                (Some("base".into()), 3)
            ]
        );
        Ok(())
    }
}
