//! Websocket connections from a chosen local address.
//!
//! The client library connects with `connect_async`, which lets the kernel pick the source
//! address; one source address has at most ~28K ephemeral ports towards one server port. Here the
//! socket is bound to a chosen 127.0.0.N first (`TcpSocket::bind`), then upgraded with
//! `client_async`, so many source addresses can be used. `wss://` URLs are TLS over that socket,
//! trusting the default roots and the `--ca-file` given ([`trust`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use anyhow::Context;
use chat_common::auth::{TokenIssuer, DEFAULT_AUDIENCE, DEFAULT_ISSUER};
use chat_common::config::DEV_JWT_SECRET;
use chat_common::ids::UserId;
use chat_proto::v1::{ClientFrame, ServerFrame};
use prost::Message as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The CAs `wss://` connections trust, set once from `--ca-file`.
static TLS: OnceLock<chat_client::Tls> = OnceLock::new();

/// Trusts `tls`'s CAs for every `wss://` connection of this process (call before connecting).
pub fn trust(tls: chat_client::Tls) {
    let _ = TLS.set(tls);
}

/// `ws://host:port` (or `wss://`) -> the socket address.
pub fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    let hostport = url
        .trim_start_matches("ws://")
        .trim_start_matches("wss://")
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default();
    hostport
        .parse()
        .with_context(|| format!("expected ws://IP:PORT or wss://IP:PORT, got {url:?}"))
}

/// A TCP connection to `addr` from `source` (any port).
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a websocket to `url` + `path_and_query` from `source`.
pub async fn connect(
    url: &str,
    path_and_query: &str,
    source: Option<IpAddr>,
) -> anyhow::Result<Ws> {
    let stream = tcp(addr_of(url)?, source).await?;
    let full = format!("{}{}", url.trim_end_matches('/'), path_and_query);
    // tungstenite's default read buffer is 128 KiB per socket; tens of thousands of sockets in
    // one process need a small one (it grows to the frame being read).
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.read_buffer_size = 4096;
    let tls = TLS.get_or_init(chat_client::Tls::default).client_config();
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
        full,
        stream,
        Some(config),
        Some(connector),
    )
    .await?;
    Ok(ws)
}

/// Signs dev tokens the way the gateway verifies them (`JWT_SECRET`, default the dev secret).
pub fn issuer() -> TokenIssuer {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    TokenIssuer::hs256(
        env("JWT_SECRET", DEV_JWT_SECRET).as_bytes(),
        &env("JWT_ISSUER", DEFAULT_ISSUER),
        &env("JWT_AUDIENCE", DEFAULT_AUDIENCE),
    )
}

pub fn token(issuer: &TokenIssuer, user: &str) -> anyhow::Result<String> {
    Ok(issuer.issue(&UserId::parse(user)?, 24 * 3600)?)
}

pub fn encode(frame: &ClientFrame) -> Message {
    Message::binary(frame.encode_to_vec())
}

pub fn decode(m: &Message) -> Option<ServerFrame> {
    match m {
        Message::Binary(b) => ServerFrame::decode(b.as_ref()).ok(),
        _ => None,
    }
}

/// Parses `127.0.0.2-127.0.0.9` or a comma-separated list.
pub fn parse_ips(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    if let Some((a, b)) = s.split_once('-') {
        let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (a.parse()?, b.parse()?);
        let (a, b) = (u32::from(a), u32::from(b));
        anyhow::ensure!(a <= b, "empty address range {s}");
        return Ok((a..=b)
            .map(|v| IpAddr::V4(std::net::Ipv4Addr::from(v)))
            .collect());
    }
    s.split(',')
        .map(|p| p.trim().parse().map_err(Into::into))
        .collect()
}
