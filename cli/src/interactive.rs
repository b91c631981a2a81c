//! Interactive mode: a line-based prompt. `/to bob` picks the peer, plain lines are sent to it,
//! incoming messages are printed above the prompt, `/history [N]`, `/help`, `/quit`.

use std::collections::HashMap;
use std::io::IsTerminal as _;

use chat_client::Event;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::connection::Connection;
use crate::events::{Shown, Tracker};
use crate::failure::Failure;
use crate::output::{accepted_event, history_text, message_event, stdout_line, stdout_raw, Out};
use crate::session::Session;

const HELP: &str = "\
/to USER       talk to USER (plain lines are sent to them)
/history [N]   the last N messages with them (default 20)
/quit          leave (Ctrl-D too)
//text         send a line that starts with '/'";

/// The terminal: lines go above the prompt, which is shown only when a person is typing.
struct Screen {
    out: Out,
    prompt: bool,
    peer: Option<String>,
}

impl Screen {
    fn show_prompt(&self) {
        if self.prompt {
            stdout_raw(&format!("{}> ", self.peer.as_deref().unwrap_or("")));
        }
    }

    /// Runs `print` with the prompt line cleared, then shows the prompt again.
    fn above(&self, print: impl FnOnce()) {
        if self.prompt {
            stdout_raw("\r\x1b[2K");
        }
        print();
        self.show_prompt();
    }

    fn text(&self, text: &str, event: serde_json::Value) {
        self.above(|| self.out.emit(text, event));
    }

    fn note(&self, text: &str) {
        if !self.out.json {
            self.above(|| self.out.note(text));
        }
    }

    fn error(&self, f: &Failure) {
        self.above(|| self.out.error(f));
    }

    fn shown(&self, s: Shown) {
        if self.out.json {
            if let Some(e) = s.event {
                self.above(|| self.out.event(e));
            }
            return;
        }
        if s.text.is_none() && s.note.is_none() {
            return;
        }
        self.above(|| {
            if let Some(t) = s.text {
                stdout_line(&t);
            }
            if let Some(n) = s.note {
                self.out.note(&n);
            }
        });
    }
}

/// Reads stdin on a thread of its own (a blocked read must not hold up the exit).
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Failures that end interactive mode; the others are shown and the prompt comes back.
fn fatal(f: &Failure) -> bool {
    matches!(f, Failure::Unauthorized { .. } | Failure::Replaced)
}

