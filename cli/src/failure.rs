//! Why a command failed: a one-line message, a machine-readable code and a distinct exit code.

use std::path::PathBuf;
use std::time::Duration;

use chat_client::{ClientError, RestResponse};

/// Exit codes (also listed in `chat --help`).
pub mod exit {
    /// Anything not listed below.
    pub const ERROR: u8 = 1;
    /// Bad arguments (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// No saved login: run `chat login`.
    pub const NOT_LOGGED_IN: u8 = 3;
    /// The server refused the token (HTTP 401).
    pub const UNAUTHORIZED: u8 = 4;
    /// The server cannot be reached, or is not a chat gateway.
    pub const UNREACHABLE: u8 = 5;
    /// The server refused the request (invalid_recipient, body_too_large, ...).
    pub const REFUSED: u8 = 6;
    /// No answer within `--timeout`.
    pub const TIMEOUT: u8 = 7;
    /// Another session of the same user replaced this one (close code 4001).
    pub const REPLACED: u8 = 8;
}

/// A failed command.
#[derive(Debug)]
pub enum Failure {
    Usage(String),
    NotLoggedIn(PathBuf),
    /// The token was refused; `during_login` changes the advice.
    Unauthorized {
        during_login: bool,
    },
    Unreachable {
        server: String,
        detail: String,
    },
    Refused {
        code: String,
        message: String,
    },
    /// What the server would refuse with `code`, refused here because no request can carry it
    /// (exit code and `--json` code as the server's refusal).
    NotSent {
        code: &'static str,
        message: String,
    },
    Timeout(Duration),
    Replaced,
    Other(anyhow::Error),
}

impl Failure {
    pub fn other(message: impl std::fmt::Display) -> Self {
        Failure::Other(anyhow::anyhow!("{message}"))
    }

    /// Maps a client library error; `server` is the `http(s)://` base the user gave.
    pub fn from_client(e: ClientError, server: &str) -> Self {
        match e {
            ClientError::Unauthorized => Failure::Unauthorized {
                during_login: false,
            },
            ClientError::Connect { source, .. } => Failure::Unreachable {
                server: server.to_owned(),
                detail: source.to_string(),
            },
            // REST transport failures (connection refused, DNS, TLS, timeouts) come back as Http,
            // as "<url>: <what happened>".
            ClientError::Http(detail) => Failure::Unreachable {
                server: server.to_owned(),
                detail: match detail.split_once(": ") {
                    Some((url, rest)) if url.starts_with(server) => rest.to_owned(),
                    _ => detail,
                },
            },
            ClientError::Tls { reason, .. } => Failure::Unreachable {
                server: server.to_owned(),
                detail: reason,
            },
            ClientError::CaFile { path, reason } => {
                Failure::Usage(format!("--ca-file {path}: {reason}"))
            }
            ClientError::Refused { code, message } => Failure::Refused { code, message },
            ClientError::Timeout(d) => Failure::Timeout(d),
            ClientError::Closed => Failure::Unreachable {
                server: server.to_owned(),
                detail: "the connection closed".to_owned(),
            },
        }
    }

    /// Maps a REST answer that is not a success.
    pub fn from_rest(r: &RestResponse, server: &str) -> Self {
        if r.status == 401 {
            return Failure::Unauthorized {
                during_login: false,
            };
        }
        match (r.body["code"].as_str(), r.body["message"].as_str()) {
            (Some(code), Some(message)) => Failure::Refused {
                code: code.to_owned(),
                message: message.to_owned(),
            },
            // Not the gateway's error shape: something else answers at that address.
            _ => Failure::Unreachable {
                server: server.to_owned(),
                detail: format!(
                    "unexpected answer (HTTP {}); is it a chat gateway?",
                    r.status
                ),
            },
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => exit::USAGE,
            Failure::NotLoggedIn(_) => exit::NOT_LOGGED_IN,
            Failure::Unauthorized { .. } => exit::UNAUTHORIZED,
            Failure::Unreachable { .. } => exit::UNREACHABLE,
            Failure::Refused { .. } | Failure::NotSent { .. } => exit::REFUSED,
            Failure::Timeout(_) => exit::TIMEOUT,
            Failure::Replaced => exit::REPLACED,
            Failure::Other(_) => exit::ERROR,
        }
    }

    /// Machine-readable code (`--json`): the server's own code for a refusal.
    pub fn code(&self) -> &str {
        match self {
            Failure::Usage(_) => "usage",
            Failure::NotLoggedIn(_) => "not_logged_in",
            Failure::Unauthorized { .. } => "unauthorized",
            Failure::Unreachable { .. } => "unreachable",
            Failure::Refused { code, .. } => code,
            Failure::NotSent { code, .. } => code,
            Failure::Timeout(_) => "timeout",
            Failure::Replaced => "replaced",
            Failure::Other(_) => "error",
        }
    }

    /// One line for a person.
    pub fn message(&self) -> String {
        match self {
            Failure::Usage(m) => m.clone(),
            Failure::NotLoggedIn(path) => format!(
                "not logged in (no {}): run `chat login <user>` first",
                path.display()
            ),
            Failure::Unauthorized {
                during_login: false,
            } => "the server refused the token; run `chat login`".to_owned(),
            Failure::Unauthorized { during_login: true } => {
                "the server refused the token; check --token / CHAT_TOKEN".to_owned()
            }
            Failure::Unreachable { server, detail } => {
                format!("cannot reach a chat server at {server}: {detail}")
            }
            Failure::Refused { code, message } => {
                format!("the server refused it: {code}: {message}")
            }
            Failure::NotSent { code, message } => format!("not sent: {code}: {message}"),
            Failure::Timeout(d) => format!("no answer within {} s", d.as_secs_f32()),
            Failure::Replaced => {
                "another session of this user replaced this one (close code 4001)".to_owned()
            }
            Failure::Other(e) => format!("{e:#}"),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Other(e.into())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}
