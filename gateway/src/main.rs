//! `gateway`: see the library docs. Configuration is read from the environment.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chat_common::telemetry::init_logging();
    let config = gateway::Config::from_env()?;
    let shutdown = chat_common::shutdown::on_signals();
    let running = gateway::start(config, shutdown).await?;
    running.task.await?;
    Ok(())
}
