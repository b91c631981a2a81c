//! The saved login: `{server, user, token, ca_file}` in `$CHAT_CONFIG` or `~/.config/chat/config.json`,
//! readable by its owner only (mode 0600), written atomically.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::failure::Failure;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// `http(s)://host:port` of a gateway.
    pub server: String,
    pub user: String,
    pub token: String,
    /// PEM file of CAs trusted for this server (`--ca-file` at login), besides the default roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// Where the login is kept: `$CHAT_CONFIG`, else `$XDG_CONFIG_HOME/chat/config.json`, else
/// `~/.config/chat/config.json`.
pub fn path() -> Result<PathBuf, Failure> {
    let set = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = set("CHAT_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    let dir = match (set("XDG_CONFIG_HOME"), set("HOME")) {
        (Some(x), _) => PathBuf::from(x),
        (None, Some(home)) => PathBuf::from(home).join(".config"),
        (None, None) => {
            return Err(Failure::other(
                "cannot tell where to keep the login: set CHAT_CONFIG or HOME",
            ))
        }
    };
    Ok(dir.join("chat").join("config.json"))
}

/// The saved login; `NotLoggedIn` when there is none.
pub fn load(path: &Path) -> Result<Config, Failure> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::NotLoggedIn(path.to_owned()))
        }
        Err(e) => {
            return Err(Failure::Other(
                anyhow::Error::new(e).context(format!("cannot read {}", path.display())),
            ))
        }
    };
    serde_json::from_str(&text).map_err(|e| {
        Failure::other(format!(
            "{} is not a valid login ({e}); run `chat login <user>` again",
            path.display()
        ))
    })
}

/// Saves the login with mode 0600 (the directory, when created, gets 0700).
pub fn save(path: &Path, config: &Config) -> Result<(), Failure> {
    let write = || -> anyhow::Result<()> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let name = path.file_name().context("the config path names no file")?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        // An existing file of that name may have had looser permissions.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut text = serde_json::to_string_pretty(config)?;
        text.push('\n');
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    };
    write().map_err(Failure::Other)
}
