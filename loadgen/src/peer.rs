//! A peer in the same run: a websocket server of another project, measured with this load
//! generator's client beside the gateway (bench/peer.sh).

/// What `loadgen peer` measures.
#[derive(clap::Args, Clone, Debug)]
pub struct PeerArgs {}

/// Runs the peer measurement.
pub async fn run(_args: PeerArgs) -> anyhow::Result<()> {
    anyhow::bail!("loadgen peer: not implemented yet")
}
