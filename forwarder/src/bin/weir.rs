//! `weir`: the load-balancer daemon.

use std::{io::IsTerminal, path::PathBuf};

use clap::{Parser, Subcommand};
use weir_config::DEFAULT_CONFIG_PATH;

/// mimalloc: per-thread heaps suit thread-per-core workers, whose buffers are allocated and
/// freed on the same thread (measured against glibc malloc in docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "The weir load-balancer daemon",
    long_about = "The weir load-balancer daemon. Without a command it runs until SIGTERM or \
                  SIGINT (SIGHUP reloads the config). Stopping it leaves the XDP datapath pinned \
                  and forwarding, so a restart drops no flow; `weir detach` takes it down."
)]
struct Args {
    /// The TOML config file.
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Detach XDP and unpin the maps a stopped daemon left (ends every L4 flow).
    Detach,
    /// Take over from the daemon running with this config and serve in its place: it hands
    /// over its L7 listening sockets and stops, letting its exchanges finish. A restart or a
    /// binary upgrade by hand that refuses no connection (under systemd, `systemctl restart`
    /// does the same through the descriptor store).
    Upgrade,
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
    let result = match args.command {
        None => weir_forwarder::daemon::run(&args.config),
        Some(Command::Detach) => weir_forwarder::daemon::detach(&args.config),
        Some(Command::Upgrade) => weir_forwarder::daemon::upgrade(&args.config),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line per cause chain element joined: operators read this in journald.
            eprintln!("weir: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
