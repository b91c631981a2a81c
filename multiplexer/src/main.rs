//! `multiplexer`: see the library docs. Configuration is read from the environment.

/// jemalloc: allocation was about a tenth of the gateway's CPU under load with glibc's
/// allocator (many small, short-lived buffers moving between threads); see bench/RESULTS.md.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chat_common::telemetry::init_logging();
    let config = multiplexer::Config::from_env()?;
    let shutdown = chat_common::shutdown::on_signals();
    let running = multiplexer::start(config, shutdown).await?;
    running.task.await?;
    Ok(())
}
