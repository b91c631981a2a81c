//! A TCP proxy on loopback that a scenario can cut (drop every connection and refuse new ones)
//! and restore: the "cut a link" fault between a process and a dependency.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy from `listen` to `upstream`.
pub struct Proxy {
    cut: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Arc<Self>> {
        let listener = TcpListener::bind(listen).await?;
        let (cut, cut_rx) = watch::channel(false);
        let proxy = Arc::new(Self { cut });
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut cut_rx = cut_rx.clone();
                if *cut_rx.borrow() {
                    drop(inbound); // refused while cut
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|c| *c) => {} // cut: both ends dropped
                    }
                });
            }
        });
        Ok(proxy)
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}
