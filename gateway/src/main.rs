//! `gateway`: see the library docs. Configuration is read from flags and the environment
//! (`gateway --help`).

/// jemalloc: allocation was about a tenth of the gateway's CPU under load with glibc's
/// allocator (many small, short-lived buffers moving between threads); see bench/RESULTS.md.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    // First, so that `--help`, `--version` and a bad value answer before anything starts.
    let config = gateway::Config::from_command_line()?;
    chat_common::telemetry::init_logging();
    run(config)
}

#[tokio::main]
async fn run(config: gateway::Config) -> anyhow::Result<()> {
    let shutdown = chat_common::shutdown::on_signals();
    let running = gateway::start(config, shutdown).await?;
    running.task.await?
}
