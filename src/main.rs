use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let config = pensieve::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        .init();
    if let Err(e) = pensieve::server::serve(config).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