pub async fn run(out: Out, server: Option<&str>, to: Option<String>) -> Result<(), Failure> {
    let session = Session::load(server)?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut conn = Connection::open(&session, true).await?;
    let mut tracker = Tracker::new(conn.client().user());
    let mut screen = Screen {
        out,
        prompt: !out.json && std::io::stdin().is_terminal() && std::io::stdout().is_terminal(),
        peer: None,
    };
    // Shown after the first "connected".
    let mut greeting = Some(to);
    let mut lines = stdin_lines();
    // This session's messages not yet delivered: conversation -> sequences.
    let mut undelivered: HashMap<String, Vec<u64>> = HashMap::new();
    let mut own: std::collections::HashSet<String> = Default::default();

    let result = loop {
        tokio::select! {
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
            event = conn.next_event() => {
                let event = match event {
                    Ok(e) => e,
                    Err(f) => break Err(f),
                };
                match &event {
                    // Shown by the tracker; it will never be stored, so never delivered.
                    Event::Failed(f) => {
                        own.remove(&f.client_message_id);
                    }
                    Event::Stored(s) if own.remove(&s.client_message_id) => {
                        undelivered.entry(s.conversation.clone()).or_default().push(s.seq);
                    }
                    Event::Receipt(r) => {
                        if let Some(seqs) = undelivered.get_mut(&r.conversation) {
                            let before = seqs.len();
                            seqs.retain(|s| *s > r.up_to_seq);
                            if seqs.len() < before {
                                screen.note(&format!("(delivered to {})", r.peer));
                            }
                        }
                    }
                    _ => {}
                }
                match tracker.show(conn.client(), &event) {
                    Ok(s) => screen.shown(s),
                    Err(f) => break Err(f),
                }
                if let (Event::Connected { .. }, Some(to)) = (&event, greeting.take()) {
                    screen.note("type a message, or /help");
                    // Unless a `/to` typed meanwhile came first.
                    if let Some(peer) = to.filter(|_| screen.peer.is_none()) {
                        set_peer(&mut screen, peer);
                    }
                }
            }
            line = lines.recv() => {
                let Some(line) = line else { break Ok(()) }; // end of input
                let line = line.trim_end_matches('\r');
                let (command, arg) = match line.split_once(char::is_whitespace) {
                    Some((c, a)) => (c, a.trim()),
                    None => (line, ""),
                };
                let to_send = match command {
                    "/quit" | "/exit" => break Ok(()),
                    "/help" => {
                        screen.above(|| stdout_line(HELP));
                        None
                    }
                    "/to" if arg.is_empty() => {
                        match &screen.peer {
                            Some(p) => screen.note(&format!("talking to {p}")),
                            None => screen.note("talking to nobody yet: /to USER"),
                        }
                        None
                    }
                    "/to" => {
                        set_peer(&mut screen, arg.to_owned());
                        None
                    }
                    "/history" => {
                        let limit = match arg {
                            "" => Ok(20),
                            n => n.parse::<u32>().map(|n| n.clamp(1, 500)).map_err(|_| ()),
                        };
                        match (limit, screen.peer.clone()) {
                            (Err(()), _) => screen.note("usage: /history [N]"),
                            (Ok(_), None) => screen.note("talking to nobody yet: /to USER"),
                            (Ok(limit), Some(peer)) => {
                                match session.history(&peer, Some(limit), None).await {
                                    Ok((messages, _)) => {
                                        if messages.is_empty() {
                                            screen.note(&format!("no messages with {peer}"));
                                        }
                                        for m in &messages {
                                            screen.text(&history_text(m), message_event(m));
                                        }
                                    }
                                    Err(f) if fatal(&f) => break Err(f),
                                    Err(f) => screen.error(&f),
                                }
                            }
                        }
                        None
                    }
                    c if c.starts_with("//") => Some(&line[1..]),
                    c if c.starts_with('/') => {
                        screen.note(&format!("unknown command {c}; /help lists them"));
                        None
                    }
                    _ if line.trim().is_empty() => None,
                    _ => Some(line),
                };
                match (to_send, screen.peer.clone()) {
                    (None, _) => screen.above(|| ()),
                    (Some(_), None) => screen.note("who to? pick a peer first: /to USER"),
                    (Some(body), Some(peer)) => {
                        // Events wait in the queue meanwhile (accepted is usually milliseconds).
                        let sent = tokio::select! {
                            r = conn.send(&peer, body) => r,
                            _ = interrupt.recv() => break Ok(()),
                            _ = terminate.recv() => break Ok(()),
                        };
                        match sent {
                            Ok(a) => {
                                own.insert(a.client_message_id.clone());
                                if out.json {
                                    screen.above(|| out.event(accepted_event(&peer, &a)));
                                } else {
                                    screen.above(|| ());
                                }
                            }
                            Err(f) if fatal(&f) => break Err(f),
                            Err(f) => screen.error(&f),
                        }
                    }
                }
            }
        }
    };
    if screen.prompt {
        stdout_line("");
    }
    conn.close().await;
    result
}

fn set_peer(screen: &mut Screen, peer: String) {
    screen.peer = Some(peer.clone());
    if screen.out.json {
        screen.above(|| screen.out.event(json!({ "event": "peer", "peer": peer })));
    } else {
        screen.note(&format!("talking to {peer}"));
    }
}
