use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let config = match pensieve::cli::run(pensieve::cli::Cli::parse()) {
        pensieve::cli::Action::Exit(code) => return code,
        pensieve::cli::Action::Serve(config) => *config,
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        // Colours only on a terminal: logs piped to files or journald stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    if let Err(e) = rt.block_on(pensieve::server::serve(config)) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(1);
    }
    std::process::ExitCode::SUCCESS
}
