//! `multiplexer`: see the library docs. Configuration is read from flags and the environment
//! (`multiplexer --help`).

/// jemalloc: allocation was about a tenth of the gateway's CPU under load with glibc's
/// allocator (many small, short-lived buffers moving between threads); see bench/RESULTS.md.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    // First, so that `--help`, `--version` and a bad value answer before anything starts.
    let config = multiplexer::Config::from_command_line()?;
    chat_common::telemetry::init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()?
        .block_on(run(config))
}

async fn run(config: multiplexer::Config) -> anyhow::Result<()> {
    let shutdown = chat_common::shutdown::on_signals();
    let running = multiplexer::start(config, shutdown).await?;
    running.task.await?;
    Ok(())
}
