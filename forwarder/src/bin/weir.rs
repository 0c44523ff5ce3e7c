//! `weir`: the load-balancer daemon.

use std::{io::IsTerminal, path::PathBuf};

use clap::Parser;
use weir_config::DEFAULT_CONFIG_PATH;

#[derive(Parser)]
#[command(name = "weir", version, about = "The weir load-balancer daemon")]
struct Args {
    /// The TOML config file.
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match weir_forwarder::daemon::run(&args.config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line per cause chain element joined: operators read this in journald.
            eprintln!("weir: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
