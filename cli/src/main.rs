//! `chat`: the command-line chat client, on the Rust client library (`chat-client`).
//!
//! ```text
//! chat login alice [--server http://127.0.0.1:8080] [--token JWT] [--ca-file ca.pem]
//! chat send bob "hi" [--wait-delivered]
//! chat listen
//! chat history bob [--limit N] [--before SEQ]
//! chat conversations [--limit N] [--before CURSOR | --all]
//! chat [interactive [--to bob]]
//! ```
//!
//! `--json` makes every command print one JSON object per line. Exit codes: see
//! [`failure::exit`] (and `chat --help`).

mod commands;
mod config;
mod connection;
mod events;
mod failure;
mod interactive;
mod output;
mod session;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::failure::Failure;
use crate::output::Out;

const AFTER_HELP: &str = "\
The login is kept in $CHAT_CONFIG (default ~/.config/chat/config.json, mode 0600).

Exit codes:
  0  success
  1  other error
  2  bad arguments
  3  not logged in (run `chat login <user>`)
  4  the server refused the token (HTTP 401)
  5  the server cannot be reached, or is not a chat gateway
  6  the server refused the request (its code and message are printed), or would:
     a user id of '.' or '..' cannot be sent
  7  timeout (--timeout)
  8  another session of the same user replaced this one";

#[derive(Parser)]
#[command(
    name = "chat",
    version,
    about = "Command-line chat client: log in, send, listen, list conversations, read history, or chat interactively",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Print one JSON object per line (errors as {"event":"error",...} on stderr).
    #[arg(long, global = true)]
    json: bool,

    /// Gateway address, http(s)://host:port (default: the one saved by `chat login`;
    /// for `chat login`, http://127.0.0.1:8080).
    #[arg(long, global = true, env = "CHAT_SERVER", value_name = "URL")]
    server: Option<String>,

    /// PEM file of CAs to trust for an https:// server, besides the usual public roots (saved
    /// by `chat login`).
    #[arg(long, global = true, env = "CHAT_CA_FILE", value_name = "PATH")]
    ca_file: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Log in: get a dev token for USER (local stack) or use --token, and save the login.
    Login {
        /// The user id (may be left out with --token: the token names the user).
        user: Option<String>,
        /// A token (JWT) to use instead of asking the server for a dev token.
        #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Send a message; prints its id once the server accepted it (it is durable).
    Send {
        /// The recipient's user id.
        to: String,
        /// The message (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        body: Vec<String>,
        /// Also wait until the recipient has received it (their delivery receipt); while they
        /// are offline this waits, up to --timeout.
        #[arg(long)]
        wait_delivered: bool,
        /// Give up after this many seconds (exit code 7).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Print messages as they arrive (and those waiting) until Ctrl-C; acknowledges them.
    Listen,
    /// Print a page of the conversation with PEER, oldest first.
    History {
        /// The other user.
        peer: String,
        /// Messages per page (1 to 500; the server's default is 50).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: Option<u32>,
        /// Only messages before this sequence (for the previous page).
        #[arg(long, value_name = "SEQ")]
        before: Option<u64>,
    },
    /// List your conversations, newest activity first: peer, unread count, last activity (UTC)
    /// and the last message (when the server keeps bodies).
    Conversations {
        /// Conversations per page (1 to 200; the server's default is 50, 200 with --all).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200))]
        limit: Option<u32>,
        /// Start after this cursor (printed by the previous page) instead of at the newest.
        #[arg(long, value_name = "CURSOR")]
        before: Option<String>,
        /// Follow the pages to the end instead of printing one.
        #[arg(long)]
        all: bool,
    },
    /// Chat at a prompt: `/to bob`, then type lines; `/history`, `/quit` (the default command).
    Interactive {
        /// Start talking to this user.
        #[arg(long)]
        to: Option<String>,
    },
}

async fn run(cli: Cli, out: Out) -> Result<(), Failure> {
    let server = cli.server.as_deref();
    session::set_ca_file(cli.ca_file);
    match cli.command.unwrap_or(Command::Interactive { to: None }) {
        Command::Login { user, token } => commands::login(out, server, user, token).await,
        Command::Send {
            to,
            body,
            wait_delivered,
            timeout,
        } => {
            let body = body.join(" ");
            let send = commands::send(out, server, &to, &body, wait_delivered);
            match timeout.map(Duration::from_secs) {
                Some(t) => tokio::time::timeout(t, send)
                    .await
                    .map_err(|_| Failure::Timeout(t))?,
                None => send.await,
            }
        }
        Command::Listen => commands::listen(out, server).await,
        Command::History {
            peer,
            limit,
            before,
        } => commands::history(out, server, &peer, limit, before).await,
        Command::Conversations { limit, before, all } => {
            commands::conversations(out, server, limit, before, all).await
        }
        Command::Interactive { to } => interactive::run(out, server, to).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out { json: cli.json };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            out.error(&Failure::other(format!("cannot start: {e}")));
            return ExitCode::from(failure::exit::ERROR);
        }
    };
    let result = runtime.block_on(run(cli, out));
    // Do not wait for blocking work still in flight (an abandoned HTTP request).
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            out.error(&f);
            ExitCode::from(f.exit_code())
        }
    }
}
