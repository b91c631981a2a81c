//! `login`, `send`, `listen`, `history`, `conversations`.

use chat_client::{ConversationSummary, Event, MAX_CONVERSATIONS_PAGE};
use chat_proto::v1::Accepted;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{self, Config};
use crate::connection::Connection;
use crate::events::{Shown, Tracker};
use crate::failure::Failure;
use crate::output::{
    accepted_event, conversation_event, conversation_rows, history_text, message_event, Out,
};
use crate::session::{dev_token, Server, Session};

/// The local stack's first gateway.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// `chat login [USER] [--token JWT]`: checks the token with the server (`GET /me`) and saves it.
pub async fn login(
    out: Out,
    server: Option<&str>,
    user: Option<String>,
    token: Option<String>,
) -> Result<(), Failure> {
    let path = config::path()?;
    // Logging in again keeps the saved server unless told otherwise.
    let saved = config::load(&path).ok();
    let saved_server = saved.as_ref().map(|c| c.server.as_str());
    let saved_ca = saved.as_ref().and_then(|c| c.ca_file.as_deref());
    let server =
        Server::parse(server.or(saved_server).unwrap_or(DEFAULT_SERVER))?.trusting(saved_ca)?;
    let given_token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
    let from_flag = given_token.is_some();
    let token = match (given_token, &user) {
        (Some(t), _) => t,
        (None, Some(user)) => dev_token(&server, user).await?,
        (None, None) => {
            return Err(Failure::Usage(
                "say who: `chat login <user>` (or pass --token)".to_owned(),
            ))
        }
    };
    let session = Session::new(server, token);
    let who = session.whoami().await.map_err(|f| match f {
        Failure::Unauthorized { .. } => Failure::Unauthorized {
            during_login: from_flag,
        },
        f => f,
    })?;
    if let Some(user) = user.filter(|u| *u != who) {
        return Err(Failure::other(format!(
            "the token is for {who}, not {user}"
        )));
    }
    config::save(
        &path,
        &Config {
            server: session.server.http.clone(),
            user: who.clone(),
            token: session.token.clone(),
            ca_file: session.server.ca_file.clone(),
        },
    )?;
    out.emit(
        &format!(
            "logged in as {who} at {} (saved in {})",
            session.server.http,
            path.display()
        ),
        json!({
            "event": "logged_in",
            "user": who,
            "server": session.server.http,
            "config": path.display().to_string(),
        }),
    );
    Ok(())
}

/// `chat send TO BODY [--wait-delivered]`: prints the message id once accepted.
pub async fn send(
    out: Out,
    server: Option<&str>,
    to: &str,
    body: &str,
    wait_delivered: bool,
) -> Result<(), Failure> {
    let session = Session::load(server)?;
    if !wait_delivered {
        // Over REST: a websocket would replace this user's other session (a `chat listen`).
        let accepted = session
            .send_rest(&uuid::Uuid::new_v4().to_string(), to, body)
            .await?;
        out.emit(&accepted.message_id, accepted_event(to, &accepted));
        return Ok(());
    }
    // Receipts come on the websocket, so this one opens a session.
    let mut conn = Connection::open(&session, false).await?;
    let accepted = conn.send(to, body).await?;
    out.emit(&accepted.message_id, accepted_event(to, &accepted));
    let seq = wait_for_receipt(&mut conn, &session, to, &accepted).await?;
    out.note(&format!("delivered to {to}"));
    out.event(json!({
        "event": "delivered",
        "to": to,
        "seq": seq,
        "messageId": accepted.message_id,
        "conversation": accepted.conversation,
    }));
    conn.close().await;
    Ok(())
}

