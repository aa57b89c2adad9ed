use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let action = pensieve::cli::run(pensieve::cli::Cli::parse());
    if let pensieve::cli::Action::Exit(code) = action {
        return code;
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        // Colours only on a terminal: logs piped to files or journald stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let mut config = match action {
        pensieve::cli::Action::Exit(_) => unreachable!(),
        pensieve::cli::Action::Worker(args) => return pensieve::shard::worker(*args),
        pensieve::cli::Action::Serve(config) => *config,
    };
    // A rank above 0 (mlx.launch runs the same command on every rank): follow rank 0.
    if pensieve::shard::env_rank().is_some_and(|r| r > 0) {
        return pensieve::shard::follow(&config);
    }
    // --ranks / --hosts: this process becomes rank 0 and starts the local ranks
    // (from the main thread, which outlives them: they die with it).
    if let Err(e) = pensieve::shard::launch(&config) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    if pensieve::shard::distributed() {
        // A sharded model stays loaded for the server's life (its ranks hold it together).
        config.keep_alive = pensieve::config::KeepAlive(None);
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let served = rt.block_on(pensieve::server::serve(config));
    // The other local ranks were told to stop with the engine: let them finish.
    let ranks_clean = pensieve::shard::reap_children(std::time::Duration::from_secs(10));
    if let Err(e) = served {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(1);
    }
    if !ranks_clean {
        return std::process::ExitCode::from(pensieve::shard::EXIT_GROUP_LOST);
    }
    std::process::ExitCode::SUCCESS
}