/// Waits until the recipient acknowledged the message; returns its sequence. A message the
/// server set aside after accepting it (`failed`) ends the wait with its code.
async fn wait_for_receipt(
    conn: &mut Connection,
    session: &Session,
    to: &str,
    accepted: &Accepted,
) -> Result<u64, Failure> {
    let mut seq = None;
    let mut acked = 0;
    let mut connections = 0;
    loop {
        match conn.next_event().await? {
            Event::Stored(s) if s.client_message_id == accepted.client_message_id => {
                seq = Some(s.seq);
            }
            Event::Receipt(r) if r.conversation == accepted.conversation => {
                acked = acked.max(r.up_to_seq);
            }
            // Accepted, then set aside as a dead letter: it will never be delivered.
            Event::Failed(f)
                if f.client_message_id == accepted.client_message_id && f.peer == to =>
            {
                return Err(Failure::Refused {
                    code: f.code,
                    message: format!(
                        "the message was accepted but cannot be stored: {}",
                        f.reason
                    ),
                });
            }
            Event::Connected { .. } => {
                connections += 1;
                // A `stored` frame pushed while we were away is not repeated: ask the history.
                if connections > 1 && seq.is_none() {
                    let (page, _) = session.history(to, Some(500), None).await?;
                    seq = page
                        .iter()
                        .find(|m| m.message_id == accepted.message_id)
                        .map(|m| m.seq);
                }
            }
            _ => {}
        }
        if let Some(seq) = seq.filter(|s| acked >= *s) {
            return Ok(seq);
        }
    }
}

/// Prints what an event shows, as `listen` does.
fn print(out: Out, shown: Shown) {
    if out.json {
        if let Some(e) = shown.event {
            out.event(e);
        }
    } else {
        if let Some(t) = shown.text {
            crate::output::stdout_line(&t);
        }
        if let Some(n) = shown.note {
            out.note(&n);
        }
    }
}

/// `chat listen`: prints messages (pending ones first) and acks them, until Ctrl-C or SIGTERM.
pub async fn listen(out: Out, server: Option<&str>) -> Result<(), Failure> {
    let session = Session::load(server)?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut conn = Connection::open(&session, true).await?;
    let mut tracker = Tracker::new(conn.client().user());
    out.note("listening; Ctrl-C to stop");
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            event = conn.next_event() => {
                let event = event?;
                print(out, tracker.show(conn.client(), &event)?);
            }
        }
    }
    conn.close().await;
    Ok(())
}

/// `chat history PEER`: one page, oldest first.
pub async fn history(
    out: Out,
    server: Option<&str>,
    peer: &str,
    limit: Option<u32>,
    before: Option<u64>,
) -> Result<(), Failure> {
    let session = Session::load(server)?;
    let (messages, next_before) = session.history(peer, limit, before).await?;
    for m in &messages {
        out.emit(&history_text(m), message_event(m));
    }
    if messages.is_empty() {
        out.note(&format!("no messages with {peer}"));
    }
    if let Some(n) = next_before {
        out.note(&format!("older messages: chat history {peer} --before {n}"));
    }
    out.event(json!({
        "event": "history",
        "peer": peer,
        "count": messages.len(),
        "nextBefore": next_before,
    }));
    Ok(())
}

/// `chat conversations [--limit N] [--before CURSOR | --all]`: the user's conversations, newest
/// activity first; one page, or with `--all` every page (collected first, so the columns line
/// up).
pub async fn conversations(
    out: Out,
    server: Option<&str>,
    limit: Option<u32>,
    before: Option<String>,
    all: bool,
) -> Result<(), Failure> {
    let session = Session::load(server)?;
    let limit = if all {
        Some(limit.unwrap_or(MAX_CONVERSATIONS_PAGE))
    } else {
        limit
    };
    let mut listed: Vec<ConversationSummary> = Vec::new();
    let mut cursor = before;
    let next_before = loop {
        let page = session.conversations(limit, cursor.as_deref()).await?;
        listed.extend(page.conversations);
        match page.next_before {
            // A cursor that does not move would loop for ever: the server is wrong.
            Some(next) if all && cursor.as_deref() == Some(next.as_str()) => {
                return Err(Failure::other(format!(
                    "the server returned the same page cursor twice ({next})"
                )))
            }
            Some(next) if all => cursor = Some(next),
            next => break next,
        }
    };
    if out.json {
        for c in &listed {
            out.event(conversation_event(c));
        }
    } else {
        for row in conversation_rows(&listed) {
            crate::output::stdout_line(&row);
        }
    }
    if listed.is_empty() {
        out.note("no conversations");
    }
    if let Some(n) = &next_before {
        out.note(&format!("more: chat conversations --before {n} (or --all)"));
    }
    out.event(json!({
        "event": "conversations",
        "count": listed.len(),
        "nextBefore": next_before,
    }));
    Ok(())
}
